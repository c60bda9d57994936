"""Targets for language models: which scalar of a token sequence's output is explained.

The targets are ``NamedTuple`` s of tensors, so a batch of them is mapped over by ``torch.vmap``
like any other argument (``in_dims=0`` maps every field). The constructors broadcast their
arguments to tensors of one shape, so ``next_token(tokens)`` with ``tokens`` of shape ``(B,)``
gives a batch of ``B`` targets.

- :func:`class_logit`: one logit of a classifier (the same as an int target).
- :func:`next_token`: ``log p(token | prefix)`` at a position of a causal language model.
- :func:`continuation`: ``sum_t log p(x_t | x_<t)`` over the tokens from ``start`` to the end of
  the sequence (the log-probability of a continuation of a prompt).
- :func:`contrast`: ``log p(token) - log p(foil)`` at a position (for a classifier: the difference
  of two logits), which is also the difference of the two logits.

Positions count tokens of the (possibly padded) sequence from 0; a negative position counts back
from the last real token (``-1``: the last token that is not padding, so that left- and
right-padded batches mean the same thing).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fxattr.errors import fail
from fxattr.targets import select

__all__ = ["ClassLogit", "Continuation", "Contrast", "NextToken", "class_logit", "continuation",
           "contrast", "last_real_position", "next_token", "predicted_next_token", "resolve_target"]


class ClassLogit(NamedTuple):
    """The logit ``index`` of a classifier's output (a 1-d output)."""
    index: Tensor


class NextToken(NamedTuple):
    """``log_softmax(logits[position])[token]``: the log-probability that ``token`` follows the
    prefix ending at ``position``."""
    token: Tensor
    position: Tensor


class Continuation(NamedTuple):
    """``sum_{t >= start, t real} log p(x_t | x_<t)``: the log-probability of the tokens from
    ``start`` (absolute index, >= 1) to the last real token, given what precedes them."""
    start: Tensor


class Contrast(NamedTuple):
    """``log p(token) - log p(foil)`` at ``position`` (for a 1-d output: ``logit[token] -
    logit[foil]``); the log-softmax normaliser cancels, so it is also the logit difference."""
    token: Tensor
    foil: Tensor
    position: Tensor


TEXT_TARGETS = (ClassLogit, NextToken, Continuation, Contrast)


def _long(where: str, name: str, value) -> Tensor:
    if isinstance(value, bool) or not isinstance(value, (int, Tensor)):
        raise fail(where, f"{name} must be an int or an integer tensor, got {type(value).__name__}")
    t = torch.as_tensor(value)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise fail(where, f"{name} must hold integers, got dtype {t.dtype}")
    return t.long()


def _broadcast(where: str, **values) -> list[Tensor]:
    tensors = {k: _long(where, k, v) for k, v in values.items()}
    try:
        return list(torch.broadcast_tensors(*tensors.values()))
    except RuntimeError as error:
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        raise fail(where, f"the arguments' shapes {shapes} do not broadcast") from error


def class_logit(index) -> ClassLogit:
    """The logit ``index`` of a classifier (int or integer tensor of indices, one per example).

    Example:
        >>> targets = fxattr.text.class_logit(labels)            # labels: (B,)
        >>> torch.vmap(explain, in_dims=(None, 0, 0, 0))(params, ids, mask, targets)
    """
    (index,) = _broadcast("text.class_logit", index=index)
    return ClassLogit(index)


def next_token(token, position=-1) -> NextToken:
    """The log-probability of ``token`` after the prefix ending at ``position`` (default: the last
    real token, so ``token`` is the predicted continuation of the whole sequence).

    Example:
        >>> targets = fxattr.text.next_token(next_ids)           # next_ids: (B,)
        >>> torch.vmap(explain, in_dims=(None, 0, 0, 0))(params, ids, mask, targets)
    """
    token, position = _broadcast("text.next_token", token=token, position=position)
    return NextToken(token, position)


def continuation(start) -> Continuation:
    """The summed log-probability of the tokens from index ``start`` (>= 1) to the last real token.

    Example:
        >>> targets = fxattr.text.continuation(torch.full((B,), prompt_length))
        >>> torch.vmap(explain, in_dims=(None, 0, 0, 0))(params, ids, mask, targets)
    """
    (start,) = _broadcast("text.continuation", start=start)
    if not torch._C._functorch.is_functorch_wrapped_tensor(start) and (start < 1).any():
        raise fail("text.continuation", f"start must be >= 1 (token 0 has no prefix), got {start.tolist()}")
    return Continuation(start)


