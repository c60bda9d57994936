"""LRP rules as data: how one linear layer passes relevance from its output to its input.

A rule is a :class:`Rule`: a name, the parameter modifier, input modifier and stabiliser that define
it, and its ``reverse(layer, params, x, z, relevance) -> relevance at x``, a pure function written with
plain torch ops. ``layer`` is a :class:`Layer`: the layer as a function ``forward(x, params)`` and its
transpose ``transpose(s, params, x) = W^T s`` (the vector-Jacobian product of ``forward`` w.r.t. its
input, i.e. the "gradient trick" of LRP: ``R_in = x * W^T (R_out / z)``), so one rule serves Linear,
Conv1d/2d/3d and (unfolded) batch norm alike. ``params`` holds ``weight`` and ``bias`` (``None`` when
the layer has none), ``x`` is the layer's input and ``z = forward(x, params)`` its output from the
forward pass (reused, never recomputed, where the rule does not modify the layer).

Notation in the docstrings: ``W+ = max(W, 0)``, ``W- = min(W, 0)``, likewise ``x+``, ``x-``, ``b+``,
``b-``; ``R`` the relevance of the layer's output; products and quotients are element-wise except
``W x`` (the layer) and ``W^T s`` (its transpose).

Conventions (iNNvestigate's unless said otherwise; see each rule):

- stabilisers: ``safe(eps)`` replaces exact zeros of the denominator by ``eps`` (iNNvestigate's
  ``SafeDivide``, eps = 1e-7); ``signed(eps)`` adds ``eps * sign(z)`` with ``sign(0) = +1``
  (iNNvestigate's epsilon rule, and zennit's stabiliser with eps = 1e-6);
- ``alpha_beta`` with bias puts the whole bias in both the activator and the inhibitor denominator
  (iNNvestigate); ``bias="split"`` puts ``b+`` in the activator and ``b-`` in the inhibitor (zennit);
- ``w_square`` and ``flat`` ignore the bias (``w_square(bias=True)`` adds ``b^2``, as zennit does);
- ``z_plus`` is ``alpha_beta(1, 0, bias=False)``; ``z_plus_fast`` applies ``W+`` to the raw input;
- zennit's ``Stabilizer`` options (``clip``, ``norm_scale``, ``dim``) are :func:`stabiliser`, which
  any rule's ``stabiliser=`` (and the epsilon rule's ``epsilon=``) accepts; zennit's
  ``zero_params="bias"`` is ``bias=False`` of epsilon / z_plus / alpha_beta and ``zero_params`` of gamma.

Example:
    >>> from fxattr.propagation import rules
    >>> composite = fxattr.lrp.Composite(kinds={"conv": rules.gamma(0.25), "linear": rules.epsilon(0.1)})
    >>> explain = fxattr.lrp(f, composite=composite)
    >>> torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from fxattr.errors import fail
from fxattr.graph._ops import RELU, Layer

__all__ = [
    "Layer", "Rule", "alpha_beta", "epsilon", "flat", "gamma", "gradient", "norm", "pass_",
    "relu_beta_smooth", "safe", "signed", "stabiliser", "w_square", "z", "z_plus", "z_plus_fast", "zb",
]

Stabiliser = Callable[[Tensor], Tensor]
Params = Mapping[str, Optional[Tensor]]


# Layer lives in the graph's catalogue of operation kinds (kernels are identified there).


class Rule(NamedTuple):
    """One LRP rule (build it with the constructors of this module, or write your own).

    Attributes:
        name: the rule's name (``"epsilon"``, ...), used in error messages and reprs.
        reverse: ``reverse(layer, params, x, z, relevance) -> relevance of x`` (see the module doc).
        stabilise: the denominator's stabiliser ``z -> z'``; parameter-free linear layers
            (average pooling, additions) under this rule use ``R_i = a_i * d z/d a_i (R / stabilise(z))``.
        params: the parameter modifier ``params -> params`` that defines the rule (or ``None``).
        input: the input modifier ``x -> x'`` that defines the rule (or ``None``).
        config: the rule's settings, as ``(name, value)`` pairs.
    """

    name: str
    reverse: Callable[..., Tensor]
    stabilise: Optional[Stabiliser] = None
    params: Optional[Callable[[Params], Params]] = None
    input: Optional[Callable[[Tensor], Tensor]] = None
    config: tuple = ()

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.config)
        return f"rules.{self.name}({settings})"


# --- stabilisers -------------------------------------------------------------------------------

def dtype_floor(epsilon: float, dtype) -> float:
    """``epsilon`` raised where the dtype needs it: ``R / z'`` must stay finite, and in float16
    (max 65504) a 1e-7 stabiliser of an exact zero overflows, so ``safe`` raises it to
    ``finfo.max ** -0.5`` (3.9e-3); float32, bfloat16 and float64 keep ``epsilon``."""
    return max(epsilon, torch.finfo(dtype).max ** -0.5)


def signed(epsilon: float) -> Stabiliser:
    """``z -> z + epsilon * sign(z)`` with ``sign(0) = +1`` (the epsilon rule's stabiliser)."""
    def stabilise(z: Tensor) -> Tensor:
        # z + eps * sign(z), sign(0) = +1, without boolean masks (they cost several passes on CPU):
        # copysign takes the sign of z + 0.0, which turns -0.0 into +0.0; its derivative w.r.t.
        # the sign source is 0, so d stabilise / dz = 1 as before
        # epsilon as given in every dtype (1e-7 is a float16 subnormal): raising it to the float16
        # floor changed LRP-epsilon by 1e-1 on ordinary networks
        return z + torch.copysign(torch.tensor(epsilon, dtype=z.dtype, device=z.device), z + 0.0)
    stabilise.epsilon = epsilon
    stabilise.__qualname__ = f"signed({epsilon!r})"
    return stabilise


def safe(epsilon: float = 1e-7) -> Stabiliser:
    """``z -> z + epsilon * (z == 0)``: only exact zeros are replaced (iNNvestigate's SafeDivide)."""
    def stabilise(z: Tensor) -> Tensor:
        # 1 - |sign(z)| is 1 exactly where z == 0 (and 0 elsewhere): no boolean mask; sign has
        # derivative 0, so d stabilise / dz = 1 as before
        return torch.add(z, 1 - torch.sign(z).abs(), alpha=dtype_floor(epsilon, z.dtype))
    stabilise.epsilon = epsilon
    stabilise.__qualname__ = f"safe({epsilon!r})"
    return stabilise


def stabiliser(epsilon: float = 1e-6, *, clip: bool = False, norm_scale: bool = False,
               dim: Sequence[int] | int | None = None) -> Stabiliser:
    """zennit's stabiliser with its options (``zennit.core.Stabilizer``): ``z -> z'`` for ``R / z'``.

    With ``sign(z)`` taken as +1 at 0:

    - default: ``z' = z + e * sign(z)`` (the same as :func:`signed`);
    - ``clip=True``: ``z' = sign(z) * max(|z|, e)``: only denominators smaller than ``e`` in
      magnitude change (to ``+-e``), the others are left exact;
    - ``norm_scale=True``: ``e = epsilon * sqrt(mean(z ** 2))`` over the axes ``dim`` of the layer's
      output, so the stabiliser scales with the layer's activations (one ``e`` per example).

    Args:
        epsilon: the shift (or the clip level), a finite number >= 0.
        clip: clip ``|z|`` from below instead of shifting ``z``.
        norm_scale: scale ``epsilon`` by the root mean square of ``z``.
        dim: the axes of ``z`` the mean runs over with ``norm_scale``, counted as zennit counts them,
            on the layer's output with a leading batch axis (inside a rule ``z`` has shape
            ``(1, C, H, W)``: the batch axis of ONE example, the vmapped examples are not seen);
            default every axis but 0, i.e. the whole output of one example.

    Example:
        >>> composite = fxattr.lrp.Composite(kinds={
        ...     "conv": rules.gamma(0.25, stabiliser=rules.stabiliser(1e-6, clip=True)),
        ...     "linear": rules.epsilon(rules.stabiliser(0.1, norm_scale=True))})
        >>> torch.vmap(fxattr.lrp(f, composite=composite), in_dims=(None, 0, 0))(params, x, labels)
    """
    where = "lrp.rules.stabiliser"
    eps = _number(where, "epsilon", epsilon)
    for name, flag in (("clip", clip), ("norm_scale", norm_scale)):
        if not isinstance(flag, bool):
            raise fail(where, f"{name} must be True or False, got {flag!r}")
    if dim is not None:
        axes = (dim,) if isinstance(dim, int) else dim
        if (not isinstance(axes, (tuple, list)) or not axes
                or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes)):
            raise fail(where, f"dim must be an int or a non-empty tuple of ints, got {dim!r}")
        if len(set(axes)) != len(axes):
            raise fail(where, f"dim must not repeat an axis, got {dim!r}")
        if not norm_scale:
            raise fail(where, "dim applies with norm_scale=True only")
        dim = tuple(axes)

    def stabilise(z: Tensor) -> Tensor:
        # sign(z) with sign(0) = +1, as zennit; sign has derivative 0 everywhere
        sign = torch.sign(z) + (1 - torch.sign(z).abs())
        e = eps
        if norm_scale:
            axes = dim if dim is not None else tuple(range(1, z.ndim))
            if any(a >= z.ndim or a < -z.ndim for a in axes):
                raise fail("lrp", f"stabiliser dim={dim!r} does not fit a layer output of rank {z.ndim}")
            # the mean square in float32 for half-precision outputs (|z| > 256 overflows z * z in
            # float16, and an infinite epsilon would zero every relevance silently)
            wide = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
            e = (eps * (wide * wide).mean(dim=axes, keepdim=True).sqrt()).to(z.dtype)
        if clip:
            return sign * z.abs().clamp(min=e) if not norm_scale else sign * torch.maximum(z.abs(), e)
        return z + sign * e

    stabilise.epsilon = eps
    stabilise.__qualname__ = (f"stabiliser({eps!r}, clip={clip!r}, norm_scale={norm_scale!r}"
                              f"{'' if dim is None else f', dim={dim!r}'})")
    return stabilise


