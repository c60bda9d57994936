"""DeepLIFT (Shrikumar et al. 2017) as an explicit reverse pass over the traced graph.

DeepLIFT propagates *multipliers* ``m = d(delta out) / d(delta in)`` from the explained output back
to the input and returns ``m * (x - baseline)``. Linear nodes (convolutions, linear layers, batch
norm, pooling by averages, additions, routing) pass multipliers as the gradient does, because for
them ``delta out = J delta in`` exactly; non-linearities use the differences of one forward pass at
``x`` and one at the baseline (both evaluated by ``torch.vmap`` in one call):

- ``rule="rescale"``: ``m_in = m_out * delta y / delta x`` element-wise, falling back to the
  gradient where ``|delta x| < eps`` (captum's convention, ``eps = 1e-10``);
- ``rule="reveal_cancel"``: for an activation fed by a kernel layer (linear, convolution, batch
  norm), the positive and negative parts of the layer's input differences get separate multipliers
  (the paper's Sec. 3.5.3); other activations use rescale;
- max pooling as captum's DeepLift does it: the output difference is split at
  ``max(pool(x), pool(baseline))`` and routed back through the winners at ``x`` and at the
  baseline, divided by the input difference.

Summation-to-delta holds for both rules: the attributions sum to ``f(x)[t] - f(baseline)[t]`` (for
a callable target, to the change of its linearisation at ``x``).

The reverse pass is plain torch ops and ``torch.func.vjp`` on the one engine's program of the graph
(:class:`fxattr.graph.Program`; no LRP rules are built): no hooks, no custom autograd functions,
so the explanation composes with ``torch.vmap``, ``torch.func.grad`` and ``torch.compile``.
"""

from __future__ import annotations

import inspect

import optree
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxattr._explainer import check_choice, check_int, check_model, explainer, tree_map
from fxattr.errors import FxattrError, fail
from fxattr.gradients._integrated import check_baseline, make_baseline
from fxattr.graph import Program, input_names
from fxattr.graph._capture import bind
from fxattr.propagation._engine import BUILTIN_KINDS, reverse_for
from fxattr.targets import check_target, select

__all__ = ["deeplift", "deeplift_shap"]

RULES = ("rescale", "reveal_cancel")
_LINEAR_LAYERS = ("kernel", "batchnorm")


def _program(where: str, f, inputs=None) -> Program:
    check_model(where, f)
    registered = reverse_for("deeplift")  # loads the registered kinds before classifying
    try:
        program = Program(f, where, inputs=inputs)
    except FxattrError as error:
        message = str(error)
        if message.startswith(f"fxattr.{where}:"):
            raise
        raise fail(where, message.removeprefix("fxattr.")) from error

    def supported(node, info):
        if info.kind in registered:
            return True
        # ``x * x`` is not a scaling by a constant (one distinct data input, two references)
        return info.kind in BUILTIN_KINDS and not (info.kind == "scale" and program.data_refs(node) > 1)
    program.check("DeepLIFT", supported, "Supported: linear and convolution layers, batch norm, "
                  "element-wise activations, max/average pooling, additions, scaling by constants and "
                  "routing ops (cat, view, ...)")
    return program


def _safe_ratio(num: Tensor, den: Tensor, fallback: Tensor, eps: float) -> Tensor:
    """``num / den`` where ``|den| >= eps``, ``fallback`` elsewhere (no inf/nan in either branch,
    so derivatives through ``torch.where`` stay finite). ``eps`` is raised to ``finfo.max ** -0.5``
    in float16 (1e-10 rounds to 0 there and the ratio would overflow)."""
    small = den.abs() < max(eps, torch.finfo(den.dtype).max ** -0.5)
    return torch.where(small, fallback, num / torch.where(small, 1.0, den))


# ``g * f'(x)`` of the common activations from the forward values (x its input, y its output),
# without re-evaluating the activation through a vjp: the same formulas autograd uses, as aten's
# backward kernels (one fused pass each; all of them differentiable again, so second-order
# derivatives of an explanation stay exact) or, for SiLU (whose aten backward is not
# differentiable), its closed form f' = s + y (1 - s) with s = sigmoid(x).
_ATEN = torch.ops.aten


