"""The contract every fxattr explainer keeps, for fxattr.layers: vmap == loop (float32 and
float64), second derivatives against finite differences (float64), compile == eager, the model
untouched, neurons mapped with torch.vmap, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxattr
import fxattr.layers as L
from tests.contract import model_unchanged
from tests.layers.models import inputs, small_cnn, smooth_cnn

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LAYER = "1"  # the smooth CNN's first Tanh (nn.Sequential index): a non-linear head after it


def _methods(refs):
    """Every layer method, configured small."""
    return {
        "layer_activation": lambda f, **kw: L.layer_activation(f, **kw),
        "layer_gradient_x_activation": lambda f, **kw: L.layer_gradient_x_activation(f, **kw),
        "layer_integrated_gradients": lambda f, **kw: L.layer_integrated_gradients(f, steps=4, **kw),
        "layer_conductance": lambda f, **kw: L.layer_conductance(f, steps=4, **kw),
        "internal_influence": lambda f, **kw: L.internal_influence(f, steps=4, **kw),
        "layer_feature_ablation": lambda f, **kw: L.layer_feature_ablation(f, **kw),
        "layer_deeplift": lambda f, **kw: L.layer_deeplift(f, **kw),
        "layer_deeplift_shap": lambda f, **kw: L.layer_deeplift_shap(f, baselines=refs, **kw),
        "layer_lrp": lambda f, **kw: L.layer_lrp(f, rule="epsilon", epsilon=1e-6, **kw),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vmap_equals_loop_and_model_unchanged(dtype):
    model = small_cnn(dtype, pool="avg")
    f, params = fxattr.functionalize(model)
    xs, targets = inputs(3, dtype=dtype), torch.tensor([0, 1, 2])
    refs = inputs(2, dtype=dtype, seed=7)
    with model_unchanged(model):
        for name, make in _methods(refs).items():
            for to_input in [False, True]:
                explain = make(f, layer="features.2", attribute_to_layer_input=to_input)
                vmapped = torch.vmap(explain, in_dims=(None, 0, 0))(params, xs, targets)
                looped = torch.stack([explain(params, x, t) for x, t in zip(xs, targets)])
                assert vmapped.dtype == dtype
                assert vmapped.shape == (3, 5, 6, 6) if not to_input else (3, 4, 6, 6)
                torch.testing.assert_close(vmapped, looped, msg=name)
                if name not in ("layer_activation",):
                    assert vmapped.abs().max() > 0, name
        explain = L.layer_gradient_shap(f, layer="features.2", baselines=refs, samples=3, sigma=0.1)
        torch.manual_seed(0)
        vmapped = torch.vmap(explain, in_dims=(None, 0, 0), randomness="different")(params, xs, targets)
        torch.manual_seed(0)  # "different": one draw of (3, samples) per call, example-major
        index, alpha = torch.randint(2, (3, 3)), torch.rand(3, 3, dtype=dtype)
        normal = torch.randn(3, 3, 2, 6, 6, dtype=dtype)
        looped = torch.stack([explain(params, xs[i], targets[i], noise={"index": index[i], "alpha": alpha[i],
                                                                       "normal": normal[i]})
                              for i in range(3)])
        torch.testing.assert_close(vmapped, looped)
        explain = L.neuron_conductance(f, layer="features.2", steps=4)
        units = torch.tensor([3, 40, 100])
        vmapped = torch.vmap(explain, in_dims=(None, 0, 0, 0))(params, xs, targets, units)
        looped = torch.stack([explain(params, x, t, n) for x, t, n in zip(xs, targets, units)])
        torch.testing.assert_close(vmapped, looped)


def test_many_neurons_in_one_call():
    """torch.vmap over neuron indices (flat targets of fxattr.layers.neuron) == one call per neuron,
    for a gradient method and a graph-based one, and a neuron's gradient is the row of the
    layer's Jacobian."""
    model = small_cnn(pool="avg")
    f, params = fxattr.functionalize(model)
    x = inputs(1)[0]
    f_layer = L.neuron(f, layer="features.3")
    units = torch.tensor([0, 17, 45, 179])
    for explain in [fxattr.integrated_gradients(f_layer, steps=4), fxattr.deeplift(f_layer)]:
        many = torch.vmap(explain, in_dims=(None, None, 0))(params, x, units)
        one_by_one = torch.stack([explain(params, x, int(u)) for u in units])
        torch.testing.assert_close(many, one_by_one)
    jacobian = torch.autograd.functional.jacobian(lambda z: model.features[:4](z[None])[0].reshape(-1), x)
    many = torch.vmap(fxattr.gradient(f_layer), in_dims=(None, None, 0))(params, x, units)
    torch.testing.assert_close(many, jacobian[units])
    # a tuple index, flat
    assert L.flat_index((5, 6, 6), (1, 2, 3)) == 36 + 12 + 3
    assert float(f_layer(params, x).reshape(-1)[L.flat_index((5, 6, 6), (1, 2, 3))]) == \
        float(model.features[:4](x[None])[0, 1, 2, 3])


