"""zennit's options and extra rules in fxattr: Gamma with ``zero_params``, the stabiliser's ``clip`` /
``norm_scale`` (``zennit.core.Stabilizer``), ``ReLUBetaSmooth`` with its ``BetaSmooth`` composite
(``fxattr.beta_smooth``), the ``ExcitationBackprop`` preset, and user-defined canonizers.

Each is checked three ways: against its matrix form on a tiny dense / convolution layer in float64
(zennit's own tests/test_rules.py method), against zennit 0.5.1 with the same rule or composite on
a small CNN and on torchvision's resnet18 (random biases, batch-norm statistics calibrated on data)
in float64, and through the contract (vmap == loop, second order against finite differences,
compile == eager, the model untouched, clear errors).

Conventions matched: LRP composites are seeded with ``one_hot(target) * output`` (fxattr's LRP
seeds with the value), gradient-type ones with ``one_hot(target)``; zennit canonizes a deep copy
(SequentialMergeBatchNorm / ResNetCanonizer), fxattr folds batch norm itself.
"""

from __future__ import annotations

import copy
import functools
import math
import types

import pytest
import torch
from torch import nn

import fxattr
from fxattr.errors import FxattrError
from fxattr.propagation import Composite, rules
from tests.contract import assert_compile_equals_eager, assert_second_order, assert_vmap_equals_loop, model_unchanged

torchvision = pytest.importorskip("torchvision")
zennit = pytest.importorskip("zennit")

from zennit.attribution import Gradient  # noqa: E402
from zennit.canonizers import SequentialMergeBatchNorm  # noqa: E402
from zennit.composites import (BetaSmooth, EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlus,  # noqa: E402
                               ExcitationBackprop)
from zennit.core import Stabilizer  # noqa: E402
from zennit.torchvision import ResNetCanonizer  # noqa: E402

F64 = torch.float64
LOW, HIGH = -4.0, 4.0


# ---- matrix forms ----------------------------------------------------------------------------------

def sign(z):
    return torch.where(z >= 0, 1.0, -1.0).to(z)


def ref_stabiliser(z, eps, clip=False, norm_scale=False):
    """zennit's Stabilizer over the flattened output of ONE example."""
    e = eps * (z * z).mean().sqrt() if norm_scale else eps
    return sign(z) * torch.clamp(z.abs(), min=e) if clip else z + sign(z) * e


def ref_gamma(W, b, x, R, gamma, stab, zero_bias=False):
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    Wu, Wd = W + gamma * W.clamp(min=0), W + gamma * W.clamp(max=0)
    bu, bd = b + gamma * b.clamp(min=0), b + gamma * b.clamp(max=0)
    if zero_bias:
        bu, bd = torch.zeros_like(b), torch.zeros_like(b)
    out = W @ x + b  # the branch of each output: the sign of the true output
    sp = (out > 0).to(x) * R / stab(Wu @ xp + Wd @ xn + bu)
    sn = (out < 0).to(x) * R / stab(Wd @ xp + Wu @ xn + bd)
    return xp * (Wu.T @ sp) + xn * (Wd.T @ sp) + xp * (Wd.T @ sn) + xn * (Wu.T @ sn)


def ref_epsilon(W, b, x, R, stab):
    return x * (W.T @ (R / stab(W @ x + b)))


def ref_z_plus_split(W, b, x, R, stab):
    xp, xn, Wp, Wn = x.clamp(min=0), x.clamp(max=0), W.clamp(min=0), W.clamp(max=0)
    s = R / stab(Wp @ xp + Wn @ xn + b.clamp(min=0))
    return xp * (Wp.T @ s) + xn * (Wn.T @ s)


LAYERS = {
    "linear": (lambda: nn.Linear(7, 5), (7,)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, dilation=2), (3, 9)),
    "conv2d_groups": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (4, 5, 5)),
}


def matrices(layer, shape):
    """``(W, b)`` with ``layer(x) = W x + b`` on flattened inputs."""
    n = math.prod(shape)
    zero = torch.zeros(n, dtype=F64)

    def fn(v):
        return layer(v.reshape(1, *shape)).reshape(-1)
    W = torch.func.jacrev(fn)(zero).detach()
    return W, fn(zero).detach()


