"""Capture: the model's pure graph, traced once per input structure, and split at a layer.

``trace(f)`` turns the module of a :class:`~fxattr.functional.FunctionalModel` into a *pure*
``torch.fx.GraphModule`` (module level: ``torch.nn`` modules are leaves, user modules are traced
through, functional ops appear as nodes; in-place ops are replaced by out-of-place ones).
``split(f, layer)`` cuts that graph at a layer into ``body(params, x) -> activation`` and
``head(params, x, activation) -> output``, the two halves every activation-based method needs
(CAM family, layer attributions), as separate graphs that compose with ``torch.vmap``,
``torch.func.grad`` and ``torch.compile``.

What the graph sees is what the model does:

- ``forward`` parameters the explainer does not pass are bound to their defaults before tracing
  (``forward(x, scale=None)`` explained on ``x`` keeps its ``if scale is None`` branch); a
  different input structure (``(x, scale)``) is traced separately (:func:`input_names`);
- tensor attributes that are neither parameters nor buffers (``self.perm = torch.tensor(...)``)
  are constants; parameters and buffers are read from ``params`` under the user's names, tied
  ones under each of their names (:func:`bind`);
- a module with forward hooks is traced *through*, its hooks with it (the engines call kernels
  directly, so a leaf's hooks would be skipped); a hook on the model itself is refused by name;
- a module called several times gives one node per call;
- each node records its module of origin (:func:`origin`), for errors and per-layer choices.

Front-ends, measured on the zoo (capture time on the shared 2-core machine, niced; torchvision
models at 64 px, vit_b_16 at 32 px, maxvit_t at 224 px; transformers tiny random configs, wrapped
as embeddings -> logits)::

    model                 torch.fx     dynamo (torch-function level)   torch.export non-strict (aten)
    resnet50              0.09 s       7.1 s                           2.3 s
    densenet121           0.28 s       37.9 s                          3.1 s
    mobilenet_v3_small    0.10 s       7.0 s                           2.7 s
    efficientnet_b0       1.2 s        14.4 s                          2.9 s
    convnext_tiny         0.26 s       23.5 s                          3.4 s
    swin_t                0.6-6.9 s    > 300 s (killed)                50.6 s
    vit_b_16              0.69 s       13.8 s                          26.7 s
    maxvit_t              23.5 s       > 300 s (killed)                -
    HF BERT / GPT-2 /     fails        3.5-10.6 s (eager and sdpa)     works (aten level)
    Llama / ViT

Choice: torch.fx symbolic tracing is the front-end; torch dynamo is the fallback for the models
torch.fx cannot trace (every Hugging Face model). torch.fx is 20-300x faster to capture on CNNs,
and it keeps ``torch.nn`` modules as nodes, which the methods build on (composites choose rules by
module type and qualified name, batch norms are folded into the module before them, max pooling
keeps its winners, CAM layers and PatternNet patterns are named by module). Dynamo sees any
Python (HF models without patching, hooks, defaults bound as called), at the torch-function
level the catalogue speaks (``F.linear``, ``F.layer_norm``, ``scaled_dot_product_attention``),
but it needs an example input (so ``functionalize(model, input_shape=...)``; it cannot capture
from inside ``torch.vmap``), specialises shapes to it (except sizes ``input_shape`` leaves free,
``(None, hidden)``: those are captured symbolically, so one graph serves every sequence length),
and took minutes on swin_t and maxvit_t.
torch.export (non-strict) works on both but at the aten level (``aten.addmm``,
``aten.convolution``...), a second vocabulary for every method's rules, and is 10-30x slower than
torch.fx on CNNs. The dynamo graph is normalised into the engine's vocabulary (parameters renamed
to the user's qualified names, other tensors constants, in-place ops purified, ``aten.sym_size``
as a vmappable shape read, module of origin from ``nn_module_stack``, and the node each module
call returns recovered from those stacks, so :func:`split` names layers by module path on both).

The traced graph shares the submodules of the user's module and never modifies them: activation
modules built with ``inplace=True`` are replaced *in the graph* by their functional out-of-place
equivalent, not switched.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import operator
import re
import weakref
from collections.abc import Callable, Mapping

import optree
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_unflatten as pytree_unflatten
from torch.nn.modules.lazy import LazyModuleMixin

from fxattr.errors import FxattrError, fail
from fxattr.functional import EvalBatchNormAsElementwise, FunctionalModel, call_privately
from fxattr.graph._ops import tensor_size

__all__ = ["split", "trace"]

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# operator.iadd & co. mutate their first argument; their pure equivalents.
_INPLACE_OPERATORS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
    operator.imod: operator.mod, operator.ipow: operator.pow, operator.imatmul: operator.matmul,
    operator.iand: operator.and_, operator.ior: operator.or_, operator.ixor: operator.xor,
    operator.ilshift: operator.lshift, operator.irshift: operator.rshift,
}


def _functional_activation(m: nn.Module):
    """``(function, extra args)`` computing ``m`` out of place, for a module with ``inplace=True``."""
    table = [
        (nn.ReLU6, lambda: (F.relu6, ())),
        (nn.ReLU, lambda: (F.relu, ())),
        (nn.LeakyReLU, lambda: (F.leaky_relu, (m.negative_slope,))),
        (nn.Hardtanh, lambda: (F.hardtanh, (m.min_val, m.max_val))),
        (nn.ELU, lambda: (F.elu, (m.alpha,))),
        (nn.CELU, lambda: (F.celu, (m.alpha,))),
        (nn.SELU, lambda: (F.selu, ())),
        (nn.SiLU, lambda: (F.silu, ())),
        (nn.Mish, lambda: (F.mish, ())),
        (nn.Hardswish, lambda: (F.hardswish, ())),
        (nn.Hardsigmoid, lambda: (F.hardsigmoid, ())),
        (nn.Threshold, lambda: (F.threshold, (m.threshold, m.value))),
        (nn.RReLU, lambda: (F.rrelu, (m.lower, m.upper, m.training))),
        (nn.AlphaDropout, lambda: (F.alpha_dropout, (m.p, m.training))),
        (nn.FeatureAlphaDropout, lambda: (F.feature_alpha_dropout, (m.p, m.training))),
        (nn.Dropout1d, lambda: (F.dropout1d, (m.p, m.training))),
        (nn.Dropout2d, lambda: (F.dropout2d, (m.p, m.training))),
        (nn.Dropout3d, lambda: (F.dropout3d, (m.p, m.training))),
        (nn.Dropout, lambda: (F.dropout, (m.p, m.training))),
    ]
    for kind, build in table:
        if type(m) is kind:
            return build()
    return None


class _Tracer(fx.Tracer):
    """``symbolic_trace``'s tracer that also records which node each module call returned, so that
    a layer can be named by the qualified name of a module that is traced through (``layer4``),
    and that traces *through* every module with forward hooks, so that the hooks are part of the
    graph (a leaf's hooks would be skipped by the engines, which call kernels directly)."""

    def __init__(self):
        super().__init__()
        self.module_outputs: dict[str, list] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if _hooks(m) or _global_hooks():
            return False
        return super().is_leaf_module(m, qualname)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        # A floating-point buffer stays a read of ``params`` (a get_attr node). torch.fx's default
        # runs the buffer's uses once at trace time and bakes the result into a constant, so a
        # buffer ``params`` replaces (a per-example attention mask, an ensemble's statistics) would
        # be ignored by the graph methods but not by the gradient ones: a silently wrong result.
        # Integer buffers (index tables) stay constants: they are not in ``params``.
        if isinstance(attr_val, torch.Tensor) and not isinstance(attr_val, nn.Parameter) \
                and attr_val.is_floating_point() and not self.proxy_buffer_attributes:
            self.proxy_buffer_attributes = True
            try:
                return super().getattr(attr, attr_val, parameter_proxy_cache)
            finally:
                self.proxy_buffer_attributes = False
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m, forward, args, kwargs):
        out = super().call_module(m, forward, args, kwargs)
        name = self.path_of_module(m)
        node = out.node if isinstance(out, fx.Proxy) else None
        self.module_outputs.setdefault(name, []).append(node)
        return out


