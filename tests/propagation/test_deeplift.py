"""DeepLIFT and DeepLIFT-SHAP: hand values, summation-to-delta, captum agreement, composition."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxattr
from tests import models
from tests.contract import (assert_compile_equals_eager, assert_second_order,
                            assert_vmap_equals_loop, model_unchanged)


def _captum(cls, model, x, target, baselines):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(model).attribute(x, baselines=baselines, target=target).detach()


class TwoRelus(nn.Module):
    """2 relu(x1) + 2 relu(x2 - 1.5): captum's DeepLift test network."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(2, 2)
        self.relu = nn.ReLU()
        self.out = nn.Linear(2, 1)
        with torch.no_grad():  # test-side set-up of known weights
            self.hidden.weight.copy_(torch.eye(2))
            self.hidden.bias.copy_(torch.tensor([0.0, -1.5]))
            self.out.weight.fill_(2.0)
            self.out.bias.zero_()

    def forward(self, x):
        return self.out(self.relu(self.hidden(x)))


class Cancel(nn.Module):
    """relu(x1 - x2): rescale sees no change, reveal-cancel reveals both inputs."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.tensor([[1.0, -1.0]]))

    def forward(self, x):
        return F.relu(self.hidden(x))


def _delta(f, params, x, base, target):
    return f(params, x).reshape(-1)[target] - f(params, base).reshape(-1)[target]


def test_hand_values():
    f, params = fxattr.functionalize(TwoRelus().eval())
    x = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(fxattr.deeplift(f)(params, x, 0), torch.tensor([2.0, 1.0]))
    f, params = fxattr.functionalize(Cancel().eval())
    x = torch.tensor([1.0, 1.0])
    torch.testing.assert_close(fxattr.deeplift(f)(params, x, 0), torch.zeros(2))
    revealed = fxattr.deeplift(f, rule="reveal_cancel")(params, x, 0)
    torch.testing.assert_close(revealed, torch.tensor([0.5, -0.5]))


@pytest.mark.parametrize("name", ["relu", "tanh", "maxpool_relu", "maxpool_tanh", "residual"])
@pytest.mark.parametrize("rule", fxattr.propagation._deeplift.RULES)
def test_summation_to_delta(name, rule):
    torch.manual_seed(1)
    if name == "relu":
        model, shape = models.relu_mlp(torch.float64), (6,)
    elif name == "tanh":
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Sigmoid(),
                              nn.Linear(8, 4)).double().eval()
        shape = (6,)
    elif name == "residual":
        model, shape = models.residual(torch.float64), (3, 8, 8)
    else:
        activation = nn.ReLU if name == "maxpool_relu" else nn.Tanh
        model, shape = models.small_cnn(torch.float64, activation=activation), (3, 8, 8)
    f, params = fxattr.functionalize(model)
    x, base = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    for target in ((0, 2) if len(shape) == 1 else (2,)):
        attribution = fxattr.deeplift(f, baseline=base, rule=rule)(params, x, target)
        torch.testing.assert_close(attribution.sum(), _delta(f, params, x, base, target),
                                   atol=1e-6, rtol=0)


def _pool_net(activation):
    """max pool -> conv -> activation, and conv -> max pool -> linear -> activation: the max-pool
    placements where captum's hooks keep summation-to-delta (see the test below for the others)."""
    torch.manual_seed(3)
    return nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(3, 4, 3, padding=1), activation(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(16, 6), activation(), nn.Linear(6, 4)).double().eval()


@pytest.mark.parametrize("name", ["relu", "tanh", "maxpool_relu", "maxpool_tanh"])
def test_agrees_with_captum(name):
    from captum.attr import DeepLift

    torch.manual_seed(2)
    if name == "relu":
        model, shape = models.relu_mlp(torch.float64), (6,)
    elif name == "tanh":
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Sigmoid(),
                              nn.Linear(8, 4)).double().eval()
        shape = (6,)
    else:
        model, shape = _pool_net(nn.ReLU if name == "maxpool_relu" else nn.Tanh), (3, 8, 8)
    f, params = fxattr.functionalize(model)
    xs, bases = torch.randn(2, *shape, dtype=torch.float64), torch.randn(2, *shape, dtype=torch.float64)
    targets = torch.tensor([0, 3])
    ours = torch.stack([fxattr.deeplift(f, baseline=b)(params, x, int(t))
                        for x, b, t in zip(xs, bases, targets)])
    theirs = _captum(DeepLift, model, xs, targets, bases)
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-7)
    zero = torch.stack([fxattr.deeplift(f)(params, x, 2) for x in xs])
    torch.testing.assert_close(zero, _captum(DeepLift, model, xs, 2, torch.zeros_like(xs)),
                               atol=1e-10, rtol=1e-7)


