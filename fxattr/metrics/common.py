"""What the metrics share: configuration checks, attribution preprocessing, baselines, orderings,
correlations and the chunked, vmapped evaluation of perturbed copies.

Conventions (Quantus 0.6.0, which every metric matches):

- **Attributions** are preprocessed as Quantus's ``Metric.general_preprocess`` does: first
  ``normalise`` (``normalise_by_max``: divide by the largest absolute value), then ``abs``.
  Quantus normalises over the *whole batch* it is given (one maximum for all examples); an fxattr
  metric sees one example, so :func:`prepare_attribution` divides by that example's maximum. The
  two agree exactly for a batch of one, and for any batch when the attributions are first passed
  through :func:`normalise_batch` and the metric is built with ``normalise=False``. Metrics that
  only rank the attribution or correlate it (Pearson, Spearman) give the same numbers either way.
- **Order**: "most relevant first" is ``argsort(-a)`` of the flattened attribution
  (:func:`descending_order`), ties broken by position (a stable sort; numpy's default quicksort,
  which Quantus uses, breaks ties arbitrarily, so parity holds for attributions without ties).
- **Baselines** (``perturb_baseline``): a number, a tensor broadcastable to x, or one of
  ``"black"`` (the minimum of the array being perturbed), ``"white"`` (its maximum), ``"mean"``
  (its mean), ``"uniform"`` (a draw from U(uniform_low, uniform_high)). Quantus computes the
  baseline on the *already perturbed* array at each step, which matters only for ``"mean"`` (the
  minimum and maximum do not change when features are set to them); see :func:`cumulative_means`.
- **Model calls**: :func:`target_scores` evaluates the model on a stack of perturbed copies with
  one ``torch.vmap`` (``chunk_size`` copies at a time), optionally through a softmax, and reads the
  target's score; nothing leaves the device.
"""

from __future__ import annotations

import math
from numbers import Real
from types import MappingProxyType

import torch
from torch import Tensor, nn

import fxattr
from fxattr.errors import api_boundary, fail
from fxattr.targets import check_index, readable

__all__ = [
    "BASELINE_NAMES",
    "baseline_value",
    "check_baseline",
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "check_metric_input",
    "check_model",
    "check_replay",
    "cumulative_means",
    "descending_order",
    "is_concrete",
    "metric",
    "model_output",
    "normalise_batch",
    "normalise_by_max",
    "pearson",
    "prepare_attribution",
    "ranks",
    "resolve_target",
    "scores_along",
    "spearman",
    "target_scores",
    "trapezoid",
]

BASELINE_NAMES = ("black", "white", "mean", "uniform")


# ----------------------------------------------------------------------------------- config checks

def check_model(f) -> None:
    """``f`` must be the function of ``fxattr.functionalize`` (or any ``f(params, x)``)."""
    if isinstance(f, nn.Module):
        raise fail(None, "f must be a function f(params, x), not an nn.Module: "
                          "use f, params = fxattr.functionalize(model)")
    if not callable(f):
        raise fail(None, f"f must be a callable f(params, x), got {type(f).__name__}")


def check_int(name: str, value, minimum: int = 1, allow_none: bool = False,
              maximum: int | None = None) -> None:
    """Raises unless ``value`` is an int (not a bool) in ``[minimum, maximum]`` (or None if allowed)."""
    if value is None and allow_none:
        return
    if (isinstance(value, bool) or not isinstance(value, int) or value < minimum
            or (maximum is not None and value > maximum)):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise fail(None, f"{name} must be an int {bound}{' or None' if allow_none else ''}, "
                          f"got {value!r}")


def check_float(name: str, value, minimum: float | None = None,
                maximum: float | None = None, *, strict_minimum: bool = False,
                allow_none: bool = False) -> None:
    """Raises unless ``value`` is a finite real number (not a bool) within the bounds given."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise fail(None, f"{name} must be a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if strict_minimum else value < minimum):
        raise fail(None, f"{name} must be {'>' if strict_minimum else '>='} {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise fail(None, f"{name} must be <= {maximum}, got {value!r}")


def check_bool(name: str, value) -> None:
    """Raises unless ``value`` is exactly ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise fail(None, f"{name} must be True or False, got {value!r}")


