"""Robustness metrics (Quantus 0.6.0 names): does the explanation stay put when the input barely moves?

Every metric is built ``metric = fxattr.metrics.NAME(f, explain=..., **config)`` and called per
example ``metric(params, x, target, attribution)``; batch it with
``torch.vmap(metric, in_dims=(None, 0, 0, 0), randomness="different")``. ``consistency`` compares
examples with each other and is called on a whole batch, ``metric(params, X, T, A)``.

Shared conventions (Quantus's ``Metric``):

- ``explain`` is any fxattr explainer (``fxattr.gradient(f)``, ``fxattr.lrp(f, ...)``, ...); the
  metric re-explains the perturbed copies with it, for the same ``target``
  (``None``: the argmax at the clean ``x``, held fixed).
- ``normalise`` / ``abs`` are applied to the given attribution and to every re-explanation alike:
  first the division by the maximum absolute value (the second-moment normalisation for the
  relative-stability metrics), then the absolute value. Quantus normalises over the whole *batch*;
  here over the one example (equal to Quantus called one example at a time).
- The noise is drawn from torch's generator (``torch.manual_seed`` reproduces it; vmap with
  ``randomness="different"`` gives every example its own) or passed in with ``noise=`` -- additive
  noise of shape ``(nr_samples, *x.shape)`` -- to replay a run exactly. The noisy copies are
  re-explained with ``torch.vmap`` in chunks of ``chunk_size``.
- ``return_nan_when_prediction_changes``: a sample whose predicted class (argmax) differs from the
  clean input's is NaN (continuity: from ``target``, as Quantus). With the flag off, the reduction
  over samples ignores NaN (Quantus's ``np.nanmax``/``np.nanmean``); with it on, NaN propagates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

import fxattr
from fxattr.errors import api_boundary, fail
from fxattr.metrics.common import (
    baseline_value,
    check_attribution,
    check_baseline,
    check_batch_attribution,
    check_bool,
    check_explainer,
    check_float,
    check_int,
    check_model,
    check_replay,
    normalise_by_max,
    resolve_target,
)
from fxattr.metrics.common import metric as named_metric

__all__ = [
    "avg_sensitivity",
    "consistency",
    "continuity",
    "local_lipschitz_estimate",
    "max_sensitivity",
    "relative_input_stability",
    "relative_output_stability",
    "relative_representation_stability",
]


# --------------------------------------------------------------------------------------------- checks

NORMS = ("fro", "l2", "linf")


def vector_norm(name_or_fn, v: Tensor) -> Tensor:
    """Quantus's ``fro_norm``/``l2_norm`` (both the 2-norm of the flattened array), ``linf_norm``,
    or a callable of a flat tensor."""
    if callable(name_or_fn):
        return name_or_fn(v)
    if name_or_fn == "linf":
        return v.abs().amax(-1)
    return torch.linalg.vector_norm(v, dim=-1)


def check_norm(name: str, value) -> None:
    if not (callable(value) or value in NORMS):
        raise fail(None, f"{name} must be one of {', '.join(map(repr, NORMS))} or a callable of a flat "
                          f"tensor, got {value!r}")


# ------------------------------------------------------------------------------------- attributions

def normalise_by_second_moment(a: Tensor) -> Tensor:
    """``a / sqrt(mean(a^2))`` (Quantus's ``normalise_by_average_second_moment_estimate``, Binder et
    al. 2022); an all-zero ``a`` is returned unchanged."""
    moment = a.square().mean().sqrt()
    return a / torch.where(moment == 0, torch.ones_like(moment), moment)


def prepare(a: Tensor, *, normalise: bool, abs: bool,  # noqa: A002 - Quantus's name
            normalise_func=normalise_by_max) -> Tensor:
    """Quantus's post-processing of an attribution: normalise first, then the absolute value."""
    if normalise:
        a = normalise_func(a)
    if abs:
        a = a.abs()
    return a


def predicted_class(f, params, x) -> Tensor:
    return f(params, x).detach().reshape(-1).argmax()


def nan_reduce(values: Tensor, how: str, propagate: bool) -> Tensor:
    """max or mean over the last axis; NaN ignored (``np.nanmax``/``nanmean``) unless ``propagate``."""
    if how == "mean":
        return values.mean(-1) if propagate else torch.nanmean(values, dim=-1)
    if propagate:
        return values.amax(-1)  # NaN propagates through amax
    finite = torch.where(torch.isnan(values), torch.full_like(values, float("-inf")), values)
    best = finite.amax(-1)
    return torch.where(torch.isnan(values).all(-1), torch.full_like(best, float("nan")), best)


