"""The reverse rules of today's operations (fxattr.propagation.op_rules) against numbers.

float64 throughout the property checks: matrix-form re-derivations (dense Jacobians built by
``torch.func.jacrev``, hand-written sums), LRP conservation where the rule conserves, LRP-0 ==
gradient x input for linear maps, DeepLIFT summation-to-delta to 1e-10; then vmap == loop and
gradcheck / gradgradcheck for every rule function, float32 runs, and errors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxattr.errors import FxattrError
from fxattr.propagation import op_rules as O
from fxattr.propagation import rules

D = torch.float64


def randn(*shape, seed=0, dtype=D):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_delta(m_in_and_deltas, m_out, delta_out, tol=1e-10):
    """sum(m_in * dx) == sum(m_out * dy), relative to the size of the terms (plus float64's rounding
    of the outputs themselves, 1e-14 sum|m_out| for outputs of order one, for nearly equal inputs)."""
    lhs = sum((m * d).sum() for m, d in m_in_and_deltas)
    rhs = (m_out * delta_out).sum()
    scale = float(sum((m * d).abs().sum() for m, d in m_in_and_deltas)) + float((m_out * delta_out).abs().sum())
    assert scale > 0
    assert abs(float(lhs - rhs)) <= tol * scale + 1e-14 * float(m_out.abs().sum()), (float(lhs), float(rhs))


# --- products ----------------------------------------------------------------------------------

def test_product_deeplift_is_the_shapley_split_and_sums_to_delta():
    a, b, a0, b0, m = (randn(4, 5, seed=i) for i in range(5))
    ma, mb = O.product_deeplift(a, b, a0, b0, m)
    # the two players' Shapley values: mean of the marginal contributions over both orders
    shapley_a = ((a * b0 - a0 * b0) + (a * b - a0 * b)) / 2
    torch.testing.assert_close(ma * (a - a0), m * shapley_a, rtol=1e-12, atol=1e-12)
    assert_delta([(ma, a - a0), (mb, b - b0)], m, a * b - a0 * b0)


def test_product_deeplift_broadcast_gate_sums_to_delta():
    # squeeze-excitation: x (C, H, W) * sigmoid(s) (C, 1, 1)
    x, x0 = randn(3, 4, 4, seed=1), randn(3, 4, 4, seed=2)
    s, s0 = torch.sigmoid(randn(3, 1, 1, seed=3)), torch.sigmoid(randn(3, 1, 1, seed=4))
    m = randn(3, 4, 4, seed=5)
    mx, ms = O.product_deeplift(x, s, x0, s0, m)
    assert mx.shape == x.shape and ms.shape == s.shape
    assert_delta([(mx, x - x0), (ms, s - s0)], m, x * s - x0 * s0)


def test_product_lrp_rules_conserve_and_split_as_published():
    a, g, r = randn(3, 4, 4, seed=1), randn(3, 1, 1, seed=2), randn(3, 4, 4, seed=3)
    ra, rg = O.product_uniform_lrp(a, g, r)
    torch.testing.assert_close(ra, r / 2)
    torch.testing.assert_close(rg, (r / 2).sum((1, 2), keepdim=True))
    torch.testing.assert_close(ra.sum() + rg.sum(), r.sum())
    rs, rz = O.product_gate_lrp(a, g, r)
    torch.testing.assert_close(rs, r)
    assert rz.shape == g.shape and not rz.any()


@pytest.mark.parametrize("kind", ["matmul", "bmm", "einsum"])
def test_bilinear_deeplift_sums_to_delta(kind):
    fn = {"matmul": torch.matmul, "bmm": torch.bmm,
          "einsum": lambda p, q: torch.einsum("bij,bjk->bik", p, q)}[kind]
    a, a0 = randn(2, 3, 4, seed=1), randn(2, 3, 4, seed=2)
    b, b0 = randn(2, 4, 5, seed=3), randn(2, 4, 5, seed=4)
    m = randn(2, 3, 5, seed=5)
    ma, mb = O.bilinear_deeplift(fn, a, b, a0, b0, m)
    assert_delta([(ma, a - a0), (mb, b - b0)], m, fn(a, b) - fn(a0, b0))


def test_bilinear_uniform_lrp_matrix_form_and_conservation():
    a, b, r = randn(3, 4, seed=1), randn(4, 5, seed=2), randn(3, 5, seed=3)
    z = a @ b
    ra, rb = O.bilinear_uniform_lrp(torch.matmul, a, b, r)
    # AttnLRP: each product a_ik b_kj gets R_ij a_ik b_kj / z_ij, half to each factor
    share = torch.einsum("ik,kj,ij->ikj", a, b, r / z)
    torch.testing.assert_close(ra, share.sum(2) / 2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rb, share.sum(0) / 2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ra.sum() + rb.sum(), r.sum(), rtol=1e-10, atol=1e-12)


# --- activations -------------------------------------------------------------------------------

ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid,
               "mish": F.mish, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_rescale_deeplift_sums_to_delta_and_falls_back_to_the_gradient(name):
    fn = ACTIVATIONS[name]
    x, x0, m = randn(50, seed=1) * 3, randn(50, seed=2) * 3, randn(50, seed=3)
    x0[:5] = x[:5]  # no difference: the gradient
    mi = O.rescale_deeplift(fn, x, x0, m)
    torch.testing.assert_close(mi * (x - x0), m * (fn(x) - fn(x0)), rtol=1e-10, atol=1e-13)
    grad = torch.func.vmap(torch.func.grad(fn))(x[:5])
    torch.testing.assert_close(mi[:5], m[:5] * grad)
    assert O.activation_pass_lrp(m) is m


# --- softmax -----------------------------------------------------------------------------------

def test_softmax_lrp_matrix_form():
    x, r = randn(4, 6, seed=1), randn(4, 6, seed=2)
    got = O.softmax_lrp(x, r)
    for i in range(4):  # x * J^T (R / s), J = diag(s) - s s^T
        s = torch.softmax(x[i], 0)
        jac = torch.diag(s) - torch.outer(s, s)
        torch.testing.assert_close(got[i], x[i] * (jac.T @ (r[i] / s)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shift", [0.0, 300.0])
def test_softmax_deeplift_sums_to_delta(shift):
    x, x0, m = randn(5, 7, seed=1) * 4 + shift, randn(5, 7, seed=2) * 4 + shift, randn(5, 7, seed=3)
    x0[0] = x[0]
    x0[1, :3] = x[1, :3]
    mi = O.softmax_deeplift(x, x0, m)
    assert torch.isfinite(mi).all()
    delta = torch.softmax(x, -1) - torch.softmax(x0, -1)
    for i in range(1, 5):  # per row: summation-to-delta
        assert_delta([(mi[i], x[i] - x0[i])], m[i], delta[i])
    # at x == x0 the multipliers are the gradient
    _, vjp = torch.func.vjp(lambda t: torch.softmax(t, -1), x[0])
    torch.testing.assert_close(mi[0], vjp(m[0])[0], rtol=1e-10, atol=1e-12)


def test_softmax_deeplift_other_dim():
    x, x0, m = randn(3, 4, 2, seed=1), randn(3, 4, 2, seed=2), randn(3, 4, 2, seed=3)
    mi = O.softmax_deeplift(x, x0, m, dim=1)
    assert_delta([(mi, x - x0)], m, torch.softmax(x, 1) - torch.softmax(x0, 1))


# --- normalisations ----------------------------------------------------------------------------

def _centring(n):
    return torch.eye(n, dtype=D) - torch.full((n, n), 1 / n, dtype=D)


def test_layer_norm_lrp_matrix_form_conservation_and_pass():
    x, r = randn(3, 6, seed=1) * 2 + 1, randn(3, 6, seed=2)
    w, b = randn(6, seed=3).abs() + 0.5, randn(6, seed=4) * 0.1
    got = O.layer_norm_lrp(x, (6,), w, b, r, eps=1e-5)
    for i in range(3):
        std = torch.sqrt(x[i].var(unbiased=False) + 1e-5)
        a = torch.diag(w / std) @ _centring(6)  # the linearisation with the std frozen
        y = a @ x[i] + b
        torch.testing.assert_close(y, F.layer_norm(x[i], (6,), w, b, 1e-5))
        torch.testing.assert_close(got[i], x[i] * (a.T @ (r[i] / y)), rtol=1e-10, atol=1e-12)
        # conserves up to the bias: sum(R_x) = sum(R (y - b) / y)
        torch.testing.assert_close(got[i].sum(), (r[i] * (y - b) / y).sum(), rtol=1e-10, atol=1e-12)
    unbiased = O.layer_norm_lrp(x, (6,), w, None, r)
    torch.testing.assert_close(unbiased.sum(-1), r.sum(-1), rtol=1e-10, atol=1e-12)
    assert O.layer_norm_lrp(x, (6,), w, b, r, rule="pass") is r


def test_group_norm_lrp_matrix_form():
    x, r = randn(2, 4, 3, seed=1), randn(2, 4, 3, seed=2)
    w, b = randn(4, seed=3).abs() + 0.5, randn(4, seed=4) * 0.1
    got = O.group_norm_lrp(x, 2, w, b, r, eps=1e-5)
    y_all = F.group_norm(x, 2, w, b, 1e-5)
    for n in range(2):
        for g in range(2):
            xs = x[n, 2 * g:2 * g + 2].reshape(-1)
            std = torch.sqrt(xs.var(unbiased=False) + 1e-5)
            scale = w[2 * g:2 * g + 2].repeat_interleave(3)
            a = torch.diag(scale / std) @ _centring(6)
            y = y_all[n, 2 * g:2 * g + 2].reshape(-1)
            want = xs * (a.T @ (r[n, 2 * g:2 * g + 2].reshape(-1) / y))
            torch.testing.assert_close(got[n, 2 * g:2 * g + 2].reshape(-1), want, rtol=1e-10, atol=1e-12)


def test_rms_norm_lrp_is_the_identity_without_bias():
    x, r, w = randn(3, 8, seed=1), randn(3, 8, seed=2), randn(8, seed=3)
    torch.testing.assert_close(O.rms_norm_lrp(x, (8,), w, r), r, rtol=1e-10, atol=1e-12)


def _rms_norm(x, w, eps):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("kind", ["layer", "group", "rms"])
def test_norm_deeplift_sums_to_delta(kind):
    x, x0 = randn(3, 4, 5, seed=1) * 2 + 0.5, randn(3, 4, 5, seed=2)
    x0[0] = x[0] + 1e-9 * randn(4, 5, seed=9)  # nearly no difference: stays exact
    m = randn(3, 4, 5, seed=3)
    if kind == "layer":
        w, b = randn(4, 5, seed=4), randn(4, 5, seed=5)
        mi = O.layer_norm_deeplift(x, x0, (4, 5), w, b, m, eps=1e-5)
        fn = lambda t: F.layer_norm(t, (4, 5), w, b, 1e-5)  # noqa: E731
    elif kind == "group":
        w, b = randn(4, seed=4), randn(4, seed=5)
        mi = O.group_norm_deeplift(x, x0, 2, w, b, m, eps=1e-5)
        fn = lambda t: F.group_norm(t, 2, w, b, 1e-5)  # noqa: E731
    else:
        w = randn(5, seed=4)
        mi = O.rms_norm_deeplift(x, x0, (5,), w, m, eps=1e-6)
        fn = lambda t: _rms_norm(t, w, 1e-6)  # noqa: E731
    for i in range(3):
        assert_delta([(mi[i], x[i] - x0[i])], m[i], fn(x[i:i + 1])[0] - fn(x0[i:i + 1])[0])


# --- linear maps without parameters ------------------------------------------------------------

LINEAR_MAPS = {
    "nearest": lambda t: F.interpolate(t, scale_factor=2, mode="nearest"),
    "bilinear": lambda t: F.interpolate(t, size=(7, 5), mode="bilinear", align_corners=False),
    "bilinear_corners": lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=True),
    "mean": lambda t: t.mean(dim=(2, 3)),
    "sum_keepdim": lambda t: t.sum(dim=-1, keepdim=True),
}


@pytest.mark.parametrize("name", list(LINEAR_MAPS))
def test_linear_lrp_zero_is_gradient_times_input_and_conserves(name):
    fn = LINEAR_MAPS[name]
    x = randn(2, 3, 4, 4, seed=1).abs() + 0.1  # positive: z != 0 everywhere
    z = fn(x)
    c = randn(*z.shape, seed=2)
    (got,) = O.linear_lrp(fn, (x,), z * c)
    # LRP-0 of R = z * c through a linear map is gradient x input of <c, fn(x)>
    (grad,) = torch.func.grad(lambda t: (fn(t) * c).sum(), argnums=(0,))(x)
    torch.testing.assert_close(got, x * grad, rtol=1e-10, atol=1e-12)
    r = randn(*z.shape, seed=3)
    torch.testing.assert_close(O.linear_lrp(fn, (x,), r)[0].sum(), r.sum(), rtol=1e-10, atol=1e-12)
    # epsilon: sum(R_in) = sum(R z / (z + eps sign z))
    eps = O.linear_lrp(fn, (x,), r, epsilon=0.1)[0]
    torch.testing.assert_close(eps.sum(), (r * z / (z + 0.1)).sum(), rtol=1e-10, atol=1e-12)
    x0 = randn(2, 3, 4, 4, seed=4)
    (m,) = O.linear_deeplift(fn, (x,), r)
    assert_delta([(m, x - x0)], r, fn(x) - fn(x0))


# --- attention ---------------------------------------------------------------------------------

def _qkv(seed, heads=2, length=4, source=5, dim=3):
    return (randn(heads, length, dim, seed=seed), randn(heads, source, dim, seed=seed + 1),
            randn(heads, source, dim, seed=seed + 2))


def test_attention_lrp_matrix_form():
    q, k, v = _qkv(1)
    r = randn(2, 4, 3, seed=9)
    scale = 1 / math.sqrt(3)
    rq, rk, rv = O.attention_lrp(q, k, v, r)
    scores = q @ k.transpose(-1, -2) * scale
    s = torch.softmax(scores, -1)
    out = s @ v
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    shares = torch.einsum("hls,hsd,hld->hlsd", s, v, r / out)  # R_ld split over s: s_ls v_sd / out_ld
    torch.testing.assert_close(rv, shares.sum(1) / 2, rtol=1e-10, atol=1e-12)
    r_s = shares.sum(3) / 2
    r_scores = scores * (r_s - s * r_s.sum(-1, keepdim=True))  # AttnLRP's softmax rule
    qk = torch.einsum("hld,hsd,hls->hlsd", q, k, r_scores * scale / scores)
    torch.testing.assert_close(rq, qk.sum(2) / 2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rk, qk.sum(1) / 2, rtol=1e-10, atol=1e-12)


def test_attention_lrp_masked_entries_get_nothing():
    q, k, v = _qkv(1, source=4)
    r = randn(2, 4, 3, seed=9)
    rq, rk, rv = O.attention_lrp(q, k, v, r, is_causal=True)
    assert all(torch.isfinite(t).all() for t in (rq, rk, rv))
    # the first query sees only the first key/value: changing later keys changes nothing for it
    k2 = k.clone()
    k2[:, 1:] += 1
    v2 = v.clone()
    v2[:, 1:] += 1
    r0 = torch.zeros_like(r)
    r0[:, 0] = r[:, 0]
    a = O.attention_lrp(q, k, v, r0, is_causal=True)
    b = O.attention_lrp(q, k2, v2, r0, is_causal=True)
    torch.testing.assert_close(a[0], b[0])
    assert not a[2][:, 1:].any()


@pytest.mark.parametrize("mask", ["none", "causal", "bool", "additive"])
def test_attention_deeplift_sums_to_delta(mask):
    q, k, v = _qkv(1, length=4, source=4)
    q0, k0, v0 = _qkv(11, length=4, source=4)
    m = randn(2, 4, 3, seed=21)
    options = {"none": {}, "causal": {"is_causal": True},
               "bool": {"attn_mask": randn(4, 4, seed=5) > -0.5},
               "additive": {"attn_mask": randn(4, 4, seed=5)}}[mask]
    if mask == "bool":
        options["attn_mask"][:, 0] = True  # every query sees a key
    mq, mk, mv = O.attention_deeplift(q, k, v, q0, k0, v0, m, **options)
    delta = F.scaled_dot_product_attention(q, k, v, **options) - F.scaled_dot_product_attention(q0, k0, v0, **options)
    assert_delta([(mq, q - q0), (mk, k - k0), (mv, v - v0)], m, delta)


def _mha(seed=0):
    torch.manual_seed(seed)
    module = nn.MultiheadAttention(6, 2).double().eval()
    with torch.no_grad():
        module.in_proj_bias.normal_()
        module.out_proj.bias.normal_()
    params = {n: p.detach() for n, p in module.named_parameters()}
    return module, params


def test_multihead_attention_deeplift_sums_to_delta():
    module, params = _mha()
    x, x0, m = randn(4, 2, 6, seed=1), randn(4, 2, 6, seed=2), randn(4, 2, 6, seed=3)
    mq, mk, mv = O.multihead_attention_deeplift(x, x, x, x0, x0, x0, params, 2, m)
    with torch.no_grad():
        delta = module(x, x, x, need_weights=False)[0] - module(x0, x0, x0, need_weights=False)[0]
    assert_delta([(mq + mk + mv, x - x0)], m, delta)


def test_multihead_attention_lrp_is_the_composition_of_its_rules():
    module, params = _mha()
    x, r = randn(4, 2, 6, seed=1), randn(4, 2, 6, seed=3)
    rq, rk, rv = O.multihead_attention_lrp(x, x, x, params, 2, r)
    # by hand: the z rule on the projections in matrix form, attention_lrp per (batch, head)
    w_in, b_in = params["in_proj_weight"], params["in_proj_bias"]
    w_out, b_out = params["out_proj.weight"], params["out_proj.bias"]
    proj = [x @ w.T + b for w, b in zip(w_in.split(6), b_in.split(6))]
    heads = [p.reshape(4, 2, 2, 3).permute(1, 2, 0, 3) for p in proj]
    att = F.scaled_dot_product_attention(*heads).permute(2, 0, 1, 3).reshape(4, 2, 6)
    out = att @ w_out.T + b_out
    with torch.no_grad():
        torch.testing.assert_close(out, module(x, x, x, need_weights=False)[0])
    r_att = att * ((r / out) @ w_out)
    r_heads = O.attention_lrp(*heads, r_att.reshape(4, 2, 2, 3).permute(1, 2, 0, 3))
    for got, w, p, rh in zip((rq, rk, rv), w_in.split(6), proj, r_heads):
        rp = rh.permute(2, 0, 1, 3).reshape(4, 2, 6)
        torch.testing.assert_close(got, x * ((rp / p) @ w), rtol=1e-10, atol=1e-12)


# --- kernel layers, embeddings, routing --------------------------------------------------------

def _dense(layer, params, x):
    """The layer's matrix W (out x in, flattened) and bias vector, by jacrev."""
    jac = torch.func.jacrev(lambda t: layer.forward(t, {**params, "bias": None}))(x)
    z = layer.forward(x, params)
    bias = z - layer.forward(x, {**params, "bias": None})
    return jac.reshape(z.numel(), x.numel()), bias.reshape(-1), z


