"""Layers returning a tuple of tensors (issue 14 item 1): captum's Layer* methods attribute to each
tensor and return a tuple; fxattr cuts the graph at all of them at once (fxattr.layers._parts).

Models: captum's ``BasicModel_MultiLayer(multi_input_module=True)`` (its ``MultiRelu`` returns two
ReLUs; weights perturbed so that the two parts differ, float64) and a CNN whose block returns its
two branches in the opposite order of their computation (the tuple's order is read from the
module, not from the graph's order). Equal to captum to 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxattr
import fxattr.layers as L
from tests.contract import model_unchanged

captum = pytest.importorskip("captum.attr")
basic_models = pytest.importorskip("captum.testing.helpers.basic_models")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def multi_layer():
    model = basic_models.BasicModel_MultiLayer(multi_input_module=True).double().eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the two parts of MultiRelu differ (captum's weights make them equal)
        for name in ("linear1_alt", "linear2"):
            layer = getattr(model, name)
            layer.weight.add_(0.5 * torch.randn(layer.weight.shape, generator=generator, dtype=torch.float64))
    return model


class TwoWay(nn.Module):
    """Two branches computed a, then b, returned as (b, a)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, x):
        a = torch.tanh(self.a(x))
        b = self.b(x).relu()
        return b, a


class TwoWayNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 2, 3, padding=1)
        self.block = TwoWay()
        self.fc = nn.Linear(7 * 4 * 4, 3)

    def forward(self, x):
        b, a = self.block(torch.relu(self.stem(x)))
        return self.fc(torch.cat([a, 2 * b], 1).flatten(1))


def two_way():
    torch.manual_seed(0)
    return TwoWayNet().double().eval()


def cases(layer, to_input):
    """(name, fxattr factory, captum class, captum attribute kwargs, takes a target)."""
    kw = {"layer": layer, "attribute_to_layer_input": to_input}
    return [
        ("layer_activation", lambda f: L.layer_activation(f, **kw), captum.LayerActivation, {}, False),
        ("layer_gradient_x_activation", lambda f: L.layer_gradient_x_activation(f, **kw),
         captum.LayerGradientXActivation, {}, True),
        ("layer_gradient_x_activation/gradient", lambda f: L.layer_gradient_x_activation(
            f, multiply_by_inputs=False, **kw), lambda m, l: captum.LayerGradientXActivation(
            m, l, multiply_by_inputs=False), {}, True),
        ("layer_integrated_gradients", lambda f: L.layer_integrated_gradients(f, steps=5, **kw),
         captum.LayerIntegratedGradients, {"n_steps": 5}, True),
        ("layer_conductance", lambda f: L.layer_conductance(f, steps=5, **kw),
         captum.LayerConductance, {"n_steps": 5}, True),
        ("internal_influence", lambda f: L.internal_influence(f, steps=5, **kw),
         captum.InternalInfluence, {"n_steps": 5}, True),
        ("layer_feature_ablation", lambda f: L.layer_feature_ablation(f, **kw), captum.LayerFeatureAblation, {}, True),
    ]


@pytest.mark.parametrize("which", ["multi_relu", "multi_relu/input", "two_way"])
def test_tuple_layers_equal_captum(which):
    """A layer returning two tensors; and (``/input``) a layer reading two tensors with
    ``attribute_to_layer_input=True`` (MultiRelu's forward(arg1, arg2))."""
    to_input = which.endswith("/input")
    if which.startswith("multi_relu"):
        model, layer_name = multi_layer(), "multi_relu"
        x = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    else:
        model, layer_name = two_way(), "block"
        x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    layer = model.get_submodule(layer_name)
    f, params = fxattr.functionalize(model)
    t = torch.tensor([0, 1, 1])
    for name, make, cls, kwargs, targeted in cases(layer_name, to_input):
        with model_unchanged(model):
            ours = torch.vmap(make(f), in_dims=(None, 0, 0))(params, x, t)
        theirs = cls(model, layer).attribute(x, **({"target": t} if targeted else {}), **kwargs,
                                             attribute_to_layer_input=to_input)
        assert isinstance(ours, tuple) and isinstance(theirs, tuple) and len(ours) == len(theirs) == 2, name
        for part, (o, w) in enumerate(zip(ours, theirs)):
            assert o.shape == w.shape, (name, part, o.shape, w.shape)
            scale = float(w.abs().max())
            assert scale > 1e-8, (name, part)
            error = float((o - w.detach()).abs().max()) / scale
            assert error <= 1e-5, f"{name} part {part}: max relative error {error:.3g}"
        if name == "layer_activation":  # the parts differ, so a swap would be caught
            assert not torch.allclose(ours[0].flatten()[:3], ours[1].flatten()[:3])