def uniform_noise(shape, like: Tensor, lower: float, upper: float | None) -> Tensor:
    """Quantus's ``batch_uniform_noise``: U(-lower, lower), or U(lower, upper) with an upper bound."""
    low, high = (-lower, lower) if upper is None else (lower, upper)
    return low + (high - low) * torch.rand(shape, dtype=like.dtype, device=like.device)


def reexplain(explain, params, points: Tensor, target, chunk_size):
    """``explain`` at every point of ``points`` (leading sample axis), vmapped in chunks."""
    return torch.vmap(lambda p: explain(params, p, target), chunk_size=chunk_size, randomness="different")(points)


def as_explanation(a: Tensor, like: Tensor) -> Tensor:
    """A re-explanation, flattened; one-channel attributions keep one channel (channel sum first)."""
    if a.shape != like.shape:
        a = a.sum(0, keepdim=True)
    return a


# ------------------------------------------------------------------------------------ sensitivity

def _sensitivity(name: str, reduction: str, f, *, explain, nr_samples, lower_bound, upper_bound,
                 norm_numerator, norm_denominator, abs, normalise,  # noqa: A002
                 return_nan_when_prediction_changes, chunk_size):
    check_model(f)
    check_explainer(explain, "that re-explains the perturbed inputs")
    check_int("nr_samples", nr_samples)
    check_float("lower_bound", lower_bound, 0.0)
    check_float("upper_bound", upper_bound, allow_none=True)
    if upper_bound is not None and upper_bound <= lower_bound:
        raise fail(None, f"upper_bound must be larger than lower_bound, got {upper_bound!r} <= "
                          f"{lower_bound!r}")
    check_norm("norm_numerator", norm_numerator)
    check_norm("norm_denominator", norm_denominator)
    for flag, value in (("abs", abs), ("normalise", normalise),
                        ("return_nan_when_prediction_changes", return_nan_when_prediction_changes)):
        check_bool(flag, value)
    check_int("chunk_size", chunk_size, allow_none=True)

    def metric(params, x, target, attribution, *, noise=None):
        check_attribution(x, attribution)
        shape = (nr_samples, *x.shape)
        if noise is None:
            noise = uniform_noise(shape, x, lower_bound, upper_bound)
        check_replay("noise", noise, shape)
        target = resolve_target(f, params, x, target)
        a = prepare(attribution, normalise=normalise, abs=abs)
        perturbed = prepare_many(explain, params, x + noise, target, a, normalise, abs, chunk_size)
        a_flat = a.reshape(-1)
        numerator = vector_norm(norm_numerator, a_flat - perturbed.reshape(nr_samples, -1))
        ratios = numerator / vector_norm(norm_denominator, a_flat)
        if return_nan_when_prediction_changes:
            ratios = nan_where_changed(f, params, x, x + noise, ratios, chunk_size)
        return nan_reduce(ratios, reduction, return_nan_when_prediction_changes)

    config = dict(explain=explain, nr_samples=nr_samples, lower_bound=lower_bound,
                  upper_bound=upper_bound, norm_numerator=norm_numerator,
                  norm_denominator=norm_denominator, abs=abs, normalise=normalise,
                  chunk_size=chunk_size,
                  return_nan_when_prediction_changes=return_nan_when_prediction_changes)
    return named_metric(name, f, config, metric)


def prepare_many(explain, params, points, target, like, normalise, abs, chunk_size,  # noqa: A002
                 normalise_func=normalise_by_max):
    """Re-explanations of ``points`` (leading sample axis), each post-processed like ``like``."""
    def one(p):
        a = as_explanation(explain(params, p, target), like)
        return prepare(a, normalise=normalise, abs=abs, normalise_func=normalise_func)
    return torch.vmap(one, chunk_size=chunk_size, randomness="different")(points)


def changed_predictions(f, params, x, points, chunk_size, reference=None) -> Tensor:
    """Whether the argmax at each of ``points`` differs from the one at ``x`` (or ``reference``)."""
    before = predicted_class(f, params, x) if reference is None else reference
    after = torch.vmap(lambda p: predicted_class(f, params, p), chunk_size=chunk_size)(points)
    return after != before


