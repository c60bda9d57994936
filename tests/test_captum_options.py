"""captum's ``multiply_by_inputs=False`` and ``return_convergence_delta`` for integrated gradients
and DeepLIFT, against captum on the same model."""

import pytest
import torch
from torch import nn

import fxattr
from fxattr.errors import FxattrError

captum_attr = pytest.importorskip("captum.attr")


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3)).double().eval()
    f, params = fxattr.functionalize(model)
    x = torch.randn(4, 5, dtype=torch.float64)
    baseline = 0.1 * torch.randn(4, 5, dtype=torch.float64)
    return model, f, params, x, baseline, torch.tensor([0, 2, 1, 2])


@pytest.mark.parametrize("multiply", [True, False])
def test_integrated_gradients_options_equal_captum(multiply):
    model, f, params, x, baseline, t = setup()
    explain = torch.vmap(lambda p, xi, bi, ti: fxattr.integrated_gradients(
        f, steps=16, method="gausslegendre", baseline=bi, multiply_by_inputs=multiply,
        return_convergence_delta=True)(p, xi, ti), in_dims=(None, 0, 0, 0))
    ours, delta = explain(params, x, baseline, t)
    theirs, their_delta = captum_attr.IntegratedGradients(model, multiply_by_inputs=multiply).attribute(
        x, baselines=baseline, target=t, n_steps=16, method="gausslegendre", return_convergence_delta=True)
    torch.testing.assert_close(ours, theirs)
    if multiply:  # captum's delta is of the attributions it returns
        torch.testing.assert_close(delta, their_delta)


def test_deeplift_options_equal_captum():
    model, f, params, x, baseline, t = setup()
    for multiply in (True, False):
        explain = torch.vmap(lambda p, xi, bi, ti: fxattr.deeplift(
            f, baseline=bi, multiply_by_inputs=multiply, return_convergence_delta=True)(p, xi, ti),
            in_dims=(None, 0, 0, 0))
        ours, delta = explain(params, x, baseline, t)
        theirs, their_delta = captum_attr.DeepLift(model, multiply_by_inputs=multiply).attribute(
            x, baselines=baseline, target=t, return_convergence_delta=True)
        torch.testing.assert_close(ours, theirs.detach())
        # summation-to-delta is exact: the delta is rounding only
        assert delta.abs().max() < 1e-12
        if multiply:
            torch.testing.assert_close(delta, their_delta.detach(), atol=1e-12, rtol=0)


def test_defaults_unchanged_and_bad_flags_refused():
    model, f, params, x, baseline, t = setup()
    plain = fxattr.integrated_gradients(f)(params, x[0], 1)
    with_delta, delta = fxattr.integrated_gradients(f, return_convergence_delta=True)(params, x[0], 1)
    torch.testing.assert_close(plain, with_delta)
    change = f(params, x[0])[1] - f(params, torch.zeros_like(x[0]))[1]
    torch.testing.assert_close(delta, plain.sum() - change)
    with pytest.raises(FxattrError, match="multiply_by_inputs must be True or False"):
        fxattr.integrated_gradients(f, multiply_by_inputs=1)
    with pytest.raises(FxattrError, match="return_convergence_delta must be True or False"):
        fxattr.deeplift(f, return_convergence_delta="yes")
