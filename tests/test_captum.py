"""Cross-checks against captum on torchvision models with random weights, float32, 1e-5 relative."""

import pytest
import torch

import fxattr
from tests.models import with_fxattr_batch_norm

captum_attr = pytest.importorskip("captum.attr")
torchvision = pytest.importorskip("torchvision")

RTOL, ATOL = 1e-5, 1e-7


def _model(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    # Random biases and batch-norm statistics, so that no convention hides behind zeros.
    state = {k: (torch.randn_like(v) * 0.1 if k.endswith(("bias", "running_mean")) else
                 torch.rand_like(v) + 0.5 if k.endswith("running_var") else v)
             for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    return model


@pytest.fixture(scope="module", params=[("resnet18", 64), ("vgg11", 32)], ids=["resnet18", "vgg11"])
def setup(request):
    name, size = request.param
    model = _model(name)
    f, params = fxattr.functionalize(model)
    xs = torch.randn(2, 3, size, size)
    ts = torch.tensor([3, 7])
    # captum runs on a copy whose batch norms round like fxattr's (see with_fxattr_batch_norm)
    return with_fxattr_batch_norm(model), f, params, xs, ts


def _close(got, expected):
    expected = expected.detach()
    scale = expected.abs().max()
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL + RTOL * scale)


def _batch(explain, params, xs, ts):
    return torch.vmap(explain, in_dims=(None, 0, 0))(params, xs, ts)


def test_saliency(setup):
    model, f, params, xs, ts = setup
    expected = captum_attr.Saliency(model).attribute(xs, target=ts, abs=False)
    _close(_batch(fxattr.gradient(f), params, xs, ts), expected)
    expected = captum_attr.Saliency(model).attribute(xs, target=ts, abs=True)
    _close(_batch(fxattr.gradient(f, postprocess="abs"), params, xs, ts), expected)


def test_input_x_gradient(setup):
    model, f, params, xs, ts = setup
    expected = captum_attr.InputXGradient(model).attribute(xs, target=ts)
    _close(_batch(fxattr.input_x_gradient(f), params, xs, ts), expected)


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_left", "riemann_middle", "riemann_right"])
def test_integrated_gradients(setup, method):
    model, f, params, xs, ts = setup
    baseline = 0.1 * torch.randn_like(xs)
    expected = captum_attr.IntegratedGradients(model).attribute(
        xs, baselines=baseline, target=ts, n_steps=8, method=method)
    explain = torch.vmap(lambda p, x, b, t: fxattr.integrated_gradients(
        f, steps=8, method=method, baseline=b)(p, x, t), in_dims=(None, 0, 0, 0))
    _close(explain(params, xs, baseline, ts), expected)


def test_captum_trapezoid_weights_sum_to_less_than_one(setup):
    """captum's riemann_trapezoid weights sum to (n-1)/n; fxattr's true trapezoid rule to 1."""
    from captum.attr._utils.approximation_methods import approximation_parameters
    step_sizes, _ = approximation_parameters("riemann_trapezoid")
    assert abs(sum(step_sizes(8)) - 7 / 8) < 1e-12
    assert abs(sum(fxattr.quadrature("riemann_trapezoid", 8)[1]) - 1) < 1e-12


@pytest.mark.parametrize("kind", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_noise_tunnel_replayed_with_captums_noise(setup, kind):
    model, f, params, xs, ts = setup
    samples, stdev = 4, 0.2
    torch.manual_seed(11)
    expected = captum_attr.NoiseTunnel(captum_attr.Saliency(model)).attribute(
        xs, nt_type=kind, nt_samples=samples, stdevs=stdev, target=ts, abs=False)
    # captum draws torch.normal(0, stdev) of shape (batch * samples, ...), example-major.
    torch.manual_seed(11)
    noise = torch.normal(0, torch.tensor(stdev).repeat(samples * len(xs), *xs.shape[1:]))
    eps = (noise / stdev).reshape(len(xs), samples, *xs.shape[1:])
    tunnel = fxattr.noise_tunnel(fxattr.gradient(f), kind=kind, samples=samples, sigma=stdev,
                                 relative=False)
    got = torch.vmap(lambda p, x, t, e: tunnel(p, x, t, noise=e), in_dims=(None, 0, 0, 0))(params, xs, ts, eps)
    _close(got, expected)