def _stabiliser(where: str, value) -> Stabiliser:
    if callable(value):
        return value
    if isinstance(value, Real) and not isinstance(value, bool) and value >= 0:
        return signed(float(value))
    raise fail(where, f"stabiliser must be a number >= 0 or a callable z -> z', got {value!r}")


def _number(where: str, name: str, value, minimum: float | None = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise fail(where, f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise fail(where, f"{name} must be finite, got {value!r}")
    if minimum is not None and value < minimum:
        raise fail(where, f"{name} must be >= {minimum}, got {value!r}")
    return float(value)


# --- parameter helpers -------------------------------------------------------------------------

def _with(params: Params, weight: Tensor, bias: Tensor | None) -> dict:
    out = dict(params)
    out["weight"], out["bias"] = weight, bias
    return out


def _bias(params: Params) -> Tensor | None:
    return params.get("bias")


def _positive(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clamp(min=0)


def _negative(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clamp(max=0)


def _ones(x: Tensor) -> Tensor:
    # ones of x's (per-example) shape; a factory call, so under vmap it is not batched and layer
    # passes on it run once for the whole batch
    return torch.ones(x.shape, dtype=x.dtype, device=x.device)


def _channel_axis(layer: Layer, x: Tensor, weight: Tensor) -> int | None:
    """The input axis along which ``forward(cat([x1, x2], axis), cat([W1, W2], 1)) = W1 x1 + W2 x2``
    (and the transpose gives ``cat([W1^T s, W2^T s], axis)``): dense layers and batched
    convolutions with ``groups == 1``; ``None`` otherwise. One layer call on twice the input
    channels instead of two: much cheaper where the input has few channels (an image)."""
    if layer.groups != 1:
        return None
    if layer.kind == "linear":
        return x.ndim - 1
    if layer.kind == "conv" and x.ndim == weight.ndim:
        return 1
    return None


def _split_sum(t: Tensor, axis: int | None) -> Tensor:
    # the relevance of [x+; x-] (concatenated along axis) summed back onto x
    if axis is None:
        return t
    n = t.shape[axis] // 2
    return t.narrow(axis, 0, n) + t.narrow(axis, n, n)


def _no_bias_output(layer: Layer, params: Params, x: Tensor, z: Tensor) -> Tensor:
    # W x computed afresh, not z - b: no cancellation where the bias dominates
    return z if _bias(params) is None else layer.forward(x, _with(params, params["weight"], None))


# --- rules -------------------------------------------------------------------------------------

def z(*, bias: bool = True, stabiliser=None) -> Rule:
    """LRP-0: ``R_x = x * W^T (R / z)`` with ``z = W x + b`` (``bias=False``: ``z = W x``, the ``_IB``
    variant). Default stabiliser ``safe(1e-7)`` (iNNvestigate's SafeDivide)."""
    stabilise = safe() if stabiliser is None else _stabiliser("lrp.rules.z", stabiliser)

    def reverse(layer, params, x, out, relevance):
        denominator = out if bias else _no_bias_output(layer, params, x, out)
        return x * layer.transpose(relevance / stabilise(denominator), params, x)

    return Rule("z" if bias else "z_IB", reverse, stabilise, config=(("bias", bias),))


def epsilon(epsilon: float = 1e-7, *, bias: bool = True) -> Rule:
    """LRP-epsilon: ``R_x = x * W^T (R / (z + epsilon * sign(z)))``, ``sign(0) = +1``, ``z = W x + b``
    (``bias=False``: ``z = W x``). Default ``epsilon = 1e-7`` (iNNvestigate; zennit's is 1e-6).
    ``epsilon`` may also be a stabiliser ``z -> z'`` (e.g. :func:`stabiliser` with ``clip`` or
    ``norm_scale``), as zennit's ``Epsilon(epsilon=callable)``."""
    if callable(epsilon):
        stabilise, eps = epsilon, epsilon
    else:
        eps = _number("lrp.rules.epsilon", "epsilon", epsilon)
        stabilise = signed(eps)

    def reverse(layer, params, x, out, relevance):
        if x.dtype == torch.float16 and not bias:
            # W x of a dead input is 0, so R / (0 + 1e-7) overflows float16's 65504 and x * inf
            # gives NaN: the bias-free variant computes in float32 and rounds its result once
            wide = {k: v.float() if isinstance(v, Tensor) else v for k, v in params.items()}
            return reverse(layer, wide, x.float(), out.float(), relevance.float()).to(x.dtype)
        denominator = out if bias else _no_bias_output(layer, params, x, out)
        return x * layer.transpose(relevance / stabilise(denominator), params, x)

    return Rule("epsilon" if bias else "epsilon_IB", reverse, stabilise,
                config=(("epsilon", eps), ("bias", bias)))


def norm(stabiliser=1e-6) -> Rule:
    """zennit's Norm: the z rule with zennit's stabiliser, ``R_x = x * W^T (R / (z + 1e-6 sign(z)))``;
    meant for parameter-free layers (average pooling, additions)."""
    stabilise = _stabiliser("lrp.rules.norm", stabiliser)

    def reverse(layer, params, x, out, relevance):
        return x * layer.transpose(relevance / stabilise(out), params, x)

    return Rule("norm", reverse, stabilise)


def zero_bias(where: str, zero_params) -> bool:
    """zennit's ``zero_params`` option: ``None`` (nothing zeroed) or the bias (``"bias"`` or
    ``["bias"]``); returns whether the bias is zeroed. Zeroing the weight would make every relevance
    zero, so it is refused, as is any other name (the kernel layers have a weight and a bias only)."""
    if zero_params is None:
        return False
    names = [zero_params] if isinstance(zero_params, str) else zero_params
    if (not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names)
            or not set(names) <= {"bias"}):
        raise fail(where, f"zero_params must be None, 'bias' or ['bias'] (zennit's option; zeroing the "
                          f"weight would zero every relevance), got {zero_params!r}")
    return bool(names)


def gamma(gamma: float = 0.25, *, stabiliser=1e-6, zero_params=None) -> Rule:
    """zennit's generalised gamma rule (sign-aware for signed inputs; Montavon et al. 2019 for x >= 0).

    With ``W^g+ = W + gamma W+`` and ``W^g- = W + gamma W-``:
    where the output ``z > 0``: ``z' = W^g+ x+ + W^g- x- + b + gamma b+``,
    ``R_x = x+ * (W^g+)^T s + x- * (W^g-)^T s`` with ``s = R / stabilise(z')``;
    where ``z < 0``: ``z' = W^g- x+ + W^g+ x- + b + gamma b-``,
    ``R_x = x+ * (W^g-)^T s + x- * (W^g+)^T s``. Default stabiliser ``signed(1e-6)`` (zennit).

    ``zero_params="bias"`` (zennit's option) drops ``b`` and ``gamma b+-`` from both denominators;
    which branch an output takes is still decided by the sign of the layer's output with its bias
    (zennit's Gamma reads it from the unmodified layer).
    """
    g = _number("lrp.rules.gamma", "gamma", gamma)
    stabilise = _stabiliser("lrp.rules.gamma", stabiliser)
    no_bias = zero_bias("lrp.rules.gamma", zero_params)

    def reverse(layer, params, x, out, relevance):
        branch = out  # the sign of the true output picks each output's branch
        if no_bias and _bias(params) is not None:
            out = _no_bias_output(layer, params, x, out)
            params = _with(params, params["weight"], None)
        weight, b = params["weight"], _bias(params)
        wp, wn = weight.clamp(min=0), weight.clamp(max=0)
        w_up, w_down = torch.add(weight, wp, alpha=g), torch.add(weight, wn, alpha=g)
        b_plus = None if b is None else b.clamp(min=0)
        b_up = None if b is None else b + g * b_plus
        b_down = None if b is None else b + g * b.clamp(max=0)
        p_up, p_down = _with(params, w_up, b_up), _with(params, w_down, b_down)
        positive, negative = (branch > 0).to(out), (branch < 0).to(out)
        axis = None if layer.nonnegative_input else _channel_axis(layer, x, weight)
        if layer.nonnegative_input:  # x >= 0: x+ = x, x- = 0
            xs, w_act, p_up_s, p_down_s = x, wp, p_up, p_down
        elif axis is not None:  # [x+; x-] with [W^g+, W^g-] (and swapped): one call each
            xs, w_act = torch.cat([x.clamp(min=0), x.clamp(max=0)], axis), torch.cat([wp, wn], 1)
            p_up_s = _with(params, torch.cat([w_up, w_down], 1), None)
            p_down_s = _with(params, torch.cat([w_down, w_up], 1), None)
        else:
            xp, xn = x.clamp(min=0), x.clamp(max=0)
            p_up_nb, p_down_nb = _with(params, w_up, None), _with(params, w_down, None)
            s_pos = positive * relevance / stabilise(layer.forward(xp, p_up) + layer.forward(xn, p_down_nb))
            s_neg = negative * relevance / stabilise(layer.forward(xp, p_down) + layer.forward(xn, p_up_nb))
            return (xp * (layer.transpose(s_pos, p_up, x) + layer.transpose(s_neg, p_down, x))
                    + xn * (layer.transpose(s_pos, p_down, x) + layer.transpose(s_neg, p_up, x)))
        # both denominators from the output and ONE layer pass, a = W+ x+ + W- x- + b+ >= 0:
        # z' = out + gamma a where out > 0, z' = out + gamma (out - a) where out < 0
        # (out - a = W- x+ + W+ x- + b- <= 0): sums of same-signed terms, no cancellation where
        # they are used; exact algebra, so derivatives of every order are those of two passes
        act = layer.forward(xs, _with(params, w_act, b_plus))
        s_pos = positive * relevance / stabilise(out + g * act)
        s_neg = negative * relevance / stabilise(out + g * (out - act))
        return _split_sum(xs * (layer.transpose(s_pos, p_up_s, xs) + layer.transpose(s_neg, p_down_s, xs)),
                          axis)

    return Rule("gamma", reverse, stabilise,
                config=(("gamma", g),) + ((("zero_params", "bias"),) if no_bias else ()))


_SIGNED_CODE = signed(1.0).__code__


def _for_nonnegative(stabilise: Stabiliser) -> Stabiliser:
    """``stabilise`` for a denominator known to be >= 0 (the activator ``W+ x+ + W- x- + b+``): the
    signed stabiliser ``z + eps sign(z)`` (sign(0) = +1) is ``z + eps`` there, bit for bit and with
    the same derivatives, in one pass instead of three; any other stabiliser as it is."""
    if getattr(stabilise, "__code__", None) is not _SIGNED_CODE:
        return stabilise
    epsilon = stabilise.epsilon

    def plus_epsilon(z: Tensor) -> Tensor:
        return z + torch.tensor(epsilon, dtype=z.dtype, device=z.device)
    return plus_epsilon


def alpha_beta(alpha: float = 2.0, beta: float = 1.0, *, bias=True, stabiliser=None) -> Rule:
    """LRP-alpha-beta: ``R_x = alpha R_x^act - beta R_x^inh`` with ``alpha - beta = 1``.

    Activator: ``z^a = W+ x+ + W- x- (+ bias)``, ``R_x^act = x+ * W+^T s_a + x- * W-^T s_a``,
    ``s_a = R / stabilise(z^a)``. Inhibitor: ``z^i = W- x+ + W+ x- (+ bias)``,
    ``R_x^inh = x+ * W-^T s_i + x- * W+^T s_i``, ``s_i = R / stabilise(z^i)``.

    Args:
        alpha, beta: weights of the activating and inhibiting parts, ``alpha - beta = 1``.
        bias: ``True`` (iNNvestigate): the whole bias ``b`` in both denominators (it splits into
            ``b+`` and ``b-`` with the kernel, and both halves are summed); ``False``: none (the
            ``_IB`` rules); ``"split"`` (zennit): ``b+`` in the activator, ``b-`` in the inhibitor.
        stabiliser: default ``safe(1e-7)``; a number gives ``signed(number)`` (zennit: 1e-6).
    """
    where = "lrp.rules.alpha_beta"
    a, bt = _number(where, "alpha", alpha), _number(where, "beta", beta)
    if abs(a - bt - 1) > 1e-12:
        raise fail(where, f"alpha - beta must equal 1, got alpha={alpha!r}, beta={beta!r}")
    if bias not in (True, False, "split"):
        raise fail(where, f"bias must be True, False or 'split', got {bias!r}")
    stabilise = safe() if stabiliser is None else _stabiliser(where, stabiliser)
    # without the whole bias the activator's pre-activation is a sum of non-negative terms
    stabilise_act = _for_nonnegative(stabilise) if bias in (False, "split") else stabilise

    def reverse(layer, params, x, out, relevance):
        weight, b = params["weight"], _bias(params)
        # W- only where it is used (not by z+ behind a ReLU): weights can outweigh activations
        wp = weight.clamp(min=0)
        wn = weight.clamp(max=0) if (bt != 0 or not layer.nonnegative_input) else None
        b_act = None if (b is None or bias is False) else (b.clamp(min=0) if bias == "split" else b)
        axis = None if layer.nonnegative_input else _channel_axis(layer, x, weight)
        if not layer.nonnegative_input and axis is None:
            return _alpha_beta_general(layer, params, x, relevance, a, bt, wp, wn, b_act,
                                       None if b_act is None else (b_act if bias is True else b.clamp(max=0)),
                                       stabilise, stabilise_act)
        if layer.nonnegative_input:  # x >= 0: x+ = x and the x- terms vanish
            xs, w_act = x, wp
        else:  # [x+; x-] with [W+, W-]: W+ x+ + W- x- in one layer call
            xs, w_act = torch.cat([x.clamp(min=0), x.clamp(max=0)], axis), torch.cat([wp, wn], 1)
        p_act = _with(params, w_act, None)
        # the activator's pre-activation, its bias fused into the layer pass
        z_act = layer.forward(xs, _with(params, w_act, b_act))
        s_act = relevance / stabilise_act(z_act)
        if a != 1:
            s_act = a * s_act
        if bt == 0:
            return _split_sum(xs * layer.transpose(s_act, p_act, xs), axis)
        p_inh = _with(params, wn if axis is None else torch.cat([wn, wp], 1), None)
        if bias is True and b is not None:
            # the whole b in both: z_inh = out - W+ x would cancel W+ x against out (where z_inh
            # crosses 0 near -b its float32 error grows ~|W+ x| / |b|): a layer pass of its own
            z_inh = layer.forward(xs, _with(params, p_inh["weight"], b))
        else:
            # W+ x+ + W- x- + W- x+ + W+ x- = W x = out - b, so the inhibitor's pre-activation
            # (b- with "split", no bias with False) follows from the activator's and the layer's
            # output without a layer pass. Exact algebra: derivatives of every order are those of
            # a separate pass, and the float32 error stays that of one (z_act holds b+ = b - b-).
            z_inh = out - z_act
            if bias is False and b is not None:
                z_inh = z_inh - layer.bias(b, z_inh)
        s_inh = relevance / stabilise(z_inh)
        if bt != 1:
            s_inh = bt * s_inh
        return _split_sum(xs * (layer.transpose(s_act, p_act, xs) - layer.transpose(s_inh, p_inh, xs)), axis)

    name = {True: "alpha_beta", False: "alpha_beta_IB", "split": "alpha_beta"}[bias]
    return Rule(name, reverse, stabilise,
                config=(("alpha", a), ("beta", bt), ("bias", bias)))


def _alpha_beta_general(layer, params, x, relevance, a, bt, wp, wn, b_act, b_inh, stabilise, stabilise_act):
    """alpha-beta on a signed input with a layer pass per part (layers whose weights cannot be
    concatenated along the input channels: grouped convolutions, batch norm)."""
    pp, pn = _with(params, wp, None), _with(params, wn, None)
    xp, xn = x.clamp(min=0), x.clamp(max=0)

    def with_bias(value, extra):
        return value if extra is None else value + layer.bias(extra, value)

    # the activator's bias fused into its first layer pass; alpha = 1 (z+) multiplies nothing
    s_act = relevance / stabilise_act(layer.forward(xp, _with(params, wp, b_act)) + layer.forward(xn, pn))
    if a != 1:
        s_act = a * s_act
    if bt == 0:
        return xp * layer.transpose(s_act, pp, x) + xn * layer.transpose(s_act, pn, x)
    s_inh = bt * relevance / stabilise(with_bias(layer.forward(xp, pn) + layer.forward(xn, pp), b_inh))
    return (xp * (layer.transpose(s_act, pp, x) - layer.transpose(s_inh, pn, x))
            + xn * (layer.transpose(s_act, pn, x) - layer.transpose(s_inh, pp, x)))


def z_plus(*, bias=False, stabiliser=None) -> Rule:
    """LRP-z+ (iNNvestigate's ``z_plus`` = ``alpha_1_beta_0_IB``): ``z^a = W+ x+ + W- x-``,
    ``R_x = x+ * W+^T s + x- * W-^T s``, ``s = R / stabilise(z^a)``; for x >= 0 the classic
    ``x * W+^T (R / W+ x)``. ``bias="split"`` adds ``b+`` to the denominator (zennit's ZPlus)."""
    if stabiliser is not None:  # checked here, so an error names z_plus (not the alpha_beta it is built on)
        _stabiliser("lrp.rules.z_plus", stabiliser)
    rule = alpha_beta(1.0, 0.0, bias=bias, stabiliser=stabiliser)
    return rule._replace(name="z_plus", config=(("bias", bias),))


def z_plus_fast(*, stabiliser=None) -> Rule:
    """iNNvestigate's ``z_plus_fast``: ``R_x = x * W+^T (R / W+ x)`` on the raw (signed) input,
    no bias."""
    stabilise = safe() if stabiliser is None else _stabiliser("lrp.rules.z_plus_fast", stabiliser)

    def reverse(layer, params, x, out, relevance):
        pp = _with(params, params["weight"].clamp(min=0), None)
        return x * layer.transpose(relevance / stabilise(layer.forward(x, pp)), pp, x)

    return Rule("z_plus_fast", reverse, stabilise)


def w_square(*, bias: bool = False, stabiliser=None) -> Rule:
    """LRP-w^2 (Montavon et al. 2017): ``R_x = (W^2)^T (R / W^2 1)``; the input does not enter.
    ``bias=True`` adds ``b^2`` to the denominator (zennit's WSquare; iNNvestigate ignores it)."""
    stabilise = safe() if stabiliser is None else _stabiliser("lrp.rules.w_square", stabiliser)

    def reverse(layer, params, x, out, relevance):
        b = _bias(params)
        p2 = _with(params, params["weight"] ** 2, None if (b is None or not bias) else b ** 2)
        # the denominator does not depend on x: one pass for the whole batch under vmap
        return layer.transpose(relevance / stabilise(layer.forward(_ones(x), p2)), p2, x)

    return Rule("w_square", reverse, stabilise, config=(("bias", bias),))


def flat(*, stabiliser=None) -> Rule:
    """LRP-flat (Lapuschkin et al. 2019): ``w_square`` with every weight set to 1 and no bias:
    each output's relevance is spread uniformly over its receptive field, ``R_x = 1^T (R / 1 1)``."""
    stabilise = safe() if stabiliser is None else _stabiliser("lrp.rules.flat", stabiliser)

    def reverse(layer, params, x, out, relevance):
        weight = params["weight"]
        if layer.groups == 1 and layer.kind == "linear":
            # every output sums in_features ones; the transpose of all ones sums the seed
            den = torch.full((1,), float(x.shape[-1]), dtype=x.dtype, device=x.device)
            return (relevance.sum(-1, keepdim=True) / stabilise(den)).expand(x.shape).contiguous()
        if layer.groups == 1 and layer.kind == "conv" and x.ndim == weight.ndim:
            # all weights 1 and groups == 1: every output channel sums the same window over all
            # C_in input channels, so the denominator is C_in times a one-channel sum of ones, and
            # the transpose sums the seed over the output channels, transposes one channel and
            # repeats it over the input channels (same values; padding, stride and dilation as the
            # layer's, since it is the layer's own forward and transpose on one channel)
            x1 = x[:, :1]
            ones = _with(params, torch.ones((1, 1) + tuple(weight.shape[2:]), dtype=weight.dtype,
                                            device=weight.device), None)
            den = layer.forward(_ones(x1), ones) * x.shape[1]
            seed = relevance.sum(1, keepdim=True) / stabilise(den)
            return layer.transpose(seed, ones, x1).expand(x.shape).contiguous()
        ones = _with(params, torch.ones_like(weight), None)
        return layer.transpose(relevance / stabilise(layer.forward(_ones(x), ones)), ones, x)

    return Rule("flat", reverse, stabilise)


def zb(low, high, *, stabiliser=None) -> Rule:
    """LRP-z^B for inputs bounded by ``low <= x <= high`` (Montavon et al. 2017), no bias:
    ``z' = W x - W+ l - W- h``, ``R_x = x * W^T s - l * W+^T s - h * W-^T s``, ``s = R / z'``.

    ``low`` and ``high`` are numbers or tensors broadcastable to ONE example (e.g. shape (3, 1, 1)
    for per-channel bounds of an image).
    """
    where = "lrp.rules.zb"
    for name, value in (("low", low), ("high", high)):
        if not isinstance(value, (Real, Tensor)) or isinstance(value, bool):
            raise fail(where, f"{name} must be a number or a tensor, got {value!r}")
    if isinstance(low, Real) and isinstance(high, Real) and low > high:
        raise fail(where, f"low must be <= high, got low={low!r}, high={high!r}")
    stabilise = safe() if stabiliser is None else _stabiliser(where, stabiliser)

    def reverse(layer, params, x, out, relevance):
        weight = params["weight"]
        # the bounds are the same for every example: unbatched under vmap, one pass each
        lo = _ones(x) * torch.as_tensor(low, dtype=x.dtype, device=x.device)
        hi = _ones(x) * torch.as_tensor(high, dtype=x.dtype, device=x.device)
        wp, wn = weight.clamp(min=0), weight.clamp(max=0)
        p, pp, pn = _with(params, weight, None), _with(params, wp, None), _with(params, wn, None)
        axis = _channel_axis(layer, x, weight)
        if axis is None:
            s = relevance / stabilise(layer.forward(x, p) - layer.forward(lo, pp) - layer.forward(hi, pn))
            return (x * layer.transpose(s, p, x) - lo * layer.transpose(s, pp, x)
                    - hi * layer.transpose(s, pn, x))
        # groups == 1: W+ l + W- h in one call on [l; h], the three transposes in one call with
        # [W, W+, W-] (the first layer: few input channels, so one call is much cheaper)
        bound = layer.forward(torch.cat([lo, hi], axis), _with(params, torch.cat([wp, wn], 1), None))
        s = relevance / stabilise(layer.forward(x, p) - bound)
        shape = list(x.shape)
        shape[axis] *= 3
        g = layer.transpose(s, _with(params, torch.cat([weight, wp, wn], 1), None),
                            torch.zeros(shape, dtype=x.dtype, device=x.device))
        n = x.shape[axis]
        return x * g.narrow(axis, 0, n) - lo * g.narrow(axis, n, n) - hi * g.narrow(axis, 2 * n, n)

    return Rule("zb", reverse, stabilise, config=(("low", low), ("high", high)))


def pass_() -> Rule:
    """Pass: ``R_x = R`` (shape-preserving layers only; zennit's Pass)."""

    def reverse(layer, params, x, out, relevance):
        if relevance.shape != x.shape:
            raise fail("lrp", f"the pass rule needs a layer whose input and output shapes agree, got "
                              f"{tuple(x.shape)} -> {tuple(relevance.shape)}")
        return relevance

    return Rule("pass", reverse, None)


def gradient() -> Rule:
    """The plain gradient: ``R_x = W^T R`` (DeepTaylor's average pooling and additions, and every
    layer of guided backprop and deconvnet)."""

    def reverse(layer, params, x, out, relevance):
        return layer.transpose(relevance, params, x)

    return Rule("gradient", reverse, None)


def is_relu(view) -> bool:
    """Whether a node (a :class:`fxattr.graph.NodeView`) is a ReLU: an ``nn.ReLU`` module, ``F.relu``,
    ``torch.relu`` or ``x.relu()``."""
    if view.module is not None:
        return type(view.module) is torch.nn.ReLU
    return view.node.op in ("call_function", "call_method") and view.node.target in RELU


def relu_beta_smooth(beta: float = 10.0) -> Callable:
    """zennit's ``ReLUBetaSmooth`` (Dombrowski et al. 2019) as the reverse of the ``"activation"``
    operations of a composite: a ReLU passes ``sigmoid(beta * x) * R`` (``x`` its input), the
    derivative of the softplus ``log(1 + exp(beta x)) / beta`` that approaches the ReLU as ``beta``
    grows, so that second derivatives through ReLUs are not zero. Other activations pass ``R``
    unchanged, as under every LRP composite. For the gradient with smooth ReLUs (zennit's
    ``BetaSmooth`` composite) use :func:`fxattr.beta_smooth`.

    Args:
        beta: the softplus sharpness, a finite number > 0 (zennit's default 10).

    Example:
        >>> composite = fxattr.lrp.Composite(kinds={"conv": rules.z_plus(), "linear": rules.epsilon(1e-6)},
        ...                                  operations={"activation": rules.relu_beta_smooth(10.0)})
        >>> torch.vmap(fxattr.lrp(f, composite=composite), in_dims=(None, 0, 0))(params, x, labels)
    """
    b = _number("lrp.rules.relu_beta_smooth", "beta", beta)
    if b <= 0:
        raise fail("lrp.rules.relu_beta_smooth", f"beta must be > 0, got {beta!r}")

    def reverse(view, relevance):
        if is_relu(view):
            return torch.sigmoid(b * view.inputs[0]) * relevance
        return relevance

    reverse.beta = b
    reverse.__qualname__ = f"relu_beta_smooth({b!r})"
    return reverse


def describe(rule: Any) -> str:
    return repr(rule) if isinstance(rule, Rule) else type(rule).__name__