def nan_where_changed(f, params, x, points, values, chunk_size, reference=None) -> Tensor:
    changed = changed_predictions(f, params, x, points, chunk_size, reference)
    return torch.where(changed, torch.full_like(values, float("nan")), values)


@api_boundary("metrics.max_sensitivity")
def max_sensitivity(f, *, explain=None, nr_samples: int = 200, lower_bound: float = 0.2,
                    upper_bound: float | None = None, norm_numerator="fro", norm_denominator="fro",
                    abs: bool = False, normalise: bool = False,  # noqa: A002 - Quantus's name
                    return_nan_when_prediction_changes: bool = False, chunk_size: int | None = 16):
    """Max-Sensitivity (Yeh et al. 2019, "On the (in)fidelity and sensitivity for explanations",
    NeurIPS; Bhatt et al. 2020, IJCAI).

    ``max_k ||a - a(x + eps_k)|| / ||a||`` over ``nr_samples`` uniform noise draws ``eps_k``
    (U(-lower_bound, lower_bound), or U(lower_bound, upper_bound) with an upper bound; Quantus's
    ``batch_uniform_noise``), each noisy copy re-explained with ``explain`` for the same target.
    Norms are Frobenius (2-norms of the flattened attributions) unless ``norm_numerator`` /
    ``norm_denominator`` say ``"linf"`` (or pass a callable of a flat tensor). Lower is better.

    Differentiable with ``torch.func.grad`` w.r.t. ``params``, ``x`` and ``attribution`` where the
    explainer is (fixed ``noise=``).

    Args:
        f: the model function of ``fxattr.functionalize``.
        explain: the explainer that produced ``attribution`` (e.g. ``fxattr.gradient(f)``).
        nr_samples: number of noise draws.
        lower_bound, upper_bound: the uniform noise's bounds (Quantus's defaults 0.2, None).
        norm_numerator, norm_denominator: ``"fro"`` (= ``"l2"``), ``"linf"`` or a callable.
        abs, normalise: post-processing of every attribution (max-abs normalisation, then abs).
        return_nan_when_prediction_changes: NaN for draws that change the predicted class.
        chunk_size: noisy copies explained per vmapped call (``None``: all at once).

    Returns:
        ``metric(params, x, target, attribution, *, noise=None)`` -> a 0-d tensor; ``noise`` of
        shape ``(nr_samples, *x.shape)`` replays the additive noise.

    Example:
        >>> metric = fxattr.metrics.max_sensitivity(f, explain=fxattr.gradient(f), nr_samples=10)
        >>> a = torch.vmap(fxattr.gradient(f), in_dims=(None, 0, 0))(params, x, y)
        >>> torch.vmap(metric, in_dims=(None, 0, 0, 0), randomness="different")(params, x, y, a)
    """
    return _sensitivity("max_sensitivity", "max", f, explain=explain, nr_samples=nr_samples,
                        lower_bound=lower_bound, upper_bound=upper_bound, norm_numerator=norm_numerator,
                        norm_denominator=norm_denominator, abs=abs, normalise=normalise,
                        return_nan_when_prediction_changes=return_nan_when_prediction_changes,
                        chunk_size=chunk_size)


@api_boundary("metrics.avg_sensitivity")
def avg_sensitivity(f, *, explain=None, nr_samples: int = 200, lower_bound: float = 0.2,
                    upper_bound: float | None = None, norm_numerator="fro", norm_denominator="fro",
                    abs: bool = False, normalise: bool = False,  # noqa: A002 - Quantus's name
                    return_nan_when_prediction_changes: bool = False, chunk_size: int | None = 16):
    """Avg-Sensitivity (Yeh et al. 2019, NeurIPS): ``mean_k ||a - a(x + eps_k)|| / ||a||``.

    As :func:`max_sensitivity` (same noise, norms, keywords and replay), averaged over the draws
    instead of maximised. Differentiable where the explainer is.

    Example:
        >>> metric = fxattr.metrics.avg_sensitivity(f, explain=fxattr.gradient(f), nr_samples=10)
        >>> torch.vmap(metric, in_dims=(None, 0, 0, 0), randomness="different")(params, x, y, a)
    """
    return _sensitivity("avg_sensitivity", "mean", f, explain=explain, nr_samples=nr_samples,
                        lower_bound=lower_bound, upper_bound=upper_bound, norm_numerator=norm_numerator,
                        norm_denominator=norm_denominator, abs=abs, normalise=normalise,
                        return_nan_when_prediction_changes=return_nan_when_prediction_changes,
                        chunk_size=chunk_size)