def test_layer_list_module_object_and_completeness():
    model = small_cnn(pool="avg")
    f, params = fxattr.functionalize(model)
    x, t = inputs(1)[0], 1
    both = L.layer_integrated_gradients(f, layer=["features.2", model.classifier[0]], steps=64)(params, x, t)
    assert isinstance(both, tuple) and both[0].shape == (5, 6, 6) and both[1].shape == (6,)
    alone = L.layer_integrated_gradients(f, layer="classifier.0", steps=64)(params, x, t)
    torch.testing.assert_close(both[1], alone)
    # layer IG: sum == f(x) - head(x, body(0)) (a sequential model: f(0)) up to the quadrature's
    # error on the ReLU kinks; DeepLIFT exactly
    with torch.no_grad():
        delta = model(x[None])[0, t] - model(torch.zeros_like(x)[None])[0, t]
    torch.testing.assert_close(both[0].sum(), delta, rtol=1e-2, atol=1e-6)
    torch.testing.assert_close(L.layer_deeplift(f, layer="features.2")(params, x, t).sum(), delta)
    # conductance: the units' conductances add up to f(x) - f(0) (as the steps grow)
    cond = L.layer_conductance(f, layer="features.2", steps=64)(params, x, t)
    torch.testing.assert_close(cond.sum(), delta, rtol=2e-2, atol=1e-4)


def _second_order(explain, params, x, target, names):
    """d <v, explain> / d(x, some params) against finite differences, float64 (the first check is
    a second derivative of the model for gradient-type explainers)."""
    out = explain(params, x, target)
    v = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)

    def loss(x_, *chosen):
        p = dict(params)
        p.update(zip(names, chosen))
        return (explain(p, x_, target) * v).sum()

    args = (x.clone().requires_grad_(), *[params[n].detach().clone().requires_grad_() for n in names])
    assert torch.autograd.gradcheck(loss, args, atol=1e-5, rtol=1e-3, fast_mode=True)
    functional = torch.func.grad(lambda x_: loss(x_, *[params[n] for n in names]))(x)
    (autograd,) = torch.autograd.grad(loss(args[0], *[params[n] for n in names]), args[0])
    torch.testing.assert_close(functional, autograd)


@pytest.mark.parametrize("name", ["layer_gradient_x_activation", "layer_integrated_gradients",
                                  "layer_conductance", "internal_influence", "layer_gradient_shap",
                                  "neuron_conductance"])
