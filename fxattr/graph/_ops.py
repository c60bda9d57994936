"""The one catalogue of operation kinds: what each node of a captured graph is.

Every graph-based method (LRP and its composites, DeepTaylor, guided backprop / deconvnet,
DeepLIFT, PatternNet / PatternAttribution) reads the graph through :func:`classify`, which gives
each data node one *kind*:

==================  ==============================================================================
``kernel``          Conv1d/2d/3d, Linear (modules) and ``F.conv*`` / ``F.linear`` with a parameter
                    weight: a :class:`Layer` (forward, transpose, bias) the rules work on
``batchnorm``       an eval ``nn.BatchNorm*`` (affine per channel; folded into the kernel layer
                    before it when it alone reads that layer, see ``fold``)
``batchnorm_f``     eval ``F.batch_norm``
``activation``      element-wise activations (``relu`` marks the ReLUs, ``nonnegative`` the
                    functions whose output is >= 0)
``maxpool``         max pooling (winner takes all)
``avgpool``         average pooling, means, sums
``add``             additions and subtractions of data
``scale``           a data tensor scaled by a constant (``x * c``, ``x / c``, ``-x``)
``identity``        dropout, clone, contiguous, ...
``route``           concatenation, split, reshape/view/flatten, permute, indexing, padding, ...
``unsupported``     anything else (an error on the data path of a method that needs a rule)
==================  ==============================================================================

Adding an operation kind: ``register(OpKind(name, functions=..., methods=..., modules=...,
accepts=...))``. Registered kinds are consulted for the nodes the built-in classification leaves
``unsupported`` (so ``x * y`` of two data tensors, ``F.layer_norm``, ``softmax``...), in the
order of registration. Each method then reverses the kind through its own table of reverse
functions (``fxattr.propagation._engine.REVERSE``), written against :class:`NodeView`
(:mod:`fxattr.graph._program`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = [
    "SUPPORTED",
    "Layer",
    "OpKind",
    "batch_norm_layer",
    "classify",
    "conv_layer",
    "conv_transpose_layer",
    "describe",
    "functional_kernel_layer",
    "linear_layer",
    "register",
    "registered_kinds",
    "unregister",
]

Params = dict


class Layer(NamedTuple):
    """A linear layer as the rules see it.

    Attributes:
        kind: ``"conv"``, ``"linear"`` or ``"batchnorm"`` (an unfolded eval batch norm,
            ``x * weight + bias`` per channel).
        forward: ``forward(x, params) -> z``; ``params`` holds ``weight`` and ``bias`` (or ``None``).
        transpose: ``transpose(s, params, x) -> W^T s``, the vector-Jacobian product of ``forward``
            w.r.t. its input (``x`` only gives the shape).
        bias: ``bias(b, z) -> b`` broadcast against the output ``z``.
        nonnegative_input: ``True`` when the input is known to be ``>= 0`` (it comes from a ReLU),
            so rules may skip their ``x-`` terms (they are exactly zero).
        groups: ``1`` for a dense layer or a convolution with ``groups == 1`` whose ``forward`` and
            ``transpose`` accept any number of channels (input axis 1 of a convolution, the last
            axis of a dense layer); ``None`` when unknown. With ``1`` the flat rule computes its
            all-ones sums on one channel instead of a full layer.
    """

    kind: str
    forward: Callable[[Tensor, Params], Tensor]
    transpose: Callable[[Tensor, Params, Tensor], Tensor]
    bias: Callable[[Tensor, Tensor], Tensor]
    nonnegative_input: bool = False
    groups: int | None = None


class OpKind(NamedTuple):
    """A registered operation kind (see the module doc).

    Attributes:
        name: the kind's name (``"product"``, ``"layer_norm"``...); the key of the methods'
            reverse tables.
        functions: ``call_function`` targets (``operator.mul``, ``F.layer_norm``...).
        methods: ``call_method`` names (``"mul"``, ``"softmax"``...).
        modules: module types of ``call_module`` nodes (``nn.LayerNorm``...).
        accepts: ``accepts(node, data_refs) -> bool`` narrows the match (``data_refs``: how many
            arguments of the node are data, the same node twice counting twice); ``None``: any.
    """

    name: str
    functions: frozenset = frozenset()
    methods: frozenset = frozenset()
    modules: tuple = ()
    accepts: Callable[[fx.Node, int], bool] | None = None


_REGISTERED: list[OpKind] = []


def register(kind: OpKind) -> OpKind:
    """Adds an operation kind to the catalogue (replacing one of the same name)."""
    if not isinstance(kind, OpKind):
        raise TypeError(f"register takes an OpKind, got {type(kind).__name__}")
    kind = kind._replace(functions=frozenset(kind.functions), methods=frozenset(kind.methods),
                         modules=tuple(kind.modules))
    _REGISTERED[:] = [k for k in _REGISTERED if k.name != kind.name] + [kind]
    return kind


def unregister(name: str) -> None:
    """Removes the registered kind ``name`` (if any)."""
    _REGISTERED[:] = [k for k in _REGISTERED if k.name != name]


def registered_kinds() -> tuple[OpKind, ...]:
    return tuple(_REGISTERED)


# --- the built-in kinds --------------------------------------------------------------------------

CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Tanh, nn.Sigmoid, nn.PReLU,
    nn.Threshold, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink, nn.RReLU,
)
NONNEGATIVE_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
MAXPOOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
                   nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
AVGPOOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                   nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                    nn.AlphaDropout, nn.FeatureAlphaDropout)
ROUTE_MODULES = (nn.Flatten, nn.Unflatten, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
                 nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)

ACTIVATION_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardtanh,
    F.hardswish, F.hardsigmoid, F.softplus, F.tanh, F.sigmoid, F.logsigmoid, F.softsign,
    F.prelu, F.threshold, F.rrelu, torch.relu, torch.tanh, torch.sigmoid, torch.selu, torch.celu,
    torch.nn.functional.tanhshrink,
}
ACTIVATION_METHODS = {"relu", "tanh", "sigmoid"}
RELU = {F.relu, torch.relu, "relu"}
NONNEGATIVE_FUNCTIONS = {F.relu, F.relu6, torch.relu, torch.sigmoid, F.sigmoid, F.hardsigmoid,
                         F.softplus, "relu", "sigmoid"}
MAXPOOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d,
                     F.adaptive_max_pool2d, F.adaptive_max_pool3d, torch.max_pool1d,
                     torch.max_pool2d, torch.max_pool3d}
AVGPOOL_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                     F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.mean, torch.sum}
AVGPOOL_METHODS = {"mean", "sum"}
ADD_FUNCTIONS = {operator.add, operator.sub, torch.add, torch.sub}
ADD_METHODS = {"add", "sub"}
SCALE_FUNCTIONS = {operator.mul, operator.truediv, operator.neg, torch.mul, torch.div, torch.neg}
SCALE_METHODS = {"mul", "div", "neg"}
IDENTITY_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                      F.feature_alpha_dropout}
IDENTITY_METHODS = {"contiguous", "clone", "detach"}
ROUTE_FUNCTIONS = {
    torch.cat, torch.concat, torch.stack, torch.flatten, torch.reshape, torch.permute,
    torch.transpose, torch.squeeze, torch.unsqueeze, operator.getitem, torch.split, torch.chunk,
    torch.unbind, torch.t, torch.narrow, torch.movedim, torch.swapaxes, torch.clone, F.pad,
    F.pixel_shuffle, F.pixel_unshuffle, torch.hstack, torch.vstack, torch.unflatten,
}
ROUTE_METHODS = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "squeeze", "unsqueeze",
    "split", "chunk", "unbind", "t", "narrow", "movedim", "swapaxes", "expand", "expand_as",
    "view_as", "reshape_as", "to", "float", "double", "half", "type", "type_as", "__getitem__", "repeat",
}
META_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "layout"}
META_METHODS = {"size", "dim", "numel", "nelement", "stride", "get_device"}
KERNEL_FUNCTIONS = {F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv", F.linear: "linear"}

SUPPORTED = ("convolutions and linear layers (modules or F.conv*/F.linear), batch norm (eval), "
             "element-wise activations (ReLU, LeakyReLU, ELU, GELU, SiLU, tanh, sigmoid, ...), "
             "max/average/adaptive pooling, means and sums, additions and subtractions, scaling by "
             "constants, concatenation/stack/split/chunk, reshape/view/flatten/permute/transpose/"
             "squeeze/indexing/padding, dropout and identities")


def tensor_size(t: Tensor, dim: int) -> int:
    """``t.size(dim)``: what a captured ``aten.sym_size.int`` node computes (which has no vmap
    batching rule)."""
    return t.size(dim)


def is_meta(node: fx.Node) -> bool:
    """A node that reads only a tensor's shape, dtype, ...: never data."""
    return ((node.op == "call_function" and node.target is getattr and len(node.args) > 1
             and node.args[1] in META_ATTRIBUTES)
            or (node.op == "call_function" and node.target is tensor_size)
            or (node.op == "call_method" and node.target in META_METHODS))


