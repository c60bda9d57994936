"""fxattr.crp / fxattr.crp_reference_samples: concept relevance propagation against zennit-crp.

zennit-crp's ``CondAttribution`` runs on a deep copy with the zennit composite matching fxattr's
preset (``EpsilonPlusFlat`` <-> ``"epsilon_plus_flat"``, ``EpsilonAlpha2Beta1`` <->
``"epsilon_alpha2_beta1"``, as in test_zennit.py) and the model's canonizer; conditions
``{layer: channels, "y": [target]}`` seed the selected output with its value (fxattr's LRP seed)
and mask the relevance at ``layer`` (``exclude_parallel=True``, its default). Its heatmap is the
input relevance summed over input channels. A concept's relevance is compared with the layer
relevance zennit-crp records WITHOUT a layer condition (with one, the relevance it records at the
conditioned layer is accumulated twice). Models have random biases and randomised batch-norm
statistics (eps = 0, see test_zennit.py); the agreement asked for is 1e-5 relative.

zennit-crp pins ``zennit <= 0.4.6``, which the zennit parity tests cannot use, so it is not in the
test extra: with zennit-crp installed (``pip install zennit-crp --no-deps``; it runs with zennit
0.5) the references are computed live, and ``FXATTR_RECORD_CRP=1`` writes them to
``crp_references.pt`` beside this file; without it they are read from that file.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import fxattr
from tests.contract import model_unchanged

torchvision = pytest.importorskip("torchvision")
try:
    from crp.attribution import CondAttribution
    from crp.concepts import ChannelConcept
    HAVE_CRP = True
except ImportError:
    HAVE_CRP = False
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonAlpha2Beta1, EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer

ZENNIT = {"epsilon_plus_flat": EpsilonPlusFlat, "epsilon_alpha2_beta1": EpsilonAlpha2Beta1}
REFERENCES = Path(__file__).with_name("crp_references.pt")


def replayed(key: str, compute):
    """zennit-crp's result for ``key``: computed live when zennit-crp is installed (and recorded
    with FXATTR_RECORD_CRP=1), else read from the recorded file."""
    if HAVE_CRP:
        result = compute()
        if os.environ.get("FXATTR_RECORD_CRP") == "1":
            stored = torch.load(REFERENCES) if REFERENCES.exists() else {}
            stored[key] = result
            torch.save(stored, REFERENCES)
        return result
    stored = torch.load(REFERENCES) if REFERENCES.exists() else {}
    if key not in stored:
        pytest.skip(f"zennit-crp is not installed and no recorded reference for {key}")
    return stored[key]


def randomize(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(0.1 * torch.randn(bias.shape, generator=gen))
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=gen))
                module.eps = 0.0  # zennit's merge leaves (x - 0) / sqrt(1 + eps) behind otherwise
    return model.eval()


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1),
        nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 2 * 2, 4)),
        seed + 1)


def crp_reference(model, canonizer, composite_name, x, targets, layer, concepts):
    """zennit-crp's heatmaps (B, n, H, W) and layer relevance per channel (B, C) on a deep copy."""
    twin = copy.deepcopy(model)
    attribution = CondAttribution(twin)
    heatmaps = []
    for b in range(len(x)):
        conditions = [{layer: list(c), "y": [int(targets[b])]} for c in concepts]
        composite = ZENNIT[composite_name](canonizers=[canonizer()] if canonizer else [])
        result = attribution(x[b:b + 1].clone().requires_grad_(True), conditions, composite)
        heatmaps.append(result.heatmap)
    composite = ZENNIT[composite_name](canonizers=[canonizer()] if canonizer else [])
    plain = attribution(x.clone().requires_grad_(True), [{"y": [int(t)]} for t in targets], composite,
                        record_layer=[layer])
    relevance = plain.relevances[layer]
    return torch.stack(heatmaps), relevance.flatten(2).sum(2), relevance


