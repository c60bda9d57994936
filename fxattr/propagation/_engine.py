"""The LRP engine: rules on the one program of the graph.

:class:`Plan` is a :class:`fxattr.graph.Program` (the captured graph classified once by the catalogue
of operation kinds, :mod:`fxattr.graph._ops`; one forward pass storing every value; one reverse walk)
with a rule for every layer: kernel layers (convolutions and dense layers, an eval batch norm
right after one folded into it) and unfolded batch norms get their composite's rule, parameter-free
linear layers (average pooling, means, sums, additions, scaling by constants) the z form of theirs,
element-wise activations pass relevance, max pooling gives it to the winner, routing ops route it.
Nothing is recomputed except where a rule asks for a modified layer; there are no hooks and no
custom autograd functions: the whole explanation is an ordinary differentiable, vmappable,
compilable function of ``(params, x)``.

In "gradient" mode (no composite) the same walk is the gradient with the ReLUs modified: guided
backprop and deconvnet.

Operation kinds registered in the catalogue (``fxattr.graph.register``) are reversed by the
functions of :data:`REVERSE` (``REVERSE[method][kind](view, signal) -> signals per data input``,
``method`` one of ``"lrp"``, ``"deeplift"``, ``"guided"``; ``view`` a :class:`fxattr.graph.NodeView`);
a kind without an entry for a method is an error naming the node, its module and the explainer
(gradient mode falls back to the vector-Jacobian product, which is exact there).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import fx

from fxattr.errors import fail
from fxattr.graph import Program, ops
from fxattr.graph._ops import conv_layer, functional_kernel_layer, linear_layer  # noqa: F401 - re-exported
from fxattr.propagation import rules as R
from fxattr.propagation.composites import Composite, LayerInfo
from fxattr.targets import select

__all__ = ["BUILTIN_KINDS", "REVERSE", "Plan", "load_op_rules", "register_reverse", "reverse_for"]

# method -> {registered kind -> reverse(view, signal) -> [signal per data input]}
REVERSE: dict[str, dict[str, Callable]] = {"lrp": {}, "deeplift": {}, "guided": {}}

BUILTIN_KINDS = ("input", "kernel", "batchnorm", "batchnorm_f", "folded", "activation", "maxpool", "avgpool",
                 "add", "scale", "identity", "route")


def register_reverse(method: str, kind: str, fn: Callable) -> Callable:
    """Registers ``fn(view, signal)`` as ``method``'s reverse of the catalogue kind ``kind``."""
    if method not in REVERSE:
        raise ValueError(f"method must be one of {', '.join(REVERSE)}, got {method!r}")
    REVERSE[method][kind] = fn
    return fn


_loaded = False


def load_op_rules() -> None:
    """Imports :mod:`fxattr.propagation.op_rules` once: it registers the operation kinds of the
    catalogue and their reverse functions. Called before a graph is classified."""
    global _loaded
    if not _loaded:
        _loaded = True
        try:
            importlib.import_module("fxattr.propagation.op_rules")
        except ModuleNotFoundError as error:
            if error.name != "fxattr.propagation.op_rules":
                raise


def reverse_for(method: str) -> dict[str, Callable]:
    """``REVERSE[method]``, with the operation rules loaded."""
    load_op_rules()
    return REVERSE[method]


def _as_pairs(step, result) -> list:
    """A registered reverse function's result (one signal per data input) as ``(slot, signal)``."""
    if isinstance(result, torch.Tensor) or result is None:
        result = (result,)
    result = list(result)
    if len(result) != len(step.data_slots):
        raise fail("lrp", f"the reverse of {step.name!r} returned {len(result)} signals for its "
                          f"{len(step.data_slots)} data inputs")
    return list(zip(step.data_slots, result))


_SCALE_RULE = R.z()


