"""The reverse engine: one forward pass over the traced graph, then an explicit reverse pass.

The model's pure graph (:func:`fxattr.graph.trace`) is classified once, node by node, into what
LRP needs to know: kernel layers (Conv1d/2d/3d, Linear, ``F.conv*``, ``F.linear``; an eval batch
norm right after one is folded into it, see :mod:`fxattr.lrp.canonize`), unfolded batch norms,
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
from fxattr.functional import _batch_norm
from fxattr.graph import trace
from fxattr.lrp import rules as R
from fxattr.lrp.canonize import batch_norm_affine, fold
from fxattr.lrp.composites import KERNEL_KINDS, Composite, LayerInfo
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

    __slots__ = ("node", "kind", "data", "data_args", "layer", "info", "rule", "fold",
                 "params", "nonnegative", "relu", "module")

    def __init__(self, node: fx.Node):
        self.node = node
        self.kind = "constant"
        self.data = False
        self.data_args: list[fx.Node] = []
        self.layer: R.Layer | None = None
        self.info: LayerInfo | None = None
        self.rule: R.Rule | None = None
        self.fold: fx.Node | None = None  # the batch norm folded into this kernel layer
        self.params: Callable | None = None  # params dict -> {"weight", "bias"} of the layer
        self.nonnegative = False
        self.relu = False
        self.module = None


def _conv_layer(module: nn.Module, nonnegative: bool) -> R.Layer:
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

    return R.Layer("conv", forward, transpose, bias, nonnegative)


def _linear_layer(nonnegative: bool) -> R.Layer:
    def forward(x, p):
        return F.linear(x, p["weight"], p["bias"])

    def transpose(s, p, x):
        return s @ p["weight"]

    def bias(b, z):
        return b

    return R.Layer("linear", forward, transpose, bias, nonnegative)


def _functional_kernel_layer(kind: str, fn, rest_args: tuple, rest_kwargs: dict,
                             nonnegative: bool) -> R.Layer:
    def forward(x, p):
        return fn(x, p["weight"], p["bias"], *rest_args, **rest_kwargs)

    def transpose(s, p, x):
        if kind == "linear":
            return s @ p["weight"]
        return _vjp_transpose(forward, s, p, x)

    def bias(b, z):
        return b if kind == "linear" else b.reshape((-1,) + (1,) * (z.ndim - 2))

    return R.Layer(kind, forward, transpose, bias, nonnegative)


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

    # classification

    def _classify(self, node: fx.Node) -> _Node:
        info = _Node(node)
        inputs = [a for a in node.all_input_nodes]
        if node.op == "placeholder":
            info.kind, info.data = "input", True
            return info
        if node.op in ("get_attr", "output"):
            info.kind = node.op
            return info
        meta = ((node.op == "call_function" and node.target is getattr
                 and len(node.args) > 1 and node.args[1] in _META_ATTRIBUTES)
                or (node.op == "call_method" and node.target in _META_METHODS))
        info.data_args = [a for a in inputs if self.nodes[a].data]
        info.data = bool(info.data_args) and not meta
        if not info.data:
            return info
        info.kind = self._kind(node, info)
        return info

    def _kind(self, node: fx.Node, info: _Node) -> str:
        target = node.target
        first_is_data = bool(node.args) and isinstance(node.args[0], fx.Node) and self.nodes[node.args[0]].data
        only_first = first_is_data and info.data_args == [node.args[0]]
        if node.op == "call_module":
            module = self.gm.get_submodule(target)
            info.module = module
            if not only_first and not isinstance(module, _ROUTE_MODULES):
                return "unsupported"
            if isinstance(module, _CONV_MODULES):
                info.layer = _conv_layer(module, False)
                info.params = self._module_kernel_params(target, module)
                return "kernel"
            if isinstance(module, nn.Linear):
                info.layer = _linear_layer(False)
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
            if isinstance(weight, fx.Node) and not self.nodes[weight].data:
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
            if len(info.data_args) == 1 and not (target in (operator.truediv, torch.div, "div")
                                                 and not first_is_data):
                return "scale"
            return "unsupported"
        if (target in _IDENTITY_METHODS) if is_method else (target in _IDENTITY_FUNCTIONS):
            return "identity" if only_first else "unsupported"
        if (target in _ROUTE_METHODS) if is_method else (target in _ROUTE_FUNCTIONS):
            return "route"
        return "unsupported"

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
            if info.data and info.kind in keep:
                info.nonnegative = all(self.nodes[a].nonnegative for a in info.data_args)
        for node, info in self.nodes.items():
            if info.kind in ("kernel", "batchnorm") and info.layer is not None:
                x_nonneg = self.nodes[node.args[0]].nonnegative
                if not isinstance(info.layer, R.Layer):
                    _, kind, fn, rest, kwargs = info.layer
                    kwargs = {k: v for k, v in kwargs.items() if k not in ("weight", "bias")}
                    info.layer = _functional_kernel_layer(kind, fn, rest, kwargs, x_nonneg)
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
            if info.data and info.kind in ("batchnorm", "avgpool", "add", "activation", "maxpool",
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
                                           f"{node.name!r}; expected an fxattr.lrp.rules.Rule")
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
            if node in keep or not self.nodes[node].data:
                continue
            keep.add(node)
            stack.extend(self.nodes[node].data_args)
        return keep

    # evaluation

    def _inputs(self, x) -> dict:
        batched = optree.tree_map(lambda t: t.unsqueeze(0), x, namespace="torch")
        values: dict = {}
        if isinstance(batched, dict):
            for ph in self.placeholders:
                if ph.target in batched:
                    values[ph] = batched[ph.target]
                elif ph.args:
                    values[ph] = ph.args[0]
                else:
                    raise fail(self.where, f"x has no entry {ph.target!r} for the model's input")
            return values
        args = batched if isinstance(batched, tuple) else (batched,)
        for i, ph in enumerate(self.placeholders):
            if i < len(args):
                values[ph] = args[i]
            elif ph.args:
                values[ph] = ph.args[0]
            else:
                raise fail(self.where, f"the model takes {len(self.placeholders)} inputs, x gives {len(args)}")
        return values

    def _call(self, node: fx.Node, args, kwargs, params):
        info = self.nodes[node]
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            own = _module_params(module, node.target, params)
            if own:
                return torch.func.functional_call(module, own, args, kwargs)
            return module(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.target is F.batch_norm or info.kind in ("batchnorm_f",):
            return _batch_norm(*args, **kwargs)
        return node.target(*args, **kwargs)

    def _bound(self, node: fx.Node, values: dict, params):
        """``fn(*data_values)``: the node as a function of its data inputs (others fixed)."""
        data = self.nodes[node].data_args

        def fn(*vals):
            lookup = dict(zip(data, vals))

            def value(n):
                return lookup[n] if n in lookup else values[n]
            return self._call(node, map_arg(node.args, value), map_arg(node.kwargs, value), params)
        return fn, [values[a] for a in data]

    def forward(self, params, x):
        """One forward pass storing every node's value; returns ``(values, layer cache, output)``."""
        values = self._inputs(x)
        cache: dict = {}
        for node in self.graph_nodes:
            op = node.op
            if op == "placeholder":
                continue
            if op == "output":
                break
            if op == "get_attr":
                values[node] = params[node.target] if node.target in params else self._attr(node.target)
                continue
            info = self.nodes[node]
            if info.kind == "kernel":
                x_in = values[node.args[0]]
                if getattr(info.params, "needs_values", False):
                    p = info.params(params, values)
                else:
                    p = info.params(params)
                if info.fold is not None and info.layer.kind == "linear" and x_in.ndim != 2:
                    raise fail(self.where, f"batch norm {info.fold.name!r} follows linear layer "
                                           f"{node.name!r} on a {x_in.ndim}-d input; fxattr folds it "
                                           "only for (batch, features) inputs")
                values[node] = info.layer.forward(x_in, p)
                cache[node] = p
                continue
            if info.kind == "folded":
                values[node] = values[node.args[0]]
                continue
            if info.kind == "batchnorm":
                p = info.params(params)
                values[node] = info.layer.forward(values[node.args[0]], p)
                cache[node] = p
                continue
            args = map_arg(node.args, values.__getitem__)
            kwargs = map_arg(node.kwargs, values.__getitem__)
            values[node] = self._call(node, args, kwargs, params)
        out = map_arg(self.output.args[0], values.__getitem__)
        return values, cache, out

    def _attr(self, target: str):
        obj = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    # the reverse pass

    def explain(self, params, x, target, *, seed: str = "value"):
        """Relevance (or modified gradient) at ``x`` for ``target``; ``seed`` is ``"value"``
        (the selected output's value: LRP) or ``"one"`` (gradient-type)."""
        if not torch.compiler.is_compiling():
            self.f.check_input(x, self.where)
        values, cache, raw = self.forward(params, x)
        out = self.f.output(raw) if self.f.output is not None else raw
        if not isinstance(out, Tensor) or out.ndim == 0 or out.shape[0] != 1:
            raise fail(self.where, "the model must return a tensor with a batch axis (pass "
                                   "output=callable to functionalize to choose one)")
        y = out[0]
        grad = torch.func.grad(lambda t: select(self.where, t, target))(y)
        relevance_y = (y * grad if seed == "value" else grad).unsqueeze(0)

        relevance: dict = {}
        self._seed_output(relevance, values, relevance_y)
        for node in reversed(self.graph_nodes):
            if node not in relevance or node.op == "placeholder":
                continue
            info = self.nodes[node]
            incoming = self._reverse(node, info, values, cache, params, relevance.pop(node))
            for arg, r in incoming:
                _accumulate(relevance, arg, r)
        return self._input_relevance(x, values, relevance)

    def _seed_output(self, relevance, values, relevance_y):
        spec = self.output.args[0]
        if isinstance(spec, fx.Node) and self.f.output is None:
            relevance[spec] = relevance_y
            return
        leaves, tree = pytree.tree_flatten(spec)
        data = [i for i, leaf in enumerate(leaves) if isinstance(leaf, fx.Node) and self.nodes[leaf].data]
        leaf_values = [values[leaf] if isinstance(leaf, fx.Node) else leaf for leaf in leaves]

        def pick(*vals):
            current = list(leaf_values)
            for i, v in zip(data, vals):
                current[i] = v
            raw = pytree.tree_unflatten(current, tree)
            return self.f.output(raw) if self.f.output is not None else raw
        _, vjp = torch.func.vjp(pick, *[leaf_values[i] for i in data])
        for i, r in zip(data, vjp(relevance_y)):
            _accumulate(relevance, leaves[i], r)

    def _input_relevance(self, x, values, relevance):
        def one(ph):
            r = relevance.get(ph)
            return torch.zeros_like(values[ph][0]) if r is None else r[0]
        if isinstance(x, dict):
            return {ph.target: one(ph) for ph in self.placeholders if ph.target in x}
        if isinstance(x, tuple):
            return tuple(one(ph) for ph in self.placeholders[:len(x)])
        return one(self.placeholders[0])

    def _reverse(self, node, info, values, cache, params, rel):
        kind = info.kind
        gradient_mode = self.composite is None
        if kind == "folded":
            return [(node.args[0], rel)]
        if kind in ("kernel", "batchnorm"):
            x_node = node.args[0]
            x_in, p = values[x_node], cache[node]
            if gradient_mode:
                return [(x_node, info.layer.transpose(rel, p, x_in))]
            return [(x_node, info.rule.reverse(info.layer, p, x_in, values[node], rel))]
        if kind == "activation":
            x_node = node.args[0]
            if not gradient_mode:
                return [(x_node, rel)]
            if info.relu and self.relu_mode == "deconvnet":
                return [(x_node, rel.clamp(min=0))]
            if info.relu and self.relu_mode == "guided":
                rel = rel.clamp(min=0)
            return self._vjp(node, values, params, rel)
        if kind == "identity":
            return [(node.args[0], rel)] if not gradient_mode or node.op == "call_module" \
                else self._vjp(node, values, params, rel)
        if kind in ("avgpool", "add", "batchnorm_f", "scale") and not gradient_mode:
            rule = info.rule if info.rule is not None else _SCALE_RULE
            if rule.name == "gradient":
                return self._vjp(node, values, params, rel)
            if rule.name == "pass":
                if len(info.data_args) != 1:
                    raise fail(self.where, f"the pass rule cannot split relevance over the "
                                           f"{len(info.data_args)} inputs of {node.name!r}")
                return [(info.data_args[0], rel)]
            fn, primals = self._bound(node, values, params)
            _, vjp = torch.func.vjp(fn, *primals)
            grads = vjp(rel / rule.stabilise(values[node]))
            return [(a, v * g) for a, v, g in zip(info.data_args, primals, grads)]
        # routing, max pooling (winner takes all) and, in gradient mode, everything else
        return self._vjp(node, values, params, rel)

    def _vjp(self, node, values, params, rel):
        fn, primals = self._bound(node, values, params)
        out, vjp = torch.func.vjp(fn, *primals)
        rel = _fill(rel, out)
        return list(zip(self.nodes[node].data_args, vjp(rel)))


_SCALE_RULE = R.z()


def _fill(rel, out):
    """Relevance of a structured output with ``None`` (no user) replaced by zeros."""
    if isinstance(out, Tensor):
        return rel
    return type(out)(_fill(r, o) if r is not None else torch.zeros_like(o) for r, o in zip(rel, out))


def _accumulate(relevance: dict, node: fx.Node, r) -> None:
    if node in relevance:
        relevance[node] = optree.tree_map(torch.add, relevance[node], r, namespace="torch")
    else:
        relevance[node] = r