def contrast(token, foil, position=-1) -> Contrast:
    """``log p(token) - log p(foil)`` at ``position`` ("why this token rather than that one").

    Example:
        >>> targets = fxattr.text.contrast(answer_ids, foil_ids)
        >>> torch.vmap(explain, in_dims=(None, 0, 0, 0))(params, ids, mask, targets)
    """
    token, foil, position = _broadcast("text.contrast", token=token, foil=foil, position=position)
    return Contrast(token, foil, position)


def _pick(vector: Tensor, index: Tensor) -> Tensor:
    # gather, not vector[index]: indexing with a 0-d tensor reads its value, which vmap cannot do.
    return vector.gather(0, index.reshape(1).to(vector.device)).squeeze(0)


def _row(where: str, output: Tensor, position: Tensor, last: Tensor) -> Tensor:
    """``output[position]`` with negative positions counted back from the last real token."""
    if output.ndim != 2:
        raise fail(where, f"this target needs a language model's logits of shape (length, vocab), "
                          f"got an output of shape {tuple(output.shape)}")
    position = position.to(last.device)
    index = torch.where(position < 0, last + 1 + position, position).clamp(0, output.shape[0] - 1)
    return output.index_select(0, index.reshape(1)).squeeze(0)


def _check_ndim(where: str, target) -> None:
    for name, value in zip(type(target)._fields, target):
        if not isinstance(value, Tensor) or value.ndim != 0:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise fail(where, f"{type(target).__name__}.{name} must be a 0-d tensor per example (map a "
                              f"batch of targets with torch.vmap), got {shape}")


def last_real_position(mask: Tensor) -> Tensor:
    """The index of the last position where ``mask`` is nonzero (0-d; works under vmap)."""
    positions = torch.arange(mask.shape[0], device=mask.device)
    return (positions * mask.long()).max()


def predicted_next_token(output: Tensor, mask: Tensor) -> NextToken:
    """The target "the model's predicted next token after the last real token", from logits
    ``(L, vocab)`` computed at the input (the choice carries no gradient)."""
    row = _row("text.attribute", output.detach(), torch.tensor(-1), last_real_position(mask))
    return NextToken(row.argmax(), torch.tensor(-1, device=row.device))


def resolve_target(where: str, target, input_ids: Tensor, mask: Tensor):
    """An fxattr target (int, 0-d tensor, None or callable ``output -> scalar``) for one example.

    ``NamedTuple`` targets become callables reading ``input_ids`` and ``mask`` (for the positions of
    the last real token and of the continuation); anything else (an int, a 0-d tensor, ``None``, a
    callable) is passed through to fxattr's own target rules.
    """
    positions = torch.arange(mask.shape[0], device=mask.device)
    last = last_real_position(mask)
    if not isinstance(target, TEXT_TARGETS):
        return target
    _check_ndim(where, target)
    if isinstance(target, ClassLogit):
        def logit(output):
            if output.ndim != 1:
                raise fail(where, f"class_logit needs a classifier's 1-d output, got shape {tuple(output.shape)}")
            # select range-checks the index, under vmap too (a raw gather error otherwise)
            return select(where, output, target.index)
        return logit
    if isinstance(target, NextToken):
        return lambda output: _pick(_row(where, output, target.position, last).log_softmax(-1), target.token)
    if isinstance(target, Contrast):
        def difference(output):
            if output.ndim == 1:
                return _pick(output, target.token) - _pick(output, target.foil)
            row = _row(where, output, target.position, last)
            return _pick(row, target.token) - _pick(row, target.foil)
        return difference

    def summed(output):
        if output.ndim != 2:
            raise fail(where, f"continuation needs a language model's logits of shape (length, vocab), "
                              f"got {tuple(output.shape)}")
        # log p(x_t | x_<t) is read from the logits at t - 1, for t = 1 .. L-1.
        logp = output[:-1].log_softmax(-1).gather(1, input_ids[1:, None].to(output.device)).squeeze(1)
        t = positions[1:]
        keep = (t >= target.start.to(t.device)) & mask[1:].bool()
        return torch.where(keep, logp, torch.zeros_like(logp)).sum()
    return summed