def test_second_order_against_finite_differences(name):
    model = smooth_cnn()
    f, params = fxattr.functionalize(model)
    x = inputs(1)[0]
    names = ["0.weight", "2.bias"]
    if name == "layer_gradient_shap":
        refs = inputs(2, seed=4)
        inner = L.layer_gradient_shap(f, layer=LAYER, baselines=refs, samples=2, sigma=0.1)
        noise = {"index": torch.tensor([0, 1]), "alpha": torch.tensor([0.3, 0.8], dtype=torch.float64),
                 "normal": inputs(2, seed=6)}
        explain = lambda p, x_, t: inner(p, x_, t, noise=noise)
    elif name == "neuron_conductance":
        inner = L.neuron_conductance(f, layer=LAYER, steps=3)
        explain = lambda p, x_, t: inner(p, x_, t, 20)
    else:
        explain = _methods(None)[name](f, layer=LAYER)
    _second_order(explain, params, x, 1, names)


@pytest.mark.slow
def test_compile_equals_eager():
    model = small_cnn(torch.float32, pool="avg")
    f, params = fxattr.functionalize(model)
    xs, targets = inputs(2, dtype=torch.float32), torch.tensor([0, 2])
    explain = L.layer_integrated_gradients(f, layer="features.2", steps=2, chunk_size=None)
    batched = torch.vmap(explain, in_dims=(None, 0, 0))
    torch._dynamo.reset()
    eager = batched(params, xs, targets)
    compiled = torch.compile(batched)(params, xs, targets)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + self.conv(h)
        return self.fc(h.mean((2, 3)))


def test_errors_name_the_argument_at_fault():
    """x missing an axis, integer x into a model without an embedding, a string steps, a bad
    neuron and a bad layer_mask: each an FxattrError under fxattr.layers.<name> naming what was wrong."""
    model = small_cnn(pool="avg")
    f, params = fxattr.functionalize(model)
    x = inputs(1)[0]
    for name, make in _methods(torch.zeros(2, *x.shape)).items():
        with pytest.raises(fxattr.FxattrError, match=rf"^fxattr\.layers\.{name}: the model failed on one example "
                                                     r"of shape \(6, 6\)"):
            make(f, layer="features.2")(params, x[0], 0)
    for name in ("layer_activation", "layer_gradient_x_activation", "layer_integrated_gradients",
                 "layer_feature_ablation"):
        with pytest.raises(fxattr.FxattrError, match=rf"^fxattr\.layers\.{name}: x must be a floating-point "
                                                     "tensor, got dtype torch.int64"):
            getattr(L, name)(f, layer="features.2")(params, x.round().long(), 0)
    with pytest.raises(fxattr.FxattrError, match=r"^fxattr\.layers\.layer_conductance: steps must be an int"):
        L.layer_conductance(f, layer="features.2", steps="3")
    explain = L.neuron_conductance(f, layer="features.2", steps=2)
    with pytest.raises(fxattr.FxattrError, match=r"^fxattr\.layers\.neuron_conductance: neuron -1 is out of "
                                                 "range for the layer's activation"):
        explain(params, x, 0, -1)
    with pytest.raises(fxattr.FxattrError, match=r"^fxattr\.layers\.neuron_conductance: neuron must be a signed"):
        explain(params, x, 0, torch.tensor(1.0))
    with pytest.raises(fxattr.FxattrError, match=r"^fxattr\.layers\.neuron_conductance: target 9 is out of range"):
        explain(params, x, 9, 1)  # the model's target keeps its own name
    with pytest.raises(fxattr.FxattrError, match=r"^fxattr\.layers\.layer_feature_ablation: layer_mask of shape "
                                                 r"\(3, 3\) does not broadcast to the layer's activation shape"):
        L.layer_feature_ablation(f, layer="features.2", layer_mask=torch.zeros(3, 3, dtype=torch.long))(params, x, 0)
    with pytest.raises(fxattr.FxattrError, match=r"^fxattr\.layers\.layer_feature_ablation: layer_mask must be"):
        L.layer_feature_ablation(f, layer="features.2", layer_mask=torch.zeros(1, 6, 6))


