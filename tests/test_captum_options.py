"""captum's ``multiply_by_inputs=False`` and ``return_convergence_delta`` for integrated gradients
and DeepLIFT, against captum on the same model."""

import copy

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


# --------------------------------------------------------------------- DeepLiftShap, softmax, custom

def small_cnn():
    """conv-ReLU-conv-ReLU-avgpool-linear (average pooling: captum's DeepLift breaks
    summation-to-delta before max pooling, tests/propagation/test_deeplift.py)."""
    from tests.layers.models import small_cnn as make
    model = make(pool="avg")
    return model, *fxattr.functionalize(model)


def cnn_inputs(n, seed):
    return torch.randn(n, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def batched_with_delta(explain):
    return torch.vmap(explain, in_dims=(None, 0, 0))


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_deeplift_shap_options_equal_captum(which):
    if which == "mlp":
        model, f, params, x, _, t = setup()
        refs = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    else:
        model, f, params = small_cnn()
        x, refs, t = cnn_inputs(3, 1), cnn_inputs(4, 2), torch.tensor([0, 2, 1])
    for multiply in (True, False):
        ours, delta = batched_with_delta(fxattr.deeplift_shap(
            f, baselines=refs, multiply_by_inputs=multiply, return_convergence_delta=True))(params, x[:3], t[:3])
        theirs, their_delta = captum_attr.DeepLiftShap(model, multiply_by_inputs=multiply).attribute(
            x[:3], baselines=refs, target=t[:3], return_convergence_delta=True)
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-12)
        assert delta.shape == (3, refs.shape[0]) and delta.abs().max() < 1e-12
        if multiply:  # captum's (B * K,) deltas are ours flattened
            torch.testing.assert_close(delta.reshape(-1), their_delta.detach(), atol=1e-12, rtol=0)
        else:  # the mean multiplier is not the product's mean: the flag changes the result
            assert not torch.allclose(ours, batched_with_delta(fxattr.deeplift_shap(f, baselines=refs))(params, x[:3], t[:3]))


def softmax_model():
    from captum.testing.helpers.classification_models import SoftmaxDeepLiftModel
    torch.manual_seed(0)
    model = SoftmaxDeepLiftModel(5, 4, 3).double().eval()
    with torch.no_grad():  # captum sets every weight to 1; random ones make the test sharper
        for p in model.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    return model, *fxattr.functionalize(model)


def test_deeplift_softmax_rescale_equals_captum_and_exact_default_sums_to_delta():
    """captum's nn.Softmax treatment (rescale, then the mean multiplier subtracted) equals
    ``softmax="rescale"``; captum takes that mean over its whole batch, so it is run per example."""
    model, f, params = softmax_model()
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    b = 0.1 * torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0, 2, 1])

    def ours(softmax):
        return torch.vmap(lambda p, xi, bi, ti: fxattr.deeplift(
            f, baseline=bi, softmax=softmax, return_convergence_delta=True)(p, xi, ti), in_dims=(None, 0, 0, 0))(
            params, x, b, t)

    rescaled, delta = ours("rescale")
    theirs = [captum_attr.DeepLift(model).attribute(x[i:i + 1], baselines=b[i:i + 1], target=int(t[i]),
                                                    return_convergence_delta=True) for i in range(3)]
    torch.testing.assert_close(rescaled, torch.cat([a for a, _ in theirs]).detach(), rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(delta, torch.cat([d for _, d in theirs]).detach(), rtol=1e-5, atol=1e-12)
    assert delta.abs().max() > 1e-4  # the mean subtraction breaks summation-to-delta ...
    exact, exact_delta = ours("exact")
    assert exact_delta.abs().max() < 1e-12  # ... the exact softmax rule keeps it
    assert (exact - rescaled).abs().max() > 1e-3


def hypothetical(m, x, b):
    """Hypothetical contributions of every base at every position of a one-hot sequence (C, L):
    ``sum_c m[c, l] * (e_j[c] - b[c, l])`` for base j (DeepLIFT's genomics use)."""
    return m - (m * b).sum(-2, keepdim=True)  # the channel axis, with or without a batch axis


def sequence_model():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv1d(4, 3, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 6, 2)).double().eval()
    x = nn.functional.one_hot(torch.randint(4, (3, 8), generator=torch.Generator().manual_seed(2)), 4)
    return model, *fxattr.functionalize(model), x.transpose(1, 2).double()