def test_tuple_layer_gradient_shap_on_the_same_draws(monkeypatch):
    import numpy as np
    model = two_way()
    f, params = fxattr.functionalize(model)
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.tensor([2, 0])
    refs = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    samples, sigma = 3, 0.1
    generator = torch.Generator().manual_seed(4)
    index = torch.randint(3, (2, samples), generator=generator)
    alpha = torch.rand(2, samples, generator=generator, dtype=torch.float64)
    normal = torch.randn(2, samples, *x.shape[1:], generator=generator, dtype=torch.float64)
    explain = L.layer_gradient_shap(f, layer="block", baselines=refs, samples=samples, sigma=sigma)
    ours = torch.vmap(lambda p, xi, ti, i, a, e: explain(p, xi, ti, noise={"index": i, "alpha": a, "normal": e}),
                      in_dims=(None, 0, 0, 0, 0, 0))(params, x, t, index, alpha, normal)
    # captum's draws replayed (as in test_parity.py's LayerGradientShap case)
    monkeypatch.setattr(np.random, "choice", lambda n, k: index.reshape(-1).numpy())
    monkeypatch.setattr(np.random, "uniform", lambda lo, hi, n: alpha.reshape(-1).numpy())
    monkeypatch.setattr(torch, "normal", lambda mean, std: normal.reshape(-1, *x.shape[1:]) * std)
    theirs = captum.LayerGradientShap(model, model.block).attribute(x, refs, n_samples=samples, stdevs=sigma,
                                                                    target=t)
    monkeypatch.undo()
    assert isinstance(ours, tuple) and len(ours) == len(theirs) == 2
    for o, w in zip(ours, theirs):
        assert o.shape == w.shape
        assert float((o - w).abs().max()) <= 1e-5 * float(w.abs().max())


