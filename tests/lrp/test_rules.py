"""Every LRP rule against its matrix form, written out here, on Linear and Conv1d/2d/3d layers.

A layer is a matrix ``W`` (outputs x inputs, over flattened tensors; for a convolution the Jacobian
of the bias-free convolution) and a bias vector ``b`` (the layer at input 0). The relevance of the
outputs is a random vector: the explained "output" is the callable target ``sum(c * out)``, so
fxattr seeds ``R = out * c``. float64, to 1e-10.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxattr
from fxattr.lrp import Composite, rules

torch_dtype = torch.float64


# ---- the matrix forms ---------------------------------------------------------------------------

def safe(z, eps=1e-7):
    return torch.where(z == 0, torch.full_like(z, eps), z)


def signed(z, eps):
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z)


def ref_z(W, b, M, x, R, bias=True):
    z = W @ x + (b if bias else 0)
    return x * (W.T @ (R / safe(z)))


def ref_epsilon(W, b, M, x, R, eps, bias=True):
    z = W @ x + (b if bias else 0)
    return x * (W.T @ (R / signed(z, eps)))


def ref_alpha_beta(W, b, M, x, R, alpha, beta, bias, stab=safe):
    xp, xn, Wp, Wn = x.clamp(min=0), x.clamp(max=0), W.clamp(min=0), W.clamp(max=0)
    if bias is True:
        ba, bi = b, b
    elif bias == "split":
        ba, bi = b.clamp(min=0), b.clamp(max=0)
    else:
        ba = bi = torch.zeros_like(b)
    sa = R / stab(Wp @ xp + Wn @ xn + ba)
    si = R / stab(Wn @ xp + Wp @ xn + bi)
    return alpha * (xp * (Wp.T @ sa) + xn * (Wn.T @ sa)) - beta * (xp * (Wn.T @ si) + xn * (Wp.T @ si))


def ref_gamma(W, b, M, x, R, gamma, eps=1e-6):
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    Wu, Wd = W + gamma * W.clamp(min=0), W + gamma * W.clamp(max=0)
    bu, bd = b + gamma * b.clamp(min=0), b + gamma * b.clamp(max=0)
    out = W @ x + b
    sp = (out > 0).to(x) * R / signed(Wu @ xp + Wd @ xn + bu, eps)
    sn = (out < 0).to(x) * R / signed(Wd @ xp + Wu @ xn + bd, eps)
    return xp * (Wu.T @ sp) + xn * (Wd.T @ sp) + xp * (Wd.T @ sn) + xn * (Wu.T @ sn)


def ref_z_plus_fast(W, b, M, x, R):
    Wp = W.clamp(min=0)
    return x * (Wp.T @ (R / safe(Wp @ x)))


def ref_w_square(W, b, M, x, R, bias=False):
    W2 = W * W
    return W2.T @ (R / safe(W2 @ torch.ones_like(x) + (b * b if bias else 0)))


def ref_flat(W, b, M, x, R):
    return M.T @ (R / safe(M @ torch.ones_like(x)))


def ref_zb(W, b, M, x, R, low, high):
    Wp, Wn = W.clamp(min=0), W.clamp(max=0)
    lo, hi = torch.full_like(x, low), torch.full_like(x, high)
    s = R / safe(W @ x - Wp @ lo - Wn @ hi)
    return x * (W.T @ s) - lo * (Wp.T @ s) - hi * (Wn.T @ s)


# (fxattr rule, matrix-form reference)
CASES = {
    "z": (rules.z(), ref_z),
    "z_IB": (rules.z(bias=False), lambda *a: ref_z(*a, bias=False)),
    "epsilon": (rules.epsilon(0.3), lambda *a: ref_epsilon(*a, 0.3)),
    "epsilon_IB": (rules.epsilon(0.3, bias=False), lambda *a: ref_epsilon(*a, 0.3, bias=False)),
    "norm": (rules.norm(), lambda *a: ref_epsilon(*a, 1e-6)),
    "gamma": (rules.gamma(0.25), lambda *a: ref_gamma(*a, 0.25)),
    "gamma_1": (rules.gamma(1.0), lambda *a: ref_gamma(*a, 1.0)),
    "alpha_2_beta_1": (rules.alpha_beta(2, 1), lambda *a: ref_alpha_beta(*a, 2, 1, True)),
    "alpha_2_beta_1_IB": (rules.alpha_beta(2, 1, bias=False), lambda *a: ref_alpha_beta(*a, 2, 1, False)),
    "alpha_2_beta_1_split": (rules.alpha_beta(2, 1, bias="split", stabiliser=1e-6),
                             lambda *a: ref_alpha_beta(*a, 2, 1, "split", lambda z: signed(z, 1e-6))),
    "alpha_3_beta_2": (rules.alpha_beta(3, 2), lambda *a: ref_alpha_beta(*a, 3, 2, True)),
    "alpha_1_beta_0": (rules.alpha_beta(1, 0), lambda *a: ref_alpha_beta(*a, 1, 0, True)),
    "z_plus": (rules.z_plus(), lambda *a: ref_alpha_beta(*a, 1, 0, False)),
    "z_plus_split": (rules.z_plus(bias="split", stabiliser=1e-6),
                     lambda *a: ref_alpha_beta(*a, 1, 0, "split", lambda z: signed(z, 1e-6))),
    "z_plus_fast": (rules.z_plus_fast(), ref_z_plus_fast),
    "w_square": (rules.w_square(), ref_w_square),
    "w_square_bias": (rules.w_square(bias=True), lambda *a: ref_w_square(*a, bias=True)),
    "flat": (rules.flat(), ref_flat),
    "zb": (rules.zb(-1.5, 2.0), lambda *a: ref_zb(*a, -1.5, 2.0)),
}

# rules that use the layer unmodified (only its transpose): they also check the vjp fallback of
# convolutions whose input-gradient fxattr does not compute directly (reflect padding)
UNMODIFIED = ("z", "z_IB", "epsilon", "epsilon_IB", "norm")

LAYERS = {
    "linear": (lambda bias: nn.Linear(7, 5, bias=bias), (7,)),
    "conv1d": (lambda bias: nn.Conv1d(3, 4, 3, dilation=2, bias=bias), (3, 9)),
    "conv2d": (lambda bias: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=bias), (4, 5, 5)),
    "conv2d_reflect": (lambda bias: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect", bias=bias), (2, 4, 4)),
    "conv3d": (lambda bias: nn.Conv3d(2, 3, 2, bias=bias), (2, 3, 3, 3)),
}


def _layer(kind, bias, seed=0):
    torch.manual_seed(seed)
    build, shape = LAYERS[kind]
    layer = build(bias).to(torch_dtype).eval()
    if bias:
        with torch.no_grad():
            layer.bias.normal_()
    return layer, shape


def matrices(layer, shape):
    """``(W, b, M)`` of a linear layer on flattened inputs: ``layer(x) = W x + b``; ``M`` is the
    layer with every weight 1 and no bias (the flat rule's structure)."""
    n = int(torch.tensor(shape).prod())

    def flat_fn(weight, bias):
        def fn(v):
            p = {"weight": weight} | ({"bias": bias} if bias is not None else {})
            return torch.func.functional_call(layer, p, (v.reshape(1, *shape),)).reshape(-1)
        return fn

    zero = torch.zeros(n, dtype=torch_dtype)
    weight = layer.weight.detach()
    bias = None if layer.bias is None else torch.zeros_like(layer.bias)
    W = torch.func.jacrev(flat_fn(weight, bias))(zero)
    M = torch.func.jacrev(flat_fn(torch.ones_like(weight), bias))(zero)
    b = layer(zero.reshape(1, *shape)).detach().reshape(-1)
    return W, b, M


# reflection makes one matrix entry the sum of several kernel taps, so kernel-level modifications
# (W+, W^2, ...) are not the entry-wise ones of the matrix form: reflect only with UNMODIFIED rules
COMBINATIONS = [(name, kind) for name in CASES for kind in LAYERS
                if kind != "conv2d_reflect" or name in UNMODIFIED]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("name,kind", COMBINATIONS)
def test_rule_matches_matrix_form(name, kind, bias):
    rule, reference = CASES[name]
    layer, shape = _layer(kind, bias)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen, dtype=torch_dtype)
    f, params = fxattr.functionalize(nn.Sequential(layer))
    out = f(params, x)
    c = torch.randn(out.shape, generator=gen, dtype=torch_dtype)
    explain = fxattr.lrp(f, composite=Composite(kinds={"conv": rule, "linear": rule}))
    got = explain(params, x, lambda o: (o * c).sum())
    W, b, M = matrices(layer, shape)
    want = reference(W, b, M, x.reshape(-1), (out * c).reshape(-1)).reshape(shape)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_conventions_are_not_vacuous():
    """On these layers the variants the table tells apart really differ."""
    layer, shape = _layer("conv2d", True)
    W, b, M = matrices(layer, shape)
    x = torch.randn(W.shape[1], dtype=torch_dtype)
    R = torch.randn(W.shape[0], dtype=torch_dtype)
    pairs = [("z", "z_IB"), ("alpha_2_beta_1", "alpha_2_beta_1_IB"), ("alpha_2_beta_1", "alpha_2_beta_1_split"),
             ("z_plus", "z_plus_fast"), ("w_square", "w_square_bias"), ("epsilon", "z")]
    for a, c in pairs:
        ra, rc = CASES[a][1](W, b, M, x, R), CASES[c][1](W, b, M, x, R)
        assert (ra - rc).abs().max() > 1e-3 * ra.abs().max(), (a, c)


