"""fxattr's zennit-named composites against zennit itself on torchvision VGG16, VGG16-BN, ResNet18.

The models get random weights AND random biases (torchvision initialises biases to zero, which
would hide every bias convention) and randomised batch-norm statistics and affine parameters.
zennit runs on a deep copy (its canonizers and hooks modify the module in place); fxattr runs on
the original, which must come out untouched.

Conventions matched (zennit 0.5): zennit's attributor backpropagates the output gradient it is
given, so we hand it ``one_hot(target) * output``, i.e. the selected output seeded with its value,
which is fxattr's LRP seeding. The zennit composite names in fxattr follow zennit's rules: epsilon
1e-6, stabiliser 1e-6 elsewhere, bias split into b+ / b- in z+ / alpha-beta, generalised gamma
(0.25), ZBox on the first convolution (EpsilonGammaBox), Flat on the first linear layer (the *Flat
ones), the Norm rule (z with stabiliser 1e-6) on average pooling and on residual sums, ReLU and
batch norm passed through, max pooling by its gradient. BatchNorm is merged into the preceding
convolution by zennit's canonizers (SequentialMergeBatchNorm / VGGCanonizer / ResNetCanonizer)
and by fxattr's own.

Inputs are 3x64x64 (VGG's adaptive pooling makes 7x7 from 2x2), batch 2, float32; the agreement
asked for is 1e-5 relative.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import fxattr

torchvision = pytest.importorskip("torchvision")
zennit = pytest.importorskip("zennit")

from zennit.attribution import Gradient  # noqa: E402
from zennit.canonizers import SequentialMergeBatchNorm  # noqa: E402
from zennit.composites import (  # noqa: E402
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
)
from zennit.torchvision import ResNetCanonizer, VGGCanonizer  # noqa: E402

pytestmark = pytest.mark.slow

LOW, HIGH = -3.0, 3.0  # EpsilonGammaBox's input box

COMPOSITES = {
    "epsilon_plus": (EpsilonPlus, {}),
    "epsilon_plus_flat": (EpsilonPlusFlat, {}),
    "epsilon_gamma_box": (EpsilonGammaBox, {"low": LOW, "high": HIGH}),
    "epsilon_alpha2_beta1": (EpsilonAlpha2Beta1, {}),
    "epsilon_alpha2_beta1_flat": (EpsilonAlpha2Beta1Flat, {}),
}

MODELS = {
    "vgg16": (torchvision.models.vgg16, SequentialMergeBatchNorm),
    "vgg16_bn": (torchvision.models.vgg16_bn, VGGCanonizer),
    "resnet18": (torchvision.models.resnet18, ResNetCanonizer),
}


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random biases everywhere and random batch-norm statistics (weights keep torchvision's
    random init, whose scale keeps activations O(1) through the depth)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(0.1 * torch.randn(bias.shape, generator=gen))
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=gen))
                # zennit's merge leaves the batch norm as (x - 0) / sqrt(1 + eps): not the identity
                # unless eps = 0 (with eps = 1e-5 its canonized twin is off by 5e-6 per layer, which
                # near-zero denominators amplify to ~1e-4). The variances are >= 0.5, so eps = 0 is safe.
                module.eps = 0.0
    return model.eval()


@functools.lru_cache(maxsize=1)  # one torchvision model alive at a time; CASES is grouped by model
def setup(name):
    build, _ = MODELS[name]
    torch.manual_seed(0)
    model = randomize(build(num_classes=10), seed=1)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(x)
    targets = out.argmax(1)
    return model, x, out, targets


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    setup.cache_clear()  # do not keep a 550 MB VGG alive for the rest of the suite


# Every composite on every model, grouped by model (single-threaded this is ~2.5 s of CPU per VGG
# case and ~1 s per ResNet case; on a contended machine OpenMP waits make it look much longer).
CASES = [(name, c) for name in MODELS for c in COMPOSITES]


def zennit_relevance(name, composite_name, model, x, out, targets):
    """zennit's attribution on a deep copy, seeded with one_hot(target) * output value."""
    cls, kwargs = COMPOSITES[composite_name]
    canonizer = MODELS[name][1]
    composite = cls(canonizers=[canonizer()], **kwargs)
    twin = copy.deepcopy(model)
    seed = torch.zeros_like(out).scatter(1, targets[:, None], out.gather(1, targets[:, None]))
    with Gradient(model=twin, composite=composite) as attributor:
        zout, relevance = attributor(x, seed)
    # The canonized twin computes the same function (BN merged), so the seed fits its output.
    torch.testing.assert_close(zout, out, rtol=1e-4, atol=1e-4)
    return relevance


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name,composite_name", CASES)
def test_zennit_composite(name, composite_name):
    model, x, out, targets = setup(name)
    before = _state(model)
    want = zennit_relevance(name, composite_name, model, x, out, targets)
    _, kwargs = COMPOSITES[composite_name]
    f, params = fxattr.functionalize(model)
    explain = fxattr.lrp(f, composite=composite_name, **kwargs)
    got = torch.vmap(explain, in_dims=(None, 0, 0))(params, x, targets)
    assert got.shape == x.shape and got.dtype == torch.float32
    # 1e-5 relative: per element, with a floor of 1e-5 of the largest relevance for entries that
    # cancel to ~0, and for the whole map in norm.
    scale = want.abs().amax(dim=(1, 2, 3), keepdim=True)
    err = (got - want).abs()
    bad = err > 1e-5 * want.abs() + 1e-5 * scale
    assert not bad.any(), (
        f"{name}/{composite_name}: {int(bad.sum())}/{bad.numel()} elements off; max abs err "
        f"{float(err.max()):.3g}, max |ref| {float(scale.max()):.3g}")
    rel = (got - want).flatten(1).norm(dim=1) / want.flatten(1).norm(dim=1)
    assert float(rel.max()) < 1e-5, rel
    # fxattr leaves the model as it was (zennit ran on a copy).
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("bounds", ["per_channel", "per_pixel"])
def test_zennit_gamma_box_tensor_bounds(bounds):
    """EpsilonGammaBox with tensor bounds (normalised images have per-channel boxes): fxattr takes
    them per example, (3, 1, 1) or (3, H, W); zennit takes them with a batch axis."""
    model, x, out, targets = setup("resnet18")
    gen = torch.Generator().manual_seed(6)
    shape = (3, 1, 1) if bounds == "per_channel" else tuple(x.shape[1:])
    low = -1.5 - torch.rand(shape, generator=gen)
    high = 1.5 + torch.rand(shape, generator=gen)
    seed = torch.zeros_like(out).scatter(1, targets[:, None], out.gather(1, targets[:, None]))
    composite = EpsilonGammaBox(low=low[None], high=high[None], canonizers=[ResNetCanonizer()])
    with Gradient(model=copy.deepcopy(model), composite=composite) as attributor:
        _, want = attributor(x, seed)
    f, params = fxattr.functionalize(model)
    explain = fxattr.lrp(f, composite="epsilon_gamma_box", low=low, high=high)
    got = torch.vmap(explain, in_dims=(None, 0, 0))(params, x, targets)
    rel = (got - want).flatten(1).norm(dim=1) / want.flatten(1).norm(dim=1)
    assert float(rel.max()) < 1e-5, rel
    scalar = torch.vmap(fxattr.lrp(f, composite="epsilon_gamma_box", low=LOW, high=HIGH),
                        in_dims=(None, 0, 0))(params, x, targets)
    assert float(((scalar - want).norm() / want.norm())) > 1e-3  # the bounds really matter


