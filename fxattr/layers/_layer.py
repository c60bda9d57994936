"""Layer attributions (captum's ``Layer*`` family): how much each unit of a layer's activation
contributes to the target output.

Design. fxattr cuts the model at the layer with :func:`fxattr.graph.split` into ``body(params, x)
-> a`` and ``head(params, x, a) -> output`` (no hooks: two graphs of the traced model). Every layer
method is then an input method applied to the head, seen as a model of the activation, or a
gradient of the head evaluated at points of an input-space path:

- ``layer_activation``: ``a = body(params, x)``.
- ``layer_gradient_x_activation``: ``a * d head(x, a)[t] / da`` (``multiply_by_inputs=False``:
  the gradient alone).
- ``layer_integrated_gradients``: captum's ``LayerIntegratedGradients`` interpolates IN THE
  LAYER'S SPACE: ``a_b = body(baseline)``, the head is evaluated at ``a_b + alpha (a - a_b)`` with
  the original ``x`` everywhere else (captum runs the forward on the inputs and replaces the
  layer's output by the interpolated one), and the result is ``(a - a_b) * sum_k w_k g_k``.
- ``layer_conductance`` and ``internal_influence`` integrate along the INPUT path
  ``p = b + alpha (x - b)`` instead: the gradient w.r.t. the layer at ``body(p)`` (head run on
  ``p``), weighted by the quadrature (internal influence), or by the change of the activation
  between consecutive path points (conductance, on ``steps + 1`` points, captum's convention).
- ``layer_gradient_shap``: captum's ``LayerGradientShap``: random points on the input path from a
  drawn baseline to a noisy x, gradient w.r.t. the layer there, times ``body(x_k) - body(b_k)``.
- ``layer_deeplift`` / ``layer_deeplift_shap`` / ``layer_lrp``: the graph-based explainers on the
  head's own graph as a functional model of ``(activation, x)``; the rescale multipliers after the
  layer see the differences of both (a skip connection that reads x, too), as in captum.
- ``layer_feature_ablation``: :func:`fxattr.feature_ablation` of the head as a model of the
  activation (``layer_mask`` groups units, ``baseline`` replaces them; captum's
  ``LayerFeatureAblation``).

``attribute_to_layer_input=True`` cuts at the value the layer reads instead of the value it returns
(captum replaces the input of the module's forward alone; when that value is also read outside the
layer, the cut would change more than the layer's input, and that is an error).
``layer`` may be a list: one attribution per layer, each computed with the other layers left as
they are, returned as a tuple (each layer costs its own passes). captum's
``LayerIntegratedGradients`` with a list of layers instead interpolates all of them AT ONCE; for
layers on separate branches that is a different quantity, so a list here is not that.

A layer whose forward returns a tuple of tensors (a block returning two tensors) is cut at all of
them at once (:mod:`fxattr.layers._parts`): ``layer_activation``, ``layer_gradient_x_activation``,
``layer_integrated_gradients`` (all parts interpolated together, as captum), ``layer_conductance``,
``internal_influence`` and ``layer_gradient_shap`` return a tuple with one attribution per part,
as captum's; so do they with ``attribute_to_layer_input=True`` on a layer reading several tensors
(``forward(a, b)``: one attribution per argument, in the signature's order; each must be read by
the layer alone). ``layer_deeplift``, ``layer_deeplift_shap`` and ``layer_lrp`` too (the head's
graph is then a model of ``(*parts, x)``), and ``layer_feature_ablation`` (the parts as a tuple
input of the head; without ``layer_mask`` every unit of every part alone, as captum). A neuron is a
unit of one tensor: :func:`fxattr.layers.neuron` on such a layer is an error (name one part's
graph node). A leaf module returning a tuple (``nn.LSTM``, ``nn.GRU``): name the graph node of one
part.

Every explainer is ``explain(params, x, target=None)`` of ONE example and composes with
``torch.vmap`` (batches, and, for neurons, see :mod:`fxattr.layers`), ``torch.func.grad``
(gradient-based ones: exact higher derivatives, no custom backward) and ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import math
import re
from numbers import Real

import torch
from torch import Tensor, nn

from fxattr._explainer import (
    check_bool,
    check_choice,
    check_int,
    explainer,
    fixed_target,
)
from fxattr.errors import FxattrError, api_boundary, check_finite, fail
from fxattr.functional import FunctionalModel
from fxattr.layers._cut import cuts, layer_names
from fxattr.layers._parts import PartsCut, input_parts, tuple_parts
from fxattr.targets import check_target, select

__all__ = [
    "check_layer_baseline",
    "first_leaf",
    "grad_at_layer",
    "guarded",
    "input_baseline",
    "internal_influence",
    "layer_activation",
    "layer_conductance",
    "layer_cuts",
    "layer_deeplift",
    "layer_deeplift_shap",
    "layer_feature_ablation",
    "layer_gradient_shap",
    "layer_gradient_x_activation",
    "layer_integrated_gradients",
    "layer_lrp",
    "quadrature_points",
    "takes_token_ids",
    "tree_map",
]


# ---------------------------------------------------------------------------------------- shared

def check_layer_baseline(where: str, baseline) -> None:
    if callable(baseline) and not isinstance(baseline, Tensor):
        return
    if isinstance(baseline, bool) or not isinstance(baseline, (Real, Tensor)):
        raise fail(where, f"baseline must be a number, a tensor of x's shape or a callable x -> baseline; "
                          f"got {type(baseline).__name__}")
    if isinstance(baseline, Real) and not math.isfinite(float(baseline)):
        raise fail(where, f"baseline must be finite, got {baseline!r}")
    if isinstance(baseline, Tensor) and (baseline.dtype.is_complex or baseline.dtype == torch.bool):
        raise fail(where, f"baseline must be a real tensor (floating point, or token ids), got {baseline.dtype}")
    if isinstance(baseline, Tensor) and baseline.dtype.is_floating_point and not bool(torch.isfinite(baseline).all()):
        raise fail(where, "baseline holds NaN or Inf values")


def input_baseline(where: str, baseline, x: Tensor) -> Tensor:
    value = baseline(x) if callable(baseline) and not isinstance(baseline, Tensor) else baseline
    if isinstance(value, Real):
        return torch.full_like(x, float(value))
    if not isinstance(value, Tensor):
        raise fail(where, f"baseline must give a tensor, got {type(value).__name__}")
    if value.ndim and tuple(value.shape) != tuple(x.shape):
        raise fail(where, f"baseline has shape {tuple(value.shape)} but x has shape {tuple(x.shape)}")
    return value.to(dtype=x.dtype, device=x.device).expand_as(x)


def grad_at_layer(where: str, head, params, x, a, target) -> Tensor:
    """``d head(params, x, a)[target] / da``."""
    return torch.func.grad(lambda a_: select(where, head(params, x, a_), target))(a)


def takes_token_ids(f) -> bool:
    """Whether x may hold integer token ids: the model embeds them (holds an ``nn.Embedding``);
    into any other model an integer x is an error naming x, not a raw dtype error of its first
    layer."""
    module = getattr(f, "module", None)
    return isinstance(module, nn.Module) and any(isinstance(m, (nn.Embedding, nn.EmbeddingBag))
                                                 for m in module.modules())


def guarded(f, params, x, where, run):
    """``run()``, the passes of the cut model over ``x``, under the model's own input guard: x
    of a shape the model cannot take (an axis missing) is an error naming x and its shape, as
    for every other explainer, not a raw error of the layer that first meets it."""
    guard = getattr(f, "guarded", None)
    return run() if guard is None else guard(x, run, where, params=params)


def _check_common(where, f, attribute_to_layer_input):
    check_bool(where, "attribute_to_layer_input", attribute_to_layer_input)


def tree_map(fn, *trees):
    """``fn`` on the tensors of a tuple-returning layer's parts, position by position (on a tensor,
    ``fn`` itself)."""
    if isinstance(trees[0], tuple):
        return tuple(fn(*leaves) for leaves in zip(*trees))
    return fn(*trees)


def first_leaf(tree) -> Tensor:
    return tree[0] if isinstance(tree, tuple) else tree


def layer_cuts(where, f, layer, attribute_to_layer_input, tuples: bool):
    """The cuts of ``layer`` (a :class:`PartsCut` for a layer returning a tuple, or with
    ``attribute_to_layer_input`` reading several tensors, when ``tuples``; otherwise such a layer
    is an error naming its parts) and whether a list was given."""
    if not isinstance(f, FunctionalModel):
        return cuts(where, f, layer, attribute_to_layer_input)  # its error
    many = not isinstance(layer, (str, nn.Module))
    found = []
    for name in layer_names(where, f, layer):
        parts = input_parts(where, f, name) if attribute_to_layer_input else tuple_parts(where, f, name)
        if parts is None:
            found.extend(cuts(where, f, name, attribute_to_layer_input)[0])
            continue
        if not tuples:
            what, option = ("reads", " with attribute_to_layer_input=True") if attribute_to_layer_input \
                else ("returns", "")
            raise fail(where, f"layer {name!r} {what} {len(parts)} tensors (graph nodes "
                              f"{', '.join(map(repr, parts))}); {where}{option} is not supported on it: "
                              "name one of those nodes as the layer")
        found.append(PartsCut(where, f, name, parts))
    return found, many


def _build(where, f, layer, attribute_to_layer_input, config, per_cut, integer_x=False, prepare=None,
           tuples: bool = False):
    """The explainer: ``per_cut(cut, params, x, target)`` for each layer, a tuple for a list.
    ``integer_x``: x may hold token ids (methods that never differentiate w.r.t. x nor interpolate
    it, cut after an embedding). ``tuples``: ``per_cut`` handles a layer returning a tuple (its
    activation a tuple of tensors)."""
    _check_common(where, f, attribute_to_layer_input)
    chosen_cuts, many = layer_cuts(where, f, layer, attribute_to_layer_input, tuples)
    if prepare is not None:  # what can be built and checked once per layer, now
        for cut in chosen_cuts:
            prepare(cut)

    def explain(params, x, target=None, *args, **kwargs):
        check_target(where, target)
        if not isinstance(x, Tensor):
            raise fail(where, f"x must be one tensor (one example), got {type(x).__name__}")
        results = guarded(f, params, x, where,
                          lambda: tuple(per_cut(cut, params, x, target, *args, **kwargs) for cut in chosen_cuts))
        return results if many else results[0]

    config = {"layer": layer, "attribute_to_layer_input": attribute_to_layer_input, **config}
    return explainer(where, f, config, explain, empty="run", integer_x=integer_x)


def quadrature_points(where, method, steps):
    from fxattr import QUADRATURES, quadrature
    check_choice(where, "method", method, QUADRATURES)
    check_int(where, "steps", steps, 2 if method == "riemann_trapezoid" else 1)
    return quadrature(method, steps)


# --------------------------------------------------------------------------------------- methods

@api_boundary("layers.layer_activation")
def layer_activation(f, *, layer, attribute_to_layer_input: bool = False):
    """The layer's activation (captum's ``LayerActivation``); ``target`` is ignored.

    Args:
        f: the function of ``fxattr.functionalize``.
        layer: a module name (``"layer4"``), a graph node name, a submodule, or a list of them
            (then a tuple of activations).
        attribute_to_layer_input: the value the layer reads instead of the one it returns.

    Example:
        >>> explain = fxattr.layers.layer_activation(f, layer="layer3")
        >>> acts = torch.vmap(explain, in_dims=(None, 0))(params, images)
    """
    where = "layers.layer_activation"
    return _build(where, f, layer, attribute_to_layer_input, {},
                  lambda cut, params, x, target: cut.body(params, x), integer_x=takes_token_ids(f), tuples=True)


@api_boundary("layers.layer_gradient_x_activation")
def layer_gradient_x_activation(f, *, layer, multiply_by_inputs: bool = True,
                                attribute_to_layer_input: bool = False):
    """``a * d f[target] / da`` at the layer's activation ``a`` (captum's
    ``LayerGradientXActivation``); ``multiply_by_inputs=False`` returns the gradient alone
    (captum's ``LayerGradientXActivation(multiply_by_inputs=False)``). ``target=None``: the argmax.

    Example:
        >>> explain = fxattr.layers.layer_gradient_x_activation(f, layer="layer4")
        >>> maps = torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
    """
    where = "layers.layer_gradient_x_activation"
    check_bool(where, "multiply_by_inputs", multiply_by_inputs)

    def per_cut(cut, params, x, target):
        target = fixed_target(f, params, x, target)
        a = cut.body(params, x)
        g = grad_at_layer(where, cut.head, params, x, a, target)
        return tree_map(torch.mul, a, g) if multiply_by_inputs else g

    return _build(where, f, layer, attribute_to_layer_input,
                  {"multiply_by_inputs": multiply_by_inputs}, per_cut, integer_x=takes_token_ids(f), tuples=True)


@api_boundary("layers.layer_integrated_gradients")
def layer_integrated_gradients(f, *, layer, steps: int = 32, baseline=0.0, method: str = "gausslegendre",
                               chunk_size: int | None = 4, multiply_by_inputs: bool = True,
                               attribute_to_layer_input: bool = False):
    """Integrated gradients in the layer's space (captum's ``LayerIntegratedGradients``).

    ``a = body(x)``, ``a_b = body(baseline)``; the head runs on x with the layer's value replaced
    by ``a_b + alpha (a - a_b)`` at the quadrature's points; the result is ``(a - a_b) * sum_k w_k
    d head / da`` (``multiply_by_inputs=False``: the weighted gradient alone). The attributions
    sum to ``f(x)[t] - head(x, a_b)[t]`` up to the quadrature's error.

    Args:
        f: the function of ``fxattr.functionalize``.
        layer: a module name, graph node name, submodule, or a list of them.
        steps, method, chunk_size: as in :func:`fxattr.integrated_gradients` (captum's ``n_steps``,
            ``method``; captum's default is 50 Gauss-Legendre points; its ``riemann_trapezoid``
            weights sum to (n-1)/n and differ from fxattr's).
        baseline: a number, a tensor of x's shape, or a callable ``x -> baseline`` (in INPUT space,
            as captum's ``baselines``). x may hold token ids (integers) when the layer is an
            embedding or after one; the baseline is then token ids too (a pad id, say).
        multiply_by_inputs: multiply by ``a - a_b`` (captum's default).
        attribute_to_layer_input: integrate in the space of the value the layer reads.

    Example:
        >>> explain = fxattr.layers.layer_integrated_gradients(f, layer="layer2", steps=16)
        >>> attributions = torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
    """
    where = "layers.layer_integrated_gradients"
    alphas, weights = quadrature_points(where, method, steps)
    check_int(where, "chunk_size", chunk_size, 1, allow_none=True)
    check_layer_baseline(where, baseline)
    check_bool(where, "multiply_by_inputs", multiply_by_inputs)

    def per_cut(cut, params, x, target):
        target = fixed_target(f, params, x, target)
        base = input_baseline(where, baseline, x)
        a_x, a_b = cut.body(params, x), cut.body(params, base)
        diff = tree_map(torch.sub, a_x, a_b)
        like = first_leaf(a_x)
        alpha = torch.tensor(alphas, dtype=like.dtype, device=like.device)
        weight = torch.tensor(weights, dtype=like.dtype, device=like.device)

        def at(t):
            return grad_at_layer(where, cut.head, params, x, tree_map(lambda b, d: b + t * d, a_b, diff), target)

        grads = torch.vmap(at, chunk_size=chunk_size)(alpha)
        total = tree_map(lambda g: torch.tensordot(weight, g, dims=1), grads)
        return tree_map(torch.mul, diff, total) if multiply_by_inputs else total

    config = {"steps": steps, "baseline": baseline, "method": method, "chunk_size": chunk_size,
              "multiply_by_inputs": multiply_by_inputs}
    return _build(where, f, layer, attribute_to_layer_input, config, per_cut, integer_x=takes_token_ids(f),
                  tuples=True)


def _input_path(where, f, params, x, target, cut, baseline, alphas, chunk_size):
    """Activations and gradients w.r.t. the layer at input-path points ``b + alpha (x - b)``."""
    base = input_baseline(where, baseline, x)
    diff = x - base
    alpha = torch.tensor(alphas, dtype=x.dtype, device=x.device)

    def at(t):
        point = base + t * diff
        a = cut.body(params, point)
        return a, grad_at_layer(where, cut.head, params, point, a, target)

    return torch.vmap(at, chunk_size=chunk_size)(alpha)


@api_boundary("layers.layer_conductance")
def layer_conductance(f, *, layer, steps: int = 32, baseline=0.0, method: str = "gausslegendre",
                      chunk_size: int | None = 4, attribute_to_layer_input: bool = False):
    """Conductance of each unit of the layer (Dhamdhere et al. 2018; captum's ``LayerConductance``).

    On ``steps + 1`` points ``alpha_k`` of the quadrature (captum's convention: the rule's points
    for ``n_steps + 1``, only their positions used) along the input path ``p_k = b + alpha_k (x -
    b)``: ``sum_{k < steps} (body(p_{k+1}) - body(p_k)) * d f(p_k)[t] / d a``. The attributions sum
    approximately to ``f(x)[t] - f(b)[t]``.

    Example:
        >>> explain = fxattr.layers.layer_conductance(f, layer="layer3", steps=16)
        >>> torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
    """
    where = "layers.layer_conductance"
    check_int(where, "steps", steps, 1)  # before steps + 1 below
    alphas, _ = quadrature_points(where, method, steps + 1)
    check_int(where, "chunk_size", chunk_size, 1, allow_none=True)
    check_layer_baseline(where, baseline)

    def per_cut(cut, params, x, target):
        target = fixed_target(f, params, x, target)
        acts, grads = _input_path(where, f, params, x, target, cut, baseline, alphas, chunk_size)
        return tree_map(lambda a, g: ((a[1:] - a[:-1]) * g[:-1]).sum(0), acts, grads)

    config = {"steps": steps, "baseline": baseline, "method": method, "chunk_size": chunk_size}
    return _build(where, f, layer, attribute_to_layer_input, config, per_cut, tuples=True)


@api_boundary("layers.internal_influence")
def internal_influence(f, *, layer, steps: int = 32, baseline=0.0, method: str = "gausslegendre",
                       chunk_size: int | None = 4, attribute_to_layer_input: bool = False):
    """Internal influence (Leino et al. 2018; captum's ``InternalInfluence``): the gradient w.r.t.
    the layer integrated along the INPUT path, ``sum_k w_k d f(b + alpha_k (x - b))[t] / d a``.

    Example:
        >>> explain = fxattr.layers.internal_influence(f, layer="layer3", steps=16)
        >>> torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
    """
    where = "layers.internal_influence"
    alphas, weights = quadrature_points(where, method, steps)
    check_int(where, "chunk_size", chunk_size, 1, allow_none=True)
    check_layer_baseline(where, baseline)

    def per_cut(cut, params, x, target):
        target = fixed_target(f, params, x, target)
        _, grads = _input_path(where, f, params, x, target, cut, baseline, alphas, chunk_size)
        like = first_leaf(grads)
        weight = torch.tensor(weights, dtype=like.dtype, device=like.device)
        return tree_map(lambda g: torch.tensordot(weight, g, dims=1), grads)

    config = {"steps": steps, "baseline": baseline, "method": method, "chunk_size": chunk_size}
    return _build(where, f, layer, attribute_to_layer_input, config, per_cut, tuples=True)


@api_boundary("layers.layer_gradient_shap")
def layer_gradient_shap(f, *, layer, baselines: Tensor, samples: int = 16, sigma: float = 0.0,
                        chunk_size: int | None = None, multiply_by_inputs: bool = True,
                        attribute_to_layer_input: bool = False):
    """Gradient SHAP at a layer (captum's ``LayerGradientShap``).

    For ``k = 1..samples``: a baseline ``b_k`` drawn from ``baselines``, ``alpha_k ~ U(0, 1)``, a
    noisy input ``x_k = x + sigma * eps_k``; the gradient w.r.t. the layer at the input point
    ``alpha_k x_k + (1 - alpha_k) b_k``, times ``body(x_k) - body(b_k)``; the mean over k.

    The explainer is ``explain(params, x, target=None, *, noise=None)``; draws come from torch's
    global generator in the order of :func:`fxattr.expected_gradients` (``index``, ``alpha``,
    ``normal``), and ``noise=dict(index=..., alpha=..., normal=...)`` replays given draws.

    Example:
        >>> explain = fxattr.layers.layer_gradient_shap(f, layer="layer2", baselines=refs, samples=8)
        >>> torch.vmap(explain, in_dims=(None, 0, 0), randomness="different")(params, images, labels)
    """
    where = "layers.layer_gradient_shap"
    if not isinstance(baselines, Tensor) or baselines.ndim < 1 or baselines.shape[0] < 1 \
            or not baselines.dtype.is_floating_point:
        raise fail(where, "baselines must be a floating-point tensor (N, *x.shape) of N >= 1 baselines")
    check_int(where, "samples", samples, 1)
    check_int(where, "chunk_size", chunk_size, 1, allow_none=True)
    sigma = float(check_finite(where, "sigma", sigma, minimum=0))
    check_bool(where, "multiply_by_inputs", multiply_by_inputs)
    count = baselines.shape[0]

    def per_cut(cut, params, x, target, noise=None):
        if tuple(baselines.shape[1:]) != tuple(x.shape):
            raise fail(where, f"baselines have shape {tuple(baselines.shape)}; expected (N, "
                              f"{', '.join(map(str, x.shape))}) for x of shape {tuple(x.shape)}")
        if noise is None:
            noise = {"index": torch.randint(count, (samples,), device=x.device),
                     "alpha": torch.rand(samples, dtype=x.dtype, device=x.device)}
            if sigma > 0:
                noise["normal"] = torch.randn((samples, *x.shape), dtype=x.dtype, device=x.device)
        elif not isinstance(noise, dict) or "index" not in noise or "alpha" not in noise \
                or (sigma > 0 and "normal" not in noise):
            raise fail(where, "noise must be a dict with 'index' and 'alpha' (and 'normal' when sigma > 0)")
        target = fixed_target(f, params, x, target)
        drawn = baselines.to(dtype=x.dtype, device=x.device).index_select(0, noise["index"].to(x.device))
        alpha = noise["alpha"].to(dtype=x.dtype)

        def one(b, t, eps):
            xk = x if eps is None else x + sigma * eps
            point = t * xk + (1 - t) * b  # captum's _scale_input
            g = grad_at_layer(where, cut.head, params, point, cut.body(params, point), target)
            if not multiply_by_inputs:
                return g
            return tree_map(lambda ax, ab, gk: (ax - ab) * gk, cut.body(params, xk), cut.body(params, b), g)

        if sigma > 0:
            terms = torch.vmap(one, chunk_size=chunk_size)(drawn, alpha, noise["normal"].to(x.dtype))
        else:
            terms = torch.vmap(lambda b, t: one(b, t, None), chunk_size=chunk_size)(drawn, alpha)
        return tree_map(lambda t: t.mean(0), terms)

    config = {"baselines": tuple(baselines.shape), "samples": samples, "sigma": sigma,
              "chunk_size": chunk_size, "multiply_by_inputs": multiply_by_inputs}
    return _build(where, f, layer, attribute_to_layer_input, config, per_cut, tuples=True)


def _graph_method(where, f, layer, attribute_to_layer_input, config, make, prepare=None, tuples=False):
    """A graph-based explainer (``make(head_model, baseline)``) run on the head's own graph with
    ``(activation, x)`` as its input (a layer of several parts: ``(*parts, x)``); the
    activation's part of the result is returned."""

    def per_cut(cut, params, x, target):
        a = cut.body(params, x)
        inner = make(cut, params, x)
        return cut.activation_part(inner(params, cut.head_input(a, x), target))

    return _build(where, f, layer, attribute_to_layer_input, config, per_cut, prepare=prepare, tuples=tuples)


@api_boundary("layers.layer_deeplift")
def layer_deeplift(f, *, layer, baseline=0.0, rule: str = "rescale", eps: float = 1e-10,
                   multiply_by_inputs: bool = True, attribute_to_layer_input: bool = False):
    """DeepLIFT attributions of the layer's units (captum's ``LayerDeepLift``).

    :func:`fxattr.deeplift` on the head's graph, a model of ``(activation, x)``, from the reference
    ``(body(baseline), baseline)``: ``(a - a_b) * m`` with the multipliers ``m`` of the layers
    after the cut. ``multiply_by_inputs=False`` returns the multipliers ``m`` alone (captum's
    ``LayerDeepLift(multiply_by_inputs=False)``).

    Example:
        >>> explain = fxattr.layers.layer_deeplift(f, layer="features.3")
        >>> torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
    """
    where = "layers.layer_deeplift"
    check_layer_baseline(where, baseline)
    check_bool(where, "multiply_by_inputs", multiply_by_inputs)
    check_choice(where, "rule", rule, ("rescale", "reveal_cancel"))
    check_finite(where, "eps", eps, minimum=0)
    from fxattr import deeplift

    def make(cut, params, x):
        base = input_baseline(where, baseline, x)
        reference = cut.head_input(cut.body(params, base), base)
        return deeplift(cut.head_model, baseline=lambda _: reference, rule=rule, eps=eps,
                        multiply_by_inputs=multiply_by_inputs)

    config = {"baseline": baseline, "rule": rule, "eps": eps, "multiply_by_inputs": multiply_by_inputs}
    return _graph_method(where, f, layer, attribute_to_layer_input, config, make, tuples=True)


@api_boundary("layers.layer_deeplift_shap")
def layer_deeplift_shap(f, *, layer, baselines: Tensor, rule: str = "rescale", eps: float = 1e-10,
                        chunk_size: int | None = None, multiply_by_inputs: bool = True,
                        attribute_to_layer_input: bool = False):
    """DeepLIFT at the layer averaged over a set of input baselines (captum's
    ``LayerDeepLiftShap``): the mean over ``b`` in ``baselines`` of :func:`layer_deeplift`
    (``multiply_by_inputs=False``: the mean of the multipliers, as captum).

    Example:
        >>> explain = fxattr.layers.layer_deeplift_shap(f, layer="features.3", baselines=refs[:8])
        >>> torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
    """
    where = "layers.layer_deeplift_shap"
    if not isinstance(baselines, Tensor) or baselines.ndim < 1 or baselines.shape[0] < 1 \
            or not baselines.dtype.is_floating_point:
        raise fail(where, "baselines must be a floating-point tensor (K, *x.shape) of K >= 1 baselines")
    check_choice(where, "rule", rule, ("rescale", "reveal_cancel"))
    check_finite(where, "eps", eps, minimum=0)
    check_int(where, "chunk_size", chunk_size, 1, allow_none=True)
    check_bool(where, "multiply_by_inputs", multiply_by_inputs)
    from fxattr import deeplift_shap

    def make(cut, params, x):
        if tuple(baselines.shape[1:]) != tuple(x.shape):
            raise fail(where, f"baselines have shape {tuple(baselines.shape)}; expected (K, "
                              f"{', '.join(map(str, x.shape))}) for x of shape {tuple(x.shape)}")
        bases = baselines.to(dtype=x.dtype, device=x.device)
        acts = torch.vmap(lambda b: cut.body(params, b))(bases)
        references = cut.head_input(acts, bases)
        return deeplift_shap(cut.head_model, baselines=lambda _: references, rule=rule, eps=eps,
                             chunk_size=chunk_size, multiply_by_inputs=multiply_by_inputs)

    config = {"baselines": tuple(baselines.shape), "rule": rule, "eps": eps, "chunk_size": chunk_size,
              "multiply_by_inputs": multiply_by_inputs}
    return _graph_method(where, f, layer, attribute_to_layer_input, config, make, tuples=True)


@api_boundary("layers.layer_lrp")
def layer_lrp(f, *, layer, rule=None, composite=None, attribute_to_layer_input: bool = False,
              **options):
    """LRP relevance of the layer's units (captum's ``LayerLRP``): :func:`fxattr.lrp` with the
    same ``rule`` / ``composite`` / options on the head's graph; the relevance that reaches the
    activation (the layer's output, or with ``attribute_to_layer_input=True`` its input, the layer
    itself then propagated by its rule). captum's default rules are ``rule="epsilon",
    epsilon=1e-9``.

    Example:
        >>> explain = fxattr.layers.layer_lrp(f, layer="features.3", rule="epsilon", epsilon=1e-9)
        >>> torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
    """
    where = "layers.layer_lrp"
    from fxattr import lrp
    built = {}

    def prepare(cut):  # the rules are checked and planned on the head's graph once, here
        built[id(cut)] = lrp(cut.head_model, rule=rule, composite=composite, **options)

    def make(cut, params, x):
        return built[id(cut)]

    config = {"rule": rule, "composite": composite, **options}
    return _graph_method(where, f, layer, attribute_to_layer_input, config, make, prepare=prepare, tuples=True)


@contextlib.contextmanager
def _layer_mask_errors():
    """feature_ablation's errors about its ``feature_mask`` and its ``x`` (here the activation)
    in the words of layer_feature_ablation: ``layer_mask`` and the layer's activation."""
    try:
        yield
    except FxattrError as error:
        error.message = re.sub(r"\bfeature_mask\b", "layer_mask", error.message).replace(
            "x's shape", "the layer's activation shape")
        raise


@api_boundary("layers.layer_feature_ablation")
def layer_feature_ablation(f, *, layer, layer_mask: Tensor | None = None, baseline=0.0,
                           chunk_size: int | None = 8, attribute_to_layer_input: bool = False):
    """Feature ablation of the layer's units (captum's ``LayerFeatureAblation``): each group of
    units sharing an id in ``layer_mask`` (default: every unit alone) is replaced by ``baseline``
    (captum's ``layer_baselines``, a number or a tensor of the activation's shape) and the head is
    rerun on x; the attribution of a unit is ``f(x)[t]`` minus the output with its group
    ablated. :func:`fxattr.feature_ablation` of the head as a model of the activation.

    Example:
        >>> explain = fxattr.layers.layer_feature_ablation(f, layer="layer4")
        >>> torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
    """
    where = "layers.layer_feature_ablation"
    from fxattr import feature_ablation
    check_int(where, "chunk_size", chunk_size, 1, allow_none=True)

    def model_of(cut):
        def g(params_x, a):
            return cut.head(params_x[0], params_x[1], a)
        return g

    ablations = {}

    def prepare(cut):  # feature_ablation checks its configuration here, once
        with _layer_mask_errors():
            ablations[id(cut)] = feature_ablation(model_of(cut), feature_mask=layer_mask, baseline=baseline,
                                                  chunk_size=chunk_size)

    def per_cut(cut, params, x, target):
        a = cut.body(params, x)
        if target is None:
            target = fixed_target(f, params, x, target)
        with _layer_mask_errors():
            return ablations[id(cut)]((params, x), a, target)

    config = {"layer_mask": layer_mask, "baseline": baseline, "chunk_size": chunk_size}
    return _build(where, f, layer, attribute_to_layer_input, config, per_cut, integer_x=takes_token_ids(f), prepare=prepare,
                  tuples=True)