STAB_OPTIONS = {"shift": {}, "clip": {"clip": True}, "norm_scale": {"norm_scale": True},
                "clip_norm_scale": {"clip": True, "norm_scale": True}}


def _matrix_cases():
    cases = {}
    for label, opts in STAB_OPTIONS.items():
        eps = 0.5 if opts.get("clip") else 0.05  # clip level above some |z|: the clip is active

        def stab(z, eps=eps, opts=opts):
            return ref_stabiliser(z, eps, **opts)
        st = rules.stabiliser(eps, **opts)
        cases[f"epsilon_{label}"] = (rules.epsilon(st), lambda W, b, x, R, stab=stab: ref_epsilon(W, b, x, R, stab))
        cases[f"gamma_{label}"] = (rules.gamma(0.25, stabiliser=st),
                                   lambda W, b, x, R, stab=stab: ref_gamma(W, b, x, R, 0.25, stab))
        cases[f"z_plus_{label}"] = (rules.z_plus(bias="split", stabiliser=st),
                                    lambda W, b, x, R, stab=stab: ref_z_plus_split(W, b, x, R, stab))
    stab6 = functools.partial(ref_stabiliser, eps=1e-6)
    cases["gamma_zero_params"] = (rules.gamma(0.25, zero_params="bias"),
                                  lambda W, b, x, R: ref_gamma(W, b, x, R, 0.25, stab6, zero_bias=True))
    cases["gamma_1_zero_params"] = (rules.gamma(1.0, zero_params=["bias"]),
                                    lambda W, b, x, R: ref_gamma(W, b, x, R, 1.0, stab6, zero_bias=True))
    return cases


MATRIX_CASES = _matrix_cases()


def _layer(kind, seed=0):
    torch.manual_seed(seed)
    build, shape = LAYERS[kind]
    layer = build().to(F64).eval()
    with torch.no_grad():
        layer.bias.normal_()
    return layer, shape


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("name", list(MATRIX_CASES))
def test_rule_matches_matrix_form(name, kind):
    rule, reference = MATRIX_CASES[name]
    layer, shape = _layer(kind)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen, dtype=F64)
    f, params = fxattr.functionalize(nn.Sequential(layer))
    out = f(params, x)
    c = torch.randn(out.shape, generator=gen, dtype=F64)
    got = fxattr.lrp(f, composite=Composite(kinds={"conv": rule, "linear": rule}))(
        params, x, lambda o: (o * c).sum())
    W, b = matrices(layer, shape)
    want = reference(W, b, x.reshape(-1), (out * c).reshape(-1)).reshape(shape)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_options_are_not_vacuous():
    """On these layers the options change the result (so the matrix-form tests can fail)."""
    layer, shape = _layer("conv2d_groups")
    W, b = matrices(layer, shape)
    gen = torch.Generator().manual_seed(1)
    x, R = torch.randn(W.shape[1], generator=gen, dtype=F64), torch.randn(W.shape[0], generator=gen, dtype=F64)
    z = W @ x + b
    assert (z.abs() < 0.5).any()  # the 0.5 clip level is reached
    plain = ref_gamma(W, b, x, R, 0.25, lambda t: ref_stabiliser(t, 1e-6))
    differs = [ref_gamma(W, b, x, R, 0.25, lambda t: ref_stabiliser(t, 1e-6), zero_bias=True),
               ref_gamma(W, b, x, R, 0.25, lambda t: ref_stabiliser(t, 0.5, clip=True)),
               ref_gamma(W, b, x, R, 0.25, lambda t: ref_stabiliser(t, 0.05, norm_scale=True))]
    for other in differs:
        assert (other - plain).abs().max() > 1e-3 * plain.abs().max()
    clipped = ref_stabiliser(z, 0.5, clip=True)
    assert torch.equal(clipped[z.abs() >= 0.5], z[z.abs() >= 0.5])  # only small |z| move


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_norm_scale_in_half_precision(dtype):
    """The mean square of a float16 output overflows z * z beyond |z| = 256; the stabiliser takes it in
    float32 (an infinite epsilon would zero every relevance)."""
    z = torch.tensor([[300.0, -2000.0, 0.0, 1.0, 4.0]])
    want = ref_stabiliser(z.double(), 0.1, norm_scale=True)
    for opts in ({"norm_scale": True}, {"norm_scale": True, "clip": True}):
        got = rules.stabiliser(0.1, **opts)(z.to(dtype))
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), ref_stabiliser(z.double(), 0.1, **opts), rtol=1e-2, atol=0)
    assert float(want[0, 2]) > 50  # not vacuous: epsilon is large here (z * z alone would be inf)