def assert_close_relative(got, want, what, tol=1e-5):
    """1e-5 relative per element (floor: 1e-5 of the largest entry) and in norm."""
    scale = want.abs().amax()
    err = (got - want).abs()
    bad = err > tol * want.abs() + tol * scale
    assert not bad.any(), f"{what}: {int(bad.sum())}/{bad.numel()} off; max err {float(err.max()):.3g} " \
                          f"of {float(scale):.3g}"
    assert float((got - want).norm() / want.norm()) < tol, what


def check_against_crp(key, model, canonizer, composite_name, x, layer, concepts, every_channel=False):
    with torch.no_grad():
        targets = model(x).argmax(1)
    want_maps, want_channels = replayed(f"{key}/{composite_name}/{layer}/{concepts}", lambda: crp_reference(
        model, canonizer, composite_name, x, targets, layer, concepts)[:2])
    f, params = fxattr.functionalize(model)
    with model_unchanged(model):
        explain = fxattr.crp(f, composite=composite_name, layer=layer, concepts=concepts)
        got = torch.vmap(explain, in_dims=(None, 0, 0))(params, x, targets)
    assert got.heatmap.shape == (len(x), len(concepts), *x.shape[1:])
    assert_close_relative(got.heatmap.sum(2), want_maps, f"{layer} heatmaps")
    want_relevance = torch.stack([want_channels[:, list(c)].sum(1) for c in concepts], 1)
    assert_close_relative(got.relevance, want_relevance, f"{layer} concept relevance")
    # the layer relevance per channel: every channel as a concept (concepts=None) on small
    # models; RelMax's score ("sum") on all (the walk down to the layer only)
    if every_channel:
        every = torch.vmap(fxattr.crp(f, composite=composite_name, layer=layer, chunk_size=16),
                           in_dims=(None, 0, 0))(params, x, targets)
        assert_close_relative(every.relevance, want_channels, f"{layer} relevance per channel")
    scores = fxattr.crp_reference_samples(f, layer=layer, composite=composite_name).scores
    assert_close_relative(torch.vmap(scores, in_dims=(None, 0, 0))(params, x, targets), want_channels,
                          f"{layer} RelMax scores")
    return got


@pytest.mark.parametrize("composite_name", list(ZENNIT))
@pytest.mark.parametrize("layer", ["3", "6"])
def test_small_cnn_equals_zennit_crp(composite_name, layer):
    model = small_cnn()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    got = check_against_crp("small_cnn", model, SequentialMergeBatchNorm, composite_name, x, layer, [(0,), (1,), (2, 4), (3,)],
                            every_channel=True)
    # the concepts really differ (a test that cannot fail is a defect)
    assert float((got.heatmap[:, 0] - got.heatmap[:, 1]).norm()) > 1e-3 * float(got.heatmap.norm())


# vgg11 in float64: at 32x32 (features 1x1, replicated 7x7 by the adaptive pooling) both libraries'
# float32 masked heatmaps are ~1e-4 (relative, in norm) from the float64 values (measured: fxattr
# 7.6e-5, zennit-crp 5.0e-5 on features.8 / EpsilonPlusFlat), so ~1e-4 from each other, while their
# concept relevances agree exactly; in float64 they agree to ~1e-14. (At 64x64, bench/crp_bench.py,
# the float32 heatmaps agree to 4e-6.) resnet18 in float32 agrees to 1e-5.
TORCHVISION = [("vgg11", "features.8", SequentialMergeBatchNorm, torch.float64),
               ("resnet18", "layer2", ResNetCanonizer, torch.float32),
               ("resnet18", "layer1.1.conv1", ResNetCanonizer, torch.float32)]


@pytest.mark.slow
@pytest.mark.parametrize("composite_name", list(ZENNIT))
@pytest.mark.parametrize("name,layer,canonizer,dtype", TORCHVISION)
def test_torchvision_equals_zennit_crp(name, layer, canonizer, dtype, composite_name):
    torch.manual_seed(0)
    model = randomize(getattr(torchvision.models, name)(num_classes=10), seed=1).to(dtype)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=dtype)
    check_against_crp(f"{name}/{dtype}", model, canonizer, composite_name, x, layer, [(0,), (5,), (7, 9)])


