"""The program: a captured graph classified once, one forward interpreter, one reverse walk.

:class:`Program` reads ``trace(f)`` node by node through the catalogue
(:func:`fxattr.graph._ops.classify`): which nodes carry data, what kind each data node is,
kernel layers with their parameters (an eval batch norm right after a kernel layer folded into
it), which values are known to be non-negative, and which nodes the output depends on. It is then
compiled to plain Python steps over integer slots (nothing of torch.fx is touched while
explaining, so that dynamo traces a whole explanation into one graph).

- :meth:`Program.forward` stores every node's value once (and the kernel layers' parameters and
  max pooling's winners, so that reverse passes recompute nothing);
- :meth:`Program.pair_forward` evaluates two points (x and a baseline) in ONE vmapped pass;
- :meth:`Program.reverse` pushes cotangents (gradients, relevances, multipliers) from the output
  back to the inputs. By default every node is reversed by its vector-Jacobian product (kernel
  layers by their transpose, max pooling by its winners): that is the gradient. A method changes
  what it needs with ``override(step, signal)`` (LRP rules, guided ReLUs, DeepLIFT multipliers)
  and ``kernel_params(step, params)`` (PatternNet's patterns).

Every propagation method of fxattr (LRP with its composites, DeepTaylor, guided backprop /
deconvnet, DeepLIFT / DeepLiftShap, PatternNet / PatternAttribution) runs on this one engine.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import optree
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.node import map_arg
from torch.utils._pytree import tree_unflatten as pytree_unflatten

import fxattr.graph._ops as ops  # the catalogue (same package)
from fxattr.errors import fail
from fxattr.functional import batch_norm_affine, call_privately, elementwise_batch_norm
from fxattr.graph._capture import bind, input_names, origin, trace

__all__ = ["ArgRef", "NodeView", "Program", "fold", "resolve_args"]


def fold(weight: Tensor, bias: Tensor | None, mean: Tensor, var: Tensor, bn_weight: Tensor | None,
         bn_bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """The kernel layer ``(weight, bias)`` followed by an eval batch norm on its output channels
    (axis 0 of ``weight``), as one layer ``(s * weight, (bias - mean) * s + beta)`` with
    ``s = gamma / sqrt(var + eps)`` (evaluated in the order zennit's MergeBatchNorm uses, so that
    float32 results agree to rounding)."""
    scale = 1 / (var + eps) ** 0.5 if bn_weight is None else bn_weight / (var + eps) ** 0.5
    folded_weight = weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    centred = -mean if bias is None else bias - mean
    folded_bias = centred * scale if bn_bias is None else centred * scale + bn_bias
    return folded_weight, folded_bias


def _fold_transposed(k, p, target, eps, affine, groups):
    """``fold`` for a ConvTranspose weight ``(C_in, C_out / groups, *k)``: as the weight of the
    equivalent convolution ``(C_out, C_in / groups, *k)`` (output channels first), folded, back."""
    weight = k["weight"]
    c_in, per_group, kernel = weight.shape[0], weight.shape[1], weight.shape[2:]
    grouped = weight.reshape(groups, c_in // groups, per_group, *kernel).transpose(1, 2)
    as_conv = grouped.reshape(groups * per_group, c_in // groups, *kernel)
    folded, bias = fold(as_conv, k["bias"], p[f"{target}.running_mean"], p[f"{target}.running_var"],
                        p[f"{target}.weight"] if affine else None, p[f"{target}.bias"] if affine else None, eps)
    back = folded.reshape(groups, per_group, c_in // groups, *kernel).transpose(1, 2).reshape(weight.shape)
    return {"weight": back, "bias": bias}


class Info:
    """What the program knows about one graph node."""

    __slots__ = (
        "data_args",
        "extra",
        "fold",
        "is_data",
        "kernel",
        "kind",
        "layer",
        "module",
        "node",
        "nonnegative",
        "origin",
        "params",
        "relu",
    )

    def __init__(self, node: fx.Node):
        self.node = node
        self.kind = "constant"
        self.is_data = False
        self.data_args: list[fx.Node] = []
        self.layer: ops.Layer | None = None
        self.fold: fx.Node | None = None  # the batch norm folded into this kernel layer
        self.params: Callable | None = None  # params dict -> {"weight", "bias"} of the layer
        self.nonnegative = False
        self.relu = False
        self.module: nn.Module | None = None
        self.kernel: str | None = None
        self.origin: str | None = None
        self.extra: dict = {}  # what a method attaches (LRP: its rule, its LayerInfo)


_NO_DEFAULT = object()
_INDEXED_MAXPOOL = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}


class Program:
    """The classified graph of ``f`` as a runnable program (see the module doc).

    Args:
        f: the function of ``fxattr.functionalize``.
        where: the explainer's name, for errors.
        inputs: the names of the ``forward`` parameters passed (default: the required ones).
        fold_batch_norms: fold an eval batch norm into the kernel layer before it.
    """

    def __init__(self, f, where: str, *, inputs: tuple | None = None, fold_batch_norms: bool = True):
        self.f = f
        self.where = where
        self.gm = trace(f, inputs)
        self.inputs = self.gm.meta["inputs"]
        self.variants: dict = {}
        self.graph_nodes = list(self.gm.graph.nodes)
        self.placeholders = [n for n in self.graph_nodes if n.op == "placeholder"]
        self.output = next(n for n in self.graph_nodes if n.op == "output")
        self.param_names = self.gm.meta["state_names"]
        self.nodes: dict[fx.Node, Info] = {}
        for node in self.graph_nodes:
            self.nodes[node] = self._classify(node)
        if fold_batch_norms:
            self._fold_batch_norms()
        self._nonnegative()
        self.path = self._on_path()
        self._compile()

    # --- variants for other input structures ----------------------------------------------------

    def rebuild(self, inputs: tuple) -> Program:
        """The same program for another set of passed inputs (subclasses keep their setup)."""
        return Program(self.f, self.where, inputs=inputs)

    def for_input(self, x) -> Program:
        """The program for ``x``'s structure: ``forward(x, scale=None)`` explained on ``(x, s)``
        has ``scale`` as an input, on ``x`` alone it is bound to ``None``."""
        names = input_names(self.f, x)
        if names is None or names == self.inputs:
            return self
        if names not in self.variants:
            self.variants[names] = self.rebuild(names)
        return self.variants[names]

    # --- classification -------------------------------------------------------------------------

    def _classify(self, node: fx.Node) -> Info:
        info = Info(node)
        info.origin = origin(node)
        if node.op == "placeholder":
            info.kind, info.is_data = "input", True
            return info
        if node.op in ("get_attr", "output"):
            info.kind = node.op
            return info
        info.data_args = [a for a in node.all_input_nodes if self.nodes[a].is_data]
        info.is_data = bool(info.data_args) and not ops.is_meta(node)
        if not info.is_data:
            return info
        module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
        info.module = module
        c = ops.classify(node, module, lambda a: self.nodes[a].is_data, info.data_args,
                         self.data_refs(node))
        info.kind, info.relu, info.nonnegative, info.kernel = c.kind, c.relu, c.nonnegative, c.kernel
        if info.kind == "kernel" and module is not None:
            info.params = self._module_kernel_params(node.target, module)
        elif info.kind == "kernel":
            info.params = self._functional_kernel_params(node)
        elif info.kind == "batchnorm":
            info.layer = ops.batch_norm_layer(False)
            info.params = self._bn_params(node.target, module)
        return info

    def data_refs(self, node: fx.Node) -> int:
        """How many of ``node``'s arguments are data (the same node twice counts twice)."""
        refs: list = []
        map_arg((node.args, node.kwargs), lambda a: refs.append(a) or a)
        return sum(self.nodes[a].is_data for a in refs)

    def _module_kernel_params(self, target: str, module: nn.Module):
        w_key, b_key = f"{target}.weight", f"{target}.bias"
        has_bias = module.bias is not None

        def params(p):
            return {"weight": p[w_key], "bias": p[b_key] if has_bias else None}
        return params

    def _bn_params(self, target: str, module: nn.Module):
        eps, affine = module.eps, module.affine

        def params(p):
            scale, shift = batch_norm_affine(
                p[f"{target}.running_mean"], p[f"{target}.running_var"],
                p[f"{target}.weight"] if affine else None, p[f"{target}.bias"] if affine else None, eps)
            return {"weight": scale, "bias": shift}
        return params

    def _functional_kernel_params(self, node: fx.Node):
        args = list(node.args)
        if node.target is torch.addmm:  # addmm(bias, x, weight) == F.linear(x, weight.T, bias)
            bias, weight = args[0], args[2]

            def params(p, values):
                return {"weight": values[weight].t(), "bias": values[bias]}
            params.needs_values = True
            return params
        weight = args[1] if len(args) > 1 else node.kwargs.get("weight")
        bias = args[2] if len(args) > 2 else node.kwargs.get("bias")

        def params(p, values):
            b = values[bias] if isinstance(bias, fx.Node) else bias
            return {"weight": values[weight], "bias": b}
        params.needs_values = True
        return params

    def _fold_batch_norms(self):
        for node, info in self.nodes.items():
            if info.kind != "batchnorm":
                continue
            source = node.args[0]
            kernel = self.nodes[source]
            if (kernel.kind == "kernel" and kernel.node.op == "call_module" and len(source.users) == 1
                    and kernel.fold is None):
                kernel.fold = node
                info.kind = "folded"
                module = self.gm.get_submodule(node.target)
                groups = kernel.module.groups if kernel.kernel == "conv_transpose" else None
                kernel.params = self._folded_params(kernel.params, node.target, module.eps, module.affine,
                                                    groups)

    @staticmethod
    def _folded_params(kernel_params, target, eps, affine, transposed_groups=None):
        def params(p):
            k = kernel_params(p)
            if transposed_groups is not None:  # ConvTranspose: output channels on weight axis 1
                return _fold_transposed(k, p, target, eps, affine, transposed_groups)
            weight, bias = fold(k["weight"], k["bias"], p[f"{target}.running_mean"],
                                p[f"{target}.running_var"], p[f"{target}.weight"] if affine else None,
                                p[f"{target}.bias"] if affine else None, eps)
            return {"weight": weight, "bias": bias}
        return params

    def _nonnegative(self):
        """Marks values known to be >= 0 (ReLU outputs, and pooling/routing of them), so that rules
        can skip their exactly-zero ``x-`` terms; builds the kernel layers knowing it."""
        keep = ("maxpool", "avgpool", "route", "identity")
        for node, info in self.nodes.items():
            if info.is_data and info.kind in keep:
                info.nonnegative = all(self.nodes[a].nonnegative for a in info.data_args)
        for node, info in self.nodes.items():
            if info.kind not in ("kernel", "batchnorm"):
                continue
            x_nonneg = self.nodes[ops.kernel_input(node)].nonnegative
            if info.kind == "batchnorm":
                info.layer = info.layer._replace(nonnegative_input=x_nonneg)
            elif info.module is not None and info.kernel == "conv":
                info.layer = ops.conv_layer(info.module, x_nonneg)
            elif info.module is not None and info.kernel == "conv_transpose":
                info.layer = ops.conv_transpose_layer(info.module, x_nonneg)
            elif info.module is not None:
                info.layer = ops.linear_layer(x_nonneg)
            else:
                kwargs = {k: v for k, v in node.kwargs.items() if k not in ("weight", "bias")}
                info.layer = ops.functional_kernel_layer(info.kernel, node.target, tuple(node.args[3:]),
                                                         kwargs, x_nonneg)

    def _on_path(self) -> set:
        """Data nodes from which the output is reached (the ones a reverse pass goes through)."""
        keep: set = set()
        stack = list(self.output.all_input_nodes)
        while stack:
            node = stack.pop()
            if node in keep or not self.nodes[node].is_data:
                continue
            keep.add(node)
            stack.extend(self.nodes[node].data_args)
        return keep

    def check(self, method: str, supported: Callable[[fx.Node, Info], bool], hint: str = "") -> None:
        """Raises for the first node on the data path that ``method`` has no reverse for, naming
        the node, its module of origin and the explainer."""
        for node in self.graph_nodes:
            info = self.nodes[node]
            if node in self.path and not supported(node, info):
                raise fail(self.where, f"no {method} rule for {ops.describe(node, info.module, info.origin)}."
                                       f"{' ' + hint if hint else ''}")

    # --- the runtime program ---------------------------------------------------------------------

    def _attr(self, target: str):
        obj = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def _compile(self):
        slots = {node: i for i, node in enumerate(self.graph_nodes)}
        self.slot_of = slots
        self.n_slots = len(self.graph_nodes)
        self.input_slots = [(slots[ph], ph.target, ph.args[0] if ph.args else _NO_DEFAULT)
                            for ph in self.placeholders]
        self.steps = [Step(self, node, slots) for node in self.graph_nodes
                      if node.op not in ("placeholder", "output")]
        self.step_of = {st.slot: st for st in self.steps}
        self.data_steps = [st.slot for st in self.steps if st.is_data]
        self.constant_steps = [st for st in self.steps if not st.is_data]
        self.output_template = _template(self.output.args[0], slots)
        self.out_spec = self.gm.meta.get("out_spec")
        self.output_slots = [s for s in _refs(self.output_template)
                             if self.nodes[self.graph_nodes[s]].is_data]

    def _inputs(self, x) -> list:
        values = [None] * self.n_slots
        batched = optree.tree_map(lambda t: t.unsqueeze(0), x, namespace="torch")
        positional = batched if isinstance(batched, tuple) else (None if isinstance(batched, dict) else (batched,))
        for i, (slot, name, default) in enumerate(self.input_slots):
            if positional is None:
                value = batched[name] if name in batched else default
            else:
                value = positional[i] if i < len(positional) else default
            if value is _NO_DEFAULT:
                raise fail(self.where, f"x gives no value for the model's input {name!r}")
            values[slot] = value
        return values

    def run_step(self, step: Step, values: list, params, cache: dict | None = None):
        kind = step.kind
        if kind == "get_attr":
            return params[step.target] if step.target in params else step.constant
        if kind == "kernel":
            x_in = values[step.x]
            p = step.kernel_params(params, values)
            if step.fold_linear and x_in.ndim != 2:
                raise fail(self.where, f"a batch norm follows linear layer {step.name!r} on a "
                                       f"{x_in.ndim}-d input; fxattr folds it only for (batch, "
                                       "features) inputs")
            if cache is not None:
                cache[step.slot] = p
            return step.layer.forward(x_in, p)
        if kind == "folded":
            return values[step.x]
        if step.pool_with_indices is not None and cache is not None and values[step.x].ndim == step.pool_ndim:
            # the winners' indices, so that the reverse pass does not pool again
            out, cache[step.slot] = step.pool_with_indices(values[step.x])
            return out
        if kind == "batchnorm":
            p = step.params(params)
            if cache is not None:
                cache[step.slot] = p
            return step.layer.forward(values[step.x], p)
        return step.call(resolve_args(step.args, values), resolve_args(step.kwargs, values), params)

    def forward(self, params, x):
        """One forward pass storing every node's value; returns ``(values, cache, raw output)``
        (``cache``: kernel layers' parameters and max pooling's winners, by slot)."""
        params = bind(self.gm, params)
        values = self._inputs(x)
        cache: dict = {}
        for step in self.steps:
            values[step.slot] = self.run_step(step, values, params, cache)
        return values, cache, self.raw_output(values)

    def pair_forward(self, params, x, base):
        """Every node's value at ``x`` and at ``base`` from ONE vmapped forward pass."""
        params = bind(self.gm, params)
        pair = optree.tree_map(lambda a, b: torch.stack([a, b]), x, base, namespace="torch")

        structure = {}

        def one(xi):
            values = self._inputs(xi)
            for step in self.steps:
                values[step.slot] = self.run_step(step, values, params)
            # structured values may hold None ((out, None) of nn.MultiheadAttention): vmap returns
            # tensors only, so return the leaves and rebuild the structure after
            leaves, structure["tree"] = optree.tree_flatten([values[i] for i in self.data_steps],
                                                            namespace="torch")
            return leaves

        leaves = torch.vmap(one)(pair)
        stacked = optree.tree_unflatten(structure["tree"], leaves)
        at_x, at_b = self._inputs(x), self._inputs(base)
        for i, v in zip(self.data_steps, stacked):
            at_x[i] = optree.tree_map(lambda t: t[0], v, namespace="torch")
            at_b[i] = optree.tree_map(lambda t: t[1], v, namespace="torch")
        # shapes, constants and attributes do not depend on the data: the same at both points
        for step in self.constant_steps:
            at_x[step.slot] = at_b[step.slot] = self.run_step(step, at_x, params)
        return at_x, at_b

    def raw_output(self, values, override=None):
        """The model's output (its structure, e.g. a ``ModelOutput`` for a dynamo capture)."""
        raw = resolve_args(self.output_template, values, override)
        if self.out_spec is not None:
            raw = pytree_unflatten(list(raw), self.out_spec)
        return raw

    def output_of(self, raw) -> Tensor:
        """The explained output (``f.output`` applied, batch axis of 1 kept)."""
        out = self.f.output(raw) if self.f.output is not None else raw
        if not isinstance(out, Tensor) or out.ndim == 0 or out.shape[0] != 1:
            raise fail(self.where, "the model must return a tensor with a batch axis (pass "
                                   "output=callable to functionalize to choose one)")
        return out

    def seed(self, values, signal_y: Tensor) -> dict:
        """``{slot: signal}`` at the graph's output nodes for ``signal_y`` at the explained output
        (passed back through ``f.output``'s selection)."""
        signal_y = signal_y.unsqueeze(0)
        seeds: dict = {}
        template = self.output_template
        if isinstance(template, ArgRef) and self.f.output is None and self.out_spec is None:
            if template.slot in self.output_slots:
                seeds[template.slot] = signal_y
            return seeds
        data = self.output_slots

        def pick(*vals):
            raw = self.raw_output(values, dict(zip(data, vals)))
            return self.f.output(raw) if self.f.output is not None else raw
        _, vjp = torch.func.vjp(pick, *[values[s] for s in data])
        for slot, r in zip(data, vjp(signal_y)):
            accumulate(seeds, slot, r)
        return seeds

    def reverse(self, params, values, cache, seeds: dict, override=None, kernel_params=None) -> dict:
        """Pushes ``seeds`` ({slot: signal}) back to the inputs; returns ``{slot: signal}``.

        ``override(step, signal)`` may return a list of ``(input slot, signal)`` for a node
        (``None``: the default, the node's vector-Jacobian product). ``kernel_params(step, p)``
        may replace a kernel layer's parameters in its transpose.
        """
        params = bind(self.gm, params)
        signals = dict(seeds)
        for step in reversed(self.steps):
            if step.slot not in signals:
                continue
            signal = signals.pop(step.slot)
            incoming = override(step, signal) if override is not None else None
            if incoming is None:
                incoming = self.default_reverse(step, values, cache, params, signal, kernel_params)
            for slot, r in incoming:
                if r is not None:
                    accumulate(signals, slot, r)
        return signals

    def default_reverse(self, step, values, cache, params, signal, kernel_params=None):
        kind = step.kind
        if kind == "folded":
            return [(step.x, signal)]
        if kind in ("kernel", "batchnorm"):
            p = cache[step.slot] if cache is not None and step.slot in cache else step.kernel_params(params, values)
            if kernel_params is not None and kind == "kernel":
                p = kernel_params(step, p)
            return [(step.x, step.layer.transpose(signal, p, values[step.x]))]
        if cache is not None and step.slot in cache and step.pool_with_indices is not None:
            x_in = values[step.x]  # winner takes all
            flat = torch.zeros_like(x_in).flatten(2).scatter_add(2, cache[step.slot].flatten(2),
                                                                  signal.flatten(2))
            return [(step.x, flat.view_as(x_in))]
        if step.transpose is not None:  # a parameter-free linear node: its transpose written out
            return step.transpose(signal, values)
        return self.vjp(step, values, params, signal)

    def bound(self, step, values, params):
        """``fn(*data_values)``: the node as a function of its data inputs (others fixed)."""
        data = step.data_slots

        def fn(*vals):
            override = dict(zip(data, vals))
            return step.call(resolve_args(step.args, values, override),
                             resolve_args(step.kwargs, values, override), params)
        return fn, [values[s] for s in data]

    def vjp(self, step, values, params, signal):
        """``[(input slot, signal @ d node / d input)]`` for the node's data inputs. Structured
        values are taken apart into their tensors (``nn.MultiheadAttention`` returns
        ``(out, None)``; a vjp takes tensors only); a part of the output without signal gets zeros."""
        fn, primals = self.bound(step, values, params)
        value = values[step.slot]
        if isinstance(value, Tensor) and all(isinstance(p, Tensor) for p in primals):
            _, back = torch.func.vjp(fn, *primals)
            return list(zip(step.data_slots, back(signal)))
        flats = [optree.tree_flatten(p, namespace="torch") for p in primals]
        sizes = [len(leaves) for leaves, _ in flats]
        out_spec = []

        def flat_fn(*leaves):
            rebuilt, k = [], 0
            for (_, spec), n in zip(flats, sizes):
                rebuilt.append(optree.tree_unflatten(spec, list(leaves[k:k + n])))
                k += n
            out = fn(*rebuilt)
            out_spec[:] = [optree.tree_structure(out, none_is_leaf=True, namespace="torch")]
            return tuple(optree.tree_leaves(out, namespace="torch"))

        out, back = torch.func.vjp(flat_fn, *[t for leaves, _ in flats for t in leaves])
        with_none = optree.tree_flatten(signal, none_is_leaf=True, namespace="torch")[0] \
            if not isinstance(signal, Tensor) else [signal]
        spec_leaves = out_spec[0].num_leaves
        if len(with_none) != spec_leaves:
            raise fail(self.where, f"the signal of {step.name!r} does not match its output's structure")
        # the output's tensor leaves in order, each with its signal (zeros where none arrived)
        tensor_positions = [i for i, leaf in enumerate(optree.tree_leaves(
            value, none_is_leaf=True, namespace="torch")) if leaf is not None]
        cotangents = tuple(torch.zeros_like(o) if with_none[i] is None else with_none[i]
                           for i, o in zip(tensor_positions, out))
        grads = back(cotangents)
        result, k = [], 0
        for slot, (_, spec), n in zip(step.data_slots, flats, sizes):
            result.append((slot, optree.tree_unflatten(spec, list(grads[k:k + n]))))
            k += n
        return result

    def view(self, step, values, params, reference=None) -> NodeView:
        """What a reverse function of a registered kind sees of ``step`` (see :class:`NodeView`)."""
        return NodeView(self, step, values, params, reference)

    def to_input(self, x, values, signals: dict, combine=None):
        """The signal at each input of ``x``'s structure (batch axis removed), optionally
        ``combine(signal, slot)``."""
        def one(slot):
            r = signals.get(slot)
            r = torch.zeros_like(values[slot][0]) if r is None else r[0]
            return r if combine is None else combine(r, slot)
        if isinstance(x, dict):
            return {name: one(slot) for slot, name, _ in self.input_slots if name in x}
        if isinstance(x, tuple):
            return tuple(one(slot) for slot, _, _ in self.input_slots[:len(x)])
        return one(self.input_slots[0][0])


