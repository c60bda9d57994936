"""The Shapley family: Shapley value sampling, exact Shapley values, KernelSHAP and LIME.

All four explain a model through *coalitions* of feature groups: a coalition is a boolean vector
over the groups of ``feature_mask``; the model sees x where the coalition is on and ``baseline``
where it is off. A coalition is materialised only inside the vmapped function that evaluates it
(from a ``(groups,)`` boolean row), so memory grows with ``chunk_size``, not with the number of
coalitions, and every coalition is evaluated by ``torch.vmap``, never by a Python loop.

- :func:`shapley_value_sampling` (Castro et al. 2009; captum's ``ShapleyValueSampling``): random
  permutations; a group's attribution is its mean marginal contribution when the groups are added
  in permutation order, starting from the baseline.
- :func:`shapley_values` (Shapley 1953; captum's ``ShapleyValues``): exact, from all ``2^G``
  coalitions and the Shapley weights (the same numbers as captum's average over all ``G!``
  permutations, with ``2^G`` instead of ``G * G!`` forwards).
- :func:`kernel_shap` (Lundberg and Lee 2017; captum's ``KernelShap``): coalitions drawn from the
  Shapley kernel, a weighted linear regression fitted in closed form.
- :func:`lime` (Ribeiro et al. 2016; captum's ``Lime``): Bernoulli(1/2) coalitions, an exponential
  similarity kernel on the cosine or Euclidean distance, a weighted linear / ridge / lasso surrogate.

x may be a tensor or a tuple / dict of tensors (several model inputs), floating-point, integer or
boolean (an integer or boolean input takes a baseline of its kind). Every explainer is
``explain(params, x, target=None, *, feature_mask=None)``: a mask given at call time (ids
``0..G-1``) replaces the construction-time one and may differ per example under ``torch.vmap``.
``show_progress`` reports each chunk of coalitions.

The surrogates are solved in torch, in float64 (the regressions weigh the empty and full
coalitions 1e6 times the others, as captum does, which float32 normal equations cannot carry),
and cast back to x's dtype. Everything is differentiable torch; the explanations vmap over a
batch and compile.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import NamedTuple

import optree
import torch
from torch import Tensor

from fxattr._explainer import check_choice, check_int, check_model, explainer
from fxattr.errors import fail
from fxattr.perturbation._features import (
    FeatureGroups,
    check_perturbation_baseline,
    check_perturbation_x,
    check_progress,
    leaf_baselines,
    map_chunks,
)
from fxattr.perturbation._perturbation import as_float
from fxattr.targets import check_target, select

__all__ = ["kernel_shap", "lime", "shapley_value_sampling", "shapley_values"]

# captum's weight of the empty and the full coalition in KernelSHAP's regression ("infinite").
KERNEL_SHAP_ENDPOINT_WEIGHT = 1e6
MAX_EXACT_GROUPS = 16


# --------------------------------------------------------------------------------------- groups

class _Prepared(NamedTuple):
    """One explanation's inputs: x's leaves and structure, each leaf's group ids (broadcastable to
    it), the number of groups, each leaf's baseline and the target (None -> the argmax at x)."""
    leaves: list
    tree: object
    group_of: list
    count: int
    bases: list
    target: object

    def perturbed(self, on):
        """x where the groups of the boolean row ``on`` are on, the baseline elsewhere."""
        return self.tree.unflatten([torch.where(on[g], t, b) for t, g, b in zip(self.leaves, self.group_of, self.bases)])

    def spread(self, phi):
        """Per-group values given to every element of their group, in x's structure."""
        return self.tree.unflatten([phi[g].expand(t.shape) for g, t in zip(self.group_of, self.leaves)])

    def baseline(self):
        return self.tree.unflatten([b.expand(t.shape) for t, b in zip(self.leaves, self.bases)])


def _configured(where: str, f, feature_mask, baseline, chunk_size, cross_tensor, num_features,
                show_progress) -> tuple:
    """The checks every member of the family makes at construction; the groups and the reporter."""
    check_model(where, f)
    groups = FeatureGroups(where, feature_mask, cross_tensor=cross_tensor, num_features=num_features)
    check_perturbation_baseline(where, baseline)
    check_int(where, "chunk_size", chunk_size, 1, allow_none=True)
    return groups, check_progress(where, show_progress)