def _scores_reference(model, x, targets, layer, max_target, abs_norm):
    attribution = CondAttribution(copy.deepcopy(model))
    relevance = attribution(x.clone().requires_grad_(True), [{"y": [int(t)]} for t in targets],
                            EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()]), record_layer=[layer]
                            ).relevances[layer]
    return ChannelConcept().reference_sampling(relevance, layer, max_target, abs_norm)


@pytest.mark.parametrize("statistic,abs_norm", [("sum", False), ("max", True)])
def test_relmax_equals_zennit_crp(statistic, abs_norm):
    model = small_cnn()
    x = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        targets = model(x).argmax(1)
    order, values = replayed(f"relmax/{statistic}/{abs_norm}", lambda: _scores_reference(
        model, x, targets, "3", statistic, abs_norm)[:2])
    f, params = fxattr.functionalize(model)
    collect = fxattr.crp_reference_samples(f, layer="3", composite="epsilon_plus_flat", statistic=statistic,
                                           abs_norm=abs_norm, k=4)
    with model_unchanged(model):  # three batches of 4, 4, 2: the running top-k across batches
        top = collect(params, [(x[:4], targets[:4]), (x[4:8], targets[4:8]), (x[8:], targets[8:])])
    assert top.indices.shape == (6, 4) and top.indices.dtype == torch.int64
    torch.testing.assert_close(top.indices, order[:4].T)
    torch.testing.assert_close(top.values, values[:4].T, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("statistic", ["sum", "max", "mean"])
def test_actmax_is_the_top_k_of_the_layer_activation(statistic):
    model = small_cnn()
    x = torch.randn(7, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        act = model[:5](x).flatten(2)  # "4": the ReLU after the second convolution
    score = {"sum": act.sum(2), "max": act.amax(2), "mean": act.mean(2)}[statistic]
    f, params = fxattr.functionalize(model)
    top = fxattr.crp_reference_samples(f, layer="4", mode="activation", statistic=statistic, k=3)(
        params, [x[:3], (x[3:], torch.zeros(4, dtype=torch.long))])
    want = score.T.topk(3, dim=1)
    torch.testing.assert_close(top.indices, want.indices)
    torch.testing.assert_close(top.values, want.values, rtol=1e-5, atol=1e-6)


# ---- contract: vmap == loop, chunks, dtypes, second order, compile, errors ------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vmap_equals_loop_and_chunks(dtype):
    model = small_cnn().to(dtype)
    f, params = fxattr.functionalize(model)
    x = torch.randn(3, 3, 8, 8, dtype=dtype, generator=torch.Generator().manual_seed(6))
    targets = torch.tensor([0, 2, 3])
    explain = fxattr.crp(f, composite="epsilon_plus_flat", layer="3", concepts=[0, (1, 2), 5])
    vmapped = torch.vmap(explain, in_dims=(None, 0, 0))(params, x, targets)
    assert vmapped.heatmap.dtype == dtype and vmapped.relevance.shape == (3, 3)
    for b in range(3):
        one = explain(params, x[b], targets[b])
        torch.testing.assert_close(vmapped.heatmap[b], one.heatmap)
        torch.testing.assert_close(vmapped.relevance[b], one.relevance)
    chunked = torch.vmap(fxattr.crp(f, composite="epsilon_plus_flat", layer="3", concepts=[0, (1, 2), 5],
                                    chunk_size=2), in_dims=(None, 0, 0))(params, x, targets)
    torch.testing.assert_close(chunked.heatmap, vmapped.heatmap)
    # a concept of several channels is the sum of its channels' heatmaps (linear below the layer)
    parts = torch.vmap(fxattr.crp(f, composite="epsilon_plus_flat", layer="3", concepts=[1, 2]),
                       in_dims=(None, 0, 0))(params, x, targets)
    torch.testing.assert_close(parts.heatmap.sum(1), vmapped.heatmap[:, 1])


def test_channels_sum_to_the_lrp_of_the_layer():
    """On a chain (no path around the layer) the heatmaps of all channels add up to plain LRP."""
    model = small_cnn()
    f, params = fxattr.functionalize(model)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    targets = torch.tensor([1, 3])
    every = torch.vmap(fxattr.crp(f, composite="epsilon_alpha2_beta1", layer="6"), in_dims=(None, 0, 0))(
        params, x, targets)
    plain = torch.vmap(fxattr.lrp(f, composite="epsilon_alpha2_beta1"), in_dims=(None, 0, 0))(params, x, targets)
    torch.testing.assert_close(every.heatmap.sum(1), plain, rtol=1e-5, atol=1e-7)


def _tiny():
    torch.manual_seed(1)
    return randomize(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3),
                                   nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 3)), 2).double()