@api_boundary("metrics.local_lipschitz_estimate")
def local_lipschitz_estimate(f, *, explain=None, nr_samples: int = 200, perturb_mean: float = 0.0,
                             perturb_std: float = 0.1, abs: bool = False,  # noqa: A002
                             normalise: bool = True, return_nan_when_prediction_changes: bool = False,
                             chunk_size: int | None = 16):
    """Local Lipschitz estimate (Alvarez-Melis & Jaakkola 2018, "On the robustness of
    interpretability methods", ICML WHI).

    ``max_k ||a - a(x + eps_k)||_2 / (||eps_k||_2 + 1e-10)`` over Gaussian draws
    ``eps_k ~ N(perturb_mean, perturb_std^2)`` (Quantus's ``batch_gaussian_noise`` and
    ``lipschitz_constant`` with Euclidean distances). Quantus's default ``normalise=True`` divides
    each attribution by its maximum absolute value (here per example). Lower is better.

    Returns:
        ``metric(params, x, target, attribution, *, noise=None)`` -> a 0-d tensor; ``noise`` of
        shape ``(nr_samples, *x.shape)`` is the additive noise itself.

    Example:
        >>> metric = fxattr.metrics.local_lipschitz_estimate(f, explain=fxattr.gradient(f), nr_samples=10)
        >>> torch.vmap(metric, in_dims=(None, 0, 0, 0), randomness="different")(params, x, y, a)
    """
    check_model(f)
    check_explainer(explain, "that re-explains the perturbed inputs")
    check_int("nr_samples", nr_samples)
    check_float("perturb_mean", perturb_mean)
    check_float("perturb_std", perturb_std, 0.0)
    for flag, value in (("abs", abs), ("normalise", normalise),
                        ("return_nan_when_prediction_changes", return_nan_when_prediction_changes)):
        check_bool(flag, value)
    check_int("chunk_size", chunk_size, allow_none=True)

    def metric(params, x, target, attribution, *, noise=None):
        check_attribution(x, attribution)
        shape = (nr_samples, *x.shape)
        if noise is None:
            noise = perturb_mean + perturb_std * torch.randn(shape, dtype=x.dtype, device=x.device)
        check_replay("noise", noise, shape)
        target = resolve_target(f, params, x, target)
        a = prepare(attribution, normalise=normalise, abs=abs)
        perturbed = prepare_many(explain, params, x + noise, target, a, normalise, abs, chunk_size)
        numerator = torch.linalg.vector_norm(a.reshape(1, -1) - perturbed.reshape(nr_samples, -1), dim=-1)
        denominator = torch.linalg.vector_norm(noise.reshape(nr_samples, -1), dim=-1) + 1e-10
        ratios = numerator / denominator
        if return_nan_when_prediction_changes:
            ratios = nan_where_changed(f, params, x, x + noise, ratios, chunk_size)
        return nan_reduce(ratios, "max", return_nan_when_prediction_changes)

    config = dict(explain=explain, nr_samples=nr_samples, perturb_mean=perturb_mean,
                  perturb_std=perturb_std, abs=abs, normalise=normalise, chunk_size=chunk_size,
                  return_nan_when_prediction_changes=return_nan_when_prediction_changes)
    return named_metric("local_lipschitz_estimate", f, config, metric)


# -------------------------------------------------------------------------------------- continuity

def translations(width: int, nr_steps: int) -> list[int]:
    """Quantus's shifts: ``-W + k * ((2W + 1) // nr_steps)`` for ``k = 1 .. nr_steps``."""
    dx = (2 * width + 1) // nr_steps
    return [-width + dx * (k + 1) for k in range(nr_steps)]


def translate(x: Tensor, shifts: Tensor, fill: Tensor) -> Tensor:
    """``x`` shifted along its last axis by each of ``shifts`` (positive: to the right), the
    uncovered columns set to ``fill``: ``out[..., j] = x[..., j - s]`` where ``0 <= j - s < W``."""
    width = x.shape[-1]
    source = torch.arange(width, device=x.device)[None, :] - shifts[:, None]  # (S, W)
    inside = (source >= 0) & (source < width)
    gathered = x[..., source.clamp(0, width - 1)]  # (..., S, W)
    gathered = gathered.movedim(-2, 0)  # (S, ..., W)
    return torch.where(inside.reshape(len(shifts), *([1] * (x.ndim - 1)), width), gathered, fill)