def test_custom_attribution_equals_captum():
    model, f, params, x = sequence_model()
    t = torch.tensor([0, 1, 1])
    base = torch.full((4, 8), 0.25, dtype=torch.float64)
    ours = torch.vmap(fxattr.deeplift(f, baseline=base, custom_attribution=hypothetical),
                      in_dims=(None, 0, 0))(params, x, t)
    theirs = captum_attr.DeepLift(model).attribute(
        x, baselines=base[None].expand_as(x), target=t,
        custom_attribution_func=lambda m, xs, bs: tuple(hypothetical(a, c, d) for a, c, d in zip(m, xs, bs)))
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-12)
    # the hypothetical contribution of the observed base is the ordinary attribution
    plain = torch.vmap(fxattr.deeplift(f, baseline=base), in_dims=(None, 0, 0))(params, x, t)
    torch.testing.assert_close((ours * x).sum(1), plain.sum(1))
    # DeepLiftShap applies it per baseline, then averages (as captum)
    refs = torch.stack([base, torch.roll(x[0], 1, -1)])
    ours = torch.vmap(fxattr.deeplift_shap(f, baselines=refs, custom_attribution=hypothetical),
                      in_dims=(None, 0, 0))(params, x, t)
    theirs = captum_attr.DeepLiftShap(model).attribute(
        x, baselines=refs, target=t,
        custom_attribution_func=lambda m, xs, bs: tuple(hypothetical(a, c, d) for a, c, d in zip(m, xs, bs)))
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-12)
    # one- and two-argument functions, as captum's
    one = fxattr.deeplift(f, baseline=base, custom_attribution=lambda m: 2 * m)(params, x[0], 1)
    multipliers = fxattr.deeplift(f, baseline=base, multiply_by_inputs=False)(params, x[0], 1)
    torch.testing.assert_close(one, 2 * multipliers)
    two = fxattr.deeplift(f, custom_attribution=lambda m, xi: m * xi)(params, x[0], 1)
    torch.testing.assert_close(two, fxattr.deeplift(f)(params, x[0], 1))


def test_layer_deeplift_multipliers_equal_captum():
    from tests.layers.models import small_cnn as make
    import fxattr.layers as L
    model = make(pool="avg")
    f, params = fxattr.functionalize(model)
    x, refs, t = cnn_inputs(3, 1), cnn_inputs(2, 2), torch.tensor([0, 2, 1])
    for to_input in (False, True):
        kw = {"attribute_to_layer_input": to_input}
        ours = torch.vmap(L.layer_deeplift(f, layer="features.2", multiply_by_inputs=False, **kw),
                          in_dims=(None, 0, 0))(params, x, t)
        theirs = captum_attr.LayerDeepLift(model, model.features[2], multiply_by_inputs=False).attribute(
            x, target=t, **kw)
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-12)
        ours = torch.vmap(L.layer_deeplift_shap(f, layer="features.2", baselines=refs, multiply_by_inputs=False,
                                                **kw), in_dims=(None, 0, 0))(params, x, t)
        theirs = captum_attr.LayerDeepLiftShap(model, model.features[2], multiply_by_inputs=False).attribute(
            x, refs, target=t, **kw)
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-12)


