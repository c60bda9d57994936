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

__all__ = ["Target", "check_index", "check_target", "readable", "select", "take"]

Target = Union[int, Tensor, None, Callable[[Tensor], Tensor]]


def is_concrete(t: Tensor) -> bool:
    """True for a plain tensor whose values may be read (not inside vmap, grad or compile)."""
    if torch.compiler.is_compiling():
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(t) and t.device.type != "meta"


def check_target(where: str | None, target: Target) -> None:
    """Raises a clear error for a target of the wrong kind or dtype (values are checked in select)."""
    if target is None or callable(target) and not isinstance(target, Tensor):
        return
    if isinstance(target, bool):
        raise fail(where, "target must be an int class index, a 0-d integer tensor, None or a callable; got a bool")
    if isinstance(target, int):
        return
    if isinstance(target, Tensor):
        if target.dtype not in _SIGNED:
            raise fail(where, f"target must be a signed integer tensor (int64; int8 / int16 / int32 are "
                              f"cast), got dtype {target.dtype}")
        if target.ndim != 0:
            raise fail(where, f"target must be a 0-d tensor (one per example; map a batch of targets "
                              f"with torch.vmap), got shape {tuple(target.shape)}")
        return
    raise fail(where, "target must be an int class index, a 0-d integer tensor, None or a callable "
                      f"output -> scalar; got {type(target).__name__}")


_SIGNED = (torch.int64, torch.int32, torch.int16, torch.int8)


def readable(t: Tensor) -> Tensor | None:
    """The plain tensor under ``t``'s functorch wrappers (vmap's batched values included), or ``None``
    when its values cannot be read (under ``torch.compile``, on the meta device)."""
    if torch.compiler.is_compiling():
        return None
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    if t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor):
        return None
    return t


def check_index(where: str | None, index: Tensor, size: int, what: str) -> Tensor:
    """``index`` as an int64 tensor in ``[0, size)``, checked even under ``torch.vmap``.

    Under vmap an index's values are hidden behind functorch's wrappers; fxattr reads the plain
    tensor underneath (all examples' targets at once, one host read) and raises a clear error for
    any value out of range. Where values cannot be read at all (inside ``torch.compile``) the
    caller poisons the result with NaN instead (:func:`take`), so an out-of-range target never
    explains another class silently.
    """
    index = index.to(torch.int64)
    plain = readable(index)
    if plain is not None and plain.numel():
        low, high = int(plain.min()), int(plain.max())
        if low < 0 or high >= size:
            bad = low if low < 0 else high
            raise fail(where, f"target {bad} is out of range for {what} (targets are indices "
                              f"0..{size - 1}; negative indices are not accepted)")
    return index


def take(flat: Tensor, index: Tensor) -> Tensor:
    """``flat[index]`` for a 0-d int64 index, NaN where the index is out of range (compile-safe).

    A gather, not ``flat[index]``: indexing with a 0-d tensor reads its value, which vmap cannot do.
    """
    n = flat.shape[0]
    valid = (index >= 0) & (index < n)
    safe = torch.where(valid, index, torch.zeros_like(index))
    value = flat.gather(0, safe.reshape(1)).squeeze(0)
    # a factor, not a torch.where: the NaN must reach derivatives too (a gradient of a NaN
    # constant branch would be 0, a plausible-looking map); x 1 is exact where valid
    scale = torch.where(valid, torch.ones_like(value), torch.full_like(value, float("nan")))
    return value * scale


def select(where: str | None, output: Tensor, target: Target) -> Tensor:
    """The scalar of ``output`` that ``target`` names (see the module docstring)."""
    check_target(where, target)
    if callable(target) and not isinstance(target, Tensor):
        value = target(output)
        if not isinstance(value, Tensor) or value.ndim != 0:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise fail(where, f"a callable target must return a 0-d tensor, got {shape}")
        return value
    if not isinstance(output, Tensor):
        raise fail(where, f"the model returned a {type(output).__name__}, not a tensor; pass output= to "
                          "fxattr.functionalize to choose one")
    flat = output.reshape(-1)
    if target is None:
        return flat.gather(0, flat.detach().argmax().reshape(1)).squeeze(0)
    what = f"an output of {flat.shape[0]} elements (shape {tuple(output.shape)})"
    if isinstance(target, int):
        if not 0 <= target < flat.shape[0]:
            raise fail(where, f"target {target} is out of range for {what}")
        return flat[target]
    index = check_index(where, target.to(flat.device), flat.shape[0], what)
    return take(flat, index)