def test_clear_errors():
    model = small_cnn(pool="avg")
    f, params = fxattr.functionalize(model)
    x = inputs(1)[0]
    cases = [
        (lambda: L.layer_integrated_gradients(f, layer="features.22"), "features.22"),
        (lambda: L.layer_integrated_gradients(f, layer=3), "layer must be"),
        (lambda: L.layer_integrated_gradients(f, layer=[]), "layer must be"),
        (lambda: L.layer_integrated_gradients(f, layer=nn.ReLU()), "not a submodule"),
        (lambda: L.layer_integrated_gradients(f, layer="features.2", steps=0), "steps"),
        (lambda: L.layer_integrated_gradients(f, layer="features.2", method="simpson"), "method"),
        (lambda: L.layer_integrated_gradients(f, layer="features.2", baseline=float("nan")), "baseline"),
        (lambda: L.layer_conductance(f, layer="features.2", chunk_size=0), "chunk_size"),
        (lambda: L.layer_gradient_x_activation(f, layer="features.2", attribute_to_layer_input=1),
         "attribute_to_layer_input"),
        (lambda: L.layer_gradient_shap(f, layer="features.2", baselines="zeros"), "baselines"),
        (lambda: L.layer_gradient_shap(f, layer="features.2", baselines=torch.zeros(1, 2, 6, 6), sigma=-1), "sigma"),
        (lambda: L.layer_deeplift(f, layer="features.2", rule="linear"), "rule"),
        (lambda: L.layer_deeplift(f, layer="features.2", multiply_by_inputs=0), "multiply_by_inputs"),
        (lambda: L.layer_deeplift_shap(f, layer="features.2", baselines=torch.zeros(0, 2, 6, 6)), "baselines"),
        (lambda: L.layer_integrated_gradients(model, layer="features.2"), "functionalize"),
        (lambda: L.layer_integrated_gradients(lambda p, x: x, layer="features.2"), "functionalize"),
        (lambda: L.neuron(f, layer=["features.0", "features.2"]), "one layer"),
        (lambda: L.flat_index((5, 6, 6), (5, 0, 0)), "does not name"),
        (lambda: L.layer_integrated_gradients(f, layer="features.2", baseline=torch.zeros(3))(params, x, 0),
         "baseline has shape"),
        (lambda: L.layer_integrated_gradients(f, layer="features.2")(params, x, 7), "out of range"),
        (lambda: L.layer_integrated_gradients(f, layer="features.2")(params, x.float(), 0), "dtype"),
        (lambda: L.layer_integrated_gradients(f, layer="features.2")(params, x * float("nan"), 0), "NaN"),
        (lambda: L.neuron_conductance(f, layer="features.2")(params, x, 0), "neuron must be"),
        (lambda: L.layer_gradient_shap(f, layer="features.2", baselines=torch.zeros(2, 3))(params, x, 0),
         "baselines have shape"),
    ]
    for make, words in cases:
        with pytest.raises(fxattr.FxattrError, match=words):
            make()
    # errors of what a layer method builds on are reported under its own name, at construction
    for make, where in [
        (lambda: L.layer_integrated_gradients(f, layer="features.22"), "layer_integrated_gradients"),
        (lambda: L.layer_lrp(f, layer="features.2", rule="no-such-rule"), "layer_lrp"),
        (lambda: L.layer_lrp(f, layer="features.2"), "layer_lrp"),
        (lambda: L.layer_feature_ablation(f, layer="features.2", chunk_size=-1), "layer_feature_ablation"),
        (lambda: L.layer_feature_ablation(f, layer="features.2", baseline=float("inf")), "layer_feature_ablation"),
        (lambda: L.neuron(f, layer="features.9"), "neuron"),
    ]:
        with pytest.raises(fxattr.FxattrError, match=rf"^fxattr\.layers\.{where}: "):
            make()
    # a layer's input that is also read outside the layer (the identity branch): an error, never a
    # different cut
    fr, _ = fxattr.functionalize(Residual().double().eval())
    with pytest.raises(fxattr.FxattrError, match="also read outside the layer"):
        L.layer_integrated_gradients(fr, layer="conv", attribute_to_layer_input=True)
    # the layer reading the model's input: the cut is the identity, the input attribution itself
    ig = L.layer_integrated_gradients(f, layer="features.0", steps=8, attribute_to_layer_input=True)(params, x, 1)
    torch.testing.assert_close(ig, fxattr.integrated_gradients(f, steps=8)(params, x, 1))
    with pytest.raises(fxattr.FxattrError, match="model's input"):
        L.neuron(f, layer="features.0", attribute_to_layer_input=True)