# ---- zennit on a small CNN and resnet18 (float64) -----------------------------------------------------

def randomize(model, seed, calibrate_shape):
    """Random biases, batch-norm statistics calibrated on random data (a train-mode pass with
    cumulative averages), random affine batch-norm parameters; eps = 0 because zennit's merge
    leaves the batch norm as x / sqrt(1 + eps), not the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(0.2 * torch.randn(bias.shape, generator=gen))
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = None
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
        model.train()
        model(torch.randn(8, *calibrate_shape, generator=gen, dtype=F64))
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eps = 0.0
    return model.eval()


def small_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.BatchNorm2d(6),  # after a ReLU: not merged (Pass in zennit's LRP composites, gradient in ExcitationBackprop)
        nn.Conv2d(6, 8, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(32, 6), nn.Tanh(),  # a non-ReLU activation: ExcitationBackprop takes its gradient
        nn.Linear(6, 4)).to(F64)
    return randomize(model, 1, (3, 12, 12))


@functools.lru_cache(maxsize=1)
def resnet18():
    torch.manual_seed(0)
    return randomize(torchvision.models.resnet18(num_classes=5).to(F64), 2, (3, 16, 16))


MODELS = {"small_cnn": (small_cnn, (3, 12, 12), SequentialMergeBatchNorm),
          "resnet18": (resnet18, (3, 16, 16), ResNetCanonizer)}
# resnet18 (float64) for the preset and one case of each option; every case on the small CNN
RESNET_CASES = ("excitation_backprop", "gamma_box_zero_bias", "epsilon_plus_norm_scale")


@pytest.fixture(scope="module", autouse=True)
def _free():
    yield
    resnet18.cache_clear()


def zstab(**opts):
    return Stabilizer(0.3 if opts else 1e-6, **opts)


def fstab(**opts):
    return rules.stabiliser(0.3 if opts else 1e-6, **opts)


# name -> (zennit composite(canonizers), fxattr lrp options, seed)
CASES = {
    "excitation_backprop": (lambda c: ExcitationBackprop(canonizers=c), {"composite": "excitation_backprop"}),
    "excitation_backprop_zero_bias": (lambda c: ExcitationBackprop(zero_params="bias", canonizers=c),
                                      {"composite": "excitation_backprop", "zero_params": "bias"}),
    "gamma_box_zero_bias": (lambda c: EpsilonGammaBox(low=LOW, high=HIGH, zero_params="bias", canonizers=c),
                            {"composite": "epsilon_gamma_box", "low": LOW, "high": HIGH, "zero_params": "bias"}),
    "alpha2_beta1_zero_bias": (lambda c: EpsilonAlpha2Beta1(zero_params="bias", canonizers=c),
                               {"composite": "epsilon_alpha2_beta1", "zero_params": "bias"}),
    "gamma_box_clip": (lambda c: EpsilonGammaBox(low=LOW, high=HIGH, stabilizer=zstab(clip=True), canonizers=c),
                       {"composite": "epsilon_gamma_box", "low": LOW, "high": HIGH,
                        "stabiliser": fstab(clip=True)}),
    "epsilon_plus_norm_scale": (
        lambda c: EpsilonPlus(stabilizer=zstab(norm_scale=True), epsilon=zstab(norm_scale=True, clip=True),
                              canonizers=c),
        {"composite": "epsilon_plus", "stabiliser": fstab(norm_scale=True),
         "epsilon": fstab(norm_scale=True, clip=True)}),
    "epsilon_plus_norm_scale_channels": (
        lambda c: EpsilonPlus(stabilizer=Stabilizer(0.3, norm_scale=True, dim=(1,)), canonizers=c),
        {"composite": "epsilon_plus", "stabiliser": rules.stabiliser(0.3, norm_scale=True, dim=(1,))}),
}


def _inputs(model_name):
    build, shape, canonizer = MODELS[model_name]
    model = build()
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    with torch.no_grad():
        out = model(x)
    targets = out.argmax(1)
    one_hot = torch.zeros_like(out).scatter(1, targets[:, None], 1.0)
    return model, x, out, targets, one_hot, canonizer


def zennit_attribution(model, composite, x, seed):
    with Gradient(model=copy.deepcopy(model), composite=composite) as attributor:
        return attributor(x, seed)[1]


@pytest.mark.parametrize("case,model_name", [(c, "small_cnn") for c in CASES] + [
    pytest.param(c, "resnet18", marks=pytest.mark.slow) for c in RESNET_CASES])
def test_lrp_options_equal_zennit(case, model_name):
    model, x, out, targets, one_hot, canonizer = _inputs(model_name)
    build, options = CASES[case]
    want = zennit_attribution(model, build([canonizer()]), x, one_hot * out)
    f, params = fxattr.functionalize(model)
    with model_unchanged(model):
        got = torch.vmap(fxattr.lrp(f, **options), in_dims=(None, 0, 0))(params, x, targets)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11 * float(want.abs().max()))


def test_zennit_options_change_the_result():
    """The option cases differ from the plain composites on the small CNN (not vacuous); the
    excitation preset's gradient through Tanh differs from passing relevance through it."""
    model, x, out, targets, one_hot, canonizer = _inputs("small_cnn")
    f, params = fxattr.functionalize(model)

    def run(**options):
        return torch.vmap(fxattr.lrp(f, **options), in_dims=(None, 0, 0))(params, x, targets)

    pairs = [({"composite": "epsilon_gamma_box", "low": LOW, "high": HIGH, "zero_params": "bias"},
              {"composite": "epsilon_gamma_box", "low": LOW, "high": HIGH}),
             ({"composite": "epsilon_plus", "stabiliser": fstab(norm_scale=True)}, {"composite": "epsilon_plus"}),
             ({"composite": "epsilon_gamma_box", "low": LOW, "high": HIGH, "stabiliser": fstab(clip=True)},
              {"composite": "epsilon_gamma_box", "low": LOW, "high": HIGH}),
             ({"composite": "excitation_backprop"}, {"composite": "excitation_backprop", "zero_params": "bias"})]
    for a, b in pairs:
        ra, rb = run(**a), run(**b)
        assert (ra - rb).abs().max() > 1e-4 * ra.abs().max(), (a, b)
    passing = fxattr.lrp.Composite(
        kinds={"conv": rules.z_plus(bias="split", stabiliser=1e-6), "linear": rules.z_plus(bias="split", stabiliser=1e-6),
               "add": rules.norm(), "avgpool": rules.norm(), "batchnorm": rules.gradient()})
    ra, rb = run(composite="excitation_backprop"), run(composite=passing)
    assert (ra - rb).abs().max() > 1e-4 * ra.abs().max()