def test_second_order_matches_finite_differences():
    model = _tiny()
    f, params = fxattr.functionalize(model)
    x = torch.randn(2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    explain = fxattr.crp(f, rule="epsilon", epsilon=0.1, layer="2", concepts=[0, (1, 2)])
    v = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    names = ["0.weight", "2.bias"]

    def loss(x_, *chosen):
        p = dict(params)
        p.update(zip(names, chosen))
        out = explain(p, x_, 1)
        return (out.heatmap * v).sum() + out.relevance.sum()

    inputs = (x.clone().requires_grad_(True), *[params[n].detach().clone().requires_grad_(True) for n in names])
    assert torch.autograd.gradcheck(loss, inputs, atol=1e-6, rtol=1e-4)
    assert torch.autograd.gradgradcheck(loss, inputs, atol=1e-6, rtol=1e-4, fast_mode=True)
    functional = torch.func.grad(lambda x_: loss(x_, *[params[n] for n in names]))(x)
    (autograd,) = torch.autograd.grad(loss(inputs[0], *[params[n] for n in names]), inputs[0])
    torch.testing.assert_close(functional, autograd)
    assert float(functional.norm()) > 0


@pytest.mark.slow
def test_compile_equals_eager():
    model = _tiny().float()
    f, params = fxattr.functionalize(model)
    explain = fxattr.crp(f, composite="epsilon_plus_flat", layer="2", concepts=[0, 2])
    batched = torch.vmap(explain, in_dims=(None, 0, 0))
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(10))
    targets = torch.tensor([0, 2])
    torch._dynamo.reset()
    eager = batched(params, x, targets)
    compiled = torch.compile(batched, fullgraph=True)(params, x, targets)
    torch.testing.assert_close(compiled.heatmap, eager.heatmap, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(compiled.relevance, eager.relevance, rtol=1e-4, atol=1e-6)


class ScalarHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3 * 2 * 2, 1)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1)).squeeze(1)


