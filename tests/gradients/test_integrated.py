import numpy as np
import pytest
import torch
from torch import nn

import fxattr
from tests.models import TwoInputs, relu_mlp, smooth_mlp


class Ramp(nn.Module):
    """relu(relu(x1) - 1 - relu(x2)): IG at (3, 1) from 0 is [1.5, -0.5] (captum's test model)."""

    def forward(self, x):
        return torch.relu(torch.relu(x[..., 0]) - 1 - torch.relu(x[..., 1]))[..., None]


@pytest.mark.parametrize("method", ["riemann_middle", "riemann_trapezoid", "gausslegendre"])
def test_hand_derived_values(method):
    f, params = fxattr.functionalize(Ramp())
    explain = fxattr.integrated_gradients(f, steps=400, method=method)
    attribution = explain(params, torch.tensor([3.0, 1.0], dtype=torch.float64), 0)
    torch.testing.assert_close(attribution, torch.tensor([1.5, -0.5], dtype=torch.float64),
                               atol=1e-2, rtol=0)


def test_riemann_left_is_innvestigates_rule():
    """alpha = k/steps for k = 0..steps-1, result = mean gradient x (x - baseline)."""
    model = relu_mlp(torch.float64)
    f, params = fxattr.functionalize(model)
    x, baseline = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    got = fxattr.integrated_gradients(f, steps=64, method="riemann_left", baseline=baseline)(params, x, 1)
    grads = []
    for k in range(64):
        point = (baseline + k / 64 * (x - baseline)).requires_grad_()
        grads.append(torch.autograd.grad(model(point[None])[0, 1], point)[0])
    torch.testing.assert_close(got, torch.stack(grads).mean(0) * (x - baseline))


def test_completeness_with_gauss_legendre():
    model = smooth_mlp()
    f, params = fxattr.functionalize(model)
    xs = torch.randn(4, 5, dtype=torch.float64)
    explain = torch.vmap(fxattr.integrated_gradients(f, steps=32), in_dims=(None, 0, None))
    attributions = explain(params, xs, 2)
    delta = model(xs)[:, 2] - model(torch.zeros_like(xs))[:, 2]
    torch.testing.assert_close(attributions.sum(1), delta.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", fxattr.QUADRATURES)
def test_quadrature_weights_sum_to_one_and_integrate_polynomials(method):
    alphas, weights = fxattr.quadrature(method, 10)
    assert len(alphas) == len(weights) == 10
    assert abs(sum(weights) - 1) < 1e-12
    assert all(0 <= a <= 1 for a in alphas)
    exact_degree = {"gausslegendre": 19, "riemann_trapezoid": 1, "riemann_middle": 1}.get(method, 0)
    for degree in range(exact_degree + 1):
        assert abs(np.dot(weights, np.power(alphas, degree)) - 1 / (degree + 1)) < 1e-12


def test_quadrature_points():
    assert fxattr.quadrature("riemann_left", 4)[0] == [0, 0.25, 0.5, 0.75]
    assert fxattr.quadrature("riemann_right", 4)[0] == [0.25, 0.5, 0.75, 1.0]
    assert fxattr.quadrature("riemann_middle", 2)[0] == [0.25, 0.75]
    assert fxattr.quadrature("riemann_trapezoid", 3) == ([0, 0.5, 1], [0.25, 0.5, 0.25])


def test_baselines_number_tensor_callable_and_pytree():
    model = smooth_mlp()
    f, params = fxattr.functionalize(model)
    x = torch.randn(5, dtype=torch.float64)
    by_number = fxattr.integrated_gradients(f, baseline=0.5)(params, x, 0)
    by_tensor = fxattr.integrated_gradients(f, baseline=torch.full((5,), 0.5, dtype=torch.float64))(params, x, 0)
    by_callable = fxattr.integrated_gradients(f, baseline=lambda x: torch.full_like(x, 0.5))(params, x, 0)
    torch.testing.assert_close(by_number, by_tensor)
    torch.testing.assert_close(by_number, by_callable)
    two = TwoInputs().double().eval()
    f2, p2 = fxattr.functionalize(two)
    xy = (torch.randn(3, dtype=torch.float64), torch.randn(2, dtype=torch.float64))
    a, b = fxattr.integrated_gradients(f2, steps=16)(p2, xy, 1)
    delta = two(*[t[None] for t in xy])[0, 1] - two(torch.zeros(1, 3).double(), torch.zeros(1, 2).double())[0, 1]
    torch.testing.assert_close(a.sum() + b.sum(), delta.detach(), atol=1e-6, rtol=0)


def test_target_none_is_held_fixed_along_the_path():
    model = relu_mlp(torch.float64)
    f, params = fxattr.functionalize(model)
    x = torch.randn(6, dtype=torch.float64)
    top = int(model(x[None]).argmax())
    explain = fxattr.integrated_gradients(f, steps=8)
    torch.testing.assert_close(explain(params, x, None), explain(params, x, top))


def test_chunk_size_does_not_change_the_result():
    f, params = fxattr.functionalize(smooth_mlp())
    x = torch.randn(5, dtype=torch.float64)
    results = [fxattr.integrated_gradients(f, steps=12, chunk_size=c)(params, x, 1) for c in (None, 1, 5)]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0])


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, r"steps must be an int >= 1, got 0"),
    ({"steps": 2.5}, r"steps must be an int >= 1"),
    ({"steps": 1, "method": "riemann_trapezoid"}, r"steps must be an int >= 2"),
    ({"method": "simpson"}, r"method must be one of"),
    ({"chunk_size": 0}, r"chunk_size must be an int >= 1 or None"),
    ({"baseline": "zeros"}, r"baseline must be a number, a tensor"),
])
def test_bad_configuration(kwargs, message):
    f, _ = fxattr.functionalize(smooth_mlp())
    with pytest.raises(fxattr.FxattrError, match=rf"fxattr\.integrated_gradients: {message}"):
        fxattr.integrated_gradients(f, **kwargs)


def test_baseline_of_the_wrong_shape():
    f, params = fxattr.functionalize(smooth_mlp())
    explain = fxattr.integrated_gradients(f, baseline=torch.zeros(4, dtype=torch.float64))
    with pytest.raises(fxattr.FxattrError, match=r"integrated_gradients: baseline has shape \(4,\) but x has shape \(5,\)"):
        explain(params, torch.randn(5, dtype=torch.float64), 0)
