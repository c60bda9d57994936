import numpy as np
import pytest
import torch
from torch import nn

import fxattr
from tests.contract import (assert_compile_equals_eager, assert_second_order, model_unchanged)
from tests.models import TwoInputs, relu_mlp, smooth_mlp


def _draws(batch, samples, count, shape, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    return {"index": torch.randint(count, (*lead, samples), generator=g),
            "alpha": torch.rand((*lead, samples), generator=g, dtype=dtype),
            "normal": torch.randn((*lead, samples, *shape), generator=g, dtype=dtype)}


def test_midpoint_alphas_reproduce_integrated_gradients_exactly():
    """One baseline and alpha = (k + 1/2)/n: the estimator is IG's midpoint rule, term by term."""
    f, params = fxattr.functionalize(smooth_mlp())
    x, b = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    n = 16
    noise = {"index": torch.zeros(n, dtype=torch.long),
             "alpha": (torch.arange(n, dtype=torch.float64) + 0.5) / n}
    got = fxattr.expected_gradients(f, baselines=b[None], samples=n)(params, x, 1, noise=noise)
    ig = fxattr.integrated_gradients(f, steps=n, method="riemann_middle", baseline=b)(params, x, 1)
    torch.testing.assert_close(got, ig)


def test_single_baseline_converges_to_integrated_gradients():
    f, params = fxattr.functionalize(smooth_mlp())
    x, b = 2 * torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    ig = fxattr.integrated_gradients(f, steps=32, baseline=b)(params, x, 0)
    errors = []
    for samples in (16, 4096):
        explain = fxattr.expected_gradients(f, baselines=b[None], samples=samples)
        errors.append((explain(params, x, 0) - ig).abs().max())
    assert errors[1] < 0.05 * ig.abs().max()
    assert errors[1] < errors[0]


def test_completeness_on_a_linear_model_is_exact():
    """Gradient constant: the attributions sum to f(x) - mean of f over the drawn baselines, and to
    f(x) - mean f(B) when every baseline is drawn once."""
    model = nn.Linear(6, 3).double().eval()
    f, params = fxattr.functionalize(model)
    x, refs = torch.randn(6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    explain = fxattr.expected_gradients(f, baselines=refs, samples=5)
    every = {"index": torch.arange(5), "alpha": torch.rand(5, dtype=torch.float64)}
    total = explain(params, x, 2, noise=every).sum()
    expected = model(x[None])[0, 2] - model(refs)[:, 2].mean()
    torch.testing.assert_close(total, expected.detach())
    torch.manual_seed(3)
    explain = fxattr.expected_gradients(f, baselines=refs, samples=7)
    random_draw = explain(params, x, 2)
    torch.manual_seed(3)
    index = torch.randint(5, (7,))  # the draws explain made: index first
    expected = model(x[None])[0, 2] - model(refs[index])[:, 2].mean()
    torch.testing.assert_close(random_draw.sum(), expected.detach())


def test_matches_hand_written_estimator_on_relu_net():
    model = relu_mlp(torch.float64)
    f, params = fxattr.functionalize(model)
    x, refs = torch.randn(6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    draws = _draws(None, 6, 4, (6,))
    got = fxattr.expected_gradients(f, baselines=refs, samples=6, sigma=0.3)(params, x, 3, noise=draws)
    terms = []
    for i, a, e in zip(draws["index"], draws["alpha"], draws["normal"]):
        xk = x + 0.3 * e
        point = (refs[i] + a * (xk - refs[i])).requires_grad_()
        grad, = torch.autograd.grad(model(point[None])[0, 3], point)
        terms.append((xk - refs[i]) * grad)
    torch.testing.assert_close(got, torch.stack(terms).mean(0))


@pytest.mark.parametrize("sigma", [0.0, 0.2])
def test_agrees_with_captum_gradient_shap_on_the_same_draws(monkeypatch, sigma):
    captum = pytest.importorskip("captum.attr")
    model = smooth_mlp()
    f, params = fxattr.functionalize(model)
    x, refs = torch.randn(5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    samples = 9
    draws = _draws(None, samples, 7, (5,))
    # captum draws the baseline indices with np.random.choice, alpha with np.random.uniform and
    # the input noise with torch.normal(0, stdev): replay ours through them.
    monkeypatch.setattr(np.random, "choice", lambda n, k: draws["index"].numpy())
    monkeypatch.setattr(np.random, "uniform", lambda lo, hi, n: draws["alpha"].numpy())
    monkeypatch.setattr(torch, "normal", lambda mean, std: draws["normal"] * std)
    theirs = captum.GradientShap(model).attribute(x[None], refs, n_samples=samples, stdevs=sigma,
                                                  target=2)[0]
    monkeypatch.undo()
    explain = fxattr.gradient_shap(f, baselines=refs, samples=samples, sigma=sigma)
    ours = explain(params, x, 2, noise=draws if sigma else {k: draws[k] for k in ("index", "alpha")})
    torch.testing.assert_close(ours, theirs)


def test_vmap_equals_loop_with_explicit_draws(dtype):
    f, params = fxattr.functionalize(smooth_mlp(dtype))
    params = {k: v.to(dtype) for k, v in params.items()}
    xs, targets = torch.randn(4, 5, dtype=dtype), torch.tensor([0, 1, 2, 0])
    refs = torch.randn(3, 5, dtype=dtype)
    explain = fxattr.expected_gradients(f, baselines=refs, samples=6, sigma=0.1, chunk_size=4)
    draws = _draws(4, 6, 3, (5,), dtype)
    vmapped = torch.vmap(lambda p, x, t, n: explain(p, x, t, noise=n),
                         in_dims=(None, 0, 0, 0))(params, xs, targets, draws)
    looped = torch.stack([explain(params, xs[i], targets[i], noise={k: v[i] for k, v in draws.items()})
                          for i in range(4)])
    assert vmapped.dtype == dtype and vmapped.shape == xs.shape
    torch.testing.assert_close(vmapped, looped)


def test_random_draws_are_reproducible_and_per_example_under_vmap():
    f, params = fxattr.functionalize(smooth_mlp())
    refs = torch.randn(3, 5, dtype=torch.float64)
    explain = fxattr.expected_gradients(f, baselines=refs, samples=4, sigma=0.1)
    xs = torch.randn(1, 5, dtype=torch.float64).expand(3, 5)
    targets = torch.tensor([1, 1, 1])

    def run(randomness):
        torch.manual_seed(7)
        return torch.vmap(explain, in_dims=(None, 0, 0), randomness=randomness)(params, xs, targets)

    different, again, same = run("different"), run("different"), run("same")
    torch.testing.assert_close(different, again)
    assert not torch.allclose(different[0], different[1])
    torch.testing.assert_close(same[0], same[1])
    with pytest.raises(RuntimeError, match="randomness"):
        torch.vmap(explain, in_dims=(None, 0, 0))(params, xs, targets)


def test_second_order_derivatives_match_finite_differences():
    model = smooth_mlp()
    f, params = fxattr.functionalize(model)
    refs = torch.randn(3, 5, dtype=torch.float64)
    draws = _draws(None, 4, 3, (5,))
    explain = fxattr.expected_gradients(f, baselines=refs, samples=4, sigma=0.1, chunk_size=3)
    fixed = lambda p, x, t: explain(p, x, t, noise=draws)  # noqa: E731
    assert_second_order(fixed, params, torch.randn(5, dtype=torch.float64), 2,
                        param_names=["0.weight", "2.bias"])


@pytest.mark.slow
def test_compile_equals_eager():
    f, params = fxattr.functionalize(smooth_mlp(torch.float32))
    refs = torch.randn(3, 5)
    explain = fxattr.expected_gradients(f, baselines=refs, samples=4, sigma=0.1)
    draws = _draws(None, 4, 3, (5,), torch.float32)
    fixed = lambda p, x, t: explain(p, x, t, noise=draws)  # noqa: E731
    assert_compile_equals_eager(fixed, params, torch.randn(3, 5), torch.tensor([0, 1, 2]))


def test_pytree_input_and_model_unchanged():
    model = TwoInputs().double().eval()
    f, params = fxattr.functionalize(model)
    refs = (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))
    xy = (torch.randn(3, dtype=torch.float64), torch.randn(2, dtype=torch.float64))
    explain = fxattr.expected_gradients(f, baselines=refs, samples=4, sigma=0.1)
    draws = {"index": torch.arange(4), "alpha": torch.full((4,), 0.5, dtype=torch.float64),
             "normal": (torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64))}
    with model_unchanged(model):
        a, b = explain(params, xy, 1, noise=draws)
        torch.manual_seed(0)
        explain(params, xy, None)
    assert a.shape == (3,) and b.shape == (2,)
    # alpha = 1/2 everywhere: midpoint of each straight path, checked by hand.
    expected = []
    for i in range(4):
        point = tuple(((r[i] + t) / 2).requires_grad_() for r, t in zip(refs, xy))
        grads = torch.autograd.grad(model(*[p[None] for p in point])[0, 1], point)
        expected.append([(t - r[i]) * g for t, r, g in zip(xy, refs, grads)])
    torch.testing.assert_close(a, torch.stack([e[0] for e in expected]).mean(0))
    torch.testing.assert_close(b, torch.stack([e[1] for e in expected]).mean(0))


def test_clear_errors():
    f, params = fxattr.functionalize(smooth_mlp())
    refs = torch.randn(3, 5, dtype=torch.float64)
    x = torch.randn(5, dtype=torch.float64)
    with pytest.raises(fxattr.FxattrError, match="expected_gradients: baselines must be a tensor"):
        fxattr.expected_gradients(f, baselines=0.0)
    with pytest.raises(fxattr.FxattrError, match="expected_gradients: baselines must have a leading"):
        fxattr.expected_gradients(f, baselines=torch.tensor(1.0))
    with pytest.raises(fxattr.FxattrError, match="gradient_shap: samples must be"):
        fxattr.gradient_shap(f, baselines=refs, samples=0)
    with pytest.raises(fxattr.FxattrError, match="sigma must be a number >= 0"):
        fxattr.expected_gradients(f, baselines=refs, sigma=-1.0)
    with pytest.raises(fxattr.FxattrError, match="nn.Module"):
        fxattr.expected_gradients(smooth_mlp(), baselines=refs)
    explain = fxattr.expected_gradients(f, baselines=refs, samples=2, sigma=0.1)
    with pytest.raises(fxattr.FxattrError, match=r"baselines has shape \(3, 5\), expected \(N, \*x.shape\)"):
        explain(params, torch.randn(4, dtype=torch.float64), 0)
    with pytest.raises(fxattr.FxattrError, match="target 7 is out of range"):
        explain(params, x, 7)
    good = _draws(None, 2, 3, (5,))
    with pytest.raises(fxattr.FxattrError, match="noise must be a dict"):
        explain(params, x, 0, noise=torch.zeros(2))
    with pytest.raises(fxattr.FxattrError, match=r"noise\['index'\] must lie in \[0, 3\)"):
        explain(params, x, 0, noise=good | {"index": torch.tensor([0, 3])})
    with pytest.raises(fxattr.FxattrError, match=r"noise\['alpha'\] must be a float tensor of shape \(2,\)"):
        explain(params, x, 0, noise=good | {"alpha": torch.rand(3, dtype=torch.float64)})
    with pytest.raises(fxattr.FxattrError, match=r"noise needs 'normal'"):
        explain(params, x, 0, noise={"index": good["index"], "alpha": good["alpha"]})
    with pytest.raises(fxattr.FxattrError, match=r"noise\['normal'\] has shape \(2, 4\)"):
        explain(params, x, 0, noise=good | {"normal": torch.zeros(2, 4, dtype=torch.float64)})
