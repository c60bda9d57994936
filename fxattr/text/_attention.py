"""Attention rollout (Abnar & Zuidema 2020) and gradient-weighted attention relevance (Chefer, Gur
& Wolf 2021, "Generic Attention-model Explainability"), from the attention probabilities.

The probabilities are read where eager attention materialises them: every ``softmax`` over the
last axis whose result is a square ``(1, heads, L, L)`` map, caught by a ``TorchFunctionMode``
while the model runs (no hooks, no change to the module). For the gradient-weighted rule the
model is evaluated with a zero tensor added to each map, and the gradient of the target with
respect to those zeros is the gradient with respect to the map. Fused kernels (``sdpa``, flash)
never materialise the probabilities: then the explainer raises and says to load the model with
``attn_implementation="eager"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

import fxattr
from fxattr.errors import fail

__all__ = ["attention_maps", "attention_relevance", "attention_rollout"]

SOFTMAXES = {F.softmax, torch.softmax, Tensor.softmax, torch.special.softmax}
HEAD_FUSIONS = ("mean", "max", "min")


class AttentionCapture(TorchFunctionMode):
    """Collects (and, given ``offsets``, shifts) the square attention maps of eager attention."""

    def __init__(self, offsets=None):
        super().__init__()
        self.maps: list[Tensor] = []
        self.offsets = offsets

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in SOFTMAXES and isinstance(out, Tensor) and out.ndim == 4 and out.shape[-1] == out.shape[-2]:
            scores = args[0] if args else kwargs["input"]
            # Hugging Face's eager attention takes the softmax in float32 and casts it back to the
            # scores' dtype right away; casting here gives the map the model then uses.
            out = out.to(scores.dtype)
            if self.offsets is not None:
                if len(self.maps) >= len(self.offsets):
                    raise fail("text.attention", "the model produced more attention maps than in its "
                                                 "first pass (data-dependent control flow?)")
                out = out + self.offsets[len(self.maps)].to(out.dtype)
            self.maps.append(out)
        return out


def _no_maps(where: str) -> Exception:
    return fail(where, "the model materialised no attention probabilities (no square softmax over the last "
                       "axis): its attention runs in a fused kernel (sdpa / flash attention). Load it with "
                       "attn_implementation='eager' (e.g. AutoModel.from_config(config, "
                       "attn_implementation='eager')) to explain it with attention maps")


def _one_example(where: str, maps: list[Tensor]) -> Tensor:
    if not maps:
        raise _no_maps(where)
    shapes = {tuple(m.shape) for m in maps}
    if len(shapes) != 1 or maps[0].shape[0] != 1:
        raise fail(where, f"expected one (1, heads, L, L) attention map per layer for one example, got shapes "
                          f"{sorted(shapes)}")
    return torch.stack([m[0] for m in maps])        # (layers, heads, L, L)


def attention_maps(f, params, x, *, where: str = "text.attention_maps") -> Tensor:
    """The attention probabilities of ``f(params, x)`` for one example: ``(layers, heads, L, L)``.

    Example:
        >>> maps = torch.vmap(lambda x: fxattr.text.attention_maps(f, params, x))(images)
    """
    capture = AttentionCapture()
    with capture:
        f(params, x)
    return _one_example(where, capture.maps)


def _check(where: str, f, query) -> None:
    if not callable(f):
        raise fail(where, f"f must be a callable f(params, x), got {type(f).__name__}")
    if isinstance(query, bool) or not isinstance(query, int):
        raise fail(where, f"query must be an int token index (0: the class token; -1: the last token), got {query!r}")


def _row(where: str, matrix: Tensor, query: int) -> Tensor:
    length = matrix.shape[-1]
    if not -length <= query < length:
        raise fail(where, f"query {query} is out of range for {length} tokens")
    return matrix[query]


def attention_rollout(f, *, head_fusion: str = "mean", residual: bool = True, query: int = 0):
    """Attention rollout: the product of the layers' head-fused attention maps.

    Per layer, the heads are fused (``mean``, as Abnar & Zuidema; or ``max`` / ``min``), the
    residual connection is accounted for by ``0.5 A + 0.5 I`` with rows renormalised to sum to 1
    (``residual=True``), and the layers are multiplied in order: ``R = A_L ... A_1``.
    ``explain(params, x, target=None)`` returns row ``query`` of ``R``: ``(L,)``, how much each
    token flows into token ``query`` (the class token at 0 for BERT / ViT; ``-1`` for the last
    token of a causal model; pad such batches on the left so that the last token is real).
    ``target`` is accepted for a uniform signature and ignored: rollout is class-agnostic. Needs
    eager attention (see the module docstring).

    Example:
        >>> f, params = fxattr.functionalize(vit.eval(), output=lambda out: out.logits)
        >>> rollout = torch.vmap(fxattr.text.attention_rollout(f), in_dims=(None, 0, 0))(params, images, labels)
        >>> grid = rollout[:, 1:].reshape(-1, 14, 14)          # drop the class token
    """
    where = "text.attention_rollout"
    _check(where, f, query)
    if head_fusion not in HEAD_FUSIONS:
        raise fail(where, f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    if not isinstance(residual, bool):
        raise fail(where, f"residual must be a bool, got {residual!r}")

    def explain(params, x, target=None):
        maps = attention_maps(f, params, x, where=where)
        fused = {"mean": lambda a: a.mean(1), "max": lambda a: a.amax(1), "min": lambda a: a.amin(1)}[head_fusion](maps)
        if residual:
            eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
            fused = 0.5 * fused + 0.5 * eye
            fused = fused / fused.sum(-1, keepdim=True)
        rollout = fused[0]
        for layer in fused[1:]:
            rollout = layer @ rollout
        return _row(where, rollout, query)

    explain.__name__ = explain.__qualname__ = "attention_rollout"
    explain.model = f
    explain.config = {"head_fusion": head_fusion, "residual": residual, "query": query}
    return explain


def attention_relevance(f, *, query: int = 0):
    """Gradient-weighted attention relevance (Chefer, Gur & Wolf 2021, self-attention rule).

    With ``A_l`` layer ``l``'s attention probabilities and ``G_l = d target / d A_l``, each layer's
    map is ``Abar_l = mean_heads(max(G_l * A_l, 0))`` and the relevance is accumulated from the
    identity, ``R = I; R = R + Abar_l R`` for ``l = 1..L``. ``explain(params, x, target)`` returns
    row ``query`` of ``R`` (``(L,)``; it includes the identity's 1 at ``query`` itself, as in the
    paper -- drop that token for a heat map). One forward pass finds the maps' shapes, one
    ``torch.func.vjp`` gives all ``G_l``. Needs eager attention (see the module docstring).

    Example:
        >>> explain = fxattr.text.attention_relevance(f)
        >>> relevance = torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
    """
    where = "text.attention_relevance"
    _check(where, f, query)

    def explain(params, x, target=None):
        with torch.no_grad():
            # the maps' shapes and dtype (softmax may run in float32 inside a float64 model)
            zeros = torch.zeros_like(attention_maps(f, params, x, where=where)[:, None])
        def forward(offsets):
            capture = AttentionCapture(list(offsets))
            with capture:
                out = f(params, x)
            return fxattr.select(where, out, target), _one_example(where, capture.maps)

        _, pullback, maps = torch.func.vjp(forward, zeros, has_aux=True)
        one = torch.ones((), dtype=maps.dtype, device=maps.device)
        (grads,) = pullback(one)                                       # (layers, 1, heads, L, L)
        weighted = (grads[:, 0] * maps).clamp(min=0).mean(1)          # (layers, L, L)
        relevance = torch.eye(weighted.shape[-1], dtype=weighted.dtype, device=weighted.device)
        for layer in weighted:
            relevance = relevance + layer @ relevance
        return _row(where, relevance, query)

    explain.__name__ = explain.__qualname__ = "attention_relevance"
    explain.model = f
    explain.config = {"query": query}
    return explain