class Classified(NamedTuple):
    kind: str
    relu: bool = False
    nonnegative: bool = False
    kernel: str | None = None  # "conv" / "linear" for kernels


def classify(node: fx.Node, module: nn.Module | None, is_data: Callable[[fx.Node], bool],
             data_args: list, data_refs: int) -> Classified:
    """The kind of a data node (see the module doc); ``module`` is the called module of a
    ``call_module`` node, ``is_data`` tells which nodes carry data, ``data_args`` are the node's
    distinct data inputs and ``data_refs`` how many of its arguments are data."""
    builtin = _builtin(node, module, is_data, data_args, data_refs)
    if builtin.kind != "unsupported":
        return builtin
    for kind in _REGISTERED:
        if node.op == "call_module":
            hit = isinstance(module, kind.modules) if kind.modules else False
        elif node.op == "call_method":
            hit = node.target in kind.methods
        else:
            hit = node.target in kind.functions
        if hit and (kind.accepts is None or kind.accepts(node, data_refs)):
            return Classified(kind.name)
    return builtin


def _builtin(node, module, is_data, data_args, data_refs) -> Classified:
    target = node.target
    first_is_data = bool(node.args) and isinstance(node.args[0], fx.Node) and is_data(node.args[0])
    only_first = first_is_data and data_args == [node.args[0]]
    if node.op == "call_module":
        if not only_first and not isinstance(module, ROUTE_MODULES):
            return Classified("unsupported")
        if isinstance(module, CONV_MODULES):
            return Classified("kernel", kernel="conv")
        if isinstance(module, CONV_TRANSPOSE_MODULES):
            return Classified("kernel", kernel="conv_transpose")
        if isinstance(module, nn.Linear):
            return Classified("kernel", kernel="linear")
        if isinstance(module, BN_MODULES):
            if module.training or module.running_mean is None:
                return Classified("unsupported")
            return Classified("batchnorm")
        if isinstance(module, ACTIVATION_MODULES):
            return Classified("activation", relu=type(module) is nn.ReLU,
                              nonnegative=isinstance(module, NONNEGATIVE_MODULES))
        if isinstance(module, MAXPOOL_MODULES):
            return Classified("maxpool")
        if isinstance(module, AVGPOOL_MODULES):
            return Classified("avgpool")
        if isinstance(module, IDENTITY_MODULES):
            return Classified("identity")
        if isinstance(module, ROUTE_MODULES):
            return Classified("route")
        return Classified("unsupported")
    is_method = node.op == "call_method"
    if not is_method and target is torch.addmm:  # HF's Conv1D (GPT-2): addmm(bias, x, weight)
        x, bias, weight = kernel_input(node), node.args[0], node.args[2] if len(node.args) > 2 else None
        if (isinstance(x, fx.Node) and data_args == [x] and not node.kwargs
                and isinstance(weight, fx.Node) and isinstance(bias, fx.Node)):
            return Classified("kernel", kernel="linear")
        return Classified("unsupported")
    if not is_method and target in KERNEL_FUNCTIONS and only_first:
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if isinstance(weight, fx.Node) and not is_data(weight):
            return Classified("kernel", kernel=KERNEL_FUNCTIONS[target])
        return Classified("unsupported")
    if not is_method and target is F.batch_norm and only_first:
        return Classified("batchnorm_f")
    if ((target in ACTIVATION_METHODS) if is_method else (target in ACTIVATION_FUNCTIONS)) and only_first:
        return Classified("activation", relu=target in RELU, nonnegative=target in NONNEGATIVE_FUNCTIONS)
    if not is_method and target in MAXPOOL_FUNCTIONS and only_first:
        return Classified("maxpool")
    if ((target in AVGPOOL_METHODS) if is_method else (target in AVGPOOL_FUNCTIONS)) and only_first:
        return Classified("avgpool")
    if (target in ADD_METHODS) if is_method else (target in ADD_FUNCTIONS):
        return Classified("add")
    if (target in SCALE_METHODS) if is_method else (target in SCALE_FUNCTIONS):
        # count references, not distinct nodes: ``h * h`` is a square, not a scaling
        if data_refs == 1 and not (target in (operator.truediv, torch.div, "div") and not first_is_data):
            return Classified("scale")
        return Classified("unsupported")
    if (target in IDENTITY_METHODS) if is_method else (target in IDENTITY_FUNCTIONS):
        return Classified("identity" if only_first else "unsupported")
    if (target in ROUTE_METHODS) if is_method else (target in ROUTE_FUNCTIONS):
        return Classified("route")
    return Classified("unsupported")


