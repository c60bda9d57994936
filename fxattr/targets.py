"""Choosing the scalar an explainer explains: ``target`` in ``explain(params, x, target)``.

A target is
- an ``int``: an index into the flattened output (a class index for a classifier);
- a 0-d integer tensor: the same, and a batch of them can be mapped over with ``torch.vmap``;
- ``None``: the output's argmax, chosen without gradient;
- a callable ``output -> 0-d tensor``: a logit difference, a softmax probability, a region sum of
  a segmentation map, ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import torch
from torch import Tensor

from fxattr.errors import fail

__all__ = ["Target", "check_target", "select"]

Target = Union[int, Tensor, None, Callable[[Tensor], Tensor]]


def is_concrete(t: Tensor) -> bool:
    """True for a plain tensor whose values may be read (not inside vmap, grad or compile)."""
    if torch.compiler.is_compiling():
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(t) and t.device.type != "meta"


def check_target(where: str, target: Target) -> None:
    """Raises a clear error for a target of the wrong kind or dtype (values are checked in select)."""
    if target is None or callable(target):
        return
    if isinstance(target, bool):
        raise fail(where, "target must be an int class index, a 0-d integer tensor, None or a callable; got a bool")
    if isinstance(target, int):
        return
    if isinstance(target, Tensor):
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise fail(where, f"target must be an integer tensor, got dtype {target.dtype}")
        if target.ndim != 0:
            raise fail(where, f"target must be a 0-d tensor (one per example; map a batch of targets "
                              f"with torch.vmap), got shape {tuple(target.shape)}")
        return
    raise fail(where, "target must be an int class index, a 0-d integer tensor, None or a callable "
                      f"output -> scalar; got {type(target).__name__}")


def select(where: str, output: Tensor, target: Target) -> Tensor:
    """The scalar of ``output`` that ``target`` names (see the module docstring)."""
    check_target(where, target)
    if callable(target) and not isinstance(target, Tensor):
        value = target(output)
        if not isinstance(value, Tensor) or value.ndim != 0:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise fail(where, f"a callable target must return a 0-d tensor, got {shape}")
        return value
    flat = output.reshape(-1)
    if target is None:
        return _take(flat, flat.detach().argmax())
    if isinstance(target, int):
        if not 0 <= target < flat.shape[0]:
            raise fail(where, f"target {target} is out of range for an output of {flat.shape[0]} "
                              f"elements (shape {tuple(output.shape)})")
        return flat[target]
    if is_concrete(target) and not 0 <= int(target) < flat.shape[0]:
        raise fail(where, f"target {int(target)} is out of range for an output of {flat.shape[0]} "
                          f"elements (shape {tuple(output.shape)})")
    return _take(flat, target.to(flat.device))


def _take(flat: Tensor, index: Tensor) -> Tensor:
    # gather, not flat[index]: indexing with a 0-d tensor reads its value, which vmap cannot do.
    return flat.gather(0, index.reshape(1)).squeeze(0)