def _out_of_place(model):
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return model


def _separate_relus(model):
    """The zennit twin of a torchvision ResNet with one out-of-place ReLU module per call: zennit's
    ReLUBetaSmooth keeps the input of a module's LAST call, so a BasicBlock's shared ``relu``
    would be smoothed at the block output for both of its calls, and it keeps the input tensor an
    in-place ReLU then overwrites with its output (sigmoid(beta * relu(x)) instead of
    sigmoid(beta * x))."""
    def forward(block, x):
        identity = x if block.downsample is None else block.downsample(x)
        out = block.relu(block.bn1(block.conv1(x)))
        return block.relu_out(block.bn2(block.conv2(out)) + identity)
    for block in model.modules():
        if isinstance(block, torchvision.models.resnet.BasicBlock):
            block.relu_out = nn.ReLU()
            block.forward = types.MethodType(forward, block)
    return _out_of_place(model)


@pytest.mark.parametrize("model_name,seed", [("small_cnn", "one"), ("small_cnn", "value"),
                                             pytest.param("resnet18", "one", marks=pytest.mark.slow)])
def test_beta_smooth_equals_zennit(model_name, seed):
    model, x, out, targets, one_hot, _ = _inputs(model_name)
    twin = _separate_relus(copy.deepcopy(model))
    zseed = one_hot if seed == "one" else one_hot * out
    want = zennit_attribution(twin, BetaSmooth(beta_smooth=3.0), x, zseed)
    f, params = fxattr.functionalize(model)
    with model_unchanged(model):
        got = torch.vmap(fxattr.beta_smooth(f, beta=3.0, seed=seed), in_dims=(None, 0, 0))(params, x, targets)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11 * float(want.abs().max()))
    grad = torch.vmap(fxattr.gradient(f), in_dims=(None, 0, 0))(params, x, targets)
    if seed == "one":  # not the plain gradient
        assert (got - grad).abs().max() > 1e-3 * grad.abs().max()
    if model_name == "resnet18" and seed == "one":
        # zennit on twins with the shared BasicBlock.relu, or with in-place ReLUs, is off: the
        # deviations documented in fxattr.beta_smooth
        shared = zennit_attribution(_out_of_place(copy.deepcopy(model)), BetaSmooth(beta_smooth=3.0), x, zseed)
        assert (shared - want).abs().max() > 1e-3 * want.abs().max()
        inplace = _separate_relus(copy.deepcopy(model))
        for module in inplace.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = True
        assert (zennit_attribution(inplace, BetaSmooth(beta_smooth=3.0), x, zseed) - want).abs().max() \
            > 1e-3 * want.abs().max()