class Plan(Program):
    """The program of ``f`` with a rule for every layer (LRP mode) or modified ReLUs (gradient mode).

    Args:
        f: the function of ``fxattr.functionalize``.
        where: the explainer's name, for errors.
        composite: the rules (LRP mode), or ``None`` for gradient mode.
        relu: gradient mode's ReLU filter: ``"guided"`` or ``"deconvnet"``.
        inputs: the ``forward`` parameters passed (default: the required ones).
    """

    def __init__(self, f, where: str, composite: Composite | None = None, relu: str | None = None,
                 inputs: tuple | None = None):
        load_op_rules()  # registered kinds must be known before the graph is classified
        super().__init__(f, where, inputs=inputs)
        self.composite = composite
        self.relu_mode = relu
        self.registered = reverse_for("lrp" if composite is not None else "guided")
        self._layer_infos()
        self._check_and_assign()

    def rebuild(self, inputs):
        return Plan(self.f, self.where, self.composite, self.relu_mode, inputs=inputs)

    def _layer_infos(self):
        kernels = [n for n, i in self.nodes.items() if i.kind == "kernel"]
        seen_kinds: set[str] = set()
        for index, node in enumerate(kernels):
            info = self.nodes[node]
            kind = info.layer.kind
            info.extra["info"] = LayerInfo(
                kind=kind, module=type(info.module) if info.module is not None else None,
                name=node.target if node.op == "call_module" else node.name, node=node.name,
                index=index, first=index == 0, last=index == len(kernels) - 1,
                input_layer=self._reads_input(ops.kernel_input(node)), first_of_kind=kind not in seen_kinds)
            seen_kinds.add(kind)
        for node, info in self.nodes.items():
            if info.is_data and info.kind in ("batchnorm", "avgpool", "add", "activation", "maxpool",
                                              "batchnorm_f"):
                info.extra["info"] = LayerInfo(
                    kind=info.kind.removesuffix("_f"),
                    module=type(info.module) if info.module is not None else None,
                    name=node.target if node.op == "call_module" else node.name, node=node.name)

    def _reads_input(self, node: fx.Node) -> bool:
        while True:
            info = self.nodes[node]
            if info.kind == "input":
                return True
            if info.kind in ("route", "identity") and len(info.data_args) == 1:
                node = info.data_args[0]
                continue
            return False

    def _check_and_assign(self):
        if self.composite is not None:
            own = self.composite.operations
            self.check("LRP", lambda node, info: info.kind in BUILTIN_KINDS or info.kind in self.registered
                       or info.kind in own,
                       f"Supported: {ops.SUPPORTED}. Make it a leaf of a supported kind or use a "
                       "gradient-based method.")
        for step in self.steps:
            info = step.info
            step.rule = None
            if not step.on_path or self.composite is None or "info" not in info.extra:
                continue
            if info.kind not in ("kernel", "batchnorm", "avgpool", "add", "batchnorm_f"):
                continue
            rule = self.composite.rule(info.extra["info"])
            if not isinstance(rule, R.Rule):
                raise fail(self.where, f"the composite gave {type(rule).__name__} for layer "
                                       f"{step.name!r}; expected an fxattr.propagation.rules.Rule")
            if info.kind in ("avgpool", "add") and rule.name not in ("gradient", "pass") \
                    and rule.stabilise is None:
                raise fail(self.where, f"rule {rule.name!r} cannot be used on the "
                                       f"parameter-free layer {step.name!r}")
            step.rule = rule

    def explain(self, params, x, target, *, seed: str = "value"):
        """Relevance (or modified gradient) at ``x`` for ``target``; ``seed`` is ``"value"``
        (the selected output's value: LRP), ``"positive"`` (its positive part: DeepTaylor) or
        ``"one"`` (gradient-type)."""
        program = self.for_input(x)
        if program is not self:
            return program.explain(params, x, target, seed=seed)
        values, cache, raw = self.f.guarded(x, lambda: self.forward(params, x), self.where)
        y = self.output_of(raw)[0]
        grad = torch.func.grad(lambda t: select(self.where, t, target))(y)
        if seed == "value":
            relevance_y = y * grad
        elif seed == "positive":  # DeepTaylor: iNNvestigate appends a ReLU to the outputs
            relevance_y = y.clamp(min=0) * grad
        else:
            relevance_y = grad
        seeds = self.seed(values, relevance_y)

        def override(step, rel):
            return self._reverse(step, values, cache, params, rel)
        return self.to_input(x, values, self.reverse(params, values, cache, seeds, override))

    def rule_override(self, values, cache, params):
        """``override(step, signal)`` for :meth:`reverse` applying this plan's rules at the forward
        pass ``(values, cache)``: what :meth:`explain` uses, for reverse walks composed outside it
        (CRP stops the walk at a layer, masks the relevance there and continues)."""
        return lambda step, rel: self._reverse(step, values, cache, params, rel)

    def _reverse(self, step, values, cache, params, rel):
        kind = step.kind
        if self.composite is not None and kind in self.composite.operations:  # the composite's own
            return _as_pairs(step, self.composite.operations[kind](self.view(step, values, params), rel))
        if kind in self.registered:
            view = self.view(step, values, params)
            if self.composite is None:
                return _as_pairs(step, self.registered[kind](view, rel))
            return _as_pairs(step, self.registered[kind](view, rel))
        gradient_mode = self.composite is None
        if gradient_mode:
            if kind == "activation":
                if step.relu and self.relu_mode == "deconvnet":
                    return [(step.x, rel.clamp(min=0))]
                if step.relu and self.relu_mode == "guided":
                    return self.vjp(step, values, params, rel.clamp(min=0))
            if kind == "identity" and step.op == "module":
                return [(step.x, rel)]
            return None  # the gradient
        if kind in ("kernel", "batchnorm"):
            return [(step.x, step.rule.reverse(step.layer, cache[step.slot], values[step.x],
                                               values[step.slot], rel))]
        if kind in ("activation", "identity"):
            return [(step.x, rel)]
        if kind in ("avgpool", "add", "batchnorm_f", "scale"):
            rule = step.rule if step.rule is not None else _SCALE_RULE
            if rule.name == "gradient":
                return self.vjp(step, values, params, rel)
            if rule.name == "pass":
                if len(step.data_slots) != 1:
                    raise fail(self.where, f"the pass rule cannot split relevance over the "
                                           f"{len(step.data_slots)} inputs of {step.name!r}")
                return [(step.data_slots[0], rel)]
            signal = rel / rule.stabilise(values[step.slot])
            if step.transpose is not None:  # additions, scalings, global pooling: written out
                return [(slot, values[slot] * g) for slot, g in step.transpose(signal, values)]
            fn, primals = self.bound(step, values, params)
            _, vjp = torch.func.vjp(fn, *primals)
            grads = vjp(signal)
            return [(s, v * g) for s, v, g in zip(step.data_slots, primals, grads)]
        return None  # folded, routing, max pooling: the engine's default
