"""fxattr.layers against captum's Layer* and Neuron* classes on the same models (float64, 1e-5
relative to the largest attribution): a small CNN, a torchvision resnet18 at 32 px with calibrated
batch-norm statistics and random biases, and captum's own test models.

Known, deliberate differences (not tested for parity): captum's DeepLift breaks summation to delta
on an activation feeding max pooling (fxattr does not; the DeepLIFT cases use average pooling);
captum's DeepLift / LRP / guided backprop hook modules and cannot run torchvision's resnet (one ReLU
module called twice per block), so the graph-based methods are compared on the CNNs only.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fxattr
import fxattr.layers as L
from tests.layers.models import inputs, resnet18, small_cnn

captum = pytest.importorskip("captum.attr")
basic_models = pytest.importorskip("captum.testing.helpers.basic_models")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ERRORS: dict = {}  # (fxattr method, captum class) -> max relative error, for tests/layers/parity_table.py


def assert_parity(key, ours, theirs, rtol=1e-5):
    theirs = theirs.detach()
    scale = float(theirs.abs().max())
    assert scale > 1e-8, f"{key}: captum's attributions are all zero; the comparison would be empty"
    error = float((ours - theirs).abs().max()) / scale
    ERRORS[key] = max(error, ERRORS.get(key, 0.0))
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    assert error <= rtol, f"{key}: max relative error {error:.3g}"


def batched(explain, params, x, t):
    return torch.vmap(explain, in_dims=(None, 0, 0))(params, x, t)


@pytest.fixture(scope="module")
def cnn():
    model = small_cnn(pool="avg")
    f, params = fxattr.functionalize(model)
    x = inputs(3)
    return model, f, params, x, torch.tensor([0, 2, 1])


@pytest.fixture(scope="module")
def cnn_max():
    model = small_cnn(pool="max")
    f, params = fxattr.functionalize(model)
    return model, f, params, inputs(3), torch.tensor([1, 0, 2])


@pytest.fixture(scope="module")
def resnet():
    model = resnet18()
    f, params = fxattr.functionalize(model)
    x = inputs(2, shape=(3, 32, 32), seed=3)
    return model, f, params, x, torch.tensor([4, 7])


def _layer_cases(refs):
    """(name, fxattr factory, captum class, captum kwargs): the same method configured alike."""
    return [
        ("layer_activation", lambda f, **kw: L.layer_activation(f, **kw), captum.LayerActivation, {}, False),
        ("layer_gradient_x_activation", lambda f, **kw: L.layer_gradient_x_activation(f, **kw),
         captum.LayerGradientXActivation, {}, True),
        ("layer_integrated_gradients", lambda f, **kw: L.layer_integrated_gradients(f, steps=6, **kw),
         captum.LayerIntegratedGradients, {"n_steps": 6}, True),
        ("layer_conductance", lambda f, **kw: L.layer_conductance(f, steps=6, **kw),
         captum.LayerConductance, {"n_steps": 6}, True),
        ("internal_influence", lambda f, **kw: L.internal_influence(f, steps=6, **kw),
         captum.InternalInfluence, {"n_steps": 6}, True),
        ("layer_feature_ablation", lambda f, **kw: L.layer_feature_ablation(f, **kw),
         captum.LayerFeatureAblation, {}, True),
    ]


@pytest.mark.parametrize("to_input", [False, True])
def test_layer_methods_on_a_cnn(cnn, to_input):
    model, f, params, x, t = cnn
    refs = inputs(4, seed=5)
    kw = {"attribute_to_layer_input": to_input}
    for name, make, cls, ckw, targeted in _layer_cases(refs):
        ours = batched(make(f, layer="features.2", **kw), params, x, t)
        extra = {"target": t} if targeted else {}
        theirs = cls(model, model.features[2]).attribute(x, **extra, **ckw, **kw)
        assert_parity((name, cls.__name__), ours, theirs)
    # DeepLIFT, DeepLiftShap and LRP on the head's own graph
    ours = batched(L.layer_deeplift(f, layer="features.2", **kw), params, x, t)
    assert_parity(("layer_deeplift", "LayerDeepLift"), ours,
                  captum.LayerDeepLift(model, model.features[2]).attribute(x, target=t, **kw))
    ours = batched(L.layer_deeplift_shap(f, layer="features.2", baselines=refs, **kw), params, x, t)
    assert_parity(("layer_deeplift_shap", "LayerDeepLiftShap"), ours,
                  captum.LayerDeepLiftShap(model, model.features[2]).attribute(x, refs, target=t, **kw))
    twin = copy.deepcopy(model)
    for layer, module in [("features.2", twin.features[2]), ("classifier.0", twin.classifier[0])]:
        ours = batched(L.layer_lrp(f, layer=layer, rule="epsilon", epsilon=1e-9, **kw), params, x, t)
        assert_parity(("layer_lrp", "LayerLRP"), ours, captum.LayerLRP(twin, module).attribute(x, target=t, **kw))


def test_layer_options_on_a_cnn(cnn):
    model, f, params, x, t = cnn
    layer = model.features[2]
    base = inputs(1, seed=9)[0] * 0.3
    ours = batched(L.layer_integrated_gradients(f, layer="features.2", steps=8, baseline=base,
                                                method="riemann_middle", multiply_by_inputs=False), params, x, t)
    theirs = captum.LayerIntegratedGradients(model, layer, multiply_by_inputs=False).attribute(
        x, base[None].expand_as(x), target=t, n_steps=8, method="riemann_middle")
    assert_parity(("layer_integrated_gradients", "LayerIntegratedGradients"), ours, theirs)
    ours = batched(L.layer_conductance(f, layer="features.2", steps=8, baseline=base,
                                       method="riemann_left"), params, x, t)
    theirs = captum.LayerConductance(model, layer).attribute(x, base[None].expand_as(x), target=t,
                                                             n_steps=8, method="riemann_left")
    assert_parity(("layer_conductance", "LayerConductance"), ours, theirs)
    ours = batched(L.layer_gradient_x_activation(f, layer="features.2", multiply_by_inputs=False), params, x, t)
    theirs = captum.LayerGradientXActivation(model, layer, multiply_by_inputs=False).attribute(x, target=t)
    assert_parity(("layer_gradient_x_activation", "LayerGradientXActivation"), ours, theirs)
    ours = batched(L.layer_deeplift(f, layer="features.2", baseline=base), params, x, t)
    theirs = captum.LayerDeepLift(model, layer).attribute(x, base[None].expand_as(x), target=t)
    assert_parity(("layer_deeplift", "LayerDeepLift"), ours, theirs)
    # groups of units and a layer baseline
    mask = torch.arange(5 * 6 * 6).reshape(5, 6, 6) // 9
    ours = batched(L.layer_feature_ablation(f, layer="features.2", layer_mask=mask, baseline=0.5), params, x, t)
    theirs = captum.LayerFeatureAblation(model, layer).attribute(x, target=t, layer_mask=mask[None],
                                                                 layer_baselines=0.5)
    assert_parity(("layer_feature_ablation", "LayerFeatureAblation"), ours, theirs)


def test_layer_gradient_shap_on_the_same_draws(cnn, monkeypatch):
    import numpy as np
    model, f, params, x, t = cnn
    refs = inputs(4, seed=5)
    samples, sigma = 5, 0.2
    generator = torch.Generator().manual_seed(4)
    index = torch.randint(4, (3, samples), generator=generator)
    alpha = torch.rand(3, samples, generator=generator, dtype=torch.float64)
    normal = torch.randn(3, samples, *x.shape[1:], generator=generator, dtype=torch.float64)
    explain = L.layer_gradient_shap(f, layer="features.2", baselines=refs, samples=samples, sigma=sigma)
    ours = torch.vmap(lambda p, xi, ti, i, a, e: explain(p, xi, ti, noise={"index": i, "alpha": a, "normal": e}),
                      in_dims=(None, 0, 0, 0, 0, 0))(params, x, t, index, alpha, normal)
    # captum expands the batch example-major (sample k of example i is row i * samples + k) and
    # draws the baseline indices with np.random.choice, alpha with np.random.uniform, the noise with
    # torch.normal: replay ours through them.
    monkeypatch.setattr(np.random, "choice", lambda n, k: index.reshape(-1).numpy())
    monkeypatch.setattr(np.random, "uniform", lambda lo, hi, n: alpha.reshape(-1).numpy())
    monkeypatch.setattr(torch, "normal", lambda mean, std: normal.reshape(-1, *x.shape[1:]) * std)
    theirs = captum.LayerGradientShap(model, model.features[2]).attribute(
        x, refs, n_samples=samples, stdevs=sigma, target=t)
    monkeypatch.undo()
    assert_parity(("layer_gradient_shap", "LayerGradientShap"), ours, theirs)


@pytest.mark.slow
def test_layer_methods_on_resnet18(resnet):
    model, f, params, x, t = resnet
    for layer, module, to_input in [("layer2", model.layer2, False), ("layer2", model.layer2, True),
                                    ("layer3.0.conv2", model.layer3[0].conv2, False)]:
        kw = {"attribute_to_layer_input": to_input}
        for name, make, cls, ckw, targeted in _layer_cases(None):
            if name == "layer_feature_ablation":
                continue  # one rerun of the head per unit: below, on groups of units
            ours = batched(make(f, layer=layer, **kw), params, x, t)
            extra = {"target": t} if targeted else {}
            theirs = cls(model, module).attribute(x, **extra, **ckw, **kw)
            assert_parity((name, cls.__name__), ours, theirs)
    # DeepLIFT on the head's graph (captum cannot run resnet: one ReLU module called twice per
    # block): where the head reads only the activation, the attributions sum to f(x) - f(0)
    with torch.no_grad():
        delta = model(x).gather(1, t[:, None])[:, 0] - model(torch.zeros_like(x)).gather(1, t[:, None])[:, 0]
    for layer in ["layer2", "layer4"]:
        ours = batched(L.layer_deeplift(f, layer=layer), params, x, t)
        torch.testing.assert_close(ours.flatten(1).sum(1), delta)
    mask = torch.arange(512).reshape(512, 1, 1) // 64
    ours = batched(L.layer_feature_ablation(f, layer="layer4.1", layer_mask=mask,
                                            attribute_to_layer_input=True), params, x, t)
    theirs = captum.LayerFeatureAblation(model, model.layer4[1]).attribute(
        x, target=t, layer_mask=mask[None], attribute_to_layer_input=True)
    assert_parity(("layer_feature_ablation", "LayerFeatureAblation"), ours, theirs)


def test_captum_basic_models():
    """captum's own test models: BasicModel_MultiLayer (optional forward arguments bound to their
    defaults) and BasicModel_ConvNet_One_Conv, on the inputs of captum's layer tests. (DeepLIFT on
    BasicModel_MultiLayer: fxattr's graph engine fails on its traced graph, for fxattr.deeplift of
    the whole model too, with a clear FxattrError; see test_errors.)"""
    model = basic_models.BasicModel_MultiLayer().double().eval()
    f, params = fxattr.functionalize(model)
    x = torch.tensor([[0.0, 100.0, 0.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    t = torch.tensor([0, 1])
    for layer in ["linear1", "relu", "linear2"]:
        module = getattr(model, layer)
        for to_input in [False, True]:
            kw = {"attribute_to_layer_input": to_input}
            ours = batched(L.layer_integrated_gradients(f, layer=layer, steps=20, **kw), params, x, t)
            theirs = captum.LayerIntegratedGradients(model, module).attribute(x, target=t, n_steps=20, **kw)
            assert_parity(("layer_integrated_gradients", "LayerIntegratedGradients"), ours, theirs)
            ours = batched(L.layer_conductance(f, layer=layer, steps=20, **kw), params, x, t)
            theirs = captum.LayerConductance(model, module).attribute(x, target=t, n_steps=20, **kw)
            if float(theirs.abs().max()) > 0:
                assert_parity(("layer_conductance", "LayerConductance"), ours, theirs)
    model = basic_models.BasicModel_ConvNet_One_Conv().double().eval()
    f, params = fxattr.functionalize(model)
    x = torch.arange(1, 33, dtype=torch.float64).reshape(2, 1, 4, 4)
    t = torch.tensor([0, 3])
    ours = batched(L.layer_gradient_x_activation(f, layer="relu1"), params, x, t)
    theirs = captum.LayerGradientXActivation(model, model.relu1).attribute(x, target=t)
    assert_parity(("layer_gradient_x_activation", "LayerGradientXActivation"), ours, theirs)
    ours = batched(L.internal_influence(f, layer="conv1", steps=10), params, x, t)
    theirs = captum.InternalInfluence(model, model.conv1).attribute(x, target=t, n_steps=10)
    assert_parity(("internal_influence", "InternalInfluence"), ours, theirs)
    for to_input in [False, True]:
        kw = {"attribute_to_layer_input": to_input}
        ours = batched(L.layer_deeplift(f, layer="fc1", baseline=0.5, **kw), params, x, t)
        theirs = captum.LayerDeepLift(model, model.fc1).attribute(x, 0.5, target=t, **kw)
        assert_parity(("layer_deeplift", "LayerDeepLift"), ours, theirs)


# ------------------------------------------------------------------------------------- neurons

def _live_unit(model_prefix, x):
    """A unit of the layer that is positive for the first example (its conductance is not 0)."""
    with torch.no_grad():
        a = model_prefix(x[:1])[0]
    flat = int(a.reshape(-1).argmax())
    index = []
    for s in reversed(a.shape):
        index.append(flat % s)
        flat //= s
    return tuple(reversed(index))


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_neuron_methods_on_a_cnn(pool, cnn, cnn_max):
    model, f, params, x, t = cnn if pool == "avg" else cnn_max
    layer = model.features[2]
    unit = _live_unit(model.features[:3], x)
    n = L.flat_index((5, 6, 6), unit)
    f_layer = L.neuron(f, layer="features.2")
    units = torch.full((x.shape[0],), n)
    refs = inputs(4, seed=5)
    cases = [
        (fxattr.gradient(f_layer), captum.NeuronGradient(model, layer).attribute(x, unit)),
        (fxattr.integrated_gradients(f_layer, steps=12),
         captum.NeuronIntegratedGradients(model, layer).attribute(x, unit, n_steps=12)),
        (fxattr.guided_backprop(f_layer, seed="one"), captum.NeuronGuidedBackprop(model, layer).attribute(x, unit)),
        (fxattr.deconvnet(f_layer, seed="one"), captum.NeuronDeconvolution(model, layer).attribute(x, unit)),
        (fxattr.feature_ablation(f_layer), captum.NeuronFeatureAblation(model, layer).attribute(x, unit)),
    ]
    if pool == "avg":  # captum's DeepLift on an activation feeding max pooling: see module doc
        cases += [
            (fxattr.deeplift(f_layer), captum.NeuronDeepLift(model, layer).attribute(x, unit)),
            (fxattr.deeplift_shap(f_layer, baselines=refs),
             captum.NeuronDeepLiftShap(model, layer).attribute(x, unit, refs)),
        ]
    for explain, theirs in cases:
        ours = batched(explain, params, x, units)
        assert_parity((f"{explain.__name__}(neuron)", _captum_name(explain.__name__)), ours, theirs)
    # attribute_to_neuron_input: a unit of the value the layer reads
    f_input = L.neuron(f, layer="features.2", attribute_to_layer_input=True)
    unit_in = _live_unit(model.features[:2], x)
    units_in = torch.full((x.shape[0],), L.flat_index((4, 6, 6), unit_in))
    ours = batched(fxattr.integrated_gradients(f_input, steps=12), params, x, units_in)
    theirs = captum.NeuronIntegratedGradients(model, layer).attribute(x, unit_in, n_steps=12,
                                                                      attribute_to_neuron_input=True)
    assert_parity(("integrated_gradients(neuron)", "NeuronIntegratedGradients"), ours, theirs)
    explain = L.neuron_conductance(f, layer="features.2", steps=12)
    ours = torch.vmap(explain, in_dims=(None, 0, 0, 0))(params, x, t, units)
    theirs = captum.NeuronConductance(model, layer).attribute(x, unit, target=t, n_steps=12, method="gausslegendre")
    assert_parity(("neuron_conductance", "NeuronConductance"), ours, theirs)


def _captum_name(name):
    return {"gradient": "NeuronGradient", "integrated_gradients": "NeuronIntegratedGradients",
            "guided_backprop": "NeuronGuidedBackprop", "deconvnet": "NeuronDeconvolution",
            "feature_ablation": "NeuronFeatureAblation", "deeplift": "NeuronDeepLift",
            "deeplift_shap": "NeuronDeepLiftShap", "gradient_shap": "NeuronGradientShap"}[name]


def test_neuron_gradient_shap_and_callable_selector(cnn, monkeypatch):
    import numpy as np
    model, f, params, x, _ = cnn
    layer = model.features[2]
    f_layer = L.neuron(f, layer="features.2")
    refs = inputs(4, seed=5)
    samples = 4
    generator = torch.Generator().manual_seed(8)
    index = torch.randint(4, (samples,), generator=generator)
    alpha = torch.rand(samples, generator=generator, dtype=torch.float64)
    explain = fxattr.gradient_shap(f_layer, baselines=refs, samples=samples)
    selector = lambda a: a[1].sum()
    ours = explain(params, x[0], selector, noise={"index": index, "alpha": alpha})
    monkeypatch.setattr(np.random, "choice", lambda n, k: index.numpy())
    monkeypatch.setattr(np.random, "uniform", lambda lo, hi, n: alpha.numpy())
    theirs = captum.NeuronGradientShap(model, layer).attribute(
        x[:1], lambda out: out[:, 1].flatten(1).sum(1), refs, n_samples=samples)[0]
    monkeypatch.undo()
    assert_parity(("gradient_shap(neuron)", "NeuronGradientShap"), ours, theirs)
    ours = torch.vmap(fxattr.integrated_gradients(f_layer, steps=10), in_dims=(None, 0, None))(params, x, selector)
    theirs = captum.NeuronIntegratedGradients(model, layer).attribute(
        x, lambda out: out[:, 1].flatten(1).sum(1), n_steps=10)
    assert_parity(("integrated_gradients(neuron)", "NeuronIntegratedGradients"), ours, theirs)


@pytest.mark.slow
def test_neuron_methods_on_resnet18(resnet):
    model, f, params, x, t = resnet
    f_layer = L.neuron(f, layer="layer2")
    unit = _live_unit(lambda z: model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(z)))))), x)
    n = L.flat_index((128, 4, 4), unit)
    units = torch.full((2,), n)
    ours = batched(fxattr.integrated_gradients(f_layer, steps=8), params, x, units)
    theirs = captum.NeuronIntegratedGradients(model, model.layer2).attribute(x, unit, n_steps=8)
    assert_parity(("integrated_gradients(neuron)", "NeuronIntegratedGradients"), ours, theirs)
    ours = torch.vmap(L.neuron_conductance(f, layer="layer2", steps=8), in_dims=(None, 0, 0, 0))(params, x, t, units)
    theirs = captum.NeuronConductance(model, model.layer2).attribute(x, unit, target=t, n_steps=8,
                                                                     method="gausslegendre")
    assert_parity(("neuron_conductance", "NeuronConductance"), ours, theirs)
    ours = batched(fxattr.gradient(f_layer), params, x, units)
    theirs = captum.NeuronGradient(model, model.layer2).attribute(x, unit)
    assert_parity(("gradient(neuron)", "NeuronGradient"), ours, theirs)


class TokenModel(torch.nn.Module):
    """A token layer: embedding -> (tokens, dim) -> linear per token -> mean -> classes."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(12, 4)
        self.mix = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embedding(ids))).mean(1))


