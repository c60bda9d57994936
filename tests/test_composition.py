"""Every core explainer composes: vmap == loop, exact higher-order derivatives (float64 finite
differences, w.r.t. input and params), compile == eager, the model untouched, float32 and float64."""

import pytest
import torch

import fxattr
from tests.contract import (assert_compile_equals_eager, assert_second_order,
                            assert_vmap_equals_loop, model_unchanged)
from tests.models import residual, small_cnn, smooth_mlp

EXPLAINERS = {
    "gradient": lambda f: fxattr.gradient(f),
    "gradient_square": lambda f: fxattr.gradient(f, postprocess="square"),
    "input_x_gradient": lambda f: fxattr.input_x_gradient(f),
    "input": lambda f: fxattr.input(f),
    "integrated_gradients": lambda f: fxattr.integrated_gradients(f, steps=6, chunk_size=4),
    "ig_riemann_trapezoid": lambda f: fxattr.integrated_gradients(
        f, steps=5, method="riemann_trapezoid", baseline=lambda x: 0.1 * x),
}
# Noise tunnels with their noise passed in, so that results are deterministic.
NOISY = {
    "smoothgrad": lambda f: fxattr.smoothgrad(f, samples=3),
    "vargrad": lambda f: fxattr.vargrad(f, samples=3),
    "noise_tunnel_ig": lambda f: fxattr.noise_tunnel(fxattr.integrated_gradients(f, steps=4),
                                                     kind="smoothgrad_sq", samples=2),
}


def _replayed(explain, samples_shape):
    """``explain`` with its noise fixed by a seed, as a plain three-argument explainer."""
    noise = torch.randn(samples_shape, generator=torch.Generator().manual_seed(5))

    def fixed(params, x, target):
        return explain(params, x, target, noise=noise.to(x.dtype))
    return fixed


def _all_explainers(f, x_shape):
    out = dict(EXPLAINERS)
    for name, build in NOISY.items():
        samples = build(f).config["samples"]
        out[name] = lambda f, build=build, s=samples: _replayed(build(f), (s, *x_shape))
    return {name: build(f) for name, build in out.items()}


MODELS = {
    "mlp": (smooth_mlp, (5,), 3),
    "cnn_bn": (lambda dtype: small_cnn(dtype, activation=torch.nn.Softplus), (3, 8, 8), 5),
    "residual": (residual, (3, 8, 8), 4),
}


@pytest.mark.parametrize("model_name", MODELS)
def test_vmap_equals_loop_and_model_unchanged(model_name, dtype):
    build_model, shape, classes = MODELS[model_name]
    model = build_model(dtype=dtype)
    xs = torch.randn(3, *shape, dtype=dtype)
    ts = torch.arange(3) % classes
    with model_unchanged(model):
        f, params = fxattr.functionalize(model)
        for name, explain in _all_explainers(f, shape).items():
            out = assert_vmap_equals_loop(explain, params, xs, ts)
            assert out.dtype == dtype, name
            assert torch.isfinite(out).all(), name


# ``input`` is left out: it depends on neither the parameters nor anything but x itself.
@pytest.mark.parametrize("name", [n for n in [*EXPLAINERS, *NOISY] if n != "input"])
@pytest.mark.parametrize("model_name", ["mlp", "residual"])
def test_second_order_derivatives_match_finite_differences(name, model_name):
    build_model, shape, classes = MODELS[model_name]
    model = build_model(dtype=torch.float64)
    f, params = fxattr.functionalize(model)
    explain = _all_explainers(f, shape)[name]
    x = torch.randn(*shape, dtype=torch.float64)
    # A few parameters keep finite differences cheap; the first and last layers cover the path.
    names = list(params)[:2] + list(params)[-2:]
    gradgrad = model_name == "mlp" and name in ("gradient", "input_x_gradient")
    assert_second_order(explain, params, x, 1, param_names=names, gradgrad=gradgrad)


@pytest.mark.parametrize("name", [*EXPLAINERS, *NOISY])
def test_compile_equals_eager(name):
    model = smooth_mlp(torch.float32)
    f, params = fxattr.functionalize(model)
    explain = _all_explainers(f, (5,))[name]
    xs, ts = torch.randn(2, 5), torch.tensor([1, 2])
    with model_unchanged(model):
        assert_compile_equals_eager(explain, params, xs, ts)


@pytest.mark.parametrize("name", ["gradient", "integrated_gradients"])
def test_compile_equals_eager_with_batch_norm(name):
    """The element-wise batch norm mode traces into one graph (fullgraph=True)."""
    model = small_cnn(torch.float32)
    f, params = fxattr.functionalize(model)
    explain = _all_explainers(f, (3, 8, 8))[name]
    xs, ts = torch.randn(2, 3, 8, 8), torch.tensor([1, 3])
    with model_unchanged(model):
        assert_compile_equals_eager(explain, params, xs, ts)


def test_compiled_smoothgrad_draws_noise_per_example():
    f, params = fxattr.functionalize(smooth_mlp(torch.float32))
    explain = fxattr.smoothgrad(f, samples=4)
    xs, ts = torch.randn(1, 5).expand(2, 5), torch.tensor([1, 1])
    torch._dynamo.reset()
    compiled = torch.compile(torch.vmap(explain, in_dims=(None, 0, 0), randomness="different"))
    out = compiled(params, xs, ts)
    assert out.shape == (2, 5) and not torch.allclose(out[0], out[1])


def test_training_through_an_explanation_loss():
    """torch.func.grad of a loss of the explanation w.r.t. params, and a step that lowers it."""
    model = smooth_mlp(torch.float64)
    f, params = fxattr.functionalize(model)
    explain = torch.vmap(fxattr.input_x_gradient(f), in_dims=(None, 0, 0))
    xs, ts = torch.randn(8, 5, dtype=torch.float64), torch.zeros(8, dtype=torch.long)

    def loss(p):  # push relevance away from the first feature
        return explain(p, xs, ts)[:, 0].square().mean()

    grads = torch.func.grad(loss)(params)
    stepped = {k: v - 0.5 * grads[k] for k, v in params.items()}
    assert loss(stepped) < loss(params)