def _prepared(where: str, f, params, x, target, groups: FeatureGroups, baseline, feature_mask) -> _Prepared:
    """What every explanation starts from: x's groups, the baselines, the target."""
    check_target(where, target)
    check_perturbation_x(where, x)
    leaves, tree = optree.tree_flatten(x, namespace="torch")
    if sum(t.numel() for t in leaves) == 0:
        shapes = ", ".join(str(tuple(t.shape)) for t in leaves)
        raise fail(where, f"x has no features: {'its shapes' if len(leaves) > 1 else 'its shape'} {shapes} "
                          f"{'hold' if len(leaves) > 1 else 'holds'} no elements to attribute (x is one "
                          "example, without a batch axis)")
    group_of, count = groups.resolve(x, feature_mask)
    bases = leaf_baselines(where, baseline, x)
    return _Prepared(leaves, tree, group_of, count, bases, _resolve_target(f, params, x, target))


def _value(where, f, params, x, target):
    return select(where, as_float(f(params, x)), target)


def _coalition_values(where, f, params, prepared: _Prepared, coalitions, chunk_size, reporter) -> Tensor:
    """``f`` at every coalition (rows of a ``(n, G)`` boolean tensor), vmapped ``chunk_size`` at a time."""

    def value(coalition):
        return _value(where, f, params, prepared.perturbed(coalition), prepared.target)

    return map_chunks(value, (coalitions,), chunk_size, reporter)


def _resolve_target(f, params, x, target):
    if target is None:
        return as_float(f(params, x)).detach().reshape(-1).argmax()
    return target


def _check_draws(where: str, name: str, draws, columns_name: str) -> None:
    if draws is None:
        return
    if not isinstance(draws, Tensor) or draws.ndim != 2 or draws.shape[0] == 0:
        raise fail(where, f"{name} must be a 2-d tensor (one row per draw, one column per "
                          f"{columns_name}), got {getattr(draws, 'shape', type(draws).__name__)}")


# ------------------------------------------------------------------------- Shapley value sampling

