"""Every LRP rule against its matrix form, written out here, on Linear and Conv1d/2d/3d layers.

A layer is a matrix ``W`` (outputs x inputs, over flattened tensors; for a convolution the Jacobian
of the bias-free convolution) and a bias vector ``b`` (the layer at input 0). The relevance of the
outputs is a random vector: the explained "output" is the callable target ``sum(c * out)``, so
fxattr seeds ``R = out * c``. float64, to 1e-10.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxattr
from fxattr.propagation import Composite, rules

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


def _layer(kind, bias, seed=0, table=None):
    torch.manual_seed(seed)
    build, shape = (LAYERS if table is None else table)[kind]
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


# ---- layers behind a ReLU (``nonnegative_input``): the rules' x >= 0 branches -------------------

from torch.nn import functional as F  # noqa: E402

from fxattr.propagation._engine import Plan, conv_layer, functional_kernel_layer, linear_layer  # noqa: E402


NONNEG_LAYERS = {
    "linear": (lambda bias: nn.Linear(7, 5, bias=bias), (7,)),
    "conv1d": (lambda bias: nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2, bias=bias), (3, 11)),
    "conv2d": (lambda bias: nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1),
                                      bias=bias), (3, 6, 5)),
    "conv2d_groups": (lambda bias: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=bias), (4, 5, 5)),
    # padding beyond the kernel: windows that lie wholly in the padding (flat's denominator is 0)
    "conv2d_wide_pad": (lambda bias: nn.Conv2d(2, 3, 2, padding=2, bias=bias), (2, 3, 3)),
    "conv3d": (lambda bias: nn.Conv3d(2, 3, 2, stride=(1, 2, 1), bias=bias), (2, 3, 4, 3)),
}


def _nonneg_layer(kind, bias, seed=0):
    return _layer(kind, bias, seed, table=NONNEG_LAYERS)


# z_plus_fast and zb are not defined by what they do to x+ / x-: the same on either branch
NONNEG_COMBINATIONS = [(name, kind) for name in CASES for kind in NONNEG_LAYERS]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("name,kind", NONNEG_COMBINATIONS)
def test_rule_matches_matrix_form_behind_relu(name, kind, bias):
    """``ReLU -> layer``: the layer's input is marked ``>= 0`` (with exact zeros), so the rules
    take their ``nonnegative_input`` branch (alpha-beta's inhibitor from ``out``, flat's one-channel
    sums, ...); the ReLU passes relevance on unchanged, so the reference is the rule at relu(x)."""
    rule, reference = CASES[name]
    layer, shape = _nonneg_layer(kind, bias)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen, dtype=torch_dtype)
    f, params = fxattr.functionalize(nn.Sequential(nn.ReLU(), layer))
    plan = Plan(f, "lrp", Composite(kinds={"conv": rule, "linear": rule}))
    kernels = [s.layer for s in plan.steps if s.kind == "kernel"]
    assert len(kernels) == 1 and kernels[0].nonnegative_input
    assert kernels[0].groups == (2 if kind == "conv2d_groups" else 1)
    out = f(params, x)
    c = torch.randn(out.shape, generator=gen, dtype=torch_dtype)
    explain = fxattr.lrp(f, composite=Composite(kinds={"conv": rule, "linear": rule}))
    got = explain(params, x, lambda o: (o * c).sum())
    W, b, M = matrices(layer, shape)
    want = reference(W, b, M, x.clamp(min=0).reshape(-1), (out * c).reshape(-1)).reshape(shape)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def _module_layer(module, nonnegative, groups="keep"):
    layer = linear_layer(nonnegative) if isinstance(module, nn.Linear) else conv_layer(module, nonnegative)
    return layer if groups == "keep" else layer._replace(groups=groups)


def _params(module):
    return {"weight": module.weight.detach(), "bias": None if module.bias is None else module.bias.detach()}


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "conv2d_wide_pad", "conv3d"])
@pytest.mark.parametrize("stabiliser", [None, 1e-6])
def test_flat_one_channel_sums_equal_the_full_layer(kind, stabiliser):
    """The flat rule's one-channel path (groups == 1) against its general formula (a full layer
    pass with all-ones weights, taken when ``groups`` is unknown), batched, to 1e-12."""
    module, shape = _nonneg_layer(kind, True)
    assert _module_layer(module, False).groups == 1
    got = _assert_fused_equals_general(module, shape, rules.flat(stabiliser=stabiliser), seed=3)
    assert got.is_contiguous()


def _old_alpha_beta(layer, params, x, out, relevance, a, bt, bias, stabilise):
    """alpha-beta with a layer pass per pre-activation (the formula before the inhibitor came from
    ``out``): the precision baseline."""
    weight, b = params["weight"], params["bias"]
    pp, pn = {"weight": weight.clamp(min=0), "bias": None}, {"weight": weight.clamp(max=0), "bias": None}
    if b is None or bias is False:
        b_act = b_inh = 0
    elif bias == "split":
        b_act, b_inh = layer.bias(b.clamp(min=0), out), layer.bias(b.clamp(max=0), out)
    else:
        b_act = b_inh = layer.bias(b, out)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    s_act = a * relevance / stabilise(layer.forward(xp, pp) + layer.forward(xn, pn) + b_act)
    s_inh = bt * relevance / stabilise(layer.forward(xp, pn) + layer.forward(xn, pp) + b_inh)
    return (xp * (layer.transpose(s_act, pp, x) - layer.transpose(s_inh, pn, x))
            + xn * (layer.transpose(s_act, pn, x) - layer.transpose(s_inh, pp, x)))


@pytest.mark.parametrize("nonnegative", [True, False], ids=["relu_input", "signed_input"])
@pytest.mark.parametrize("bias", [True, False, "split"], ids=["bias", "IB", "split"])
def test_alpha_beta_inhibitor_from_output_is_precise_in_float32(bias, nonnegative):
    """The inhibitor's pre-activation ``out - z_act (- b)`` cancels (bias False and "split"; with
    the whole bias in both denominators it keeps its own layer pass): in float64 it equals the
    formula with a separate pass, and on random conv layers with ReLU-like inputs (half zeros)
    its float32 error against float64 stays at that formula's level."""
    torch.manual_seed(0)
    module = nn.Conv2d(16, 24, 3, padding=1).double()
    with torch.no_grad():
        module.bias.normal_(0, 0.5)
    rule = rules.alpha_beta(2, 1, bias=bias, stabiliser=1e-6)
    x64 = torch.randn(2, 1, 16, 12, 12, dtype=torch.float64)
    if nonnegative:
        x64 = x64.clamp(min=0)
    r64 = torch.randn(2, 1, 24, 12, 12, dtype=torch.float64)
    copies = {dtype: copy.deepcopy(module).to(dtype) for dtype in (torch.float64, torch.float32)}
    errors = {}
    for name in ("new", "old"):
        results = {}
        for dtype, m in copies.items():
            layer, params = _module_layer(m, nonnegative), _params(m)
            x, r = x64.to(dtype), r64.to(dtype)

            def one(x, r):
                out = layer.forward(x, params)
                if name == "new":
                    return rule.reverse(layer, params, x, out, r)
                return _old_alpha_beta(layer, params, x, out, r, 2.0, 1.0, bias, rule.stabilise)
            results[dtype] = torch.vmap(one)(x, r)
        errors[name] = float((results[torch.float32].double() - results[torch.float64]).abs().max()
                             / results[torch.float64].abs().max())
        if name == "new":
            new64 = results[torch.float64]
        else:
            torch.testing.assert_close(new64, results[torch.float64], rtol=1e-10, atol=1e-12)
    if bias is not True:  # with b in both, z_act and z_inh cross 0: float32 is ill-conditioned
        assert errors["new"] < 2e-6 and errors["new"] < 1.5 * errors["old"] + 1e-7, errors


