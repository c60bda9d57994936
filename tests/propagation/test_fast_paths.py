"""The engine's written-out reverses equal the vector-Jacobian products they replace.

- DeepLIFT's rescale takes the gradient of an activation (where ``|x - x0| < eps``) from the
  forward values in closed form (ReLU, SiLU, GELU, sigmoid, tanh, hardswish) instead of a vjp: with
  the baseline equal to x every activation takes that branch, so the multipliers are the gradient.
- Parameter-free linear nodes (additions, scalings, reshapes, permutations, global average pooling,
  means / sums over dims, identities) are reversed by their transpose written out: DeepLIFT's
  multipliers at ``baseline = x`` and guided backprop on a ReLU-free model are the gradient there.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxattr
from tests.contract import assert_second_order, assert_vmap_equals_loop


class Functional(nn.Module):
    """One activation as a function (``F.gelu(x, approximate="tanh")``, ``torch.tanh``, ``x.relu()``...)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


ACTIVATIONS = {
    "ReLU": nn.ReLU, "ReLU_inplace": lambda: nn.ReLU(inplace=True), "SiLU": nn.SiLU,
    "SiLU_inplace": lambda: nn.SiLU(inplace=True), "GELU": nn.GELU, "GELU_tanh": lambda: nn.GELU("tanh"),
    "Sigmoid": nn.Sigmoid, "Tanh": nn.Tanh, "Hardswish": nn.Hardswish,
    "F.relu": lambda: Functional(F.relu), "F.silu": lambda: Functional(F.silu),
    "F.gelu": lambda: Functional(F.gelu), "F.gelu_tanh": lambda: Functional(lambda t: F.gelu(t, approximate="tanh")),
    "torch.sigmoid": lambda: Functional(torch.sigmoid), "torch.tanh": lambda: Functional(torch.tanh),
    "Tensor.relu": lambda: Functional(lambda t: t.relu()), "F.hardswish": lambda: Functional(F.hardswish),
    "ELU (vjp)": nn.ELU,
}


def _mlp(activation, dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), activation(), nn.Linear(16, 16), activation(),
                         nn.Linear(16, 4)).to(dtype).eval()


def _gradient(f, params, xs, targets):
    return torch.vmap(fxattr.gradient(f), in_dims=(None, 0, 0))(params, xs, targets)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_rescale_at_baseline_x_is_the_gradient(name):
    f, params = fxattr.functionalize(_mlp(ACTIVATIONS[name]))
    xs = torch.randn(3, 6, dtype=torch.float64)
    targets = torch.tensor([0, 3, 1])
    explain = fxattr.deeplift(f, baseline=lambda x: x, multiply_by_inputs=False)
    multipliers = torch.vmap(explain, in_dims=(None, 0, 0))(params, xs, targets)
    torch.testing.assert_close(multipliers, _gradient(f, params, xs, targets), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["SiLU", "GELU", "Tanh"])
def test_rescale_second_order_through_both_branches(name):
    # half the inputs equal to the baseline: the closed-form gradient and the secant both enter
    f, params = fxattr.functionalize(_mlp(ACTIVATIONS[name]))
    x = torch.randn(6, dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0] * 3, dtype=torch.float64)
    explain = fxattr.deeplift(f, baseline=lambda t: t * mask)
    assert_second_order(explain, params, x, 2, gradgrad=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rescale_vmap_equals_loop(dtype):
    f, params = fxattr.functionalize(_mlp(nn.SiLU, dtype))
    xs = torch.randn(4, 6, dtype=dtype)
    assert_vmap_equals_loop(fxattr.deeplift(f, baseline=0.1), params, xs, torch.tensor([0, 1, 2, 3]))


class LinearNodes(nn.Module):
    """Every written-out transpose: add / sub (broadcast), scalings, reshapes with size arguments,
    permute / transpose, global average pooling, mean / sum over dims, identities."""

    def __init__(self, activation=nn.Tanh, squash=torch.tanh):
        super().__init__()
        self.squash = squash
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = activation()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.3)
        self.ident = nn.Identity()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4, 3)
        self.offset = nn.Parameter(torch.randn(4, 1, 1))

    def forward(self, x):
        h = self.act(self.conv(x))                      # (4, 5, 5)
        h = h + self.offset - 0.5 * h.mean(1, keepdim=True)     # broadcast add / sub, scale, mean
        h = -(h / 3.0) + 2 * h                          # neg, div, mul (constant first)
        g = self.pool(h)                                # global average
        t = h.permute(0, 2, 3, 1).contiguous()          # (5, 5, 4)
        t = t.transpose(1, 2).reshape(t.size(0), -1, 4)  # (5, 5, 4) -> (25, 4)
        s = t.sum(1) + t.mean(dim=(1,)).clone()         # (25, 4)... of an example: (1, 5, 4) sums
        s = s.view(s.shape[0], -1).sum(-1)              # (1,)
        u = self.flatten(self.ident(self.drop(g)))      # (1, 4)
        return self.fc(self.squash(u) * 1.5) + s.unsqueeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_transposes_equal_the_gradient(dtype):
    torch.manual_seed(1)
    model = LinearNodes().to(dtype).eval()
    f, params = fxattr.functionalize(model)
    xs = torch.randn(2, 3, 5, 5, dtype=dtype)
    targets = torch.tensor([0, 2])
    gradient = _gradient(f, params, xs, targets)
    explain = fxattr.deeplift(f, baseline=lambda x: x, multiply_by_inputs=False)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-13}
    torch.testing.assert_close(torch.vmap(explain, in_dims=(None, 0, 0))(params, xs, targets), gradient, **tol)
    # guided backprop modifies ReLUs only: on a ReLU-free model it is the gradient
    guided = torch.vmap(fxattr.guided_backprop(f, seed="one"), in_dims=(None, 0, 0))(params, xs, targets)
    torch.testing.assert_close(guided, gradient, **tol)


def test_linear_transposes_second_order_and_summation():
    torch.manual_seed(2)
    model = LinearNodes().double().eval()
    f, params = fxattr.functionalize(model)
    x = torch.randn(3, 5, 5, dtype=torch.float64)
    explain = fxattr.deeplift(f, baseline=0.0, return_convergence_delta=True)
    _, delta = explain(params, x, 1)
    assert abs(float(delta)) < 1e-12
    assert_second_order(fxattr.deeplift(f, baseline=0.0), params, x, 1)


def test_lrp_z_through_linear_transposes_is_gradient_times_input():
    # a bias-free piecewise-linear homogeneous model: LRP-0 == gradient x input (the z rule on the
    # additions, scalings and poolings goes through their written-out transposes)
    torch.manual_seed(3)
    model = LinearNodes(nn.ReLU, F.relu).double().eval()
    with torch.no_grad():  # test-side set-up of a model we built
        model.conv.bias.zero_()
        model.fc.bias.zero_()
        model.offset.zero_()
    f, params = fxattr.functionalize(model)
    xs = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    targets = torch.tensor([1, 2])
    relevance = torch.vmap(fxattr.lrp(f, rule="z"), in_dims=(None, 0, 0))(params, xs, targets)
    torch.testing.assert_close(relevance, xs * _gradient(f, params, xs, targets), rtol=1e-10, atol=1e-12)
