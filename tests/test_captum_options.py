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
    import fxattr.layers as L
    from tests.layers.models import small_cnn as make
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
    from tests.contract import (
        assert_second_order,
        assert_vmap_equals_loop,
        model_unchanged,
    )
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
        # a result of another shape or structure than x is refused, not returned as x's attributions
        (lambda: fxattr.deeplift(f, custom_attribution=lambda m: m.sum())(params, torch.ones(5, dtype=torch.float64),
                                                                           0),
         (r"^fxattr\.deeplift: custom_attribution must return attributions of x's structure and shapes "
          r"\(a tensor of shape \(5,\)\), got a tensor of shape \(\)$")),
        (lambda: fxattr.deeplift(f, custom_attribution=lambda m: (m,))(params, torch.ones(5, dtype=torch.float64), 0),
         r"custom_attribution must return .* got a tuple of 1 tensors of shapes \(5,\)$"),
        (lambda: torch.vmap(fxattr.deeplift_shap(f, baselines=torch.zeros(2, 5), custom_attribution=lambda m: m[:3]),
                            in_dims=(None, 0, 0))(params, torch.ones(2, 5, dtype=torch.float64), torch.tensor([0, 1])),
         r"^fxattr\.deeplift_shap: custom_attribution must return .* got a tensor of shape \(3,\)$"),
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
            ours, delta = torch.vmap(lambda p, xi, ti, d, e=explain: e(p, xi, ti, noise=d), in_dims=(None, 0, 0, 0))(
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
    make = lambda xi: torch.stack([0.5 * xi, -xi, xi.roll(1)])
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
    from tests.contract import (
        assert_second_order,
        assert_vmap_equals_loop,
        model_unchanged,
    )
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


# ------------------------------------------------- perturbation: tuple, integer and boolean inputs, masks

basic_models = pytest.importorskip("captum.testing.helpers.basic_models")


def multi_input():
    """captum's BasicModel_MultiLayer_TrueMultiInput: three (3,) inputs, two outputs."""
    torch.manual_seed(0)
    model = basic_models.BasicModel_MultiLayer_TrueMultiInput().double().eval()
    x = tuple(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(3))
    return model, *fxattr.functionalize(model), x, torch.tensor([0, 1, 1])


class ImageAndVector(nn.Module):
    """A small CNN of two inputs: an image (2, 6, 6) and a vector (3,)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.vector = nn.Linear(3, 12)
        self.head = nn.Sequential(nn.Tanh(), nn.Linear(12, 3))

    def forward(self, image, vector):
        return self.head(self.conv(image) + self.vector(vector))


def image_and_vector():
    torch.manual_seed(2)
    model = ImageAndVector().double().eval()
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 2, 6, 6, dtype=torch.float64, generator=g), torch.randn(3, 3, dtype=torch.float64, generator=g))
    return model, *fxattr.functionalize(model), x, torch.tensor([2, 0, 1])


def assert_tuple_close(ours, theirs, rtol=1e-5):
    assert isinstance(ours, tuple) and len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        b = b.detach().to(a.dtype)
        scale = float(b.abs().max())
        assert scale > 1e-8, "captum's attributions are all zero: the comparison would be empty"
        assert float((a - b).abs().max()) <= rtol * scale, float((a - b).abs().max()) / scale


def vmapped(explain, params, x, t, **kw):
    return torch.vmap(lambda p, xi, ti: explain(p, xi, ti, **kw), in_dims=(None, 0, 0))(params, x, t)


@pytest.mark.parametrize("which", ["multi_input", "cnn"])
def test_feature_ablation_and_occlusion_of_tuple_inputs_equal_captum(which):
    model, f, params, x, t = multi_input() if which == "multi_input" else image_and_vector()
    bases = (0.5, -1.0, 0.25)[:len(x)]
    ours = vmapped(fxattr.feature_ablation(f, baseline=bases, chunk_size=5), params, x, t)
    assert_tuple_close(ours, captum_attr.FeatureAblation(model).attribute(x, baselines=bases, target=t))
    if which == "multi_input":
        windows, strides = ((2,), (3,), (1,)), ((1,), (2,), (1,))
        masks = (torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2]), torch.tensor([0, 3, 3]))
    else:
        windows, strides = ((1, 3, 3), (2,)), ((1, 2, 2), (1,))
        masks = (torch.arange(36).reshape(1, 6, 6) // 12, torch.tensor([0, 3, 4]))
    ours = vmapped(fxattr.occlusion(f, window=windows, stride=strides, baseline=bases), params, x, t)
    theirs = captum_attr.Occlusion(model).attribute(x, sliding_window_shapes=windows, strides=strides,
                                                    baselines=bases, target=t)
    assert_tuple_close(ours, theirs)  # captum returns occlusion in float32
    # masks spanning the inputs: one id is one feature in every input (captum 0.9's semantics) ...
    ours = vmapped(fxattr.feature_ablation(f, feature_mask=masks), params, x, t)
    assert_tuple_close(ours, captum_attr.FeatureAblation(model).attribute(
        x, target=t, feature_mask=tuple(m[None] for m in masks)))
    # ... or, with cross_tensor=False, each input's own (captum with the ids made distinct)
    ours = vmapped(fxattr.feature_ablation(f, feature_mask=masks, cross_tensor=False), params, x, t)
    distinct = tuple(m[None] + 100 * i for i, m in enumerate(masks))
    assert_tuple_close(ours, captum_attr.FeatureAblation(model).attribute(x, target=t, feature_mask=distinct))


def test_per_example_feature_masks_under_vmap_equal_captum_and_the_loop():
    model, f, params, x, t = image_and_vector()
    g = torch.Generator().manual_seed(9)
    masks = (torch.randint(5, (3, 1, 6, 6), generator=g), torch.randint(5, (3, 3), generator=g))
    explain = fxattr.feature_ablation(f, chunk_size=2)
    per_example = torch.vmap(lambda p, xi, ti, mi: explain(p, xi, ti, feature_mask=mi), in_dims=(None, 0, 0, 0))
    ours = per_example(params, x, t, masks)
    assert_tuple_close(ours, captum_attr.FeatureAblation(model).attribute(x, target=t, feature_mask=masks))
    for i in range(3):  # == the loop with each example's mask fixed at construction
        alone = fxattr.feature_ablation(f, feature_mask=(masks[0][i], masks[1][i]))(params, (x[0][i], x[1][i]), t[i])
        for a, b in zip(alone, ours):
            torch.testing.assert_close(a, b[i], rtol=1e-12, atol=1e-12)
    # one tensor input, and num_features fixing the count (what torch.compile needs)
    cnn, fc, pc = small_cnn()
    xc = cnn_inputs(3, 4)
    mc = torch.randint(4, (3, 1, 6, 6), generator=g)
    counted = fxattr.feature_ablation(fc, num_features=4)
    ours = torch.vmap(lambda p, xi, ti, mi: counted(p, xi, ti, feature_mask=mi), in_dims=(None, 0, 0, 0))(
        pc, xc, t, mc)
    theirs = captum_attr.FeatureAblation(cnn).attribute(xc, target=t, feature_mask=mc)
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-12)
    with pytest.raises(FxattrError, match="holds id 4 but num_features is 4"):
        counted(pc, xc[0], 0, feature_mask=mc[0] + 1)
    with pytest.raises(FxattrError, match="negative id"):
        counted(pc, xc[0], 0, feature_mask=mc[0] - 1)
    with pytest.raises(FxattrError, match="num_features must be an int >= 1"):
        fxattr.feature_ablation(fc, num_features=0)
    with pytest.raises(FxattrError, match="feature_mask holds 1 mask but x has 2 inputs"):
        fxattr.feature_ablation(f, feature_mask=masks[0][0])(params, (x[0][0], x[1][0]), 0)
    with pytest.raises(FxattrError, match="cross_tensor must be True or False"):
        fxattr.feature_ablation(f, cross_tensor="yes")


@pytest.mark.slow
def test_per_example_masks_compile_equals_eager():
    model, f, params, x, _, t = setup()
    masks = torch.randint(3, (4, 5), generator=torch.Generator().manual_seed(1))
    counted = fxattr.feature_ablation(f, num_features=3, chunk_size=None)
    explain = lambda p, x_and_m, ti: counted(p, x_and_m[0], ti, feature_mask=x_and_m[1])
    torch._dynamo.reset()
    eager = torch.vmap(explain, in_dims=(None, 0, 0))(params, (x, masks), t)
    compiled = torch.compile(torch.vmap(explain, in_dims=(None, 0, 0)))(params, (x, masks), t)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-9)


def test_integer_and_boolean_inputs_and_baselines_equal_captum():
    # integers in, integers out (captum's test_simple_ablation_int_to_int)
    model = basic_models.BasicModel()
    f, params = fxattr.functionalize(model)
    x = torch.tensor([[-3, 1, 2], [2, -1, 0]])
    ours = torch.vmap(fxattr.feature_ablation(f, baseline=-3), in_dims=(None, 0, None))(params, x, 1)
    torch.testing.assert_close(ours, captum_attr.FeatureAblation(model).attribute(x, baselines=-3, target=1).double()
                               .to(ours.dtype))
    # booleans (captum's BasicModelBoolInput), baselines True and False
    model = basic_models.BasicModelBoolInput()
    f, params = fxattr.functionalize(model)
    x = torch.tensor([[True, False, True], [False, False, True]])
    for base in (True, False):
        ours = torch.vmap(fxattr.feature_ablation(f, baseline=base), in_dims=(None, 0, None))(params, x, 0)
        theirs = captum_attr.FeatureAblation(model).attribute(x, baselines=base, target=0)
        torch.testing.assert_close(ours, theirs)
        assert ours.abs().max() > 0
        ours = torch.vmap(fxattr.occlusion(f, window=2, baseline=base), in_dims=(None, 0, None))(params, x, 0)
        theirs = captum_attr.Occlusion(model).attribute(x, sliding_window_shapes=(2,), baselines=base, target=0)
        torch.testing.assert_close(ours, theirs)
    # token ids into embeddings, two integer inputs, a pad-id baseline (captum's BasicEmbeddingModel)
    torch.manual_seed(3)
    model = basic_models.BasicEmbeddingModel(num_embeddings=10, embedding_dim=4, hidden_dim=5).double().eval()
    f, params = fxattr.functionalize(model)
    x = tuple(torch.randint(1, 10, (2, 6), generator=torch.Generator().manual_seed(i)) for i in range(2))
    t = torch.tensor([0, 0])
    ours = vmapped(fxattr.feature_ablation(f, baseline=0), params, x, t)
    assert_tuple_close(ours, captum_attr.FeatureAblation(model).attribute(x, baselines=(0, 0), target=t))
    ours = vmapped(fxattr.occlusion(f, window=((2,), (3,)), baseline=(0, 1)), params, x, t)
    assert_tuple_close(ours, captum_attr.Occlusion(model).attribute(x, sliding_window_shapes=((2,), (3,)),
                                                                     baselines=(0, 1), target=t))
    assert ours[0].dtype == torch.float64
    with pytest.raises(FxattrError, match="baseline 0.5 for an integer input must be an integer"):
        fxattr.feature_ablation(f, baseline=0.5)(params, (x[0][0], x[1][0]), 0)
    with pytest.raises(FxattrError, match="give an integer baseline"):
        fxattr.occlusion(f, window=2, baseline=torch.zeros(6))(params, (x[0][0], x[1][0]), 0)
    with pytest.raises(FxattrError, match="baseline 2 for a boolean input must be True / False"):
        fxattr.feature_ablation(fxattr.functionalize(basic_models.BasicModelBoolInput())[0], baseline=2)(
            {}, torch.tensor([True, False, True]), 0)


def test_perturbation_option_contracts():
    """Tuple inputs: vmap == loop, derivatives w.r.t. the parameters and the float input against
    finite differences (second order), the model untouched, float32."""
    from tests.contract import model_unchanged
    model, f, params, x, t = image_and_vector()
    masks = (torch.arange(36).reshape(1, 6, 6) // 12, torch.tensor([0, 3, 4]))
    explainers = [fxattr.feature_ablation(f, feature_mask=masks, baseline=(0.1, 0.2)),
                  fxattr.occlusion(f, window=((2, 3, 3), (2,)), stride=((1, 3, 3), (1,))),
                  fxattr.shapley_values(f, feature_mask=masks, baseline=(0.1, 0.2))]
    with model_unchanged(model):
        for explain in explainers:
            batch = vmapped(explain, params, x, t)
            for i in range(3):
                for a, b in zip(explain(params, (x[0][i], x[1][i]), t[i]), batch):
                    torch.testing.assert_close(a, b[i], rtol=1e-10, atol=1e-12)
            v = [torch.randn(a.shape[1:], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
                 for a in batch]

            def loss(weight, vector, explain=explain, v=v):
                p = dict(params, **{"head.1.weight": weight})
                out = explain(p, (x[0][0], vector), 1)
                return sum((a * w).sum() for a, w in zip(out, v))
            inputs = (params["head.1.weight"].clone().requires_grad_(), x[1][0].clone().requires_grad_())
            assert torch.autograd.gradcheck(loss, inputs, fast_mode=True)
            assert torch.autograd.gradgradcheck(loss, inputs, fast_mode=True)
    model32 = copy.deepcopy(model).float()
    f32, p32 = fxattr.functionalize(model32)
    got = fxattr.feature_ablation(f32, feature_mask=masks)(p32, (x[0][0].float(), x[1][0].float()), 1)
    want = fxattr.feature_ablation(f, feature_mask=masks)(params, (x[0][0], x[1][0]), 1)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_tuple_option_errors():
    model, f, params, x, t = image_and_vector()
    one = (x[0][0], x[1][0])
    cases = [
        (lambda: fxattr.occlusion(f, window=((1, 3, 3), (2,), (1,)))(params, one, 0), "window has 3 entries but x has 2"),
        (lambda: fxattr.occlusion(f, window=((1, 3, 3), (2,)), baseline=(0.0,))(params, one, 0),
         "baseline's structure does not match"),
        (lambda: fxattr.occlusion(f, window=((1, 3, 3), (2,)), incremental=True), None),
        (lambda: fxattr.occlusion(f, window=((1, 3, 3), (0,))), "window must be an int >= 1"),
        (lambda: fxattr.feature_ablation(f, baseline=("a", 0.0)), "baseline must be a number"),
        (lambda: fxattr.feature_ablation(f, baseline=(float("nan"), 0.0)), "finite"),
    ]
    for make, message in cases:
        if message is None:
            continue
        with pytest.raises(FxattrError, match=message):
            make()


def test_show_progress_reports_every_chunk_and_changes_nothing(capsys):
    model, f, params = small_cnn()
    x, t = cnn_inputs(2, 4), torch.tensor([0, 2])
    mask = torch.arange(36).reshape(1, 6, 6) // 5  # 8 groups
    calls = []
    explain = fxattr.feature_ablation(f, feature_mask=mask, chunk_size=3,
                                      show_progress=lambda done, total: calls.append((done, total)))
    got = torch.vmap(explain, in_dims=(None, 0, 0))(params, x, t)
    assert calls == [(3, 8), (6, 8), (8, 8)]  # once per chunk, for the whole batch at once
    torch.testing.assert_close(got, torch.vmap(fxattr.feature_ablation(f, feature_mask=mask, chunk_size=3),
                                               in_dims=(None, 0, 0))(params, x, t), rtol=0, atol=0)
    calls.clear()
    plain = fxattr.occlusion(f, window=(2, 3, 3), stride=(1, 3, 3), incremental=False, chunk_size=2)
    got = fxattr.occlusion(f, window=(2, 3, 3), stride=(1, 3, 3), incremental=False, chunk_size=2,
                           show_progress=lambda done, total: calls.append((done, total)))(params, x[0], 1)
    assert calls == [(2, 4), (4, 4)]
    torch.testing.assert_close(got, plain(params, x[0], 1), rtol=0, atol=0)
    calls.clear()
    fxattr.occlusion(f, window=(2, 3, 3), stride=(1, 3, 3), incremental=True,
                     show_progress=lambda done, total: calls.append((done, total)))(params, x[0], 1)
    assert calls == [(4, 4)]  # the incremental path reports once
    calls.clear()
    torch.manual_seed(0)
    drawn = fxattr.rise(f, num_masks=5, cell_size=2, chunk_size=4,
                        show_progress=lambda done, total: calls.append((done, total)))(params, x[0], 1)
    assert calls == [(4, 5), (5, 5)]
    torch.manual_seed(0)
    torch.testing.assert_close(drawn, fxattr.rise(f, num_masks=5, cell_size=2, chunk_size=4)(params, x[0], 1),
                               rtol=0, atol=0)
    fxattr.feature_ablation(f, feature_mask=mask, show_progress=True)(params, x[0], 0)
    assert "feature_ablation" in capsys.readouterr().err  # a tqdm bar (or a line) on stderr
    with pytest.raises(FxattrError, match="show_progress must be True, False or a callable"):
        fxattr.occlusion(f, window=2, show_progress="bar")


class TwoImages(nn.Module):
    """Two image inputs of different channels, summed after their first convolutions."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(1, 3, 3, padding=1)
        self.relu, self.conv, self.relu2 = nn.ReLU(), nn.Conv2d(3, 4, 3), nn.ReLU()
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, image, other):
        h = self.relu(self.a(image) + self.b(other))
        return self.fc(torch.flatten(self.relu2(self.conv(h)), 1))


