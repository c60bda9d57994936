import pytest
import torch
from torch import nn

import fxattr
from tests.models import relu_mlp, smooth_mlp


class OneMinusReluOneMinus(nn.Module):
    def forward(self, x):
        return 1 - torch.relu(1 - x)


def test_saliency_hand_derived():
    # d/dx [1 - relu(1 - x)] = relu'(1 - x): 1 where x < 1, 0 where x >= 1 (relu'(0) = 0 in torch).
    f, params = fxattr.functionalize(OneMinusReluOneMinus())
    x = torch.tensor([1.0, 2.0, 3.0, 0.0, -1.0, 7.0])
    explain = torch.vmap(fxattr.gradient(f), in_dims=(None, 0, None))
    assert explain(params, x[:, None], 0).flatten().tolist() == [0, 0, 0, 1, 1, 0]
    f, params = fxattr.functionalize(nn.Linear(3, 1))
    params = {"weight": torch.tensor([[2.0, -3.0, 0.5]]), "bias": torch.tensor([1.0])}
    x = torch.tensor([1.0, 2.0, -4.0])
    assert fxattr.gradient(f)(params, x, 0).tolist() == [2.0, -3.0, 0.5]
    assert fxattr.gradient(f, postprocess="abs")(params, x, 0).tolist() == [2.0, 3.0, 0.5]
    assert fxattr.gradient(f, postprocess="square")(params, x, 0).tolist() == [4.0, 9.0, 0.25]
    assert fxattr.input_x_gradient(f)(params, x, 0).tolist() == [2.0, -6.0, -2.0]
    assert fxattr.input(f)(params, x, 0).tolist() == x.tolist()


def test_gradient_matches_autograd_on_a_batch(dtype):
    model = smooth_mlp(dtype)
    f, params = fxattr.functionalize(model)
    xs, ts = torch.randn(6, 5, dtype=dtype), torch.tensor([0, 1, 2, 0, 1, 2])
    got = torch.vmap(fxattr.gradient(f), in_dims=(None, 0, 0))(params, xs, ts)
    xr = xs.clone().requires_grad_()
    (expected,) = torch.autograd.grad(model(xr).gather(1, ts[:, None]).sum(), xr)
    torch.testing.assert_close(got, expected)


def test_pytree_inputs_give_pytree_attributions():
    from tests.models import TwoInputs
    model = TwoInputs().eval()
    f, params = fxattr.functionalize(model)
    x, y = torch.randn(3), torch.randn(2)
    gx, gy = fxattr.input_x_gradient(f)(params, (x, y), 1)
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    ex, ey = torch.autograd.grad(model(xr[None], yr[None])[0, 1], (xr, yr))
    torch.testing.assert_close(gx, x * ex)
    torch.testing.assert_close(gy, y * ey)


def test_random_is_reproducible_and_different_per_example():
    f, params = fxattr.functionalize(relu_mlp())
    explain = torch.vmap(fxattr.random(f, stddev=2.0), in_dims=(None, 0, 0), randomness="different")
    xs, ts = torch.zeros(4, 6), torch.zeros(4, dtype=torch.long)
    torch.manual_seed(3)
    a = explain(params, xs, ts)
    torch.manual_seed(3)
    torch.testing.assert_close(explain(params, xs, ts), a)
    assert not torch.allclose(a[0], a[1])
    assert 1.0 < a.std() < 3.0


@pytest.mark.parametrize("build, message", [
    (lambda f: fxattr.gradient(f, postprocess="sqrt"), r"fxattr.gradient: postprocess must be one of"),
    (lambda f: fxattr.gradient(nn.Linear(2, 2)), r"fxattr.gradient: f must be a function.*functionalize"),
    (lambda f: fxattr.input_x_gradient(3), r"fxattr.input_x_gradient: f must be a callable"),
    (lambda f: fxattr.random(f, stddev=-1), r"fxattr.random: stddev must be a number >= 0"),
])
def test_bad_configuration_fails_at_construction(build, message):
    f, _ = fxattr.functionalize(relu_mlp())
    with pytest.raises(fxattr.FxattrError, match=message):
        build(f)