def kernel_input(node: fx.Node):
    """The data argument of a kernel node: the first, except ``addmm(bias, x, weight)``'s."""
    if node.op == "call_function" and node.target is torch.addmm:
        return node.args[1] if len(node.args) > 1 else None
    return node.args[0] if node.args else None


def describe(node: fx.Node, module: nn.Module | None = None, origin: str | None = None) -> str:
    """``node 'name' (function torch.nn.functional.gelu, in module 'encoder.0')``, for errors."""
    if node.op == "call_module":
        what = f"module {node.target!r} ({type(module).__name__})"
    elif node.op == "call_method":
        what = f"method Tensor.{node.target}"
    else:
        target = node.target
        name = getattr(target, "__qualname__", None) or getattr(target, "__name__", repr(target))
        where = getattr(target, "__module__", None) or ""
        what = f"function {where + '.' if where and where != 'builtins' else ''}{name}"
    inside = f", in module {origin!r}" if origin and node.op != "call_module" else ""
    return f"graph node {node.name!r} ({what}{inside})"


# --- kernel layers -------------------------------------------------------------------------------

def _vjp_transpose(forward, s, p, x):
    _, vjp = torch.func.vjp(lambda t: forward(t, p), x)
    return vjp(s)[0]


def conv_layer(module: nn.Module, nonnegative: bool) -> Layer:
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

    return Layer("conv", forward, transpose, bias, nonnegative, groups=module.groups)


