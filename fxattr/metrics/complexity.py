"""Complexity metrics (Quantus 0.6.0 names): how concentrated is the attribution?

Every metric is built ``metric = fxattr.metrics.NAME(f, **config)`` and called per example
``metric(params, x, target, attribution)``; batch it with
``torch.vmap(metric, in_dims=(None, 0, 0, 0))``. The model is never called.

Shared conventions (Quantus's ``Metric.general_preprocess``): the attribution is first divided by its
maximum absolute value (``normalise=True``; an all-zero attribution is left as is), then its absolute
value is taken (``abs=True``, the default here). Quantus divides by the maximum over the whole
*batch*, fxattr by the example's own maximum (a per-example metric cannot see the batch).
``sparseness`` and ``complexity`` are invariant to that scale (up to ``sparseness``'s ``+1e-7``);
``effective_complexity`` is not (it counts values above a threshold): for Quantus's batch
convention divide the batch by its maximum absolute value yourself and pass ``normalise=False``.

``sparseness`` and ``complexity`` are differentiable in the attribution (``torch.func.grad``, any
order; the sort's derivative is a permutation), so they can serve as training objectives.
"""

from __future__ import annotations

import torch

from fxattr.errors import api_boundary
from fxattr.metrics.common import (
    check_bool,
    check_float,
    check_metric_input,
    prepare_attribution,
)
from fxattr.metrics.common import metric as named_metric
from fxattr.metrics.localisation import check_unused_model

__all__ = ["complexity", "effective_complexity", "sparseness"]


@api_boundary("metrics.sparseness")
def sparseness(f=None, *, abs: bool = True, normalise: bool = True):  # noqa: A002 - Quantus's name
    """Sparseness (Chalasani et al. 2020, "Concise explanations of neural networks using
    adversarial training", ICML): the Gini index of the attribution.

    With ``v`` the flattened attribution plus ``1e-7`` (Quantus's guard against an all-zero map),
    sorted ascending, and ``n`` features:
    ``sum_i (2 i - n - 1) v_i / (n sum_i v_i)``, ``i = 1..n``. 0 for a uniform map, close to 1 when
    one feature holds everything. Higher is sparser.

    Args:
        f: the model function (not called; accepted so every metric is built alike).
        abs: take the absolute value of the attribution first (Quantus's default ``True``; the
            Gini index is meant for non-negative values).
        normalise: divide the attribution by its maximum absolute value first.

    Returns:
        ``metric(params, x, target, attribution)`` -> a 0-d tensor of the attribution's dtype.

    Example:
        >>> metric = fxattr.metrics.sparseness(f)
        >>> scores = torch.vmap(metric, in_dims=(None, 0, 0, 0))(params, x, y, a)
        >>> grad = torch.func.grad(lambda a: metric(params, x[0], y[0], a))(a[0])
    """
    check_bool("abs", abs)
    check_bool("normalise", normalise)

    check_unused_model(f)
    config = {"abs": abs, "normalise": normalise}

    def score(params, x, target, attribution):
        check_metric_input(attribution)
        a = prepare_attribution(attribution, normalise=normalise, abs=abs).reshape(-1) + 1e-7
        n = a.numel()
        ordered = torch.sort(a).values
        weights = 2 * torch.arange(1, n + 1, dtype=a.dtype, device=a.device) - n - 1
        return (weights * ordered).sum() / (n * ordered.sum())

    return named_metric('sparseness', f, config, score)


@api_boundary("metrics.complexity")
def complexity(f=None, *, abs: bool = True, normalise: bool = True):  # noqa: A002
    """Complexity (Bhatt et al. 2020, "Evaluating and aggregating feature-based model
    explanations", IJCAI): the entropy of the attribution's share per feature.

    ``p = a / sum |a|``, then ``-sum p log(p + 1e-12)`` (natural log; Quantus's epsilon). Between 0
    (one feature holds everything) and ``log n`` (uniform). Lower is less complex. With
    ``abs=False`` and negative values the logarithm is NaN, as in Quantus.

    Args:
        f: the model function (not called).
        abs: take the absolute value of the attribution first (Quantus's default ``True``).
        normalise: divide the attribution by its maximum absolute value first (no effect).

    Returns:
        ``metric(params, x, target, attribution)`` -> a 0-d tensor of the attribution's dtype.

    Example:
        >>> metric = fxattr.metrics.complexity(f)
        >>> scores = torch.vmap(metric, in_dims=(None, 0, 0, 0))(params, x, y, a)
    """
    check_bool("abs", abs)
    check_bool("normalise", normalise)

    check_unused_model(f)
    config = {"abs": abs, "normalise": normalise}

    def score(params, x, target, attribution):
        check_metric_input(attribution)
        a = prepare_attribution(attribution, normalise=normalise, abs=abs).reshape(-1)
        share = a / a.abs().sum()
        return -(share * torch.log(share + 1e-12)).sum()

    return named_metric('complexity', f, config, score)


@api_boundary("metrics.effective_complexity")
def effective_complexity(f=None, *, eps: float = 1e-5, abs: bool = True,  # noqa: A002
                         normalise: bool = True):
    """Effective complexity (Nguyen and Martinez 2020, "On quantitative aspects of model
    interpretability", arXiv:2007.07584): how many features have an attribution above ``eps``.

    Counts ``a > eps`` after the preprocessing (with ``abs=True``, ``|a| > eps``). Lower is less
    complex. Not differentiable (a count).

    Difference from Quantus 0.6.0: ``normalise=True`` divides by the example's own maximum
    absolute value, Quantus by the batch's (see the module docstring); with ``normalise=False``
    the counts are Quantus's.

    Args:
        f: the model function (not called).
        eps: the threshold (a finite float).
        abs: take the absolute value of the attribution first (Quantus's default ``True``).
        normalise: divide the attribution by its maximum absolute value first.

    Returns:
        ``metric(params, x, target, attribution)`` -> a 0-d int64 tensor.

    Example:
        >>> metric = fxattr.metrics.effective_complexity(f, eps=1e-3)
        >>> counts = torch.vmap(metric, in_dims=(None, 0, 0, 0))(params, x, y, a)
    """
    check_float("eps", eps)
    check_bool("abs", abs)
    check_bool("normalise", normalise)
    threshold = float(eps)

    check_unused_model(f)
    config = {"eps": eps, "abs": abs, "normalise": normalise}

    def score(params, x, target, attribution):
        check_metric_input(attribution)
        a = prepare_attribution(attribution, normalise=normalise, abs=abs)
        return (a > threshold).sum()

    return named_metric('effective_complexity', f, config, score)