@pytest.mark.parametrize("composite_name", ["epsilon_plus_flat", "epsilon_gamma_box"])
def test_zennit_first_layer_behind_pooling(composite_name):
    """zennit's first-layer map takes the first Linear/Convolution module, whatever precedes it
    (here an average pooling); iNNvestigate's input_layer_rule would not (test_references.py)."""
    torch.manual_seed(0)
    nn = torch.nn
    model = randomize(nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 3, 1),
                                    nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 4)), seed=5)
    x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = model(x)
    targets = out.argmax(1)
    seed = torch.zeros_like(out).scatter(1, targets[:, None], out.gather(1, targets[:, None]))
    cls, kwargs = COMPOSITES[composite_name]
    with Gradient(model=copy.deepcopy(model), composite=cls(**kwargs)) as attributor:
        _, want = attributor(x, seed)
    f, params = fxattr.functionalize(model)
    got = torch.vmap(fxattr.lrp(f, composite=composite_name, **kwargs), in_dims=(None, 0, 0))(params, x, targets)
    assert float((got - want).norm() / want.norm()) < 1e-5
    # without the first-layer rule (epsilon_plus: z+ on every convolution) the answer differs
    plain = torch.vmap(fxattr.lrp(f, composite="epsilon_plus"), in_dims=(None, 0, 0))(params, x, targets)
    assert float((plain - want).norm() / want.norm()) > 1e-3


def _small_cnn(seed, hidden_relu=True):
    nn = torch.nn
    torch.manual_seed(seed)
    # without the last ReLU, negative hidden outputs carry relevance (gamma's negative branch)
    act = [nn.ReLU()] if hidden_relu else []
    return randomize(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                   nn.Conv2d(6, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 3 * 3, 5),
                                   *act, nn.Linear(5, 4)), seed=seed)