def conv_transpose_layer(module: nn.Module, nonnegative: bool) -> Layer:
    """``ConvTranspose1d/2d/3d`` as a kernel layer: its transpose is the convolution with the same
    weight, stride, padding, dilation and groups (the adjoint). ``groups=None``: the weight's input
    axis is 0, so rules never concatenate input channels."""
    n = module.weight.ndim - 2
    forward_fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[n]
    adjoint = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    settings = (module.stride, module.padding, module.output_padding, module.groups, module.dilation)

    def forward(x, p):
        return forward_fn(x, p["weight"], p["bias"], *settings)

    def transpose(s, p, x):
        return adjoint(s, p["weight"], None, module.stride, module.padding, module.dilation, module.groups)

    def bias(b, z):
        return b.reshape((-1,) + (1,) * (z.ndim - 2))

    return Layer("conv", forward, transpose, bias, nonnegative, groups=None)


def linear_layer(nonnegative: bool) -> Layer:
    def forward(x, p):
        return F.linear(x, p["weight"], p["bias"])

    def transpose(s, p, x):
        return s @ p["weight"]

    def bias(b, z):
        return b

    return Layer("linear", forward, transpose, bias, nonnegative, groups=1)


def functional_kernel_layer(kind: str, fn, rest_args: tuple, rest_kwargs: dict,
                            nonnegative: bool) -> Layer:
    if fn is torch.addmm:  # its parameters are given as F.linear's (weight transposed)
        return linear_layer(nonnegative)
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
    return Layer(kind, forward, transpose, bias, nonnegative,
                 groups=groups if type(groups) is int else None)


def _channel_shape(t: Tensor) -> tuple:
    return (1, -1) + (1,) * (t.ndim - 2)


def batch_norm_layer(nonnegative: bool) -> Layer:
    def forward(x, p):
        out = x * p["weight"].reshape(_channel_shape(x))
        return out if p["bias"] is None else out + p["bias"].reshape(_channel_shape(x))

    def transpose(s, p, x):
        return s * p["weight"].reshape(_channel_shape(s))

    def bias(b, z):
        return b.reshape(_channel_shape(z))

    return Layer("batchnorm", forward, transpose, bias, nonnegative)