@api_boundary("metrics.continuity")
def continuity(f, *, explain=None, nr_steps: int = 28, perturb_baseline="black",
               abs: bool = True, normalise: bool = True,  # noqa: A002 - Quantus's name
               return_nan_when_prediction_changes: bool = False, chunk_size: int | None = 16):
    """Continuity (Montavon et al. 2018, "Methods for interpreting and understanding deep neural
    networks", DSP), as Quantus 0.6.0 computes it.

    The input is translated along its last (width) axis by ``nr_steps`` shifts
    ``-W + k * ((2W + 1) // nr_steps)``, ``k = 1 .. nr_steps``, the uncovered columns filled with the
    baseline (``"black"``: the example's minimum); each translated copy is re-explained and the score
    is ``max_k ||a - a_k||_1 / (||x - x_k||_2 + 1e-9)`` (lower is better). With
    ``return_nan_when_prediction_changes``, a shift whose predicted class differs from ``target`` is
    NaN and NaN propagates (Quantus's ``np.max``).

    Differences from Quantus 0.6.0: Quantus re-explains x itself and ignores the attribution it is
    given; here ``attribution`` is used (identical when it is ``explain(params, x, target)``).
    Quantus ignores its ``perturb_baseline`` keyword (always ``"black"``); here it is honoured.
    A shift larger than the width (Quantus: an IndexError) is an error. Quantus's
    ``return_nan_when_prediction_changes=True`` writes ``np.NaN``, removed in numpy 2 (an
    AttributeError there); here it gives NaN as intended.

    Returns:
        ``metric(params, x, target, attribution)`` -> a 0-d tensor; ``x`` is ``(C, H, W)`` or
        ``(C, W)`` (a time series).

    Example:
        >>> metric = fxattr.metrics.continuity(f, explain=fxattr.gradient(f), nr_steps=8)
        >>> torch.vmap(metric, in_dims=(None, 0, 0, 0))(params, x, y, a)
    """
    check_model(f)
    check_explainer(explain, "that re-explains the perturbed inputs")
    check_int("nr_steps", nr_steps)
    check_baseline(perturb_baseline)
    for flag, value in (("abs", abs), ("normalise", normalise),
                        ("return_nan_when_prediction_changes", return_nan_when_prediction_changes)):
        check_bool(flag, value)
    check_int("chunk_size", chunk_size, allow_none=True)

    def metric(params, x, target, attribution):
        check_attribution(x, attribution)
        if x.ndim not in (2, 3):
            raise fail(None, "x must be an image (C, H, W) or a time series (C, W), got shape "
                              f"{tuple(x.shape)}")
        shifts = translations(x.shape[-1], nr_steps)
        largest = max(max(shifts), -min(shifts))
        if largest > x.shape[-1]:
            raise fail(None, f"nr_steps={nr_steps} gives shifts up to {largest} pixels, "
                              f"more than the width {x.shape[-1]}")
        target = resolve_target(f, params, x, target)
        fill = baseline_value(perturb_baseline, x)
        moved = translate(x, torch.tensor(shifts, device=x.device), fill)
        a = prepare(attribution, normalise=normalise, abs=abs)
        perturbed = prepare_many(explain, params, moved, target, a, normalise, abs, chunk_size)
        numerator = (a.reshape(1, -1) - perturbed.reshape(nr_steps, -1)).abs().sum(-1)
        denominator = torch.linalg.vector_norm((x - moved).reshape(nr_steps, -1), dim=-1) + 1e-9
        ratios = numerator / denominator
        if return_nan_when_prediction_changes:
            reference = torch.as_tensor(target, device=x.device)
            ratios = nan_where_changed(f, params, x, moved, ratios, chunk_size, reference=reference)
        return ratios.amax(-1)

    config = dict(explain=explain, nr_steps=nr_steps, perturb_baseline=perturb_baseline, abs=abs,
                  normalise=normalise, chunk_size=chunk_size,
                  return_nan_when_prediction_changes=return_nan_when_prediction_changes)
    return named_metric("continuity", f, config, metric)


# ------------------------------------------------------------------------------------- consistency

DISCRETISERS = ("top_n_sign", "sign", "rank")