def test_guided_gradcam_of_tuple_inputs_equals_captum():
    from tests.contract import model_unchanged
    torch.manual_seed(0)
    model = TwoImages().double().eval()
    f, params = fxattr.functionalize(model)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 2, 6, 6, dtype=torch.float64, generator=g), torch.randn(3, 1, 6, 6, dtype=torch.float64, generator=g))
    t = torch.tensor([0, 1, 2])
    for mode in ("nearest", "bilinear"):
        explain = fxattr.guided_gradcam(f, layer="conv", interpolate=mode)
        with model_unchanged(model):
            ours = vmapped(explain, params, x, t)
        assert_tuple_close(ours, captum_attr.GuidedGradCam(model, model.conv).attribute(
            x, target=t, interpolate_mode=mode))
        for i in range(3):
            for a, b in zip(explain(params, (x[0][i], x[1][i]), t[i]), ours):
                torch.testing.assert_close(a, b[i], rtol=1e-12, atol=1e-12)

    def loss(weight):
        out = explain(dict(params, **{"fc.weight": weight}), (x[0][0], x[1][0]), 1)
        return sum((a * a).sum() for a in out)
    assert torch.autograd.gradcheck(loss, (params["fc.weight"].clone().requires_grad_(),), fast_mode=True)
    vector_model = ImageAndVector().double().eval()
    fv, pv = fxattr.functionalize(vector_model)
    with pytest.raises(FxattrError, match=r"cannot be upsampled to an input of shape \(3,\)"):
        fxattr.guided_gradcam(fv, layer="conv.0")(pv, (x[0][0], x[1][0, 0, 0, :3]), 0)