@pytest.mark.parametrize("dim,groups", [(1, 1), (2, 2), (3, 1)])
def test_conv_transpose_layer_rules_in_matrix_form(dim, groups):
    cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dim]
    torch.manual_seed(0)
    module = cls(4, 6, 3, stride=2, padding=1, output_padding=1, groups=groups).double()
    layer = O.conv_transpose_layer(dim, stride=2, padding=1, output_padding=1, groups=groups)
    params = {"weight": module.weight.detach(), "bias": module.bias.detach()}
    x = randn(1, 4, *(3,) * dim, seed=1)
    torch.testing.assert_close(layer.forward(x, params), module(x).detach())
    w, b, z = _dense(layer, params, x)
    s = randn(*z.shape, seed=2)
    torch.testing.assert_close(layer.transpose(s, params, x).reshape(-1), w.T @ s.reshape(-1))
    r = randn(*z.shape, seed=3)
    xf, rf, zf = x.reshape(-1), r.reshape(-1), z.reshape(-1)
    got = rules.epsilon(0.1).reverse(layer, params, x, z, r).reshape(-1)
    torch.testing.assert_close(got, xf * (w.T @ (rf / (zf + 0.1 * torch.where(zf >= 0, 1.0, -1.0)))))
    # alpha1-beta0 without bias (z+): R_i = sum_j x+_i w+_ji R_j / sum_i' ... in matrix form
    got = rules.alpha_beta(1.0, 0.0, bias=False).reverse(layer, params, x, z, r).reshape(-1)
    xp, xn = xf.clamp(min=0), xf.clamp(max=0)
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    act = wp * xp + wn * xn  # (out, in): positive contributions
    den = act.sum(1)
    want = (act * (rf / torch.where(den == 0, 1e-7, den))[:, None]).sum(0)
    torch.testing.assert_close(got, want)