def test_deeplift_option_contracts():
    """vmap == loop, second order against finite differences, the model untouched, float32."""
    from tests.contract import assert_second_order, assert_vmap_equals_loop, model_unchanged
    model, f, params = softmax_model()
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([1, 0, 2])
    with model_unchanged(model):
        for explain in (fxattr.deeplift(f, softmax="rescale", baseline=0.1),
                        fxattr.deeplift(f, custom_attribution=lambda m, xi, b: m * xi.square()),
                        fxattr.deeplift_shap(f, baselines=x[:2] * 0.5, multiply_by_inputs=False)):
            assert_vmap_equals_loop(explain, params, x, t, rtol=1e-10, atol=1e-12)
            assert_second_order(explain, params, x[0], t[0], param_names=["lin1.weight"])
    model32 = copy.deepcopy(model).float()
    f32, params32 = fxattr.functionalize(model32)
    got = fxattr.deeplift(f32, softmax="rescale", baseline=0.1)(params32, x[0].float(), 1)
    want = fxattr.deeplift(f, softmax="rescale", baseline=0.1)(params, x[0], 1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_deeplift_option_errors():
    model, f, params = softmax_model()
    cases = [
        (lambda: fxattr.deeplift(f, softmax="linear"), "softmax must be one of"),
        (lambda: fxattr.deeplift_shap(f, baselines=torch.zeros(1, 5), softmax=None), "softmax must be one of"),
        (lambda: fxattr.deeplift(f, custom_attribution="hypothetical"), "custom_attribution must be a callable"),
        (lambda: fxattr.deeplift(f, custom_attribution=lambda a, b, c, d: a), "1 to 3 positional"),
        (lambda: fxattr.deeplift_shap(f, baselines=torch.zeros(1, 5), multiply_by_inputs="no"),
         "multiply_by_inputs must be True or False"),
        (lambda: fxattr.deeplift_shap(f, baselines=torch.zeros(1, 5), return_convergence_delta=1),
         "return_convergence_delta must be True or False"),
        (lambda: fxattr.deeplift(f, custom_attribution=lambda m: 3)(params, torch.ones(5, dtype=torch.float64), 0),
         "custom_attribution must return a tensor"),
    ]
    for make, message in cases:
        with pytest.raises(FxattrError, match=message):
            make()


# ------------------------------------------------------------------- GradientShap, gradient postprocess

def replay(monkeypatch, draws):
    """captum draws GradientShap's baseline indices with np.random.choice, the path points with
    np.random.uniform and the noise with torch.normal: replay given draws through them."""
    import numpy as np
    monkeypatch.setattr(np.random, "choice", lambda n, k: draws["index"].reshape(-1).numpy())
    monkeypatch.setattr(np.random, "uniform", lambda lo, hi, n: draws["alpha"].reshape(-1).numpy())
    monkeypatch.setattr(torch, "normal", lambda mean, std: draws["normal"].reshape(-1, *draws["normal"].shape[2:]) * std)


def gradient_shap_draws(batch, samples, count, shape, seed=7):
    g = torch.Generator().manual_seed(seed)
    return {"index": torch.randint(count, (batch, samples), generator=g),
            "alpha": torch.rand((batch, samples), generator=g, dtype=torch.float64),
            "normal": torch.randn((batch, samples, *shape), generator=g, dtype=torch.float64)}


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_gradient_shap_options_equal_captum(monkeypatch, which):
    if which == "mlp":
        model, f, params, x, _, t = setup()
        refs = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    else:
        model, f, params = small_cnn()
        x, refs, t = cnn_inputs(3, 1), cnn_inputs(4, 2), torch.tensor([0, 2, 1])
    x, t, samples = x[:3], t[:3], 5
    draws = gradient_shap_draws(3, samples, refs.shape[0], x.shape[1:])
    for multiply in (True, False):
        for baselines in (refs, lambda: refs, lambda xi: refs):  # captum's and fxattr's callable forms
            explain = fxattr.gradient_shap(f, baselines=baselines, samples=samples, sigma=0.1,
                                           multiply_by_inputs=multiply, return_convergence_delta=True)
            ours, delta = torch.vmap(lambda p, xi, ti, d: explain(p, xi, ti, noise=d), in_dims=(None, 0, 0, 0))(
                params, x, t, draws)
            replay(monkeypatch, draws)
            theirs, their_delta = captum_attr.GradientShap(model, multiply_by_inputs=multiply).attribute(
                x, baselines=(lambda: refs) if callable(baselines) else refs, n_samples=samples, stdevs=0.1,
                target=t, return_convergence_delta=True)
            monkeypatch.undo()
            torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-12)
            assert delta.shape == (3, samples)
            if multiply:  # captum's deltas are of what it returns
                torch.testing.assert_close(delta.reshape(-1), their_delta.detach(), rtol=1e-5, atol=1e-12)