def _relu_slope(g, x, y):
    return _ATEN.threshold_backward(g, y, 0)


def _silu_slope(g, x, y):
    return g * torch.addcmul(y, torch.sigmoid(x), 1 - y)


def _sigmoid_slope(g, x, y):
    return _ATEN.sigmoid_backward(g, y)


def _tanh_slope(g, x, y):
    return _ATEN.tanh_backward(g, y)


def _hardswish_slope(g, x, y):
    return _ATEN.hardswish_backward(g, x)


def _gelu_slope(approximate):
    def slope(g, x, y):
        return _ATEN.gelu_backward(g, x, approximate=approximate)
    return slope


_SLOPE_MODULES = {nn.ReLU: _relu_slope, nn.SiLU: _silu_slope, nn.Sigmoid: _sigmoid_slope, nn.Tanh: _tanh_slope,
                  nn.Hardswish: _hardswish_slope}
_SLOPE_FUNCTIONS = {F.relu: _relu_slope, torch.relu: _relu_slope, "relu": _relu_slope, F.silu: _silu_slope,
                    torch.sigmoid: _sigmoid_slope, F.sigmoid: _sigmoid_slope, "sigmoid": _sigmoid_slope,
                    torch.tanh: _tanh_slope, F.tanh: _tanh_slope, "tanh": _tanh_slope,
                    F.hardswish: _hardswish_slope}


def _closed_form_slope(node, module):
    """``slope(g, x, y) = g * f'(x)`` for an activation node whose derivative has a fused form
    (exact module types only: a subclass may override ``forward``), else ``None`` (the vjp)."""
    if node.op == "call_module":
        if type(module) is nn.GELU:
            return _gelu_slope(module.approximate)
        return _SLOPE_MODULES.get(type(module))
    if len(node.args) != 1 or any(k != "inplace" for k in node.kwargs):
        if node.target is F.gelu and len(node.args) == 1 and set(node.kwargs) <= {"approximate"} \
                and node.kwargs.get("approximate", "none") in ("none", "tanh"):
            return _gelu_slope(node.kwargs.get("approximate", "none"))
        return None
    if node.target is F.gelu:
        return _gelu_slope("none")
    return _SLOPE_FUNCTIONS.get(node.target)


