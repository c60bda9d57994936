"""Turning an ``nn.Module`` into a pure function of ``(params, x)`` for one example.

``functionalize`` is the entry point of every explainer: it wraps the module with
``torch.func.functional_call`` so the parameters become an argument, and it evaluates ONE example
(no batch axis) so that batches, noise samples and integration steps are all added by
``torch.vmap``. The module itself is never touched: no hooks, no ``.data`` writes, no
``requires_grad_``, no train/eval switch, and no parameter swapping either: every call runs on a
private structural copy of the module tree (:func:`stateless_view`) that holds the same tensors, so
several threads can explain with one model at once while it stays exactly as it was.

Thread safety: ``f(params, x)`` and every explainer built on it may be called from several threads
at once; the user's module is never written, not even for an instant. Building graph explainers
(``lrp``, the CAM family, ...) captures the graph once per ``f`` under a lock.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable, Mapping
from typing import Any

import optree
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from fxattr.errors import FxattrError, api_boundary, fail

__all__ = ["CAPTURE_LOCK", "CaptureLock", "FunctionalModel", "call_privately", "differentiable", "functionalize",
           "stateless_view"]


class EvalBatchNormAsElementwise(TorchFunctionMode):
    """Evaluates eval-mode ``F.batch_norm`` as ``x * scale + shift``.

    ``torch.vmap`` has no batching rule for ``aten::_native_batch_norm_legit_no_training`` and
    silently falls back to a per-example loop (1.13-1.23x the floor for a gradient on resnet18,
    20-23x instead of ~15x for 16 IG steps). One ``addcmul`` batches perfectly, compiles to one
    fused kernel and has the same derivatives to every order. Training-mode batch norm uses batch
    statistics as usual but never updates the running statistics (the module's buffers).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            return elementwise_batch_norm(*args, **kwargs)
        return func(*args, **kwargs)


def elementwise_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
                momentum=0.1, eps=1e-5):
    if training:
        # Batch statistics, without updating the running ones: those are the module's buffers.
        return F.batch_norm(input, None, None, weight, bias, True, momentum, eps)
    if running_mean is None or running_var is None:
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    scale, shift = batch_norm_affine(running_mean, running_var, weight, bias, eps)
    shape = (1, -1) + (1,) * (input.ndim - 2)
    # one fused pass instead of a multiply and an add: 30% less time on memory-bound models
    return torch.addcmul(shift.reshape(shape), input, scale.reshape(shape))


