"""What every explainer shares: argument checks at construction and the explainer's identity."""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import optree
import torch
from torch import nn

from fxattr.errors import fail
from fxattr.targets import select

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


def explainer(name: str, f, config: dict, fn: Explainer) -> Explainer:
    """Names ``fn`` and records what it explains, so errors and compositions can refer to it."""
    fn.__name__ = fn.__qualname__ = name
    fn.model = f
    fn.config = MappingProxyType(dict(config))
    return fn


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
