"""fxattr's LRP, guided backprop and deconvnet against captum where the definitions coincide.

captum's LRP (captum.attr.LRP, captum 0.8/0.9) seeds the target with its value (it scales the
normalised relevance by the output), as fxattr does. Its rules coincide with fxattr's only in part:

- ``EpsilonRule(eps)``: z + eps * sign(z), sign(0) = +1, bias included == fxattr ``epsilon``.
  captum's default for every layer, max and average pooling included, is EpsilonRule(1e-9): max
  pooling then gives the winner x/(x + 1e-9) of the relevance (winner-takes-all up to 1e-9) and
  average pooling the z rule (up to 1e-9).
- ``GammaRule(gamma)`` uses W + gamma W+ on the raw input and leaves the bias alone; zennit's
  (generalised) gamma splits the input by sign and adds gamma b+. They coincide for non-negative
  inputs, zero biases and positive explained outputs (a ReLU net on x >= 0: relevance only reaches
  neurons with positive activation).
- ``Alpha1_Beta0_Rule()`` uses W+ on the raw input with the bias: on x >= 0 that is iNNvestigate's
  alpha_1_beta_0 (W+ x+ + W- x- + b); ``set_bias_to_zero=True`` is alpha_1_beta_0_IB / z_plus.

captum's GuidedBackprop and Deconvolution seed with 1; fxattr's (iNNvestigate's convention, see
test_references.py) seed with the output's value, so fxattr == captum * value.

captum's LRP needs every layer to be a module used once (ReLU modules, functional flatten);
it runs on a deep copy because it attaches rules and hooks to the modules.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxattr

captum = pytest.importorskip("captum")

from captum.attr import LRP, Deconvolution, GuidedBackprop  # noqa: E402
from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule, GammaRule  # noqa: E402


class SmallCNN(nn.Module):
    def __init__(self, pool: str = "max", bias: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, bias=bias)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3, bias=bias)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.AvgPool2d(2) if pool == "both" else nn.MaxPool2d(2)
        self.fc1 = nn.Linear(8 * 2 * 2, 16, bias=bias)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(16, 5, bias=bias)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc2(self.relu3(self.fc1(x)))


class MLP(nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(10, 12, bias=bias)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(12, 8, bias=bias)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(8, 4, bias=bias)

    def forward(self, x):
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(x)))))


def _build(kind, seed, bias=True, pool="max"):
    torch.manual_seed(seed)
    model = SmallCNN(pool=pool, bias=bias) if kind == "cnn" else MLP(bias=bias)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(0.1 * torch.randn_like(m.bias))
    return model.eval()


def _inputs(kind, signed, seed=7):
    gen = torch.Generator().manual_seed(seed)
    shape = (4, 3, 14, 14) if kind == "cnn" else (4, 10)
    x = torch.randn(shape, generator=gen) if signed else torch.rand(shape, generator=gen)
    return x


def _kernel_layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def captum_lrp(model, x, targets, rule_factory=None):
    twin = copy.deepcopy(model)
    if rule_factory is not None:
        for m in _kernel_layers(twin):
            m.rule = rule_factory()
    return LRP(twin).attribute(x.clone(), target=targets)


def fx(model, make, x, targets):
    f, params = fxattr.functionalize(model)
    return torch.vmap(make(f), in_dims=(None, 0, 0))(params, x, targets)


def _targets(model, x):
    with torch.no_grad():
        out = model(x)
    return out.argmax(1), out


def _close(got, want, rtol=1e-5):
    scale = want.flatten(1).abs().amax(1).reshape(-1, *([1] * (want.ndim - 1)))
    err = (got - want).abs()
    bad = err > rtol * want.abs() + rtol * scale
    assert not bad.any(), f"{int(bad.sum())}/{bad.numel()} off, max err {float(err.max()):.3g}, scale {float(scale.max()):.3g}"


@pytest.mark.parametrize("kind,pool", [("cnn", "max"), ("cnn", "both"), ("mlp", None)])
def test_captum_default_rules_equal_epsilon_1e9(kind, pool):
    """captum's defaults (EpsilonRule(1e-9) on every conv, linear and pooling layer) on signed
    inputs with biases == fxattr epsilon 1e-9 (average pooling by the z rule, max pooling
    winner-takes-all)."""
    model = _build(kind, seed=1, pool=pool or "max")
    x = _inputs(kind, signed=True)
    targets, _ = _targets(model, x)
    want = captum_lrp(model, x, targets)
    got = fx(model, lambda f: fxattr.lrp(f, rule="epsilon", epsilon=1e-9), x, targets)
    _close(got, want)


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
@pytest.mark.parametrize("eps", [1e-3, 0.25])
def test_captum_epsilon(kind, eps):
    model = _build(kind, seed=2)
    x = _inputs(kind, signed=True)
    targets, _ = _targets(model, x)
    want = captum_lrp(model, x, targets, lambda: EpsilonRule(epsilon=eps))
    got = fx(model, lambda f: fxattr.lrp(f, rule="epsilon", epsilon=eps), x, targets)
    _close(got, want)
    # eps is large enough to matter: it moves the answer away from epsilon 1e-9.
    tiny = fx(model, lambda f: fxattr.lrp(f, rule="epsilon", epsilon=1e-9), x, targets)
    assert (tiny - got).abs().max() > 1e-4 * got.abs().max()


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_captum_gamma(kind):
    """Zero biases, x >= 0: captum's gamma and the (generalised) gamma coincide."""
    model = _build(kind, seed=3, bias=False)
    x = _inputs(kind, signed=False)
    targets, out = _targets(model, x)
    assert (out.gather(1, targets[:, None]) > 0).all()
    want = captum_lrp(model, x, targets, lambda: GammaRule(gamma=0.25))
    got = fx(model, lambda f: fxattr.lrp(f, rule="gamma", gamma=0.25), x, targets)
    _close(got, want, rtol=1e-4)  # captum's stabiliser is 1e-9, fxattr's gamma may use 1e-6
    # gamma 0.25 is not the z rule on this model
    z = fx(model, lambda f: fxattr.lrp(f, rule="z"), x, targets)
    assert (z - got).abs().max() > 1e-3 * got.abs().max()


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_captum_alpha1_beta0(kind):
    """x >= 0 with biases: captum Alpha1_Beta0 (W+ x + b) == alpha_1_beta_0; with the bias set
    to zero == alpha_1_beta_0_IB == z_plus."""
    model = _build(kind, seed=4)
    x = _inputs(kind, signed=False)
    targets, _ = _targets(model, x)
    want = captum_lrp(model, x, targets, lambda: Alpha1_Beta0_Rule())
    got = fx(model, lambda f: fxattr.lrp(f, rule="alpha_1_beta_0"), x, targets)
    _close(got, want, rtol=1e-4)
    want_ib = captum_lrp(model, x, targets, lambda: Alpha1_Beta0_Rule(set_bias_to_zero=True))
    for rule in ("alpha_1_beta_0_IB", "z_plus"):
        got_ib = fx(model, lambda f: fxattr.lrp(f, rule=rule), x, targets)
        _close(got_ib, want_ib, rtol=1e-4)
    # the bias matters on this model, so the two comparisons are not the same check
    assert (want - want_ib).abs().max() > 1e-3 * want.abs().max()