def test_fold_batch_norm_into_conv_transpose():
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2).double()
    bn = nn.BatchNorm2d(6).double().eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    weight, bias = O.fold_batch_norm_into_conv_transpose(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, groups=2)
    x = randn(2, 4, 5, 5, seed=1)
    torch.testing.assert_close(F.conv_transpose2d(x, weight, bias, stride=2, groups=2), bn(conv(x)).detach())


def test_embedding_reverse_is_the_lookup_transposed_and_conserves():
    table = randn(10, 4, seed=1)
    ids = torch.tensor([[1, 3, 3], [0, 9, 1]])
    r = randn(2, 3, 4, seed=2)
    per_token, per_row = O.embedding_reverse(ids, r, 10)
    (want,) = torch.func.vjp(lambda t: F.embedding(ids, t), table)[1](r)
    torch.testing.assert_close(per_row, want)
    torch.testing.assert_close(per_token, r.sum(-1))
    torch.testing.assert_close(per_row.sum(), r.sum())


def test_channel_shuffle_reverse_is_the_inverse_permutation():
    x, r = randn(2, 6, 3, seed=1), randn(2, 6, 3, seed=2)
    (want,) = torch.func.vjp(lambda t: F.channel_shuffle(t, 3), x)[1](r)
    torch.testing.assert_close(O.channel_shuffle_reverse(r, 3), want)
    torch.testing.assert_close(O.channel_shuffle_reverse(F.channel_shuffle(x, 3), 3), x)


