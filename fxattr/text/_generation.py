"""Generation attribution: every generated token of a sequence explained in one vmapped call.

For a prompt of length ``start`` followed by ``T`` generated tokens, the ``T`` targets are
``log p(x_s | x_<s)`` for ``s = start .. L-1``. A causal language model computes all of them in
ONE forward pass; their gradients with respect to the input embeddings are the rows of one
Jacobian, which is ``torch.func.vjp`` once and ``torch.vmap`` over the ``T`` one-hot output
cotangents (``chunk_size`` at a time, for memory) -- instead of ``T`` forward and backward passes.
Integrated gradients does the same at every integration point (vmapped over the points too).
"""

from __future__ import annotations

import torch
from torch import Tensor

import fxattr
from fxattr.errors import fail
from fxattr.text._functional import REDUCE, baseline_value, check_mask, check_text_model

__all__ = ["generation_attribution"]

METHODS = ("gradient", "input_x_gradient", "integrated_gradients")


def _check_chunk(where: str, name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise fail(where, f"{name} must be an int >= 1 or None, got {value!r}")


def generation_attribution(f, *, method: str = "input_x_gradient", reduce: str | None = "sum",
                           steps: int = 16, baseline="zeros", quadrature: str = "gausslegendre",
                           chunk_size: int | None = 32, steps_chunk_size: int | None = 4):
    """Token relevance of every generated token's log-probability, all targets in one call.

    ``explain(params, input_ids, attention_mask, start)`` returns ``(T, L)`` with ``T = L - start``:
    row ``t`` is the relevance of each input token for ``log p(x_{start+t} | x_<start+t)`` (by
    causality zero at positions after ``start + t - 1``; rows of padded positions are zero).
    ``start`` (>= 1, a Python int: the prompt length, shared by the batch) is static so that ``T``
    is; a left-padded batch of prompts followed by generated tokens has one ``start``. Each row
    equals :func:`fxattr.text.attribute` of the same method with the target
    ``fxattr.text.next_token(x_s, position=s - 1)``, which costs a forward and a backward per token.

    Args:
        f: the :class:`~fxattr.text.TextModel` of a causal language model.
        method: ``"gradient"``, ``"input_x_gradient"`` (default) or ``"integrated_gradients"``.
        reduce: ``"sum"`` over the embedding dimension, ``"norm"`` or ``None`` (keep ``(T, L, D)``).
        steps, baseline, quadrature: integrated gradients' points, baseline (``"zeros"``,
            ``"pad"``, a token id or a tensor of embeddings) and rule (``fxattr.QUADRATURES``).
        chunk_size: output cotangents (targets) differentiated at once (``None``: all ``T``).
        steps_chunk_size: integration points evaluated at once (``None``: all).

    Example:
        >>> f, params = fxattr.text.functionalize(gpt2.eval())
        >>> explain = fxattr.text.generation_attribution(f)
        >>> relevance = torch.vmap(explain, in_dims=(None, 0, 0, None))(params, ids, mask, prompt_length)
    """
    where = "text.generation_attribution"
    check_text_model(where, f)
    if method not in METHODS:
        raise fail(where, f"method must be one of {METHODS}, got {method!r}")
    if reduce not in REDUCE:
        raise fail(where, f"reduce must be one of {REDUCE}, got {reduce!r}")
    if not f.causal:
        raise fail(where, "generation attribution needs a causal language model (f.causal is False)")
    _check_chunk(where, "chunk_size", chunk_size)
    _check_chunk(where, "steps_chunk_size", steps_chunk_size)
    alphas, weights = fxattr.quadrature(quadrature, steps) if method == "integrated_gradients" else ([1.0], [1.0])
    base_of = baseline_value(where, f, baseline) if method == "integrated_gradients" else None

    def explain(params, input_ids: Tensor, attention_mask: Tensor | None = None, start: int = 1) -> Tensor:
        if isinstance(start, bool) or not isinstance(start, int):
            raise fail(where, f"start must be a Python int (the prompt length, shared by the batch), "
                              f"got {type(start).__name__}")
        embeddings = f.embed(params, input_ids)
        length = embeddings.shape[0]
        if not 1 <= start < length:
            raise fail(where, f"start must satisfy 1 <= start < length = {length}, got {start}")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        check_mask(where, mask, input_ids)
        generated = input_ids[start:]

        def log_probs(e):
            logits = f(params, e, mask)[start - 1:length - 1]
            return logits.log_softmax(-1).gather(1, generated[:, None].to(logits.device)).squeeze(1)

        count = length - start
        cotangents = torch.eye(count, dtype=embeddings.dtype, device=embeddings.device)

        def jacobian_at(point):
            _, pullback = torch.func.vjp(log_probs, point)
            return torch.vmap(lambda v: pullback(v)[0], chunk_size=chunk_size)(cotangents)

        if method == "integrated_gradients":
            base = base_of(params, embeddings)
            diff = embeddings - base
            a = torch.tensor(alphas, dtype=embeddings.dtype, device=embeddings.device)
            w = torch.tensor(weights, dtype=embeddings.dtype, device=embeddings.device)
            jac = torch.vmap(lambda alpha: jacobian_at(base + alpha * diff), chunk_size=steps_chunk_size)(a)
            relevance = diff * torch.tensordot(w, jac, dims=1)
        else:
            relevance = jacobian_at(embeddings)
            if method == "input_x_gradient":
                relevance = embeddings * relevance
        keep = mask.to(relevance.dtype)
        rows = keep[start:, None]
        if reduce is None:
            return relevance * (rows[:, :, None] * keep[None, :, None])
        relevance = relevance.sum(-1) if reduce == "sum" else relevance.norm(dim=-1)
        return relevance * rows * keep[None, :]

    explain.__name__ = explain.__qualname__ = "text.generation_attribution"
    explain.model = f
    explain.config = {"method": method, "reduce": reduce, "steps": steps, "baseline": baseline,
                      "quadrature": quadrature, "chunk_size": chunk_size,
                      "steps_chunk_size": steps_chunk_size}
    return explain