class NodeView:
    """One node as a reverse function of a registered operation kind sees it.

    Attributes:
        name: the graph node's name; ``origin``: the qualified name of its module of origin.
        kind: its kind in the catalogue; ``node``: the ``torch.fx`` node (for its arguments).
        inputs: the values of its data inputs at the explained point (batch axis of 1 included),
            in the order of ``step.data_slots``; ``output``: its value there.
        reference_inputs / reference_output: the same at the reference point (DeepLIFT's
            baseline), or ``None``.
        fn: ``fn(*inputs) -> output``, the node as a function of its data inputs (for vjps).
        args / kwargs: the call's arguments resolved to values at the explained point (for a module,
            its call's arguments); module: the called module of a ``call_module`` node, else ``None``;
            params: that module's own parameters and buffers by local name (``{}`` otherwise).
    """

    def __init__(self, program: Program, step, values, params, reference=None):
        self.name, self.kind, self.origin = step.name, step.kind, step.origin
        self.node = program.graph_nodes[step.slot]
        self.args, self.kwargs = resolve_args(step.args, values), resolve_args(step.kwargs, values)
        self.module = program.nodes[self.node].module
        self.params = {}
        if self.module is not None:
            prefix = f"{self.node.target}."
            own = dict(self.module.named_parameters(remove_duplicate=False))
            own.update(self.module.named_buffers(remove_duplicate=False))
            self.params = {n: params.get(prefix + n, t) for n, t in own.items()}
        self._gm = program.gm
        self.fn, self.inputs = program.bound(step, values, params)
        self.output = values[step.slot]
        self.reference_inputs = None if reference is None else [reference[s] for s in step.data_slots]
        self.reference_output = None if reference is None else reference[step.slot]
        self.reference_fn = None if reference is None else program.bound(step, reference, params)[0]

    def module_of(self, node: fx.Node) -> nn.Module | None:
        """The module a ``call_module`` node calls (``None`` for other nodes): what produced an input."""
        return self._gm.get_submodule(node.target) if getattr(node, "op", None) == "call_module" else None