@pytest.mark.parametrize("nonnegative", [True, False], ids=["relu_input", "signed_input"])
@pytest.mark.parametrize("rule", [rules.alpha_beta(2, 1), rules.alpha_beta(2, 1, bias=False),
                                  rules.alpha_beta(3, 2, bias="split", stabiliser=1e-6), rules.z_plus(),
                                  rules.gamma(0.25), rules.flat(), rules.w_square(bias=True),
                                  rules.zb(-1.5, 2.0)],
                         ids=repr)
def test_rule_second_order_exact(rule, nonnegative):
    """gradgradcheck of a conv layer's rule w.r.t. its input and weight (float64): the
    algebraic shortcuts (inhibitor from ``out``, one-channel flat sums) keep derivatives exact."""
    torch.manual_seed(0)
    module = nn.Conv2d(2, 3, 2, stride=2, padding=1).double()
    layer = _module_layer(module, nonnegative)
    # inputs away from 0 (x+/x- and the stabilisers' kinks) and denominators away from 0
    x = (torch.rand(1, 2, 4, 4, dtype=torch.float64) + 0.5) * (1 if nonnegative else torch.tensor(
        [1.0, -1.0], dtype=torch.float64).repeat(8)[:16].reshape(1, 1, 4, 4))
    weight = module.weight.detach().clone().requires_grad_()
    bias = module.bias.detach().clone()
    r = torch.randn(1, 3, 3, 3, dtype=torch.float64, requires_grad=True)

    def fn(x, weight, r):
        params = {"weight": weight, "bias": bias}
        return rule.reverse(layer, params, x, layer.forward(x, params), r)

    inputs = (x.requires_grad_(), weight, r)
    torch.autograd.gradcheck(fn, inputs)
    torch.autograd.gradgradcheck(fn, inputs)