def shapley_value_sampling(f, *, feature_mask=None, baseline=0.0, samples: int = 25,
                           permutations: Tensor | None = None, chunk_size: int | None = 16,
                           cross_tensor: bool = True, num_features: int | None = None, show_progress=False):
    """Shapley value sampling (Castro, Gómez and Tejada 2009) with captum's ``ShapleyValueSampling``
    semantics.

    For each of ``samples`` random orders of the G feature groups, the groups are switched from
    ``baseline`` to x one at a time; each group is credited with the change of the target output
    when it is switched on. A group's attribution is the mean credit over the orders, given to
    every element of the group. The G credits of one order telescope: they sum to
    ``f(x)[t] - f(baseline)[t]`` exactly, so the attributions do too (efficiency).

    Forwards per example: ``samples * G + 1`` (the baseline once), as captum.

    Args:
        f: the function of ``fxattr.functionalize``.
        feature_mask: an integer tensor of group ids broadcastable to x's shape (e.g. ``(1, H, W)``
            superpixels shared by the channels); ``None``: every element is its own group.
        baseline: the value switched-off groups take: a number or a tensor broadcastable to x.
        samples: the number of random orders (captum's ``n_samples``).
        permutations: ``(samples, G)`` orders to use instead of random ones (rows are
            permutations of ``0..G-1``, groups numbered by sorted id) -- to replay a run, e.g.
            captum's ``torch.randperm`` draws; shared by every example of a batch, as in captum.
        chunk_size: how many coalitions one vmapped forward holds per example (``None``: all).
        cross_tensor, num_features, show_progress: as in :func:`fxattr.feature_ablation` (masks
            spanning a tuple x's inputs, call-time masks, progress reports).

    Returns:
        ``explain(params, x, target)`` -> an attribution of x's shape. Without ``permutations``
        the orders are drawn inside: vmap with ``randomness="different"`` (an order per example)
        or ``"same"`` (captum's convention: one set of orders for the batch).

    Example:
        >>> segments = torch.arange(16).reshape(1, 4, 4).repeat_interleave(8, 1).repeat_interleave(8, 2)
        >>> explain = fxattr.shapley_value_sampling(f, feature_mask=segments, samples=32)
        >>> torch.vmap(explain, in_dims=(None, 0, 0), randomness="same")(params, images, labels)
    """
    where = "shapley_value_sampling"
    groups, reporter = _configured(where, f, feature_mask, baseline, chunk_size, cross_tensor, num_features,
                                   show_progress)
    check_int(where, "samples", samples, 1)
    _check_draws(where, "permutations", permutations, "feature group")
    if permutations is not None:
        if permutations.dtype.is_floating_point or permutations.dtype == torch.bool:
            raise fail(where, f"permutations must be an integer tensor, got dtype {permutations.dtype}")
        count = permutations.shape[1]
        expected = torch.arange(count).expand_as(permutations)
        if not torch.equal(permutations.sort(dim=1).values.cpu(), expected):
            raise fail(where, "every row of permutations must be a permutation of 0..G-1")
        if groups.count is not None and count != groups.count:
            raise fail(where, f"permutations order {count} groups but feature_mask has {groups.count}")
        samples = permutations.shape[0]

    def explain(params, x, target=None, *, feature_mask=None):
        prepared = _prepared(where, f, params, x, target, groups, baseline, feature_mask)
        count, device = prepared.count, prepared.leaves[0].device
        if permutations is None:
            orders = torch.rand(samples, count, device=device).argsort(dim=1)
        else:
            if permutations.shape[1] != count:
                raise fail(where, f"permutations order {permutations.shape[1]} groups but x has {count}")
            orders = permutations.to(device, torch.long)
        # rank[s, g]: the position of group g in order s; prefix k of order s = {g: rank < k}
        rank = torch.empty_like(orders).scatter_(1, orders, torch.arange(count, device=device).expand_as(orders))
        sizes = torch.arange(1, count + 1, device=device)
        coalitions = (rank[:, None, :] < sizes[None, :, None]).reshape(-1, count)
        start = _value(where, f, params, prepared.baseline(), prepared.target)
        values = _coalition_values(where, f, params, prepared, coalitions, chunk_size,
                                   reporter).reshape(samples, count)
        credits = torch.diff(values, dim=1, prepend=start.expand(samples, 1))
        totals = torch.zeros(count, dtype=credits.dtype, device=device).scatter_add(
            0, orders.reshape(-1), credits.reshape(-1))
        return prepared.spread(totals / samples)

    config = {"feature_mask": groups.mask_shape, "baseline": baseline, "samples": samples,
              "permutations": None if permutations is None else tuple(permutations.shape),
              "chunk_size": chunk_size, "cross_tensor": cross_tensor, "num_features": num_features,
              "show_progress": bool(show_progress)}
    return explainer(where, f, config, explain, integer_x="bool")


# ------------------------------------------------------------------------------- exact Shapley

def _all_coalitions(count: int, device) -> Tensor:
    codes = torch.arange(2 ** count, device=device)
    return (codes[:, None] >> torch.arange(count, device=device)) & 1 == 1


def _shapley_weights(coalitions: Tensor) -> Tensor:
    """``W[c, g]`` with ``phi_g = sum_c W[c, g] v(c)``: ``+w(|c| - 1)`` if g is in c, ``-w(|c|)``
    if not, ``w(s) = s! (G - 1 - s)! / G!`` (float64)."""
    count = coalitions.shape[1]
    sizes = coalitions.sum(dim=1).to(torch.float64)
    log_w = lambda s: (torch.lgamma(s + 1) + torch.lgamma(count - s) - math.lgamma(count + 1))  # noqa: E731
    with_g = torch.exp(log_w((sizes - 1).clamp(min=0)))[:, None]
    without_g = torch.exp(log_w(sizes.clamp(max=count - 1)))[:, None]
    return torch.where(coalitions, with_g, -without_g)