# ------------------------------------------------- the Shapley family: tuple, integer, per-example, progress

def test_shapley_family_of_tuple_inputs_equals_captum():
    model, f, params, x, t = multi_input()
    masks = (torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2]), torch.tensor([0, 3, 3]))
    calls = []
    exact = fxattr.shapley_values(f, feature_mask=masks, chunk_size=6,
                                  show_progress=lambda done, total: calls.append((done, total)))
    ours = vmapped(exact, params, x, t)
    assert calls == [(6, 16), (12, 16), (16, 16)]
    theirs = captum_attr.ShapleyValues(model).attribute(x, target=t, feature_mask=tuple(m[None] for m in masks))
    assert_tuple_close(ours, theirs)
    # efficiency over the inputs together: the groups span them
    change = model(*x).gather(1, t[:, None])[:, 0] - model(*(torch.zeros_like(a) for a in x)).gather(1, t[:, None])[:, 0]
    phi = torch.zeros(3, 4, dtype=torch.float64)
    for a, m in zip(ours, masks):
        phi[:, m] = a  # every element of a group carries the group's value
    torch.testing.assert_close(phi.sum(1), change.detach())
    # sampling on captum's replayed permutations
    torch.manual_seed(7)
    permutations = torch.stack([torch.randperm(4) for _ in range(5)])
    torch.manual_seed(7)
    theirs = captum_attr.ShapleyValueSampling(model).attribute(
        x, target=t, feature_mask=tuple(m[None] for m in masks), n_samples=5)
    ours = vmapped(fxattr.shapley_value_sampling(f, feature_mask=masks, permutations=permutations), params, x, t)
    assert_tuple_close(ours, theirs)
    # per-example masks under vmap == captum's per-example masks
    g = torch.Generator().manual_seed(2)
    per_example = tuple(torch.randint(3, (3, 3), generator=g) for _ in range(3))
    explain = fxattr.shapley_values(f)
    ours = torch.vmap(lambda p, xi, ti, mi: explain(p, xi, ti, feature_mask=mi), in_dims=(None, 0, 0, 0))(
        params, x, t, per_example)
    assert_tuple_close(ours, captum_attr.ShapleyValues(model).attribute(x, target=t, feature_mask=per_example))