def test_gradient_shap_callable_baselines_per_example_under_vmap():
    """A callable x -> reference set runs on each example under vmap (here: the example's own
    shifted copies), equal to the loop with fixed sets."""
    from tests.contract import assert_second_order
    model, f, params, x, _, t = setup()
    make = lambda xi: torch.stack([0.5 * xi, -xi, xi.roll(1)])  # noqa: E731
    draws = {"index": torch.tensor([0, 2, 1, 1]), "alpha": torch.tensor([0.2, 0.9, 0.5, 0.1], dtype=torch.float64)}
    explain = fxattr.gradient_shap(f, baselines=make, samples=4)
    vmapped = torch.vmap(lambda p, xi, ti: explain(p, xi, ti, noise=draws), in_dims=(None, 0, 0))(params, x, t)
    looped = torch.stack([fxattr.gradient_shap(f, baselines=make(xi), samples=4)(params, xi, ti, noise=draws)
                          for xi, ti in zip(x, t)])
    torch.testing.assert_close(vmapped, looped, rtol=1e-12, atol=1e-14)
    assert_second_order(lambda p, xi, ti: explain(p, xi, ti, noise=draws), params, x[0], t[0],
                        param_names=["0.weight"])
    with pytest.raises(FxattrError, match="baselines"):
        fxattr.gradient_shap(f, baselines=lambda a, b: a)
    with pytest.raises(FxattrError, match="baselines"):
        fxattr.gradient_shap(f, baselines=lambda xi: "zeros")(params, x[0], 0)
    with pytest.raises(FxattrError, match="multiply_by_inputs must be True or False"):
        fxattr.gradient_shap(f, baselines=x, multiply_by_inputs=None)
    with pytest.raises(FxattrError, match="return_convergence_delta must be True or False"):
        fxattr.expected_gradients(f, baselines=x, return_convergence_delta="yes")


def test_gradient_callable_postprocess():
    """PyTorch-Explanations' SimpleGradient(post_process=...): any function of the gradient."""
    from tests.contract import assert_second_order, assert_vmap_equals_loop, model_unchanged
    model, f, params = small_cnn()
    x, t = cnn_inputs(3, 1), torch.tensor([0, 2, 1])
    channel_max = fxattr.gradient(f, postprocess=lambda g: g.square().amax(0))
    with model_unchanged(model):
        got = torch.vmap(channel_max, in_dims=(None, 0, 0))(params, x, t)
    plain = torch.vmap(fxattr.gradient(f), in_dims=(None, 0, 0))(params, x, t)
    torch.testing.assert_close(got, plain.square().amax(1))
    assert got.shape == (3, 6, 6)
    looped = torch.stack([channel_max(params, xi, ti) for xi, ti in zip(x, t)])
    torch.testing.assert_close(got, looped)
    smooth_model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    fs, ps = fxattr.functionalize(smooth_model)
    smooth = fxattr.gradient(fs, postprocess=lambda g: g * g.sum())
    assert_vmap_equals_loop(smooth, ps, x[:, 0, 0, :5], t)
    assert_second_order(smooth, ps, x[0, 0, 0, :5], 1, param_names=["0.weight"])
    assert fxattr.gradient(f, postprocess=torch.abs)(params, x[0], 0).equal(
        fxattr.gradient(f, postprocess="abs")(params, x[0], 0))
    with pytest.raises(FxattrError, match="postprocess must be"):
        fxattr.gradient(f, postprocess=3)
    with pytest.raises(FxattrError, match="postprocess must be one of"):
        fxattr.gradient(f, postprocess="max")
    with pytest.raises(FxattrError, match="postprocess must return a tensor"):
        fxattr.gradient(f, postprocess=lambda g: None)(params, x[0], 0)