@pytest.mark.parametrize("hidden_relu", [True, False], ids=["relu", "linear_head"])
@pytest.mark.parametrize("rule", ["gamma", "norm", "flat"])
def test_zennit_single_rule_signed_input(rule, hidden_relu):
    """One zennit rule on every linear/conv layer, signed inputs, random biases: zennit's
    generalised Gamma (x+/x- split, gamma b+ added for positive outputs, W + gamma W- for negative
    ones), Norm (z with 1e-6 sign stabiliser, bias included) and Flat (weights 1, no bias)."""
    from zennit.composites import LayerMapComposite
    from zennit.rules import Flat, Gamma, Norm, Pass
    from zennit.types import Activation
    from zennit.types import Linear as AnyLinear

    zrule = {"gamma": Gamma(gamma=0.25), "norm": Norm(), "flat": Flat()}[rule]
    model = _small_cnn(seed=8, hidden_relu=hidden_relu)
    x = torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        out = model(x)
    targets = out.argmax(1)
    seed = torch.zeros_like(out).scatter(1, targets[:, None], out.gather(1, targets[:, None]))
    composite = LayerMapComposite([(Activation, Pass()), (AnyLinear, zrule)])
    with Gradient(model=copy.deepcopy(model), composite=composite) as attributor:
        _, want = attributor(x, seed)
    f, params = fxattr.functionalize(model)
    kwargs = {"gamma": 0.25} if rule == "gamma" else {}
    got = torch.vmap(fxattr.lrp(f, rule=rule, **kwargs), in_dims=(None, 0, 0))(params, x, targets)
    scale = want.abs().amax(dim=(1, 2, 3), keepdim=True)
    bad = (got - want).abs() > 1e-5 * want.abs() + 1e-5 * scale
    assert not bad.any(), f"{int(bad.sum())} elements off"


@pytest.mark.parametrize("composite_name", list(COMPOSITES))
def test_zennit_composite_float64_exact(composite_name):
    """The same composites on a small BN/residual-free CNN in float64, to 1e-10: at this precision
    every constant shows (epsilon 1e-6 vs iNNvestigate's 1e-7, the 1e-6 stabilisers, b+ / b-), which
    float32 at 1e-5 cannot resolve."""
    nn = torch.nn
    torch.manual_seed(0)
    model = randomize(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(3), nn.Flatten(),
        nn.Linear(72, 16), nn.ReLU(), nn.Linear(16, 5)), seed=3).double()
    x = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    want, seed = _assert_float64_exact(model, x, composite_name, SequentialMergeBatchNorm)
    cls, kwargs = COMPOSITES[composite_name]
    # epsilon 1e-7 (iNNvestigate's default) instead of zennit's 1e-6 on the dense layers is visible here
    other = cls(canonizers=[SequentialMergeBatchNorm()], epsilon=1e-7, **kwargs)
    with Gradient(model=copy.deepcopy(model), composite=other) as attributor:
        _, want_other = attributor(x, seed)
    assert (want_other - want).abs().max() > 1e-10 * want.abs().max()


@pytest.mark.parametrize("composite_name", ["epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1_flat"])
def test_zennit_resnet_float64_exact(composite_name):
    """A one-block-per-stage torchvision ResNet in float64 to 1e-10: residual sums under zennit's
    Norm (stabiliser 1e-6), merged BN on the downsample branches, overlapping max pooling."""
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    model = randomize(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5), seed=7).double()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    _assert_float64_exact(model, x, composite_name, ResNetCanonizer)


def _assert_float64_exact(model, x, composite_name, canonizer):
    """fxattr's composite == zennit's (on a copy, canonized) to 1e-10, both seeded with the argmax
    output's value; returns zennit's attribution and the seed."""
    with torch.no_grad():
        out = model(x)
    targets = out.argmax(1)
    seed = torch.zeros_like(out).scatter(1, targets[:, None], out.gather(1, targets[:, None]))
    cls, kwargs = COMPOSITES[composite_name]
    with Gradient(model=copy.deepcopy(model), composite=cls(canonizers=[canonizer()], **kwargs)) as attributor:
        _, want = attributor(x, seed)
    f, params = fxattr.functionalize(model)
    got = torch.vmap(fxattr.lrp(f, composite=composite_name, **kwargs), in_dims=(None, 0, 0))(params, x, targets)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))
    return want, seed


def test_zennit_seeding_is_value():
    """The seeding convention itself, on a small CNN (cheap): zennit seeded with one_hot(target)
    gives relevance / value, fxattr's LRP seeds with the value; and the pair differ (the check
    is not vacuous)."""
    torch.manual_seed(0)
    nn = torch.nn
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.MaxPool2d(3, 2, 1), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)), seed=3)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(x)
    targets = out.argmax(1)
    one_hot = torch.zeros_like(out).scatter(1, targets[:, None], 1.0)
    with Gradient(model=copy.deepcopy(model), composite=EpsilonPlus(canonizers=[SequentialMergeBatchNorm()])) as attributor:
        _, rel_one = attributor(x, one_hot)
    f, params = fxattr.functionalize(model)
    got = torch.vmap(fxattr.lrp(f, composite="epsilon_plus"), in_dims=(None, 0, 0))(params, x, targets)
    value = out.gather(1, targets[:, None])[:, :, None, None]
    assert (value - 1).abs().min() > 0.05  # seeding with 1 or with the value is distinguishable
    scale = float(rel_one.abs().amax())
    torch.testing.assert_close(got / value, rel_one, rtol=1e-5, atol=1e-6 * scale)
