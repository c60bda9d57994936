"""Neuron attributions (captum's ``Neuron*`` family) through ONE mechanism: the model's body up to
a layer, as a model whose output is the layer's activation.

``fxattr.layers.neuron(f, layer=...)`` returns ``f_layer(params, x) -> activation`` (a functional
model of the cut graph, called with the full ``params``), and a neuron is then simply a TARGET of
it: a flat index into the activation (an ``int``, or a 0-d integer tensor, so ``torch.vmap`` over
neuron indices explains many neurons in one call), or a callable ``activation -> scalar``
(captum's callable ``neuron_selector``). Every input explainer takes it unchanged::

    f_layer = fxattr.layers.neuron(f, layer="layer2")
    fxattr.gradient(f_layer)                 # captum NeuronGradient
    fxattr.integrated_gradients(f_layer)     # NeuronIntegratedGradients
    fxattr.deeplift(f_layer)                 # NeuronDeepLift (graph-based: the body's own graph)
    fxattr.deeplift_shap(f_layer, ...)       # NeuronDeepLiftShap
    fxattr.gradient_shap(f_layer, ...)       # NeuronGradientShap
    fxattr.guided_backprop(f_layer, seed="one"), fxattr.deconvnet(f_layer, seed="one")
    fxattr.feature_ablation(f_layer)         # NeuronFeatureAblation

A captum tuple index ``(c, h, w)`` is :func:`flat_index` of it. Conductance through a neuron needs
the model's target as well as the neuron, so it is its own explainer,
:func:`neuron_conductance`, ``explain(params, x, target, neuron)``.
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch import Tensor

from fxattr._explainer import check_bool, check_int, explainer, fixed_target
from fxattr.errors import FxattrError, api_boundary, fail
from fxattr.layers._cut import cuts
from fxattr.layers._layer import (
    check_layer_baseline,
    grad_at_layer,
    guarded,
    input_baseline,
    quadrature_points,
)
from fxattr.targets import check_target, select

__all__ = ["flat_index", "neuron", "neuron_conductance"]


@api_boundary("layers.neuron")
def neuron(f, *, layer, attribute_to_layer_input: bool = False):
    """The model up to ``layer``: ``f_layer(params, x) -> activation`` of one example, whose
    targets are the layer's neurons (flat indices, or a callable on the activation).

    It is a functional model of the body's own graph (graph-based explainers work on it) that
    reads only the parameters it uses, so it is called with the model's full ``params``.

    Args:
        f: the function of ``fxattr.functionalize``.
        layer: a module name, a graph node name, or a submodule (one layer).
        attribute_to_layer_input: the value the layer reads (captum's ``attribute_to_neuron_input``).

    Example:
        >>> f_layer = fxattr.layers.neuron(f, layer="layer2")
        >>> explain = fxattr.integrated_gradients(f_layer, steps=16)
        >>> units = torch.arange(8)  # eight neurons of one image in one call
        >>> maps = torch.vmap(explain, in_dims=(None, None, 0))(params, image, units)
    """
    where = "layers.neuron"
    check_bool(where, "attribute_to_layer_input", attribute_to_layer_input)
    layer_cuts, many = cuts(where, f, layer, attribute_to_layer_input)
    if many and len(layer_cuts) != 1:
        raise fail(where, f"layer must be one layer, got a list of {len(layer_cuts)}")
    return layer_cuts[0].body_model


@api_boundary("layers.flat_index")
def flat_index(shape, index) -> int:
    """The flat index of the unit ``index`` (captum's tuple ``neuron_selector``, e.g. ``(c, h, w)``)
    in an activation of ``shape`` (one example, no batch axis).

    Example:
        >>> t = fxattr.layers.flat_index((64, 8, 8), (3, 2, 5))
    """
    shape = tuple(int(s) for s in shape)
    index = (index,) if isinstance(index, int) else tuple(index)
    if len(index) != len(shape) or not all(isinstance(i, int) and not isinstance(i, bool) and -s <= i < s
                                           for i, s in zip(index, shape)):
        raise fail("layers.flat_index", f"index {index!r} does not name a unit of an activation of shape {shape}")
    flat = 0
    for i, s in zip(index, shape):
        flat = flat * s + (i % s)
    return flat


@contextlib.contextmanager
def _neuron_errors():
    """The target checks applied to the neuron index, in its words: ``neuron``, an index into the
    layer's activation (not the model's ``target``, which has its own checks)."""
    try:
        yield
    except FxattrError as error:
        message = re.sub(r"\btarget(s?)\b", r"neuron\1", error.message)
        error.message = message.replace("for an output of", "for the layer's activation of")
        raise


@api_boundary("layers.neuron_conductance")
def neuron_conductance(f, *, layer, steps: int = 32, baseline=0.0, method: str = "gausslegendre",
                       chunk_size: int | None = 4, multiply_by_inputs: bool = True,
                       attribute_to_layer_input: bool = False):
    """Conductance of the input through one neuron (Dhamdhere et al. 2018; captum's
    ``NeuronConductance``): ``(x - b) * sum_k w_k (d f[t] / d n)(p_k) (d n / d x)(p_k)`` on the
    input path ``p_k = b + alpha_k (x - b)``.

    The explainer is ``explain(params, x, target, neuron)``: ``target`` the model's output (``None``:
    the argmax at x), ``neuron`` a flat index into the layer's activation (int or 0-d tensor; map
    many with ``torch.vmap(explain, in_dims=(None, None, None, 0))``). captum's default quadrature
    here is ``riemann_trapezoid``, whose weights differ from fxattr's (see
    :func:`fxattr.quadrature`); pass ``method="gausslegendre"`` to captum to compare.

    Example:
        >>> explain = fxattr.layers.neuron_conductance(f, layer="layer2", steps=16)
        >>> torch.vmap(explain, in_dims=(None, None, None, 0))(params, image, 3, torch.arange(4))
    """
    where = "layers.neuron_conductance"
    alphas, weights = quadrature_points(where, method, steps)
    check_int(where, "chunk_size", chunk_size, 1, allow_none=True)
    check_layer_baseline(where, baseline)
    check_bool(where, "multiply_by_inputs", multiply_by_inputs)
    check_bool(where, "attribute_to_layer_input", attribute_to_layer_input)
    layer_cuts, many = cuts(where, f, layer, attribute_to_layer_input)
    if many and len(layer_cuts) != 1:
        raise fail(where, f"layer must be one layer, got a list of {len(layer_cuts)}")
    cut = layer_cuts[0]

    def explain(params, x, target=None, neuron=None):
        check_target(where, target)
        if neuron is None or (callable(neuron) and not isinstance(neuron, Tensor)):
            raise fail(where, "neuron must be a flat index into the layer's activation (an int or a "
                              "0-d integer tensor; fxattr.layers.flat_index converts (c, h, w))")
        with _neuron_errors():
            check_target(where, neuron)
        if not isinstance(x, Tensor):
            raise fail(where, f"x must be one tensor (one example), got {type(x).__name__}")
        return guarded(f, params, x, where, lambda: conductance(params, x, target, neuron))

    def conductance(params, x, target, neuron):
        target = fixed_target(f, params, x, target)
        base = input_baseline(where, baseline, x)
        diff = x - base
        alpha = torch.tensor(alphas, dtype=x.dtype, device=x.device)
        weight = torch.tensor(weights, dtype=x.dtype, device=x.device)

        def at(t):
            point = base + t * diff
            # d n / d x at the point, and the activation for the head's gradient
            def unit(p):
                act = cut.body(params, p)
                with _neuron_errors():
                    return select(where, act, neuron), act

            unit_grad, a = torch.func.grad(unit, has_aux=True)(point)
            head_grad = grad_at_layer(where, cut.head, params, point, a, target)
            with _neuron_errors():
                mid = select(where, head_grad, neuron)
            return mid * unit_grad

        total = torch.tensordot(weight, torch.vmap(at, chunk_size=chunk_size)(alpha), dims=1)
        return diff * total if multiply_by_inputs else total

    config = {"layer": layer, "steps": steps, "baseline": baseline, "method": method,
              "chunk_size": chunk_size, "multiply_by_inputs": multiply_by_inputs,
              "attribute_to_layer_input": attribute_to_layer_input}
    return explainer(where, f, config, explain)