def test_activation_into_max_pool_keeps_summation_where_captum_does_not():
    """captum's hooks lose summation-to-delta when an activation feeds a max pool (its own
    convergence delta is far from 0 here); the explicit reverse pass keeps it."""
    from captum.attr import DeepLift

    model = models.small_cnn(torch.float64, batch_norm=False)
    f, params = fxattr.functionalize(model)
    x, base = torch.randn(3, 8, 8, dtype=torch.float64), torch.randn(3, 8, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, captum_delta = DeepLift(model).attribute(x[None], baselines=base[None], target=1,
                                                    return_convergence_delta=True)
    assert captum_delta.abs().item() > 1e-4
    ours = fxattr.deeplift(f, baseline=base)(params, x, 1)
    torch.testing.assert_close(ours.sum(), _delta(f, params, x, base, 1), atol=1e-10, rtol=0)


def test_deeplift_shap_agrees_with_captum_and_sums():
    from captum.attr import DeepLiftShap

    model = _pool_net(nn.ReLU)
    f, params = fxattr.functionalize(model)
    x, bases = torch.randn(3, 8, 8, dtype=torch.float64), torch.randn(4, 3, 8, 8, dtype=torch.float64)
    ours = fxattr.deeplift_shap(f, baselines=bases, chunk_size=3)(params, x, 2)
    theirs = _captum(DeepLiftShap, model, x[None], 2, bases)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-7)
    outputs = torch.vmap(f, in_dims=(None, 0))(params, bases)[:, 2]
    torch.testing.assert_close(ours.sum(), f(params, x)[2] - outputs.mean(), atol=1e-8, rtol=0)
    # callable baselines; target None is the argmax at x
    explain = fxattr.deeplift_shap(f, baselines=lambda x_: torch.stack([x_ * 0, x_ * 0.5]))
    argmax = int(f(params, x).argmax())
    torch.testing.assert_close(explain(params, x), explain(params, x, argmax))


def test_baselines_like_integrated_gradients():
    model = models.relu_mlp(torch.float64)
    f, params = fxattr.functionalize(model)
    x = torch.randn(6, dtype=torch.float64)
    number = fxattr.deeplift(f, baseline=0.5)(params, x, 1)
    tensor = fxattr.deeplift(f, baseline=torch.full((6,), 0.5, dtype=torch.float64))(params, x, 1)
    call = fxattr.deeplift(f, baseline=lambda x_: torch.full_like(x_, 0.5))(params, x, 1)
    torch.testing.assert_close(number, tensor)
    torch.testing.assert_close(number, call)
    # at x == baseline, nothing changes: zero attributions, not nan
    same = fxattr.deeplift(f, baseline=lambda x_: x_)(params, x, 1)
    assert torch.equal(same, torch.zeros(6, dtype=torch.float64))