def _hooks(m: nn.Module) -> bool:
    """Whether ``m`` has forward hooks of its user (a lazy module's own initialising pre-hook,
    which does nothing once its parameters exist, does not count)."""
    if m._forward_hooks:
        return True
    return any(getattr(hook, "__func__", None) is not LazyModuleMixin._infer_parameters
               for hook in m._forward_pre_hooks.values())


def _global_hooks() -> bool:
    from torch.nn.modules import module as torch_module
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def origin(node: fx.Node) -> str | None:
    """The qualified name of the innermost module whose forward created ``node`` (``None`` at the
    top level): the module of origin named in errors and used by per-layer choices."""
    if node.op == "call_module":
        return node.target
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return module_path(list(stack.values())[-1]) or None


def forward_parameters(module: nn.Module):
    """``(names, defaults, variadic)`` of ``module.forward``'s parameters."""
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return [], {}, True
    names, defaults, variadic = [], {}, False
    for p in signature.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            variadic = True
            continue
        names.append(p.name)
        if p.default is not p.empty:
            defaults[p.name] = p.default
    return names, defaults, variadic


def default_inputs(f) -> tuple | None:
    """The inputs an explainer passes by default: ``forward``'s parameters without a default
    (``None`` for a variadic ``forward``: every parameter is then an input)."""
    names, defaults, variadic = forward_parameters(f.module)
    if variadic:
        return None
    required = tuple(n for n in names if n not in defaults)
    return required or tuple(names[:1])