def test_token_layers_with_integer_inputs():
    """captum's LayerIntegratedGradients on an embedding (its most common use): token ids in, a
    pad-token baseline, attributions per token and dimension; and a dense layer over tokens."""
    torch.manual_seed(0)
    model = TokenModel().double().eval()
    f, params = fxattr.functionalize(model)
    ids = torch.tensor([[1, 5, 7, 2, 9], [3, 3, 11, 0, 4]])
    t = torch.tensor([2, 0])
    pad = torch.zeros_like(ids)
    ours = batched(L.layer_integrated_gradients(f, layer="embedding", steps=10, baseline=0), params, ids, t)
    theirs = captum.LayerIntegratedGradients(model, model.embedding).attribute(ids, pad, target=t, n_steps=10)
    assert ours.shape == (2, 5, 4)
    assert_parity(("layer_integrated_gradients", "LayerIntegratedGradients"), ours, theirs)
    ours = batched(L.layer_gradient_x_activation(f, layer="mix"), params, ids, t)
    theirs = captum.LayerGradientXActivation(model, model.mix).attribute(ids, target=t)
    assert_parity(("layer_gradient_x_activation", "LayerGradientXActivation"), ours, theirs)
    mask = torch.arange(5)[:, None].expand(5, 4)  # one group per token
    ours = batched(L.layer_feature_ablation(f, layer="embedding", layer_mask=mask), params, ids, t)
    theirs = captum.LayerFeatureAblation(model, model.embedding).attribute(ids, target=t, layer_mask=mask[None])
    assert_parity(("layer_feature_ablation", "LayerFeatureAblation"), ours, theirs)
    # an input-space path over token ids is meaningless: a clear error
    with pytest.raises(fxattr.FxattrError, match="floating-point"):
        L.layer_conductance(f, layer="embedding")(params, ids[0], 0)
