"""Faithfulness metrics (Quantus 0.6.0 names): does removing what the attribution calls relevant
change the model's output accordingly?

Every metric is ``metric = NAME(f, **config)`` (keyword-only configuration, checked here, with
Quantus's constructor keywords and defaults plus ``softmax=`` with the default of Quantus's call),
called per example ``metric(params, x, target, attribution)`` and batched with
``torch.vmap(metric, in_dims=(None, 0, 0, 0), randomness="different")``; ``sensitivity_n`` and
``sufficiency`` compare examples with each other and are called on a whole batch,
``metric(params, X, T, A)``. A perturbation curve is ONE vmapped forward over all its perturbed
copies (``chunk_size`` at a time; each copy is built inside the vmap from its step index, so memory
grows with ``chunk_size``), never a Python loop over steps, and nothing leaves the device.

Conventions shared by all (see :mod:`fxattr.metrics.common`): the attribution is broadcast to
x's shape (``(1, H, W)`` repeats over channels), normalised by this example's largest absolute
value (``normalise=True``; Quantus divides by the largest over the whole batch -- use
``common.normalise_batch`` with ``normalise=False`` to reproduce a batched Quantus run; metrics
that only rank or correlate the attribution are unaffected), then made absolute (``abs=True``).
"Most relevant first" is ``argsort(-a)`` of the flattened attribution (stable). A baseline
(``perturb_baseline``) is a number, a tensor broadcastable to x (per-feature values, an fxattr
extension), or ``"black"`` / ``"white"`` / ``"mean"`` / ``"uniform"``: the minimum / maximum / mean
of the array being perturbed -- for cumulative curves the already perturbed array, as Quantus --
or one draw of U(uniform_low, uniform_high) per step. ``target=None`` is the argmax at x.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

import fxattr
from fxattr.errors import api_boundary, fail
from fxattr.metrics.common import (
    baseline_value,
    broadcast_attribution,
    check_baseline,
    check_batch_attribution,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_metric_input,
    check_model,
    check_replay,
    check_target_index,
    cumulative_means,
    descending_order,
    is_concrete,
    metric,
    model_output,
    normalise_by_max,
    pearson,
    prepare_attribution,
    resolve_target,
    scores_along,
    spearman,
    trapezoid,
)

__all__ = [
    "faithfulness_correlation",
    "faithfulness_estimate",
    "infidelity",
    "irof",
    "monotonicity",
    "monotonicity_correlation",
    "pixel_flipping",
    "region_perturbation",
    "road",
    "road_imputation",
    "selectivity",
    "sensitivity_n",
    "sufficiency",
]


# --------------------------------------------------------------------------------------- helpers

def _check_common(f, *, abs, normalise, softmax=None, chunk_size=None, perturb_baseline=None,
                  uniform_low=0.0, uniform_high=1.0):
    check_model(f)
    check_bool("abs", abs)
    check_bool("normalise", normalise)
    if softmax is not None:
        check_bool("softmax", softmax)
    check_int("chunk_size", chunk_size, 1, allow_none=True)
    if perturb_baseline is not None:
        check_baseline(perturb_baseline)
    check_float("uniform_low", uniform_low)
    check_float("uniform_high", uniform_high)
    if uniform_high < uniform_low:
        raise fail(None, f"uniform_high ({uniform_high}) must be >= uniform_low ({uniform_low})")


def _check_example(x, attribution):
    check_metric_input(x, "x")
    check_metric_input(attribution, "attribution")


def _is_uniform(baseline) -> bool:
    return isinstance(baseline, str) and baseline.lower() == "uniform"


def _rank(order: Tensor) -> Tensor:
    """The position of every feature in ``order`` (the inverse permutation)."""
    return torch.argsort(order)


def _step_values(baseline, canvas: Tensor, step: Tensor, n_steps: int, *, cumulative: bool,
                 low: float, high: float, shape: tuple, draws: Tensor | None = None) -> Tensor:
    """The value every feature of the flat ``canvas`` takes when its step (``step``, ``>= n_steps``:
    never) is perturbed: Quantus's baseline computed on the array being perturbed at that step.

    Scalars per step for the named baselines (``"mean"`` of a cumulative curve by the closed-form
    recursion of :func:`cumulative_means`; ``"uniform"``: ``draws`` or one draw per step),
    per-feature values for a tensor baseline.
    """
    if isinstance(baseline, Tensor):
        return _tensor_baseline(baseline, canvas, shape)
    name = baseline.lower() if isinstance(baseline, str) else None
    clamped = step.clamp(max=n_steps - 1)
    if name == "mean" and cumulative:
        valid = (step < n_steps).to(canvas.dtype)
        sums = torch.zeros(n_steps, dtype=canvas.dtype, device=canvas.device).index_add(0, clamped, canvas * valid)
        counts = torch.zeros(n_steps, dtype=canvas.dtype, device=canvas.device).index_add(0, clamped, valid)
        return cumulative_means(canvas, sums, counts)[clamped]
    if name == "uniform":
        if draws is None:
            draws = baseline_value("uniform", canvas, uniform_low=low, uniform_high=high, shape=(n_steps,))
        return draws[clamped]
    return baseline_value(baseline, canvas).expand(canvas.shape[-1])


def _tensor_baseline(baseline: Tensor, canvas: Tensor, shape: tuple) -> Tensor:
    """A tensor baseline as per-feature values of the flat canvas (of unflattened ``shape``)."""
    baseline = baseline.to(dtype=canvas.dtype, device=canvas.device)
    if baseline.numel() == 1:
        return baseline.reshape(()).expand(canvas.shape[-1])
    b_shape = tuple(baseline.shape)
    if len(b_shape) > len(shape) or not all(s in (1, t) for s, t in zip(reversed(b_shape), reversed(shape))):
        raise fail(None, f"perturb_baseline of shape {b_shape} does not broadcast to the perturbed "
                          f"array's shape {tuple(shape)}")
    return baseline.broadcast_to(shape).reshape(-1)


def _pad_sizes(size: int, patch: int) -> tuple[int, int]:
    """Quantus's ``get_padding_size``: the padding that makes ``size`` a multiple of ``patch``."""
    remainder = size % patch
    if remainder == 0:
        return 0, 0
    total = patch - remainder
    return total // 2, total - total // 2