def test_kernel_shap_and_lime_on_tuple_and_integer_inputs():
    """On a model additive over two inputs, KernelSHAP and LIME (linear) are exact: w * (x - b);
    token ids with a pad baseline go through exact Shapley values and equal captum."""
    class TwoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2, bias=False), nn.Linear(2, 2)

        def forward(self, u, v):
            return self.a(u) + self.b(v)
    torch.manual_seed(4)
    model = TwoLinear().double()
    f, params = fxattr.functionalize(model)
    x = (torch.randn(3, dtype=torch.float64), torch.randn(2, dtype=torch.float64))
    bases = (0.5, -1.0)
    want = (model.a.weight[1].detach() * (x[0] - 0.5), model.b.weight[1].detach() * (x[1] + 1.0))
    for explain in (fxattr.kernel_shap(f, baseline=bases, samples=64),
                    fxattr.lime(f, baseline=bases, samples=64, regression="linear"),
                    fxattr.shapley_values(f, baseline=bases)):
        torch.manual_seed(0)
        for a, b in zip(explain(params, x, 1), want):
            torch.testing.assert_close(a, b)
    torch.manual_seed(3)
    embedding = basic_models.BasicEmbeddingModel(num_embeddings=10, embedding_dim=4, hidden_dim=5).double().eval()
    fe, pe = fxattr.functionalize(embedding)
    ids = tuple(torch.randint(1, 10, (2, 4), generator=torch.Generator().manual_seed(i)) for i in range(2))
    masks = (torch.tensor([0, 0, 1, 2]), torch.tensor([3, 3, 4, 4]))
    ours = vmapped(fxattr.shapley_values(fe, feature_mask=masks, baseline=0), pe, ids, torch.tensor([0, 0]))
    theirs = captum_attr.ShapleyValues(embedding).attribute(ids, baselines=(0, 0), target=0,
                                                            feature_mask=tuple(m[None] for m in masks))
    assert_tuple_close(ours, theirs)