def input_names(f, x) -> tuple | None:
    """The names of the ``forward`` parameters that ``x`` passes (a tensor: the first; a tuple of
    k: the first k; a dict: its keys, in the signature's order)."""
    names, _, variadic = forward_parameters(f.module)
    if variadic:
        return None
    if isinstance(x, dict):
        return tuple(n for n in names if n in x)
    if isinstance(x, tuple):
        return tuple(names[:len(x)])
    return tuple(names[:1])


def _purify(gm: fx.GraphModule) -> None:
    """Rewrites in-place ops of ``gm``'s graph as out-of-place ones (nodes keep their identity and
    name); later readers of a mutated value are redirected to the op's result."""
    graph = gm.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        mutated = None
        if node.op == "call_function":
            if node.target in _INPLACE_OPERATORS:
                node.target = _INPLACE_OPERATORS[node.target]
                mutated = node.args[0]
            elif node.target is operator.setitem:
                raise fail("trace", f"graph node {node.name!r} assigns into a tensor in place "
                                    "(x[...] = y), which fxattr cannot make pure; write it with "
                                    "torch.where / torch.cat instead")
            elif (getattr(node.target, "__module__", None) in (None, "torch", "torch._C._VariableFunctions")
                  and getattr(node.target, "__name__", "").endswith("_")
                  and not node.target.__name__.startswith("_")
                  and hasattr(torch, node.target.__name__[:-1])):
                node.target = getattr(torch, node.target.__name__[:-1])
                mutated = node.args[0] if node.args else None
            else:
                mutated = _drop_inplace_kwarg(node)
        elif node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_"):
            pure = node.target[:-1]
            if not hasattr(Tensor, pure):
                raise fail("trace", f"graph node {node.name!r} calls the in-place method "
                                    f"Tensor.{node.target}, which has no out-of-place equivalent "
                                    "fxattr knows")
            node.target = pure
            mutated = node.args[0]
        elif node.op == "call_module":
            m = gm.get_submodule(node.target)
            if getattr(m, "inplace", False) is True:
                functional = _functional_activation(m)
                if functional is not None:
                    fn, extra = functional
                    node.op, node.target = "call_function", fn
                    node.args = (node.args[0], *extra)
                    node.kwargs = {}
                else:  # an unknown in-place module: an out-of-place shallow copy, owned by gm
                    pure = copy.copy(m)
                    pure.inplace = False
                    name = "_fxattr_pure_" + node.target.replace(".", "_")
                    gm.add_module(name, pure)
                    node.target = name
                mutated = node.args[0]
        if isinstance(mutated, fx.Node):
            for user in list(mutated.users):
                if user is not node and order[user] > order[node]:
                    user.replace_input_with(mutated, node)
    graph.lint()
    gm.recompile()


def _drop_inplace_kwarg(node: fx.Node):
    """``F.relu(x, inplace=True)`` (keyword or positional) -> ``inplace=False``; returns the mutated
    argument or ``None``."""
    if node.kwargs.get("inplace") is True:
        node.kwargs = {**node.kwargs, "inplace": False}
        return node.args[0] if node.args else None
    try:
        signature = inspect.signature(node.target)
    except (TypeError, ValueError):
        return None
    names = list(signature.parameters)
    if "inplace" in names:
        i = names.index("inplace")
        if i < len(node.args) and node.args[i] is True:
            args = list(node.args)
            args[i] = False
            node.args = tuple(args)
            return node.args[0]
    return None