def test_pytree_input():
    model = models.TwoInputs().double().eval()
    f, params = fxattr.functionalize(model)
    x = (torch.randn(3, dtype=torch.float64), torch.randn(2, dtype=torch.float64))
    a, b = fxattr.deeplift(f)(params, x, 1)
    zero = (torch.zeros(3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(a.sum() + b.sum(), _delta(f, params, x, zero, 1), atol=1e-8, rtol=0)


@pytest.mark.parametrize("rule", ["rescale", "reveal_cancel"])
def test_vmap_equals_loop_and_dtypes(dtype, rule):
    model = models.small_cnn(dtype)
    f, params = fxattr.functionalize(model)
    xs = torch.randn(4, 3, 8, 8, dtype=dtype)
    with model_unchanged(model):
        out = assert_vmap_equals_loop(fxattr.deeplift(f, baseline=0.1, rule=rule), params, xs,
                                      torch.tensor([0, 1, 2, 4]))
    assert out.dtype == dtype


def test_deeplift_shap_vmap_equals_loop():
    model = models.relu_mlp()
    f, params = fxattr.functionalize(model)
    explain = fxattr.deeplift_shap(f, baselines=torch.randn(5, 6))
    assert_vmap_equals_loop(explain, params, torch.randn(3, 6), torch.tensor([0, 3, 1]))


@pytest.mark.parametrize("rule", ["rescale", "reveal_cancel"])
def test_second_order(rule):
    model = models.smooth_mlp()
    f, params = fxattr.functionalize(model)
    x = torch.randn(5, dtype=torch.float64)
    explain = fxattr.deeplift(f, baseline=torch.randn(5, dtype=torch.float64), rule=rule)
    assert_second_order(explain, params, x, 1, gradgrad=rule == "rescale")


def test_compile_equals_eager():
    torch.manual_seed(4)  # tiny: compile time dominates
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3)).eval()
    f, params = fxattr.functionalize(model)
    xs = torch.randn(3, 4)
    with model_unchanged(model):
        assert_compile_equals_eager(fxattr.deeplift(f, baseline=0.2), params, xs, torch.tensor([0, 1, 2]))


class Cumulative(nn.Module):
    """An op DeepLIFT has no rule for (a cumulative sum)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return torch.cumsum(self.lin(x), dim=-1)


def test_errors():
    f, params = fxattr.functionalize(models.relu_mlp())
    with pytest.raises(fxattr.FxattrError, match=r"fxattr.deeplift: rule"):
        fxattr.deeplift(f, rule="linear")
    with pytest.raises(fxattr.FxattrError, match=r"fxattr.deeplift: baseline"):
        fxattr.deeplift(f, baseline="zeros")
    with pytest.raises(fxattr.FxattrError, match=r"fxattr.deeplift: eps"):
        fxattr.deeplift(f, eps=0)
    explain = fxattr.deeplift(f, baseline=torch.zeros(5))
    with pytest.raises(fxattr.FxattrError, match=r"fxattr.deeplift: baseline has shape"):
        explain(params, torch.randn(6), 0)
    with pytest.raises(fxattr.FxattrError, match=r"fxattr.deeplift: target 9 is out of range"):
        fxattr.deeplift(f)(params, torch.randn(6), 9)
    with pytest.raises(fxattr.FxattrError, match=r"fxattr.deeplift: .*batch"):
        shaped = fxattr.functionalize(models.relu_mlp(), input_shape=(6,))[0]
        fxattr.deeplift(shaped)(params, torch.randn(2, 6), 0)
    with pytest.raises(fxattr.FxattrError, match=r"fxattr.deeplift: no DeepLIFT rule for graph node 'cumsum'"):
        fxattr.deeplift(fxattr.functionalize(Cumulative())[0])
    with pytest.raises(fxattr.FxattrError, match=r"fxattr.deeplift: f must be"):
        fxattr.deeplift(models.relu_mlp())
    with pytest.raises(fxattr.FxattrError, match=r"fxattr.deeplift_shap: baselines must be"):
        fxattr.deeplift_shap(f, baselines=0.0)
    with pytest.raises(fxattr.FxattrError, match=r"fxattr.deeplift_shap: baselines have shape"):
        fxattr.deeplift_shap(f, baselines=torch.zeros(2, 5))(params, torch.randn(6), 0)


def test_callable_target_and_dict_output():
    model = models.DictOutput().double().eval()
    f, params = fxattr.functionalize(model, output=lambda out: out["logits"])
    x, base = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    difference = lambda out: out[1] - out[0]  # noqa: E731 - linear in the output: summation holds
    attribution = fxattr.deeplift(f, baseline=base)(params, x, difference)
    expected = difference(f(params, x)) - difference(f(params, base))
    torch.testing.assert_close(attribution.sum(), expected, atol=1e-10, rtol=0)
    # a linear model: DeepLIFT is exactly gradient * (x - baseline)
    torch.testing.assert_close(attribution, params["body.weight"][1] * (x - base)
                               - params["body.weight"][0] * (x - base))