def test_rule_by_hand():
    """One neuron, z = 2*1 + (-1)*2 + 0.5 = 0.5, R = z (seeded with its value).

    z rule: R_x = x * w * R / z = (2, -2); epsilon 0.5: (2, -2) * 0.5 / 1.0 = (1, -1);
    z_plus (no bias): (2, 0) * 0.5 / 2 = (0.5, 0); w_square: w^2 / 5 * 0.5 = (0.4, 0.1);
    flat: (0.25, 0.25).
    """
    lin = nn.Linear(2, 1).to(torch_dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0, -1.0]]))
        lin.bias.fill_(0.5)
    f, params = fxattr.functionalize(nn.Sequential(lin))
    x = torch.tensor([1.0, 2.0], dtype=torch_dtype)
    expected = {"z": [2.0, -2.0], "z_plus": [0.5, 0.0], "w_square": [0.4, 0.1], "flat": [0.25, 0.25]}
    for rule, want in expected.items():
        torch.testing.assert_close(fxattr.lrp(f, rule=rule)(params, x, 0),
                                   torch.tensor(want, dtype=torch_dtype), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fxattr.lrp(f, rule="epsilon", epsilon=0.5)(params, x, 0),
                               torch.tensor([1.0, -1.0], dtype=torch_dtype), rtol=1e-12, atol=1e-12)


