import pytest
import torch

import fxattr
from tests.models import relu_mlp, smooth_mlp


@pytest.fixture
def setup():
    model = smooth_mlp()
    f, params = fxattr.functionalize(model)
    return model, f, params


def _manual(model, x, target, noise, scale):
    grads = []
    for eps in noise:
        point = (x + scale * eps).requires_grad_()
        grads.append(torch.autograd.grad(model(point[None])[0, target], point)[0])
    return torch.stack(grads)


@pytest.mark.parametrize("kind, reduce", [
    ("smoothgrad", lambda g: g.mean(0)),
    ("smoothgrad_sq", lambda g: (g ** 2).mean(0)),
    ("vargrad", lambda g: (g ** 2).mean(0) - g.mean(0) ** 2),
])
def test_explicit_noise_replays_exactly(setup, kind, reduce):
    model, f, params = setup
    x = torch.randn(5, dtype=torch.float64)
    noise = torch.randn(6, 5, dtype=torch.float64)
    explain = fxattr.noise_tunnel(fxattr.gradient(f), kind=kind, samples=6, sigma=0.3, relative=False)
    expected = reduce(_manual(model, x, 1, noise, 0.3))
    torch.testing.assert_close(explain(params, x, 1, noise=noise), expected)
    relative = fxattr.noise_tunnel(fxattr.gradient(f), kind=kind, samples=6, sigma=0.3)
    scale = 0.3 * (x.max() - x.min())
    torch.testing.assert_close(relative(params, x, 1, noise=noise), reduce(_manual(model, x, 1, noise, scale)))


def test_aliases_are_compositions(setup):
    _, f, params = setup
    x, noise = torch.randn(5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    for alias, kind in [(fxattr.smoothgrad, "smoothgrad"), (fxattr.smoothgrad_sq, "smoothgrad_sq"),
                        (fxattr.vargrad, "vargrad")]:
        composed = fxattr.noise_tunnel(fxattr.gradient(f), kind=kind, samples=4)
        torch.testing.assert_close(alias(f, samples=4)(params, x, 0, noise=noise),
                                   composed(params, x, 0, noise=noise))
        assert alias(f).__name__ == f"{kind}(gradient)"


def test_seeded_reproducible_and_different_per_example(setup):
    _, f, params = setup
    explain = torch.vmap(fxattr.smoothgrad(f, samples=4), in_dims=(None, 0, 0), randomness="different")
    xs = torch.randn(1, 5, dtype=torch.float64).expand(3, 5)  # the same example three times
    ts = torch.zeros(3, dtype=torch.long)
    torch.manual_seed(7)
    a = explain(params, xs, ts)
    torch.manual_seed(7)
    torch.testing.assert_close(explain(params, xs, ts), a)
    assert not torch.allclose(a[0], a[1])
    same = torch.vmap(fxattr.smoothgrad(f, samples=4), in_dims=(None, 0, 0), randomness="same")
    b = same(params, xs, ts)
    torch.testing.assert_close(b[0], b[1])


def test_noise_tunnel_over_integrated_gradients(setup):
    model, f, params = setup
    x, noise = torch.randn(5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    ig = fxattr.integrated_gradients(f, steps=16)
    explain = fxattr.noise_tunnel(ig, samples=3, sigma=0.2, relative=False)
    expected = torch.stack([ig(params, x + 0.2 * eps, 2) for eps in noise]).mean(0)
    torch.testing.assert_close(explain(params, x, 2, noise=noise), expected)


def test_target_none_resolves_at_the_clean_input(setup):
    model, f, params = setup
    x, noise = torch.randn(5, dtype=torch.float64), 3 * torch.randn(8, 5, dtype=torch.float64)
    top = int(model(x[None]).argmax())
    explain = fxattr.smoothgrad(f, samples=8)
    torch.testing.assert_close(explain(params, x, None, noise=noise), explain(params, x, top, noise=noise))


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "mean"}, r"kind must be one of"),
    ({"samples": 0}, r"samples must be an int >= 1"),
    ({"sigma": -0.1}, r"sigma must be a number >= 0"),
    ({"chunk_size": -2}, r"chunk_size must be an int >= 1 or None"),
])
def test_bad_configuration(kwargs, message):
    f, _ = fxattr.functionalize(relu_mlp())
    with pytest.raises(fxattr.FxattrError, match=rf"fxattr\.noise_tunnel: {message}"):
        fxattr.noise_tunnel(fxattr.gradient(f), **kwargs)
    with pytest.raises(fxattr.FxattrError, match=r"fxattr\.noise_tunnel: explain must be an explainer"):
        fxattr.noise_tunnel("gradient")


def test_noise_of_the_wrong_shape(setup):
    _, f, params = setup
    explain = fxattr.smoothgrad(f, samples=4)
    with pytest.raises(fxattr.FxattrError, match=r"noise has shape \(3, 5\), expected .* \(4, 5\)"):
        explain(params, torch.randn(5, dtype=torch.float64), 0, noise=torch.randn(3, 5, dtype=torch.float64))