# --- vmap == loop, second-order derivatives, float32 -------------------------------------------

def _cases():
    """(name, fn of tensors, example tensors (one example each))."""
    a, b, c, d, e = (randn(3, 4, seed=i) for i in range(5))
    w, bias = randn(4, seed=6).abs() + 0.5, randn(4, seed=7)
    q, k, v = (randn(2, 3, 2, seed=10 + i) for i in range(3))
    q0, k0, v0 = (randn(2, 3, 2, seed=20 + i) for i in range(3))
    mha_params = _mha()[1]
    conv = O.conv_transpose_layer(2, stride=2)
    cw = randn(2, 3, 2, 2, seed=8)
    return [
        ("product_uniform_lrp", lambda a, b, r: O.product_uniform_lrp(a, b, r), (a, b, c)),
        ("product_gate_lrp", lambda a, b, r: O.product_gate_lrp(a, b, r)[0], (a, b, c)),
        ("product_deeplift", O.product_deeplift, (a, b, c, d, e)),
        ("bilinear_uniform_lrp", lambda a, b, r: O.bilinear_uniform_lrp(torch.matmul, a, b.T, r[:, :3], epsilon=0.01),
         (a, b, c)),
        ("bilinear_deeplift", lambda a, b, a0, b0, m: O.bilinear_deeplift(torch.matmul, a, b.T, a0, b0.T, m[:, :3]),
         (a, b, c, d, e)),
        ("rescale_deeplift", lambda x, x0, m: O.rescale_deeplift(F.silu, x, x0, m), (a, b, c)),
        ("quotient_deeplift", lambda a, b, a0, b0, m: O.quotient_deeplift(a, b.exp(), a0, b0.exp(), m), (a, b, c, d, e)),
        ("softmax_lrp", O.softmax_lrp, (a, b)),
        ("softmax_deeplift", O.softmax_deeplift, (a, b, c)),
        ("layer_norm_lrp", lambda x, r: O.layer_norm_lrp(x, (4,), w, bias, r, epsilon=0.01), (a, b)),
        ("group_norm_lrp", lambda x, r: O.group_norm_lrp(x.T[None], 2, w, bias, r.T[None], epsilon=0.01), (a, b)),
        ("rms_norm_lrp", lambda x, r: O.rms_norm_lrp(x, (4,), w, r, epsilon=0.01), (a, b)),
        ("layer_norm_deeplift", lambda x, x0, m: O.layer_norm_deeplift(x, x0, (4,), w, bias, m), (a, b, c)),
        ("group_norm_deeplift", lambda x, x0, m: O.group_norm_deeplift(x.T[None], x0.T[None], 2, w, bias,
                                                                         m.T[None]),
         (a, b, c)),
        ("rms_norm_deeplift", lambda x, x0, m: O.rms_norm_deeplift(x, x0, (4,), w, m), (a, b, c)),
        ("linear_lrp", lambda x, r: O.linear_lrp(lambda t: F.interpolate(t[None], scale_factor=2, mode="linear")[0],
                                                 (x,), r.repeat_interleave(2, -1), epsilon=0.01), (a, b)),
        ("attention_lrp", lambda q, k, v, r: O.attention_lrp(q, k, v, r, epsilon=0.01), (q, k, v, q0)),
        ("attention_deeplift", O.attention_deeplift, (q, k, v, q0, k0, v0, randn(2, 3, 2, seed=30))),
        ("multihead_attention_lrp", lambda x, r: O.multihead_attention_lrp(x, x, x, mha_params, 2, r, epsilon=0.01),
         (randn(3, 1, 6, seed=31), randn(3, 1, 6, seed=32))),
        ("multihead_attention_deeplift", lambda x, x0, m: O.multihead_attention_deeplift(x, x, x, x0, x0, x0,
                                                                                         mha_params, 2, m),
         (randn(3, 1, 6, seed=31), randn(3, 1, 6, seed=33), randn(3, 1, 6, seed=32))),
        ("conv_transpose_epsilon", lambda x, r: rules.epsilon(0.01).reverse(
            conv, {"weight": cw, "bias": None}, x, conv.forward(x, {"weight": cw, "bias": None}), r),
         (randn(1, 2, 3, 4, seed=34), randn(1, 3, 6, 8, seed=35))),
        ("embedding_reverse", lambda r: O.embedding_reverse(torch.tensor([1, 0, 1]), r, 3), (a,)),
        ("channel_shuffle_reverse", lambda r: O.channel_shuffle_reverse(r[None, :, :, None], 3), (randn(6, 2, seed=3),)),
    ]