def test_vmap_equals_loop_second_order_and_float32():
    model = two_way()
    f, params = fxattr.functionalize(model)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t = torch.tensor([0, 1, 2])
    explain = L.layer_integrated_gradients(f, layer="block", steps=3)
    vmapped = torch.vmap(explain, in_dims=(None, 0, 0))(params, x, t)
    for b in range(3):
        for part, one in enumerate(explain(params, x[b], t[b])):
            torch.testing.assert_close(vmapped[part][b], one)
    # summation: the parts' attributions add up to f(x) - head(x, body(baseline)) up to quadrature
    # error; with a zero baseline and the exact gradient x activation of a linear head, exact
    conductance = torch.vmap(L.layer_conductance(f, layer="block", steps=32), in_dims=(None, 0, 0))(params, x, t)
    out = torch.vmap(f, in_dims=(None, 0))(params, x)
    total = sum(c.flatten(1).sum(1) for c in conductance)
    want = out[torch.arange(3), t] - f(params, torch.zeros_like(x[0]))[t]
    torch.testing.assert_close(total, want, rtol=2e-2, atol=1e-3)
    # second order w.r.t. x and a weight (gradient x activation: smooth in the tanh branch)
    v = tuple(torch.randn(s, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
              for s in [(4, 4, 4), (3, 4, 4)])
    gxa = L.layer_gradient_x_activation(f, layer="block")

    def loss(x_, w):
        parts = gxa({**params, "block.a.bias": w}, x_, 1)
        return sum((p * vi).sum() for p, vi in zip(parts, v))

    inputs = (x[0].clone().requires_grad_(True), params["block.a.bias"].detach().clone().requires_grad_(True))
    assert torch.autograd.gradcheck(loss, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(loss, inputs, fast_mode=True)
    # float32
    f32, params32 = fxattr.functionalize(two_way().float())
    parts32 = torch.vmap(L.layer_gradient_x_activation(f32, layer="block"), in_dims=(None, 0, 0))(
        params32, x.float(), t)
    ref = torch.vmap(gxa, in_dims=(None, 0, 0))(params, x, t)
    for p32, p64 in zip(parts32, ref):
        assert p32.dtype == torch.float32
        torch.testing.assert_close(p32.double(), p64, rtol=1e-4, atol=1e-5)


def test_tuple_layer_errors():
    model = two_way()
    f, params = fxattr.functionalize(model)
    # a neuron is a unit of one tensor: name one part
    with pytest.raises(fxattr.FxattrError, match=r"fxattr\.layers\.neuron: layer 'block' returns a structure, not one "
                                                 r"tensor; name a node of the graph instead"):
        L.neuron(f, layer="block")
    # an input of the layer that is also read outside it cannot be replaced for the layer alone
    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(3, 3), nn.Linear(3, 3)
            self.multi_relu = basic_models.MultiRelu()

        def forward(self, x):
            a = self.l1(x)
            p, q = self.multi_relu(a, self.l2(x))
            return p + q + a

    leaky_f, _ = fxattr.functionalize(Leaky().eval())
    with pytest.raises(fxattr.FxattrError, match=r"the input 'l1' of layer 'multi_relu' is also read outside "
                                                 r"the layer \(by add_1\)"):
        L.layer_gradient_x_activation(leaky_f, layer="multi_relu", attribute_to_layer_input=True)
    # a part named by its node is a layer of its own
    x = torch.randn(2, 4, 4, dtype=torch.float64)
    whole = L.layer_gradient_x_activation(f, layer="block")(params, x, 1)
    torch.testing.assert_close(L.layer_gradient_x_activation(f, layer="tanh")(params, x, 1), whole[1])


@pytest.mark.slow
def test_compile_equals_eager():
    f, params = fxattr.functionalize(two_way().float())
    explain = L.layer_gradient_x_activation(f, layer="block")  # one example: compile time is the cost
    x = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(7))
    torch._dynamo.reset()
    eager = explain(params, x, 2)
    compiled = torch.compile(explain)(params, x, 2)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("to_input", [False, True])
def test_tuple_layer_deeplift_equals_captum_and_lrp_equals_its_parts(to_input):
    """LayerDeepLift / LayerDeepLiftShap on MultiRelu (its output, or its two inputs) equal captum's; captum's LayerLRP
    has no rule for MultiRelu, so LRP is checked against fxattr's own per-part cuts (the reverse
    walk above the layer is the same whichever nodes are cut)."""
    model = multi_layer()
    f, params = fxattr.functionalize(model)
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([0, 1, 1])
    kw = {"layer": "multi_relu", "attribute_to_layer_input": to_input}
    with model_unchanged(model):
        ours = torch.vmap(L.layer_deeplift(f, **kw), in_dims=(None, 0, 0))(params, x, t)
    theirs = captum.LayerDeepLift(model, model.multi_relu).attribute(x, target=t, attribute_to_layer_input=to_input)
    for o, w in zip(ours, theirs, strict=True):
        assert float(w.abs().max()) > 1e-3
        assert float((o - w.detach()).abs().max()) <= 1e-5 * float(w.abs().max())
    parts = ("linear1", "linear1_alt") if to_input else ("multi_relu_relu1", "multi_relu_relu2")
    refs = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    shap = torch.vmap(L.layer_deeplift_shap(f, baselines=refs, **kw), in_dims=(None, 0, 0))(params, x, t)
    theirs = captum.LayerDeepLiftShap(model, model.multi_relu).attribute(x, refs, target=t,
                                                                         attribute_to_layer_input=to_input)
    for o, w in zip(shap, theirs, strict=True):
        assert float(w.abs().max()) > 1e-3
        assert float((o - w.detach()).abs().max()) <= 1e-5 * float(w.abs().max())
    lrp = torch.vmap(L.layer_lrp(f, rule="epsilon", epsilon=1e-9, **kw), in_dims=(None, 0, 0))(params, x, t)
    deeplift_parts = []
    for i, node in enumerate(parts):
        one = torch.vmap(L.layer_lrp(f, layer=node, rule="epsilon", epsilon=1e-9), in_dims=(None, 0, 0))(params, x, t)
        torch.testing.assert_close(lrp[i], one)
        deeplift_parts.append(torch.vmap(L.layer_deeplift(f, layer=node), in_dims=(None, 0, 0))(params, x, t))
    for o, p in zip(ours, deeplift_parts):
        torch.testing.assert_close(o, p)