def shapley_values(f, *, feature_mask=None, baseline=0.0, chunk_size: int | None = 64,
                   cross_tensor: bool = True, num_features: int | None = None, show_progress=False):
    """Exact Shapley values (Shapley 1953) with captum's ``ShapleyValues`` semantics.

    ``phi_g = sum over coalitions S without g of |S|! (G - |S| - 1)! / G! (v(S + g) - v(S))``, with
    ``v(S)`` the target output when the groups in S are x and the rest ``baseline``. Evaluated from
    all ``2^G`` coalitions in vmapped chunks and one weight matrix; equal to captum's average over
    all ``G!`` orders (which costs ``G * G!`` forwards). Efficiency holds exactly:
    ``sum_g phi_g = v(all) - v(none)``.

    Args:
        f: the function of ``fxattr.functionalize``.
        feature_mask: an integer tensor of group ids broadcastable to x's shape; at most 16 groups
            (``2^16`` forwards). ``None``: every element its own group (x of at most 16 elements).
        baseline: the value switched-off groups take: a number or a tensor broadcastable to x.
        chunk_size: how many coalitions one vmapped forward holds per example (``None``: all).
        cross_tensor, num_features, show_progress: as in :func:`fxattr.feature_ablation` (masks
            spanning a tuple x's inputs, call-time masks, progress reports).

    Example:
        >>> quadrants = torch.tensor([[0, 1], [2, 3]]).repeat_interleave(16, 0).repeat_interleave(16, 1)
        >>> explain = fxattr.shapley_values(f, feature_mask=quadrants[None])
        >>> torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
    """
    where = "shapley_values"
    groups, reporter = _configured(where, f, feature_mask, baseline, chunk_size, cross_tensor, num_features,
                                   show_progress)
    if groups.count is not None and groups.count > MAX_EXACT_GROUPS:
        raise fail(where, f"feature_mask has {groups.count} groups; exact Shapley values need 2^G "
                          f"forwards and are limited to {MAX_EXACT_GROUPS} groups: merge groups or use "
                          "fxattr.shapley_value_sampling / fxattr.kernel_shap")

    def explain(params, x, target=None, *, feature_mask=None):
        prepared = _prepared(where, f, params, x, target, groups, baseline, feature_mask)
        count = prepared.count
        if count > MAX_EXACT_GROUPS:
            raise fail(where, f"x has {count} features (no feature_mask); exact Shapley values are "
                              f"limited to {MAX_EXACT_GROUPS} groups: pass a feature_mask")
        coalitions = _all_coalitions(count, prepared.leaves[0].device)
        values = _coalition_values(where, f, params, prepared, coalitions, chunk_size, reporter)
        weights = _shapley_weights(coalitions)
        phi = (weights * values.to(torch.float64)[:, None]).sum(dim=0).to(values.dtype)
        return prepared.spread(phi)

    config = {"feature_mask": groups.mask_shape, "baseline": baseline, "chunk_size": chunk_size,
              "cross_tensor": cross_tensor, "num_features": num_features, "show_progress": bool(show_progress)}
    return explainer(where, f, config, explain, integer_x="bool")


# ------------------------------------------------------------------------- surrogate regressions

def _weighted_linear_fit(design: Tensor, y: Tensor, weights: Tensor, ridge: float) -> Tensor:
    """Coefficients (without the intercept) of ``min sum_i w_i (y_i - b - design_i . beta)^2 +
    ridge |beta|^2``: sklearn's ``LinearRegression`` (``ridge=0``, the minimum-norm solution when
    the design is rank deficient, as its lstsq) and ``Ridge(alpha=ridge)``, intercept fitted by
    centring on the weighted means."""
    w = weights / weights.sum()
    x_mean = (w[:, None] * design).sum(0)
    y_mean = (w * y).sum()
    root = weights.sqrt()
    xc = (design - x_mean) * root[:, None]
    yc = (y - y_mean) * root
    if ridge == 0:
        return torch.linalg.pinv(xc) @ yc
    gram = xc.T @ xc + ridge * torch.eye(design.shape[1], dtype=design.dtype, device=design.device)
    return torch.linalg.solve(gram, xc.T @ yc)


