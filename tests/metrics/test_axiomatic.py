"""Axiomatic metrics against Quantus 0.6.0 and against the axioms on models where they hold."""

import numpy as np
import pytest
import quantus
import torch
from torch import nn

import fxattr
from fxattr.errors import FxattrError
from fxattr.metrics import axiomatic as AX
from tests.contract import model_unchanged
from tests.metrics.conftest import inputs, tiny_cnn, tiny_mlp


class AsDouble(nn.Module):
    """Quantus casts inputs to float32; this evaluates the wrapped float64 model in float64."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.double())


@pytest.fixture
def setup():
    model = tiny_cnn(1)
    f, params = fxattr.functionalize(model)
    x, y = inputs((model, f, params), 4)
    a = torch.vmap(fxattr.input_x_gradient(f), in_dims=(None, 0, 0))(params, x, y)
    return model, f, params, x, y, a


def as_tensor(scores, dtype=torch.float64):
    return torch.tensor(np.asarray(scores).astype(np.float64), dtype=dtype)


def test_completeness_matches_quantus_and_holds_for_a_linear_model():
    # sum(x) on integer inputs: input x gradient is exactly complete, so Quantus's exact equality
    # holds; normalise=True (Quantus's default) breaks it
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).double().eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.randint(-3, 4, (2, 16)).double())
        model[1].bias.zero_()
    f, params = fxattr.functionalize(model)
    x = torch.randint(0, 5, (3, 1, 4, 4)).double()
    y = torch.tensor([0, 1, 0])
    shifted = x - x.amin((1, 2, 3), keepdim=True)  # relative to the black baseline
    a = torch.vmap(fxattr.input_x_gradient(f), in_dims=(None, 0, 0))(params, shifted, y)
    for normalise in (False, True):
        expected = quantus.Completeness(normalise=normalise, disable_warnings=True)(
            model=AsDouble(model).eval(), x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a.numpy())
        ours = torch.vmap(AX.completeness(f, normalise=normalise), in_dims=(None, 0, 0, 0))(params, x, y, a)
        assert ours.dtype == torch.bool
        assert ours.tolist() == list(map(bool, expected)) == [not normalise] * 3


def test_completeness_with_a_tolerance_separates_integrated_gradients_from_gradients():
    model = tiny_mlp()
    f, params = fxattr.functionalize(model)
    x, y = inputs((model, f, params), 3)
    baseline = torch.zeros(6, dtype=torch.float64)
    metric = torch.vmap(AX.completeness(f, normalise=False, perturb_baseline=0.0, rtol=1e-6, atol=1e-9),
                        in_dims=(None, 0, 0, 0))
    ig = torch.vmap(fxattr.integrated_gradients(f, steps=64, baseline=baseline),
                    in_dims=(None, 0, 0))(params, x, y)
    gradient = torch.vmap(fxattr.gradient(f), in_dims=(None, 0, 0))(params, x, y)
    assert metric(params, x, y, ig).all()
    assert not metric(params, x, y, gradient).any()
    # output_func and softmax: the probability difference is not what IG of the logit sums to
    probabilities = AX.completeness(f, normalise=False, perturb_baseline=0.0, softmax=True, rtol=1e-6)
    assert not probabilities(params, x[0], y[0], ig[0])
    doubled = AX.completeness(f, normalise=False, perturb_baseline=0.0, output_func=lambda d: 2 * d,
                              rtol=1e-6)
    assert doubled(params, x[0], y[0], 2 * ig[0])


def test_non_sensitivity_matches_quantus(setup):
    model, f, params, x, y, a = setup
    a = a.clone()
    a[:, :, :3] = 0  # zero attribution on the first rows: some features agree, some violate
    for normalise, batch in ((False, slice(None)), (True, slice(0, 1)), (True, slice(1, 2))):
        expected = quantus.NonSensitivity(eps=1e-2, normalise=normalise, disable_warnings=True)(
            model=AsDouble(model).eval(), x_batch=x[batch].numpy(), y_batch=y[batch].numpy(),
            a_batch=a[batch].numpy())
        metric = AX.non_sensitivity(f, eps=1e-2, normalise=normalise, chunk_size=16)
        with model_unchanged(model):
            ours = torch.vmap(metric, in_dims=(None, 0, 0, 0))(params, x[batch], y[batch], a[batch])
        assert ours.dtype == torch.int64
        assert ours.tolist() == [int(e) for e in expected]
    assert 0 < ours.sum() < 64


def test_non_sensitivity_in_steps_of_several_features_counts_per_feature(setup):
    """Quantus cannot XOR its per-step and per-feature arrays for features_in_step > 1; the paper's
    count gives each feature its step's verdict (a hand loop here)."""
    model, f, params, x, y, a = setup
    eps, step = 1e-2, 3
    metric = AX.non_sensitivity(f, eps=eps, features_in_step=step, normalise=False, softmax=False)
    x0, y0, a0 = x[0], int(y[0]), a[0].abs().reshape(-1)
    clean = f(params, x0)[y0]
    flat, expected = x0.reshape(-1), 0
    for first in range(0, 64, step):
        copy = flat.clone()
        copy[first:first + step] = flat.min()
        insensitive = (f(params, copy.reshape(x0.shape))[y0] - clean).abs() < eps
        expected += sum(bool(insensitive) != bool(a0[i] < eps) for i in range(first, min(first + step, 64)))
    assert metric(params, x0, y0, a[0]).item() == expected