class _FunctionalReLUs(nn.Module):
    """ReLUs as F.relu, torch.relu and x.relu() (zennit's BetaSmooth hooks nn.ReLU modules only)."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        a, b, c, d = self.layers
        hidden = nn.functional.relu(b(a(x).relu())).flatten(1)
        return d(torch.relu(c(hidden)))


def test_beta_smooth_smooths_functional_relus():
    """fxattr smooths F.relu / torch.relu / x.relu() too: equal to zennit on the same network written
    with nn.ReLU modules."""
    torch.manual_seed(3)
    a, b, c, d = nn.Conv2d(2, 3, 3), nn.Conv2d(3, 3, 3), nn.Linear(12, 5), nn.Linear(5, 2)
    functional = _FunctionalReLUs(nn.ModuleList([a, b, c, d])).to(F64).eval()
    modules = nn.Sequential(a, nn.ReLU(), b, nn.ReLU(), nn.Flatten(), c, nn.ReLU(), d).to(F64).eval()
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(4), dtype=F64)
    f, params = fxattr.functionalize(functional)
    targets = torch.tensor([0, 1, 1])
    got = torch.vmap(fxattr.beta_smooth(f, beta=2.0), in_dims=(None, 0, 0))(params, x, targets)
    with torch.no_grad():
        out = modules(x)
    want = zennit_attribution(modules, BetaSmooth(beta_smooth=2.0), x,
                              torch.zeros_like(out).scatter(1, targets[:, None], 1.0))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    grad = torch.vmap(fxattr.gradient(f), in_dims=(None, 0, 0))(params, x, targets)
    assert (got - grad).abs().max() > 1e-3 * grad.abs().max()


def test_relu_beta_smooth_rule_in_an_lrp_composite():
    """The rule as an LRP composite's activation reverse == zennit's layer map with ReLUBetaSmooth on
    ReLUs (Pass on the other activations)."""
    from zennit.composites import LayerMapComposite
    from zennit.rules import Epsilon, Pass, ReLUBetaSmooth, ZPlus
    from zennit.rules import Norm
    from zennit.types import Activation, AvgPool, BatchNorm, Convolution

    model, x, out, targets, one_hot, _ = _inputs("small_cnn")
    composite = LayerMapComposite([(nn.ReLU, ReLUBetaSmooth(beta_smooth=2.0)), (Activation, Pass()),
                                   (AvgPool, Norm()), (BatchNorm, Pass()),
                                   (Convolution, ZPlus()), (nn.Linear, Epsilon())],
                                  canonizers=[SequentialMergeBatchNorm()])
    want = zennit_attribution(model, composite, x, one_hot * out)
    mine = Composite(kinds={"conv": rules.z_plus(bias="split", stabiliser=1e-6), "linear": rules.epsilon(1e-6),
                            "avgpool": rules.norm(), "batchnorm": rules.pass_()},
                     operations={"activation": rules.relu_beta_smooth(2.0)})
    f, params = fxattr.functionalize(model)
    got = torch.vmap(fxattr.lrp(f, composite=mine), in_dims=(None, 0, 0))(params, x, targets)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11 * float(want.abs().max()))


# ---- the contract ------------------------------------------------------------------------------------

def tiny():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(12, 3), nn.ReLU(), nn.Linear(3, 2)).to(F64).eval()
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.normal_(0, 0.2)
    return model


EXPLAINERS = {
    "beta_smooth": lambda f: fxattr.beta_smooth(f, beta=5.0),
    "excitation_backprop": lambda f: fxattr.lrp(f, composite="excitation_backprop"),
    "gamma_zero_params": lambda f: fxattr.lrp(f, rule="gamma", zero_params="bias"),
    "stabiliser_clip_norm_scale": lambda f: fxattr.lrp(
        f, composite="epsilon_gamma_box", low=-3.0, high=3.0,
        stabiliser=rules.stabiliser(0.1, clip=True, norm_scale=True)),
    "canonizers": lambda f: fxattr.lrp(f, composite="epsilon_plus", canonizers=[
        fxattr.lrp.merge_batch_norm(), fxattr.lrp.replace_modules(nn.ReLU, torch.relu)]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(EXPLAINERS))
def test_vmap_equals_loop(name, dtype):
    model = tiny().to(dtype)
    f, params = fxattr.functionalize(model)
    xs = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64).to(dtype)
    with model_unchanged(model):
        got = assert_vmap_equals_loop(EXPLAINERS[name](f), params, xs, torch.tensor([0, 1, 0]),
                                      rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)
    assert torch.isfinite(got).all() and got.abs().max() > 0


@pytest.mark.parametrize("name", list(EXPLAINERS))
def test_second_order(name):
    """Derivatives of the explanation w.r.t. the input and the parameters match finite differences
    (gradgradcheck too for the smooth surrogate: its second derivative through ReLUs is not zero)."""
    model = tiny()
    f, params = fxattr.functionalize(model)
    x = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert_second_order(EXPLAINERS[name](f), params, x, 1, param_names=["0.weight", "5.bias"],
                        gradgrad=name == "beta_smooth")


def test_beta_smooth_second_derivative_is_not_zero():
    """Through ReLUs the gradient's derivative w.r.t. x is zero (piecewise linear network); the
    smoothed one's is not: the point of the surrogate."""
    model = tiny()
    f, params = fxattr.functionalize(model)
    x = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    v = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    for explain, nonzero in ((fxattr.gradient(f), False), (fxattr.beta_smooth(f, beta=5.0), True)):
        hv = torch.func.grad(lambda x_: (explain(params, x_, 1) * v).sum())(x)
        assert (hv.abs().max() > 1e-6) == nonzero


