"""What every explainer shares: argument checks at construction and the explainer's identity."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import optree
import torch
from torch import nn

from fxattr.errors import api_boundary, check_finite, fail
from fxattr.functional import CAPTURE_LOCK
from fxattr.targets import readable, select

Explainer = Callable[..., Any]


def check_model(where: str, f) -> None:
    """``f`` must be the function of ``fxattr.functionalize`` (or any ``f(params, x)``)."""
    if isinstance(f, nn.Module):
        raise fail(where, "f must be a function f(params, x), not an nn.Module: "
                          "use f, params = fxattr.functionalize(model)")
    if not callable(f):
        raise fail(where, f"f must be a callable f(params, x), got {type(f).__name__}")


def check_int(where: str, name: str, value, minimum: int = 1, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise fail(where, f"{name} must be an int >= {minimum}{' or None' if allow_none else ''}, "
                          f"got {value!r}")


def check_choice(where: str, name: str, value, choices) -> None:
    if value not in choices:
        raise fail(where, f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def explainer(name: str, f, config: dict, fn: Explainer, *, boundary: str | None = None,
              integer_x: bool = False, empty: str = "like_x") -> Explainer:
    """Names ``fn`` and records what it explains, so errors and compositions can refer to it.

    The returned explainer checks every call's input before ``fn`` runs (:func:`check_call`) and
    sits behind :func:`fxattr.errors.api_boundary`: every ``FxattrError`` escaping a call is
    reported under ``boundary`` (default ``name``), the explainer the user called, whichever inner
    function raised it. Under ``torch.compile`` values cannot be read, so instead of the
    finiteness check a non-finite x turns the whole result into NaN (a zero-valued term
    ``0 * sum(x)`` is added; derivatives are unchanged).

    An empty batch (``torch.vmap`` over B = 0 examples) returns an empty result without running
    the model: zeros of x's shape (``empty="like_x"``), or of the shape of one explanation of a
    zero example (``empty="run"``, for explainers whose result is not x-shaped, like a CAM at the
    layer's resolution).
    """
    bad = non_finite_option(config)
    if bad is not None:
        raise fail(boundary or name, f"{bad[0]} must be finite, got {bad[1]}")

    def in_float32(params, x, *args, **kwargs):
        # the half-precision policy (see upcast): the same rounded weights and inputs in float32,
        # the result rounded once to the half dtype
        params, x, half = upcast(params, x)
        return fn(params, x, *args, **kwargs) if half is None else downcast(fn(params, x, *args, **kwargs), half)

    def checked(params, x, *args, **kwargs):
        if torch.compiler.is_compiling():
            return poison_non_finite(in_float32(params, x, *args, **kwargs), x)
        if is_empty_batch(x):
            zero = tree_map(lambda t: torch.zeros(t.shape, dtype=t.dtype, device=t.device), x)
            if empty == "like_x":
                return zero
            target = args[0] if args else kwargs.get("target")
            target = target if callable(target) and not isinstance(target, torch.Tensor) else 0
            return tree_map(torch.zeros_like, in_float32(params, zero, target))
        with CAPTURE_LOCK.reading():  # never beside a graph capture in another thread
            check_call(f, params, x, integer_x=integer_x)
            return in_float32(params, x, *args, **kwargs)

    wrapped = api_boundary(boundary or name)(checked)
    wrapped.__name__ = wrapped.__qualname__ = name
    wrapped.__doc__ = fn.__doc__
    wrapped.model = f
    wrapped.config = MappingProxyType(dict(config))
    wrapped.__wrapped__ = fn
    return wrapped


def non_finite_option(config, depth: int = 0):
    """``(name, value)`` of the first NaN / Inf among an explainer's options, or ``None``.

    The last line of defence behind each explainer's own checks: every explainer built with
    :func:`explainer` refuses a non-finite float, tensor, or rule / stabiliser parameter in its
    configuration (e.g. ``lrp(f, rule="epsilon", epsilon=nan)``) at construction.
    """
    if depth > 4:
        return None
    items = config.items() if isinstance(config, Mapping) else []
    for key, value in items:
        found = _non_finite(str(key), value, depth)
        if found is not None:
            return found
    return None


def _non_finite(name: str, value, depth: int):
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else (name, value)
    if isinstance(value, torch.Tensor):
        plain = readable(value)  # an option built inside vmap / grad: its values, unwrapped
        if (value.dtype.is_floating_point and value.numel() and plain is not None
                and not bool(torch.isfinite(plain).all())):
            return name, "a tensor holding NaN or Inf"
        return None
    if isinstance(value, Mapping):
        return non_finite_option(value, depth + 1)
    if isinstance(value, (tuple, list)):
        if len(value) == 2 and isinstance(value[0], str) and not isinstance(value[1], str):
            return _non_finite(value[0], value[1], depth + 1)  # a (name, value) pair of a rule
        for item in value[:64]:
            found = _non_finite(name, item, depth + 1)
            if found is not None:
                return found
        return None
    for attribute in ("config", "epsilon", "stabilise"):
        inner = getattr(value, attribute, None)
        if inner is not None and inner is not value and depth < 4:
            found = _non_finite(name if attribute != "epsilon" else f"{name} epsilon", inner, depth + 1)
            if found is not None:
                return found
    return None


def check_call(f, params, x, *, integer_x: bool = False, where: str | None = None) -> None:
    """The checks every explainer call makes on its arguments before any work (eager and vmap).

    ``x`` must be a tensor or a tuple / dict of tensors, floating-point (integer token ids only
    where ``integer_x``; booleans too where ``integer_x == "bool"``: perturbation methods), of a dtype the parameters have, and finite: NaN / Inf in x would give a
    plausible finite map from gradient methods, so they are an error naming how many values are
    bad. Under ``torch.vmap`` the values are read under functorch's wrappers (all examples at
    once). The model must not be in training mode (see ``fxattr.functionalize``).
    """
    leaves = optree.tree_leaves(x, namespace="torch")
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise fail(where, f"x must be a tensor or a tuple / dict of tensors (one example), got "
                          f"{type(x).__name__}")
    for t in leaves:
        if not (t.dtype.is_floating_point or (integer_x and not t.dtype.is_complex
                                              and (t.dtype != torch.bool or integer_x == "bool"))):
            raise fail(where, f"x must be a floating-point tensor, got dtype {t.dtype}: attributions "
                              "are gradients or perturbations of x (convert with x.float(); for token "
                              "ids, explain the embeddings)")
    if hasattr(f, "check_training"):
        f.check_training(where)
    if hasattr(f, "check_dtype"):
        f.check_dtype(params, x, where)
    if hasattr(f, "check_input"):  # a batch passed as one example, before any method-specific work
        f.check_input(x, where, params)
    for t in leaves:
        if not t.dtype.is_floating_point:
            continue
        plain = readable(t)
        if plain is not None and plain.numel():
            finite = torch.isfinite(plain)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise fail(where, f"x holds {bad} NaN or Inf value{'s' if bad > 1 else ''} (of "
                                  f"{plain.numel()}{' in the batch' if plain.shape != t.shape else ''}"
                                  "); an explanation of a non-finite input would be meaningless")


HALF = (torch.float16, torch.bfloat16)


def half_dtype(params, x) -> torch.dtype | None:
    """The half-precision dtype an explanation of ``x`` is computed for, or ``None``.

    x's floating dtype when it is float16 / bfloat16; for integer x (token ids) the parameters'
    floating dtype when that is half precision (an embedding model in float16)."""
    floating = [t.dtype for t in optree.tree_leaves(x, namespace="torch")
                if isinstance(t, torch.Tensor) and t.dtype.is_floating_point]
    if floating:
        return floating[0] if floating[0] in HALF else None
    weights = {t.dtype for t in optree.tree_leaves(params, namespace="torch")
               if isinstance(t, torch.Tensor) and t.dtype.is_floating_point}
    return next(iter(weights)) if len(weights) == 1 and weights <= set(HALF) else None


def upcast(params, x):
    """``(params, x, dtype)``: float16 / bfloat16 tensors of ``params`` and ``x`` in float32, and
    the half dtype the result is due in (``None``, and the arguments untouched, otherwise).

    The half-precision policy of every explainer (applied once, by :func:`explainer`, to every
    call): the model is evaluated with the SAME rounded weights and inputs, in float32, and the
    result is rounded once to x's dtype. Evaluating in half precision is not faithful enough for
    attribution: a float16 / bfloat16 output is rounded to 1e-3 / 8e-3 of its size, so

    - propagation methods (LRP alpha-beta, DeepLIFT, DeepLiftShap) divide by differences of
      rounded activations (1.6e-2 to 1.2e-1 relative off float32 on the test CNN);
    - path and noise methods (integrated gradients, SmoothGrad) evaluate gradients at rounded
      path points / noisy copies whose ReLU patterns flip (7e-2 to 8.7e-2 in bfloat16); the noise
      is drawn in float32;
    - CAM products of activations and gradients fall into float16's subnormals (guided Grad-CAM
      1.9e-2), and perturbation methods subtract outputs whose drop is often below the rounding.

    Float32 and float64 calls are unaffected. The cost is one float32 copy of the weights per
    call (per vmapped batch) and float32 arithmetic. Derivatives (``torch.func.grad`` over
    ``params`` or ``x``) flow through the casts back to the half-precision tensors.
    """
    dtype = half_dtype(params, x)
    if dtype is None:
        return params, x, None

    def up(t):
        return t.float() if isinstance(t, torch.Tensor) and t.dtype in HALF else t

    return tree_map(up, params), tree_map(up, x), dtype


def downcast(result, dtype: torch.dtype):
    """``result`` (a tensor or a pytree) with its float32 tensors rounded to ``dtype``."""
    return tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype == torch.float32
                    else t, result)


def is_empty_batch(x) -> bool:
    """True inside ``torch.vmap`` over a batch of zero examples (x's values are an empty tensor)."""
    for t in optree.tree_leaves(x, namespace="torch"):
        if isinstance(t, torch.Tensor) and t.numel():
            plain = readable(t)
            if plain is not None and plain.numel() == 0:
                return True
    return False


def poison_non_finite(result, x):
    """``result`` with NaN everywhere when ``x`` holds NaN / Inf (``+ 0 * sum(x)``)."""
    zero = None
    for t in optree.tree_leaves(x, namespace="torch"):
        if isinstance(t, torch.Tensor) and t.dtype.is_floating_point:
            term = (t.detach() * 0).sum()
            zero = term if zero is None else zero + term
    if zero is None:
        return result
    return tree_map(lambda r: r + zero.to(r.dtype) if isinstance(r, torch.Tensor)
                    and r.dtype.is_floating_point else r, result)


def check_float(where, name: str, value, **bounds) -> float:
    """A float option: finite (NaN / Inf rejected) and within ``minimum`` / ``maximum``."""
    return check_finite(where, name, value, **bounds)


def check_bool(where, name: str, value) -> None:
    if not isinstance(value, bool):
        raise fail(where, f"{name} must be True or False, got {value!r}")


def check_tensor_finite(where, name: str, value) -> None:
    """A tensor (or pytree of tensors) given as configuration holds no NaN / Inf."""
    for leaf in optree.tree_leaves(value, namespace="torch"):
        if isinstance(leaf, torch.Tensor) and leaf.dtype.is_floating_point and leaf.numel() \
                and not bool(torch.isfinite(leaf).all()):
            raise fail(where, f"{name} holds NaN or Inf values")


def tree_map(fn, *trees):
    return optree.tree_map(fn, *trees, namespace="torch")


def grad_of_target(where: str, f, params, x, target):
    """d f(params, x)[target] / dx, for a tensor or a pytree ``x``."""
    return torch.func.grad(lambda x_: select(where, f(params, x_), target))(x)


def fixed_target(f, params, x, target):
    """``target`` with ``None`` resolved to the argmax at ``x``, so that it stays fixed while the
    explainer evaluates the model at other points (integration paths, noisy copies)."""
    if target is not None:
        return target
    return f(params, x).detach().reshape(-1).argmax()