def unpadded(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 36, 4)).to(dtype).eval()


@pytest.mark.parametrize("method, invariant", [(fxattr.gradient, True), (fxattr.input_x_gradient, False)])
def test_input_invariance_matches_quantus(method, invariant):
    # Quantus shifts named_modules()[1]'s bias: the model itself (no wrapper), in float32
    model = unpadded()
    f, params = fxattr.functionalize(model)
    x, y = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 3])
    a = torch.vmap(method(f), in_dims=(None, 0, 0))(params, x, y)

    def explain_func(model, inputs, targets, **kwargs):
        f_, p_ = fxattr.functionalize(model)
        batch = torch.vmap(method(f_), in_dims=(None, 0, 0))
        return batch(p_, torch.as_tensor(inputs), torch.as_tensor(targets)).numpy()

    expected = quantus.InputInvariance(disable_warnings=True)(
        model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a.numpy(), explain_func=explain_func)
    with model_unchanged(model):
        ours = torch.vmap(AX.input_invariance(f, explain=method(f)), in_dims=(None, 0, 0, 0))(params, x, y, a)
    if not invariant:
        assert ours.tolist() == list(map(bool, expected)) == [False] * 3
        return
    # Quantus's perturb_batch passes indices[i][1:]: it never shifts the first feature, so its
    # "shifted" input is not x + m and the gradient may change (a ReLU flips); fxattr shifts all
    assert ours.tolist() == [True] * 3
    assert [bool(e) for e in expected].count(True) >= 1
    from functools import partial
    from quantus.functions.perturb_func import baseline_replacement_by_shift, perturb_batch
    shifted = perturb_batch(perturb_func=partial(baseline_replacement_by_shift, input_shift=-1),
                            indices=np.tile(np.arange(64), (3, 1)), indexed_axes=np.arange(0, 3),
                            arr=x.numpy()).reshape(3, -1)
    flat = x.reshape(3, -1).numpy()
    assert (shifted[:, 0] == flat[:, 0]).all() and np.allclose(shifted[:, 1:], flat[:, 1:] - 1)


def test_input_invariance_shifted_model_is_the_original():
    """The compensated first layer makes f_shifted(x + m) == f(x) exactly (a Linear first layer,
    which Quantus cannot handle, and a convolution)."""
    for model, shape in ((tiny_mlp(), (6,)), (unpadded(torch.float64), (1, 8, 8))):
        f, params = fxattr.functionalize(model)
        x = torch.rand(shape, dtype=torch.float64)
        seen = {}

        def spy(p, xx, t):
            seen["out"] = f(p, xx)
            return fxattr.gradient(f)(p, xx, t)

        metric = AX.input_invariance(f, explain=spy, input_shift=0.7)
        assert metric(params, x, 0, fxattr.gradient(f)(params, x, 0))
        torch.testing.assert_close(seen["out"], f(params, x))


def test_vmap_equals_loop_float32_and_errors(setup):
    model, f, params, x, y, a = setup
    for metric in (AX.non_sensitivity(f, eps=1e-2), AX.completeness(f, normalise=False, rtol=1e-3)):
        torch.testing.assert_close(torch.vmap(metric, in_dims=(None, 0, 0, 0))(params, x, y, a),
                                   torch.stack([metric(params, *t) for t in zip(x, y, a)]))
    f32, params32 = fxattr.functionalize(tiny_cnn(1).float())
    count32 = AX.non_sensitivity(f32, eps=1e-2, normalise=False)(params32, x[0].float(), y[0], a[0].float())
    assert count32.item() == AX.non_sensitivity(f, eps=1e-2, normalise=False)(params, x[0], y[0], a[0]).item()
    for build, kwargs, message in [
        (AX.completeness, {"perturb_baseline": "random"}, r"'random' was removed"),
        (AX.completeness, {"rtol": -1.0}, r"rtol must be >= 0"),
        (AX.completeness, {"output_func": 3}, r"output_func must be a callable"),
        (AX.non_sensitivity, {"eps": 0.0}, r"eps must be > 0"),
        (AX.non_sensitivity, {"features_in_step": 0}, r"features_in_step must be an int >= 1"),
        (AX.input_invariance, {}, r"explain must be an explainer"),
        (AX.input_invariance, {"explain": fxattr.gradient(f), "first_layer": "1"}, r"'1' is a ReLU"),
        (AX.input_invariance, {"explain": fxattr.gradient(f), "first_layer": "9"}, r"'9' is not a module"),
    ]:
        with pytest.raises(FxattrError, match=message):
            build(f, **kwargs)
    padded = AX.input_invariance(f, explain=fxattr.gradient(f))  # tiny_cnn's first conv is padded
    with pytest.raises(FxattrError, match=r"varies across positions \(padding\)"):
        padded(params, x[0], y[0], a[0])