@pytest.mark.slow
def test_gradient_and_deeplift_options_compile_equals_eager():
    """One compiled function holding the new options of the gradient family and DeepLIFT. The
    aot_eager backend (dynamo capture and AOT autograd, no C++ code generation): the options add
    Python-level control only, and inductor on each base method is tested with it (64 s here with
    inductor on the loaded 2-core machine, 25 s with aot_eager)."""
    model, f, params = softmax_model()
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    t = torch.tensor([2, 0, 1])
    draws = {"index": torch.tensor([0, 1, 1]), "alpha": torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)}
    lifted = fxattr.deeplift(f, softmax="rescale", baseline=0.1,
                             custom_attribution=lambda m, xi, b: m * (xi - b).square())
    shap = fxattr.gradient_shap(f, baselines=lambda xi: torch.stack([0.5 * xi, -xi]), samples=3,
                                multiply_by_inputs=False, return_convergence_delta=True)
    saliency = fxattr.gradient(f, postprocess=lambda g: g.abs() / g.abs().sum())

    def explain(p, xi, ti):
        attributions, delta = shap(p, xi, ti, noise=draws)
        return torch.cat([lifted(p, xi, ti), attributions, delta, saliency(p, xi, ti)])

    torch._dynamo.reset()
    eager = torch.vmap(explain, in_dims=(None, 0, 0))(params, x, t)
    compiled = torch.compile(torch.vmap(explain, in_dims=(None, 0, 0)), backend="aot_eager")(params, x, t)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-9)