def test_stabilisers_values_and_derivative():
    """``signed``: ``sign(0) = +1`` for +0 and -0; ``safe``: only exact zeros move; both have
    derivative 1 (the shift does not depend on z) and batch under vmap without a fallback."""
    z = torch.tensor([-2.0, -0.0, 0.0, 3.0, 1e-30], dtype=torch_dtype)
    eps = 0.5
    torch.testing.assert_close(rules.signed(eps)(z), torch.tensor([-2.5, 0.5, 0.5, 3.5, 0.5 + 1e-30],
                                                                   dtype=torch_dtype), rtol=0, atol=0)
    torch.testing.assert_close(rules.safe(eps)(z), torch.tensor([-2.0, 0.5, 0.5, 3.0, 1e-30],
                                                                 dtype=torch_dtype), rtol=0, atol=0)
    for stabilise in (rules.signed(eps), rules.safe(eps)):
        assert torch.equal(torch.func.grad(lambda t: stabilise(t).sum())(z), torch.ones_like(z))
        hess = torch.func.hessian(lambda t: stabilise(t).sum())(z)
        assert torch.equal(hess, torch.zeros_like(hess))
        torch._C._functorch._set_vmap_fallback_enabled(False)
        try:
            torch.testing.assert_close(torch.vmap(stabilise)(z[:, None]), stabilise(z)[:, None])
        finally:
            torch._C._functorch._set_vmap_fallback_enabled(True)
    # float32 keeps float32's epsilon
    assert rules.signed(1e-7)(torch.zeros(1)).dtype == torch.float32


def test_functional_conv_layer_knows_its_groups():
    """``F.conv*`` layers read ``groups`` from the call (positional or keyword); only a plain
    int 1 enables the one-channel shortcuts."""
    cases = [((1, 0, 1, 2), {}, 2), ((1, 0, 1), {"groups": 1}, 1), ((1, 0), {}, 1), ((), {}, 1)]
    for rest, kwargs, groups in cases:
        assert functional_kernel_layer("conv", F.conv2d, rest, kwargs, True).groups == groups
    assert functional_kernel_layer("linear", F.linear, (), {}, False).groups == 1


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "conv3d"])
@pytest.mark.parametrize("rule", [rules.alpha_beta(2, 1), rules.alpha_beta(2, 1, bias=False),
                                  rules.alpha_beta(2, 1, bias="split", stabiliser=1e-6), rules.z_plus(),
                                  rules.gamma(0.25)], ids=repr)
def test_signed_input_concatenated_pass_equals_separate_passes(rule, kind):
    """On a signed input, groups == 1 layers run ``[x+; x-]`` through ``[W+, W-]`` (one layer call
    on twice the channels); the separate passes (taken when ``groups`` is unknown) agree to 1e-12."""
    module, shape = _nonneg_layer(kind, True)
    _assert_fused_equals_general(module, shape, rule, seed=5)


def _assert_fused_equals_general(module, shape, rule, seed):
    """``rule`` on the layer with ``groups`` known (fused passes) == with it unknown (separate)."""
    fused, general = _module_layer(module, False), _module_layer(module, False, groups=None)
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn((3, 1) + shape, generator=gen, dtype=torch_dtype)
    outs = torch.vmap(lambda x: fused.forward(x, _params(module)))(xs)
    rs = torch.randn(outs.shape, generator=gen, dtype=torch_dtype)

    def run(layer):
        return torch.vmap(lambda x, o, r: rule.reverse(layer, _params(module), x, o, r))(xs, outs, rs)

    got, want = run(fused), run(general)
    assert got.shape == xs.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))
    return got


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "conv3d"])
def test_zb_concatenated_pass_equals_separate_passes(kind):
    """z^B with groups == 1: the bounds' pass on ``[l; h]`` and one transpose with ``[W, W+, W-]``
    agree with the separate passes (``groups`` unknown) to 1e-12, with per-channel bounds."""
    module, shape = _nonneg_layer(kind, True)
    low = -torch.rand(shape[:1] + (1,) * (len(shape) - 1), dtype=torch_dtype) - 0.5
    _assert_fused_equals_general(module, shape, rules.zb(low, 2.0), seed=6)


@pytest.mark.parametrize("nonnegative", [True, False], ids=["relu_input", "signed_input"])
@pytest.mark.parametrize("g", [0.25, 1.0])
def test_gamma_denominators_from_output_are_precise_in_float32(g, nonnegative):
    """gamma's two denominators come from ``out`` and one pass ``a = W+ x+ + W- x- + b+``
    (``out + g a`` where out > 0, ``out + g (out - a)`` where out < 0: same-signed sums), so float32
    stays at float32's level against float64 on a random conv layer with signed biases."""
    torch.manual_seed(0)
    module = nn.Conv2d(16, 24, 3, padding=1).double()
    with torch.no_grad():
        module.bias.normal_(0, 0.5)
    x64 = torch.randn(2, 1, 16, 12, 12, dtype=torch.float64)
    if nonnegative:
        x64 = x64.clamp(min=0)
    r64 = torch.randn(2, 1, 24, 12, 12, dtype=torch.float64)
    rule, results = rules.gamma(g), {}
    for dtype in (torch.float64, torch.float32):
        m = copy.deepcopy(module).to(dtype)
        layer, params = _module_layer(m, nonnegative), _params(m)
        results[dtype] = torch.vmap(lambda x, r: rule.reverse(layer, params, x, layer.forward(x, params), r))(
            x64.to(dtype), r64.to(dtype))
    want = results[torch.float64]
    error = float((results[torch.float32].double() - want).abs().max() / want.abs().max())
    assert error < 2e-6, error