@pytest.mark.slow
def test_compile_equals_eager():
    model = tiny().float()
    f, params = fxattr.functionalize(model)
    xs = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    assert_compile_equals_eager(EXPLAINERS["beta_smooth"](f), params, xs, torch.tensor([0, 1]))


# ---- canonizers ----------------------------------------------------------------------------------------

def _bn_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.Hardshrink(0.3), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3)).to(F64)
    return randomize(model, 4, (3, 6, 6))


class _Shrink(nn.Module):
    """Hardshrink(0.3) written as two thresholds: the function the canonizer rewrites it into."""

    def forward(self, x):
        return nn.functional.threshold(x, 0.3, 0.0) - nn.functional.threshold(-x, 0.3, 0.0)


def test_canonizers():
    """A user's graph rewrite (an LRP-unsupported module into supported ops, via replace_modules)
    and the built-in batch-norm fold written as a canonizer: equal to LRP on the model written with
    those ops; the canonized model computes the same function; the user's module is untouched;
    derivatives w.r.t. the batch-norm parameters flow through the parameter transform."""
    model = _bn_model()
    f, params = fxattr.functionalize(model)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(5), dtype=F64)
    targets = torch.tensor([0, 2])
    with pytest.raises(FxattrError, match="Hardshrink"):
        fxattr.lrp(f, composite="epsilon_plus")
    shrink = fxattr.lrp.replace_modules(nn.Hardshrink, lambda t: (nn.functional.threshold(t, 0.3, 0.0)
                                                                  - nn.functional.threshold(-t, 0.3, 0.0)))
    with model_unchanged(model):
        explain = fxattr.lrp(f, composite="epsilon_plus", canonizers=[fxattr.lrp.merge_batch_norm(), shrink])
        got = torch.vmap(explain, in_dims=(None, 0, 0))(params, x, targets)
    assert type(model[5]) is nn.Hardshrink and model[0].bias is None
    rewritten = copy.deepcopy(model)
    rewritten[5] = _Shrink()
    f2, params2 = fxattr.functionalize(rewritten)
    torch.testing.assert_close(torch.vmap(f2, in_dims=(None, 0))(params2, x), model(x), rtol=1e-12, atol=1e-12)
    want = torch.vmap(fxattr.lrp(f2, composite="epsilon_plus"), in_dims=(None, 0, 0))(params2, x, targets)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # merge_batch_norm gives fxattr's built-in fold, derivatives included
    only_shrink = fxattr.lrp(f, composite="epsilon_plus", canonizers=[shrink])

    def loss(explain):
        return lambda p: (explain(p, x[0], 0) ** 2).sum()
    g_merge, g_builtin = torch.func.grad(loss(explain))(params), torch.func.grad(loss(only_shrink))(params)
    for name in ("1.weight", "1.running_var", "4.bias", "0.weight"):
        torch.testing.assert_close(g_merge[name], g_builtin[name], rtol=1e-10, atol=1e-14)
    assert g_merge["1.weight"].abs().max() > 0