def trace(f, inputs: tuple | None = None) -> fx.GraphModule:
    """The pure ``torch.fx`` graph of ``f.module``, traced once and cached on ``f``.

    Module-level symbolic tracing: ``torch.nn`` modules (Conv, Linear, BatchNorm, ReLU, pooling,
    ...) are leaves (``call_module`` nodes), user modules (e.g. torchvision's ``BasicBlock``) are
    traced through, and functional ops (``F.relu``, ``+``, ``torch.cat``, ``torch.flatten``,
    ``x.view``) appear as ``call_function`` / ``call_method`` nodes. In-place ops (``+=``,
    ``relu_``, ``F.relu(..., inplace=True)``, ``nn.ReLU(inplace=True)``) are replaced by their
    out-of-place equivalents. The graph module shares the user's submodules and never modifies them.

    Evaluate it with :func:`run` (``torch.func.functional_call`` with a batch axis of 1, element-wise
    eval batch norm, and ``f.output``), like ``f`` itself.

    ``forward``'s parameters that are not in ``inputs`` are bound to their defaults before
    tracing (``forward(x, scale=None)`` explained on ``x`` alone is traced with ``scale=None``, its
    ``if scale is None`` branch resolved as the model runs). Modules with forward hooks are traced
    through, their hooks with them. Parameters tied under several names are read under each.

    Args:
        f: the function of ``fxattr.functionalize``.
        inputs: the names of the ``forward`` parameters the explainer passes (see
            :func:`input_names`); by default those without a default value.

    Returns:
        The ``torch.fx.GraphModule``; ``gm.meta["module_outputs"]`` maps each called module's
        qualified name to the names of the nodes its calls returned.

    Example:
        >>> f, params = fxattr.functionalize(torchvision.models.resnet18().eval())
        >>> gm = fxattr.graph.trace(f)
        >>> torch.vmap(lambda x: fxattr.graph.run(f, gm, params, x))(images).shape
        torch.Size([8, 1000])
    """
    if not isinstance(f, FunctionalModel):
        raise fail("trace", "f must be the function of fxattr.functionalize (a FunctionalModel), "
                            f"got {type(f).__name__}; graph-based methods need the module to trace")
    if inputs is None:
        inputs = default_inputs(f)
    per_f = _CACHE.setdefault(f, {})
    if inputs in per_f:
        return per_f[inputs]
    module = f.module
    if _hooks(module):
        raise fail("trace", f"the model ({type(module).__name__}) has forward hooks on itself; "
                            "fxattr traces its forward and would skip them: wrap the model in a "
                            "module (hooks on submodules are traced with them)")
    concrete = None
    if inputs is not None:
        names, defaults, _ = forward_parameters(module)
        missing = [n for n in names if n not in inputs and n not in defaults]
        if missing:
            raise fail("trace", f"x gives no value for the model's input(s) {', '.join(map(repr, missing))}")
        # parameters the explainer does not pass take their defaults: control flow on them
        # (``if scale is None``) is resolved as the model runs without them
        concrete = {n: defaults[n] for n in names if n not in inputs}
    tracer = _Tracer()
    # A captured graph traced again (a cut's head or body, fxattr.layers) reads its buffers by
    # get_attr: they must stay reads of ``params``. torch.fx's default evaluates a buffer's uses
    # once at trace time and bakes the result as a constant, so the text front door's attention
    # mask (a buffer that ``params`` replaces per example, turned into the additive mask inside the
    # graph) was frozen at the module's all-ones buffer: DeepLIFT / LRP on a padded sequence's
    # head ran unmasked and did not sum to the head's delta.
    tracer.proxy_buffer_attributes = isinstance(module, fx.GraphModule)
    try:
        graph = tracer.trace(module, concrete_args=concrete or None)
    except Exception as error:  # any tracing failure is reported the same way
        hooked = [name for name, m in module.named_modules() if _hooks(m)]
        hint = (f" (modules with forward hooks, traced with them: {', '.join(map(repr, hooked))})"
                if hooked else "")
        if f.input_shape is not None and inputs is not None and len(inputs) == 1:
            try:
                gm = _dynamo_capture(f, inputs)
            except FxattrError:
                raise
            except Exception as dynamo_error:  # reported with torch.fx's reason
                raise fail("trace", f"neither torch.fx ({type(error).__name__}: {error}) nor torch "
                                    f"dynamo ({type(dynamo_error).__name__}: {dynamo_error}) can "
                                    f"capture {type(module).__name__}{hint}; use a gradient-based "
                                    "method") from dynamo_error
            per_f[inputs] = gm
            return gm
        raise fail("trace", f"torch.fx cannot trace {type(module).__name__}{hint}: "
                            f"{type(error).__name__}: {error}. Graph-based methods need a model "
                            "torch.fx.symbolic_trace can trace (no Python control flow on tensor "
                            "values, no data-dependent shapes), or, for any other model (Hugging "
                            "Face transformers...), the shape of one example: "
                            "fxattr.functionalize(model, input_shape=...) lets fxattr capture it "
                            "with torch dynamo; otherwise use a gradient-based method") from error
    if concrete:
        _drop_concrete(graph, set(concrete))
    gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
    _purify(gm)
    gm.meta["module_outputs"] = {
        name: [None if node is None else node.name for node in nodes]
        for name, nodes in tracer.module_outputs.items()
    }
    gm.meta["state_names"], gm.meta["aliases"] = _state_names(module)
    gm.meta["inputs"] = inputs
    gm.meta["capture"] = "fx"
    gm.meta["out_spec"] = None
    per_f[inputs] = gm
    return gm