def test_clear_errors():
    model = _tiny().float()
    f, params = fxattr.functionalize(model)
    x = torch.randn(2, 4, 4)
    with pytest.raises(fxattr.FxattrError, match=r"fxattr\.crp: layer 'conv9' is not a module"):
        fxattr.crp(f, composite="epsilon_plus_flat", layer="conv9")
    explain = fxattr.crp(f, composite="epsilon_plus_flat", layer="2", concepts=[0, (1, 3)])
    with pytest.raises(fxattr.FxattrError, match=r"concepts\[1\] = \[1, 3\] is out of range for layer '2' "
                                                 r"with 3 channels"):
        explain(params, x, 0)
    for bad, message in [(-1, r"concepts\[0\] must be a channel index"), ([], "concepts is empty"),
                         ([0.5], r"concepts\[0\]"), ("ab", "concepts must be channel indices"),
                         ([()], r"concepts\[0\]")]:
        with pytest.raises(fxattr.FxattrError, match=message):
            fxattr.crp(f, composite="epsilon_plus_flat", layer="2", concepts=bad)
    with pytest.raises(fxattr.FxattrError, match="chunk_size must be an int"):
        fxattr.crp(f, composite="epsilon_plus_flat", layer="2", chunk_size=0)
    with pytest.raises(fxattr.FxattrError, match=r"fxattr\.crp: give exactly one of rule="):
        fxattr.crp(f, layer="2")
    with pytest.raises(fxattr.FxattrError, match=r"fxattr\.crp: composite must be one of .*got .no_such_preset."):
        fxattr.crp(f, composite="no_such_preset", layer="2")
    scalar_f, scalar_params = fxattr.functionalize(ScalarHead().eval())
    no_channels = fxattr.crp(scalar_f, rule="epsilon", layer="squeeze")
    with pytest.raises(fxattr.FxattrError, match=r"layer 'squeeze' has no channels"):
        no_channels(scalar_params, x, None)
    with pytest.raises(fxattr.FxattrError, match="mode must be one of"):
        fxattr.crp_reference_samples(f, layer="2", mode="gradient", rule="epsilon")
    with pytest.raises(fxattr.FxattrError, match="statistic must be one of"):
        fxattr.crp_reference_samples(f, layer="2", statistic="median", rule="epsilon")
    with pytest.raises(fxattr.FxattrError, match="takes no LRP rules"):
        fxattr.crp_reference_samples(f, layer="2", mode="activation", rule="epsilon")
    collect = fxattr.crp_reference_samples(f, layer="2", rule="epsilon")
    with pytest.raises(fxattr.FxattrError, match="batches was empty"):
        collect(params, [])
    with pytest.raises(fxattr.FxattrError, match=r"each batch must be a pair \(x, targets\)"):
        collect(params, [x[None]])


# ---- exclude_parallel=False and canonizers= ------------------------------------------------------

def small_resnet() -> nn.Module:
    """Two torchvision BasicBlocks of 4 channels: a skip connection around "3.conv1"."""
    from torchvision.models.resnet import BasicBlock
    torch.manual_seed(0)
    return randomize(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), BasicBlock(4, 4), BasicBlock(4, 4),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)), 1)


def crp_parallel_reference(model, composite_name, x, targets, layer, concepts, exclude_parallel):
    maps = []
    for b in range(len(x)):
        attribution = CondAttribution(copy.deepcopy(model))
        composite = ZENNIT[composite_name](canonizers=[ResNetCanonizer()])
        result = attribution(x[b:b + 1].clone().requires_grad_(True),
                             [{layer: list(c), "y": [int(targets[b])]} for c in concepts], composite,
                             exclude_parallel=exclude_parallel)
        maps.append(result.heatmap)
    return torch.stack(maps)


@pytest.mark.parametrize("composite_name", list(ZENNIT))
def test_exclude_parallel_equals_zennit_crp(composite_name):
    model = small_resnet()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        targets = model(x).argmax(1)
    f, params = fxattr.functionalize(model)
    concepts, layer = [(0,), (1, 3)], "3.conv1"
    got = {}
    for exclude in (True, False):
        want = replayed(f"small_resnet/{composite_name}/{layer}/exclude_parallel={exclude}",
                        lambda e=exclude: crp_parallel_reference(model, composite_name, x, targets, layer, concepts, e))
        with model_unchanged(model):
            explain = fxattr.crp(f, composite=composite_name, layer=layer, concepts=concepts,
                                 exclude_parallel=exclude)
            got[exclude] = torch.vmap(explain, in_dims=(None, 0, 0))(params, x, targets)
        assert_close_relative(got[exclude].heatmap.sum(2), want, f"exclude_parallel={exclude}")
    # the skip connection's relevance is really there, the same for every concept, and the
    # concepts' relevance at the layer does not change
    around = got[False].heatmap - got[True].heatmap
    assert float(around.norm()) > 1e-2 * float(got[False].heatmap.norm())
    torch.testing.assert_close(around[:, 0], around[:, 1])
    torch.testing.assert_close(got[False].relevance, got[True].relevance)