class ArgRef:
    """A reference to a node's value (its slot) inside an argument template."""

    __slots__ = ("slot",)

    def __init__(self, slot: int):
        self.slot = slot


def _template(arg, slots):
    return _plain(map_arg(arg, lambda n: ArgRef(slots[n])))


def _plain(t):
    # torch.fx's immutable containers -> plain ones (dynamo traces plain Python containers)
    if isinstance(t, tuple) and not hasattr(t, "_fields"):
        return tuple(_plain(a) for a in t)
    if isinstance(t, list):
        return [_plain(a) for a in t]
    if isinstance(t, dict):
        return {k: _plain(v) for k, v in t.items()}
    return t


def _refs(t) -> list:
    if isinstance(t, ArgRef):
        return [t.slot]
    if isinstance(t, (tuple, list)):
        return [s for a in t for s in _refs(a)]
    if isinstance(t, dict):
        return [s for v in t.values() for s in _refs(v)]
    if isinstance(t, slice):
        return _refs((t.start, t.stop, t.step))
    return []


def resolve_args(t, values, override=None):
    if isinstance(t, ArgRef):
        if override is not None and t.slot in override:
            return override[t.slot]
        return values[t.slot]
    if isinstance(t, tuple):
        return tuple(resolve_args(a, values, override) for a in t)
    if isinstance(t, list):
        return [resolve_args(a, values, override) for a in t]
    if isinstance(t, dict):
        return {k: resolve_args(v, values, override) for k, v in t.items()}
    if isinstance(t, slice):
        return slice(resolve_args(t.start, values, override), resolve_args(t.stop, values, override),
                     resolve_args(t.step, values, override))
    return t