def check_choice(name: str, value, choices) -> None:
    """Raises unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise fail(None, f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_baseline(value, name: str = "perturb_baseline") -> None:
    """A baseline is a finite number, a floating tensor or one of :data:`BASELINE_NAMES`."""
    if isinstance(value, str):
        if value.lower() == "random":
            raise fail(None, f"{name}='random' was removed in Quantus 0.6.0; use 'uniform'")
        check_choice(name, value.lower(), BASELINE_NAMES)
        return
    if isinstance(value, Tensor):
        if not value.dtype.is_floating_point:
            raise fail(None, f"{name} must be a floating-point tensor, got dtype {value.dtype}")
        return
    check_float(name, value)


def check_metric_input(value, name: str = "attribution", ndim: int | None = None) -> None:
    """Raises unless ``value`` is a floating-point tensor (with ``ndim`` dimensions if given).

    An attribution (``name`` "attribution" / "A") must also be finite: ranking, thresholding or
    normalising NaN / Inf gives a plausible finite score for a meaningless map. Its values are read
    under ``torch.vmap`` too (all examples at once); under ``torch.compile`` they cannot be read and
    a NaN propagates into the score wherever the metric's arithmetic carries it.
    """
    if not isinstance(value, Tensor):
        raise fail(None, f"{name} must be a tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise fail(None, f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if ndim is not None and value.ndim != ndim:
        raise fail(None, f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if name in ("attribution", "A"):
        plain = readable(value)
        if plain is not None and plain.numel() and not bool(torch.isfinite(plain).all()):
            bad = int((~torch.isfinite(plain)).sum())
            raise fail(None, f"{name} holds {bad} NaN or Inf value{'s' if bad > 1 else ''} (of {plain.numel()}"
                              f"{' in the batch' if plain.shape != value.shape else ''}): a metric of a "
                              "non-finite attribution would be meaningless")


def check_target_index(f, params, x: Tensor, target) -> None:
    """An int / 0-d tensor ``target`` must index the model's flattened output (read under vmap too;
    one forward of x). ``None`` and callables pass."""
    if target is None or (callable(target) and not isinstance(target, Tensor)):
        return
    fxattr.targets.check_target(None, target)
    size = f(params, x).numel()
    check_index(None, torch.as_tensor(target), size, f"an output of {size} elements")



def check_explainer(explain, purpose: str) -> None:
    """``explain`` is given and callable; ``purpose`` says what the metric re-runs it on."""
    if explain is None:
        raise fail(None, f"explain is required: the explainer {purpose}, e.g. explain=fxattr.gradient(f)")
    if not callable(explain):
        raise fail(None, f"explain must be an explainer explain(params, x, target), got {explain!r}")


def check_attribution(x: Tensor, attribution) -> None:
    """The attribution has x's shape, or x's with one channel (Quantus's channel-summed maps)."""
    check_metric_input(x, name="x")
    check_metric_input(attribution)
    a_shape, x_shape = tuple(attribution.shape), tuple(x.shape)
    if a_shape == x_shape:
        return
    if len(a_shape) == len(x_shape) and len(x_shape) >= 2 and a_shape[0] == 1 and a_shape[1:] == x_shape[1:]:
        return
    raise fail(None, f"attribution has shape {a_shape} but x has shape {x_shape}: pass one example's "
                      "attribution (x's shape, or one channel), and torch.vmap over the batch")


def check_batch_attribution(x: Tensor, attribution) -> None:
    """For metrics of a whole batch: ``attribution`` holds one finite attribution per example of
    ``x``, each of the example's shape (or with one channel)."""
    check_metric_input(x, name="x")
    check_metric_input(attribution)
    if x.ndim < 1 or attribution.ndim != x.ndim or attribution.shape[0] != x.shape[0]:
        raise fail(None, f"this metric is called on a whole batch: attribution has shape "
                          f"{tuple(attribution.shape)}, x has shape {tuple(x.shape)} (the batch axes must agree)")
    if len(x):
        check_attribution(x[0], attribution[0])


def check_replay(name: str, value, shape: tuple, *, integer: bool = False) -> None:
    """A replayed random draw (``subsets=``, ``noise=``...) must be a tensor of exactly ``shape``."""
    if not isinstance(value, Tensor):
        raise fail(None, f"{name} must be a tensor of shape {shape}, got {type(value).__name__}")
    if integer and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        raise fail(None, f"{name} must be an integer tensor, got dtype {value.dtype}")
    if not integer and not value.dtype.is_floating_point:
        raise fail(None, f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if tuple(value.shape) != tuple(shape):
        raise fail(None, f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")


def is_concrete(t: Tensor) -> bool:
    """True for a plain tensor whose values may be read (not inside vmap, grad or compile)."""
    if torch.compiler.is_compiling():
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(t) and t.device.type != "meta"


def metric(name: str, f, config: dict, fn):
    """``fn`` named ``name``, its errors reported under ``fxattr.metrics.<name>`` (one
    :func:`~fxattr.errors.api_boundary`), with the model and configuration it evaluates recorded
    (``.model``, ``.config``)."""
    fn.__name__ = fn.__qualname__ = name
    named = api_boundary(name if name.startswith("metrics.") else f"metrics.{name}")(fn)
    named.model = f
    named.config = MappingProxyType(dict(config))
    return named


# ------------------------------------------------------------------------------------ attributions

def normalise_by_max(a: Tensor, dims=None) -> Tensor:
    """Quantus's ``normalise_by_max``: ``a / max(|a|)`` over ``dims`` (all by default); an all-zero
    ``a`` is returned unchanged. Differentiable (the maximum is a subgradient at ties)."""
    if dims is None:
        dims = tuple(range(a.ndim))
    peak = a.abs().amax(dim=dims, keepdim=True)
    safe = torch.where(peak == 0, torch.ones_like(peak), peak)
    return a / safe


def normalise_batch(attributions: Tensor) -> Tensor:
    """Quantus's whole-batch normalisation: ``A / max(|A|)`` with ONE maximum over the batch.

    Quantus normalises the attributions of all examples it is given together; fxattr metrics see
    one example at a time. To reproduce a Quantus run on a batch exactly, pass
    ``normalise_batch(A)`` to a metric built with ``normalise=False``.

    Example:
        >>> metric = fxattr.metrics.infidelity(f, normalise=False)
        >>> torch.vmap(metric, in_dims=(None, 0, 0, 0))(params, X, T, normalise_batch(A))
    """
    return normalise_by_max(attributions)


def prepare_attribution(attribution: Tensor, *, normalise: bool, abs: bool, x: Tensor | None = None) -> Tensor:
    """Quantus's preprocessing of one example's attribution: ``normalise`` (divide by the largest
    absolute value of this example), then ``abs``; with ``x`` given, also broadcast to x's shape as
    Quantus does (an attribution of shape ``(1, H, W)`` or ``(H, W)`` for x of shape ``(C, H, W)``
    is repeated over the channels)."""
    a = attribution
    if x is not None:
        a = broadcast_attribution(a, x)
    if normalise:
        a = normalise_by_max(a)
    if abs:
        a = a.abs()
    return a


def broadcast_attribution(attribution: Tensor, x: Tensor) -> Tensor:
    """The attribution broadcast to x's shape (Quantus's ``expand_attribution_channel`` then
    ``np.broadcast_to``): missing or size-1 leading dimensions are repeated."""
    check_metric_input(attribution)
    a_shape, x_shape = tuple(attribution.shape), tuple(x.shape)
    if a_shape == x_shape:
        return attribution
    ok = len(a_shape) <= len(x_shape) and all(
        s in (1, t) for s, t in zip(reversed(a_shape), reversed(x_shape)))
    if not ok:
        raise fail(None, f"attribution of shape {a_shape} does not broadcast to x's shape {x_shape}")
    return attribution.broadcast_to(x_shape)


def descending_order(a: Tensor) -> Tensor:
    """Flat indices of ``a``, most relevant first: ``argsort(-a.reshape(-1))``, stable."""
    return torch.argsort(-a.reshape(-1), stable=True)


# --------------------------------------------------------------------------------------- baselines

def baseline_value(baseline, x: Tensor, *, uniform_low: float = 0.0, uniform_high: float = 1.0,
                   shape: tuple = ()) -> Tensor:
    """The value perturbed features take, computed on ``x`` (the array being perturbed).

    ``"black"``/``"white"``/``"mean"``: x's minimum/maximum/mean, a 0-d tensor; ``"uniform"``: a
    tensor of ``shape`` drawn from U(uniform_low, uniform_high) with torch's generator
    (``randomness="different"`` under vmap gives each example its own); a number: a 0-d tensor; a
    tensor: returned in x's dtype and device (it must broadcast where it is used).
    """
    if isinstance(baseline, str):
        name = baseline.lower()
        if name == "black":
            return x.amin()
        if name == "white":
            return x.amax()
        if name == "mean":
            return x.mean()
        if name == "uniform":
            draw = torch.rand(shape, dtype=x.dtype, device=x.device)
            return uniform_low + (uniform_high - uniform_low) * draw
        raise fail("metrics", f"unknown baseline {baseline!r}")
    if isinstance(baseline, Tensor):
        return baseline.to(dtype=x.dtype, device=x.device)
    return torch.tensor(float(baseline), dtype=x.dtype, device=x.device)


def cumulative_means(x_flat: Tensor, step_sums: Tensor, step_counts: Tensor) -> Tensor:
    """Quantus's ``"mean"`` baseline along a cumulative perturbation, in closed form.

    At step k the features of step k (disjoint from earlier steps, still holding x's values, which
    sum to ``step_sums[k]``, ``step_counts[k]`` of them) are set to the mean of the array after the
    earlier steps. With N features and S_k the array's sum after step k,
    ``m_k = S_{k-1} / N`` and ``S_k = S_{k-1} (1 + n_k / N) - s_k``: a linear recursion solved with
    a cumulative product (bounded by ``e``, so stable) instead of a loop over steps.

    Returns:
        the baseline value of every step, shape ``(K,)``.
    """
    n = x_flat.shape[-1]
    growth = 1 + step_counts.to(x_flat.dtype) / n                      # (K,)
    prod = torch.cumprod(growth, 0)                                    # P_k
    total0 = x_flat.sum()
    # S_k = P_k (S_0 - sum_{j<=k} s_j / P_j)
    totals = prod * (total0 - torch.cumsum(step_sums / prod, 0))
    previous = torch.cat([total0.reshape(1), totals[:-1]])
    return previous / n


# ---------------------------------------------------------------------------------- model outputs

def resolve_target(f, params, x: Tensor, target):
    """``target`` with ``None`` replaced by the argmax of ``f(params, x)`` (no gradient)."""
    if target is not None:
        return target
    return f(params, x).detach().reshape(-1).argmax()


def model_output(f, params, x: Tensor, softmax: bool) -> Tensor:
    """``f(params, x)``, through a softmax over the last axis when ``softmax`` (Quantus's
    ``softmax=True`` applies ``torch.softmax(pred, dim=-1)`` to the batched output)."""
    out = f(params, x)
    return torch.softmax(out, dim=-1) if softmax else out


def target_scores(f, params, copies: Tensor, target, *, softmax: bool,
                  chunk_size: int | None) -> Tensor:
    """The target's score for every copy in ``copies`` (``(K, *x.shape)``): one vmapped, chunked
    forward, shape ``(K,)``."""
    def score(copy):
        return fxattr.select(None, model_output(f, params, copy, softmax), target)

    return torch.vmap(score, chunk_size=chunk_size)(copies)


def scores_along(f, params, make_copy, steps: Tensor, target, *, softmax: bool,
                 chunk_size: int | None) -> Tensor:
    """The target's score on ``make_copy(k)`` for every ``k`` in ``steps``: one vmapped, chunked
    forward, shape ``(len(steps),)``. Each copy is built inside the vmap from its index, so memory
    grows with ``chunk_size``, not with the number of copies."""
    def score(k):
        return fxattr.select(None, model_output(f, params, make_copy(k), softmax), target)

    return torch.vmap(score, chunk_size=chunk_size)(steps)


# ------------------------------------------------------------------------------------ statistics

def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson's correlation along the last axis (``scipy.stats.pearsonr``); differentiable.

    A constant ``a`` or ``b`` gives NaN, as scipy does.
    """
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / torch.sqrt((a * a).sum(-1) * (b * b).sum(-1))


def ranks(a: Tensor) -> Tensor:
    """Ranks (1-based) along the last axis, ties given their average rank (``scipy.stats.rankdata``).

    One sort; each tie group's first and last sorted positions come from a cumulative max / min
    (ops with vmap batching rules, unlike ``searchsorted``).
    """
    values, order = torch.sort(a.detach(), dim=-1, stable=True)
    n = a.shape[-1]
    positions = torch.arange(n, device=a.device).expand(values.shape)
    differs = values[..., 1:] != values[..., :-1]
    true = torch.ones_like(differs[..., :1])
    starts = torch.where(torch.cat([true, differs], -1), positions, torch.zeros_like(positions))
    first = torch.cummax(starts, -1).values
    ends = torch.where(torch.cat([differs, true], -1), positions, torch.full_like(positions, n))
    last = torch.cummin(ends.flip(-1), -1).values.flip(-1)
    dtype = a.dtype if a.dtype.is_floating_point else torch.float64
    sorted_ranks = (first + last).to(dtype) / 2 + 1
    return torch.zeros_like(sorted_ranks).scatter(-1, order, sorted_ranks)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman's rank correlation along the last axis (``scipy.stats.spearmanr``, average ranks)."""
    return pearson(ranks(a), ranks(b))


def trapezoid(y: Tensor, dx: float = 1.0) -> Tensor:
    """The trapezoidal rule along the last axis with spacing ``dx`` (``np.trapz``, which Quantus's
    ``calculate_auc`` calls and numpy 2.4 removed; ``np.trapezoid`` is the same)."""
    return torch.trapezoid(y, dx=dx, dim=-1)