@api_boundary("metrics.consistency")
def consistency(f, *, discretise_func: str = "top_n_sign", n: int = 5,
                abs: bool = True, normalise: bool = True):  # noqa: A002 - Quantus's name
    """Consistency (Dasgupta et al. 2022, "Framework for evaluating faithfulness of local
    explanations", ICML), called on a whole batch: ``metric(params, X, T, A)``.

    Each attribution is discretised (``"top_n_sign"``: the signs of its first ``n`` features in
    flattened order, Quantus's default; ``"sign"``: all signs; ``"rank"``: the descending argsort).
    An example's score is the share of the *other* examples with the same discretised explanation
    that also have the same predicted class (argmax of ``f``):
    ``sum_j!=i [c_j = c_i][d_j = d_i] / (sum_j!=i [d_j = d_i] + 1e-9)``. Higher is better.
    ``T`` is not used (Quantus's neither). Quantus compares hashes of the discretised arrays; here
    the arrays themselves.

    Returns:
        ``metric(params, X, T, A)`` -> a ``(B,)`` tensor.

    Example:
        >>> metric = fxattr.metrics.consistency(f)
        >>> scores = metric(params, x, y, torch.vmap(fxattr.gradient(f), in_dims=(None, 0, 0))(params, x, y))
    """
    check_model(f)
    if discretise_func not in DISCRETISERS:
        raise fail(None, f"discretise_func must be one of {', '.join(map(repr, DISCRETISERS))}, "
                          f"got {discretise_func!r}")
    check_int("n", n)
    check_bool("abs", abs)
    check_bool("normalise", normalise)

    def metric(params, x, target, attribution):
        if not isinstance(attribution, Tensor) or not isinstance(x, Tensor):
            raise fail(None, "x and attribution must be tensors of a whole batch")
        if attribution.ndim < 2 or attribution.shape[0] != x.shape[0]:
            raise fail(None, f"consistency is called on a whole batch: attribution has shape "
                              f"{tuple(attribution.shape)}, x has shape {tuple(x.shape)} (the batch "
                              "axes must agree)")
        check_batch_attribution(x, attribution)
        batch = x.shape[0]
        a = torch.vmap(lambda t: prepare(t, normalise=normalise, abs=abs))(attribution).reshape(batch, -1)
        if discretise_func == "top_n_sign":
            codes = torch.sign(a[:, :n])
        elif discretise_func == "sign":
            codes = torch.sign(a)
        else:
            codes = torch.argsort(a, dim=-1, descending=True, stable=True).to(a.dtype)
        classes = torch.vmap(lambda t: predicted_class(f, params, t))(x)
        others = ~torch.eye(batch, dtype=torch.bool, device=x.device)
        same_code = (codes[None] == codes[:, None]).all(-1) & others
        same_class = (classes[None] == classes[:, None]) & others
        agree = (same_code & same_class).sum(-1).to(a.dtype)
        return agree / (same_code.sum(-1).to(a.dtype) + 1e-9)

    config = dict(discretise_func=discretise_func, n=n, abs=abs, normalise=normalise)
    return named_metric("consistency", f, config, metric)


# ------------------------------------------------------------------------------ relative stability

def relative_change(value: Tensor, perturbed: Tensor, eps_min: float) -> Tensor:
    """``(v - v') / (v + [v == 0] * eps_min)``, Agarwal et al.'s element-wise relative change."""
    return (value - perturbed) / (value + (value == 0).to(value.dtype) * eps_min)


def floor_zero(norm: Tensor, eps_min: float) -> Tensor:
    """A denominator with exact zeros replaced by ``eps_min`` (Quantus's ``+ (d == 0) * eps_min``)."""
    return norm + (norm == 0).to(norm.dtype) * eps_min