def batch_norm_affine(mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
                      eps: float) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` with ``batch_norm(z) = z * scale + shift`` per channel (eval mode)."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


class CaptureLock:
    """A readers-writer lock between graph capture and model evaluation.

    torch.fx patches ``nn.Module.__call__`` process-wide while it traces, so a capture must run
    alone: not beside another capture, and not beside any forward pass in another thread (whose
    module calls the tracer would intercept). ``with CAPTURE_LOCK:`` is the writer (hold it
    around ``fxattr.graph.trace`` / ``split``: re-entrant in its thread); ``CAPTURE_LOCK.reading()``
    is a reader (every explainer call and every ``f(params, x)`` takes it: readers run together,
    only a capture waits for them and they wait for a capture). A thread that already reads may
    capture (it does not wait for itself).
    """

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = None
        self._writer_depth = 0
        self._local = threading.local()

    def __enter__(self):
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._writer_depth += 1
                return self
            mine = 1 if getattr(self._local, "counted", False) else 0
            while self._writer is not None or self._readers - mine > 0:
                self._cond.wait()
            self._writer, self._writer_depth = me, 1
        return self

    def __exit__(self, *exc):
        with self._cond:
            self._writer_depth -= 1
            if self._writer_depth == 0:
                self._writer = None
                self._cond.notify_all()
        return False

    @contextlib.contextmanager
    def reading(self):
        local = self._local
        if getattr(local, "depth", 0) or self._writer == threading.get_ident():
            local.depth = getattr(local, "depth", 0) + 1
            try:
                yield
            finally:
                local.depth -= 1
            return
        with self._cond:
            while self._writer is not None:
                self._cond.wait()
            self._readers += 1
        local.depth, local.counted = 1, True
        try:
            yield
        finally:
            local.depth, local.counted = 0, False
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()


CAPTURE_LOCK = CaptureLock()

_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)
_DROPOUTS = (nn.modules.dropout._DropoutNd,)


def call_privately(module: nn.Module, params: Mapping[str, Tensor], args=(), kwargs=None, *,
                   cache: dict | None = None):
    """``torch.func.functional_call(module, params, args, kwargs)`` on a private view of ``module``
    (:func:`stateless_view`), so the parameters are swapped into the view and never into the
    user's module, even for an instant while another thread reads it. A fresh view per call;
    under ``torch.compile`` one view kept in ``cache`` (a fresh object per call would recompile).
    """
    if torch.compiler.is_compiling() and cache is not None:
        view = cache.get("view")
        if view is None:
            view = cache["view"] = stateless_view(module)
    else:
        view = stateless_view(module)
    return torch.func.functional_call(view, params, args, kwargs or {})


def stateless_view(module: nn.Module, *, batch_statistics: bool = False) -> nn.Module:
    """A private structural copy of ``module``'s tree holding the SAME parameter and buffer tensors.

    Each module of the tree is copied shallowly (its own ``__dict__`` and ``_parameters`` /
    ``_buffers`` / ``_modules`` dicts; hooks, flags and tensors shared), shared submodules stay
    shared, so ``torch.func.functional_call`` on the view swaps parameters into the copy and never
    into the user's module. In the copy, ``inplace=True`` layers (``nn.ReLU(inplace=True)``) run
    out of place, so they can never write into the caller's ``x``; with ``batch_statistics``,
    training-mode batch norms use batch statistics without updating any running statistic.
    Making one costs a few microseconds per module (measured in bench/RESULTS.md, section
    "reliability").
    """
    memo: dict[int, nn.Module] = {}

    def copy(m: nn.Module) -> nn.Module:
        seen = memo.get(id(m))
        if seen is not None:
            return seen
        new = object.__new__(type(m))
        state = dict(m.__dict__)
        state["_parameters"] = dict(m._parameters)
        state["_buffers"] = dict(m._buffers)
        state["_modules"] = {}
        new.__dict__.update(state)
        memo[id(m)] = new
        for name, child in m._modules.items():
            new._modules[name] = None if child is None else copy(child)
        if state.get("inplace") is True:
            new.__dict__["inplace"] = False
        if batch_statistics and isinstance(m, _BATCH_NORMS) and m.training:
            new.__dict__["track_running_stats"] = False
        return new

    return copy(module)


def _add_batch_axis(x):
    # a view of the caller's tensor: the private module copy runs in-place layers out of place,
    # and the clone guards against in-place ops written in forward (x += ..., relu_)
    return optree.tree_map(lambda t: t.clone().unsqueeze(0), x, namespace="torch")


def _shape_str(x) -> str:
    shapes = optree.tree_map(lambda t: tuple(t.shape), x, namespace="torch")
    return str(shapes)


def _leaf_modules(module: nn.Module):
    return [(name, m) for name, m in module.named_modules() if not m._modules]


_POINTWISE = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
              nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.ReLU6, nn.Hardswish,
              nn.Hardsigmoid, nn.LogSigmoid, nn.Softmax, nn.LogSoftmax, nn.Identity, nn.Dropout,
              nn.AlphaDropout, nn.BatchNorm1d, nn.LayerNorm, nn.Tanhshrink, nn.Threshold)
_SEQUENCE_FIRST = (nn.RNNBase, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
                   nn.TransformerEncoder, nn.MultiheadAttention)


_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ROW_WISE = (nn.Linear, nn.Bilinear) + _POINTWISE  # layers that act on the last axis only


def example_ndim(module: nn.Module) -> tuple[int, str] | None:
    """The number of dimensions of ONE floating-point example, where the model's structure says
    it for sure (token ids are checked separately, see :class:`ExampleShape`).

    - an MLP (an ``nn.Sequential`` of ``nn.Linear`` layers and element-wise layers only): 1;
    - a model whose first registered layer is ``batch_first`` recurrent or attention: 2
      (tokens, features).
    Anything else: ``None`` (unknown; ``input_shape=`` says it explicitly).
    """
    leaves = _leaf_modules(module)
    if not leaves:
        return None
    if isinstance(module, nn.Sequential) and all(isinstance(m, (nn.Linear, nn.Sequential) + _POINTWISE)
                                                  for _, m in leaves):
        first = next(((n, m) for n, m in leaves if isinstance(m, nn.Linear)), None)
        if first is not None and not isinstance(leaves[0][1], nn.BatchNorm1d):
            return 1, f"the model is an MLP whose first layer {first[0]!r} is an nn.Linear"
        return None
    first = _first_layer(module)
    if first is None:
        return None
    name, m = first
    if isinstance(m, _SEQUENCE_FIRST) and getattr(m, "batch_first", getattr(
            getattr(m, "layers", [None])[0] if isinstance(m, nn.TransformerEncoder) else None,
            "batch_first", False)):
        return 2, (f"its first layer {name!r} is a batch_first {type(m).__name__} (one example: "
                   "(tokens, features))")
    return None


def shape_matches(shape: tuple, pattern: tuple) -> bool:
    """Whether ``shape`` fits ``input_shape``'s ``pattern`` (``None`` there: any size)."""
    return len(shape) == len(pattern) and all(p is None or p == s for s, p in zip(shape, pattern))


def _first_layer(module: nn.Module):
    """The first registered module that holds parameters of its own (or is an embedding or a
    sequence layer): the layer the input meets first in nearly every model."""
    return next(((n, m) for n, m in module.named_modules()
                 if isinstance(m, (nn.Embedding,) + _SEQUENCE_FIRST)
                 or any(True for _ in m.parameters(recurse=False))), None)


class ExampleShape:
    """What the model's structure says about the shape of ONE example, beyond :func:`example_ndim`.

    Each rule fires only on positive evidence of a batch, so that legitimate inputs of models that
    merely look alike are never refused (``input_shape=`` overrides every rule):

    - token ids (an integer ``x``, or a dict's ``"input_ids"``) of a model holding an
      ``nn.Embedding``: one example is a 1-d sequence, so a 2-d ``(B, T)`` is a batch;
    - a convolutional model (its first registered convolution, linear, embedding or sequence
      layer is an ``nn.Conv1d`` / ``Conv2d`` / ``Conv3d`` with ``C`` input channels): one example
      is ``(C, *spatial)``, so ``(B, C, *spatial)`` is a batch;
    - a row-wise model (only linear and element-wise layers, in any module, so its forward may
      still reshape or pool): a 2-d ``x`` whose rows have the first linear layer's width is a batch
      when the model's output keeps those rows (its shape is inferred on the meta device once per
      input shape, no arithmetic); a set model that pools its rows (``phi(x).sum(0)``) is not.
    """

    def __init__(self, module: nn.Module, output: Callable[[Any], Tensor] | None = None):
        self.module = module
        self.output = output
        self.embedding = next((n for n, m in module.named_modules() if isinstance(m, nn.Embedding)), None)
        # the first registered layer (skipping modules that hold only tokens or scales, like
        # a ViT's class-token embedding before its patch convolution)
        first = next(((n, m) for n, m in module.named_modules()
                      if isinstance(m, _CONVOLUTIONS + (nn.Linear, nn.Embedding) + _SEQUENCE_FIRST)), None)
        self.conv = first if first is not None and isinstance(first[1], _CONVOLUTIONS) else None
        leaves = _leaf_modules(module)
        linear = next(((n, m) for n, m in leaves if isinstance(m, nn.Linear)), None)
        self.row_wise = linear if linear is not None and all(
            isinstance(m, _ROW_WISE) for _, m in leaves) else None
        self._rows_kept: dict = {}

    def ids_problem(self, x) -> str | None:
        ids = x.get("input_ids") if isinstance(x, Mapping) else x
        if (self.embedding is None or not isinstance(ids, Tensor) or ids.dtype.is_floating_point
                or ids.dtype == torch.bool or ids.ndim < 2):
            return None
        what = "x" if ids is x else "x['input_ids']"
        return (f"{what} holds token ids of shape {tuple(ids.shape)}, but one example of the model's "
                f"nn.Embedding {self.embedding!r} is a 1-d sequence of ids")

    def conv_problem(self, x) -> str | None:
        if self.conv is None or not isinstance(x, Tensor) or not x.dtype.is_floating_point:
            return None
        name, conv = self.conv
        spatial = conv.weight.ndim - 2
        if x.ndim == spatial + 2 and x.shape[1] == conv.in_channels and conv.in_channels > 0:
            axes = {1: "L", 2: "H, W", 3: "D, H, W"}[spatial]
            return (f"x has shape {tuple(x.shape)}, but the model's first layer {name!r} "
                    f"({type(conv).__name__}, {conv.in_channels} input channels) takes one example of "
                    f"shape ({conv.in_channels}, {axes})")
        return None

    def rows_problem(self, params, x) -> str | None:
        if (self.row_wise is None or not isinstance(x, Tensor) or x.ndim != 2 or not x.dtype.is_floating_point
                or not isinstance(params, Mapping)):
            return None
        name, linear = self.row_wise
        if x.shape[1] != linear.in_features or x.shape[0] < 2:
            return None
        key = (tuple(x.shape), x.dtype)
        if key not in self._rows_kept:
            self._rows_kept[key] = self._keeps_rows(params, x)
        if not self._rows_kept[key]:
            return None
        return (f"x has shape {tuple(x.shape)}: rows of the width of the first linear layer {name!r} "
                f"({linear.in_features}), and the model's output keeps one row per row of x, so each "
                "row is explained as a separate input")

    def _keeps_rows(self, params, x) -> bool:
        """Whether the model's output for ``x`` (one example, shapes only) keeps x's leading axis."""
        try:
            meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in params.items()
                    if isinstance(v, Tensor)}
            probe = torch.empty((1,) + tuple(x.shape), dtype=x.dtype, device="meta")
            with EvalBatchNormAsElementwise():
                out = torch.func.functional_call(stateless_view(self.module), meta, (probe,))
                out = self.output(out) if self.output is not None else out
        except Exception:  # noqa: BLE001 - a model the meta device cannot run: no verdict
            return False
        return isinstance(out, Tensor) and out.ndim >= 3 and out.shape[0] == 1 and out.shape[1] == x.shape[0]


def forward_arity(module: nn.Module) -> tuple[int, int | None, list[str] | None] | None:
    """``(required, most, names)`` of ``module.forward``'s inputs (``most`` ``None`` for
    ``*args``; ``names`` ``None`` when ``**kwargs`` takes any keyword), or ``None`` if unknown."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = sum(1 for p in positional if p.default is p.empty)
    most = None if any(p.kind == p.VAR_POSITIONAL for p in parameters) else len(positional)
    names = None if any(p.kind == p.VAR_KEYWORD for p in parameters) else [
        p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return required, most, names


class FunctionalModel:
    """A module as a pure function ``f(params, x) -> output`` of ONE example.

    Built by :func:`functionalize`; see there. Attributes:
        module: the wrapped module (read, never modified).
        output: the callable choosing one tensor from the module's output, or ``None``.
        input_shape: the expected shape of one example (without batch axis), or ``None``.
        batch_statistics: whether training-mode batch norm / dropout were allowed explicitly.
    """

    def __init__(self, module: nn.Module, *, output: Callable[[Any], Tensor] | None = None,
                 input_shape: tuple[int, ...] | None = None, batch_statistics: bool = False):
        self.module = module
        self.output = output
        self.input_shape = None if input_shape is None else tuple(
            None if s is None else int(s) for s in input_shape)
        self.batch_statistics = batch_statistics
        self.expected_ndim = None if self.input_shape is not None else example_ndim(module)
        self.example_shape = None if self.input_shape is not None else ExampleShape(module, output)
        self.stochastic = [(name, m) for name, m in module.named_modules()
                           if isinstance(m, _BATCH_NORMS) or (isinstance(m, _DROPOUTS) and m.p > 0)]
        self.first_shapes = None  # leaf shapes of the first example a pass succeeded on (a later batch is caught)
        self.arity = forward_arity(module)
        self._compile_view = None

    def __repr__(self) -> str:
        return f"FunctionalModel({type(self.module).__name__}, input_shape={self.input_shape})"

    def check_training(self, where: str | None = "functionalize") -> None:
        """Raises a clear error when batch norm or dropout is in training mode (unless allowed)."""
        if self.batch_statistics:
            return
        training = [f"{name!r} ({type(m).__name__})" for name, m in self.stochastic
                    if m.training]
        if training:
            raise fail(where, f"the model is in training mode ({', '.join(training[:4])}"
                              f"{', ...' if len(training) > 4 else ''}): batch norm would use each "
                              "example's own statistics and dropout would drop at random. Call "
                              "model.eval() (fxattr never switches it), or pass "
                              "batch_statistics=True to fxattr.functionalize if that is really "
                              "meant (dropout then needs torch.vmap(..., randomness='different'))")

    def check_input(self, x, where: str | None = "functionalize", params=None) -> None:
        """Raises a clear error when ``x`` is not one example (a batch, or a wrong rank): against
        ``input_shape``, else the model's structure (:func:`example_ndim`, :class:`ExampleShape`;
        the row-wise rule needs ``params``), else the first example seen."""
        leaves = optree.tree_leaves(x, namespace="torch")
        if not leaves or not all(isinstance(t, Tensor) for t in leaves):
            raise fail(where, f"x must be a tensor or a tuple/dict of tensors, got {type(x).__name__}")
        batch_hint = (" -- this looks like a batch: explain one example and map over the batch"
                      " with torch.vmap(explain, in_dims=(None, 0, 0))")
        if self.arity is not None and isinstance(x, (tuple, list, Mapping)):
            low, high, names = self.arity
            given = len(x)
            unknown = [k for k in x if k not in names] if isinstance(x, Mapping) and names is not None else []
            if unknown or given < low or (high is not None and given > high):
                what = (f"a dict with keys {sorted(map(str, x))}" if isinstance(x, Mapping)
                        else f"a {type(x).__name__} of {given} inputs")
                takes = f"{low}" if high == low else f"{low} to {'any number' if high is None else high}"
                raise fail(where, f"x is {what}, but the model's forward takes {takes} input"
                                  f"{'s' if high != 1 else ''}"
                                  f"{' (' + ', '.join(names) + ')' if names else ''}: a tuple x is passed as "
                                  "model(*x), a dict as model(**x)")
        if self.input_shape is not None and isinstance(x, Tensor):
            if not shape_matches(tuple(x.shape), self.input_shape):
                hint = batch_hint if shape_matches(tuple(x.shape[1:]), self.input_shape) else ""
                raise fail(where, f"x has shape {tuple(x.shape)} but the model takes one example "
                                  f"of shape {self.input_shape}{hint}")
        rules = self.example_shape
        problem = rules.ids_problem(x) if rules is not None else None
        if problem is not None:
            raise fail(where, f"{problem}{batch_hint}. If this shape is one example, say so with "
                              "fxattr.functionalize(model, input_shape=...)")
        if (self.input_shape is None and self.expected_ndim is not None and isinstance(x, Tensor)
                and x.dtype.is_floating_point):
            ndim, why = self.expected_ndim
            if x.ndim != ndim:
                hint = batch_hint if x.ndim == ndim + 1 else ""
                raise fail(where, f"x has shape {tuple(x.shape)}, but one example has {ndim} "
                                  f"dimension{'s' if ndim > 1 else ''}: {why}{hint}. If this shape "
                                  "is meant, say so with fxattr.functionalize(model, input_shape=...)")
        shapes = [tuple(t.shape) for t in leaves]
        if self.first_shapes is not None and len(shapes) == len(self.first_shapes) and any(
                len(s) == len(first) + 1 and s[1:] == first
                for s, first in zip(shapes, self.first_shapes)):
            raise fail(where, f"x has shape {_shape_str(x)} but earlier calls took one example of shape "
                              f"{self.first_shapes[0] if len(shapes) == 1 else self.first_shapes}"
                              f"{batch_hint}")
        if rules is not None:
            problem = rules.conv_problem(x) or (rules.rows_problem(params, x) if params is not None else None)
            if problem is not None:
                raise fail(where, f"{problem}{batch_hint}. If this shape is one example, say so with "
                                  "fxattr.functionalize(model, input_shape=...)")
        # first_shapes is recorded by guarded() only after a pass succeeded: a failing first call
        # (an image without its channel axis) must not teach a wrong example shape

    def check_dtype(self, params, x, where: str | None = "functionalize") -> None:
        """x's floating dtype must be one the parameters have (float16 x into a float32 model is
        an error naming both, not a raw matmul error)."""
        if not isinstance(params, Mapping):
            return
        dtypes = {t.dtype for t in params.values() if isinstance(t, Tensor) and t.dtype.is_floating_point}
        if not dtypes:
            return
        for t in optree.tree_leaves(x, namespace="torch"):
            if isinstance(t, Tensor) and t.dtype.is_floating_point and t.dtype not in dtypes:
                want = ", ".join(sorted(str(d) for d in dtypes))
                raise fail(where, f"x has dtype {t.dtype} but the model's parameters are {want}: "
                                  f"convert one of them (x.to({want.split(', ')[0]}) or "
                                  f"model.to({t.dtype}) before fxattr.functionalize)")

    def __call__(self, params: Mapping[str, Tensor], x) -> Tensor:
        if torch.compiler.is_compiling():
            return self._call(params, x)
        with CAPTURE_LOCK.reading():  # never beside a graph capture in another thread
            self.check_training()
            self.check_dtype(params, x)
            return self._call(params, x)

    def _call(self, params, x) -> Tensor:
        batched = _add_batch_axis(x) if isinstance(x, (Tensor, tuple, dict, list)) else x
        if isinstance(batched, tuple):
            args, kwargs = batched, {}
        elif isinstance(batched, dict):
            args, kwargs = (), batched
        else:
            args, kwargs = (batched,), {}
        return self._unbatch(self.guarded(x, lambda: self._forward(params, args, kwargs), params=params))

    def guarded(self, x, forward: Callable[[], Any], where: str | None = "functionalize", *, params=None):
        """Runs ``forward()``, a pass of this model over ``x``, with the input checked and a
        failure inside the model reported as one clear error (not a deep torch trace).

        Graph-based explainers wrap their own forward passes in it, so that a batch passed as one
        example fails the same way everywhere.
        """
        if torch.compiler.is_compiling():
            return forward()
        self.check_input(x, where, params)
        try:
            result = forward()
            if self.first_shapes is None:
                self.first_shapes = [tuple(t.shape) for t in optree.tree_leaves(x, namespace="torch")]
            return result
        except FxattrError:
            raise
        # AssertionError: torch's MultiheadAttention asserts its input's rank
        except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as error:
            raise fail(where,
                       f"the model failed on one example of shape {_shape_str(x)} (given a batch axis "
                       f"of 1 by fxattr): {type(error).__name__}: {error}. If x is a batch, explain "
                       "one example and map over the batch with torch.vmap(explain, "
                       "in_dims=(None, 0, 0)); if one example has this shape, the model itself "
                       "failed on it") from error

    def view(self) -> nn.Module:
        """The private copy of the module a call runs on (see :func:`stateless_view`): a fresh
        one per call, so concurrent calls never share mutable state; under ``torch.compile`` one
        cached copy (dynamo traces it like any module)."""
        if torch.compiler.is_compiling():
            if self._compile_view is None:
                self._compile_view = stateless_view(self.module, batch_statistics=self.batch_statistics)
            return self._compile_view
        return stateless_view(self.module, batch_statistics=self.batch_statistics)

    def _forward(self, params, args, kwargs):
        with EvalBatchNormAsElementwise():
            return torch.func.functional_call(self.view(), params, args, kwargs)

    def _unbatch(self, out) -> Tensor:
        if self.output is not None:
            out = self.output(out)
        if not isinstance(out, Tensor):
            raise fail("functionalize", f"the model returned a {type(out).__name__}, not a tensor; "
                                        "pass output=callable to functionalize to choose one tensor "
                                        "(e.g. output=lambda out: out['logits'] or out[0])")
        if out.ndim == 0 or out.shape[0] != 1:
            raise fail("functionalize", f"the model's output of shape {tuple(out.shape)} has no batch "
                                        "axis of size 1; fxattr adds one to the example and removes it "
                                        "from the output")
        return out[0]


def differentiable(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The floating-point entries of ``params`` (what ``torch.func.grad`` can differentiate)."""
    return {k: v for k, v in params.items() if isinstance(v, Tensor) and v.dtype.is_floating_point}


@api_boundary("functionalize")
def functionalize(model: nn.Module, *, output: Callable[[Any], Tensor] | None = None,
                  input_shape: tuple[int, ...] | None = None,
                  batch_statistics: bool = False) -> tuple[FunctionalModel, dict[str, Tensor]]:
    """Turns ``model`` into a pure function of its parameters and ONE example.

    ``f(params, x)`` adds a batch axis of 1 to ``x``, runs ``model`` statelessly with
    ``torch.func.functional_call`` (on a private copy of the module tree: the model itself is
    never written, so threads may share it) and removes the batch axis from the output. ``x`` may
    be a tensor (``model(x)``), a tuple (``model(*x)``) or a dict (``model(**x)``) of tensors.
    Eval-mode batch norm is evaluated element-wise so that ``torch.vmap`` batches it instead of
    looping.

    ``params`` holds the module's parameters, detached (sharing storage with the module), and
    copies of its floating-point buffers (integer buffers such as batch norm's
    ``num_batches_tracked`` stay with the model: nothing differentiable reads them), so
    ``torch.func.grad(loss)(params)`` differentiates an explanation loss over every entry.
    Gradients flow to whatever is passed as ``params``.

    Training mode is refused: a model with batch norm or dropout (p > 0) in training mode raises
    an error asking for ``model.eval()``, here and at every call (the check reads the flags, so a
    model switched later is caught too). ``batch_statistics=True`` is the explicit opt-in: batch
    norm then normalises with the statistics of the batch it sees -- ONE example under fxattr, so
    per-example statistics -- without updating any running statistic, and dropout drops at random
    (under ``torch.vmap`` pass ``randomness="different"``).

    A batch passed as one example is reported by name: from ``input_shape`` when given, else from
    the model's structure where it is positive evidence (``nn.Sequential`` MLPs, token ids of
    embedding models, convolutional models, ``batch_first`` sequence models, row-wise models whose
    output keeps x's rows; see :func:`example_ndim` and :class:`ExampleShape`), else from the
    first example seen.

    Args:
        model: the module; put it in eval mode first (fxattr never switches it).
        output: chooses one tensor (with its batch axis) from a model that returns several,
            e.g. ``output=lambda out: out["logits"]``.
        input_shape: the shape of one example; when given, a batch passed by mistake is reported
            by name instead of by a shape error deep inside the model. ``None`` marks a size that
            varies (a sequence length: ``input_shape=(None, hidden)``); graph methods on models
            captured by torch dynamo then capture that dimension symbolically.
        batch_statistics: allow training-mode batch norm / dropout (see above).

    Returns:
        ``(f, params)``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
        >>> f, params = fxattr.functionalize(model)
        >>> explain = fxattr.gradient(f)
        >>> x = torch.randn(8, 4)
        >>> torch.vmap(explain, in_dims=(None, 0, None))(params, x, 2).shape
        torch.Size([8, 4])
    """
    if not isinstance(model, nn.Module):
        raise fail("functionalize", f"model must be a torch.nn.Module, got {type(model).__name__}")
    if output is not None and not callable(output):
        raise fail("functionalize", f"output must be a callable choosing one tensor, got {output!r}")
    if not isinstance(batch_statistics, bool):
        raise fail("functionalize", f"batch_statistics must be True or False, got {batch_statistics!r}")
    if input_shape is not None and (not isinstance(input_shape, (tuple, list, torch.Size)) or not all(
            s is None or (isinstance(s, int) and not isinstance(s, bool) and s >= 0) for s in input_shape)):
        raise fail("functionalize", f"input_shape must be a tuple of ints >= 0 (None for a size that "
                                    f"varies), got {input_shape!r}")
    f = FunctionalModel(model, output=output, input_shape=input_shape,
                        batch_statistics=batch_statistics)
    f.check_training()
    params = {name: t.detach() for name, t in model.named_parameters()}
    # Floating buffers are copied (explanations must not see later in-place updates of the
    # module's running statistics); integer ones stay with the model, out of torch.func.grad's way.
    params.update({name: t.detach().clone() for name, t in model.named_buffers()
                   if t.dtype.is_floating_point or t.dtype.is_complex})
    return f, params