_DYNAMIC_EXAMPLE_SIZE = 7  # the example size of a dimension input_shape leaves free (None):
# not 0 or 1 (dynamo specialises those) and unlikely to equal a fixed size of the model


def _dynamo_capture(f, inputs: tuple) -> fx.GraphModule:
    """The torch-function-level graph dynamo captures from ``f.module`` run on zeros of
    ``f.input_shape`` (with the batch axis of 1), normalised into the engine's vocabulary:
    parameters and buffers read under the user's qualified names (``get_attr`` targets renamed,
    and the graph module rebuilt to hold them under those names, so that ``params`` replaces
    them), other tensor attributes kept as constants, in-place ops purified, the output structure
    kept (``meta["out_spec"]``), each node's module of origin in ``meta["nn_module_stack"]``, and
    the node each module call returns in ``meta["module_outputs"]`` (as torch.fx's tracer records).

    Sizes given in ``input_shape`` are specialised; a size given as ``None`` (a sequence length)
    is captured symbolically, so the one graph runs every length (a model that specialises it
    anyway is reported)."""
    import torch._dynamo

    module = f.module
    state = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    dtype = next((t.dtype for _, t in state if t.is_floating_point()), torch.get_default_dtype())
    device = next((t.device for _, t in state), torch.device("cpu"))
    free = [i for i, size in enumerate(f.input_shape) if size is None]
    shape = tuple(_DYNAMIC_EXAMPLE_SIZE if size is None else size for size in f.input_shape)
    example = torch.zeros((1, *shape), dtype=dtype, device=device)
    dynamic_shapes = None
    if free:
        from torch.export import Dim
        # DYNAMIC: ranges the model implies (BERT's 512 positions) are accepted, a specialised
        # size is an error (checked below as well)
        dynamic_shapes = ({i + 1: Dim.DYNAMIC for i in free},)
    try:
        with EvalBatchNormAsElementwise():
            gm, _ = torch._dynamo.export(module, dynamic_shapes=dynamic_shapes)(example)
    except Exception as error:
        if not free:
            raise
        raise fail("trace", f"torch dynamo cannot capture {type(module).__name__} with the size(s) "
                            f"input_shape leaves free (None at {free}) symbolic: the model "
                            f"specialises them ({type(error).__name__}: {str(error)[:300]}); give "
                            "a fixed input_shape") from error
    finally:
        torch._dynamo.reset()
    if free:
        placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
        value = placeholder.meta.get("example_value", placeholder.meta.get("val"))
        fixed = [i for i in free if value is not None and isinstance(value.shape[i + 1], int)]
        if fixed:
            raise fail("trace", f"torch dynamo cannot capture {type(module).__name__} with the "
                                f"size(s) input_shape leaves free (None at {fixed}) symbolic: the "
                                "model specialises them; give a fixed input_shape")
    _purify(gm)
    names = {}
    for name, t in state:
        names.setdefault(id(t), name)
    root: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.aten.sym_size.int, torch.ops.aten.sym_size):
            node.target = tensor_size  # a shape read that torch.vmap can batch
        name = getattr(node.target, "__name__", None)
        if (node.op == "call_function" and name and getattr(torch.Tensor, name, None) is node.target
                and node.args and isinstance(node.args[0], fx.Node)):
            node.op, node.target = "call_method", name  # Tensor.split(x, ...) -> x.split(...)
        if node.op == "get_attr":
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part)
            node.meta["constant"] = value  # what it reads when params lacks it
            if id(value) in names:  # a parameter or buffer: read from params by its own name
                node.target = names[id(value)]
            root[node.target] = value
        elif node.op == "call_module":
            root[node.target] = gm.get_submodule(node.target)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise fail("trace", f"torch dynamo captured {type(module).__name__} with "
                            f"{len(placeholders)} inputs; fxattr expected one")
    placeholders[0].target = inputs[0]
    codegen = getattr(gm.graph, "_codegen", None)
    info = getattr(codegen, "pytree_info", None)
    # the same graph (its nodes, their metadata, its output structure) in a module holding the
    # parameters under the user's names: functional_call(gm, params) then reads params
    gm = fx.GraphModule(root, gm.graph, type(module).__name__)
    gm.meta["out_spec"] = None if info is None else info.out_spec
    gm.meta["module_outputs"], gm.meta["module_escapes"] = _dynamo_module_outputs(gm.graph)
    gm.meta["module_names"] = [name for name, _ in module.named_modules() if name]
    gm.meta["state_names"], gm.meta["aliases"] = _state_names(module)
    gm.meta["inputs"] = inputs
    gm.meta["capture"] = "dynamo"
    gm.meta["dynamic"] = tuple(free)
    return gm