@pytest.mark.parametrize("preset", ["sequential_preset_a", "sequential_preset_b"])
def test_captum_mixed_rules_equal_preset(preset):
    """iNNvestigate's presets rebuilt from captum's per-layer rules on x >= 0 (with biases):
    alpha-beta on the convolutions, EpsilonRule(0.1) on the dense layers. captum has only
    alpha 1 beta 0, so preset B (alpha 2 beta 1) must differ from it."""
    model = _build("cnn", seed=6)
    x = _inputs("cnn", signed=False)
    targets, _ = _targets(model, x)
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, nn.Conv2d):
            m.rule = Alpha1_Beta0_Rule()
        elif isinstance(m, nn.Linear):
            m.rule = EpsilonRule(epsilon=0.1)
    want = LRP(twin).attribute(x.clone(), target=targets)
    got = fx(model, lambda f: fxattr.lrp(f, composite=preset), x, targets)
    if preset == "sequential_preset_a":
        _close(got, want, rtol=1e-4)
    else:
        assert (got - want).abs().max() > 1e-3 * want.abs().max()


@pytest.mark.parametrize("method,captum_cls", [("guided_backprop", GuidedBackprop),
                                               ("deconvnet", Deconvolution)])
@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_captum_guided_backprop_and_deconvnet(method, captum_cls, kind):
    model = _build(kind, seed=5)
    x = _inputs(kind, signed=True)
    targets, out = _targets(model, x)
    want = captum_cls(copy.deepcopy(model)).attribute(x.clone(), target=targets)
    got = fx(model, lambda f: getattr(fxattr, method)(f), x, targets)
    value = out.gather(1, targets[:, None]).reshape(-1, *([1] * (x.ndim - 1)))
    _close(got, want * value)
    # and they are not just the gradient
    grad = fx(model, lambda f: fxattr.gradient(f), x, targets)
    assert (grad * value - got).abs().max() > 1e-3 * got.abs().max()