class Step:
    """One node of the runtime program."""

    def __init__(self, program: Program, node: fx.Node, slots: dict):
        info = program.nodes[node]
        self.info = info
        self.slot = slots[node]
        self.name = node.name
        self.origin = info.origin
        self.is_data = info.is_data
        self.on_path = node in program.path
        self.kind = "get_attr" if node.op == "get_attr" else (info.kind if info.is_data else "constant")
        self.target = node.target
        self.args = _template(node.args, slots)
        self.kwargs = _template(node.kwargs, slots)
        self.data_slots = [slots[a] for a in info.data_args]
        first = ops.kernel_input(node) if info.kind == "kernel" else (node.args[0] if node.args else None)
        self.x = slots[first] if isinstance(first, fx.Node) else None
        self.layer, self.relu, self.params = info.layer, info.relu, info.params
        self.needs_values = getattr(info.params, "needs_values", False)
        self.value_slots = {n: slots[n] for n in node.all_input_nodes} if self.needs_values else {}
        self.fold_linear = info.fold is not None and info.layer is not None and info.layer.kind == "linear"
        # a parameter or buffer params lacks (fxattr keeps integer buffers out of params) and a
        # tensor attribute that is neither (a constant) read the module's own tensor
        self.constant = None
        if node.op == "get_attr":
            self.constant = node.meta["constant"] if "constant" in node.meta else program._attr(node.target)
        self.op = {"call_module": "module", "call_method": "method", "call_function": "function",
                   "get_attr": "get_attr"}[node.op]
        self.module_name = node.target if node.op == "call_module" else None
        if node.op == "call_module":
            module = program.gm.get_submodule(node.target)
            names = [n for n, _ in module.named_parameters(remove_duplicate=False)]
            names += [n for n, _ in module.named_buffers(remove_duplicate=False)]
            prefix = node.target
            view_cache: dict = {}

            def call(args, kwargs, params):
                own = {n: params[f"{prefix}.{n}"] for n in names if f"{prefix}.{n}" in params}
                # on a private view: parameters are never swapped into the user's module
                return call_privately(module, own, args, kwargs, cache=view_cache)
        elif node.op == "call_method":
            method = node.target

            def call(args, kwargs, params):
                return getattr(args[0], method)(*args[1:], **kwargs)
        elif node.op == "call_function":
            fn = elementwise_batch_norm if node.target is F.batch_norm else node.target

            def call(args, kwargs, params):
                return fn(*args, **kwargs)
        else:
            call = None
        self.call = call
        self.pool_with_indices = None
        if self.kind == "maxpool" and node.op == "call_module":
            module = program.gm.get_submodule(node.target)
            if type(module) in _INDEXED_MAXPOOL and not module.return_indices:
                pool = _INDEXED_MAXPOOL[type(module)]
                settings = (module.kernel_size, module.stride, module.padding, module.dilation,
                            module.ceil_mode)
                self.pool_with_indices = lambda t: pool(t, *settings, return_indices=True)
                self.pool_ndim = {nn.MaxPool1d: 3, nn.MaxPool2d: 4, nn.MaxPool3d: 5}[type(module)]
        # parameter-free linear nodes reversed by their transpose written out (no vjp)
        self.transpose = linear_transpose(program, node, self) if self.is_data and self.on_path else None

    def kernel_params(self, params, values) -> dict:
        """The kernel layer's (batch-norm folded) weight and bias."""
        if self.needs_values:
            return self.params(params, {n: values[s] for n, s in self.value_slots.items()})
        return self.params(params)


