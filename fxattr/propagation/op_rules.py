"""Reverse rules for the operations of today's models, as pure functions.

Each function reverses ONE operation for one propagation method, written with plain torch ops and
``torch.func.vjp`` (no hooks, no custom autograd functions), so it is differentiable to every order,
vmappable and compilable. Shapes are whatever the operation takes (a leading batch axis is just an
axis). Three kinds of reverse:

- **LRP** (``*_lrp``): relevance of the output -> relevance of each data input.
- **DeepLIFT** (``*_deeplift``): the multiplier ``m_out`` of the output -> the multipliers of the
  inputs, from the values at the input ``x`` and at the reference ``x0``. Every rule here satisfies
  ``sum(m_in * (x - x0)) == sum(m_out * (f(x) - f(x0)))`` EXACTLY (to rounding): linear maps by their
  transpose; element-wise nonlinearities by the rescale rule (secant slopes); products of two data
  tensors by the Shapley split of their interaction (below); softmax and the normalisations by an
  exact decomposition into those three. Composed along a graph this gives summation-to-delta.
- **guided backprop / deconvnet**: only ReLUs are modified; every operation here reverses by its
  plain vector-Jacobian product (:func:`gradient_reverse`).

The Shapley split of a product (DeepLIFT / Shapley literature: Shrikumar et al. 2017, Sec. 3.5 on
multiplicative units; Ancona et al. 2019): for ``z = a * b`` with references ``a0``, ``b0``, the two
players' Shapley values are ``C_a = (a - a0) (b + b0) / 2`` and ``C_b = (b - b0) (a + a0) / 2`` and
``C_a + C_b = a b - a0 b0`` exactly. For any bilinear map ``f(a, b)`` (matmul, bmm, einsum of two
operands) the same holds with the Jacobian at the midpoint: ``f(a, b) - f(a0, b0) = J_a(mid) da +
J_b(mid) db``, because a quadratic function's secant equals its tangent at the midpoint; so the
multipliers are the vector-Jacobian product of ``f`` at ``((a + a0) / 2, (b + b0) / 2)``
(:func:`bilinear_deeplift`).

LRP conventions (references at each function): products of two data tensors follow AttnLRP
(Achtibat et al. 2024, ICML): the *uniform* rule (each factor gets half) or gate-as-constant
("signal-take-all", Arras et al. 2017 for LSTM gates); normalisations follow AttnLRP's *identity
rule* on the division by the standard deviation (the std is a constant of the linearisation, the
centring and the affine are linear and take the epsilon rule); element-wise activations (GELU, SiLU,
...) pass relevance unchanged (zennit's ``Pass``, AttnLRP's identity rule); softmax takes AttnLRP's
rule ``R_x = x * (R - s * sum(R))``; linear maps without parameters (interpolation, means, sums) take
the epsilon / z rule through the map (zennit's ``Norm`` for sums and averages).

The engine's catalogue (:mod:`fxattr.graph`) learns these operations from :data:`KINDS` when the engine
imports this module (:func:`register_all`): each kind names the torch functions, tensor methods and
modules it matches and its LRP and DeepLIFT reverse, a function ``reverse(view, signal)`` of a
:class:`fxattr.graph.NodeView` (guided backprop / deconvnet take the vector-Jacobian product). The
gate of a product (:func:`is_gate`) is decided once, when the graph is classified.

Example:
    >>> from fxattr.propagation import op_rules
    >>> a, b = torch.randn(8, 16), torch.randn(8, 16)
    >>> relevance = torch.randn(8, 16)
    >>> ra, rb = torch.vmap(op_rules.product_uniform_lrp)(a, b, relevance)   # (8, 16) each
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxattr.errors import fail
from fxattr.propagation import rules

__all__ = [
    "activation_pass_lrp", "attention_deeplift", "attention_lrp", "bilinear_deeplift",
    "bilinear_uniform_lrp", "channel_shuffle_reverse", "conv_transpose_layer", "embedding_reverse",
    "fold_batch_norm_into_conv_transpose", "gradient_reverse", "group_norm_deeplift", "group_norm_lrp",
    "layer_norm_deeplift", "layer_norm_lrp", "linear_deeplift", "linear_lrp",
    "multihead_attention_deeplift", "multihead_attention_lrp", "product_deeplift",
    "product_gate_lrp", "product_uniform_lrp", "quotient_deeplift", "quotient_lrp", "rescale_deeplift", "rms_norm_deeplift",
    "rms_norm_lrp", "softmax_deeplift", "softmax_lrp", "stabilise", "sum_to_shape",
]


# --- helpers -----------------------------------------------------------------------------------

def stabilise(z: Tensor, epsilon: float) -> Tensor:
    """``z + epsilon * sign(z)`` with ``sign(0) = +1``; ``epsilon = 0`` replaces exact zeros by
    ``1e-12`` instead (the z rule: relevance of a zero output is zero, never NaN)."""
    if epsilon == 0:
        return rules.safe(1e-12)(z)
    return rules.signed(epsilon)(z)


def sum_to_shape(t: Tensor, shape: Sequence[int]) -> Tensor:
    """``t`` summed over the axes that broadcasting added or expanded to reach it from ``shape``
    (the reverse of broadcasting: relevance and multipliers of a broadcast operand)."""
    shape = tuple(shape)
    lead = t.ndim - len(shape)
    if lead:
        t = t.sum(dim=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dim=axes, keepdim=True) if axes else t


def _check_epsilon(where: str, epsilon) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) \
            or epsilon < 0:
        raise fail(where, f"epsilon must be a finite number >= 0, got {epsilon!r}")
    return float(epsilon)


# --- generic: linear maps and the plain vector-Jacobian product --------------------------------

def gradient_reverse(fn: Callable[..., Tensor], inputs: Sequence[Tensor], cotangent: Tensor) -> tuple:
    """The vector-Jacobian product of ``fn`` at ``inputs``: the reverse of every operation of this
    module under guided backprop and deconvnet (Springenberg et al. 2015; Zeiler & Fergus 2014),
    which modify ReLUs only."""
    _, vjp = torch.func.vjp(fn, *inputs)
    return vjp(cotangent)


def linear_lrp(fn: Callable[..., Tensor], inputs: Sequence[Tensor], relevance: Tensor, *,
               epsilon: float = 0.0, output: Tensor | None = None) -> tuple:
    """LRP-epsilon (``epsilon = 0``: LRP-0 / the z rule) through a linear map without parameters:
    ``R_i = x_i * J_i^T (R / stabilise(z))`` with ``z = fn(*inputs)`` (Bach et al. 2015;
    zennit's ``Norm`` for sums and averages is ``epsilon=1e-6``). For ``F.interpolate`` (nearest,
    (bi/tri)linear, bicubic), ``mean`` / ``sum`` over dims, additions, average pooling.
    Conserves: ``sum(R_in) = sum(R * z / stabilise(z))``."""
    eps = _check_epsilon("op_rules.linear_lrp", epsilon)
    z, vjp = torch.func.vjp(fn, *inputs)
    z = z if output is None else output
    grads = vjp(relevance / stabilise(z, eps))
    return tuple(x * g for x, g in zip(inputs, grads))


def linear_deeplift(fn: Callable[..., Tensor], inputs: Sequence[Tensor], multiplier: Tensor) -> tuple:
    """DeepLIFT multipliers through a linear map: its transpose (``delta out = J delta in`` exactly)."""
    return gradient_reverse(fn, inputs, multiplier)


# --- element-wise activations ------------------------------------------------------------------

def activation_pass_lrp(relevance: Tensor) -> Tensor:
    """LRP through an element-wise activation (GELU, SiLU, Hardswish, Hardsigmoid, Mish, ...):
    relevance passes unchanged (zennit's ``Pass``; AttnLRP's identity rule, Achtibat et al. 2024,
    Prop. 3.1). Conserves exactly."""
    return relevance


def rescale_deeplift(fn: Callable[[Tensor], Tensor], x: Tensor, x0: Tensor, multiplier: Tensor, *,
                     eps: float = 1e-10) -> Tensor:
    """DeepLIFT's rescale rule for an element-wise ``fn``: ``m_in = m_out * (fn(x) - fn(x0)) / (x - x0)``,
    the gradient ``fn'(x)`` where ``|x - x0| < eps`` (captum's convention, ``eps = 1e-10``).
    Summation-to-delta holds exactly where ``|x - x0| >= eps`` (and to ``O(eps^2)`` elsewhere)."""
    delta = x - x0
    small = delta.abs() < eps
    y, tangent = torch.func.jvp(fn, (x,), (torch.ones_like(x),))
    safe_delta = torch.where(small, torch.ones_like(delta), delta)
    secant = (y - fn(x0)) / safe_delta
    return multiplier * torch.where(small, tangent, secant)


def _exp_secant(u: Tensor, u0: Tensor) -> Tensor:
    """``(exp(u) - exp(u0)) / (u - u0)``, accurately (``exp(u0) expm1(d) / d``), ``exp(u)`` at ``d = 0``."""
    d = u - u0
    zero = d == 0
    safe_d = torch.where(zero, torch.ones_like(d), d)
    return torch.where(zero, torch.exp(u), torch.exp(u0) * torch.expm1(safe_d) / safe_d)


# --- products of two data tensors --------------------------------------------------------------

def product_gate_lrp(signal: Tensor, gate: Tensor, relevance: Tensor) -> tuple[Tensor, Tensor]:
    """LRP through ``z = signal * gate`` with the gate a constant (Arras et al. 2017, "signal-take-all";
    AttnLRP, Achtibat et al. 2024, for gating): ``R_signal = R`` (summed over axes the signal was
    broadcast along), ``R_gate = 0``. The squeeze-excitation gate ``x * sigmoid(s)``, GLU's
    ``a * sigmoid(b)``. Conserves exactly."""
    return sum_to_shape(relevance, signal.shape), torch.zeros_like(gate)


def product_uniform_lrp(a: Tensor, b: Tensor, relevance: Tensor) -> tuple[Tensor, Tensor]:
    """AttnLRP's uniform rule for ``z = a * b`` (Achtibat et al. 2024, Prop. 3.3, N = 2 factors):
    each factor gets half, ``R_a = R_b = R / 2`` (summed over axes a factor was broadcast along).
    Conserves exactly. SwiGLU's ``silu(x W1) * (x W2)``, attention's products."""
    half = relevance / 2
    return sum_to_shape(half, a.shape), sum_to_shape(half, b.shape)


def bilinear_uniform_lrp(fn: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor, relevance: Tensor, *,
                         epsilon: float = 0.0) -> tuple[Tensor, Tensor]:
    """AttnLRP's uniform rule for a bilinear map ``z = fn(a, b)`` (matmul, bmm, einsum of two operands;
    Achtibat et al. 2024, Sec. 3.3: the uniform rule on each product ``a_ik b_kj``, the epsilon rule
    on the sum over ``k``): ``R_a = a * J_a^T (R / stabilise(z)) / 2``, likewise ``R_b``. By Euler's
    theorem ``sum(a * J_a^T s) = sum(z * s)``, so ``sum(R_a) + sum(R_b) = sum(R * z / stabilise(z))``."""
    eps = _check_epsilon("op_rules.bilinear_uniform_lrp", epsilon)
    z, vjp = torch.func.vjp(fn, a, b)
    ga, gb = vjp(relevance / stabilise(z, eps))
    return a * ga / 2, b * gb / 2


def bilinear_deeplift(fn: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor, a0: Tensor, b0: Tensor,
                      multiplier: Tensor) -> tuple[Tensor, Tensor]:
    """DeepLIFT through a bilinear ``z = fn(a, b)`` with the Shapley split of the interaction: the
    vector-Jacobian product at the midpoint ``((a + a0) / 2, (b + b0) / 2)`` (module docstring), so
    ``sum(m_a * (a - a0)) + sum(m_b * (b - b0)) = sum(m * (fn(a, b) - fn(a0, b0)))`` exactly."""
    _, vjp = torch.func.vjp(fn, (a + a0) / 2, (b + b0) / 2)
    return vjp(multiplier)


def product_deeplift(a: Tensor, b: Tensor, a0: Tensor, b0: Tensor, multiplier: Tensor) -> tuple[Tensor, Tensor]:
    """DeepLIFT through ``z = a * b``: ``m_a = m (b + b0) / 2``, ``m_b = m (a + a0) / 2`` (summed over
    broadcast axes): the Shapley split ``C_a = da (b + b0) / 2``, ``C_b = db (a + a0) / 2``."""
    return (sum_to_shape(multiplier * (b + b0) / 2, a.shape),
            sum_to_shape(multiplier * (a + a0) / 2, b.shape))


def quotient_lrp(numerator: Tensor, denominator: Tensor, relevance: Tensor) -> tuple[Tensor, Tensor]:
    """LRP through ``z = numerator / denominator`` of two data tensors: the divisor is a constant of
    the linearisation (AttnLRP's identity rule on the division by the standard deviation, for norms
    written out as ``x / sqrt(var + eps)``), ``R_numerator = R``, ``R_denominator = 0``. Conserves."""
    return sum_to_shape(relevance, numerator.shape), torch.zeros_like(denominator)


def quotient_deeplift(a: Tensor, b: Tensor, a0: Tensor, b0: Tensor, multiplier: Tensor) -> tuple[Tensor, Tensor]:
    """DeepLIFT through ``z = a / b``, exact: ``z = a * r`` with ``r = 1 / b`` (secant ``-1 / (b b0)``,
    no division by ``b - b0``) and the Shapley split of the product: ``m_a = m (r + r0) / 2``,
    ``m_b = -m (a + a0) / (2 b b0)``."""
    r, r0 = 1 / b, 1 / b0
    return (sum_to_shape(multiplier * (r + r0) / 2, a.shape),
            sum_to_shape(-multiplier * (a + a0) / (2 * b * b0), b.shape))


# --- softmax -----------------------------------------------------------------------------------

def softmax_lrp(x: Tensor, relevance: Tensor, dim: int = -1) -> Tensor:
    """AttnLRP's softmax rule (Achtibat et al. 2024, Prop. 3.1, the Taylor decomposition at ``x``
    without the bias term): ``R_x = x * (R - s * sum_dim(R))`` with ``s = softmax(x, dim)`` —
    equivalently ``x * J^T (R / s)`` (gradient x input of ``R / s``). Does not conserve (the
    softmax's bias part absorbs relevance)."""
    s = torch.softmax(x, dim)
    return x * (relevance - s * relevance.sum(dim, keepdim=True))


def softmax_deeplift(x: Tensor, x0: Tensor, multiplier: Tensor, dim: int = -1) -> Tensor:
    """DeepLIFT through ``s = softmax(x, dim)``, exact: ``s = e * r`` with ``e = exp(x - c)`` (rescale,
    secant of exp), ``r = 1 / sum(e)`` (secant ``-1 / (S S0)`` of the reciprocal after the linear sum)
    and the Shapley split of the product ``e * r``. ``c`` is a shift common to ``x`` and ``x0``
    (their max; softmax and every multiplier are invariant to it) against overflow."""
    c = torch.maximum(x.amax(dim, keepdim=True), x0.amax(dim, keepdim=True)).detach()
    u, u0 = x - c, x0 - c
    e, e0 = torch.exp(u), torch.exp(u0)
    total, total0 = e.sum(dim, keepdim=True), e0.sum(dim, keepdim=True)
    r, r0 = 1 / total, 1 / total0
    m_e = multiplier * (r + r0) / 2
    m_r = (multiplier * (e + e0) / 2).sum(dim, keepdim=True)
    m_e = m_e - m_r / (total * total0)  # through r = 1 / S, S = sum(e)
    return m_e * _exp_secant(u, u0)


# --- normalisations ----------------------------------------------------------------------------

def _layer_norm_dims(x: Tensor, normalized_shape: Sequence[int]) -> tuple:
    return tuple(range(x.ndim - len(tuple(normalized_shape)), x.ndim))


def _last_dims_mean(dims):
    return lambda t: t.mean(dims, keepdim=True)


def _group_mean(groups: int):
    # the mean over each (sample, group) of (N, C, *), broadcast back to the full shape
    def mean(t):
        grouped = t.reshape(t.shape[0], groups, -1)
        return grouped.mean(-1, keepdim=True).expand(grouped.shape).reshape(t.shape)
    return mean


def _norm_lrp(where, x, mean, centre, eps, weight, bias, relevance, rule, epsilon):
    # y = w * c * r + b with r = (mean(c^2) + eps)^(-1/2) held at its value: A^T s = C^T (w r s)
    if rule == "pass":
        return relevance
    if rule != "epsilon":
        raise fail(where, f"rule must be 'epsilon' (AttnLRP) or 'pass' (zennit's Pass), got {rule!r}")
    epsilon = _check_epsilon(where, epsilon)
    c = x - mean(x) if centre else x
    inverse_std = torch.rsqrt(mean(c.square()) + eps)  # the linearisation's constant
    scaled = inverse_std if weight is None else weight * inverse_std
    y = c * scaled if bias is None else torch.addcmul(bias, c, scaled)
    u = relevance / stabilise(y, epsilon) * scaled
    return (x * (u - mean(u) if centre else u)).to(x.dtype)


def _norm_deeplift(x, x0, mean, centre, eps, weight, multiplier):
    # y = w * (c * r) + b, c = centre(x), r = (mean(c^2) + eps)^(-1/2); every step exact
    c = x - mean(x) if centre else x
    c0 = x0 - mean(x0) if centre else x0
    q, q0 = mean(c.square()) + eps, mean(c0.square()) + eps
    root, root0 = torch.sqrt(q), torch.sqrt(q0)
    secant = -1 / (root * root0 * (root + root0))  # (q^-1/2 - q0^-1/2) / (q - q0), no division by dq
    m_n = multiplier if weight is None else multiplier * weight  # the affine is linear + constant
    mid = (c + c0) / 2
    # Shapley split of n = c * r (m_r = sum(m_n * mid)), q = mean(c * c) by its midpoint Jacobian
    m_c = m_n * (1 / root + 1 / root0) / 2 + (2 * secant) * mid * mean(m_n * mid)
    return (m_c - mean(m_c) if centre else m_c).to(x.dtype)


def _channel_shape(weight, x):
    return None if weight is None else weight.reshape((-1,) + (1,) * (x.ndim - 2))


def layer_norm_lrp(x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, bias: Tensor | None,
                   relevance: Tensor, *, eps: float = 1e-5, rule: str = "epsilon", epsilon: float = 0.0) -> Tensor:
    """LRP through ``F.layer_norm``. ``rule="epsilon"`` (default): AttnLRP's identity rule on the
    division by the standard deviation (Achtibat et al. 2024, Sec. 3.3.3; Ali et al. 2022 "XAI for
    transformers" detach it likewise): with ``std`` held at its value, ``y = W C x / std + b`` is
    linear (``C`` the centring) and takes the epsilon rule, ``R_x = x * A^T (R / stabilise(y))``,
    ``A = diag(W / std) C``; conserves up to the bias, ``sum(R_x) = sum(R (y - b) / stabilise(y))``.
    ``rule="pass"``: zennit's ``Pass`` (relevance unchanged). The std is a constant of the
    linearisation only: derivatives of the relevance w.r.t. ``x`` still flow through it."""
    mean = _last_dims_mean(_layer_norm_dims(x, normalized_shape))
    return _norm_lrp("op_rules.layer_norm_lrp", x, mean, True, eps, weight, bias, relevance, rule, epsilon)


def rms_norm_lrp(x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, relevance: Tensor, *,
                 eps: float = 1e-6, rule: str = "epsilon", epsilon: float = 0.0) -> Tensor:
    """LRP through RMSNorm ``y = W x / rms(x)`` (Llama): AttnLRP's identity rule (rms held at its
    value: an element-wise scaling, so ``R_x = R`` up to the stabiliser) or ``rule="pass"``."""
    mean = _last_dims_mean(_layer_norm_dims(x, normalized_shape))
    return _norm_lrp("op_rules.rms_norm_lrp", x, mean, False, eps, weight, None, relevance, rule, epsilon)


def group_norm_lrp(x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, relevance: Tensor, *,
                   eps: float = 1e-5, rule: str = "epsilon", epsilon: float = 0.0) -> Tensor:
    """LRP through ``F.group_norm`` on ``x`` of shape ``(N, C, *)`` (std per sample and group held at
    its value; see :func:`layer_norm_lrp`)."""
    return _norm_lrp("op_rules.group_norm_lrp", x, _group_mean(groups), True, eps, _channel_shape(weight, x),
                     _channel_shape(bias, x), relevance, rule, epsilon)


def layer_norm_deeplift(x: Tensor, x0: Tensor, normalized_shape: Sequence[int], weight: Tensor | None,
                        bias: Tensor | None, multiplier: Tensor, *, eps: float = 1e-5) -> Tensor:
    """DeepLIFT through ``F.layer_norm``, exact: the centring is linear (its transpose); ``n = c * r``
    with ``r = (mean(c^2) + eps)^(-1/2)`` is a product (Shapley split), ``q = mean(c * c)`` a
    quadratic (Jacobian at the midpoint) and ``r(q)`` a scalar function (its secant
    ``-1 / (sqrt(q q0) (sqrt(q) + sqrt(q0)))``); the affine is linear."""
    mean = _last_dims_mean(_layer_norm_dims(x, normalized_shape))
    return _norm_deeplift(x, x0, mean, True, eps, weight, multiplier)


def rms_norm_deeplift(x: Tensor, x0: Tensor, normalized_shape: Sequence[int], weight: Tensor | None,
                      multiplier: Tensor, *, eps: float = 1e-6) -> Tensor:
    """DeepLIFT through RMSNorm, exact (:func:`layer_norm_deeplift` without the centring)."""
    mean = _last_dims_mean(_layer_norm_dims(x, normalized_shape))
    return _norm_deeplift(x, x0, mean, False, eps, weight, multiplier)


def group_norm_deeplift(x: Tensor, x0: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None,
                        multiplier: Tensor, *, eps: float = 1e-5) -> Tensor:
    """DeepLIFT through ``F.group_norm``, exact (:func:`layer_norm_deeplift` per sample and group)."""
    return _norm_deeplift(x, x0, _group_mean(groups), True, eps, _channel_shape(weight, x), multiplier)


# --- attention ---------------------------------------------------------------------------------

def _scores(q, k, scale):
    return (q @ k.transpose(-2, -1)) * scale


def _mask_bias(attn_mask, is_causal, q, k):
    length, source = q.shape[-2], k.shape[-2]
    bias = None
    if is_causal:
        keep = torch.ones(length, source, dtype=torch.bool, device=q.device).tril()
        bias = torch.zeros(length, source, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        extra = (torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
                 if attn_mask.dtype == torch.bool else attn_mask)
        bias = extra if bias is None else bias + extra
    return bias


def _attention_parts(q, k, v, attn_mask, is_causal, scale):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = _scores(q, k, scale)
    bias = _mask_bias(attn_mask, is_causal, q, k)
    probs = torch.softmax(scores if bias is None else scores + bias, -1)
    return scale, scores, bias, probs


def _expand_heads(q: Tensor, t: Tensor, enable_gqa: bool):
    """``t`` with its key/value heads repeated to ``q``'s (grouped-query attention) and the routing
    back (relevance and multipliers of the repeated heads summed per original head)."""
    if not enable_gqa or t.ndim < 3 or t.shape[-3] == q.shape[-3]:
        return t, lambda r: r
    expanded, back = torch.func.vjp(lambda u: u.repeat_interleave(q.shape[-3] // t.shape[-3], dim=-3), t)
    return expanded, lambda r: back(r)[0]


def attention_lrp(q: Tensor, k: Tensor, v: Tensor, relevance: Tensor, *, attn_mask: Tensor | None = None,
                  is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
                  epsilon: float = 0.0) -> tuple:
    """LRP through ``F.scaled_dot_product_attention`` (no dropout) as AttnLRP treats it (Achtibat
    et al. 2024): the uniform rule on ``probs @ v`` and on ``q @ k^T`` (:func:`bilinear_uniform_lrp`)
    and the softmax rule (:func:`softmax_lrp`) on the scores; an additive or boolean mask is a
    constant bias (no relevance; masked entries have ``softmax = 0`` and get none); ``enable_gqa``
    repeats the key/value heads as ``F.scaled_dot_product_attention`` does and sums their relevance
    back per head. Returns ``(R_q, R_k, R_v)``."""
    eps = _check_epsilon("op_rules.attention_lrp", epsilon)
    (k, k_back), (v, v_back) = _expand_heads(q, k, enable_gqa), _expand_heads(q, v, enable_gqa)
    scale, scores, bias, probs = _attention_parts(q, k, v, attn_mask, is_causal, scale)
    r_probs, r_v = bilinear_uniform_lrp(torch.matmul, probs, v, relevance, epsilon=eps)
    # the softmax rule x * J^T (R / s) with x the data part of the logits (the mask is a bias)
    _, vjp = torch.func.vjp(lambda t: torch.softmax(t if bias is None else t + bias, -1), scores)
    (g,) = vjp(r_probs / stabilise(probs, eps))
    r_scores = scores * g
    r_q, r_k = bilinear_uniform_lrp(lambda a, b: _scores(a, b, scale), q, k, r_scores, epsilon=eps)
    return r_q, k_back(r_k), v_back(r_v)


def attention_deeplift(q: Tensor, k: Tensor, v: Tensor, q0: Tensor, k0: Tensor, v0: Tensor, multiplier: Tensor, *,
                       attn_mask: Tensor | None = None, is_causal: bool = False, scale: float | None = None,
                       enable_gqa: bool = False) -> tuple:
    """DeepLIFT through ``F.scaled_dot_product_attention``, exact: the Shapley split of both bilinear
    maps (:func:`bilinear_deeplift`) and the exact softmax (:func:`softmax_deeplift`; a mask adds
    the same constant at ``x`` and ``x0``). Returns ``(m_q, m_k, m_v)``."""
    (k, k_back), (v, v_back) = _expand_heads(q, k, enable_gqa), _expand_heads(q, v, enable_gqa)
    k0, v0 = _expand_heads(q0, k0, enable_gqa)[0], _expand_heads(q0, v0, enable_gqa)[0]
    scale, scores, bias, probs = _attention_parts(q, k, v, attn_mask, is_causal, scale)
    _, scores0, _, probs0 = _attention_parts(q0, k0, v0, attn_mask, is_causal, scale)
    m_probs, m_v = _matmul_deeplift(probs, v, probs0, v0, multiplier)
    if bias is None:
        m_scores = softmax_deeplift(scores, scores0, m_probs)
    else:  # -inf entries: equal at x and x0, softmax 0 in both; keep them out of the secants
        finite = torch.isfinite(bias)
        logits = torch.where(finite, scores + bias, -1e4 + torch.zeros_like(scores))
        logits0 = torch.where(finite, scores0 + bias, -1e4 + torch.zeros_like(scores0))
        m_scores = torch.where(finite, softmax_deeplift(logits, logits0, m_probs), torch.zeros_like(scores))
    m_q, m_k = _matmul_deeplift(q, k.transpose(-2, -1), q0, k0.transpose(-2, -1), m_scores * scale)
    return m_q, k_back(m_k.transpose(-2, -1)), v_back(m_v)


def _matmul_deeplift(a: Tensor, b: Tensor, a0: Tensor, b0: Tensor, multiplier: Tensor) -> tuple[Tensor, Tensor]:
    # bilinear_deeplift of a @ b (same batch shape) written out: the vjp of matmul at the midpoint,
    # m @ b_mid^T and a_mid^T @ m, without evaluating the product there
    return multiplier @ ((b + b0) / 2).transpose(-2, -1), ((a + a0) / 2).transpose(-2, -1) @ multiplier


def _attend(q, k, v):
    # softmax(q k^T / sqrt(d)) v in plain ops (the CPU flash kernel has no double backward)
    return _attention_parts(q, k, v, None, False, None)[3] @ v


def _heads(t: Tensor, heads: int) -> Tensor:  # (L, N, E) -> (N, heads, L, E / heads)
    length, batch, dim = t.shape
    return t.reshape(length, batch, heads, dim // heads).permute(1, 2, 0, 3)


def _merge_heads(t: Tensor) -> Tensor:  # (N, heads, L, d) -> (L, N, heads * d)
    batch, heads, length, d = t.shape
    return t.permute(2, 0, 1, 3).reshape(length, batch, heads * d)


def _mha_projections(query, key, value, params, heads):
    dim = query.shape[-1]
    w, b = params["in_proj_weight"], params.get("in_proj_bias")
    bs = (None, None, None) if b is None else b.split(dim)
    ws = w.split(dim)
    lin = [(lambda t, w_=w_, b_=b_: F.linear(t, w_, b_)) for w_, b_ in zip(ws, bs)]
    return lin, [_heads(fn(t), heads) for fn, t in zip(lin, (query, key, value))]


def _check_mha(where, query, params, heads):
    if query.ndim != 3:
        raise fail(where, f"query must be (length, batch, embed_dim) (batch_first=False), got shape "
                          f"{tuple(query.shape)}")
    missing = {"in_proj_weight", "out_proj.weight"} - set(params)
    if missing:
        raise fail(where, f"params lacks {sorted(missing)} (the separate q/k/v projections of kdim != "
                          "embed_dim are not supported)")
    if query.shape[-1] % heads:
        raise fail(where, f"embed_dim {query.shape[-1]} is not divisible by num_heads {heads}")


def multihead_attention_lrp(query: Tensor, key: Tensor, value: Tensor, params: dict, num_heads: int,
                            relevance: Tensor, *, epsilon: float = 0.0) -> tuple:
    """LRP through ``nn.MultiheadAttention`` (``batch_first=False`` layout ``(L, N, E)``, no masks,
    no dropout, the attention output only): the epsilon rule on the in- and out-projections
    (``params``: ``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``, as
    the module names them) and :func:`attention_lrp` in between. Returns ``(R_query, R_key, R_value)``
    (for self-attention sum them)."""
    where = "op_rules.multihead_attention_lrp"
    eps = _check_epsilon(where, epsilon)
    _check_mha(where, query, params, num_heads)
    lin, (q, k, v) = _mha_projections(query, key, value, params, num_heads)
    attended = _merge_heads(_attend(q, k, v))
    out_projection = _out_projection(params)
    r_heads = _heads(_affine_lrp(out_projection, attended, relevance, eps), num_heads)
    r_q, r_k, r_v = attention_lrp(q, k, v, r_heads, epsilon=eps)
    return tuple(_affine_lrp(fn, t, _merge_heads(r), eps) for fn, t, r in zip(lin, (query, key, value), (r_q, r_k, r_v)))


def _out_projection(params):
    return lambda t: F.linear(t, params["out_proj.weight"], params.get("out_proj.bias"))


def _affine_lrp(fn, x, relevance, eps):
    # the epsilon rule through an affine map fn (bias in the denominator): x * J^T (R / stabilise(fn(x)))
    z, vjp = torch.func.vjp(fn, x)
    (g,) = vjp(relevance / stabilise(z, eps))
    return x * g


def multihead_attention_deeplift(query: Tensor, key: Tensor, value: Tensor, query0: Tensor, key0: Tensor,
                                 value0: Tensor, params: dict, num_heads: int, multiplier: Tensor) -> tuple:
    """DeepLIFT through ``nn.MultiheadAttention`` (layout and limits of :func:`multihead_attention_lrp`),
    exact: projections by their transposes, :func:`attention_deeplift` in between. Returns
    ``(m_query, m_key, m_value)``."""
    where = "op_rules.multihead_attention_deeplift"
    _check_mha(where, query, params, num_heads)
    _, (q, k, v) = _mha_projections(query, key, value, params, num_heads)
    _, (q0, k0, v0) = _mha_projections(query0, key0, value0, params, num_heads)
    # the projections are linear: their transposes are products with the weights (the vjps of
    # F.linear, without re-evaluating the projections or the attention output)
    m_att = multiplier @ params["out_proj.weight"]
    m_q, m_k, m_v = attention_deeplift(q, k, v, q0, k0, v0, _heads(m_att, num_heads))
    weights = params["in_proj_weight"].split(query.shape[-1])
    return tuple(_merge_heads(m) @ w for m, w in zip((m_q, m_k, m_v), weights))


# --- kernel layers, embeddings, routing --------------------------------------------------------

def conv_transpose_layer(dim: int, *, stride=1, padding=0, output_padding=0, groups: int = 1, dilation=1,
                         nonnegative_input: bool = False) -> rules.Layer:
    """``ConvTranspose{1,2,3}d`` as a kernel layer for every LRP rule of :mod:`fxattr.propagation.rules`
    (epsilon, z+, gamma, alpha-beta, flat, w-square, ...): ``forward`` is ``F.conv_transpose{dim}d``,
    its transpose (``W^T s``) the convolution ``F.conv{dim}d`` with the same weight, stride, padding,
    dilation and groups (the adjoint; ``output_padding`` only adds output rows the convolution drops).
    ``groups=None`` is reported so rules never concatenate input channels (the weight's input axis is
    0, not 1)."""
    if dim not in (1, 2, 3):
        raise fail("op_rules.conv_transpose_layer", f"dim must be 1, 2 or 3, got {dim!r}")
    forward_fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[dim]
    adjoint = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dim]

    def forward(x, p):
        return forward_fn(x, p["weight"], p.get("bias"), stride, padding, output_padding, groups, dilation)

    def transpose(s, p, x):
        return adjoint(s, p["weight"], None, stride, padding, dilation, groups)

    def bias(b, z):
        return b.reshape((-1,) + (1,) * (z.ndim - 2))

    return rules.Layer("conv", forward, transpose, bias, nonnegative_input, groups=None)


def fold_batch_norm_into_conv_transpose(weight: Tensor, bias: Tensor | None, mean: Tensor, var: Tensor,
                                        bn_weight: Tensor | None, bn_bias: Tensor | None, eps: float,
                                        groups: int = 1) -> tuple[Tensor, Tensor]:
    """A ``ConvTranspose`` followed by an eval batch norm on its output channels as one layer
    (zennit's MergeBatchNorm for transposed convolutions): the weight ``(C_in, C_out / groups, *k)``
    is scaled along its output-channel axis 1 (per group), the bias becomes ``(b - mean) s + beta``."""
    scale = torch.rsqrt(var + eps) if bn_weight is None else bn_weight * torch.rsqrt(var + eps)
    c_in, per_group = weight.shape[0], weight.shape[1]
    # output channel of weight[i, j] is (i // (c_in / groups)) * per_group + j
    per_input = scale.reshape(groups, 1, per_group).expand(groups, c_in // groups, per_group).reshape(c_in, per_group)
    folded_weight = weight * per_input.reshape(per_input.shape + (1,) * (weight.ndim - 2))
    centred = -mean if bias is None else bias - mean
    folded_bias = centred * scale if bn_bias is None else centred * scale + bn_bias
    return folded_weight, folded_bias


def embedding_reverse(indices: Tensor, relevance: Tensor, num_embeddings: int) -> tuple[Tensor, Tensor]:
    """The reverse of an embedding lookup ``out = table[indices]`` (relevance, multipliers or
    gradients alike; the lookup is a linear routing of the table's rows): returns ``(per_token,
    per_row)`` — the relevance of each looked-up token (``relevance`` summed over the embedding
    dim, the input embedding's share) and of each table row (summed over the tokens that read it,
    ``index_add``). Both conserve exactly."""
    per_token = relevance.sum(-1)
    dim = relevance.shape[-1]
    per_row = torch.zeros(num_embeddings, dim, dtype=relevance.dtype, device=relevance.device)
    per_row = per_row.index_add(0, indices.reshape(-1), relevance.reshape(-1, dim))
    return per_token, per_row


def channel_shuffle_reverse(relevance: Tensor, groups: int) -> Tensor:
    """The reverse of ``channel_shuffle(x, groups)`` on ``(N, C, *)`` (ShuffleNet): a routing, so
    relevance, multipliers and gradients all go back by the inverse permutation, which is the
    shuffle with ``C / groups`` groups. Conserves exactly."""
    channels = relevance.shape[1]
    if groups <= 0 or channels % groups:
        raise fail("op_rules.channel_shuffle_reverse", f"groups must divide the {channels} channels, got {groups!r}")
    shape = relevance.shape
    return relevance.reshape(shape[0], channels // groups, groups, *shape[2:]).transpose(1, 2).reshape(shape)


# --- the catalogue: operation kinds and their reverses for the graph engine ---------------------
#
# Each reverse takes a node *view* and the signal arriving at the node's output, and returns one
# signal per distinct data input of the node. The view carries: ``inputs`` (the data inputs' values
# at x, in argument order), ``output``, ``fn`` (the node as a function of its data inputs, the other
# arguments fixed), ``args`` / ``kwargs`` (the call's arguments, resolved to values), and for
# DeepLIFT ``reference_inputs``. Values carry the batch axis of 1 of the forward pass.

GATE_FUNCTIONS = frozenset({torch.sigmoid, F.sigmoid, F.hardsigmoid, torch.rsqrt, torch.reciprocal, torch.softmax,
                            F.softmax})
GATE_METHODS = frozenset({"sigmoid", "rsqrt", "reciprocal", "softmax"})
GATE_MODULES = ("Sigmoid", "Hardsigmoid", "Softmax")
LRP_EPSILON = 0.0  # parameter-free maps and products take the z form (exact zeros guarded)


def is_gate(producer, module=None) -> bool:
    """Whether a factor of a product is a *gate*: the output of a sigmoid-type function (sigmoid,
    hard sigmoid, softmax) or of a reciprocal (``rsqrt``, ``reciprocal``: a written-out norm). LRP
    treats a gate as a constant (it takes no relevance); otherwise a product takes the uniform rule.
    ``producer`` is the fx node that computed the factor, ``module`` the module it calls (or None)."""
    op = getattr(producer, "op", None)
    if op == "call_function":
        return producer.target in GATE_FUNCTIONS
    if op == "call_method":
        return producer.target in GATE_METHODS
    if op == "call_module" and module is not None:
        return type(module).__name__ in GATE_MODULES
    return False


def _bind(names: Sequence[str], defaults: dict, args: Sequence, kwargs: dict) -> dict:
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def _reference(view):
    return list(view.reference_inputs)


def _one(result):
    return result if isinstance(result, tuple) else (result,)


_GATES_KEY = "fxattr_product_gates"


def _product_accepts(node, data_refs) -> bool:
    """The product kind: two data factors. Which of them is a gate is decided here, once, while the
    graph is classified (reading fx nodes while explaining would stop torch.compile's tracing)."""
    if data_refs != 2:
        return False
    owner = getattr(node.graph, "owning_module", None)

    def module_of(producer):
        if getattr(producer, "op", None) == "call_module" and owner is not None:
            return owner.get_submodule(producer.target)
        return None
    node.meta[_GATES_KEY] = tuple(is_gate(p, module_of(p)) for p in node.args[:2])
    return True


def _gates(view) -> tuple:
    node = getattr(view, "node", None)
    return (False, False) if node is None else node.meta.get(_GATES_KEY, (False, False))


def product_lrp_reverse(view, relevance, gates: Sequence[bool] | None = None):
    """LRP of ``a * b`` (two distinct data inputs): gate-as-constant if exactly one factor is a gate
    (:func:`is_gate`; from the node's producers unless ``gates`` says), else the uniform rule;
    ``x * x`` (one distinct input) passes relevance."""
    if len(view.inputs) == 1:
        return (relevance,)
    gates = _gates(view) if gates is None else gates
    a, b = view.inputs
    if gates[0] != gates[1]:
        signal_first = gates[1]  # b is the gate: a is the signal
        if signal_first:
            r_a, r_b = product_gate_lrp(a, b, relevance)
        else:
            r_b, r_a = product_gate_lrp(b, a, relevance)
        return r_a, r_b
    return product_uniform_lrp(a, b, relevance)


def product_deeplift_reverse(view, multiplier):
    """DeepLIFT of ``a * b``: the Shapley split in closed form (``x * x``: its secant ``x + x0``)."""
    if len(view.inputs) == 1:
        (x,), (x0,) = view.inputs, _reference(view)
        return (multiplier * (x + x0),)
    (a, b), (a0, b0) = view.inputs, _reference(view)
    return product_deeplift(a, b, a0, b0, multiplier)


def bilinear_deeplift_reverse(view, multiplier):
    """DeepLIFT of a product / matmul / bmm / einsum of data tensors: the Shapley split (one distinct
    input, ``x * x``: the rescale rule, exact for an element-wise square)."""
    if len(view.inputs) == 1:
        (x,), (x0,) = view.inputs, _reference(view)
        return (_secant_vjp(view.fn, x, x0, multiplier),)
    (a, b), (a0, b0) = view.inputs, _reference(view)
    return bilinear_deeplift(view.fn, a, b, a0, b0, multiplier)


def _secant_vjp(fn, x, x0, multiplier):
    # a quadratic function of one input (x * x, x @ x^T): its Jacobian at the midpoint is the secant
    _, vjp = torch.func.vjp(fn, (x + x0) / 2)
    return vjp(multiplier)[0]


def bilinear_lrp_reverse(view, relevance):
    """LRP of matmul / bmm / einsum / addmm: AttnLRP's uniform rule with two data operands (``x @ x^T``:
    half per occurrence), the z rule through the map with one (``x @ W``, ``b + x @ W``: the bias in
    the denominator, as the epsilon rule of a dense layer)."""
    if len(view.inputs) == 1:
        (x,) = view.inputs
        occurrences = sum(a is x for a in list(view.args) + list(view.kwargs.values()))
        (r,) = linear_lrp(view.fn, (x,), relevance, epsilon=LRP_EPSILON)
        return (r / max(occurrences, 1),)
    a, b = view.inputs
    return bilinear_uniform_lrp(view.fn, a, b, relevance, epsilon=LRP_EPSILON)


def quotient_lrp_reverse(view, relevance):
    if len(view.inputs) == 1:
        return (relevance,)
    return quotient_lrp(*view.inputs, relevance)


def quotient_deeplift_reverse(view, multiplier):
    if len(view.inputs) == 1:  # x / x: constant
        return (torch.zeros_like(view.inputs[0]),)
    (a, b), (a0, b0) = view.inputs, _reference(view)
    return quotient_deeplift(a, b, a0, b0, multiplier)


def linear_lrp_reverse(view, relevance):
    """LRP of a parameter-free linear map (interpolation, upsampling): the z rule through it."""
    return linear_lrp(view.fn, view.inputs, relevance, epsilon=LRP_EPSILON, output=view.output)


def linear_deeplift_reverse(view, multiplier):
    return linear_deeplift(view.fn, view.inputs, multiplier)


def elementwise_lrp_reverse(view, relevance):
    """LRP of an element-wise function of one input (rsqrt, exp, pow by a constant, ...): passes."""
    return (activation_pass_lrp(relevance),)


def elementwise_deeplift_reverse(view, multiplier):
    (x,), (x0,) = view.inputs, _reference(view)
    return (rescale_deeplift(view.fn, x, x0, multiplier),)


def _softmax_dim(view) -> int:
    if view_module(view) is not None:
        bound = {"dim": view.module.dim}
    else:
        bound = _bind(("input", "dim"), {"dim": None}, view.args, view.kwargs)
    if bound["dim"] is None:
        raise fail("lrp", "softmax without dim is not supported (pass dim explicitly)")
    return bound["dim"]


def softmax_lrp_reverse(view, relevance):
    return (softmax_lrp(view.inputs[0], relevance, _softmax_dim(view)),)


def softmax_deeplift_reverse(view, multiplier):
    return (softmax_deeplift(view.inputs[0], _reference(view)[0], multiplier, _softmax_dim(view)),)


_LAYER_NORM = (("input", "normalized_shape", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5})
_GROUP_NORM = (("input", "num_groups", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5})
_RMS_NORM = (("input", "normalized_shape", "weight", "eps"), {"weight": None, "eps": None})


def view_module(view):
    """The module a view's node calls (``None`` for functions and methods)."""
    return getattr(view, "module", None)


def _module_norm_arguments(view) -> dict:
    module, own = view.module, view.params
    bound = {"input": view.inputs[0], "weight": own.get("weight"), "bias": own.get("bias"),
             "eps": getattr(module, "eps", None)}
    if hasattr(module, "normalized_shape"):
        bound["normalized_shape"] = tuple(module.normalized_shape)
    if hasattr(module, "num_groups"):
        bound["num_groups"] = module.num_groups
    return bound


def _norm_arguments(view, spec):
    if view_module(view) is not None:
        return _module_norm_arguments(view)
    bound = _bind(*spec[:1], spec[1], view.args, view.kwargs)
    for name in ("weight", "bias"):
        if isinstance(bound.get(name), Tensor) and any(bound[name] is t for t in view.inputs):
            raise fail("lrp", f"a normalisation whose {name} is computed from the input is not supported")
    return bound


def _rms_eps(bound, x):
    return torch.finfo(x.dtype).eps if bound["eps"] is None else bound["eps"]


def layer_norm_lrp_reverse(view, relevance):
    b = _norm_arguments(view, _LAYER_NORM)
    return (layer_norm_lrp(view.inputs[0], b["normalized_shape"], b["weight"], b["bias"], relevance, eps=b["eps"],
                           epsilon=LRP_EPSILON),)


def layer_norm_deeplift_reverse(view, multiplier):
    b = _norm_arguments(view, _LAYER_NORM)
    return (layer_norm_deeplift(view.inputs[0], _reference(view)[0], b["normalized_shape"], b["weight"], b["bias"],
                                multiplier, eps=b["eps"]),)


def group_norm_lrp_reverse(view, relevance):
    b = _norm_arguments(view, _GROUP_NORM)
    return (group_norm_lrp(view.inputs[0], b["num_groups"], b["weight"], b["bias"], relevance, eps=b["eps"],
                           epsilon=LRP_EPSILON),)


def group_norm_deeplift_reverse(view, multiplier):
    b = _norm_arguments(view, _GROUP_NORM)
    return (group_norm_deeplift(view.inputs[0], _reference(view)[0], b["num_groups"], b["weight"], b["bias"],
                                multiplier, eps=b["eps"]),)


def rms_norm_lrp_reverse(view, relevance):
    b = _norm_arguments(view, _RMS_NORM)
    x = view.inputs[0]
    return (rms_norm_lrp(x, b["normalized_shape"], b["weight"], relevance, eps=_rms_eps(b, x), epsilon=LRP_EPSILON),)


def rms_norm_deeplift_reverse(view, multiplier):
    b = _norm_arguments(view, _RMS_NORM)
    x = view.inputs[0]
    return (rms_norm_deeplift(x, _reference(view)[0], b["normalized_shape"], b["weight"], multiplier,
                              eps=_rms_eps(b, x)),)


_SDPA = (("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
         {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False})


def _sdpa_arguments(view):
    b = _bind(*_SDPA[:1], _SDPA[1], view.args, view.kwargs)
    if b["dropout_p"]:
        raise fail("lrp", f"scaled_dot_product_attention with dropout_p={b['dropout_p']} (training) has no rule")
    if isinstance(b["attn_mask"], Tensor) and any(b["attn_mask"] is t for t in view.inputs):
        raise fail("lrp", "scaled_dot_product_attention with a mask computed from the input has no rule")
    return b


def _by_input(view, b, results, names=("query", "key", "value")):
    # one signal per DISTINCT data input (self-attention passes the same tensor as q, k and v)
    out = []
    for t in view.inputs:
        hits = [r for n, r in zip(names, results) if b[n] is t]
        out.append(sum(hits[1:], hits[0]) if hits else torch.zeros_like(t))
    return tuple(out)


def sdpa_lrp_reverse(view, relevance):
    b = _sdpa_arguments(view)
    results = attention_lrp(b["query"], b["key"], b["value"], relevance, attn_mask=b["attn_mask"],
                            is_causal=b["is_causal"], scale=b["scale"], enable_gqa=b["enable_gqa"], epsilon=LRP_EPSILON)
    return _by_input(view, b, results)


def sdpa_deeplift_reverse(view, multiplier):
    b = _sdpa_arguments(view)
    ref = dict(zip([id(t) for t in view.inputs], _reference(view)))
    q0, k0, v0 = (ref.get(id(b[n]), b[n]) for n in ("query", "key", "value"))
    results = attention_deeplift(b["query"], b["key"], b["value"], q0, k0, v0, multiplier, attn_mask=b["attn_mask"],
                                 is_causal=b["is_causal"], scale=b["scale"], enable_gqa=b["enable_gqa"])
    return _by_input(view, b, results)


_MHA_NAMES = (
    "query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k", "bias_v",
    "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training", "key_padding_mask", "need_weights",
    "attn_mask", "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "static_k",
    "static_v", "average_attn_weights", "is_causal")
_MHA_DEFAULTS = {"training": True, "key_padding_mask": None, "need_weights": True, "attn_mask": None,
                 "use_separate_proj_weight": False, "static_k": None, "static_v": None, "is_causal": False}


def _module_mha_arguments(view):
    module = view.module
    b = _bind(("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
               "is_causal"), {"key_padding_mask": None, "attn_mask": None, "is_causal": False}, view.args, view.kwargs)
    if not module._qkv_same_embed_dim:
        raise fail("lrp", "nn.MultiheadAttention with kdim / vdim != embed_dim has no rule yet")
    own = view.params
    b.update(num_heads=module.num_heads, in_proj_weight=own["in_proj_weight"], in_proj_bias=own.get("in_proj_bias"),
             bias_k=module.bias_k, bias_v=module.bias_v, add_zero_attn=module.add_zero_attn,
             dropout_p=module.dropout, training=module.training, out_proj_weight=own["out_proj.weight"],
             out_proj_bias=own.get("out_proj.bias"), batch_first=module.batch_first)
    return b


def _mha_arguments(view):
    if view_module(view) is not None:
        b = _module_mha_arguments(view)
    else:
        b = _bind(_MHA_NAMES, _MHA_DEFAULTS, view.args, view.kwargs)
    unsupported = [n for n in ("bias_k", "bias_v", "key_padding_mask", "attn_mask", "static_k", "static_v")
                   if b.get(n) is not None]
    unsupported += [n for n in ("add_zero_attn", "use_separate_proj_weight", "is_causal") if b.get(n)]
    if b["training"] and b["dropout_p"]:
        unsupported.append("dropout in training")
    if unsupported:
        raise fail("lrp", f"nn.MultiheadAttention with {', '.join(unsupported)} has no rule yet")
    params = {"in_proj_weight": b["in_proj_weight"], "in_proj_bias": b["in_proj_bias"],
              "out_proj.weight": b["out_proj_weight"], "out_proj.bias": b["out_proj_bias"]}
    return b, params


def _mha_signal(signal):
    # F.multi_head_attention_forward returns (out, weights or None): only out carries a signal
    return signal[0] if isinstance(signal, (tuple, list)) else signal


def _sequence_first(t, b):
    # nn.MultiheadAttention(batch_first=True) takes (N, L, E); the rules take (L, N, E)
    return t.transpose(0, 1) if b.get("batch_first") else t


def mha_lrp_reverse(view, relevance):
    b, params = _mha_arguments(view)
    q, k, v = (_sequence_first(b[n], b) for n in ("query", "key", "value"))
    results = multihead_attention_lrp(q, k, v, params, b["num_heads"], _sequence_first(_mha_signal(relevance), b),
                                      epsilon=LRP_EPSILON)
    return _by_input(view, b, tuple(_sequence_first(r, b) for r in results))


def mha_deeplift_reverse(view, multiplier):
    b, params = _mha_arguments(view)
    ref = dict(zip([id(t) for t in view.inputs], _reference(view)))
    q, k, v = (_sequence_first(b[n], b) for n in ("query", "key", "value"))
    q0, k0, v0 = (_sequence_first(ref.get(id(b[n]), b[n]), b) for n in ("query", "key", "value"))
    results = multihead_attention_deeplift(q, k, v, q0, k0, v0, params, b["num_heads"],
                                           _sequence_first(_mha_signal(multiplier), b))
    return _by_input(view, b, tuple(_sequence_first(r, b) for r in results))


def route_reverse(view, signal):
    """A routing (``roll``, ``flip``, ``tile``...): relevance, multipliers and gradients alike go back
    by the vector-Jacobian product (a permutation / copy: conserves)."""
    return gradient_reverse(view.fn, view.inputs, signal)


# torchvision's Swin (v1) window attention, a function torch.fx keeps whole: its pieces, each a rule
# above (routing by vector-Jacobian products, the projections by the epsilon/z rule, attention)

_SWIN = (("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads", "shift_size",
          "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training"),
         {"attention_dropout": 0.0, "dropout": 0.0, "qkv_bias": None, "proj_bias": None, "logit_scale": None,
          "training": True})


def _swin_pieces(view):
    b = _bind(*_SWIN[:1], _SWIN[1], view.args, view.kwargs)
    if b["logit_scale"] is not None:
        raise fail("lrp", "Swin V2's cosine window attention (logit_scale) has no rule yet")
    if b["training"] and (b["attention_dropout"] or b["dropout"]):
        raise fail("lrp", "shifted_window_attention with dropout in training has no rule")
    x = b["input"]
    batch, height, width, channels = x.shape
    (wh, ww), heads = b["window_size"], b["num_heads"]
    pad_r, pad_b = (ww - width % ww) % ww, (wh - height % wh) % wh
    pad_h, pad_w = height + pad_b, width + pad_r
    shift = list(b["shift_size"])
    shift = [0 if wh >= pad_h else shift[0], 0 if ww >= pad_w else shift[1]]
    windows = (pad_h // wh) * (pad_w // ww)
    length = wh * ww

    def pre(t):  # pad, shift, partition: (B, H, W, C) -> (B * nW, Ws * Ws, C)
        t = F.pad(t, (0, 0, 0, pad_r, 0, pad_b))
        if sum(shift) > 0:
            t = torch.roll(t, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        t = t.view(batch, pad_h // wh, wh, pad_w // ww, ww, channels)
        return t.permute(0, 1, 3, 2, 4, 5).reshape(batch * windows, length, channels)

    def split(qkv):  # (B * nW, L, 3C) -> q, k, v of (B * nW, heads, L, C / heads)
        parts = qkv.reshape(qkv.shape[0], length, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
        return parts[0], parts[1], parts[2]

    def merge(o):  # (B * nW, heads, L, d) -> (B * nW, L, C)
        return o.transpose(1, 2).reshape(o.shape[0], length, channels)

    def post(t):  # reverse partition, shift and padding
        t = t.view(batch, pad_h // wh, pad_w // ww, wh, ww, channels).permute(0, 1, 3, 2, 4, 5)
        t = t.reshape(batch, pad_h, pad_w, channels)
        if sum(shift) > 0:
            t = torch.roll(t, shifts=(shift[0], shift[1]), dims=(1, 2))
        return t[:, :height, :width, :]

    bias = b["relative_position_bias"]
    if sum(shift) > 0:  # the shifted windows' mask, as torchvision builds it (-100 across regions)
        region = torch.zeros((pad_h, pad_w), dtype=x.dtype, device=x.device)
        count = 0
        for h in ((0, -wh), (-wh, -shift[0]), (-shift[0], None)):
            for w in ((0, -ww), (-ww, -shift[1]), (-shift[1], None)):
                region[h[0]:h[1], w[0]:w[1]] = count
                count += 1
        region = region.view(pad_h // wh, wh, pad_w // ww, ww).permute(0, 2, 1, 3).reshape(windows, length)
        mask = region.unsqueeze(1) - region.unsqueeze(2)
        mask = torch.where(mask != 0, torch.full_like(mask, -100.0), torch.zeros_like(mask))
        # relative_position_bias is (1, heads, L, L); windows are batch-major: (B * nW, heads, L, L)
        bias = (bias.reshape(-1, length, length) + mask.unsqueeze(1)).repeat(batch, 1, 1, 1)

    def qkv_fn(t):
        return F.linear(t, b["qkv_weight"], b["qkv_bias"])

    def proj_fn(t):
        return F.linear(t, b["proj_weight"], b["proj_bias"])
    return b, pre, split, merge, post, qkv_fn, proj_fn, bias, (channels // heads) ** -0.5


def swin_attention_lrp_reverse(view, relevance):
    """LRP through torchvision's ``shifted_window_attention`` (Swin V1): routing back through the
    window partition and shifts, the z rule on the projections, :func:`attention_lrp` with the
    relative position bias and the shift mask as a constant additive bias."""
    b, pre, split, merge, post, qkv_fn, proj_fn, bias, scale = _swin_pieces(view)
    x = pre(b["input"])
    qkv = qkv_fn(x)
    q, k, v = split(qkv)
    attended = merge(torch.softmax(_scores(q, k, scale) + bias, -1) @ v)
    (r_out,) = gradient_reverse(post, (proj_fn(attended),), relevance)
    r_att = _affine_lrp(proj_fn, attended, r_out, LRP_EPSILON)
    (r_heads,) = gradient_reverse(lambda t: merge(t), (q,), r_att)
    r_q, r_k, r_v = attention_lrp(q, k, v, r_heads, attn_mask=bias, scale=scale, epsilon=LRP_EPSILON)
    (r_qkv,) = gradient_reverse(lambda t: torch.stack(split(t)), (qkv,), torch.stack((r_q, r_k, r_v)))
    r_x = _affine_lrp(qkv_fn, x, r_qkv, LRP_EPSILON)
    return gradient_reverse(pre, (b["input"],), r_x)


def swin_attention_deeplift_reverse(view, multiplier):
    """DeepLIFT through torchvision's ``shifted_window_attention``, exact (routing and projections by
    their transposes, :func:`attention_deeplift` in between)."""
    b, pre, split, merge, post, qkv_fn, proj_fn, bias, scale = _swin_pieces(view)
    x, x0 = pre(b["input"]), pre(_reference(view)[0])
    qkv, qkv0 = qkv_fn(x), qkv_fn(x0)
    (q, k, v), (q0, k0, v0) = split(qkv), split(qkv0)
    attended = merge(torch.softmax(_scores(q, k, scale) + bias, -1) @ v)
    (m_out,) = gradient_reverse(post, (proj_fn(attended),), multiplier)
    (m_att,) = gradient_reverse(proj_fn, (attended,), m_out)
    (m_heads,) = gradient_reverse(lambda t: merge(t), (q,), m_att)
    m_q, m_k, m_v = attention_deeplift(q, k, v, q0, k0, v0, m_heads, attn_mask=bias, scale=scale)
    (m_qkv,) = gradient_reverse(lambda t: torch.stack(split(t)), (qkv,), torch.stack((m_q, m_k, m_v)))
    (m_x,) = gradient_reverse(qkv_fn, (x,), m_qkv)
    return gradient_reverse(pre, (b["input"],), m_x)


def identity_in_eval_reverse(view, signal):
    """``torchvision.ops.stochastic_depth`` in eval mode is the identity: the signal passes."""
    b = _bind(("input", "p", "mode", "training"), {"training": True}, view.args, view.kwargs)
    if b["training"] and b["p"] > 0:
        raise fail("lrp", "stochastic_depth in training mode (random) has no rule; call model.eval()")
    return (signal,)


# --- registration ---------------------------------------------------------------------------------

def _two_data(node, data_refs):
    return data_refs == 2


def _one_data(node, data_refs):
    return data_refs == 1


KINDS = {
    # name: (functions, methods, modules, accepts, {method: reverse})
    "product": ({operator.mul, torch.mul}, {"mul", "__mul__"}, (), _product_accepts,
                {"lrp": product_lrp_reverse, "deeplift": product_deeplift_reverse}),
    "quotient": ({operator.truediv, torch.div, torch.true_divide}, {"div", "__truediv__"}, (), _two_data,
                 {"lrp": quotient_lrp_reverse, "deeplift": quotient_deeplift_reverse}),
    # addmm / baddbmm (GPT-2's Conv1D: bias + x @ W): the bias is a constant of the map
    "bilinear": ({torch.matmul, operator.matmul, torch.bmm, torch.einsum, torch.addmm, torch.baddbmm, torch.addbmm},
                 {"matmul", "bmm", "__matmul__", "addmm", "baddbmm"}, (), None,
                 {"lrp": bilinear_lrp_reverse, "deeplift": bilinear_deeplift_reverse}),
    "elementwise": ({torch.rsqrt, torch.sqrt, torch.exp, torch.log, torch.square, torch.reciprocal, torch.erf,
                     torch.pow, operator.pow, torch.abs, torch.log1p, torch.expm1, torch.sin, torch.cos},
                    {"rsqrt", "sqrt", "exp", "log", "square", "reciprocal", "erf", "pow", "__pow__", "abs", "log1p",
                     "expm1", "sin", "cos"}, (), _one_data,
                    {"lrp": elementwise_lrp_reverse, "deeplift": elementwise_deeplift_reverse}),
    "softmax": ({F.softmax, torch.softmax}, {"softmax"}, (nn.Softmax,), _one_data,
                {"lrp": softmax_lrp_reverse, "deeplift": softmax_deeplift_reverse}),
    "layer_norm": ({F.layer_norm}, set(), (nn.LayerNorm,), _one_data,
                   {"lrp": layer_norm_lrp_reverse, "deeplift": layer_norm_deeplift_reverse}),
    "group_norm": ({F.group_norm}, set(), (nn.GroupNorm,), _one_data,
                   {"lrp": group_norm_lrp_reverse, "deeplift": group_norm_deeplift_reverse}),
    "rms_norm": ({F.rms_norm}, set(), (nn.RMSNorm,), _one_data,
                 {"lrp": rms_norm_lrp_reverse, "deeplift": rms_norm_deeplift_reverse}),
    "interpolate": ({F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear}, set(),
                    (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d), _one_data,
                    {"lrp": linear_lrp_reverse, "deeplift": linear_deeplift_reverse}),
    "route_more": ({torch.roll, torch.flip, torch.tile, torch.repeat_interleave}, {"roll", "flip", "tile",
                                                                                    "repeat_interleave"}, (), None,
                   {"lrp": route_reverse, "deeplift": route_reverse}),
    "attention": ({F.scaled_dot_product_attention}, set(), (), None,
                  {"lrp": sdpa_lrp_reverse, "deeplift": sdpa_deeplift_reverse}),
    "multihead_attention": ({F.multi_head_attention_forward}, set(), (nn.MultiheadAttention,), None,
                            {"lrp": mha_lrp_reverse, "deeplift": mha_deeplift_reverse}),
}


def _torchvision_kinds() -> dict:
    try:
        from torchvision.models import swin_transformer
        from torchvision.ops import stochastic_depth
    except ImportError:  # torchvision is optional
        return {}
    shifted_window_attention = swin_transformer.shifted_window_attention
    # Swin's patch merging pads H and W to even sizes in a function torch.fx keeps whole: a routing
    patch_merging_pad = getattr(swin_transformer, "_patch_merging_pad", None)
    return {
        "swin_patch_merging_pad": ({patch_merging_pad} - {None}, set(), (), _one_data,
                                   {"lrp": route_reverse, "deeplift": route_reverse}),
        "stochastic_depth": ({stochastic_depth}, set(), (), _one_data,
                             {"lrp": identity_in_eval_reverse, "deeplift": identity_in_eval_reverse,
                              "guided": identity_in_eval_reverse}),
        "swin_window_attention": ({shifted_window_attention}, set(), (), _one_data,
                                  {"lrp": swin_attention_lrp_reverse, "deeplift": swin_attention_deeplift_reverse}),
    }


def register_all() -> None:
    """Adds every kind of :data:`KINDS` to the graph catalogue with its LRP and DeepLIFT reverses
    (guided backprop / deconvnet use the vector-Jacobian product, exact for all of them). The
    engine imports this module before it classifies a graph, which calls this once."""
    from fxattr.graph import OpKind, register
    from fxattr.propagation._engine import register_reverse

    for name, (functions, methods, modules, accepts, reverses) in {**KINDS, **_torchvision_kinds()}.items():
        register(OpKind(name, functions=functions, methods=methods, modules=modules, accepts=accepts))
        for method, fn in reverses.items():
            register_reverse(method, name, fn)


register_all()