def _weighted_lasso_fit(design: Tensor, y: Tensor, weights: Tensor, alpha: float,
                        iterations: int) -> Tensor:
    """sklearn's ``Lasso(alpha)`` with ``sample_weight``: ``min 1/(2 sum w) sum_i w_i (y_i - b -
    design_i . beta)^2 + alpha |beta|_1`` (intercept by weighted centring), by FISTA
    (Beck and Teboulle 2009) for a fixed number of iterations: a differentiable, vmappable solver."""
    w = weights / weights.sum()
    x_mean = (w[:, None] * design).sum(0)
    y_mean = (w * y).sum()
    xc = design - x_mean
    yc = y - y_mean
    gram = xc.T @ (w[:, None] * xc)
    corr = xc.T @ (w * yc)
    # the step 1 / L with L the largest eigenvalue of the gram matrix, by a few power iterations
    # (cheap and vmappable). They start from a fixed irregular vector, not all ones: when every
    # coalition has the same number of groups on, the centred design sums to zero across its
    # columns and all ones is in the gram's null space (the estimate was 0, the step infinite, the
    # fit NaN). The largest diagonal entry (also <= the largest eigenvalue) is a floor.
    columns = torch.arange(design.shape[1], dtype=design.dtype, device=design.device)
    vector = 1 + torch.remainder(columns * 0.6180339887498949, 1.0)
    for _ in range(20):
        vector = gram @ vector
        vector = vector / vector.norm().clamp(min=torch.finfo(design.dtype).tiny)
    lipschitz = torch.maximum(vector @ gram @ vector, gram.diagonal().max())
    lipschitz = lipschitz.clamp(min=torch.finfo(design.dtype).tiny) * 1.01
    step = 1.0 / lipschitz
    beta = torch.zeros_like(corr)
    momentum_point, t = beta, 1.0
    for _ in range(iterations):
        gradient = gram @ momentum_point - corr
        moved = momentum_point - step * gradient
        new_beta = torch.sign(moved) * torch.clamp(moved.abs() - step * alpha, min=0)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        momentum_point = new_beta + ((t - 1) / t_next) * (new_beta - beta)
        beta, t = new_beta, t_next
    return beta


# -------------------------------------------------------------------------------------- KernelSHAP

def _kernel_shap_draws(samples: int, count: int, device) -> Tensor:
    """captum's KernelSHAP coalitions: all on, all off, then ``samples - 2`` draws with k ~
    ``(G - 1) / (k (G - k))`` groups on, chosen uniformly (top k of Gaussian noise)."""
    k = torch.arange(1, count, device=device, dtype=torch.float64)
    probabilities = (count - 1) / (k * (count - k))
    cdf = (probabilities / probabilities.sum()).cumsum(0)
    rest = max(samples - 2, 0)
    uniform = torch.rand(rest, device=device, dtype=torch.float64)
    on = torch.searchsorted(cdf, uniform.unsqueeze(-1)).squeeze(-1).clamp(max=count - 2) + 1
    noise = torch.randn(rest, count, device=device)
    rank = noise.argsort(dim=1, descending=True).argsort(dim=1)
    drawn = rank < on[:, None]
    ends = torch.stack([torch.ones(count, dtype=torch.bool, device=device),
                        torch.zeros(count, dtype=torch.bool, device=device)])
    return torch.cat([ends, drawn])[:samples]


def _check_coalitions(where: str, coalitions, count) -> None:
    _check_draws(where, "coalitions", coalitions, "feature group")
    if coalitions is None:
        return
    if coalitions.dtype.is_floating_point and not bool(((coalitions == 0) | (coalitions == 1)).all()):
        raise fail(where, "coalitions must hold 0/1 (or booleans): row i, column g says whether "
                          "group g is x (1) or baseline (0) in draw i")
    if count is not None and coalitions.shape[1] != count:
        raise fail(where, f"coalitions have {coalitions.shape[1]} columns but feature_mask has {count} groups")