def test_deeplift_options_on_a_softmax_cnn_and_captums_relu_model():
    """softmax="rescale" on a small CNN ending in nn.Softmax (captum per example, its mean being
    over the batch), and DeepLiftShap's flags on captum's ReLUDeepLiftModel with a tuple x."""
    from tests.layers.models import small_cnn as make
    torch.manual_seed(0)
    model = nn.Sequential(make(pool="avg"), nn.Softmax(dim=1)).eval()
    f, params = fxattr.functionalize(model)
    g = torch.Generator().manual_seed(1)
    x, b = cnn_inputs(3, 5), 0.2 * cnn_inputs(3, 6)
    t = torch.tensor([0, 2, 1])
    ours = torch.vmap(lambda p, xi, bi, ti: fxattr.deeplift(f, baseline=bi, softmax="rescale")(p, xi, ti),
                      in_dims=(None, 0, 0, 0))(params, x, b, t)
    theirs = torch.cat([captum_attr.DeepLift(model).attribute(x[i:i + 1], baselines=b[i:i + 1], target=int(t[i]))
                        for i in range(3)])
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-12)
    relu_model = basic_models.ReLUDeepLiftModel().double().eval()
    fr, pr = fxattr.functionalize(relu_model)
    xs = tuple(torch.randn(2, 3, dtype=torch.float64, generator=g) for _ in range(2))
    refs = tuple(torch.randn(4, 3, dtype=torch.float64, generator=g) for _ in range(2))
    for multiply in (True, False):
        ours, delta = torch.vmap(fxattr.deeplift_shap(fr, baselines=refs, multiply_by_inputs=multiply,
                                                      return_convergence_delta=True), in_dims=(None, 0, None))(pr, xs, 1)
        theirs, their_delta = captum_attr.DeepLiftShap(relu_model, multiply_by_inputs=multiply).attribute(
            xs, baselines=refs, target=1, return_convergence_delta=True)
        for a, c in zip(ours, theirs):
            torch.testing.assert_close(a, c.detach(), rtol=1e-5, atol=1e-12)
        assert sum(float(c.abs().sum()) for c in theirs) > 0
        if multiply:
            torch.testing.assert_close(delta.reshape(-1), their_delta.detach(), atol=1e-12, rtol=0)