def _relative_stability(name: str, kind: str, f, *, explain, nr_samples, lower_bound, upper_bound,
                        eps_min, abs, normalise, return_nan_when_prediction_changes,  # noqa: A002
                        softmax, representation, chunk_size):
    check_model(f)
    check_explainer(explain, "that re-explains the perturbed inputs")
    check_int("nr_samples", nr_samples)
    check_float("lower_bound", lower_bound)
    check_float("upper_bound", upper_bound, allow_none=True)
    if upper_bound is not None and upper_bound <= lower_bound:
        raise fail(None, f"upper_bound must be larger than lower_bound, got {upper_bound!r} <= "
                          f"{lower_bound!r}")
    if upper_bound is None:
        check_float("lower_bound", lower_bound, 0.0)
    check_float("eps_min", eps_min, 0.0, strict_minimum=True)
    for flag, value in (("abs", abs), ("normalise", normalise), ("softmax", softmax),
                        ("return_nan_when_prediction_changes", return_nan_when_prediction_changes)):
        check_bool(flag, value)
    check_int("chunk_size", chunk_size, allow_none=True)
    if kind == "representation":
        representation = representation_function(f, representation)

    def hidden(params, x):
        if kind == "output":
            out = f(params, x).reshape(-1)
            return out.softmax(-1) if softmax else out
        return representation(params, x).reshape(-1)

    def metric(params, x, target, attribution, *, noise=None):
        check_attribution(x, attribution)
        shape = (nr_samples, *x.shape)
        if noise is None:
            noise = uniform_noise(shape, x, lower_bound, upper_bound)
        check_replay("noise", noise, shape)
        target = resolve_target(f, params, x, target)
        points = x + noise
        a = prepare(attribution, normalise=normalise, abs=abs, normalise_func=normalise_by_second_moment)
        perturbed = prepare_many(explain, params, points, target, a, normalise, abs, chunk_size,
                                 normalise_func=normalise_by_second_moment)
        numerator = torch.linalg.vector_norm(
            relative_change(a.reshape(1, -1), perturbed.reshape(nr_samples, -1), eps_min), dim=-1)
        if kind == "input":
            change = relative_change(x.reshape(1, -1), points.reshape(nr_samples, -1), eps_min)
        else:
            h = hidden(params, x)
            h_perturbed = torch.vmap(lambda p: hidden(params, p), chunk_size=chunk_size)(points)
            if kind == "output":
                change = h[None] - h_perturbed
            else:
                change = relative_change(h[None], h_perturbed, eps_min)
        ratios = numerator / floor_zero(torch.linalg.vector_norm(change, dim=-1), eps_min)
        if return_nan_when_prediction_changes:
            ratios = nan_where_changed(f, params, x, points, ratios, chunk_size)
        return nan_reduce(ratios, "max", return_nan_when_prediction_changes)

    config = dict(explain=explain, nr_samples=nr_samples, lower_bound=lower_bound,
                  upper_bound=upper_bound, eps_min=eps_min, abs=abs, normalise=normalise,
                  softmax=softmax, representation=representation, chunk_size=chunk_size,
                  return_nan_when_prediction_changes=return_nan_when_prediction_changes)
    return named_metric(name, f, config, metric)


def representation_function(f, representation):
    """``representation`` as a callable ``(params, x) -> tensor``: a callable is kept; a layer name
    (or a list of them) becomes the layer's output, cut out of ``f`` with ``fxattr.graph.split``
    (no hooks), several layers' outputs flattened and concatenated in the order given."""
    if callable(representation):
        return representation
    names = [representation] if isinstance(representation, str) else representation
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise fail(None, "representation must be a callable (params, x) -> tensor giving the internal "
                          "representation of one example, or a layer name (or a list of them), got "
                          f"{representation!r}")
    bodies = [fxattr.graph.split(f, name)[0] for name in names]

    def layers(params, x):
        return torch.cat([body(params, x).reshape(-1) for body in bodies])

    return layers


@api_boundary("metrics.relative_input_stability")
def relative_input_stability(f, *, explain=None, nr_samples: int = 200, lower_bound: float = 0.02,
                             upper_bound: float | None = 0.2, eps_min: float = 1e-6,
                             abs: bool = False, normalise: bool = False,  # noqa: A002
                             return_nan_when_prediction_changes: bool = True,
                             chunk_size: int | None = 16):
    """Relative Input Stability (Agarwal et al. 2022, "Rethinking stability for attribution-based
    explanations", ICLR PAIR2Struct).

    ``max_k ||(a - a_k) / a||_2 / max(||(x - x_k) / x||_2, eps_min)``, the divisions element-wise
    with exact zeros replaced by ``eps_min``, over ``nr_samples`` noisy copies
    ``x_k = x + U(lower_bound, upper_bound)`` (Quantus's ``batch_uniform_noise`` with
    ``upper_bound=0.2``: a positive shift; ``upper_bound=None`` gives U(-lower_bound, lower_bound)).
    ``normalise=True`` divides each attribution by its root mean square (Quantus's default
    ``normalise_by_average_second_moment_estimate``). By default a copy that changes the predicted
    class makes the score NaN (Quantus: ``return_nan_when_prediction_changes=True``, ``np.max``).

    Returns:
        ``metric(params, x, target, attribution, *, noise=None)`` -> a 0-d tensor.

    Example:
        >>> metric = fxattr.metrics.relative_input_stability(f, explain=fxattr.gradient(f), nr_samples=10)
        >>> torch.vmap(metric, in_dims=(None, 0, 0, 0), randomness="different")(params, x, y, a)
    """
    return _relative_stability("relative_input_stability", "input", f, explain=explain,
                               nr_samples=nr_samples, lower_bound=lower_bound, upper_bound=upper_bound,
                               eps_min=eps_min, abs=abs, normalise=normalise,
                               return_nan_when_prediction_changes=return_nan_when_prediction_changes,
                               softmax=False, representation=None, chunk_size=chunk_size)