def _shrink_to_thresholds(gm):
    """The graph rewrite of fxattr.lrp.Canonizer's docstring, by hand."""
    F = nn.functional
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Hardshrink):
            lambd = gm.get_submodule(node.target).lambd
            with gm.graph.inserting_before(node):
                pos = gm.graph.call_function(F.threshold, (node.args[0], lambd, 0.0))
                neg = gm.graph.call_function(torch.neg, (node.args[0],))
                neg = gm.graph.call_function(F.threshold, (neg, lambd, 0.0))
                out = gm.graph.call_function(torch.sub, (pos, neg))
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
    return gm


def test_handwritten_graph_canonizer():
    model = _bn_model()
    f, params = fxattr.functionalize(model)
    x = torch.randn(6, 3, 6, 6, generator=torch.Generator().manual_seed(5), dtype=F64)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    mine = fxattr.lrp.Canonizer("hardshrink", graph=_shrink_to_thresholds)
    got = torch.vmap(fxattr.lrp(f, composite="epsilon_plus", canonizers=[mine]), in_dims=(None, 0, 0))(params, x, targets)
    rewritten = copy.deepcopy(model)
    rewritten[5] = _Shrink()
    f2, params2 = fxattr.functionalize(rewritten)
    want = torch.vmap(fxattr.lrp(f2, composite="epsilon_plus"), in_dims=(None, 0, 0))(params2, x, targets)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_invalid_rewrite_is_a_clear_error():
    def out_of_order(gm):
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and node.target == "1":
                with gm.graph.inserting_after(node):  # each after node: reversed order
                    a = gm.graph.call_function(torch.neg, (node,))
                    b = gm.graph.call_function(torch.neg, (a,))
                node.replace_all_uses_with(b, delete_user_cb=lambda user: user is not a)
        return gm
    f, _ = fxattr.functionalize(tiny())
    with pytest.raises(FxattrError, match="canonizer 'broken': the rewritten graph is invalid"):
        fxattr.lrp(f, rule="z", canonizers=[fxattr.lrp.Canonizer("broken", graph=out_of_order)])


