"""Localisation metrics (Quantus 0.6.0 names): does the attribution fall on the object?

Every metric is built ``metric = fxattr.metrics.NAME(f, **config)`` and called per example
``metric(params, x, target, attribution, mask)`` with a boolean ground-truth ``mask`` of shape
``(1, H, W)`` (``focus`` takes the four mosaic quadrant flags instead); batch it with
``torch.vmap(metric, in_dims=(None, 0, 0, 0, 0))``. The model is never called: ``f``, ``params``,
``x`` and ``target`` are accepted so that every metric has the same form.

Shared conventions (Quantus's ``Metric.general_preprocess``): the attribution is first divided by its
maximum absolute value (``normalise=True``; an all-zero attribution is left as is), then its absolute
value is taken (``abs=True``). Quantus divides by the maximum over the whole *batch*; every metric
here is invariant to a positive scale of the attribution (up to Quantus's ``1e-9`` in two
denominators), so the per-example maximum gives the same numbers. The mask is broadcast over the
attribution's channels: a ``(C, H, W)`` attribution has ``C * H * W`` features, a channel-pixel being
inside where its pixel is (Quantus needs a one-channel attribution, ``(1, H, W)``; sum the channels
first, ``a.sum(0, keepdim=True)``, for its convention). An empty mask gives NaN, as in Quantus.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxattr.errors import api_boundary, fail
from fxattr.metrics.common import (
    check_bool,
    check_int,
    check_metric_input,
    check_model,
    prepare_attribution,
)
from fxattr.metrics.common import metric as named_metric

__all__ = [
    "attribution_localisation",
    "auc",
    "focus",
    "pointing_game",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "top_k_intersection",
]


def check_unused_model(f) -> None:
    """``f`` is not called by metrics that read only the attribution: ``None`` or a model function."""
    if f is not None:
        check_model(f)


def flat_mask(attribution: Tensor, mask) -> Tensor:
    """``mask`` checked (bool, ``(1, *a.shape[1:])`` or ``a.shape``) and broadcast, flattened."""
    if not isinstance(mask, Tensor):
        raise fail(None, f"mask must be a bool tensor of shape (1, H, W), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise fail(None, f"mask must be a bool tensor, got dtype {mask.dtype} (use mask > 0.5 "
                          "or mask.bool())")
    shape, a_shape = tuple(mask.shape), tuple(attribution.shape)
    fits = len(shape) == len(a_shape) and shape[1:] == a_shape[1:] and shape[0] in (1, a_shape[0])
    if not fits:
        raise fail(None, f"mask has shape {shape} but the attribution has shape {a_shape}; the mask "
                          f"must be (1, {', '.join(map(str, a_shape[1:]))}) (one channel, broadcast "
                          "over the attribution's) or the attribution's shape")
    return mask.expand(a_shape).reshape(-1)


def masked_flat(attribution, mask, *, normalise: bool, abs: bool):
    """The flat mask and the flat prepared attribution (Quantus's normalise-then-abs), checked."""
    check_metric_input(attribution)
    return flat_mask(attribution, mask), prepare_attribution(
        attribution, normalise=normalise, abs=abs).reshape(-1)


def nan_where_empty(score: Tensor, mask: Tensor) -> Tensor:
    """``score``, or NaN where the mask holds no feature (as Quantus)."""
    return torch.where(mask.any(), score, torch.full_like(score, float("nan")))


@api_boundary("metrics.pointing_game")
def pointing_game(f=None, *, weighted: bool = False, abs: bool = False,  # noqa: A002 - Quantus's name
                  normalise: bool = True):
    """Pointing game (Zhang et al. 2018, "Top-down neural attention by excitation backprop", IJCV).

    1 if a feature of maximal attribution lies inside the mask, else 0 (every tied maximum counts,
    as Quantus's ``a == a.max()``). ``weighted=True`` scores a hit ``1 - |mask| / n`` (a small
    object is harder to hit), 0 a miss.

    Differences from Quantus 0.6.0: Quantus writes the weighted score and the NaN of an empty mask
    into a *boolean* array, so both become ``True``; here the weighted score is the number the paper
    and Quantus's code intend and an empty mask gives NaN.

    Args:
        f: the model function (not called; accepted so every metric is built alike).
        weighted: weight a hit by ``1 - |mask| / n``.
        abs: take the absolute value of the attribution first.
        normalise: divide the attribution by its maximum absolute value first (no effect on the
            score; kept for Quantus's signature).

    Returns:
        ``metric(params, x, target, attribution, mask)`` -> a 0-d float tensor (0., 1., the
        weighted score, or NaN for an empty mask).

    Example:
        >>> metric = fxattr.metrics.pointing_game(f)
        >>> scores = torch.vmap(metric, in_dims=(None, 0, 0, 0, 0))(params, x, y, a, masks)
    """
    check_bool("weighted", weighted)
    check_bool("abs", abs)
    check_bool("normalise", normalise)

    check_unused_model(f)
    config = {"weighted": weighted, "abs": abs, "normalise": normalise}

    def score(params, x, target, attribution, mask):
        m, a = masked_flat(attribution, mask, normalise=normalise, abs=abs)
        hit = (m & (a == a.max())).any().to(a.dtype)
        if weighted:
            hit = hit * (1 - m.to(a.dtype).mean())
        return nan_where_empty(hit, m)

    return named_metric('pointing_game', f, config, score)


@api_boundary("metrics.attribution_localisation")
def attribution_localisation(f=None, *, weighted: bool = False, positive_attributions: bool = False,
                             abs: bool = True, normalise: bool = True):  # noqa: A002
    """Attribution localisation (Kohlbrenner et al. 2020, "Towards best practice in explaining
    neural network decisions with LRP", IJCNN).

    The share of the attribution inside the mask, ``sum(a * mask) / (sum(a) + 1e-9)``; NaN for an
    empty mask and where the share exceeds 1 (negative attribution outside the mask; Quantus's
    rule). ``positive_attributions=True`` clips the attribution at 0 first; ``weighted=True``
    multiplies by the mask's share of the features, ``|mask| / n``.

    Difference from Quantus 0.6.0: its weight divides by ``x_batch[2:].size`` (the size of the
    batch from its third example on, a slicing slip for ``x.shape[2:]``), so its weighted score
    depends on the batch size; here the weight is ``|mask| / n``, the paper's ratio.
    Quantus's ``max_size`` only triggers a warning and is not taken.

    Args:
        f: the model function (not called).
        weighted: multiply by the mask's share ``|mask| / n``.
        positive_attributions: clip the attribution at 0 (after ``abs``).
        abs: take the absolute value of the attribution first (Quantus's default ``True``).
        normalise: divide the attribution by its maximum absolute value first.

    Returns:
        ``metric(params, x, target, attribution, mask)`` -> a 0-d float tensor.

    Example:
        >>> metric = fxattr.metrics.attribution_localisation(f)
        >>> scores = torch.vmap(metric, in_dims=(None, 0, 0, 0, 0))(params, x, y, a, masks)
    """
    for name, value in (("weighted", weighted), ("positive_attributions", positive_attributions),
                        ("abs", abs), ("normalise", normalise)):
        check_bool(name, value)

    check_unused_model(f)
    config = {"weighted": weighted, "positive_attributions": positive_attributions, "abs": abs,
              "normalise": normalise}

    def score(params, x, target, attribution, mask):
        m, a = masked_flat(attribution, mask, normalise=normalise, abs=abs)
        if positive_attributions:
            a = a.clamp(min=0)
        inside = torch.where(m, a, torch.zeros_like(a)).sum()
        ratio = inside / (a.sum() + 1e-9)
        ratio = torch.where(ratio > 1, torch.full_like(ratio, float("nan")), ratio)
        if weighted:
            ratio = ratio * m.to(a.dtype).mean()
        return nan_where_empty(ratio, m)

    return named_metric('attribution_localisation', f, config, score)


@api_boundary("metrics.top_k_intersection")
def top_k_intersection(f=None, *, k: int = 1000, concept_influence: bool = False,
                       abs: bool = False, normalise: bool = True):  # noqa: A002
    """Top-k intersection (Theiner et al. 2021, "Interpretable semantic photo geolocalization",
    WACV).

    The share of the ``k`` most relevant features (``argsort(-a)[:k]``) that lie inside the mask;
    ``concept_influence=True`` divides it by the mask's share of the features, ``|mask| / n``.

    Args:
        f: the model function (not called).
        k: how many of the most relevant features are checked (1 <= k <= the number of features;
            Quantus requires k < H * W, and its default 1000 needs images of more than 1000 pixels).
        concept_influence: divide by ``|mask| / n``.
        abs: take the absolute value of the attribution first.
        normalise: divide the attribution by its maximum absolute value first (no effect).

    Returns:
        ``metric(params, x, target, attribution, mask)`` -> a 0-d float tensor.

    Example:
        >>> metric = fxattr.metrics.top_k_intersection(f, k=16)
        >>> scores = torch.vmap(metric, in_dims=(None, 0, 0, 0, 0))(params, x, y, a, masks)
    """
    check_int("k", k, 1)
    for name, value in (("concept_influence", concept_influence), ("abs", abs),
                        ("normalise", normalise)):
        check_bool(name, value)

    check_unused_model(f)
    config = {"k": k, "concept_influence": concept_influence, "abs": abs, "normalise": normalise}

    def score(params, x, target, attribution, mask):
        check_metric_input(attribution)
        m = flat_mask(attribution, mask)
        if k > m.numel():
            raise fail(None, f"k={k} exceeds the attribution's {m.numel()} features")
        a = prepare_attribution(attribution, normalise=normalise, abs=abs).reshape(-1)
        top = torch.topk(a, k).indices
        share = m[top].to(a.dtype).mean()
        if concept_influence:
            share = share / m.to(a.dtype).mean()
        return nan_where_empty(share, m)

    return named_metric('top_k_intersection', f, config, score)


@api_boundary("metrics.relevance_rank_accuracy")
def relevance_rank_accuracy(f=None, *, abs: bool = False, normalise: bool = True):  # noqa: A002
    """Relevance rank accuracy (Arras et al. 2022, "CLEVR-XAI: a benchmark dataset for the ground
    truth evaluation of neural network explanations", Information Fusion).

    With ``K = |mask|``: the share of the ``K`` most relevant features (``argsort(-a)[:K]``) that
    lie inside the mask. ``K`` varies per example, so the mask is read along the stable descending
    order and counted over its first ``K`` places (no ``topk`` of data-dependent size).

    Args:
        f: the model function (not called).
        abs: take the absolute value of the attribution first.
        normalise: divide the attribution by its maximum absolute value first (no effect).

    Returns:
        ``metric(params, x, target, attribution, mask)`` -> a 0-d float tensor.

    Example:
        >>> metric = fxattr.metrics.relevance_rank_accuracy(f)
        >>> scores = torch.vmap(metric, in_dims=(None, 0, 0, 0, 0))(params, x, y, a, masks)
    """
    check_bool("abs", abs)
    check_bool("normalise", normalise)

    check_unused_model(f)
    config = {"abs": abs, "normalise": normalise}

    def score(params, x, target, attribution, mask):
        m, a = masked_flat(attribution, mask, normalise=normalise, abs=abs)
        order = torch.argsort(a, descending=True, stable=True)
        size = m.sum()
        # the mask along the order, counted over its first |mask| places
        top = torch.arange(a.numel(), device=a.device) < size
        hits = (m[order] & top).sum()
        return nan_where_empty(hits.to(a.dtype) / size.to(a.dtype), m)

    return named_metric('relevance_rank_accuracy', f, config, score)


@api_boundary("metrics.relevance_mass_accuracy")
def relevance_mass_accuracy(f=None, *, abs: bool = False, normalise: bool = True):  # noqa: A002
    """Relevance mass accuracy (Arras et al. 2022, "CLEVR-XAI", Information Fusion).

    The share of the attribution's sum that lies inside the mask, ``sum(a * mask) / sum(a)`` (no
    clipping and no epsilon, as Quantus: signed attributions can give values outside [0, 1]).

    Args:
        f: the model function (not called).
        abs: take the absolute value of the attribution first.
        normalise: divide the attribution by its maximum absolute value first (no effect).

    Returns:
        ``metric(params, x, target, attribution, mask)`` -> a 0-d float tensor.

    Example:
        >>> metric = fxattr.metrics.relevance_mass_accuracy(f, abs=True)
        >>> scores = torch.vmap(metric, in_dims=(None, 0, 0, 0, 0))(params, x, y, a, masks)
    """
    check_bool("abs", abs)
    check_bool("normalise", normalise)

    check_unused_model(f)
    config = {"abs": abs, "normalise": normalise}

    def score(params, x, target, attribution, mask):
        m, a = masked_flat(attribution, mask, normalise=normalise, abs=abs)
        inside = torch.where(m, a, torch.zeros_like(a)).sum()
        return nan_where_empty(inside / a.sum(), m)

    return named_metric('relevance_mass_accuracy', f, config, score)


@api_boundary("metrics.auc")
def auc(f=None, *, abs: bool = False, normalise: bool = True):  # noqa: A002
    """Area under the ROC curve of the attribution as a detector of the mask (Fawcett 2006, "An
    introduction to ROC analysis", Pattern Recognition Letters), as Quantus computes with
    scikit-learn's ``roc_curve`` and ``auc``.

    Computed exactly as the Mann-Whitney statistic: with ranks ``r`` of the attribution (ties get
    their average rank, which is what the trapezoidal ROC area counts for ties),
    ``(sum of r over the mask - P (P + 1) / 2) / (P N)`` for ``P`` features inside and ``N`` outside;
    the rank sums are integers (no float cancellation on large images), and the tie groups come from
    one sort (cumulative max / min of their boundaries). NaN when the mask is empty or full
    (scikit-learn's ROC curve is undefined there too).

    Args:
        f: the model function (not called).
        abs: take the absolute value of the attribution first.
        normalise: divide the attribution by its maximum absolute value first (no effect).

    Returns:
        ``metric(params, x, target, attribution, mask)`` -> a 0-d float tensor in [0, 1].

    Example:
        >>> metric = fxattr.metrics.auc(f)
        >>> scores = torch.vmap(metric, in_dims=(None, 0, 0, 0, 0))(params, x, y, a, masks)
    """
    check_bool("abs", abs)
    check_bool("normalise", normalise)

    check_unused_model(f)
    config = {"abs": abs, "normalise": normalise}

    def score(params, x, target, attribution, mask):
        m, a = masked_flat(attribution, mask, normalise=normalise, abs=abs)
        ordered, order = torch.sort(a)
        n = a.numel()
        place = torch.arange(n, device=a.device)
        # each sorted value's tie group, by its first and last place (ties share the average rank)
        differs = ordered[1:] != ordered[:-1]
        edge = torch.ones(1, dtype=torch.bool, device=a.device)
        first = torch.where(torch.cat([edge, differs]), place, 0).cummax(0).values
        last = torch.where(torch.cat([differs, edge]), place, n - 1).flip(0).cummin(0).values.flip(0)
        inside = m[order]
        twice_rank = torch.where(inside, first + last + 2, 0)   # twice the 1-based average rank
        positives = m.sum()
        negatives = n - positives
        twice_u = twice_rank.sum() - positives * (positives + 1)
        score = twice_u.to(a.dtype) / (2 * positives * negatives).to(a.dtype)
        defined = (positives > 0) & (negatives > 0)
        return torch.where(defined, score, torch.full_like(score, float("nan")))

    return named_metric('auc', f, config, score)


@api_boundary("metrics.focus")
def focus(f=None, *, abs: bool = False, normalise: bool = True):  # noqa: A002
    """Focus (Arias-Duart et al. 2022, "Focus! Rating XAI methods and finding biases", FUZZ-IEEE).

    The attribution of a 2 x 2 mosaic of images, of which some show the target class: the share of
    the positive attribution that falls on the target's quadrants,
    ``sum(a+ * on_target) / (sum(a+) + 1e-9)`` with ``a+ = max(a, 0)``. The quadrants split the
    attribution's last two axes at ``H // 2`` and ``W // 2`` (as Quantus).

    Args:
        f: the model function (not called).
        abs: take the absolute value of the attribution first.
        normalise: divide the attribution by its maximum absolute value first (no effect up to the
            ``1e-9``).

    Returns:
        ``metric(params, x, target, attribution, quadrants)`` -> a 0-d float tensor; ``quadrants``
        holds the four flags (top-left, top-right, bottom-left, bottom-right), a ``(4,)`` bool or
        0/1 integer tensor (one of Quantus's ``custom_batch`` entries).

    Example:
        >>> metric = fxattr.metrics.focus(f)
        >>> scores = torch.vmap(metric, in_dims=(None, 0, 0, 0, 0))(params, mosaics, y, a, flags)
    """
    check_bool("abs", abs)
    check_bool("normalise", normalise)

    check_unused_model(f)
    config = {"abs": abs, "normalise": normalise}

    def score(params, x, target, attribution, quadrants):
        check_metric_input(attribution)
        if attribution.ndim != 3:
            raise fail(None, f"the attribution must be (C, H, W) (a mosaic image's), got shape "
                              f"{tuple(attribution.shape)}")
        if not isinstance(quadrants, Tensor) or tuple(quadrants.shape) != (4,):
            shape = tuple(quadrants.shape) if isinstance(quadrants, Tensor) else type(quadrants).__name__
            raise fail(None, "quadrants must be a (4,) tensor of flags (top-left, top-right, "
                              f"bottom-left, bottom-right), got {shape}")
        if quadrants.is_floating_point() or quadrants.is_complex():
            raise fail(None, f"quadrants must be bool or 0/1 integers, got dtype {quadrants.dtype}")
        a = prepare_attribution(attribution, normalise=normalise, abs=abs).clamp(min=0)
        height, width = a.shape[-2:]
        half_h, half_w = height // 2, width // 2
        flags = quadrants.to(a.dtype)
        rows = torch.arange(height, device=a.device) >= half_h     # bottom half
        cols = torch.arange(width, device=a.device) >= half_w      # right half
        index = (2 * rows[:, None] + cols[None, :]).to(torch.long)  # 0 tl, 1 tr, 2 bl, 3 br
        weight = flags[index]
        on_target = (a * weight).sum()
        return on_target / (a.sum() + 1e-9)

    return named_metric('focus', f, config, score)