def module_path(path) -> str:
    """A module path as dynamo writes it in ``nn_module_stack`` (``L['self'].model.layers[0]``,
    ``L['self'].model.layers.0``) as the qualified name ``named_modules`` gives
    (``model.layers.0``; ``""`` for the root)."""
    if isinstance(path, tuple):
        path = path[0]
    if not isinstance(path, str):
        return ""
    if path.startswith("L["):  # the root: L['self']
        path = path[path.index("]") + 1:]
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"getattr\((.*?), '([^']+)'\)", r"\1.\2", path)
    return path.strip(".")


def _dynamo_module_outputs(graph: fx.Graph) -> tuple[dict, dict]:
    """``{module path: [the node each call returns]}`` of a dynamo graph, from the module stacks
    its nodes record: a call's nodes are those with the call in their stack (dynamo keys a
    module's k-th call ``id@k``), and what it returns is the one tensor node of them that is read
    outside the call. A call with several such nodes (a module returning a tuple, or leaking an
    inner value) maps to ``None``; ``module_escapes`` lists them for the error."""
    calls: dict[tuple[str, str], list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        for key, value in (node.meta.get("nn_module_stack") or {}).items():
            path = module_path(value)
            if path:
                calls.setdefault((path, key), []).append(node)
    outputs: dict[str, list] = {}
    escapes: dict[str, list] = {}
    for (path, _), nodes in calls.items():
        inside = set(nodes)
        leaving = [n.name for n in nodes
                   if isinstance(n.meta.get("example_value", n.meta.get("val")), Tensor)
                   and any(user not in inside for user in n.users)]
        outputs.setdefault(path, []).append(leaving[0] if len(leaving) == 1 else None)
        escapes.setdefault(path, []).append(leaving)
    return outputs, escapes


def _drop_concrete(graph: fx.Graph, concrete: set) -> None:
    """Removes the placeholders of parameters bound to their defaults (and torch.fx's checks on
    them): the graph's inputs are exactly what the explainer passes."""
    # torch.fx names a concrete argument's placeholder ``name_1``
    bound = {node for node in graph.nodes if node.op == "placeholder" and (
        node.target in concrete or re.sub(r"_\d+$", "", node.target) in concrete)}
    for node in list(graph.nodes):
        if node.op == "call_function" and getattr(node.target, "__name__", "") == "_assert_is_none":
            graph.erase_node(node)
        elif node.op == "call_function" and node.target is torch._assert:
            # torch.fx's check of a non-None default (``multidim_output: bool = False``):
            # _assert(eq(placeholder, False), ...) -- the value is bound, the check is moot
            condition = node.args[0] if node.args else None
            if (isinstance(condition, fx.Node) and condition.target is operator.eq
                    and condition.args and condition.args[0] in bound):
                graph.erase_node(node)
                if not condition.users:
                    graph.erase_node(condition)
    for node in list(graph.nodes):
        if node in bound and not node.users:
            graph.erase_node(node)


def bind(gm: fx.GraphModule, params: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """``params`` with every tied parameter also under its other names (``named_parameters``
    lists a shared tensor once; the graph reads it under each module's name)."""
    aliases = gm.meta.get("aliases")
    if not aliases:
        return params
    extra = {alias: params[name] for alias, name in aliases.items() if alias not in params and name in params}
    return {**params, **extra} if extra else params


def _state_names(module: nn.Module) -> tuple[frozenset, dict]:
    """The user module's parameter and buffer names (every name of a tied tensor), and
    ``{other name: first name}`` for the tied ones. Tensor attributes that are neither (torch.fx
    registers them as buffers of the graph module) are constants of the graph."""
    names, first, aliases = set(), {}, {}
    for name, t in [*module.named_parameters(remove_duplicate=False),
                    *module.named_buffers(remove_duplicate=False)]:
        names.add(name)
        if id(t) in first and first[id(t)] != name:
            aliases[name] = first[id(t)]
        first.setdefault(id(t), name)
    return frozenset(names), aliases


def _call(gm: fx.GraphModule, params: Mapping[str, Tensor], args, kwargs):
    # the graph module holds only the submodules the forward pass uses
    names = gm.meta.get("own_names")
    if names is None:  # the graph module holds only the submodules its graph uses
        names = {n for n, _ in gm.named_parameters(remove_duplicate=False)}
        names |= {n for n, _ in gm.named_buffers(remove_duplicate=False)}
        names = gm.meta["own_names"] = frozenset(names & gm.meta["state_names"])
    own = {k: v for k, v in bind(gm, params).items() if k in names}
    with EvalBatchNormAsElementwise():
        return call_privately(gm, own, args, kwargs, cache=gm.meta.setdefault("private_view", {}))


def batched_args(x, extra=()):
    batched = optree.tree_map(lambda t: t.unsqueeze(0), x, namespace="torch")
    extra = tuple(optree.tree_map(lambda t: t.unsqueeze(0), e, namespace="torch") for e in extra)
    if isinstance(batched, tuple):
        return extra + batched, {}
    if isinstance(batched, dict):
        return extra, batched
    return extra + (batched,), {}


def unbatch_output(f, out) -> Tensor:
    if f.output is not None:
        out = f.output(out)
    if not isinstance(out, Tensor) or out.ndim == 0 or out.shape[0] != 1:
        raise fail("trace", "the traced model must return a tensor with a batch axis of size 1 "
                            "(pass output=callable to functionalize to choose one tensor)")
    return out[0]


def run(f, gm: fx.GraphModule, params: Mapping[str, Tensor], x) -> Tensor:
    """Evaluates the traced graph ``gm = trace(f)`` like ``f(params, x)`` (one example)."""
    args, kwargs = batched_args(x)
    return unbatch_output(f, _call(gm, params, args, kwargs))


def find_layer(where: str, gm: fx.GraphModule, layer: str) -> fx.Node:
    """The node whose value is ``layer``'s activation (a module name or a node name)."""
    if not isinstance(layer, str):
        raise fail(where, f"layer must be a module name (e.g. 'layer4') or a graph node name, got "
                          f"{type(layer).__name__}")
    outputs = gm.meta["module_outputs"]
    nodes = {node.name: node for node in gm.graph.nodes}
    if layer in outputs and layer != "":
        calls = outputs[layer]
        if len(calls) > 1:
            raise fail(where, f"layer {layer!r} is called {len(calls)} times in the forward pass; "
                              f"name one call by its graph node instead: {', '.join(map(repr, calls))}")
        if calls[0] is None:
            leaving = gm.meta.get("module_escapes", {}).get(layer, [[]])[0]
            parts = f" ({', '.join(map(repr, leaving))})" if leaving else ""
            raise fail(where, f"layer {layer!r} returns a structure, not one tensor; name a node "
                              f"of the graph instead{parts}")
        return nodes[calls[0]]
    if layer in nodes and nodes[layer].op not in ("placeholder", "output", "get_attr"):
        return nodes[layer]
    modules = gm.meta.get("module_names") or [
        name for name, _ in gm.named_modules() if name and not name.startswith("_fxattr")]
    candidates = [n for n in outputs if n] + [n for n in modules if n not in outputs]
    close = difflib.get_close_matches(layer, candidates, n=5, cutoff=0.5)
    close += [n for n in difflib.get_close_matches(layer, list(nodes), n=3, cutoff=0.6)
              if n not in close]
    hint = f"; close matches: {', '.join(map(repr, close))}" if close else ""
    uncalled = " (it is never called in the forward pass)" if layer in modules else ""
    raise fail(where, f"layer {layer!r} is not a module or graph node of the model{uncalled}{hint}")


def _copy_graph(gm: fx.GraphModule) -> tuple[fx.Graph, dict]:
    graph = fx.Graph()
    env: dict = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    return graph, env


def _pruned(gm: fx.GraphModule, graph: fx.Graph, name: str) -> fx.GraphModule:
    """``graph`` without dead code, as a module holding only the submodules it calls."""
    fx.GraphModule(gm, graph, name)  # dead-code elimination needs an owning module
    graph.eliminate_dead_code()
    pruned = fx.GraphModule(gm, graph, name)
    pruned.meta["state_names"], pruned.meta["aliases"] = gm.meta["state_names"], gm.meta["aliases"]
    return pruned


def split(f, layer: str, *, where: str = "split", inputs: tuple | None = None) -> tuple[Callable, Callable]:
    """Cuts ``f`` at ``layer`` into ``body(params, x) -> activation`` and
    ``head(params, x, activation) -> output``.

    ``head(params, x, body(params, x)) == f(params, x)``. Both are separate graphs built from
    ``trace(f)`` by graph surgery: the layer's node returns from ``body`` and is an input of
    ``head``; each keeps only the nodes it needs (``head`` recomputes only what it needs and does
    not depend on the layer, such as a skip connection around it; for resnet18's ``layer4``,
    nothing). Both take and return ONE example (no batch axis), so they compose with
    ``torch.vmap``, ``torch.func.grad`` and ``torch.compile``.

    Models torch.fx cannot trace (Hugging Face transformers) are cut on their dynamo capture
    (``functionalize(model, input_shape=...)``): a module call's value is the one tensor of its
    nodes read outside it, so ``"model.vit.layers.1"`` names what that layer returns; a module
    returning several tensors is an error listing their nodes. Both halves read ``params`` under
    the user's names.

    Args:
        f: the function of ``fxattr.functionalize``.
        layer: a module's qualified name (``"layer4"``, ``"features.10"``; a module traced through
            names the value its forward returns), or a graph node name for a module called several
            times (the error lists them).
        inputs: the ``forward`` parameters x passes, as for :func:`trace` (``input_names(f, x)``;
            by default those without a default value).

    Example:
        >>> body, head = fxattr.graph.split(f, "layer4")
        >>> a = torch.vmap(body, in_dims=(None, 0))(params, images)
        >>> grads = torch.vmap(torch.func.grad(lambda a, x: head(params, x, a)[3]))(a, images)
    """
    gm = trace(f, inputs)
    node = find_layer(where, gm, layer)
    if node.op == "placeholder":
        raise fail(where, f"layer {layer!r} is an input of the model, not a layer")

    body_graph, env = _copy_graph(gm)
    output = next(n for n in body_graph.nodes if n.op == "output")
    output.args = (env[node],)
    body_gm = _pruned(gm, body_graph, "Body")

    head_graph, env = _copy_graph(gm)
    out_spec = gm.meta.get("out_spec")
    output = next(n for n in head_graph.nodes if n.op == "output")
    if out_spec is not None and out_spec.is_leaf() and isinstance(output.args[0], (tuple, list)) \
            and len(output.args[0]) == 1:
        # a dynamo graph returns its outputs flat; one tensor is returned as itself, so that the
        # head is a model of its own (graph-based layer methods trace it)
        output.args = (output.args[0][0],)
        out_spec = None
    cut = env[node]
    first = next(iter(head_graph.nodes))
    with head_graph.inserting_before(first):
        activation = head_graph.placeholder("activation")
    cut.replace_all_uses_with(activation)
    head_graph.erase_node(cut)
    head_gm = _pruned(gm, head_graph, "Head")

    def body(params, x):
        args, kwargs = batched_args(x)
        out = _call(body_gm, params, args, kwargs)
        return optree.tree_map(lambda t: t[0], out, namespace="torch")

    def head(params, x, activation):
        args, kwargs = batched_args(x, (activation,))
        out = _call(head_gm, params, args, kwargs)
        if out_spec is not None:  # a dynamo graph returns its outputs flat
            out = pytree_unflatten(list(out), out_spec)
        return unbatch_output(f, out)

    body.graph_module, head.graph_module = body_gm, head_gm
    body.layer = head.layer = node.name
    return body, head