CASES = {name: (fn, args) for name, fn, args in _cases()}


def _flat(out):
    return torch.cat([t.reshape(-1) for t in out]) if isinstance(out, tuple) else out.reshape(-1)


@pytest.mark.parametrize("name", list(CASES))
def test_vmap_equals_loop(name):
    fn, args = CASES[name]
    batch = [torch.stack([t + 0.1 * i * randn(*t.shape, seed=40 + i) for i in range(3)]) for t in args]
    vmapped = torch.vmap(fn)(*batch)
    vmapped = vmapped if isinstance(vmapped, tuple) else (vmapped,)
    for i in range(3):
        looped = fn(*[t[i] for t in batch])
        looped = looped if isinstance(looped, tuple) else (looped,)
        for got, want in zip(vmapped, looped):
            torch.testing.assert_close(got[i], want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_second_order_derivatives(name):
    fn, args = CASES[name]
    inputs = tuple(t.clone().requires_grad_(True) for t in args)
    v = randn(_flat(fn(*args)).numel(), seed=99)

    def loss(*ts):
        return (_flat(fn(*ts)) * v).sum()
    assert torch.autograd.gradcheck(loss, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(loss, inputs, fast_mode=True)


@pytest.mark.parametrize("name", list(CASES))
def test_float32_agrees_with_float64(name):
    fn, args = CASES[name]
    if name.startswith(("multihead", "conv_transpose")):  # float64 parameters captured: cast them
        pytest.skip("parameters of the case are float64")
    got = _flat(fn(*[t.float() for t in args]))
    want = _flat(fn(*args))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-4)


# --- errors ------------------------------------------------------------------------------------

def test_errors_name_the_argument():
    x = randn(2, 4)
    with pytest.raises(FxattrError, match="epsilon must be a finite number >= 0, got nan"):
        O.linear_lrp(lambda t: t.sum(-1), (x,), x.sum(-1), epsilon=float("nan"))
    with pytest.raises(FxattrError, match="rule must be 'epsilon' .* got 'flat'"):
        O.layer_norm_lrp(x, (4,), None, None, x, rule="flat")
    with pytest.raises(FxattrError, match="groups must divide the 4 channels, got 3"):
        O.channel_shuffle_reverse(x[:, :, None].expand(2, 4, 2), 3)
    with pytest.raises(FxattrError, match="dim must be 1, 2 or 3"):
        O.conv_transpose_layer(4)
    with pytest.raises(FxattrError, match=r"query must be \(length, batch, embed_dim\)"):
        O.multihead_attention_lrp(x, x, x, _mha()[1], 2, x)


# --- the reference implementations: lxt (AttnLRP's authors) and zennit ------------------------

def _lxt_relevance(fn, inputs, relevance):
    """lxt's explicit rules: relevance arrives in ``.grad`` of the inputs after a backward of R."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, relevance, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


def test_agrees_with_lxt():
    lxt = pytest.importorskip("lxt.explicit.functional")
    x, r = randn(3, 6, seed=1), randn(3, 6, seed=2)
    w, b = randn(6, seed=3).abs() + 0.5, randn(6, seed=4)
    # LayerNorm: identity on 1/std, epsilon on the centring (lxt's stabiliser y + eps, eps = 0 here)
    (want,) = _lxt_relevance(lambda t: lxt.layer_norm_grad_fn.apply(t, w, b, 1e-5, 0.0), (x,), r)
    torch.testing.assert_close(O.layer_norm_lrp(x, (6,), w, b, r, eps=1e-5), want, rtol=1e-10, atol=1e-12)
    (want,) = _lxt_relevance(lambda t: lxt.rms_norm_identity_fn.apply(t, w, 1e-6), (x,), r)
    torch.testing.assert_close(O.rms_norm_lrp(x, (6,), w, r), want, rtol=1e-10, atol=1e-12)
    (want,) = _lxt_relevance(lambda t: lxt.softmax_fn.apply(t, -1), (x,), r)
    torch.testing.assert_close(O.softmax_lrp(x, r), want, rtol=1e-10, atol=1e-12)
    a, c = randn(2, 3, 4, seed=5), randn(2, 4, 5, seed=6)
    rz = randn(2, 3, 5, seed=7)
    want = _lxt_relevance(lambda p, q: lxt.matmul_fn.apply(p, q, False, 0.0), (a, c), rz)
    for got, ref in zip(O.bilinear_uniform_lrp(torch.matmul, a, c, rz), want):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    want = _lxt_relevance(lambda p, q: lxt.mul2_fn.apply(p, q), (x, randn(3, 6, seed=8)), r)
    for got, ref in zip(O.product_uniform_lrp(x, randn(3, 6, seed=8), r), want):
        torch.testing.assert_close(got, ref)
    xp = x.abs() + 0.1
    (want,) = _lxt_relevance(lambda t: lxt.mean_fn.apply(t, -1, True, 0.0), (xp,), r[:, :1])
    torch.testing.assert_close(O.linear_lrp(lambda t: t.mean(-1, keepdim=True), (xp,), r[:, :1])[0], want,
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rule", ["epsilon", "gamma", "alpha_beta"])
def test_conv_transpose_agrees_with_zennit(rule):
    zennit_rules = pytest.importorskip("zennit.rules")
    from importlib.metadata import version
    if rule == "gamma" and tuple(int(p) for p in version("zennit").split(".")[:2]) < (0, 5):
        pytest.skip("zennit < 0.5 (zennit-crp pins it): its Gamma is not the generalised gamma fxattr follows")
    torch.manual_seed(0)
    module = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1).double()
    x = randn(2, 3, 4, 4, seed=1)
    if rule != "epsilon":
        x = x.abs()  # zennit's gamma and alpha-beta as the positive-input rules
    peer, ours = {"epsilon": (zennit_rules.Epsilon(1e-6), rules.epsilon(1e-6)),
                  "gamma": (zennit_rules.Gamma(0.25), rules.gamma(0.25)),
                  "alpha_beta": (zennit_rules.AlphaBeta(2.0, 1.0), rules.alpha_beta(2.0, 1.0, bias="split", stabiliser=1e-6))}[rule]
    layer = O.conv_transpose_layer(2, stride=2, padding=1, output_padding=1,
                                   nonnegative_input=rule != "epsilon")
    params = {"weight": module.weight.detach(), "bias": module.bias.detach()}
    z = layer.forward(x, params)
    r = randn(*z.shape, seed=2)
    handles = peer.register(module)  # zennit's hooks, on this test's own module
    try:
        leaf = x.clone().requires_grad_(True)
        (want,) = torch.autograd.grad(module(leaf), leaf, r)
    finally:
        handles.remove()
    torch.testing.assert_close(ours.reverse(layer, params, x, z, r), want, rtol=1e-9, atol=1e-11)


def test_quotient_rules():
    a, b = randn(3, 4, seed=1), randn(3, 1, seed=2).abs() + 0.5
    a0, b0 = randn(3, 4, seed=3), randn(3, 1, seed=4).abs() + 0.5
    m = randn(3, 4, seed=5)
    ma, mb = O.quotient_deeplift(a, b, a0, b0, m)
    assert mb.shape == b.shape
    assert_delta([(ma, a - a0), (mb, b - b0)], m, a / b - a0 / b0)
    ra, rb = O.quotient_lrp(a, b, m)
    torch.testing.assert_close(ra, m)
    assert not rb.any()


def test_grouped_query_attention():
    q = randn(4, 3, 2, seed=1)
    k, v = randn(2, 3, 2, seed=2), randn(2, 3, 2, seed=3)
    q0, k0, v0 = randn(4, 3, 2, seed=4), randn(2, 3, 2, seed=5), randn(2, 3, 2, seed=6)
    m = randn(4, 3, 2, seed=7)
    mq, mk, mv = O.attention_deeplift(q, k, v, q0, k0, v0, m, enable_gqa=True, is_causal=True)
    assert mk.shape == k.shape and mv.shape == v.shape
    delta = (F.scaled_dot_product_attention(q, k, v, enable_gqa=True, is_causal=True)
             - F.scaled_dot_product_attention(q0, k0, v0, enable_gqa=True, is_causal=True))
    assert_delta([(mq, q - q0), (mk, k - k0), (mv, v - v0)], m, delta)
    # LRP: the repeated heads' relevance summed back per key/value head
    rep = [t.repeat_interleave(2, dim=0) for t in (k, v)]
    full = O.attention_lrp(q, *rep, m)
    grouped = O.attention_lrp(q, k, v, m, enable_gqa=True)
    torch.testing.assert_close(grouped[0], full[0])
    torch.testing.assert_close(grouped[1], full[1].reshape(2, 2, 3, 2).sum(1))
    torch.testing.assert_close(grouped[2], full[2].reshape(2, 2, 3, 2).sum(1))


# --- the catalogue's reverses, on node views -----------------------------------------------------

class View:
    """A node view as the engine builds it: ``call(*args, **kwargs)`` with the data arguments at
    ``data`` positions (distinct tensors), at x and at the reference."""

    def __init__(self, call, args, kwargs, data, reference_args=None):
        self.args, self.kwargs = tuple(args), dict(kwargs)
        self.inputs = [args[i] for i in data]
        self.output = call(*args, **kwargs)

        def fn(*values):
            full = list(args)
            for i, v in zip(data, values):
                full[i] = v
            return call(*full, **kwargs)
        self.fn = fn
        self.reference_inputs = None if reference_args is None else [reference_args[i] for i in data]
        self.reference_output = None if reference_args is None else call(*reference_args, **kwargs)


def _delta_through(view, reverse, m):
    ms = reverse(view, m)
    pairs = list(zip(ms, [x - x0 for x, x0 in zip(view.inputs, view.reference_inputs)]))
    out = view.output[0] if isinstance(view.output, tuple) else view.output
    ref = view.reference_output[0] if isinstance(view.reference_output, tuple) else view.reference_output
    assert_delta(pairs, m, out - ref)


def test_catalogue_reverses_sum_to_delta():
    x, x0 = randn(1, 4, 6, seed=1), randn(1, 4, 6, seed=2)
    g, g0 = torch.sigmoid(randn(1, 4, 1, seed=3)), torch.sigmoid(randn(1, 4, 1, seed=4))
    w, b = randn(6, seed=5), randn(6, seed=6)
    m = randn(1, 4, 6, seed=7)
    cases = [
        (O.bilinear_deeplift_reverse, View(torch.mul, (x, g), {}, (0, 1), (x0, g0))),
        (O.product_deeplift_reverse, View(torch.mul, (x, g), {}, (0, 1), (x0, g0))),
        (O.product_deeplift_reverse, View(lambda t: t * t, (x,), {}, (0,), (x0,))),
        (O.bilinear_deeplift_reverse, View(lambda t: t * t, (x,), {}, (0,), (x0,))),  # x * x: one distinct input
        (O.quotient_deeplift_reverse, View(torch.div, (x, g), {}, (0, 1), (x0, g0))),
        (O.elementwise_deeplift_reverse, View(lambda t: torch.rsqrt(t.square() + 1), (x,), {}, (0,), (x0,))),
        (O.softmax_deeplift_reverse, View(torch.softmax, (x, -1), {}, (0,), (x0, -1))),
        (O.layer_norm_deeplift_reverse, View(F.layer_norm, (x, (6,), w, b), {"eps": 1e-5}, (0,), (x0, (6,), w, b))),
        (O.group_norm_deeplift_reverse, View(F.group_norm, (x, 2, w[:4], b[:4]), {}, (0,), (x0, 2, w[:4], b[:4]))),
        (O.rms_norm_deeplift_reverse, View(F.rms_norm, (x, (6,), w), {"eps": 1e-6}, (0,), (x0, (6,), w))),
        (O.linear_deeplift_reverse, View(lambda t: F.interpolate(t, scale_factor=2, mode="linear"), (x,), {}, (0,),
                                         (x0,))),
    ]
    for reverse, view in cases:
        signal = m if view.output.shape == m.shape else randn(*view.output.shape, seed=8)
        _delta_through(view, reverse, signal)
    q, q0 = randn(1, 2, 4, 3, seed=9), randn(1, 2, 4, 3, seed=10)
    kv, kv0 = randn(1, 2, 5, 3, seed=11), randn(1, 2, 5, 3, seed=12)
    view = View(F.scaled_dot_product_attention, (q, kv, kv), {"is_causal": False}, (0, 1), (q0, kv0, kv0))
    _delta_through(view, O.sdpa_deeplift_reverse, randn(1, 2, 4, 3, seed=13))
    module, params = _mha()
    s, s0 = randn(4, 1, 6, seed=14), randn(4, 1, 6, seed=15)
    mha_args = lambda t: (t, t, t, 6, 2, params["in_proj_weight"], params["in_proj_bias"], None, None, False,  # noqa: E731
                          0.0, params["out_proj.weight"], params["out_proj.bias"], False)
    view = View(F.multi_head_attention_forward, mha_args(s), {"need_weights": False}, (0,), mha_args(s0))
    ms = O.mha_deeplift_reverse(view, (randn(4, 1, 6, seed=16), None))
    assert_delta([(ms[0], s - s0)], randn(4, 1, 6, seed=16), view.output[0] - view.reference_output[0])


def test_catalogue_lrp_reverses_are_the_rules():
    x, r = randn(1, 4, 6, seed=1), randn(1, 4, 6, seed=2)
    g = torch.sigmoid(randn(1, 4, 1, seed=3))
    w, b = randn(6, seed=5), randn(6, seed=6)
    view = View(torch.mul, (x, g), {}, (0, 1))
    ra, rg = O.product_lrp_reverse(view, r, gates=(False, True))
    torch.testing.assert_close(ra, r)
    assert not rg.any()
    ra, rg = O.product_lrp_reverse(view, r)
    torch.testing.assert_close(ra.sum() + rg.sum(), r.sum())
    torch.testing.assert_close(ra, r / 2)
    (got,) = O.layer_norm_lrp_reverse(View(F.layer_norm, (x, (6,), w, b, 1e-5), {}, (0,)), r)
    torch.testing.assert_close(got, O.layer_norm_lrp(x, (6,), w, b, r))
    (got,) = O.softmax_lrp_reverse(View(F.softmax, (x,), {"dim": 1}, (0,)), r)
    torch.testing.assert_close(got, O.softmax_lrp(x, r, 1))
    q = randn(1, 2, 4, 3, seed=9)
    rq = randn(1, 2, 4, 3, seed=10)
    (got,) = O.sdpa_lrp_reverse(View(F.scaled_dot_product_attention, (q, q, q), {}, (0,)), rq)
    torch.testing.assert_close(got, sum(O.attention_lrp(q, q, q, rq)))
    with pytest.raises(FxattrError, match="dropout_p=0.1"):
        O.sdpa_lrp_reverse(View(F.scaled_dot_product_attention, (q, q, q), {"dropout_p": 0.1}, (0,)), rq)
    with pytest.raises(FxattrError, match="softmax without dim"):
        O.softmax_lrp_reverse(View(lambda t, dim=None: torch.softmax(t, -1), (x,), {}, (0,)), r)


# --- wired into the engine: the explainers on models made of these operations -----------------

import fxattr  # noqa: E402
from tests.contract import assert_second_order, assert_vmap_equals_loop, model_unchanged  # noqa: E402


class _TransposeNet(nn.Module):
    """ConvTranspose2d + BatchNorm (folded), ReLU, bilinear upsampling, a mean: piecewise linear."""

    def __init__(self, bias=True):
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1, groups=1, bias=bias)
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 6, 3, padding=1, bias=bias)
        self.head = nn.Linear(6, 5, bias=bias)

    def forward(self, x):
        h = torch.relu(self.bn(self.up(x)))
        h = F.interpolate(torch.relu(self.conv(h)), scale_factor=2, mode="bilinear", align_corners=False)
        return self.head(h.mean(dim=(2, 3)))


def _transpose_net(bias=True):
    torch.manual_seed(0)
    model = _TransposeNet(bias).double()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(0.5, 1.5)
        if bias:
            model.bn.running_mean.normal_()
            model.bn.bias.normal_()
    return model.eval()


def test_conv_transpose_and_interpolation_lrp_zero_is_gradient_times_input():
    model = _transpose_net(bias=False)  # no shifts: positively homogeneous
    f, params = fxattr.functionalize(model)
    xs, t = randn(2, 3, 5, 5, seed=1), torch.tensor([1, 3])
    with model_unchanged(model):
        got = torch.vmap(fxattr.lrp(f, rule="z"), in_dims=(None, 0, 0))(params, xs, t)
    want = torch.vmap(fxattr.input_x_gradient(f), in_dims=(None, 0, 0))(params, xs, t)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_conv_transpose_batch_norm_is_folded():
    model = _transpose_net()
    merged = _transpose_net()
    with torch.no_grad():
        bn = model.bn
        weight, bias = O.fold_batch_norm_into_conv_transpose(model.up.weight, model.up.bias, bn.running_mean,
                                                             bn.running_var, bn.weight, bn.bias, bn.eps)
        merged.up.weight.copy_(weight)
        merged.up.bias.copy_(bias)
        merged.bn = nn.Identity()
    xs, t = randn(2, 3, 5, 5, seed=1), torch.tensor([1, 3])
    torch.testing.assert_close(merged(xs), model(xs))
    for name in ("epsilon", "alpha_1_beta_0"):
        got = [torch.vmap(fxattr.lrp(g, rule=name), in_dims=(None, 0, 0))(p, xs, t)
               for g, p in (fxattr.functionalize(model), fxattr.functionalize(merged))]
        torch.testing.assert_close(got[0], got[1], rtol=1e-9, atol=1e-12)


class _Block(nn.Module):
    """Today's operations in one block: LayerNorm, self-attention (nn.MultiheadAttention),
    GELU, a SiLU-gated product (SwiGLU), a squeeze-excitation gate (sigmoid), GroupNorm, RMSNorm,
    softmax pooling, matmul of data, a division of data."""

    def __init__(self, dim=6):
        super().__init__()
        self.embed = nn.Linear(3, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm2 = nn.RMSNorm(dim, eps=1e-6)
        self.up, self.gate = nn.Linear(dim, 8), nn.Linear(dim, 8)
        self.down = nn.Linear(8, dim)
        self.group = nn.GroupNorm(2, dim)
        self.squeeze = nn.Linear(dim, dim)
        self.score = nn.Linear(dim, 1)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):  # x: (batch, tokens, 3)
        h = self.embed(x)
        a = self.norm1(h)
        h = h + self.attention(a, a, a, need_weights=False)[0]
        m = self.norm2(h)
        h = h + self.down(F.silu(self.gate(m)) * self.up(m))
        h = F.gelu(self.group(h.transpose(1, 2))).transpose(1, 2)
        h = h * torch.sigmoid(self.squeeze(h.mean(1, keepdim=True)))
        weights = torch.softmax(self.score(h), dim=1)
        pooled = (weights.transpose(1, 2) @ h).squeeze(1)
        pooled = pooled / (pooled.abs().sum(-1, keepdim=True) + 1.0)
        return self.head(pooled)


def _block():
    torch.manual_seed(0)
    model = _Block().double().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
                module.weight.uniform_(0.5, 1.5)
                if getattr(module, "bias", None) is not None:
                    module.bias.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("method", ["lrp_epsilon", "lrp_epsilon_plus", "deep_taylor", "guided_backprop",
                                    "deconvnet", "deeplift", "deeplift_shap"])
def test_block_runs_every_method_under_vmap(method):
    model = _block()
    f, params = fxattr.functionalize(model)
    xs = randn(3, 5, 3, seed=1)
    with torch.no_grad():
        out = model(xs)
    t = out.argmax(-1)
    explain = {"lrp_epsilon": lambda: fxattr.lrp(f, rule="epsilon"),
               "lrp_epsilon_plus": lambda: fxattr.lrp(f, composite="epsilon_plus"),
               "deep_taylor": lambda: fxattr.deep_taylor(f),
               "guided_backprop": lambda: fxattr.guided_backprop(f),
               "deconvnet": lambda: fxattr.deconvnet(f),
               "deeplift": lambda: fxattr.deeplift(f, baseline=0.0),
               "deeplift_shap": lambda: fxattr.deeplift_shap(f, baselines=randn(2, 5, 3, seed=2))}[method]()
    with model_unchanged(model):
        got = assert_vmap_equals_loop(explain, params, xs, t, rtol=1e-9, atol=1e-12)
    assert torch.isfinite(got).all()
    # DeepTaylor explains max(output, 0): zero where the output is negative
    live = out[torch.arange(3), t] > 0 if method == "deep_taylor" else torch.ones(3, dtype=torch.bool)
    assert live.any() and (got.flatten(1).abs().amax(1) > 0)[live].all()
    if method == "deeplift":
        with torch.no_grad():
            delta = model(xs)[torch.arange(3), t] - model(torch.zeros_like(xs))[torch.arange(3), t]
        torch.testing.assert_close(got.flatten(1).sum(1), delta, rtol=1e-10, atol=1e-12)
    if method == "deeplift_shap":
        with torch.no_grad():
            base = model(randn(2, 5, 3, seed=2))[:, t].mean(0)
            delta = model(xs)[torch.arange(3), t] - base
        torch.testing.assert_close(got.flatten(1).sum(1), delta, rtol=1e-10, atol=1e-12)


def test_block_deeplift_and_lrp_second_order():
    model = _block()
    f, params = fxattr.functionalize(model)
    x = randn(5, 3, seed=1)
    names = ["norm1.weight", "attention.in_proj_weight"]
    # torch's nn.MultiheadAttention fast path (taken under torch.func, whose wrapped tensors do not
    # report requires_grad) has no derivative: off for this test, as for any torch.func use of it
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        assert_second_order(fxattr.deeplift(f, baseline=0.0), params, x, 2, param_names=names)
        assert_second_order(fxattr.lrp(f, rule="epsilon"), params, x, 2, param_names=names)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)


@pytest.mark.parametrize("gate", ["function", "module", "hardsigmoid_module"])
def test_squeeze_excitation_gate_takes_no_relevance(gate):
    """The sigmoid gate of x * sigmoid(s) is a constant for LRP (whether the sigmoid is a function
    or a module, as torchvision's SqueezeExcitation has it): on a bias-free ReLU signal path, LRP-z
    equals gradient x input of the signal path with the gate's value held fixed."""

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.gate, self.head = nn.Linear(4, 6, bias=False), nn.Linear(4, 6), nn.Linear(6, 3, bias=False)
            self.act = {"function": torch.sigmoid, "module": nn.Sigmoid(), "hardsigmoid_module": nn.Hardsigmoid()}[gate]

        def forward(self, x):
            return self.head(self.act(self.gate(x)) * torch.relu(self.fc(x)))

    torch.manual_seed(0)
    model = Gated().double().eval()
    f, params = fxattr.functionalize(model)
    xs, t = randn(3, 4, seed=1), torch.tensor([0, 1, 2])
    got = torch.vmap(fxattr.lrp(f, rule="z"), in_dims=(None, 0, 0))(params, xs, t)
    gate = model.act(model.gate(xs)).detach()

    def signal_path(xi, gi, ti):
        return model.head(torch.relu(model.fc(xi)) * gi)[ti]
    want = torch.stack([torch.func.grad(signal_path)(xi, gi, ti) * xi for xi, gi, ti in zip(xs, gate, t)])
    torch.testing.assert_close(got, want.detach())


class _Mini(nn.Module):
    """LayerNorm, GELU, a sigmoid gate, softmax pooling, a matmul of data: the new kinds, small."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm = nn.Linear(3, 6), nn.LayerNorm(6)
        self.gate, self.score, self.head = nn.Linear(6, 6), nn.Linear(6, 1), nn.Linear(6, 4)

    def forward(self, x):  # (batch, tokens, 3)
        h = F.gelu(self.norm(self.embed(x)))
        h = h * torch.sigmoid(self.gate(h))
        weights = torch.softmax(self.score(h), dim=1)
        return self.head((weights.transpose(1, 2) @ h).squeeze(1))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lrp", "deeplift"])
def test_compile_equals_eager(method):
    from tests.contract import assert_compile_equals_eager

    torch.manual_seed(0)
    model = _Mini().eval()
    f, params = fxattr.functionalize(model)
    xs, t = torch.randn(2, 5, 3), torch.tensor([1, 3])
    explain = fxattr.lrp(f, rule="epsilon") if method == "lrp" else fxattr.deeplift(f, baseline=0.0)
    assert_compile_equals_eager(explain, params, xs, t)