def kernel_shap(f, *, feature_mask=None, baseline=0.0, samples: int = 25,
                coalitions: Tensor | None = None, chunk_size: int | None = 16,
                cross_tensor: bool = True, num_features: int | None = None, show_progress=False):
    """KernelSHAP (Lundberg and Lee 2017) with captum's ``KernelShap`` semantics.

    Draws ``samples`` coalitions -- the full one, the empty one, then coalitions whose number of
    groups k follows the Shapley kernel ``p(k) ~ (G - 1) / (k (G - k))`` with the k groups chosen
    uniformly -- evaluates the model on each, and fits ``v(c) ~ b + sum_g beta_g c_g`` by weighted
    least squares (weight 1e6 for the full and empty coalitions, 1 for the others, as captum; the
    minimum-norm solution, as sklearn's ``LinearRegression``). A group's attribution is its
    coefficient ``beta_g``.

    Args:
        f: the function of ``fxattr.functionalize``.
        feature_mask: an integer tensor of group ids broadcastable to x's shape; ``None``: every
            element its own group.
        baseline: the value switched-off groups take: a number or a tensor broadcastable to x.
        samples: the number of coalitions (captum's ``n_samples``, the two end points included).
        coalitions: ``(n, G)`` 0/1 coalitions to use instead of random ones (to replay a run, e.g.
            captum's draws); shared by every example of a batch.
        chunk_size: how many coalitions one vmapped forward holds per example (``None``: all).
        cross_tensor, num_features, show_progress: as in :func:`fxattr.feature_ablation` (masks
            spanning a tuple x's inputs, call-time masks, progress reports).

    Example:
        >>> explain = fxattr.kernel_shap(f, feature_mask=segments, samples=200)
        >>> torch.vmap(explain, in_dims=(None, 0, 0), randomness="different")(params, images, labels)
    """
    where = "kernel_shap"
    groups, reporter = _configured(where, f, feature_mask, baseline, chunk_size, cross_tensor, num_features,
                                   show_progress)
    check_int(where, "samples", samples, 1)
    _check_coalitions(where, coalitions, groups.count)

    def explain(params, x, target=None, *, feature_mask=None):
        prepared = _prepared(where, f, params, x, target, groups, baseline, feature_mask)
        count, device = prepared.count, prepared.leaves[0].device
        if coalitions is None:
            if count < 2:
                raise fail(where, f"KernelSHAP needs at least 2 feature groups, x has {count}")
            drawn = _kernel_shap_draws(samples, count, device)
        else:
            if coalitions.shape[1] != count:
                raise fail(where, f"coalitions have {coalitions.shape[1]} columns but x has {count} groups")
            drawn = coalitions.to(device).bool()
        values = _coalition_values(where, f, params, prepared, drawn, chunk_size, reporter)
        sizes = drawn.sum(dim=1)
        ends = (sizes == 0) | (sizes == count)
        weights = torch.where(ends, KERNEL_SHAP_ENDPOINT_WEIGHT, 1.0).to(torch.float64)
        beta = _weighted_linear_fit(drawn.to(torch.float64), values.to(torch.float64), weights, 0.0)
        return prepared.spread(beta.to(values.dtype))

    config = {"feature_mask": groups.mask_shape, "baseline": baseline, "samples": samples,
              "coalitions": None if coalitions is None else tuple(coalitions.shape),
              "chunk_size": chunk_size, "cross_tensor": cross_tensor, "num_features": num_features,
              "show_progress": bool(show_progress)}
    return explainer(where, f, config, explain, integer_x="bool")


# ------------------------------------------------------------------------------------------- LIME

REGRESSIONS = ("lasso", "ridge", "linear")
DISTANCES = ("cosine", "euclidean")