class _DeepLift:
    def __init__(self, f, where: str, rule: str, eps: float, inputs=None, softmax: str = "exact"):
        self.f = f
        self.program = program = _program(where, f, inputs)
        self.rule = rule
        self.eps = eps
        self.softmax = softmax
        self.where = where
        self.variants: dict = {}
        self.registered = reverse_for("deeplift")
        nodes = program.nodes
        self.slopes = {program.slot_of[node]: slope for node in program.path
                       if nodes[node].kind == "activation" and len(nodes[node].data_args) == 1
                       and (slope := _closed_form_slope(node, nodes[node].module)) is not None}
        # reveal-cancel pairs: activation -> the kernel layer feeding it (through a folded batch norm)
        self.pairs: dict = {}
        if rule == "reveal_cancel":
            for node in program.graph_nodes:
                if nodes[node].kind != "activation" or node not in program.path:
                    continue
                source = node.args[0]
                if nodes[source].kind == "folded" and len(source.users) == 1:
                    source = source.args[0]
                if nodes[source].kind in _LINEAR_LAYERS and len(source.users) == 1 \
                        and nodes[source].layer is not None:
                    self.pairs[program.slot_of[node]] = program.step_of[program.slot_of[source]]

    def __call__(self, params, x, base, target, multiply=True, delta=False):
        names = input_names(self.f, x)
        if names is not None and names != self.program.inputs:
            if names not in self.variants:
                self.variants[names] = _DeepLift(self.f, self.where, self.rule, self.eps, names, self.softmax)
            return self.variants[names](params, x, base, target, multiply, delta)
        program = self.program
        params = bind(program.gm, params)  # tied parameters under each of their names
        at_x, at_b = program.pair_forward(params, x, base)
        y = program.output_of(program.raw_output(at_x))[0]
        grad = torch.func.grad(lambda t: select(self.where, t, target))(y)
        seeds = program.seed(at_x, grad)

        def override(st, g):
            if st.kind == "softmax" and self.softmax == "rescale":
                return self._softmax_rescale(st, params, at_x, at_b, g)
            if st.kind in self.registered:
                view = program.view(st, at_x, params, reference=at_b)
                return list(zip(st.data_slots, _tuple(self.registered[st.kind](view, g))))
            if st.kind == "activation":
                if st.slot in self.pairs:
                    return self._reveal_cancel(st, self.pairs[st.slot], params, at_x, at_b, g)
                return self._rescale(st, params, at_x, at_b, g)
            if st.kind == "maxpool":
                return self._maxpool(st, params, at_x, at_b, g)
            return None

        grads = program.reverse(params, at_x, None, seeds, override)
        attributions = program.to_input(x, at_x, grads, lambda g, i: g * (at_x[i][0] - at_b[i][0]))
        result = attributions if multiply else program.to_input(x, at_x, grads, lambda g, i: g)
        if not delta:
            return result
        # the summation-to-delta error of the attributions m * (x - baseline)
        y_base = program.output_of(program.raw_output(at_b))[0]
        total = sum(t.sum() for t in optree.tree_leaves(attributions, namespace="torch"))
        return result, total - (select(self.where, y, target) - select(self.where, y_base, target))

    def _rescale(self, st, params, at_x, at_b, g):
        x, y = at_x[st.x], at_x[st.slot]
        slope = self.slopes.get(st.slot)
        if slope is not None:  # the gradient from the stored values, no re-evaluation
            gradient = slope(g, x, y)
        else:
            (_, gradient), = self.program.vjp(st, at_x, params, g)
        return [(st.x, _safe_ratio(g * (y - at_b[st.slot]), x - at_b[st.x], gradient, self.eps))]

    def _softmax_rescale(self, st, params, at_x, at_b, g):
        # captum's softmax rule: element-wise rescale (the softmax's own vjp where |delta x| < eps),
        # then the mean multiplier subtracted (softmax is invariant to a shift of its input)
        x = st.data_slots[0]
        (_, gradient), = self.program.vjp(st, at_x, params, g)
        m = _safe_ratio(g * (at_x[st.slot] - at_b[st.slot]), at_x[x] - at_b[x], gradient, self.eps)
        return [(x, m - m.mean())]

    def _maxpool(self, st, params, at_x, at_b, g):
        # captum's rule: split the output difference at the cross maximum and route each part
        # through the winners of its own forward pass.
        x = st.data_slots[0]
        out, ref = at_x[st.slot], at_b[st.slot]
        cross = torch.maximum(out, ref)
        (_, gradient), = self.program.vjp(st, at_x, params, g)
        (_, via_x), = self.program.vjp(st, at_x, params, g * (cross - ref))
        (_, via_b), = self.program.vjp(st, at_b, params, g * (out - cross))
        dx = at_x[x] - at_b[x]
        return [(x, _safe_ratio(via_x + via_b, dx, gradient, self.eps))]

    def _reveal_cancel(self, st, layer_st, params, at_x, at_b, g):
        program, eps = self.program, self.eps
        inp = layer_st.x
        layer = layer_st.layer
        w = layer_st.kernel_params(params, at_x)["weight"]
        plus = {"weight": w.clamp(min=0), "bias": None}
        minus = {"weight": w.clamp(max=0), "bias": None}
        dx = at_x[inp] - at_b[inp]
        dx_pos, dx_neg = dx.clamp(min=0), dx.clamp(max=0)
        # the positive and negative parts of the pre-activation's difference
        dz_pos = layer.forward(dx_pos, plus) + layer.forward(dx_neg, minus)
        dz_neg = layer.forward(dx_pos, minus) + layer.forward(dx_neg, plus)
        act, (z0,) = program.bound(st, at_b, params)
        y0, y1 = at_b[st.slot], at_x[st.slot]
        y_pos, y_neg = act(z0 + dz_pos), act(z0 + dz_neg)
        dy_pos = 0.5 * (y_pos - y0) + 0.5 * (y1 - y_neg)
        dy_neg = 0.5 * (y_neg - y0) + 0.5 * (y1 - y_pos)
        # where a part vanishes its multiplier does not matter: the activation's slope at x
        (_, slope), = program.vjp(st, at_x, params, torch.ones_like(g))
        g_pos = g * _safe_ratio(dy_pos, dz_pos, slope, eps)
        g_neg = g * _safe_ratio(dy_neg, dz_neg, slope, eps)
        x_in = at_x[inp]
        up = layer.transpose(g_pos, plus, x_in) + layer.transpose(g_neg, minus, x_in)
        down = layer.transpose(g_pos, minus, x_in) + layer.transpose(g_neg, plus, x_in)
        return [(inp, torch.where(dx >= 0, up, down))]