# --- transposes of parameter-free linear nodes --------------------------------------------------
#
# The vector-Jacobian product of an addition, a scaling by a constant, a reshape, a permutation, a
# global average pool or a mean / sum over dims is a plain tensor expression; writing it out saves
# re-running the node under ``torch.func.vjp`` (a module call, autograd's bookkeeping) at every
# reverse pass. Each ``transpose(signal, values) -> [(input slot, signal)]`` equals the vjp exactly
# (same arithmetic) and is differentiable again; a node whose form is not recognised gets ``None``
# and keeps the vjp.

_ADD = {operator.add, torch.add, "add"}
_SUB = {operator.sub, torch.sub, "sub"}
_MUL = {operator.mul, torch.mul, "mul"}
_DIV = {operator.truediv, torch.div, "div"}
_NEG = {operator.neg, torch.neg, "neg"}
_RESHAPES = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten, "view", "reshape",
             "flatten", "unflatten", "squeeze", "unsqueeze"}
_PERMUTES = {torch.permute, "permute"}
_TRANSPOSES = {torch.transpose, torch.swapaxes, "transpose", "swapaxes"}
_PASS_METHODS = {"contiguous", "clone"}
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_ADAPTIVE_AVG = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_REDUCTIONS = {torch.mean: True, "mean": True, torch.sum: False, "sum": False}