def lime(f, *, feature_mask=None, baseline=0.0, samples: int = 50, coalitions: Tensor | None = None,
         distance: str = "cosine", kernel_width: float = 1.0, regression: str = "lasso",
         alpha: float = 0.01, iterations: int = 1000, chunk_size: int | None = 16,
         cross_tensor: bool = True, num_features: int | None = None, show_progress=False):
    """LIME (Ribeiro, Singh and Guestrin 2016) with captum's ``Lime`` semantics.

    Draws ``samples`` coalitions, each group on with probability 1/2; weighs each by the similarity
    ``exp(-d^2 / (2 kernel_width^2))`` of its perturbed input to x (``d`` the cosine distance
    ``1 - cos(x, x_c)`` or the Euclidean distance of the flattened inputs, computed in float32 as
    captum); fits ``v(c) ~ b + sum_g beta_g c_g`` by weighted regression. A group's attribution is
    its coefficient ``beta_g``.

    Args:
        f: the function of ``fxattr.functionalize``.
        feature_mask: an integer tensor of group ids broadcastable to x's shape; ``None``: every
            element its own group.
        baseline: the value switched-off groups take: a number or a tensor broadcastable to x.
        samples: the number of coalitions (captum's ``n_samples``).
        coalitions: ``(n, G)`` 0/1 coalitions to use instead of random ones (to replay a run).
        distance: ``"cosine"`` (captum's default) or ``"euclidean"``.
        kernel_width: the width of the exponential similarity kernel (> 0).
        regression: ``"lasso"`` (captum's default, ``SkLearnLasso(alpha=0.01)``; solved by
            ``iterations`` FISTA steps), ``"ridge"`` (``Ridge(alpha)``, closed form) or
            ``"linear"`` (``LinearRegression``, closed form, minimum norm).
        alpha: the lasso / ridge penalty (sklearn's ``alpha``).
        iterations: FISTA steps for the lasso.
        chunk_size: how many coalitions one vmapped forward holds per example (``None``: all).
        cross_tensor, num_features, show_progress: as in :func:`fxattr.feature_ablation` (masks
            spanning a tuple x's inputs, call-time masks, progress reports).

    Example:
        >>> explain = fxattr.lime(f, feature_mask=segments, samples=200, regression="ridge", alpha=1.0)
        >>> torch.vmap(explain, in_dims=(None, 0, 0), randomness="different")(params, images, labels)
    """
    where = "lime"
    groups, reporter = _configured(where, f, feature_mask, baseline, chunk_size, cross_tensor, num_features,
                                   show_progress)
    check_int(where, "samples", samples, 1)
    check_int(where, "iterations", iterations, 1)
    check_choice(where, "distance", distance, DISTANCES)
    check_choice(where, "regression", regression, REGRESSIONS)
    for name, value, minimum in (("kernel_width", kernel_width, 0.0), ("alpha", alpha, 0.0)):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) \
                or value < minimum or (name == "kernel_width" and value == 0):
            raise fail(where, f"{name} must be a finite number {'> 0' if name == 'kernel_width' else '>= 0'}, "
                              f"got {value!r}")
    _check_coalitions(where, coalitions, groups.count)

    def explain(params, x, target=None, *, feature_mask=None):
        prepared = _prepared(where, f, params, x, target, groups, baseline, feature_mask)
        count, device = prepared.count, prepared.leaves[0].device
        if coalitions is None:
            drawn = torch.rand(samples, count, device=device) < 0.5
        else:
            if coalitions.shape[1] != count:
                raise fail(where, f"coalitions have {coalitions.shape[1]} columns but x has {count} groups")
            drawn = coalitions.to(device).bool()

        def flat(tree):  # the inputs flattened and concatenated, in float32 (captum's distance)
            return torch.cat([t.reshape(-1).float() for t in optree.tree_leaves(tree, namespace="torch")])

        def value_and_similarity(coalition):
            perturbed = prepared.perturbed(coalition)
            value = _value(where, f, params, perturbed, prepared.target)
            a, b = flat(x), flat(perturbed)
            if distance == "cosine":
                # torch.nn.CosineSimilarity's eps (1e-8) on each norm, as captum
                d = 1 - (a @ b) / (a.norm().clamp(min=1e-8) * b.norm().clamp(min=1e-8))
            else:
                d = (a - b).norm()
            return value, torch.exp(-d.square() / (2 * kernel_width ** 2))

        values, similarity = map_chunks(value_and_similarity, (drawn,), chunk_size, reporter)
        design, y, weights = drawn.to(torch.float64), values.to(torch.float64), similarity.to(torch.float64)
        if regression == "lasso":
            beta = _weighted_lasso_fit(design, y, weights, alpha, iterations)
        else:
            beta = _weighted_linear_fit(design, y, weights, alpha if regression == "ridge" else 0.0)
        return prepared.spread(beta.to(values.dtype))

    config = {"feature_mask": groups.mask_shape, "baseline": baseline, "samples": samples,
              "coalitions": None if coalitions is None else tuple(coalitions.shape),
              "distance": distance, "kernel_width": kernel_width, "regression": regression,
              "alpha": alpha, "iterations": iterations, "chunk_size": chunk_size,
              "cross_tensor": cross_tensor, "num_features": num_features, "show_progress": bool(show_progress)}
    return explainer(where, f, config, explain, integer_x="bool")