def test_graph_engine_failure_is_a_named_error():
    """fxattr's graph engine cannot run captum's BasicModel_MultiLayer (it fails on the whole model
    too): layer DeepLIFT says so under its own name instead of returning anything."""
    basic_models = pytest.importorskip("captum.testing.helpers.basic_models")
    model = basic_models.BasicModel_MultiLayer().double().eval()
    f, params = fxattr.functionalize(model)
    x = torch.tensor([0.0, 100.0, 0.0], dtype=torch.float64)
    try:
        fxattr.deeplift(f)(params, x, 0)
    except fxattr.FxattrError:
        with pytest.raises(fxattr.FxattrError, match=r"fxattr\.layers\.layer_deeplift: "):
            L.layer_deeplift(f, layer="linear1")(params, x, 0)
    else:  # the engine learned this model: then the layer version must agree with captum
        captum = pytest.importorskip("captum.attr")
        ours = L.layer_deeplift(f, layer="linear1")(params, x, 0)
        theirs = captum.LayerDeepLift(model, model.linear1).attribute(x[None], target=0)[0]
        torch.testing.assert_close(ours, theirs.detach())


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, 4, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        out, _ = self.gru(x)
        return self.fc(out[:, -1])


def test_layer_returning_a_tuple():
    """nn.GRU returns (output, hidden): naming it is a clear error pointing at its parts' graph
    nodes; naming the part is a layer like any other."""
    model = Recurrent().double().eval()
    f, params = fxattr.functionalize(model)
    x = inputs(1, shape=(5, 3))[0]
    with pytest.raises(fxattr.FxattrError, match="returns a tuple.*getitem"):
        L.layer_gradient_x_activation(f, layer="gru")(params, x, 1)
    gm = fxattr.graph.trace(f)
    part = next(n.name for n in gm.graph.nodes if n.op == "call_function" and n.args and
                getattr(n.args[0], "name", None) == "gru" and n.args[1] == 0)
    ours = L.layer_gradient_x_activation(f, layer=part)(params, x, 1)
    out, _ = model.gru(x[None])
    out = out.detach().requires_grad_()
    (g,) = torch.autograd.grad(model.fc(out[:, -1])[0, 1], out)
    torch.testing.assert_close(ours, (out * g)[0].detach())


def test_empty_batch_and_default_target():
    """vmap over zero examples gives an empty result of the layer's shape without running the
    model; target=None explains the argmax at x."""
    model = small_cnn(pool="avg")
    f, params = fxattr.functionalize(model)
    xs = inputs(2)
    for explain in [L.layer_integrated_gradients(f, layer="features.2", steps=4),
                    L.layer_deeplift(f, layer="features.2"), L.layer_feature_ablation(f, layer="features.2"),
                    L.layer_lrp(f, layer="features.2", rule="epsilon")]:
        empty = torch.vmap(explain, in_dims=(None, 0, 0))(params, xs[:0], torch.zeros(0, dtype=torch.long))
        assert empty.shape == (0, 5, 6, 6)
        argmax = int(model(xs[:1]).argmax())
        torch.testing.assert_close(explain(params, xs[0]), explain(params, xs[0], argmax))