def unbroadcast(t: Tensor, shape) -> Tensor:
    """``t`` summed over the axes broadcasting added or expanded to reach it from ``shape``."""
    shape = tuple(shape)
    if tuple(t.shape) == shape:
        return t
    lead = t.ndim - len(shape)
    if lead:
        t = t.sum(dim=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dim=axes, keepdim=True) if axes else t


def _fn_key(node: fx.Node):
    return node.target if node.op in ("call_function", "call_method") else None


def linear_transpose(program: Program, node: fx.Node, step: Step):
    """The written-out transpose of a parameter-free linear node (see above), or ``None``."""
    info = program.nodes[node]
    data = [a for a in node.all_input_nodes if program.nodes[a].is_data]
    if not data:
        return None
    slots = program.slot_of
    key = _fn_key(node)
    args, kwargs = step.args, step.kwargs
    kind = info.kind
    if kind == "add" and key in _ADD | _SUB and len(args) == 2 and not kwargs:
        signs = (1.0, -1.0 if key in _SUB else 1.0)
        refs = [(a.slot, sign) for a, sign in zip(args, signs)
                if isinstance(a, ArgRef) and program.nodes[program.graph_nodes[a.slot]].is_data]

        def add_transpose(signal, values):
            return [(slot, unbroadcast(signal if sign > 0 else -signal, values[slot].shape)) for slot, sign in refs]
        return add_transpose if refs else None
    if len(data) != 1:
        return None
    x = slots[data[0]]

    def is_x(a):
        return isinstance(a, ArgRef) and a.slot == x

    if kind == "scale" and not kwargs:
        if key in _NEG and len(args) == 1 and is_x(args[0]):
            return lambda signal, values: [(x, -signal)]
        if key in _MUL | _DIV and len(args) == 2 and (is_x(args[0]) or (key in _MUL and is_x(args[1]))):
            other = args[1] if is_x(args[0]) else args[0]
            divide = key in _DIV

            def scale_transpose(signal, values):
                c = resolve_args(other, values)
                return [(x, unbroadcast(signal / c if divide else signal * c, values[x].shape))]
            return scale_transpose
        return None
    if kind == "identity":
        module = info.module
        if (node.op == "call_module" and type(module) in _PASS_MODULES and not module.training) or \
                (node.op == "call_method" and key in _PASS_METHODS and len(args) == 1 and not kwargs):
            return lambda signal, values: [(x, signal)]
        return None
    if kind == "route":
        module = info.module
        if (node.op == "call_module" and type(module) in (nn.Flatten, nn.Unflatten)) or \
                (key in _RESHAPES and is_x(args[0]) and not any(
                    program.nodes[program.graph_nodes[r]].is_data for r in _refs((args[1:], kwargs)))):
            return lambda signal, values: [(x, signal.reshape(values[x].shape))]
        if key in _PERMUTES and is_x(args[0]) and not kwargs:
            dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
            if not all(type(d) is int for d in dims) or not dims:
                return None

            def permute_transpose(signal, values):
                n = signal.ndim
                order = [d % n for d in dims]
                return [(x, signal.permute(sorted(range(n), key=order.__getitem__)))]
            return permute_transpose
        if key in _TRANSPOSES and is_x(args[0]) and len(args) == 3 and not kwargs \
                and all(type(d) is int for d in args[1:]):
            d0, d1 = args[1], args[2]
            return lambda signal, values: [(x, signal.transpose(d0, d1))]
        return None
    if kind == "avgpool":
        module = info.module
        if node.op == "call_module" and type(module) in _ADAPTIVE_AVG:
            size = module.output_size
            pooled = _ADAPTIVE_AVG.index(type(module)) + 1  # the last 1, 2 or 3 axes
            if not all(n == 1 for n in (size if isinstance(size, (tuple, list)) else (size,) * pooled)):
                return None

            def global_average_transpose(signal, values):
                shape = values[x].shape
                count = 1
                for n in shape[-pooled:]:
                    count *= n
                return [(x, (signal / count).expand(shape))]
            return global_average_transpose
        if key in _REDUCTIONS and is_x(args[0]) and set(kwargs) <= {"dim", "keepdim"} and len(args) <= 3:
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
            if dim is None or type(keepdim) is not bool:
                return None
            dims = (dim,) if type(dim) is int else tuple(dim)
            if not dims or not all(type(d) is int for d in dims):
                return None
            average = _REDUCTIONS[key]

            def reduction_transpose(signal, values):
                shape = values[x].shape
                axes = sorted(d % len(shape) for d in dims)
                if not keepdim:
                    for d in axes:
                        signal = signal.unsqueeze(d)
                if average:
                    count = 1
                    for d in axes:
                        count *= shape[d]
                    signal = signal / count
                return [(x, signal.expand(shape))]
            return reduction_transpose
    return None


def _fill(signal, out):
    """The signal of a structured output with ``None`` (no user) replaced by zeros."""
    if isinstance(out, Tensor):
        return signal
    return type(out)(_fill(r, o) if r is not None else torch.zeros_like(o) for r, o in zip(signal, out))


def _add(a, b):
    if isinstance(a, Tensor):
        return a + b
    return type(a)(_add(x, y) if x is not None and y is not None else (x if y is None else y)
                   for x, y in zip(a, b))


def accumulate(signals: dict, slot: int, r) -> None:
    signals[slot] = _add(signals[slot], r) if slot in signals else r