def _block_ids(channels: int, height: int, width: int, patch: int, device) -> Tensor:
    """The block (patch x patch, all channels) of every feature of a (C, H, W) array, numbered in
    raster order as Quantus's ``get_block_indices``; flat, length C*H*W."""
    rows = torch.arange(height, device=device) // patch
    cols = torch.arange(width, device=device) // patch
    ids = rows[:, None] * (width // patch) + cols[None, :]
    return ids.expand(channels, height, width).reshape(-1)


def _check_image(x):
    if x.ndim != 3:
        raise fail(None, f"x must be one image of shape (C, H, W), got shape {tuple(x.shape)}")


def _index_target(target):
    if callable(target) and not isinstance(target, Tensor):
        raise fail(None, "target must be a class index (int or 0-d integer tensor) or None: the "
                          "metric compares it with the predicted class")


# -------------------------------------------------------------------------------- pixel flipping

@api_boundary("metrics.pixel_flipping")
def pixel_flipping(f, *, features_in_step: int = 1, perturb_baseline="black", abs: bool = False,
                   normalise: bool = True, softmax: bool = True, return_auc_per_sample: bool = False,
                   uniform_low: float = 0.0, uniform_high: float = 1.0, chunk_size: int | None = 64):
    """Pixel flipping (Bach et al. 2015, "On pixel-wise explanations for non-linear classifier
    decisions by layer-wise relevance propagation", PLoS ONE): the target's score as features are
    removed, most relevant first.

    Quantus's ``PixelFlipping``: the flattened attribution (broadcast to x) is ordered by
    ``argsort(-a)``; step k sets features ``k*s .. (k+1)*s - 1`` of that order to the baseline,
    cumulatively (the baseline is computed on the already perturbed x); the curve holds the
    target's (softmax) score after each step, ``ceil(n / s)`` values (the unperturbed score is not
    included). ``return_auc_per_sample=True`` returns the curve's trapezoidal area (dx = 1) instead.

    Args:
        f: the function of ``fxattr.functionalize``.
        features_in_step: features removed per step (s); the last step takes the remainder.
        perturb_baseline: see the module docstring (default ``"black"``, x's minimum).
        abs, normalise: the attribution's preprocessing (Quantus's defaults).
        softmax: score the softmax probability (Quantus's call default) or the raw output.
        return_auc_per_sample: return the area under the curve (a scalar).
        uniform_low, uniform_high: the range of the ``"uniform"`` baseline.
        chunk_size: perturbed copies per forward (``None``: all at once).

    Returns:
        ``metric(params, x, target, attribution)`` -> the curve, shape ``(ceil(n / s),)``, or a scalar.

    Example:
        >>> metric = fxattr.metrics.pixel_flipping(f, features_in_step=4)
        >>> curves = torch.vmap(metric, in_dims=(None, 0, 0, 0), randomness="different")(params, X, T, A)
    """
    _check_common(f, abs=abs, normalise=normalise, softmax=softmax, chunk_size=chunk_size,
                  perturb_baseline=perturb_baseline, uniform_low=uniform_low, uniform_high=uniform_high)
    check_int("features_in_step", features_in_step, 1)
    check_bool("return_auc_per_sample", return_auc_per_sample)

    def evaluate(params, x, target, attribution):
        _check_example(x, attribution)
        a = prepare_attribution(attribution, normalise=normalise, abs=abs, x=x).reshape(-1)
        target = resolve_target(f, params, x, target)
        n = a.shape[0]
        if features_in_step > n:
            raise fail(None, f"features_in_step={features_in_step} exceeds the {n} features of x")
        n_steps = math.ceil(n / features_in_step)
        step = _rank(descending_order(a)) // features_in_step
        x_flat = x.reshape(-1)
        values = _step_values(perturb_baseline, x_flat, step, n_steps, cumulative=True,
                              low=uniform_low, high=uniform_high, shape=x.shape)

        def copy(k):
            return torch.where(step <= k, values, x_flat).reshape(x.shape)

        ks = torch.arange(n_steps, device=x.device)
        curve = scores_along(f, params, copy, ks, target, softmax=softmax, chunk_size=chunk_size)
        return trapezoid(curve) if return_auc_per_sample else curve

    return metric("metrics.pixel_flipping", f, {"features_in_step": features_in_step, "perturb_baseline": perturb_baseline,
                                 "abs": abs, "normalise": normalise, "softmax": softmax,
                                 "return_auc_per_sample": return_auc_per_sample, "chunk_size": chunk_size},
                  evaluate)


# ------------------------------------------------------------------ region perturbation, selectivity

def _region_curve(f, params, x, target, attribution, *, patch_size, order, n_regions,
                  perturb_baseline, abs, normalise, softmax, low, high, chunk_size):
    """Quantus's region perturbation: the target's scores after removing patch after patch
    (cumulatively), on an edge-padded canvas; returns (scores, unperturbed score)."""
    _check_example(x, attribution)
    _check_image(x)
    a = prepare_attribution(attribution, normalise=normalise, abs=abs, x=x)
    target = resolve_target(f, params, x, target)
    channels, height, width = x.shape
    if patch_size > height or patch_size > width:
        raise fail(None, f"patch_size={patch_size} is larger than x's spatial shape {(height, width)}")
    pad_h, pad_w = _pad_sizes(height, patch_size), _pad_sizes(width, patch_size)
    padding = (pad_w[0], pad_w[1], pad_h[0], pad_h[1])
    # x is padded by repeating its edge (Quantus's mode="edge"), the attribution with zeros.
    canvas = F.pad(x, padding, mode="replicate") if any(padding) else x
    a_pad = F.pad(a, padding) if any(padding) else a
    hp, wp = canvas.shape[1:]
    blocks = _block_ids(channels, hp, wp, patch_size, x.device)
    n_blocks = (hp // patch_size) * (wp // patch_size)
    sums = torch.zeros(n_blocks, dtype=a.dtype, device=x.device).index_add(0, blocks, a_pad.reshape(-1))
    if order == "morf":
        block_order = descending_order(sums)
    elif order == "lerf":
        block_order = torch.argsort(sums, stable=True)
    else:
        block_order = torch.argsort(torch.rand(n_blocks, device=x.device))
    step = _rank(block_order)[blocks]
    n_steps = n_blocks if n_regions is None else min(n_regions, n_blocks)
    canvas_flat = canvas.reshape(-1)
    values = _step_values(perturb_baseline, canvas_flat, step, n_steps, cumulative=True,
                          low=low, high=high, shape=canvas.shape)

    def copy(k):
        perturbed = torch.where(step <= k, values, canvas_flat).reshape(canvas.shape)
        return perturbed[:, pad_h[0]:pad_h[0] + height, pad_w[0]:pad_w[0] + width]

    ks = torch.arange(n_steps, device=x.device)
    scores = scores_along(f, params, copy, ks, target, softmax=softmax, chunk_size=chunk_size)
    reference = fxattr.select(None, model_output(f, params, x, softmax), target)
    return scores, reference


@api_boundary("metrics.region_perturbation")
def region_perturbation(f, *, patch_size: int = 8, order: str = "morf", regions_evaluation: int = 100,
                        perturb_baseline="black", abs: bool = False, normalise: bool = True,
                        softmax: bool = True, uniform_low: float = 0.0, uniform_high: float = 1.0,
                        chunk_size: int | None = 64):
    """Region perturbation (Samek et al. 2016, "Evaluating the visualization of what a deep neural
    network has learned", IEEE TNNLS): the drop of the target's score as patches are removed.

    Quantus's ``RegionPerturbation``: x (C, H, W) is padded to a multiple of ``patch_size``
    (edge values; the attribution with zeros, Quantus's ``get_padding_size`` split), cut into
    patch_size x patch_size blocks over all channels, ordered by their attribution sum (``"morf"``:
    most relevant first, ``"lerf"``: least, ``"random"``: a random permutation), and the first
    ``regions_evaluation`` blocks are set to the baseline one after the other, cumulatively (the
    baseline computed on the padded, already perturbed canvas). The curve holds
    ``score(x) - score(x_k)`` after each step, ``min(regions_evaluation, blocks)`` values.

    Example:
        >>> metric = fxattr.metrics.region_perturbation(f, patch_size=4, regions_evaluation=10)
        >>> torch.vmap(metric, in_dims=(None, 0, 0, 0), randomness="different")(params, X, T, A)
    """
    _check_common(f, abs=abs, normalise=normalise, softmax=softmax, chunk_size=chunk_size,
                  perturb_baseline=perturb_baseline, uniform_low=uniform_low, uniform_high=uniform_high)
    check_int("patch_size", patch_size, 1)
    check_int("regions_evaluation", regions_evaluation, 1)
    check_choice("order", order.lower() if isinstance(order, str) else order,
                 ("morf", "lerf", "random"))
    order_name = order.lower()

    def evaluate(params, x, target, attribution):
        scores, reference = _region_curve(
            f, params, x, target, attribution, patch_size=patch_size, order=order_name,
            n_regions=regions_evaluation, perturb_baseline=perturb_baseline, abs=abs,
            normalise=normalise, softmax=softmax, low=uniform_low, high=uniform_high,
            chunk_size=chunk_size)
        return reference - scores

    return metric("metrics.region_perturbation", f, {"patch_size": patch_size, "order": order_name,
                                 "regions_evaluation": regions_evaluation,
                                 "perturb_baseline": perturb_baseline, "abs": abs, "normalise": normalise,
                                 "softmax": softmax, "chunk_size": chunk_size}, evaluate)


@api_boundary("metrics.selectivity")
def selectivity(f, *, patch_size: int = 8, perturb_baseline="black", abs: bool = False,
                normalise: bool = True, softmax: bool = True, uniform_low: float = 0.0,
                uniform_high: float = 1.0, chunk_size: int | None = 64):
    """Selectivity (Montavon, Samek and Müller 2018, "Methods for interpreting and understanding
    deep neural networks", Digital Signal Processing): the target's score as patches are removed,
    most relevant first.

    Quantus's ``Selectivity``: the blocks and padding of :func:`region_perturbation` (``"morf"``),
    all of them removed cumulatively; the curve holds the score after each step (not the drop),
    one value per block.

    Example:
        >>> metric = fxattr.metrics.selectivity(f, patch_size=4)
        >>> torch.vmap(metric, in_dims=(None, 0, 0, 0), randomness="different")(params, X, T, A)
    """
    _check_common(f, abs=abs, normalise=normalise, softmax=softmax, chunk_size=chunk_size,
                  perturb_baseline=perturb_baseline, uniform_low=uniform_low, uniform_high=uniform_high)
    check_int("patch_size", patch_size, 1)

    def evaluate(params, x, target, attribution):
        scores, _ = _region_curve(
            f, params, x, target, attribution, patch_size=patch_size, order="morf",
            n_regions=None, perturb_baseline=perturb_baseline, abs=abs, normalise=normalise,
            softmax=softmax, low=uniform_low, high=uniform_high, chunk_size=chunk_size)
        return scores

    return metric("metrics.selectivity", f, {"patch_size": patch_size, "perturb_baseline": perturb_baseline, "abs": abs,
                                 "normalise": normalise, "softmax": softmax, "chunk_size": chunk_size}, evaluate)


# ------------------------------------------------------------------------------------ sensitivity_n

@api_boundary("metrics.sensitivity_n")
def sensitivity_n(f, *, n_max_percentage: float = 0.8, features_in_step: int = 1,
                  perturb_baseline="black", abs: bool = False, normalise: bool = True,
                  softmax: bool = True, uniform_low: float = 0.0, uniform_high: float = 1.0,
                  chunk_size: int | None = 64):
    """Sensitivity-n (Ancona et al. 2018, "Towards better understanding of gradient-based
    attribution methods for deep neural networks", ICLR): for each n, the correlation over the
    batch between the drop of the score when n features are removed and their attribution sum.

    Quantus's ``SensitivityN``, called on a whole batch ``metric(params, X, T, A)``: per example,
    features are removed cumulatively, ``features_in_step`` at a time, most relevant first (as
    :func:`pixel_flipping`), recording the drop ``score(x) - score(x_k)`` and -- as Quantus does --
    the attribution sum of the features removed *at* step k (not cumulated). The result is, for
    each of the first ``int(n_max_percentage * H * W // features_in_step)`` steps (H*W: x's
    shape without its first, channel axis), Pearson's correlation over the batch. The batch is
    normalised as Quantus does (one maximum for all examples); Pearson's correlation does not
    depend on it. (Quantus correlates over its first ``batch_size`` examples only, 64 by default;
    fxattr over the batch it is given.)

    Returns:
        ``metric(params, X, T, A)`` -> shape ``(max_features,)``.

    Example:
        >>> metric = fxattr.metrics.sensitivity_n(f, features_in_step=4)
        >>> metric(params, X, T, A)   # whole batch; differentiable in A and params
    """
    _check_common(f, abs=abs, normalise=normalise, softmax=softmax, chunk_size=chunk_size,
                  perturb_baseline=perturb_baseline, uniform_low=uniform_low, uniform_high=uniform_high)
    check_float("n_max_percentage", n_max_percentage, 0.0, 1.0, strict_minimum=True)
    check_int("features_in_step", features_in_step, 1)

    def evaluate(params, X, T, A):
        check_metric_input(X, "X")
        check_metric_input(A, "A")
        if X.ndim < 2 or A.shape[0] != X.shape[0]:
            raise fail(None, f"X and A must be batches of the same length, got shapes "
                              f"{tuple(X.shape)} and {tuple(A.shape)}")
        if X.shape[0] < 2:
            raise fail(None, "needs a batch of at least 2 examples: it correlates over the batch")
        A = torch.vmap(lambda a, x: broadcast_attribution(a, x))(A, X)
        if normalise:
            A = normalise_by_max(A)
        if abs:
            A = A.abs()
        n = X[0].numel()
        spatial = math.prod(X.shape[2:])
        max_features = int(n_max_percentage * spatial // features_in_step)
        n_steps = math.ceil(n / features_in_step)
        if not 1 <= max_features <= n_steps:
            raise fail(None, f"n_max_percentage={n_max_percentage} gives {max_features} steps for x "
                              f"of shape {tuple(X.shape[1:])}; it must be between 1 and {n_steps}")

        def one(x, t, a):
            a = a.reshape(-1)
            t = resolve_target(f, params, x, t)
            step = _rank(descending_order(a)) // features_in_step
            x_flat = x.reshape(-1)
            values = _step_values(perturb_baseline, x_flat, step, n_steps, cumulative=True,
                                  low=uniform_low, high=uniform_high, shape=x.shape)

            def copy(k):
                return torch.where(step <= k, values, x_flat).reshape(x.shape)

            ks = torch.arange(max_features, device=x.device)
            scores = scores_along(f, params, copy, ks, t, softmax=softmax, chunk_size=chunk_size)
            reference = fxattr.select(None, model_output(f, params, x, softmax), t)
            clamped = step.clamp(max=max_features)
            sums = torch.zeros(max_features + 1, dtype=a.dtype, device=a.device).index_add(0, clamped, a)
            return reference - scores, sums[:max_features]

        deltas, sums = torch.vmap(one, randomness="different")(X, T, A)
        return pearson(deltas.T, sums.T)

    return metric("metrics.sensitivity_n", f, {"n_max_percentage": n_max_percentage, "features_in_step": features_in_step,
                                 "perturb_baseline": perturb_baseline, "abs": abs, "normalise": normalise,
                                 "softmax": softmax, "chunk_size": chunk_size}, evaluate)


# -------------------------------------------------------------------------------------------- irof

@api_boundary("metrics.irof")
def irof(f, *, perturb_baseline="mean", abs: bool = False, normalise: bool = True,
         softmax: bool = True, max_segments: int | None = None, uniform_low: float = 0.0,
         uniform_high: float = 1.0, chunk_size: int | None = 64):
    """Iterative removal of features (Rieger and Hansen 2020, "IROF: a low resource evaluation
    metric for explanation methods", arXiv:2003.08747): the area over the curve of the score as
    superpixels are removed, most relevant first.

    Quantus's ``IROF``, called ``metric(params, x, target, attribution, segments)`` with the
    superpixel label map ``segments`` (H x W, int64, labels in ``[0, max_segments)``; Quantus
    computes SLIC segments itself -- pass the same labels to compare). Segments are ordered by
    their mean attribution (over channels and pixels), ``argsort(-mean)``; they are set to the
    baseline (default ``"mean"``: the mean of the already perturbed x) one after the other,
    cumulatively; the curve is ``score(x_k) / score(x)``, and the result is
    ``n_segments - trapz(curve)`` (dx = 1). ``"uniform"`` draws one value per feature (as
    Quantus's mask replacement; the other metrics draw one per step). Quantus computes ``"mean"``,
    ``"black"`` and ``"white"`` over the whole batch it is given; fxattr over the example (Quantus
    with ``batch_size=1``). A segment is removed in every channel (Quantus 0.6.0 fails on images of
    more than one channel: its mask is (B, 1, H, W)).

    Args:
        max_segments: the number of labels to expect: needed under ``torch.vmap`` (a fixed
            number of steps; labels without pixels are skipped and do not count); without it the
            labels' maximum is read from ``segments`` (outside vmap only).

    Example:
        >>> metric = fxattr.metrics.irof(f, max_segments=16)
        >>> torch.vmap(metric, in_dims=(None, 0, 0, 0, 0))(params, X, T, A, S)
    """
    _check_common(f, abs=abs, normalise=normalise, softmax=softmax, chunk_size=chunk_size,
                  perturb_baseline=perturb_baseline, uniform_low=uniform_low, uniform_high=uniform_high)
    check_int("max_segments", max_segments, 2, allow_none=True)

    def evaluate(params, x, target, attribution, segments):
        _check_example(x, attribution)
        _check_image(x)
        if not isinstance(segments, Tensor) or segments.dtype.is_floating_point or segments.dtype == torch.bool:
            raise fail(None, "segments must be an integer tensor of labels (H x W)")
        if tuple(segments.shape) != tuple(x.shape[1:]):
            raise fail(None, f"segments must have x's spatial shape {tuple(x.shape[1:])}, got "
                              f"{tuple(segments.shape)}")
        if max_segments is None:
            if not is_concrete(segments):
                raise fail(None, "under torch.vmap / compile the number of segments cannot be read "
                                  "from the labels: pass max_segments= to irof")
            n_labels = int(segments.max()) + 1
        else:
            n_labels = max_segments
        if is_concrete(segments) and (int(segments.min()) < 0 or int(segments.max()) >= n_labels):
            raise fail(None, f"segment labels must be in [0, {n_labels}), got "
                              f"[{int(segments.min())}, {int(segments.max())}]")
        a = prepare_attribution(attribution, normalise=normalise, abs=abs, x=x)
        target = resolve_target(f, params, x, target)
        channels = x.shape[0]
        labels = segments.reshape(-1).to(torch.int64)
        feature_labels = labels.expand(channels, -1).reshape(-1)
        pixel_counts = torch.zeros(n_labels, dtype=x.dtype, device=x.device).index_add(
            0, labels, torch.ones_like(labels, dtype=x.dtype))
        present = pixel_counts > 0
        sums = torch.zeros(n_labels, dtype=a.dtype, device=x.device).index_add(0, feature_labels, a.reshape(-1))
        means = sums / (pixel_counts * channels).clamp(min=1)
        # absent labels go last, whatever their (undefined) mean.
        ranked = torch.where(present, means, torch.full_like(means, -math.inf))
        step = _rank(descending_order(ranked))[feature_labels]
        x_flat = x.reshape(-1)
        if _is_uniform(perturb_baseline):
            # Quantus's mask replacement draws one uniform value per feature (each feature is
            # replaced once, at its segment's step).
            values = baseline_value("uniform", x_flat, uniform_low=uniform_low,
                                    uniform_high=uniform_high, shape=x_flat.shape)
        else:
            values = _step_values(perturb_baseline, x_flat, step, n_labels, cumulative=True,
                                  low=uniform_low, high=uniform_high, shape=x.shape)

        def copy(k):
            return torch.where(step <= k, values, x_flat).reshape(x.shape)

        ks = torch.arange(n_labels, device=x.device)
        scores = scores_along(f, params, copy, ks, target, softmax=softmax, chunk_size=chunk_size)
        reference = fxattr.select(None, model_output(f, params, x, softmax), target)
        curve = scores / reference
        n_present = present.sum()
        # the trapezoids between consecutive present segments only (Quantus's curve of one example).
        inner = (curve[:-1] + curve[1:]) / 2
        keep = (torch.arange(1, n_labels, device=x.device) < n_present).to(curve.dtype)
        return n_present.to(curve.dtype) - (inner * keep).sum()

    return metric("metrics.irof", f, {"perturb_baseline": perturb_baseline, "abs": abs, "normalise": normalise,
                                 "softmax": softmax, "max_segments": max_segments, "chunk_size": chunk_size},
                  evaluate)


# --------------------------------------------------------------------- faithfulness correlation

@api_boundary("metrics.faithfulness_correlation")
def faithfulness_correlation(f, *, nr_runs: int = 100, subset_size: int = 224, perturb_baseline="black",
                             abs: bool = False, normalise: bool = True, softmax: bool = False,
                             uniform_low: float = 0.0, uniform_high: float = 1.0,
                             chunk_size: int | None = 64):
    """Faithfulness correlation (Bhatt, Weller and Moura 2020, "Evaluating and aggregating
    feature-based model explanations", IJCAI): Pearson's correlation, over random feature subsets,
    between the subsets' attribution sum and the drop of the score when they are removed.

    Quantus's ``FaithfulnessCorrelation``: ``nr_runs`` subsets of ``subset_size`` distinct flat
    feature indices (of x broadcast), each set to the baseline of the unperturbed x (not
    cumulative); ``pearson(att_sums, score(x) - score(x_subset))``. Differentiable w.r.t. the
    attribution and the parameters.

    The call ``metric(params, x, target, attribution, subsets=None)`` draws uniform subsets with
    torch's generator, or replays ``subsets`` (``(nr_runs, subset_size)`` int64 flat indices).

    Example:
        >>> metric = fxattr.metrics.faithfulness_correlation(f, nr_runs=50, subset_size=16)
        >>> torch.vmap(metric, in_dims=(None, 0, 0, 0), randomness="different")(params, X, T, A)
    """
    _check_common(f, abs=abs, normalise=normalise, softmax=softmax, chunk_size=chunk_size,
                  perturb_baseline=perturb_baseline, uniform_low=uniform_low, uniform_high=uniform_high)
    check_int("nr_runs", nr_runs, 2)
    check_int("subset_size", subset_size, 1)

    def evaluate(params, x, target, attribution, subsets=None):
        _check_example(x, attribution)
        a = prepare_attribution(attribution, normalise=normalise, abs=abs, x=x).reshape(-1)
        n = a.shape[0]
        if subset_size >= n:
            raise fail(None, f"subset_size={subset_size} must be smaller than x's {n} features")
        if subsets is None:
            subsets = torch.argsort(torch.rand(nr_runs, n, device=x.device), dim=1)[:, :subset_size]
        else:
            check_replay("subsets", subsets, (nr_runs, subset_size), integer=True)
            subsets = subsets.to(x.device)
        target = resolve_target(f, params, x, target)
        x_flat = x.reshape(-1)
        value = _subset_baseline(perturb_baseline, x_flat, nr_runs, uniform_low, uniform_high)

        def copy(run):
            chosen = subsets[run]
            return x_flat.scatter(0, chosen, value[run].expand(chosen.shape)).reshape(x.shape)

        runs = torch.arange(nr_runs, device=x.device)
        scores = scores_along(f, params, copy, runs, target, softmax=softmax, chunk_size=chunk_size)
        reference = fxattr.select(None, model_output(f, params, x, softmax), target)
        att_sums = a[subsets].sum(-1)
        return pearson(att_sums, reference - scores)

    return metric("metrics.faithfulness_correlation", f, {"nr_runs": nr_runs, "subset_size": subset_size,
                                 "perturb_baseline": perturb_baseline, "abs": abs, "normalise": normalise,
                                 "softmax": softmax, "chunk_size": chunk_size}, evaluate)


def _subset_baseline(baseline, x_flat, count, low, high):
    """One baseline value per copy of the unperturbed x (non-cumulative metrics), shape (count,)."""
    if isinstance(baseline, Tensor):
        if baseline.numel() != 1:
            raise fail(None, "perturb_baseline must be a number or a named baseline for this metric")
        return baseline.to(x_flat.dtype).reshape(()).expand(count)
    if _is_uniform(baseline):
        return baseline_value("uniform", x_flat, uniform_low=low, uniform_high=high, shape=(count,))
    return baseline_value(baseline, x_flat).expand(count)


# ---------------------------------------------------------------------------- faithfulness estimate

@api_boundary("metrics.faithfulness_estimate")
def faithfulness_estimate(f, *, features_in_step: int = 1, perturb_baseline="black", abs: bool = False,
                          normalise: bool = True, softmax: bool = False, uniform_low: float = 0.0,
                          uniform_high: float = 1.0, chunk_size: int | None = 64):
    """Faithfulness estimate (Alvarez-Melis and Jaakkola 2018, "Towards robust interpretability with
    self-explaining neural networks", NeurIPS): Pearson's correlation between the attribution of
    feature groups and the drop of the score when each group alone is removed.

    Quantus's ``FaithfulnessEstimate``: groups of ``features_in_step`` features in the order
    ``argsort(-a)``; each group is set to the baseline of the unperturbed x (not cumulative);
    ``pearson(group sums, score(x) - score(x_group))``. Differentiable w.r.t. the attribution's
    values (at a fixed order) and the parameters.

    Example:
        >>> metric = fxattr.metrics.faithfulness_estimate(f, features_in_step=4)
        >>> torch.vmap(metric, in_dims=(None, 0, 0, 0), randomness="different")(params, X, T, A)
    """
    _check_common(f, abs=abs, normalise=normalise, softmax=softmax, chunk_size=chunk_size,
                  perturb_baseline=perturb_baseline, uniform_low=uniform_low, uniform_high=uniform_high)
    check_int("features_in_step", features_in_step, 1)

    def evaluate(params, x, target, attribution):
        _check_example(x, attribution)
        a = prepare_attribution(attribution, normalise=normalise, abs=abs, x=x).reshape(-1)
        target = resolve_target(f, params, x, target)
        n = a.shape[0]
        n_steps = math.ceil(n / features_in_step)
        if n_steps < 2:
            raise fail(None, f"features_in_step={features_in_step} leaves fewer than 2 groups of "
                              f"x's {n} features: nothing to correlate")
        step = _rank(descending_order(a)) // features_in_step
        x_flat = x.reshape(-1)
        value = _subset_baseline(perturb_baseline, x_flat, n_steps, uniform_low, uniform_high)

        def copy(k):
            return torch.where(step == k, value[k], x_flat).reshape(x.shape)

        ks = torch.arange(n_steps, device=x.device)
        scores = scores_along(f, params, copy, ks, target, softmax=softmax, chunk_size=chunk_size)
        reference = fxattr.select(None, model_output(f, params, x, softmax), target)
        sums = torch.zeros(n_steps, dtype=a.dtype, device=x.device).index_add(0, step, a)
        return pearson(sums, reference - scores)

    return metric("metrics.faithfulness_estimate", f, {"features_in_step": features_in_step, "perturb_baseline": perturb_baseline,
                                 "abs": abs, "normalise": normalise, "softmax": softmax, "chunk_size": chunk_size},
                  evaluate)


# ------------------------------------------------------------------------------------- monotonicity

@api_boundary("metrics.monotonicity")
def monotonicity(f, *, features_in_step: int = 1, perturb_baseline="black", abs: bool = True,
                 normalise: bool = True, softmax: bool = True, uniform_low: float = 0.0,
                 uniform_high: float = 1.0, chunk_size: int | None = 64):
    """Monotonicity (Arya et al. 2019, "One explanation does not fit all: a toolkit and taxonomy of
    AI explainability techniques", arXiv:1909.03012): starting from the baseline, features are
    *inserted* from least to most relevant; is the score non-decreasing?

    The paper's metric. **Deviation from Quantus 0.6.0**: Quantus's ``Monotonicity`` builds the
    all-baseline image and then, at every step, writes the *baseline* again at the chosen indices
    instead of x's values, so its curve is constant and every example scores True. fxattr inserts
    x's values: order ``argsort(a)`` (ascending, stable), ``features_in_step`` at a time,
    cumulatively, starting from the baseline computed on x (``"black"``: x's minimum); the result is
    ``all(diff(scores) >= 0)`` over the ``ceil(n / s)`` scores, a 0-d bool tensor. (The tests check
    it against Quantus with its perturbation replaced by the insertion.)

    Example:
        >>> metric = fxattr.metrics.monotonicity(f)
        >>> torch.vmap(metric, in_dims=(None, 0, 0, 0), randomness="different")(params, X, T, A)
    """
    _check_common(f, abs=abs, normalise=normalise, softmax=softmax, chunk_size=chunk_size,
                  perturb_baseline=perturb_baseline, uniform_low=uniform_low, uniform_high=uniform_high)
    check_int("features_in_step", features_in_step, 1)

    def evaluate(params, x, target, attribution):
        _check_example(x, attribution)
        a = prepare_attribution(attribution, normalise=normalise, abs=abs, x=x).reshape(-1)
        target = resolve_target(f, params, x, target)
        n = a.shape[0]
        n_steps = math.ceil(n / features_in_step)
        step = _rank(torch.argsort(a, stable=True)) // features_in_step
        x_flat = x.reshape(-1)
        if isinstance(perturb_baseline, Tensor):
            start = perturb_baseline.to(x.dtype).broadcast_to(x.shape).reshape(-1)
        else:
            start = _subset_baseline(perturb_baseline, x_flat, 1, uniform_low, uniform_high)[0]
            start = start.expand(n)

        def copy(k):
            return torch.where(step <= k, x_flat, start).reshape(x.shape)

        ks = torch.arange(n_steps, device=x.device)
        scores = scores_along(f, params, copy, ks, target, softmax=softmax, chunk_size=chunk_size)
        return torch.all(torch.diff(scores) >= 0)

    return metric("metrics.monotonicity", f, {"features_in_step": features_in_step, "perturb_baseline": perturb_baseline,
                                 "abs": abs, "normalise": normalise, "softmax": softmax, "chunk_size": chunk_size},
                  evaluate)


@api_boundary("metrics.monotonicity_correlation")
def monotonicity_correlation(f, *, nr_samples: int = 100, features_in_step: int = 1, eps: float = 1e-5,
                             perturb_baseline="uniform", abs: bool = True, normalise: bool = True,
                             softmax: bool = True, uniform_low: float = 0.0, uniform_high: float = 1.0,
                             chunk_size: int | None = 64):
    """Monotonicity correlation (Nguyen and Rodríguez Martínez 2020, "On quantitative aspects of
    model interpretability", arXiv:2007.07584): Spearman's correlation between the attribution of
    feature groups and the variance their removal causes in the score.

    Quantus's ``MonotonicityCorrelation``: groups of ``features_in_step`` features in the order
    ``argsort(a)`` (ascending); each group alone (not cumulative) is set to the baseline
    ``nr_samples`` times (default ``"uniform"``: one U(uniform_low, uniform_high) value per group and
    sample, all of the group's features taking it); the group's variance is
    ``mean((score(x_perturbed) - score(x))**2) / score(x)**2`` (divided by 1 when
    ``|score(x)| < eps``); the result is ``spearman(group sums, variances)`` (average ranks).

    The call ``metric(params, x, target, attribution, baseline_draws=None)`` replays the uniform
    draws (``(n_groups, nr_samples)``). A deterministic baseline evaluates one sample per group
    (all ``nr_samples`` would be equal).

    Example:
        >>> metric = fxattr.metrics.monotonicity_correlation(f, nr_samples=10, features_in_step=4)
        >>> torch.vmap(metric, in_dims=(None, 0, 0, 0), randomness="different")(params, X, T, A)
    """
    _check_common(f, abs=abs, normalise=normalise, softmax=softmax, chunk_size=chunk_size,
                  perturb_baseline=perturb_baseline, uniform_low=uniform_low, uniform_high=uniform_high)
    check_int("nr_samples", nr_samples, 1)
    check_int("features_in_step", features_in_step, 1)
    check_float("eps", eps, 0.0)

    def evaluate(params, x, target, attribution, baseline_draws=None):
        _check_example(x, attribution)
        a = prepare_attribution(attribution, normalise=normalise, abs=abs, x=x).reshape(-1)
        target = resolve_target(f, params, x, target)
        n = a.shape[0]
        n_steps = math.ceil(n / features_in_step)
        step = _rank(torch.argsort(a, stable=True)) // features_in_step
        x_flat = x.reshape(-1)
        if _is_uniform(perturb_baseline):
            samples = nr_samples
            if baseline_draws is None:
                baseline_draws = baseline_value("uniform", x_flat, uniform_low=uniform_low,
                                                uniform_high=uniform_high, shape=(n_steps, nr_samples))
            else:
                check_replay("baseline_draws", baseline_draws, (n_steps, nr_samples))
            draws = baseline_draws.to(x.dtype).reshape(-1)
        else:
            if baseline_draws is not None:
                raise fail(None, "baseline_draws replays the 'uniform' baseline only")
            samples = 1
            draws = _subset_baseline(perturb_baseline, x_flat, n_steps, uniform_low, uniform_high)

        def copy(index):
            return torch.where(step == index // samples, draws[index], x_flat).reshape(x.shape)

        indices = torch.arange(n_steps * samples, device=x.device)
        scores = scores_along(f, params, copy, indices, target, softmax=softmax,
                              chunk_size=chunk_size).reshape(n_steps, samples)
        reference = fxattr.select(None, model_output(f, params, x, softmax), target)
        magnitude = reference.abs()
        inverse = torch.where(magnitude >= eps, 1 / torch.where(magnitude >= eps, magnitude, 1.0), 1.0) ** 2
        variances = ((scores - reference) ** 2).mean(-1) * inverse
        sums = torch.zeros(n_steps, dtype=a.dtype, device=x.device).index_add(0, step, a)
        return spearman(sums, variances)

    return metric("metrics.monotonicity_correlation", f, {"nr_samples": nr_samples, "features_in_step": features_in_step, "eps": eps,
                                 "perturb_baseline": perturb_baseline, "abs": abs, "normalise": normalise,
                                 "softmax": softmax, "chunk_size": chunk_size}, evaluate)


# -------------------------------------------------------------------------------------- infidelity

@api_boundary("metrics.infidelity")
def infidelity(f, *, perturb_patch_sizes=(4,), n_perturb_samples: int = 10, perturb_baseline="black",
               abs: bool = False, normalise: bool = False, softmax: bool = False,
               uniform_low: float = 0.0, uniform_high: float = 1.0, chunk_size: int | None = 64):
    """Infidelity (Yeh et al. 2019, "On the (in)fidelity and sensitivity of explanations",
    NeurIPS): the mean squared difference between the drop of the score under a perturbation and
    the attribution's prediction of it, ``sum(a * (x - x_perturbed))``.

    Quantus's ``Infidelity`` (loss ``"mse"``): for each patch size p, the p x p blocks (all
    channels) are set to the baseline one after the other in raster order, cumulatively (the
    baseline computed on the already perturbed x); after each step the drop
    ``score(x) - score(x_k)`` is compared with ``sum(a * (x - x_k))``; the mean of the squared
    differences over the steps is averaged over the patch sizes and over ``n_perturb_samples``
    repetitions (which differ only with a ``"uniform"`` baseline; a deterministic baseline evaluates
    one). H and W must be multiples of every patch size (Quantus fails otherwise).
    Differentiable w.r.t. the attribution and the parameters.

    Example:
        >>> metric = fxattr.metrics.infidelity(f, perturb_patch_sizes=(2, 4))
        >>> loss = torch.vmap(metric, in_dims=(None, 0, 0, 0), randomness="different")(params, X, T, A).mean()
    """
    _check_common(f, abs=abs, normalise=normalise, softmax=softmax, chunk_size=chunk_size,
                  perturb_baseline=perturb_baseline, uniform_low=uniform_low, uniform_high=uniform_high)
    if isinstance(perturb_patch_sizes, int):
        perturb_patch_sizes = (perturb_patch_sizes,)
    if not isinstance(perturb_patch_sizes, (tuple, list)) or not perturb_patch_sizes:
        raise fail(None, f"perturb_patch_sizes must be a non-empty list of ints, got {perturb_patch_sizes!r}")
    for size in perturb_patch_sizes:
        check_int("perturb_patch_sizes entry", size, 1)
    check_int("n_perturb_samples", n_perturb_samples, 1)
    patch_sizes = tuple(perturb_patch_sizes)
    samples = n_perturb_samples if _is_uniform(perturb_baseline) else 1

    def evaluate(params, x, target, attribution):
        _check_example(x, attribution)
        _check_image(x)
        a = prepare_attribution(attribution, normalise=normalise, abs=abs, x=x).reshape(-1)
        target = resolve_target(f, params, x, target)
        channels, height, width = x.shape
        x_flat = x.reshape(-1)
        reference = fxattr.select(None, model_output(f, params, x, softmax), target)
        losses = []
        for p in patch_sizes:  # a handful of patch sizes, each with its own number of steps
            if height % p or width % p:
                raise fail(None, f"x's spatial shape {(height, width)} is not a multiple of the "
                                  f"patch size {p}")
            step = _block_ids(channels, height, width, p, x.device)
            n_steps = (height // p) * (width // p)
            per_sample = []
            for _ in range(samples):  # only for a "uniform" baseline: independent draws
                values = _step_values(perturb_baseline, x_flat, step, n_steps, cumulative=True,
                                      low=uniform_low, high=uniform_high, shape=x.shape)

                def copy(k, values=values, step=step):
                    return torch.where(step <= k, values, x_flat).reshape(x.shape)

                ks = torch.arange(n_steps, device=x.device)
                scores = scores_along(f, params, copy, ks, target, softmax=softmax,
                                      chunk_size=chunk_size)
                # sum(a * (x - x_k)) for every k: a cumulative sum over the steps.
                contributions = torch.zeros(n_steps, dtype=x.dtype, device=x.device).index_add(
                    0, step, a * (x_flat - values))
                predicted = torch.cumsum(contributions, 0)
                per_sample.append(((reference - scores - predicted) ** 2).mean())
            losses.append(torch.stack(per_sample))
        return torch.stack(losses, 1).mean(1).mean(0)

    return metric("metrics.infidelity", f, {"perturb_patch_sizes": patch_sizes, "n_perturb_samples": n_perturb_samples,
                                 "perturb_baseline": perturb_baseline, "abs": abs, "normalise": normalise,
                                 "softmax": softmax, "chunk_size": chunk_size}, evaluate)


# -------------------------------------------------------------------------------------------- ROAD

# The 8-neighbourhood of ROAD's noisy linear imputation: offset (dy, dx) -> weight.
_NEIGHBOURS = (((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
               ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))


def _shift(t: Tensor, dy: int, dx: int) -> Tensor:
    """``out[..., i, j] = t[..., i + dy, j + dx]``, zero outside the image."""
    height, width = t.shape[-2:]
    padded = F.pad(t, (1, 1, 1, 1))
    return padded[..., 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]


def _tridiagonal_times(diagonal: Tensor, upper: Tensor, lower: Tensor, matrix: Tensor) -> Tensor:
    """``T @ matrix`` for the tridiagonal T with ``T[c, c] = diagonal[c]``, ``T[c, c+1] = upper[c]``,
    ``T[c+1, c] = lower[c]``, in O(W * columns)."""
    out = diagonal[:, None] * matrix
    out[:-1] += upper[:, None] * matrix[1:]  # in place on a fresh tensor: no padded copies
    out[1:] += lower[:, None] * matrix[:-1]
    return out


@api_boundary("metrics.road_imputation")
def road_imputation(x: Tensor, missing: Tensor) -> Tensor:
    """ROAD's linear imputation (Rong et al. 2022), without its noise: every missing pixel becomes
    the weighted mean of its 8 neighbours (weights 1/6 for the 4 direct, 1/12 for the diagonal
    ones, renormalised at the border), missing neighbours being unknowns themselves.

    This is Quantus's ``noisy_linear_imputation`` with ``noise=0``, solved in torch: the system
    over all H*W pixels (known pixels fixed to x) is symmetric positive definite and block
    tridiagonal (one W x W block per image row, the couplings between rows tridiagonal), so a
    block elimination over the rows with a Cholesky factorisation per row solves it exactly in
    about ``H * W^3`` flops -- no scipy round trip, vmappable, differentiable.

    Args:
        x: one image ``(C, H, W)``.
        missing: ``(H, W)`` bool, the pixels to impute (every channel).

    Returns:
        x with the missing pixels imputed, same shape.

    Example:
        >>> torch.vmap(fxattr.metrics.road_imputation)(images, masks)
    """
    check_metric_input(x, "x", ndim=3)
    if not isinstance(missing, Tensor) or tuple(missing.shape) != tuple(x.shape[1:]):
        raise fail(None, f"missing must be a bool tensor of shape {tuple(x.shape[1:])}")
    m = missing.to(x.dtype)
    height, width = m.shape
    known = 1 - m
    ones = torch.ones_like(m)
    # total weight of the neighbours inside the image, and the known neighbours' weighted sum.
    reach = torch.zeros_like(m)
    rhs = torch.zeros_like(x)
    for (dy, dx), w in _NEIGHBOURS:
        reach = reach + w * _shift(ones, dy, dx)
        rhs = rhs + w * _shift(x * known, dy, dx)
    diag = m * reach + known                                          # (H, W)
    rhs = m * rhs + known * x                                         # (C, H, W)
    # within-row couplings (dx = +-1) and couplings to the row above (dy = -1).
    right = -(1 / 6) * m[:, :-1] * m[:, 1:]                           # (H, W-1)
    # couplings to the row above (dy = -1), tridiagonal W x W blocks: row r+1 <- row r.
    mid = -(1 / 6) * m[1:] * m[:-1]                                   # [c, c]
    up = -(1 / 12) * m[1:, :-1] * m[:-1, 1:]                          # [c, c+1]
    low = -(1 / 12) * m[1:, 1:] * m[:-1, :-1]                         # [c+1, c]
    b = rhs.permute(1, 2, 0)                                          # (H, W, C)
    # Block elimination over the rows (a loop over the H rows of the system, not over samples or
    # steps): C_r = D_r - L_r C_{r-1}^{-1} L_r^T, every C_r SPD (a Schur complement of an SPD
    # matrix). With C_{r-1} = K K^T (Cholesky) and Z = K^{-1} L_r^T (one triangular solve),
    # L_r C_{r-1}^{-1} L_r^T = Z^T Z: about W^3 flops a row, no explicit inverse.
    zeros = torch.zeros_like(b[0, :, :1]).expand(width, width)

    def with_diagonals(matrix, centre, above, below):  # adds three diagonals in place
        matrix.diagonal(0, -2, -1).add_(centre)
        matrix.diagonal(1, -2, -1).add_(above)
        matrix.diagonal(-1, -2, -1).add_(below)
        return matrix

    factors = [torch.linalg.cholesky(with_diagonals(zeros.clone(), diag[0], right[0], right[0]))]
    ys = [b[0]]
    for r in range(1, height):
        # L_r^T: centre mid, above the diagonal low, below it up.
        coupling_t = with_diagonals(zeros.clone(), mid[r - 1], low[r - 1], up[r - 1])
        z = torch.linalg.solve_triangular(factors[-1], coupling_t, upper=False)
        w = torch.linalg.solve_triangular(factors[-1], ys[-1], upper=False)
        ys.append(b[r] - z.mT @ w)
        own = with_diagonals(zeros.clone(), diag[r], right[r], right[r])
        schur = torch.addmm(own, z.mT, z, alpha=-1)
        factors.append(torch.linalg.cholesky(schur))

    def solve(r, rhs):  # C_r^{-1} rhs from its Cholesky factor
        half = torch.linalg.solve_triangular(factors[r], rhs, upper=False)
        return torch.linalg.solve_triangular(factors[r].mT, half, upper=True)

    rows = [solve(height - 1, ys[-1])]
    for r in range(height - 2, -1, -1):
        # L_{r+1}^T is tridiagonal with the off-diagonals swapped.
        above = _tridiagonal_times(mid[r], low[r], up[r], rows[-1])
        rows.append(solve(r, ys[r] - above))
    solution = torch.stack(rows[::-1]).permute(2, 0, 1)               # (C, H, W)
    return torch.where(missing, solution, x)


@api_boundary("metrics.road")
def road(f, *, percentages=tuple(range(1, 100, 2)), noise: float = 0.01, abs: bool = False,
         normalise: bool = True, chunk_size: int | str | None = "auto"):
    """ROAD, remove and debias (Rong et al. 2022, "A consistent and efficient evaluation strategy
    for attribution methods", ICML): is the model still right when the top p% pixels are replaced
    by a noisy linear imputation of their neighbours?

    Quantus's ``ROAD`` (most relevant first): for each percentage p the first
    ``int(a.numel() * p / 100)`` features of ``argsort(-a)`` are imputed by
    :func:`road_imputation` plus ``noise * N(0, 1)``, and the entry is 1.0 when the argmax of the
    model on the imputed image equals the target, else 0.0. The attribution ranks *pixels*: for a
    one-channel x any attribution of x's shape; for C > 1 channels it must be one map (``(H, W)``
    or ``(1, H, W)``), whose top pixels are imputed in every channel (Quantus indexes C*H*W
    features into H*W pixels and fails there). Averaging over a batch gives Quantus's
    ``{percentage: score}``.

    The call ``metric(params, x, target, attribution, draws=None)`` draws the noise with torch's
    generator or replays it: ``draws`` of shape ``(len(percentages), *x.shape)`` standard normal,
    of which the imputed pixels' entries are used.

    ``chunk_size``: percentages imputed and evaluated at once (``None``: all). The imputation keeps
    ``H`` Cholesky factors of ``W x W`` blocks per percentage, so ``"auto"`` (default) takes as many as fit in
    about 2**24 numbers (all 50 at 28 x 28, one at 224 x 224), per example.

    Example:
        >>> metric = fxattr.metrics.road(f, percentages=(10, 50, 90))
        >>> torch.vmap(metric, in_dims=(None, 0, 0, 0), randomness="different")(params, X, T, A).mean(0)
    """
    _check_common(f, abs=abs, normalise=normalise,
                  chunk_size=None if chunk_size == "auto" else chunk_size)
    check_float("noise", noise, 0.0)
    if not isinstance(percentages, (tuple, list, range)) or len(percentages) == 0:
        raise fail(None, f"percentages must be a non-empty sequence of numbers, got {percentages!r}")
    for p in percentages:
        check_float("percentages entry", p, 0.0, 100.0, strict_minimum=False)
        if p >= 100:
            raise fail(None, f"percentages must be < 100 (imputing every pixel leaves nothing to "
                              f"impute from), got {p}")
    percentages = tuple(percentages)

    def evaluate(params, x, target, attribution, draws=None):
        _check_example(x, attribution)
        _check_image(x)
        _index_target(target)
        check_target_index(f, params, x, target)
        channels, height, width = x.shape
        if channels > 1:
            if attribution.numel() != height * width:
                raise fail(None, f"for x with {channels} channels the attribution must be one map "
                                  f"of shape (H, W) or (1, H, W), got {tuple(attribution.shape)}")
            a = prepare_attribution(attribution.reshape(1, height, width), normalise=normalise, abs=abs)
        else:
            a = prepare_attribution(attribution, normalise=normalise, abs=abs, x=x)
        size = attribution.numel()
        rank = _rank(descending_order(a)).reshape(height, width)
        counts = torch.tensor([int(size * p / 100) for p in percentages], device=x.device)
        if draws is None:
            draws = torch.randn((len(percentages), *x.shape), dtype=x.dtype, device=x.device)
        else:
            check_replay("draws", draws, (len(percentages), *x.shape))
        target = resolve_target(f, params, x, target)

        def correct(count, draw):
            missing = rank < count
            imputed = torch.where(missing, road_imputation(x, missing) + noise * draw, x)
            return (f(params, imputed).reshape(-1).argmax() == target).to(x.dtype)

        chunk = chunk_size
        if chunk == "auto":
            chunk = max(1, 2 ** 24 // (height * width * width))
        return torch.vmap(correct, chunk_size=chunk)(counts, draws)

    return metric("metrics.road", f, {"percentages": percentages, "noise": noise, "abs": abs, "normalise": normalise,
                                 "chunk_size": chunk_size}, evaluate)


# ------------------------------------------------------------------------------------- sufficiency

@api_boundary("metrics.sufficiency")
def sufficiency(f, *, threshold: float = 0.6, abs: bool = True, normalise: bool = True):
    """Sufficiency (Dasgupta, Frost and Moshkovitz 2022, "Framework for evaluating faithfulness of
    local explanations", ICML): how often do examples with similar attributions get the same
    predicted class?

    Quantus's ``Sufficiency`` (``distance_func="seuclidean"``), called on a whole batch
    ``metric(params, X, T, A)``: the attributions are normalised over the batch (one maximum, as
    Quantus) and made absolute; their pairwise standardised Euclidean distances (each feature
    divided by its variance over the batch, ``ddof=1``) are divided by the largest; pairs within
    ``threshold`` (an example not with itself) are "similar"; each example's score is the fraction
    of its similar examples predicted in its class (0 when it has none). ``T`` is not used (as in
    Quantus: only the predicted classes count); features constant over the batch give NaN
    distances, as scipy's ``cdist`` does.

    Returns:
        shape ``(B,)``.

    Example:
        >>> fxattr.metrics.sufficiency(f, threshold=0.6)(params, X, T, A)
    """
    _check_common(f, abs=abs, normalise=normalise)
    check_float("threshold", threshold)

    def evaluate(params, X, T, A):
        check_metric_input(X, "X")
        check_metric_input(A, "A")
        if A.shape[0] != X.shape[0] or X.shape[0] < 2:
            raise fail(None, f"X and A must be batches of the same length >= 2, got shapes "
                              f"{tuple(X.shape)} and {tuple(A.shape)}")
        check_batch_attribution(X, A)
        flat = A.reshape(A.shape[0], -1)
        if normalise:
            flat = normalise_by_max(flat)
        if abs:
            flat = flat.abs()
        variance = flat.var(0, correction=1)
        difference = flat[:, None, :] - flat[None, :, :]
        distance = torch.sqrt((difference ** 2 / variance).sum(-1))
        distance = normalise_by_max(distance)
        eye = torch.eye(X.shape[0], dtype=torch.bool, device=X.device)
        similar = (distance <= threshold) & ~eye
        classes = torch.vmap(lambda x: f(params, x).reshape(-1).argmax())(X)
        same = classes[None, :] == classes[:, None]
        hits = (similar & same).sum(-1).to(X.dtype)
        total = similar.sum(-1).to(X.dtype)
        return torch.where(total > 0, hits / total.clamp(min=1), torch.zeros_like(total))

    return metric("metrics.sufficiency", f, {"threshold": threshold, "abs": abs, "normalise": normalise}, evaluate)