def _tuple(result):
    return (result,) if isinstance(result, Tensor) or result is None else tuple(result)


SOFTMAX = ("exact", "rescale")


def _check_eps(where, eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise fail(where, f"eps must be a positive number, got {eps!r}")


def _check_options(where, softmax, multiply_by_inputs, return_convergence_delta, custom_attribution):
    """The public options shared by :func:`deeplift` and :func:`deeplift_shap`; returns the custom
    attribution function's arity (0 without one)."""
    check_choice(where, "softmax", softmax, SOFTMAX)
    for name, value in (("multiply_by_inputs", multiply_by_inputs),
                        ("return_convergence_delta", return_convergence_delta)):
        if not isinstance(value, bool):
            raise fail(where, f"{name} must be True or False, got {value!r}")
    if custom_attribution is None:
        return 0
    if not callable(custom_attribution) or isinstance(custom_attribution, Tensor):
        raise fail(where, "custom_attribution must be a callable (multipliers[, x[, baseline]]) -> "
                          f"attributions, got {type(custom_attribution).__name__}")
    try:
        parameters = inspect.signature(custom_attribution).parameters.values()
    except (TypeError, ValueError):
        return 3
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return 3
    if not 1 <= len(positional) <= 3:
        raise fail(where, "custom_attribution must take 1 to 3 positional arguments (multipliers, x, "
                          f"baseline), as captum's custom_attribution_func; it takes {len(positional)}")
    return len(positional)


def _attribute(where, engine, params, x, base, target, multiply, delta, custom, arity):
    """One DeepLIFT explanation with the public options applied."""
    if custom is None:
        return engine(params, x, base, target, multiply, delta)
    result = engine(params, x, base, target, False, delta)
    multipliers, error = result if delta else (result, None)
    attributions = custom(*(multipliers, x, base)[:arity])
    leaves = optree.tree_leaves(attributions, namespace="torch")
    if not leaves or not all(isinstance(t, Tensor) for t in leaves):
        raise fail(where, "custom_attribution must return a tensor or a pytree of tensors, got "
                          f"{type(attributions).__name__}")
    x_leaves, x_structure = optree.tree_flatten(x, namespace="torch")
    structure = optree.tree_structure(attributions, namespace="torch")
    if structure != x_structure or any(a.shape != xi.shape for a, xi in zip(leaves, x_leaves)):
        # the result is returned (deeplift_shap: averaged over baselines) as x's attributions:
        # one of another structure or shape would pass through silently as a wrong result
        def described(items, spec):
            if spec.is_leaf():
                return f"a tensor of shape {tuple(items[0].shape)}"
            return (f"a {spec.type.__name__} of {spec.num_leaves} tensors of shapes "
                    f"{', '.join(str(tuple(t.shape)) for t in items)}")

        raise fail(where, "custom_attribution must return attributions of x's structure and shapes "
                          f"({described(x_leaves, x_structure)}), got {described(leaves, structure)}")
    return (attributions, error) if delta else attributions


def deeplift(f, *, baseline=0.0, rule: str = "rescale", eps: float = 1e-10, softmax: str = "exact",
             multiply_by_inputs: bool = True, return_convergence_delta: bool = False,
             custom_attribution=None):
    """DeepLIFT attributions ``m * (x - baseline)`` with multipliers ``m`` from a reverse pass.

    One vmapped forward pass evaluates the model at ``x`` and at the baseline; the reverse pass
    treats linear nodes by their gradient and non-linearities by ``rule`` (see the module doc).
    The attributions sum to ``f(x)[target] - f(baseline)[target]`` (summation-to-delta). With the
    rescale rule, values match captum's ``DeepLift`` on models of ReLU/Tanh/Sigmoid/... modules and
    max pooling. ``target=None`` explains the argmax at ``x``.

    Args:
        f: the function of ``fxattr.functionalize`` (the model must be traceable by ``torch.fx``).
        baseline: a number, a tensor of x's shape, a pytree of those matching x, or a callable
            ``x -> baseline`` (as in :func:`fxattr.integrated_gradients`).
        rule: ``"rescale"`` or ``"reveal_cancel"``.
        eps: below this ``|delta x|`` a non-linearity passes its gradient (captum: 1e-10).
        softmax: ``"exact"`` (default: the exact multipliers of softmax, summation-to-delta holds)
            or ``"rescale"`` (captum's ``DeepLift`` treatment of ``nn.Softmax``: element-wise
            rescale ``m * delta y / delta x``, then the mean multiplier subtracted, as the DeepLIFT
            paper recommends for softmax inputs; summation-to-delta then holds only when the
            softmax input's differences sum to 0). captum subtracts the mean over the whole batch
            of inputs and baselines; fxattr over the one example, equal to captum at batch 1.
            captum applies it to ``nn.Softmax`` modules only (``torch.softmax`` calls get the plain
            gradient there); fxattr to every softmax of the graph.
        multiply_by_inputs: ``False`` returns the multipliers ``m`` themselves (captum's
            ``multiply_by_inputs=False``, the "global" attributions).
        return_convergence_delta: also return ``sum(m * (x - baseline)) - (f(x)[t] -
            f(baseline)[t])``, the summation-to-delta error (captum's convergence delta).
        custom_attribution: a callable ``(multipliers[, x[, baseline]]) -> attributions``
            replacing ``m * (x - baseline)`` (captum's ``custom_attribution_func``; e.g. the
            hypothetical contributions of one-hot sequences). It gets one example's tensors (x's
            structure), so it must work under ``torch.vmap``. ``multiply_by_inputs`` is then
            ignored, and the convergence delta is still that of ``m * (x - baseline)``.

    Returns:
        ``explain(params, x, target)`` -> attributions of x's structure, or
        ``(attributions, delta)`` with ``return_convergence_delta``.

    Example:
        >>> explain = fxattr.deeplift(f, baseline=0.0)
        >>> attributions = torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
        >>> fast = torch.compile(torch.vmap(explain, in_dims=(None, 0, 0)))
        >>> hypothetical = fxattr.deeplift(f, custom_attribution=lambda m, x, b: m - (m * x).sum(0))
    """
    where = "deeplift"
    check_model(where, f)
    check_choice(where, "rule", rule, RULES)
    _check_eps(where, eps)
    try:
        check_baseline(baseline)
    except FxattrError as error:
        raise fail(where, str(error).split(": ", 1)[1]) from error
    arity = _check_options(where, softmax, multiply_by_inputs, return_convergence_delta, custom_attribution)
    engine = _DeepLift(f, where, rule, eps, softmax=softmax)

    def explain(params, x, target=None):
        check_target(where, target)
        base = make_baseline(where, baseline, x)
        return f.guarded(x, lambda: _attribute(where, engine, params, x, base, target, multiply_by_inputs,
                                               return_convergence_delta, custom_attribution, arity), where)

    config = {"baseline": baseline, "rule": rule, "eps": eps, "softmax": softmax,
              "multiply_by_inputs": multiply_by_inputs, "return_convergence_delta": return_convergence_delta,
              "custom_attribution": custom_attribution}
    return explainer(where, f, config, explain)


def deeplift_shap(f, *, baselines, rule: str = "rescale", eps: float = 1e-10, softmax: str = "exact",
                  chunk_size: int | None = None, multiply_by_inputs: bool = True,
                  return_convergence_delta: bool = False, custom_attribution=None):
    """DeepLIFT averaged over a set of baselines (captum's ``DeepLiftShap``).

    Each baseline gets its own DeepLIFT explanation (vmapped over the baselines, ``chunk_size`` at a
    time), and the mean is returned; the attributions sum to ``f(x)[t] - mean_k f(b_k)[t]``.

    Args:
        f: the function of ``fxattr.functionalize``.
        baselines: a tensor ``(K, *x.shape)`` of K >= 1 baselines (a pytree of those for pytree
            inputs), or a callable ``x -> baselines``.
        rule, eps, softmax: as in :func:`deeplift`.
        chunk_size: how many baselines are explained at once (``None``: all).
        multiply_by_inputs: ``False`` returns the mean of the multipliers over the baselines
            (captum's ``DeepLiftShap(multiply_by_inputs=False)``).
        return_convergence_delta: also return the ``(K,)`` summation-to-delta errors, one per
            baseline (captum returns them for every (example, baseline) pair: ``(B * K,)``, which
            is this ``(B, K)`` flattened).
        custom_attribution: as in :func:`deeplift`, applied per baseline before the mean (as captum).

    Returns:
        ``explain(params, x, target)`` -> attributions of x's structure, or
        ``(attributions, delta)`` with ``return_convergence_delta``.

    Example:
        >>> explain = fxattr.deeplift_shap(f, baselines=background[:16])
        >>> attributions = torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
    """
    where = "deeplift_shap"
    check_model(where, f)
    check_choice(where, "rule", rule, RULES)
    _check_eps(where, eps)
    check_int(where, "chunk_size", chunk_size, 1, allow_none=True)
    arity = _check_options(where, softmax, multiply_by_inputs, return_convergence_delta, custom_attribution)
    leaves = optree.tree_leaves(baselines, namespace="torch")
    if not (callable(baselines) and not isinstance(baselines, Tensor)) and (
            not leaves or not all(isinstance(t, Tensor) and t.ndim >= 1 and t.shape[0] >= 1 for t in leaves)):
        raise fail(where, "baselines must be a tensor (K, *x.shape) of K >= 1 baselines, a pytree of "
                          f"those, or a callable x -> baselines; got {type(baselines).__name__}")
    engine = _DeepLift(f, where, rule, eps, softmax=softmax)

    def explain(params, x, target=None):
        check_target(where, target)
        if not torch.compiler.is_compiling():
            f.check_input(x, where)
        bases = baselines(x) if callable(baselines) and not isinstance(baselines, Tensor) else baselines

        def check(b, xi):
            if tuple(b.shape[1:]) != tuple(xi.shape):
                raise fail(where, f"baselines have shape {tuple(b.shape)}; expected (K, "
                                  f"{', '.join(map(str, xi.shape))}) for x of shape {tuple(xi.shape)}")
            return b.to(dtype=xi.dtype, device=xi.device)
        bases = tree_map(check, bases, x)
        if target is None:  # the argmax at x, the same for every baseline
            target = f(params, x).detach().reshape(-1).argmax()
        result = torch.vmap(lambda b: _attribute(where, engine, params, x, b, target, multiply_by_inputs,
                                                 return_convergence_delta, custom_attribution, arity),
                            chunk_size=chunk_size)(bases)
        if return_convergence_delta:
            attributions, delta = result
            return tree_map(lambda a: a.mean(0), attributions), delta
        return tree_map(lambda a: a.mean(0), result)

    config = {"baselines": baselines, "rule": rule, "eps": eps, "softmax": softmax, "chunk_size": chunk_size,
              "multiply_by_inputs": multiply_by_inputs, "return_convergence_delta": return_convergence_delta,
              "custom_attribution": custom_attribution}
    return explainer(where, f, config, explain)