def test_gradient_shap_flags_vmap_equals_loop_and_second_order():
    from tests.contract import assert_second_order, model_unchanged
    model, f, params, x, _, t = setup()
    refs = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    draws = {"index": torch.tensor([0, 3, 1]), "alpha": torch.tensor([0.2, 0.7, 0.4], dtype=torch.float64)}
    explain = fxattr.gradient_shap(f, baselines=refs, samples=3, multiply_by_inputs=False,
                                   return_convergence_delta=True)
    with model_unchanged(model):
        grads, delta = torch.vmap(lambda p, xi, ti: explain(p, xi, ti, noise=draws), in_dims=(None, 0, 0))(params, x, t)
    for i in range(4):
        g, d = explain(params, x[i], t[i], noise=draws)
        torch.testing.assert_close(grads[i], g, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(delta[i], d, rtol=1e-12, atol=1e-14)
    # the delta is that of the multiplied attributions: a linear model completes exactly
    linear = nn.Linear(5, 3).double()
    fl, pl = fxattr.functionalize(linear)
    _, exact = fxattr.gradient_shap(fl, baselines=refs, samples=3, multiply_by_inputs=False,
                                    return_convergence_delta=True)(pl, x[0], 1, noise=draws)
    assert exact.abs().max() < 1e-12
    assert_second_order(lambda p, xi, ti: explain(p, xi, ti, noise=draws)[0], params, x[0], t[0],
                        param_names=["0.weight"], gradgrad=True)
