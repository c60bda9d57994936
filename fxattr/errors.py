"""The one exception type fxattr raises for bad arguments, inputs and graphs, and the decorator that
names the public function at fault."""

from __future__ import annotations

import functools
import math
import threading
from numbers import Real

import torch

__all__ = ["FxattrError", "api_boundary", "check_finite", "fail"]


class FxattrError(ValueError):
    """A bad argument, input or model, reported under the name of the public fxattr function called.

    Subclasses ``ValueError`` so ``except ValueError`` keeps working; its text is
    ``fxattr.<where>: <message>`` (``fxattr.integrated_gradients: steps must be >= 1``) and names the
    argument or graph node at fault. Recognise fxattr's own errors with ``isinstance(error,
    FxattrError)``, never by their text.

    Attributes:
        message: what was wrong, without the prefix.
        where: the public function it is reported under (``None`` until a boundary names it).
    """

    def __init__(self, message: str, where: str | None = None):
        super().__init__(message, where)
        self.message = message
        self.where = where

    def __str__(self) -> str:
        return self.message if self.where is None else f"fxattr.{self.where}: {self.message}"


def fail(where: str | None, message: str) -> FxattrError:
    """Builds the error for ``raise``: ``fail("integrated_gradients", "steps must be >= 1")``.

    ``where`` may be ``None`` inside a function under :func:`api_boundary`: the boundary names it.
    """
    return FxattrError(message, where)


_DEPTH = threading.local()


def api_boundary(name: str):
    """Decorator: errors escaping the decorated public function are reported under ``name`` once.

    The outermost boundary a call passes through names the error: an ``FxattrError`` raised deep
    inside (by ``fxattr.functionalize``'s input check, the graph capture, a target check) is
    re-labelled ``fxattr.<name>: ...`` with the name of the function the user called, so the
    message refers to the user's own call; inner boundaries leave it alone. Nothing else is caught
    or converted, and under ``torch.compile`` the wrapper is transparent.

    Usage: decorate public constructors (``@api_boundary("gradcam")``) and wrap the explainer they
    return (``fxattr._explainer.explainer`` does this for every explainer built with it); inside,
    raise ``fail(None, "...")`` or ``fail("anything", "...")`` -- the boundary sets the name.

    Example:
        >>> @api_boundary("my_method")
        ... def my_method(f, *, steps):
        ...     if steps < 1:
        ...         raise fail(None, f"steps must be >= 1, got {steps}")
    """
    def decorate(fn):
        @functools.wraps(fn)
        def boundary(*args, **kwargs):
            if torch.compiler.is_compiling():
                return fn(*args, **kwargs)
            depth = getattr(_DEPTH, "value", 0)
            _DEPTH.value = depth + 1
            try:
                return fn(*args, **kwargs)
            except FxattrError as error:
                if depth == 0:
                    error.where = name
                raise
            finally:
                _DEPTH.value = depth

        return boundary

    return decorate


def check_finite(where: str | None, name: str, value, *, minimum: float | None = None,
                 maximum: float | None = None, allow_none: bool = False, strict_minimum: bool = False) -> float | None:
    """A float configuration option: a real number (no bool), finite, within the given bounds."""
    if value is None and allow_none:
        return None
    bounds = []
    if minimum is not None:
        bounds.append(f"{'>' if strict_minimum else '>='} {minimum:g}")
    if maximum is not None:
        bounds.append(f"<= {maximum:g}")
    wanted = f"{name} must be a number{' ' + ' and '.join(bounds) if bounds else ''} (finite)"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise fail(where, f"{wanted}, got {value!r:.80}")
    number = float(value)
    if (not math.isfinite(number) or (minimum is not None and number < minimum)
            or (strict_minimum and number == minimum) or (maximum is not None and number > maximum)):
        raise fail(where, f"{wanted}, got {value!r}")
    return number
