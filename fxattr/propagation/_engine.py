"""The reverse engine: one forward pass over the traced graph, then an explicit reverse pass.

The model's pure graph (:func:`fxattr.graph.trace`) is classified once, node by node, into what
LRP needs to know: kernel layers (Conv1d/2d/3d, Linear, ``F.conv*``, ``F.linear``; an eval batch
norm right after one is folded into it, see :mod:`fxattr.propagation._canonize`), unfolded batch norms,
parameter-free linear layers (average pooling, means, sums, additions, scaling by constants),
element-wise activations, max pooling, and routing ops (concatenation, split, reshape/view/flatten,
permute, indexing, padding). Each node gets a reverse function written with plain torch ops and
``torch.func.vjp``; a node's relevance is the sum over its users. The forward pass stores every
value once and the reverse pass reuses them, so nothing is recomputed except where a rule asks for
a modified layer. There are no hooks and no custom autograd functions: the whole explanation is an
ordinary differentiable, vmappable, compilable function of ``(params, x)``.

The same engine runs in "gradient" mode for guided backprop and deconvnet: every node reverses by
its vector-Jacobian product, ReLUs filter the signal.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import optree
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.node import map_arg
from torch.utils import _pytree as pytree

from fxattr.errors import fail
from fxattr.functional import elementwise_batch_norm
from fxattr.graph import trace
from fxattr.propagation import rules as R
from fxattr.propagation._canonize import batch_norm_affine, fold
from fxattr.propagation.composites import KERNEL_KINDS, Composite, LayerInfo
from fxattr.targets import select

__all__ = ["Plan"]

# --- what the ops are ----------------------------------------------------------------------------

_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Tanh, nn.Sigmoid, nn.PReLU,
    nn.Threshold, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink, nn.RReLU,
)
_NONNEGATIVE_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
_MAXPOOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
                    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_AVGPOOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                     nn.AlphaDropout, nn.FeatureAlphaDropout)
_ROUTE_MODULES = (nn.Flatten, nn.Unflatten, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
                  nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)

_ACTIVATION_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardtanh,
    F.hardswish, F.hardsigmoid, F.softplus, F.tanh, F.sigmoid, F.logsigmoid, F.softsign,
    F.prelu, F.threshold, F.rrelu, torch.relu, torch.tanh, torch.sigmoid, torch.selu, torch.celu,
    torch.nn.functional.tanhshrink,
}
_ACTIVATION_METHODS = {"relu", "tanh", "sigmoid"}
_RELU = {F.relu, torch.relu, "relu"}
_NONNEGATIVE_FUNCTIONS = {F.relu, F.relu6, torch.relu, torch.sigmoid, F.sigmoid, F.hardsigmoid,
                          F.softplus, "relu", "sigmoid"}
_MAXPOOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d,
                      F.adaptive_max_pool2d, F.adaptive_max_pool3d, torch.max_pool1d,
                      torch.max_pool2d, torch.max_pool3d}
_AVGPOOL_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                      F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.mean, torch.sum}
_AVGPOOL_METHODS = {"mean", "sum"}
_ADD_FUNCTIONS = {operator.add, operator.sub, torch.add, torch.sub}
_ADD_METHODS = {"add", "sub"}
_SCALE_FUNCTIONS = {operator.mul, operator.truediv, operator.neg, torch.mul, torch.div, torch.neg}
_SCALE_METHODS = {"mul", "div", "neg"}
_IDENTITY_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                       F.feature_alpha_dropout}
_IDENTITY_METHODS = {"contiguous", "clone", "detach"}
_ROUTE_FUNCTIONS = {
    torch.cat, torch.concat, torch.stack, torch.flatten, torch.reshape, torch.permute,
    torch.transpose, torch.squeeze, torch.unsqueeze, operator.getitem, torch.split, torch.chunk,
    torch.unbind, torch.t, torch.narrow, torch.movedim, torch.swapaxes, torch.clone, F.pad,
    F.pixel_shuffle, F.pixel_unshuffle, torch.hstack, torch.vstack, torch.unflatten,
}
_ROUTE_METHODS = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "squeeze", "unsqueeze",
    "split", "chunk", "unbind", "t", "narrow", "movedim", "swapaxes", "expand", "expand_as",
    "view_as", "reshape_as", "to", "float", "double", "half", "type_as", "__getitem__", "repeat",
}
_META_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "layout"}
_META_METHODS = {"size", "dim", "numel", "nelement", "stride", "get_device"}

SUPPORTED = ("convolutions and linear layers (modules or F.conv*/F.linear), batch norm (eval), "
             "element-wise activations (ReLU, LeakyReLU, ELU, GELU, SiLU, tanh, sigmoid, ...), "
             "max/average/adaptive pooling, means and sums, additions and subtractions, scaling by "
             "constants, concatenation/stack/split/chunk, reshape/view/flatten/permute/transpose/"
             "squeeze/indexing/padding, dropout and identities")


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r} ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "call_method":
        return f"method Tensor.{node.target}"
    target = node.target
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", repr(target))
    module = getattr(target, "__module__", None) or ""
    return f"function {module + '.' if module and module != 'builtins' else ''}{name}"


class _Node:
    """What the engine knows about one graph node."""

    __slots__ = ("node", "kind", "is_data", "data_args", "layer", "info", "rule", "fold",
                 "params", "nonnegative", "relu", "module")

    def __init__(self, node: fx.Node):
        self.node = node
        self.kind = "constant"
        self.is_data = False
        self.data_args: list[fx.Node] = []
        self.layer: R.Layer | None = None
        self.info: LayerInfo | None = None
        self.rule: R.Rule | None = None
        self.fold: fx.Node | None = None  # the batch norm folded into this kernel layer
        self.params: Callable | None = None  # params dict -> {"weight", "bias"} of the layer
        self.nonnegative = False
        self.relu = False
        self.module = None


def conv_layer(module: nn.Module, nonnegative: bool) -> R.Layer:
    n = module.weight.ndim - 2
    fast = module.padding_mode == "zeros" and not isinstance(module.padding, str)
    input_grad = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input,
                  3: torch.nn.grad.conv3d_input}[n]

    def forward(x, p):
        return module._conv_forward(x, p["weight"], p["bias"])

    def transpose(s, p, x):
        if fast:  # the input-gradient of the convolution, without recomputing it
            return input_grad(x.shape, p["weight"], s, module.stride, module.padding,
                              module.dilation, module.groups)
        return _vjp_transpose(forward, s, p, x)

    def bias(b, z):
        return b.reshape((-1,) + (1,) * (z.ndim - 2))

    return R.Layer("conv", forward, transpose, bias, nonnegative, groups=module.groups)


def linear_layer(nonnegative: bool) -> R.Layer:
    def forward(x, p):
        return F.linear(x, p["weight"], p["bias"])

    def transpose(s, p, x):
        return s @ p["weight"]

    def bias(b, z):
        return b

    return R.Layer("linear", forward, transpose, bias, nonnegative, groups=1)


def functional_kernel_layer(kind: str, fn, rest_args: tuple, rest_kwargs: dict,
                             nonnegative: bool) -> R.Layer:
    def forward(x, p):
        return fn(x, p["weight"], p["bias"], *rest_args, **rest_kwargs)

    def transpose(s, p, x):
        if kind == "linear":
            return s @ p["weight"]
        return _vjp_transpose(forward, s, p, x)

    def bias(b, z):
        return b if kind == "linear" else b.reshape((-1,) + (1,) * (z.ndim - 2))

    # F.conv*(input, weight, bias, stride, padding, dilation, groups): groups from the call
    groups = 1 if kind == "linear" else (rest_args[3] if len(rest_args) > 3 else rest_kwargs.get("groups", 1))
    return R.Layer(kind, forward, transpose, bias, nonnegative,
                   groups=groups if type(groups) is int else None)


def _channel_shape(t: Tensor) -> tuple:
    return (1, -1) + (1,) * (t.ndim - 2)


def _batch_norm_layer(nonnegative: bool) -> R.Layer:
    def forward(x, p):
        out = x * p["weight"].reshape(_channel_shape(x))
        return out if p["bias"] is None else out + p["bias"].reshape(_channel_shape(x))

    def transpose(s, p, x):
        return s * p["weight"].reshape(_channel_shape(s))

    def bias(b, z):
        return b.reshape(_channel_shape(z))

    return R.Layer("batchnorm", forward, transpose, bias, nonnegative)


def source_bn_state(target: str, gm: fx.GraphModule):
    module = gm.get_submodule(target)
    return target, module.eps, module.affine


def _vjp_transpose(forward, s, p, x):
    _, vjp = torch.func.vjp(lambda t: forward(t, p), x)
    return vjp(s)[0]


def _module_params(module: nn.Module, prefix: str, params) -> dict:
    names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
    return {n: params[f"{prefix}.{n}"] for n in names if f"{prefix}.{n}" in params}


# --- the plan ----------------------------------------------------------------------------------

class Plan:
    """The classified graph of ``f`` with a reverse function for every node on the data path.

    Args:
        f: the function of ``fxattr.functionalize``.
        where: the explainer's name, for errors.
        composite: the rules (LRP mode), or ``None`` for gradient mode.
        relu: gradient mode's ReLU filter: ``"guided"`` or ``"deconvnet"``.
    """

    def __init__(self, f, where: str, composite: Composite | None = None, relu: str | None = None):
        self.f = f
        self.where = where
        self.composite = composite
        self.relu_mode = relu
        self.gm = trace(f)
        self.graph_nodes = list(self.gm.graph.nodes)
        self.nodes: dict[fx.Node, _Node] = {}
        self.placeholders = [n for n in self.graph_nodes if n.op == "placeholder"]
        self.output = next(n for n in self.graph_nodes if n.op == "output")
        for node in self.graph_nodes:
            self.nodes[node] = self._classify(node)
        self._fold_batch_norms()
        self._nonnegative()
        self._layer_infos()
        self._check_and_assign()
        self.param_names = set(self.gm.meta.get("state_names", ()))
        self._compile()

    # classification

    def _classify(self, node: fx.Node) -> _Node:
        info = _Node(node)
        inputs = [a for a in node.all_input_nodes]
        if node.op == "placeholder":
            info.kind, info.is_data = "input", True
            return info
        if node.op in ("get_attr", "output"):
            info.kind = node.op
            return info
        meta = ((node.op == "call_function" and node.target is getattr
                 and len(node.args) > 1 and node.args[1] in _META_ATTRIBUTES)
                or (node.op == "call_method" and node.target in _META_METHODS))
        info.data_args = [a for a in inputs if self.nodes[a].is_data]
        info.is_data = bool(info.data_args) and not meta
        if not info.is_data:
            return info
        info.kind = self._kind(node, info)
        return info

    def _kind(self, node: fx.Node, info: _Node) -> str:
        target = node.target
        first_is_data = bool(node.args) and isinstance(node.args[0], fx.Node) and self.nodes[node.args[0]].is_data
        only_first = first_is_data and info.data_args == [node.args[0]]
        if node.op == "call_module":
            module = self.gm.get_submodule(target)
            info.module = module
            if not only_first and not isinstance(module, _ROUTE_MODULES):
                return "unsupported"
            if isinstance(module, _CONV_MODULES):
                info.layer = conv_layer(module, False)
                info.params = self._module_kernel_params(target, module)
                return "kernel"
            if isinstance(module, nn.Linear):
                info.layer = linear_layer(False)
                info.params = self._module_kernel_params(target, module)
                return "kernel"
            if isinstance(module, _BN_MODULES):
                if module.training or module.running_mean is None:
                    return "unsupported"
                info.layer = _batch_norm_layer(False)
                info.params = self._bn_params(target, module)
                return "batchnorm"
            if isinstance(module, _ACTIVATION_MODULES):
                info.relu = type(module) is nn.ReLU
                info.nonnegative = isinstance(module, _NONNEGATIVE_MODULES)
                return "activation"
            if isinstance(module, _MAXPOOL_MODULES):
                return "maxpool"
            if isinstance(module, _AVGPOOL_MODULES):
                return "avgpool"
            if isinstance(module, _IDENTITY_MODULES):
                return "identity"
            if isinstance(module, _ROUTE_MODULES):
                return "route"
            return "unsupported"
        is_method = node.op == "call_method"
        key = target if is_method else target
        if not is_method and target in (F.conv1d, F.conv2d, F.conv3d, F.linear) and only_first:
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if isinstance(weight, fx.Node) and not self.nodes[weight].is_data:
                kind = "linear" if target is F.linear else "conv"
                rest = tuple(node.args[3:])
                info.layer = ("functional", kind, target, rest, dict(node.kwargs))
                info.params = self._functional_kernel_params(node)
                return "kernel"
            return "unsupported"
        if not is_method and target is F.batch_norm and only_first:
            return "functional_batchnorm"
        activation = (target in _ACTIVATION_METHODS) if is_method else (target in _ACTIVATION_FUNCTIONS)
        if activation and only_first:
            info.relu = key in _RELU
            info.nonnegative = key in _NONNEGATIVE_FUNCTIONS
            return "activation"
        if not is_method and target in _MAXPOOL_FUNCTIONS and only_first:
            return "maxpool"
        if ((target in _AVGPOOL_METHODS) if is_method else (target in _AVGPOOL_FUNCTIONS)) and only_first:
            return "avgpool"
        if (target in _ADD_METHODS) if is_method else (target in _ADD_FUNCTIONS):
            return "add"
        if (target in _SCALE_METHODS) if is_method else (target in _SCALE_FUNCTIONS):
            # count references, not distinct nodes: ``h * h`` is a square, not a scaling
            if self._data_refs(node) == 1 and not (target in (operator.truediv, torch.div, "div")
                                                   and not first_is_data):
                return "scale"
            return "unsupported"
        if (target in _IDENTITY_METHODS) if is_method else (target in _IDENTITY_FUNCTIONS):
            return "identity" if only_first else "unsupported"
        if (target in _ROUTE_METHODS) if is_method else (target in _ROUTE_FUNCTIONS):
            return "route"
        return "unsupported"

    def _data_refs(self, node: fx.Node) -> int:
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
        weight = args[1] if len(args) > 1 else node.kwargs.get("weight")
        bias = args[2] if len(args) > 2 else node.kwargs.get("bias")

        def params(p, values):
            b = values[bias] if isinstance(bias, fx.Node) else bias
            return {"weight": values[weight], "bias": b}
        params.needs_values = True
        return params

    # batch norm folding (canonization)

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
                kernel.params = self._folded_params(kernel.params, source_bn_state(node.target, self.gm))

    @staticmethod
    def _folded_params(kernel_params, bn):
        target, eps, affine = bn

        def params(p):
            k = kernel_params(p)
            weight, bias = fold(k["weight"], k["bias"], p[f"{target}.running_mean"],
                                p[f"{target}.running_var"], p[f"{target}.weight"] if affine else None,
                                p[f"{target}.bias"] if affine else None, eps)
            return {"weight": weight, "bias": bias}
        return params

    def _nonnegative(self):
        """Marks values known to be >= 0 (ReLU outputs, and pooling/routing of them), so that rules
        can skip their exactly-zero ``x-`` terms."""
        keep = ("maxpool", "avgpool", "route", "identity")
        for node, info in self.nodes.items():
            if info.is_data and info.kind in keep:
                info.nonnegative = all(self.nodes[a].nonnegative for a in info.data_args)
        for node, info in self.nodes.items():
            if info.kind in ("kernel", "batchnorm") and info.layer is not None:
                x_nonneg = self.nodes[node.args[0]].nonnegative
                if not isinstance(info.layer, R.Layer):
                    _, kind, fn, rest, kwargs = info.layer
                    kwargs = {k: v for k, v in kwargs.items() if k not in ("weight", "bias")}
                    info.layer = functional_kernel_layer(kind, fn, rest, kwargs, x_nonneg)
                else:
                    info.layer = info.layer._replace(nonnegative_input=x_nonneg)

    def _layer_infos(self):
        kernels = [n for n, i in self.nodes.items() if i.kind == "kernel"]
        seen_kinds: set[str] = set()
        for index, node in enumerate(kernels):
            info = self.nodes[node]
            kind = info.layer.kind
            info.info = LayerInfo(
                kind=kind, module=type(info.module) if info.module is not None else None,
                name=node.target if node.op == "call_module" else node.name, node=node.name,
                index=index, first=index == 0, last=index == len(kernels) - 1,
                input_layer=self._reads_input(node.args[0]), first_of_kind=kind not in seen_kinds)
            seen_kinds.add(kind)
        for node, info in self.nodes.items():
            if info.is_data and info.kind in ("batchnorm", "avgpool", "add", "activation", "maxpool",
                                           "functional_batchnorm"):
                kind = "batchnorm" if info.kind == "functional_batchnorm" else info.kind
                info.info = LayerInfo(kind=kind, module=type(info.module) if info.module is not None else None,
                                      name=node.target if node.op == "call_module" else node.name,
                                      node=node.name)

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
        relevant = self._on_path()
        for node in self.graph_nodes:
            info = self.nodes[node]
            if node not in relevant:
                continue
            if info.kind == "unsupported" and self.composite is not None:
                raise fail(self.where, f"no LRP rule for graph node {node.name!r}: "
                                       f"{_describe(self.gm, node)}. Supported: {SUPPORTED}. Make it "
                                       "a leaf of a supported kind or use a gradient-based method.")
            if info.kind == "functional_batchnorm":
                info.kind = "batchnorm_f"
            if self.composite is not None and info.info is not None and info.kind in (
                    "kernel", "batchnorm", "avgpool", "add", "batchnorm_f"):
                info.rule = self.composite.rule(info.info)
                if not isinstance(info.rule, R.Rule):
                    raise fail(self.where, f"the composite gave {type(info.rule).__name__} for layer "
                                           f"{node.name!r}; expected an fxattr.propagation.rules.Rule")
                if info.kind in ("avgpool", "add") and info.rule.name not in ("gradient", "pass") \
                        and info.rule.stabilise is None:
                    raise fail(self.where, f"rule {info.rule.name!r} cannot be used on the "
                                           f"parameter-free layer {node.name!r}")

    def _on_path(self) -> set:
        """Data nodes from which the output is reached (the ones relevance flows through)."""
        keep: set = set()
        stack = [a for a in self.output.all_input_nodes]
        while stack:
            node = stack.pop()
            if node in keep or not self.nodes[node].is_data:
                continue
            keep.add(node)
            stack.extend(self.nodes[node].data_args)
        return keep

    # the runtime program: plain Python steps over integer slots (nothing of torch.fx is touched
    # while explaining, so that dynamo traces the whole explanation into one graph)

    def _attr(self, target: str):
        obj = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def _compile(self):
        slots = {node: i for i, node in enumerate(self.graph_nodes)}
        self.n_slots = len(self.graph_nodes)
        self.input_slots = [(slots[ph], ph.target, ph.args[0] if ph.args else _NO_DEFAULT)
                            for ph in self.placeholders]
        self.steps = []
        for node in self.graph_nodes:
            if node.op in ("placeholder", "output"):
                continue
            self.steps.append(_Step(self, node, slots))
        self.output_template = _template(self.output.args[0], slots)
        self.output_slots = [s for s in _refs(self.output_template) if self.nodes[self.graph_nodes[s]].is_data]

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

    def forward(self, params, x):
        """One forward pass storing every node's value; returns ``(values, layer params, output)``."""
        values = self._inputs(x)
        cache: dict = {}
        for step in self.steps:
            kind = step.kind
            if kind == "get_attr":
                values[step.slot] = params[step.target] if step.target in params else step.constant
            elif kind == "kernel":
                x_in = values[step.x]
                p = step.params(params, values) if step.params_need_values else step.params(params)
                if step.fold_linear and x_in.ndim != 2:
                    raise fail(self.where, f"a batch norm follows linear layer {step.name!r} on a "
                                           f"{x_in.ndim}-d input; fxattr folds it only for (batch, "
                                           "features) inputs")
                values[step.slot] = step.layer.forward(x_in, p)
                cache[step.slot] = p
            elif kind == "folded":
                values[step.slot] = values[step.x]
            elif step.pool_with_indices is not None and values[step.x].ndim == step.pool_ndim:
                # the winners' indices, so that the reverse pass does not pool again
                values[step.slot], cache[step.slot] = step.pool_with_indices(values[step.x])
            elif kind == "batchnorm":
                p = step.params(params)
                values[step.slot] = step.layer.forward(values[step.x], p)
                cache[step.slot] = p
            else:
                values[step.slot] = step.call(resolve_args(step.args, values), resolve_args(step.kwargs, values),
                                              params)
        return values, cache, resolve_args(self.output_template, values)

    def explain(self, params, x, target, *, seed: str = "value"):
        """Relevance (or modified gradient) at ``x`` for ``target``; ``seed`` is ``"value"``
        (the selected output's value: LRP), ``"positive"`` (its positive part: DeepTaylor) or
        ``"one"`` (gradient-type)."""
        values, cache, raw = self.f.guarded(x, lambda: self.forward(params, x), self.where)
        out = self.f.output(raw) if self.f.output is not None else raw
        if not isinstance(out, Tensor) or out.ndim == 0 or out.shape[0] != 1:
            raise fail(self.where, "the model must return a tensor with a batch axis (pass "
                                   "output=callable to functionalize to choose one)")
        y = out[0]
        grad = torch.func.grad(lambda t: select(self.where, t, target))(y)
        if seed == "value":
            relevance_y = y * grad
        elif seed == "positive":  # DeepTaylor: iNNvestigate appends a ReLU to the outputs
            relevance_y = y.clamp(min=0) * grad
        else:
            relevance_y = grad
        relevance_y = relevance_y.unsqueeze(0)

        relevance: dict = {}
        self._seed_output(relevance, values, relevance_y)
        for step in reversed(self.steps):
            if step.slot not in relevance:
                continue
            for slot, r in self._reverse(step, values, cache, params, relevance.pop(step.slot)):
                _accumulate(relevance, slot, r)
        return self._input_relevance(x, values, relevance)

    def _seed_output(self, relevance, values, relevance_y):
        template = self.output_template
        if isinstance(template, ArgRef) and self.f.output is None:
            if template.slot in self.output_slots:
                relevance[template.slot] = relevance_y
            return
        data = self.output_slots

        def pick(*vals):
            raw = resolve_args(template, values, dict(zip(data, vals)))
            return self.f.output(raw) if self.f.output is not None else raw
        _, vjp = torch.func.vjp(pick, *[values[s] for s in data])
        for slot, r in zip(data, vjp(relevance_y)):
            _accumulate(relevance, slot, r)

    def _input_relevance(self, x, values, relevance):
        def one(slot):
            r = relevance.get(slot)
            return torch.zeros_like(values[slot][0]) if r is None else r[0]
        if isinstance(x, dict):
            return {name: one(slot) for slot, name, _ in self.input_slots if name in x}
        if isinstance(x, tuple):
            return tuple(one(slot) for slot, _, _ in self.input_slots[:len(x)])
        return one(self.input_slots[0][0])

    def _reverse(self, step, values, cache, params, rel):
        kind = step.kind
        gradient_mode = self.composite is None
        if kind == "folded":
            return [(step.x, rel)]
        if kind in ("kernel", "batchnorm"):
            x_in, p = values[step.x], cache[step.slot]
            if gradient_mode:
                return [(step.x, step.layer.transpose(rel, p, x_in))]
            return [(step.x, step.rule.reverse(step.layer, p, x_in, values[step.slot], rel))]
        if kind == "activation":
            if not gradient_mode:
                return [(step.x, rel)]
            if step.relu and self.relu_mode == "deconvnet":
                return [(step.x, rel.clamp(min=0))]
            if step.relu and self.relu_mode == "guided":
                rel = rel.clamp(min=0)
            return self._vjp(step, values, params, rel)
        if kind == "identity" and (not gradient_mode or step.op == "module"):
            return [(step.x, rel)]
        if kind in ("avgpool", "add", "batchnorm_f", "scale") and not gradient_mode:
            rule = step.rule if step.rule is not None else _SCALE_RULE
            if rule.name == "gradient":
                return self._vjp(step, values, params, rel)
            if rule.name == "pass":
                if len(step.data_slots) != 1:
                    raise fail(self.where, f"the pass rule cannot split relevance over the "
                                           f"{len(step.data_slots)} inputs of {step.name!r}")
                return [(step.data_slots[0], rel)]
            fn, primals = self._bound(step, values, params)
            _, vjp = torch.func.vjp(fn, *primals)
            grads = vjp(rel / rule.stabilise(values[step.slot]))
            return [(s, v * g) for s, v, g in zip(step.data_slots, primals, grads)]
        if step.slot in cache and step.pool_with_indices is not None:  # winner takes all
            x_in = values[step.x]
            flat = torch.zeros_like(x_in).flatten(2).scatter_add(2, cache[step.slot].flatten(2),
                                                                  rel.flatten(2))
            return [(step.x, flat.view_as(x_in))]
        # routing, max pooling (winner takes all) and, in gradient mode, everything else
        return self._vjp(step, values, params, rel)

    def _bound(self, step, values, params):
        """``fn(*data_values)``: the node as a function of its data inputs (others fixed)."""
        data = step.data_slots

        def fn(*vals):
            override = dict(zip(data, vals))
            return step.call(resolve_args(step.args, values, override), resolve_args(step.kwargs, values, override),
                             params)
        return fn, [values[s] for s in data]

    def _vjp(self, step, values, params, rel):
        fn, primals = self._bound(step, values, params)
        out, vjp = torch.func.vjp(fn, *primals)
        return list(zip(step.data_slots, vjp(_fill(rel, out))))