# ---- conservation -------------------------------------------------------------------------------

def _relu_cnn(bias: bool):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=bias), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1, bias=bias), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(8 * 2 * 2, 10, bias=bias), nn.ReLU(), nn.Linear(10, 4, bias=bias),
    ).to(torch_dtype).eval()
    return model


@pytest.mark.parametrize("rule", ["z", "epsilon"])
def test_z_and_small_epsilon_on_bias_free_relu_net_equal_gradient_times_input(rule):
    model = _relu_cnn(bias=False)
    f, params = fxattr.functionalize(model)
    xs = torch.randn(4, 3, 8, 8, dtype=torch_dtype)
    targets = torch.tensor([0, 1, 2, 3])
    options = {"epsilon": 1e-12} if rule == "epsilon" else {}
    got = torch.vmap(fxattr.lrp(f, rule=rule, **options), in_dims=(None, 0, 0))(params, xs, targets)
    want = torch.vmap(fxattr.input_x_gradient(f), in_dims=(None, 0, 0))(params, xs, targets)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("rule,options", [
    ("z_plus", {}), ("alpha_1_beta_0", {}), ("alpha_2_beta_1", {}), ("alpha_beta", {"alpha": 3}),
    ("z", {}),
])
def test_conservation_with_zero_biases(rule, options):
    """Relevance sums to the explained output's value at every layer (here: at the input) when
    the biases are zero; ReLU inputs are >= 0 after the first layer, so z+ and alpha-beta keep
    every denominator away from zero."""
    model = _relu_cnn(bias=False)
    f, params = fxattr.functionalize(model)
    x = torch.rand(3, 8, 8, dtype=torch_dtype) + 0.1
    out = f(params, x)
    target = int(out.argmax())
    got = fxattr.lrp(f, rule=rule, **options)(params, x, target)
    torch.testing.assert_close(got.sum(), out[target], rtol=1e-10, atol=1e-12)


def test_biases_absorb_relevance():
    """With biases, z is not conservative: the sum misses exactly the biases' share."""
    model = _relu_cnn(bias=True)
    f, params = fxattr.functionalize(model)
    x = torch.rand(3, 8, 8, dtype=torch_dtype)
    out = f(params, x)
    got = fxattr.lrp(f, rule="z")(params, x, 0)
    assert abs(float(got.sum() - out[0])) > 1e-6