def test_exclude_parallel_second_order_and_loop():
    from torchvision.models.resnet import BasicBlock
    torch.manual_seed(3)
    model = randomize(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), BasicBlock(2, 2), nn.Flatten(),
                                    nn.Linear(2 * 3 * 3, 2)), 4).double()
    f, params = fxattr.functionalize(model)
    explain = fxattr.crp(f, rule="epsilon", epsilon=0.1, layer="1.conv1", concepts=[0, 1],
                         exclude_parallel=False)
    x = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    targets = torch.tensor([0, 1, 1])
    vmapped = torch.vmap(explain, in_dims=(None, 0, 0))(params, x, targets)
    for b in range(3):
        torch.testing.assert_close(vmapped.heatmap[b], explain(params, x[b], targets[b]).heatmap)
    v = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))

    def loss(x_, w):
        return (explain({**params, "0.weight": w}, x_, 1).heatmap * v).sum()

    inputs = (x[0].clone().requires_grad_(True), params["0.weight"].detach().clone().requires_grad_(True))
    assert torch.autograd.gradcheck(loss, inputs, atol=1e-6, rtol=1e-4)
    assert torch.autograd.gradgradcheck(loss, inputs, atol=1e-6, rtol=1e-4, fast_mode=True)


class Shrunk(nn.Module):
    """nn.Hardshrink(0.3) written as the two thresholds the canonizer below rewrites it into."""

    def forward(self, t):
        return nn.functional.threshold(t, 0.3, 0.0) - nn.functional.threshold(-t, 0.3, 0.0)


def _shrink_model(activation: nn.Module) -> nn.Module:
    torch.manual_seed(4)
    return randomize(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), activation,
                                   nn.Conv2d(3, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 3)), 5)


def test_canonizers_rewrite_graph_and_params():
    """crp(canonizers=[...]) equals crp on the model the canonizers describe: a graph rewrite
    (Hardshrink, which has no LRP rule, into thresholds) and a parameter transform."""
    model, written = _shrink_model(nn.Hardshrink(0.3)), _shrink_model(Shrunk())
    f, params = fxattr.functionalize(model)
    g, _ = fxattr.functionalize(written)
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(11))
    targets = torch.tensor([0, 2])
    shrink = fxattr.lrp.replace_modules(nn.Hardshrink, Shrunk().forward)
    double_first = fxattr.lrp.Canonizer("double", params=lambda p, gm: {**p, "0.weight": 2 * p["0.weight"]})
    with model_unchanged(model):
        explain = fxattr.crp(f, composite="epsilon_plus", layer="3", concepts=[0, (1, 2)],
                             canonizers=[shrink, double_first], exclude_parallel=False)
        got = torch.vmap(explain, in_dims=(None, 0, 0))(params, x, targets)
    want = torch.vmap(fxattr.crp(g, composite="epsilon_plus", layer="3", concepts=[0, (1, 2)]),
                      in_dims=(None, 0, 0))({**params, "0.weight": 2 * params["0.weight"]}, x, targets)
    torch.testing.assert_close(got.heatmap, want.heatmap)
    torch.testing.assert_close(got.relevance, want.relevance)
    assert float(got.heatmap.norm()) > 0
    collect = fxattr.crp_reference_samples(f, layer="3", composite="epsilon_plus", canonizers=[shrink, double_first])
    scores = torch.vmap(collect.scores, in_dims=(None, 0, 0))(params, x, targets)
    every = torch.vmap(fxattr.crp(g, composite="epsilon_plus", layer="3"), in_dims=(None, 0, 0))(
        {**params, "0.weight": 2 * params["0.weight"]}, x, targets)
    torch.testing.assert_close(scores, every.relevance)
    with pytest.raises(fxattr.FxattrError, match=r"fxattr\.crp: .*no rule|fxattr\.crp: .*Hardshrink"):
        fxattr.crp(f, composite="epsilon_plus", layer="3")
    with pytest.raises(fxattr.FxattrError, match=r"fxattr\.crp: canonizers must be a list"):
        fxattr.crp(f, composite="epsilon_plus", layer="3", canonizers=shrink)
    with pytest.raises(fxattr.FxattrError, match=r"fxattr\.crp: exclude_parallel must be"):
        fxattr.crp(f, composite="epsilon_plus", layer="3", exclude_parallel="no")
