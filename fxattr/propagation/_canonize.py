"""Canonizers: rewriting the captured graph (and its parameters) into an equivalent one before LRP.

LRP rules are defined for linear layers ``z = W x + b``; a canonizer turns a model into an
equivalent one whose layers suit them (zennit's canonizers). fxattr does the common one itself:
an eval batch norm right after a convolution or dense layer is folded into it (``W' = s W``,
``b' = s b + t`` with ``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s``; zennit's
MergeBatchNorm), from ``params`` at explain time, so derivatives w.r.t. the batch-norm parameters
flow through the fold. Residual sums need no canonizer: the graph sees the addition.

Your own canonizer is a :class:`Canonizer`, in fxattr's functional style -- nothing is mutated:

- ``graph(gm) -> gm``: a rewrite of the captured ``torch.fx.GraphModule`` (a private copy of the
  graph; the user's modules inside it are shared, so replace a module with ``gm.add_submodule``
  instead of changing it). It runs once, when the explainer is built;
- ``params(params, gm) -> params``: a pure transform of the parameter dict, run at every call, so
  that the explanation stays differentiable w.r.t. the original parameters; ``gm`` is the graph
  module this canonizer's rewrite returned (what the rewrite found can be kept in ``gm.meta``).

Pass canonizers to ``fxattr.lrp(f, ..., canonizers=[...])``; they run in order, before fxattr's
own batch-norm fold. :func:`merge_batch_norm` (the built-in fold written as a canonizer) and
:func:`replace_modules` are examples; :class:`Canonizer` shows a rewrite written by hand.

Example:
    >>> explain = fxattr.lrp(f, composite="epsilon_plus", canonizers=[fxattr.lrp.merge_batch_norm()])
    >>> torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple, Optional

import torch
from torch import fx, nn

from fxattr.errors import fail
from fxattr.functional import FunctionalModel, batch_norm_affine, functionalize  # noqa: F401 - re-exported
from fxattr.graph._capture import trace
from fxattr.graph._program import fold  # noqa: F401 - the one implementation, in the engine

__all__ = ["Canonizer", "canonize", "merge_batch_norm", "replace_modules"]


class Canonizer(NamedTuple):
    """A rewrite of the captured model into an equivalent one, applied by ``fxattr.lrp(f, ...,
    canonizers=[...])`` before the rules (zennit's canonizers, written functionally).

    - ``graph(gm) -> gm`` runs once, when the explainer is built, on a private copy of the
      captured ``torch.fx.GraphModule`` (its graph and module containers are the copy's own; the
      leaf modules are the user's): edit ``gm.graph`` (insert, replace, erase nodes), and put a
      changed module in with ``gm.add_submodule(name, new_module)`` -- never write into a module
      you find in ``gm`` (that is the user's). Keep what the rewrite found in ``gm.meta``.
    - ``params(params, gm) -> params`` runs at every call on the parameter dict the explainer is
      given (``gm`` is the graph module this canonizer's rewrite returned): build new tensors from
      the given ones (no ``.data``, no in-place writes), so that the explanation stays
      differentiable w.r.t. the original parameters. Parameters of modules the rewrite added must
      be supplied here, under their qualified names.

    Either part may be ``None``. Canonizers run in the order given, then fxattr folds every
    remaining eval batch norm that follows a convolution or dense layer (its built-in canonization).

    Attributes:
        name: shown in errors and in the explainer's configuration.
        graph: ``gm -> gm``, the graph rewrite (or ``None``).
        params: ``(params, gm) -> params``, the parameter transform (or ``None``).

    Example:
        >>> # Hardshrink has no LRP rule: rewrite it into two thresholds and a subtraction
        >>> def shrink_to_thresholds(gm):
        ...     for node in list(gm.graph.nodes):
        ...         if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Hardshrink):
        ...             lambd = gm.get_submodule(node.target).lambd
        ...             with gm.graph.inserting_before(node):
        ...                 pos = gm.graph.call_function(F.threshold, (node.args[0], lambd, 0.0))
        ...                 neg = gm.graph.call_function(torch.neg, (node.args[0],))
        ...                 neg = gm.graph.call_function(F.threshold, (neg, lambd, 0.0))
        ...                 out = gm.graph.call_function(torch.sub, (pos, neg))
        ...             node.replace_all_uses_with(out)
        ...             gm.graph.erase_node(node)
        ...     return gm
        >>> shrink = fxattr.lrp.Canonizer("hardshrink", graph=shrink_to_thresholds)
        >>> explain = fxattr.lrp(f, composite="epsilon_plus", canonizers=[shrink])
        >>> torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
    """

    name: str
    graph: Optional[Callable[[fx.GraphModule], fx.GraphModule]] = None
    params: Optional[Callable[[Mapping, fx.GraphModule], Mapping]] = None


def _private_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with its own graph and its own containers; leaf modules are shared."""
    copied = fx.GraphModule(gm, copy.deepcopy(gm.graph), type(gm).__name__)
    copied.meta.update({k: v for k, v in gm.meta.items() if k in ("inputs", "capture", "out_spec")})
    return copied


def canonize(where: str, f, canonizers) -> tuple:
    """``(f', to_canonical)``: ``f'`` the canonized model as an ``fxattr.functionalize`` function
    and ``to_canonical(params)`` the parameter transform. ``canonizers`` empty: ``(f, identity)``."""
    if canonizers is None:
        canonizers = ()
    if isinstance(canonizers, Canonizer) or not isinstance(canonizers, Sequence):
        raise fail(where, f"canonizers must be a list of fxattr.lrp.Canonizer, got {canonizers!r}")
    for c in canonizers:
        if not isinstance(c, Canonizer):
            raise fail(where, f"canonizers must be fxattr.lrp.Canonizer objects (name, graph=, params=), "
                              f"got {type(c).__name__}")
        for part in ("graph", "params"):
            if getattr(c, part) is not None and not callable(getattr(c, part)):
                raise fail(where, f"canonizer {c.name!r}: {part} must be a callable or None")
    if not canonizers:
        return f, lambda params: params
    if not isinstance(f, FunctionalModel):
        raise fail(where, "canonizers need the function of fxattr.functionalize (the module to capture)")
    gm = trace(f)
    if gm.meta.get("capture") != "fx":
        raise fail(where, "canonizers rewrite torch.fx graphs; this model was captured by torch dynamo")
    transforms = []  # (canonizer, the graph module after its rewrite)
    for c in canonizers:
        if c.graph is not None:
            rewritten = c.graph(_private_copy(gm))
            if not isinstance(rewritten, fx.GraphModule):
                raise fail(where, f"canonizer {c.name!r}: graph must return a torch.fx.GraphModule, got "
                                  f"{type(rewritten).__name__}")
            try:
                rewritten.graph.lint()
                rewritten.recompile()
            except Exception as error:  # reported under the canonizer's name
                raise fail(where, f"canonizer {c.name!r}: the rewritten graph is invalid: "
                                  f"{type(error).__name__}: {str(error).splitlines()[0]}") from error
            gm = rewritten
        if c.params is not None:
            transforms.append((c, gm))
    if gm is trace(f):
        canonical, needed = f, None  # the user's parameters: what the call is given
    else:
        canonical, canonical_params = functionalize(gm, output=f.output, input_shape=f.input_shape,
                                                    batch_statistics=f.batch_statistics)
        needed = {name: tuple(t.shape) for name, t in canonical_params.items()}

    def to_canonical(params):
        wanted = needed if needed is not None else {
            name: tuple(t.shape) for name, t in params.items() if isinstance(t, torch.Tensor)}
        for c, rewritten in transforms:
            params = c.params(params, rewritten)
            if not isinstance(params, Mapping):
                raise fail(where, f"canonizer {c.name!r}: params must return a dict of tensors, got "
                                  f"{type(params).__name__}")
        if transforms:
            # a dropped or reshaped parameter would fail deep inside the model call (KeyError, shape
            # mismatch) with no word of the canonizer that caused it
            missing = [name for name in wanted if name not in params]
            if missing:
                raise fail(where, f"canonizer {transforms[-1][0].name!r}: params returned no {missing[0]!r} "
                                  f"({len(missing)} of the canonical model's parameters missing)")
            for name, shape in wanted.items():
                value = params[name]
                if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                    got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise fail(where, f"canonizer {transforms[-1][0].name!r}: params[{name!r}] must be a "
                                      f"tensor of shape {shape}, got {got}")
        return params

    return canonical, to_canonical


# --- built-in canonizers (examples) ------------------------------------------------------------

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _with_bias(module: nn.Module) -> nn.Module:
    """A copy of a bias-free convolution with a zero bias (the user's module is not touched)."""
    twin = copy.copy(module)
    twin._parameters = dict(module._parameters)  # noqa: SLF001 - the copy's own parameter table
    twin.bias = nn.Parameter(torch.zeros(module.out_channels, dtype=module.weight.dtype,
                                         device=module.weight.device), requires_grad=False)
    return twin


def merge_batch_norm() -> Canonizer:
    """fxattr's built-in batch-norm fold written as a canonizer (zennit's ``SequentialMergeBatchNorm``):
    every eval ``BatchNormNd`` module whose input is a convolution module read by nothing else is
    removed from the graph and folded into the convolution's weight and bias by the parameter
    transform (``W' = s W``, ``b' = (b - mean) s + beta``, ``s = gamma / sqrt(var + eps)``); a
    convolution without bias gets one (a new module; the model's is not touched). Dense layers are
    left to fxattr's own fold, which checks their input's rank at run time.

    Example:
        >>> explain = fxattr.lrp(f, composite="epsilon_plus", canonizers=[fxattr.lrp.merge_batch_norm()])
        >>> torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
    """
    def graph(gm: fx.GraphModule) -> fx.GraphModule:
        pairs = gm.meta["merged_batch_norms"] = []  # (conv target, batch-norm target, eps, affine)
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), _NORMS):
                continue
            norm, source = gm.get_submodule(node.target), node.args[0]
            if (norm.training or norm.running_mean is None or not isinstance(source, fx.Node)
                    or source.op != "call_module" or len(source.users) != 1
                    or not isinstance(gm.get_submodule(source.target), _CONVS)):
                continue
            conv = gm.get_submodule(source.target)
            if conv.bias is None:
                gm.add_submodule(source.target, _with_bias(conv))
            pairs.append((source.target, node.target, norm.eps, norm.affine))
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
        return gm

    def params(p, gm):
        p = dict(p)
        for conv, norm, eps, affine in gm.meta["merged_batch_norms"]:
            bias = p.get(f"{conv}.bias")
            weight = p[f"{conv}.weight"]
            if bias is None:
                bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            p[f"{conv}.weight"], p[f"{conv}.bias"] = fold(
                weight, bias, p[f"{norm}.running_mean"], p[f"{norm}.running_var"],
                p[f"{norm}.weight"] if affine else None, p[f"{norm}.bias"] if affine else None, eps)
        return p

    return Canonizer("merge_batch_norm", graph=graph, params=params)


def replace_modules(kind: type | tuple, fn: Callable, *, name: str = "replace_modules") -> Canonizer:
    """Replaces every call of a parameter-free module of type ``kind`` by ``fn(*args, **kwargs)``
    (a graph rewrite; the parameters are unchanged). ``fn`` is traced through, so it should be
    written with ops fxattr has rules for: e.g. a module LRP has no rule for, rewritten into ops it
    has rules for (``nn.Hardshrink(0.3)`` as two thresholds and a subtraction).

    Example:
        >>> shrink = fxattr.lrp.replace_modules(
        ...     torch.nn.Hardshrink, lambda t: F.threshold(t, 0.3, 0.0) - F.threshold(-t, 0.3, 0.0))
        >>> explain = fxattr.lrp(f, composite="epsilon_plus", canonizers=[shrink])
        >>> torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
    """
    if not (isinstance(kind, type) or (isinstance(kind, tuple) and kind
                                       and all(isinstance(k, type) for k in kind))):
        raise fail("lrp.replace_modules", f"kind must be a module type or a tuple of them, got {kind!r}")
    if not callable(fn):
        raise fail("lrp.replace_modules", f"fn must be a callable, got {fn!r}")

    def graph(gm: fx.GraphModule) -> fx.GraphModule:
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), kind):
                continue
            module = gm.get_submodule(node.target)
            if any(True for _ in module.parameters()):
                raise fail("lrp", f"canonizer {name!r} replaces parameter-free modules only; "
                                  f"{node.target!r} ({type(module).__name__}) has parameters")
            # a module calling fn (not a call_function node: fx cannot write a lambda into the
            # generated code); fxattr's capture traces through it, so fn's ops become the nodes
            wrapper = f"{node.target.replace('.', '_')}_replaced"
            gm.add_submodule(wrapper, Call(fn))
            with gm.graph.inserting_after(node):
                call = gm.graph.call_module(wrapper, node.args, node.kwargs)
            node.replace_all_uses_with(call)
            gm.graph.erase_node(node)
        return gm

    return Canonizer(name, graph=graph)


class Call(nn.Module):
    """A module whose forward is ``fn`` (traced through by fxattr's capture)."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)