@api_boundary("metrics.relative_output_stability")
def relative_output_stability(f, *, explain=None, nr_samples: int = 200, lower_bound: float = 0.02,
                              upper_bound: float | None = 0.2, eps_min: float = 1e-6,
                              abs: bool = False, normalise: bool = False,  # noqa: A002
                              return_nan_when_prediction_changes: bool = True, softmax: bool = False,
                              chunk_size: int | None = 16):
    """Relative Output Stability (Agarwal et al. 2022): as :func:`relative_input_stability` with the
    denominator ``max(||h(x) - h(x_k)||_2, eps_min)``, ``h`` the model's logits (probabilities with
    ``softmax=True``; Quantus's call keyword, default False).

    Example:
        >>> metric = fxattr.metrics.relative_output_stability(f, explain=fxattr.gradient(f), nr_samples=10)
        >>> torch.vmap(metric, in_dims=(None, 0, 0, 0), randomness="different")(params, x, y, a)
    """
    return _relative_stability("relative_output_stability", "output", f, explain=explain,
                               nr_samples=nr_samples, lower_bound=lower_bound, upper_bound=upper_bound,
                               eps_min=eps_min, abs=abs, normalise=normalise,
                               return_nan_when_prediction_changes=return_nan_when_prediction_changes,
                               softmax=softmax, representation=None, chunk_size=chunk_size)


@api_boundary("metrics.relative_representation_stability")
def relative_representation_stability(f, *, explain=None, representation: Callable | str | list | None = None,
                                      nr_samples: int = 200, lower_bound: float = 0.02,
                                      upper_bound: float | None = 0.2, eps_min: float = 1e-6,
                                      abs: bool = False, normalise: bool = False,  # noqa: A002
                                      return_nan_when_prediction_changes: bool = True,
                                      chunk_size: int | None = 16):
    """Relative Representation Stability (Agarwal et al. 2022): as :func:`relative_input_stability`
    with the denominator ``max(||(L(x) - L(x_k)) / L(x)||_2, eps_min)`` (element-wise relative
    change, zeros of ``L(x)`` replaced by ``eps_min``), ``L`` an internal representation.

    ``representation`` gives ``L`` for ONE example (flattened): a module name, e.g. ``"1"`` or
    ``"layer3"`` (its output, cut out of ``f`` with ``fxattr.graph.split``: a pure function, no
    hooks), a list of names (their outputs concatenated in the order given), or any callable
    ``(params, x) -> tensor``. Quantus's ``layer_names=[...]`` registers forward hooks and
    concatenates the chosen modules' outputs in execution order: the same as a list of names given
    in execution order. Quantus's ``layer_indices`` and its default (every layer) are not offered:
    name the layers.

    Example:
        >>> metric = fxattr.metrics.relative_representation_stability(
        ...     f, explain=fxattr.gradient(f), representation=representation, nr_samples=10)
        >>> torch.vmap(metric, in_dims=(None, 0, 0, 0), randomness="different")(params, x, y, a)
    """
    return _relative_stability("relative_representation_stability", "representation", f,
                               explain=explain, nr_samples=nr_samples, lower_bound=lower_bound,
                               upper_bound=upper_bound, eps_min=eps_min, abs=abs, normalise=normalise,
                               return_nan_when_prediction_changes=return_nan_when_prediction_changes,
                               softmax=False, representation=representation, chunk_size=chunk_size)