def test_user_parameter_canonizer():
    """A parameter-only canonizer runs at every call on the params passed (differentiable): here
    one that rescales a ReLU network's first layer and undoes it after (an equivalent model), so
    the LRP-0 map is unchanged while the transform is visibly applied to the params it gets."""
    model = tiny()
    f, params = fxattr.functionalize(model)
    seen = []

    def rescale(p, gm):
        seen.append(p["0.weight"])
        p = dict(p)
        p["0.weight"], p["0.bias"] = 2 * p["0.weight"], 2 * p["0.bias"]
        p["2.weight"] = p["2.weight"] / 2
        return p
    x = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    mine = fxattr.lrp(f, rule="z", canonizers=[fxattr.lrp.Canonizer("rescale", params=rescale)])
    torch.testing.assert_close(mine(params, x, 1), fxattr.lrp(f, rule="z")(params, x, 1), rtol=1e-12, atol=1e-14)
    assert seen and seen[-1] is params["0.weight"]


# ---- errors --------------------------------------------------------------------------------------------

BAD = [
    (lambda f: fxattr.beta_smooth(f, beta=float("nan")), "beta must be finite"),
    (lambda f: fxattr.beta_smooth(f, beta=0.0), "beta must be > 0"),
    (lambda f: fxattr.beta_smooth(f, beta=-1), "beta must be >= 0.0, got -1"),
    (lambda f: fxattr.beta_smooth(f, seed="ones"), "seed"),
    (lambda f: rules.relu_beta_smooth(float("inf")), "beta must be finite"),
    (lambda f: rules.stabiliser(float("nan")), "epsilon must be finite"),
    (lambda f: rules.stabiliser(-1e-6), "epsilon must be >= 0"),
    (lambda f: rules.stabiliser(1e-6, clip=1), "clip must be True or False"),
    (lambda f: rules.stabiliser(1e-6, dim=(1,)), "dim applies with norm_scale=True only"),
    (lambda f: rules.stabiliser(1e-6, norm_scale=True, dim=(1.5,)), "dim must be an int"),
    (lambda f: rules.gamma(0.25, zero_params="weight"), "zero_params must be None, 'bias'"),
    (lambda f: rules.gamma(float("nan")), "gamma must be finite"),
    (lambda f: fxattr.lrp(f, composite="epsilon_plus", zero_params=["bias", "running_mean"]), "zero_params"),
    (lambda f: fxattr.lrp(f, composite="excitation_backprop", stabiliser=-1.0), "stabiliser must be >= 0"),
    (lambda f: fxattr.lrp(f, composite="excitation_backprop", epsilon=0.1), "unknown option"),
    (lambda f: fxattr.lrp(f, composite="sequential_preset_a", zero_params="bias"), "unknown option"),
    (lambda f: fxattr.lrp(f, composite="epsilon_plus", canonizers=fxattr.lrp.merge_batch_norm()), "list"),
    (lambda f: fxattr.lrp(f, composite="epsilon_plus", canonizers=[lambda gm: gm]), "Canonizer"),
    (lambda f: fxattr.lrp(f, composite="epsilon_plus",
                          canonizers=[fxattr.lrp.Canonizer("bad", graph=lambda gm: None)]), "GraphModule"),
    (lambda f: fxattr.lrp.replace_modules("ReLU", torch.relu), "module type"),
    (lambda f: fxattr.lrp(f, composite="epsilon_plus", canonizers=[
        fxattr.lrp.replace_modules(nn.Linear, torch.relu)]), "parameter-free modules only"),
]


@pytest.mark.parametrize("index", range(len(BAD)))
def test_bad_options_are_clear_errors(index):
    build, message = BAD[index]
    f, _ = fxattr.functionalize(tiny())
    with pytest.raises(FxattrError, match=message):
        build(f)


def test_bad_parameter_canonizer_is_a_clear_error():
    f, params = fxattr.functionalize(tiny())
    explain = fxattr.lrp(f, rule="z", canonizers=[fxattr.lrp.Canonizer("bad", params=lambda p, gm: None)])
    with pytest.raises(FxattrError, match="params must return a dict"):
        explain(params, torch.zeros(2, 4, 4, dtype=F64), 0)