_NO_DEFAULT = object()
_INDEXED_MAXPOOL = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}
_SCALE_RULE = R.z()


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


class _Step:
    """One node of the runtime program."""

    def __init__(self, plan: Plan, node: fx.Node, slots: dict):
        info = plan.nodes[node]
        self.slot = slots[node]
        self.name = node.name
        self.kind = "get_attr" if node.op == "get_attr" else (info.kind if info.is_data else "constant")
        self.target = node.target
        self.args = _template(node.args, slots)
        self.kwargs = _template(node.kwargs, slots)
        self.data_slots = [slots[a] for a in info.data_args]
        first = node.args[0] if node.args else None
        self.x = slots[first] if isinstance(first, fx.Node) else None
        self.layer, self.rule, self.relu = info.layer, info.rule, info.relu
        self.params = info.params
        self.params_need_values = getattr(info.params, "needs_values", False)
        if self.params_need_values:  # a functional layer: weight and bias are values of the graph
            by_node, value_slots = info.params, {n: slots[n] for n in node.all_input_nodes}

            def params_from_values(p, values):
                return by_node(p, {n: values[s] for n, s in value_slots.items()})
            self.params = params_from_values
        self.fold_linear = info.fold is not None and info.layer is not None and info.layer.kind == "linear"
        self.constant = plan._attr(node.target) if node.op == "get_attr" and node.target not in plan.param_names else None
        self.op = {"call_module": "module", "call_method": "method", "call_function": "function",
                   "get_attr": "get_attr"}[node.op]
        if node.op == "call_module":
            module = plan.gm.get_submodule(node.target)
            names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
            prefix = node.target

            def call(args, kwargs, params):
                own = {n: params[f"{prefix}.{n}"] for n in names if f"{prefix}.{n}" in params}
                if own:
                    return torch.func.functional_call(module, own, args, kwargs)
                return module(*args, **kwargs)
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
            module = plan.gm.get_submodule(node.target)
            if type(module) in _INDEXED_MAXPOOL and not module.return_indices:
                pool = _INDEXED_MAXPOOL[type(module)]
                settings = (module.kernel_size, module.stride, module.padding, module.dilation,
                            module.ceil_mode)
                self.pool_with_indices = lambda t: pool(t, *settings, return_indices=True)
                self.pool_ndim = {nn.MaxPool1d: 3, nn.MaxPool2d: 4, nn.MaxPool3d: 5}[type(module)]


def _fill(rel, out):
    """Relevance of a structured output with ``None`` (no user) replaced by zeros."""
    if isinstance(out, Tensor):
        return rel
    return type(out)(_fill(r, o) if r is not None else torch.zeros_like(o) for r, o in zip(rel, out))


def _add(a, b):
    if isinstance(a, Tensor):
        return a + b
    return type(a)(_add(x, y) for x, y in zip(a, b))


def _accumulate(relevance: dict, slot: int, r) -> None:
    relevance[slot] = _add(relevance[slot], r) if slot in relevance else r
