import itertools
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from torch import nn

import fxattr
from tests.contract import (assert_compile_equals_eager, assert_second_order, assert_vmap_equals_loop,
                            model_unchanged)
from tests.models import residual, small_cnn, smooth_mlp


def _linear(shape, classes=3, bias=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), classes, bias=bias)).double().eval()
    return model, model[1].weight.detach()


def _cnn(dtype=torch.float64, activation=nn.Softplus):
    return small_cnn(dtype, activation=activation)


# ---------------------------------------------------------------------------------- known values

def test_occlusion_with_window_one_on_a_linear_model_is_w_times_x():
    model, weight = _linear((2, 3, 4))
    f, params = fxattr.functionalize(model)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    got = fxattr.occlusion(f, window=1)(params, x, 2)
    torch.testing.assert_close(got, weight[2].reshape(2, 3, 4) * x)


def test_occlusion_averages_the_windows_covering_a_feature():
    """w = [1, 2, 3], x = 1, windows {0, 1} (drop 3) and {1, 2} (drop 5): [3, (3 + 5) / 2, 5]."""
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():  # test-side set-up of known weights
        model.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
    f, params = fxattr.functionalize(model)
    got = fxattr.occlusion(f, window=2)(params, torch.ones(3, dtype=torch.float64), 0)
    torch.testing.assert_close(got, torch.tensor([3.0, 4.0, 5.0], dtype=torch.float64))
    # stride 2: windows {0, 1} and {2} (the last one clipped at the border, as captum): [3, 3, 3].
    got = fxattr.occlusion(f, window=2, stride=2)(params, torch.ones(3, dtype=torch.float64), 0)
    torch.testing.assert_close(got, torch.tensor([3.0, 3.0, 3.0], dtype=torch.float64))


def test_feature_ablation_on_a_linear_model_sums_w_times_x_over_each_group():
    model, weight = _linear((6,))
    f, params = fxattr.functionalize(model)
    x = torch.randn(6, dtype=torch.float64)
    mask = torch.tensor([5, 5, -1, 7, 7, 7])
    got = fxattr.feature_ablation(f, feature_mask=mask, baseline=0.5)(params, x, 1)
    contribution = weight[1] * (x - 0.5)
    sums = {i: contribution[mask == i].sum() for i in (5, -1, 7)}
    torch.testing.assert_close(got, torch.stack([sums[int(i)] for i in mask]))


def test_rise_on_all_subsets_is_its_expectation_exactly():
    """Every binary mask of 4 features once = the expectation under Bernoulli(1/2)."""
    model, weight = _linear((4,), bias=False)
    f, params = fxattr.functionalize(model)
    x = torch.randn(4, dtype=torch.float64)
    masks = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4)), dtype=torch.float64)
    got = fxattr.rise(f, masks=masks, p=0.5)(params, x, 0)
    fx = model(x[None])[0, 0].detach()
    torch.testing.assert_close(got, 0.5 * weight[0] * x + 0.5 * fx)


def test_rise_on_a_linear_model_converges_to_its_expectation():
    """p is the keep probability: p = 0.3 tells the convention apart from the drop probability."""
    model, weight = _linear((6,), bias=False)
    f, params = fxattr.functionalize(model)
    x = torch.randn(6, dtype=torch.float64)
    p = 0.3
    expected = (1 - p) * weight[1] * x + p * model(x[None])[0, 1].detach()
    generator = torch.Generator().manual_seed(0)
    errors = []
    for n in (100, 40000):
        masks = (torch.rand(n, 6, generator=generator) < p).double()
        got = fxattr.rise(f, masks=masks, p=p, chunk_size=None)(params, x, 1)
        errors.append((got - expected).abs().max())
    assert errors[1] < 0.05 * expected.abs().max(), errors
    assert errors[1] < errors[0] / 3, errors


def _torchray_masks(num_masks, cells, p, height, width):
    """TorchRay's construction, written out: reflect-pad, bilinear upsampling, crop, random shift."""
    grid = (torch.rand(num_masks, 1, cells, cells) < p).double()
    cell = (math.ceil(height / cells), math.ceil(width / cells))
    padded = F.pad(grid, (1, 1, 1, 1), mode="reflect")
    up = F.interpolate(padded, (cell[0] * (cells + 2), cell[1] * (cells + 2)), mode="bilinear",
                       align_corners=False)
    up = up[:, 0, cell[0]:cell[0] + height + cell[0], cell[1]:cell[1] + width + cell[1]]
    shift_h = torch.randint(0, cell[0], (num_masks,))
    shift_w = torch.randint(0, cell[1], (num_masks,))
    return torch.stack([up[i, a:a + height, b:b + width] for i, (a, b) in enumerate(zip(shift_h, shift_w))])


@pytest.mark.parametrize("height,width,cells", [(8, 8, 3), (10, 13, 4), (32, 32, 7)])
def test_drawn_rise_masks_are_torchrays(height, width, cells):
    torch.manual_seed(3)
    reference = _torchray_masks(40, cells, 0.4, height, width)
    torch.manual_seed(3)
    ours = fxattr.rise_masks((height, width), num_masks=40, cell_size=cells, p=0.4, dtype=torch.float64)
    torch.testing.assert_close(ours, reference)
    assert 0 <= ours.min() and ours.max() <= 1 and 0 < ours.mean() < 1


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(height=st.integers(2, 20), width=st.integers(2, 20), cells=st.integers(2, 6),
       p=st.floats(0.1, 1.0))
def test_drawn_rise_masks_are_torchrays_for_any_geometry(height, width, cells, p):
    torch.manual_seed(11)
    reference = _torchray_masks(6, cells, p, height, width)
    torch.manual_seed(11)
    ours = fxattr.rise_masks((height, width), num_masks=6, cell_size=cells, p=p, dtype=torch.float64)
    torch.testing.assert_close(ours, reference)


def test_drawn_masks_explain_like_the_materialised_ones():
    model = _cnn()
    f, params = fxattr.functionalize(model)
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    torch.manual_seed(5)
    drawn = fxattr.rise(f, num_masks=50, cell_size=3, p=0.6, chunk_size=16)(params, x, 2)
    torch.manual_seed(5)
    masks = fxattr.rise_masks((8, 8), num_masks=50, cell_size=3, p=0.6, dtype=torch.float64)
    fixed = fxattr.rise(f, masks=masks, p=0.6)(params, x, 2)
    torch.testing.assert_close(drawn, fixed)
    # ... and like the definition, written as a loop.
    scores = torch.stack([model((x * m)[None])[0, 2] for m in masks]).detach()
    torch.testing.assert_close(fixed, (torch.tensordot(scores, masks, dims=1) / (50 * 0.6)).expand(3, 8, 8))


# ---------------------------------------------------------------------------------------- captum

@pytest.mark.parametrize("window,stride,baseline", [
    ((3, 2, 2), None, 0.0), ((1, 3, 3), (1, 2, 2), 0.5), ((2, 3, 3), (1, 2, 3), -1.0),
    ((3, 8, 8), 1, 0.0), ((1, 5, 4), (1, 3, 3), "tensor")])
def test_occlusion_agrees_with_captum(window, stride, baseline):
    captum = pytest.importorskip("captum.attr")
    model = _cnn(activation=nn.ReLU)
    f, params = fxattr.functionalize(model)
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    if baseline == "tensor":
        baseline = torch.randn(3, 1, 1, dtype=torch.float64)
    ours = fxattr.occlusion(f, window=window, stride=stride, baseline=baseline)(params, x, 2)
    captum_baseline = baseline[None] if isinstance(baseline, torch.Tensor) else baseline
    theirs = captum.Occlusion(model).attribute(x[None], sliding_window_shapes=window, strides=stride,
                                               baselines=captum_baseline, target=2)[0]
    # captum returns float32 for occlusion (it divides attributions.float() by the window counts).
    assert theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs.double(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("incremental", [True, False])
def test_occlusion_on_a_residual_model_agrees_with_captum_incremental_or_not(incremental):
    """Functional ops, a residual add, concatenation, a view and a module called twice (the
    incremental path boxes the convs and computes the rest on full maps)."""
    captum = pytest.importorskip("captum.attr")
    model = residual()
    f, params = fxattr.functionalize(model)
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    ours = fxattr.occlusion(f, window=(3, 3, 2), stride=(3, 2, 2), baseline=-0.5,
                            incremental=incremental)(params, x, 1)
    theirs = captum.Occlusion(model).attribute(x[None], sliding_window_shapes=(3, 3, 2),
                                               strides=(3, 2, 2), baselines=-0.5, target=1)[0]
    torch.testing.assert_close(ours, theirs.double(), rtol=1e-6, atol=1e-7)


@st.composite
def _occlusion_geometry(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 6)) for _ in range(ndim))
    window = tuple(draw(st.integers(1, s)) for s in shape)
    stride = tuple(draw(st.integers(1, w)) for w in window)
    return shape, window, stride


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geometry=_occlusion_geometry())
def test_occlusion_geometry_agrees_with_captum(geometry):
    """Any shape, window and stride (clipped last windows included), on a model where every
    feature matters differently: a linear map followed by a square."""
    captum = pytest.importorskip("captum.attr")
    shape, window, stride = geometry
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), 2)).double().eval()
    square = lambda x: model(x) ** 2  # noqa: E731
    f, params = fxattr.functionalize(model)
    x = torch.randn(shape, dtype=torch.float64)
    ours = fxattr.occlusion(lambda p, x_: f(p, x_) ** 2, window=window, stride=stride, baseline=0.3,
                            chunk_size=4)(params, x, 1)
    theirs = captum.Occlusion(square).attribute(x[None], sliding_window_shapes=window, strides=stride,
                                                baselines=0.3, target=1)[0]
    torch.testing.assert_close(ours, theirs.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask", ["none", "channels", "superpixels"])
def test_feature_ablation_agrees_with_captum(mask):
    captum = pytest.importorskip("captum.attr")
    model = _cnn(activation=nn.ReLU)
    f, params = fxattr.functionalize(model)
    size = 4 if mask == "none" else 8  # captum runs one forward per feature: keep "none" small
    x = torch.randn(3, size, size, dtype=torch.float64)
    feature_mask = {"none": None, "channels": torch.tensor([2, 0, 1])[:, None, None].expand(3, 8, 8),
                    "superpixels": torch.arange(16).reshape(1, 4, 4).repeat_interleave(2, 1)
                    .repeat_interleave(2, 2)}[mask]
    baseline = torch.randn(3, size, size, dtype=torch.float64)
    ours = fxattr.feature_ablation(f, feature_mask=feature_mask, baseline=baseline)(params, x, 4)
    theirs = captum.FeatureAblation(model).attribute(
        x[None], baselines=baseline[None], target=4,
        feature_mask=None if feature_mask is None else feature_mask[None])[0]
    torch.testing.assert_close(ours, theirs)


# ------------------------------------------------------------------------------------ guarantees

def _explainers(dtype, masks=None):
    masks = torch.rand(12, 8, 8, dtype=dtype) if masks is None else masks
    return {
        "occlusion": lambda f: fxattr.occlusion(f, window=(3, 3, 3), stride=(3, 2, 2), baseline=0.1,
                                                chunk_size=5),
        "feature_ablation": lambda f: fxattr.feature_ablation(
            f, feature_mask=torch.arange(4).repeat_interleave(2)[None, :, None], chunk_size=3),
        "rise": lambda f: fxattr.rise(f, masks=masks, p=0.5, chunk_size=5),
    }


@pytest.mark.parametrize("name", ["occlusion", "feature_ablation", "rise"])
def test_vmap_equals_loop(name, dtype):
    model = _cnn(dtype, nn.ReLU)
    f, params = fxattr.functionalize(model)
    explain = _explainers(dtype)[name](f)
    xs, targets = torch.randn(3, 3, 8, 8, dtype=dtype), torch.tensor([0, 4, 2])
    with model_unchanged(model):
        out = assert_vmap_equals_loop(explain, params, xs, targets)
        top = int(model(xs[:1]).argmax())
        torch.testing.assert_close(explain(params, xs[0], None), explain(params, xs[0], top))
    assert out.dtype == dtype


def test_drawn_rise_vmap_equals_loop_and_randomness(dtype):
    f, params = fxattr.functionalize(_cnn(dtype, nn.ReLU))
    explain = fxattr.rise(f, num_masks=10, cell_size=3, chunk_size=4)
    xs, targets = torch.randn(3, 3, 8, 8, dtype=dtype), torch.tensor([0, 4, 2])
    generator = torch.Generator().manual_seed(0)
    noise = {"grid": torch.rand(3, 10, 3, 3, generator=generator) < 0.5,
             "shift": torch.randint(3, (3, 10, 2), generator=generator)}
    vmapped = torch.vmap(lambda p, x, t, n: explain(p, x, t, noise=n),
                         in_dims=(None, 0, 0, 0))(params, xs, targets, noise)
    looped = torch.stack([explain(params, xs[i], targets[i], noise={k: v[i] for k, v in noise.items()})
                          for i in range(3)])
    torch.testing.assert_close(vmapped, looped)
    same_x = xs[:1].expand(3, 3, 8, 8)

    def run(randomness):
        torch.manual_seed(1)
        return torch.vmap(explain, in_dims=(None, 0, 0), randomness=randomness)(params, same_x, targets[:1].expand(3))

    same, different = run("same"), run("different")
    torch.testing.assert_close(same[0], same[2])
    assert not torch.allclose(different[0], different[2])
    torch.testing.assert_close(run("different"), different)


@pytest.mark.parametrize("name", ["occlusion", "feature_ablation", "rise"])
def test_derivatives_match_finite_differences(name):
    model = _cnn(torch.float64, nn.Softplus)
    f, params = fxattr.functionalize(model)
    explain = _explainers(torch.float64, torch.rand(4, 8, 8, dtype=torch.float64))[name](f)
    assert_second_order(explain, params, torch.randn(3, 8, 8, dtype=torch.float64), 1,
                        param_names=["0.weight", "8.bias", "4.weight"])


def test_drawn_rise_derivatives_match_finite_differences():
    f, params = fxattr.functionalize(_cnn(torch.float64, nn.Softplus))
    explain = fxattr.rise(f, num_masks=4, cell_size=3, chunk_size=3)
    generator = torch.Generator().manual_seed(0)
    noise = {"grid": torch.rand(4, 3, 3, generator=generator) < 0.5,
             "shift": torch.randint(3, (4, 2), generator=generator)}
    assert_second_order(lambda p, x, t: explain(p, x, t, noise=noise), params,
                        torch.randn(3, 8, 8, dtype=torch.float64), 2,
                        param_names=["0.weight", "8.bias"], gradgrad=True)


def _tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(2, 5)).eval()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["occlusion", "feature_ablation", "rise", "rise_drawn"])
def test_compile_equals_eager(name):
    f, params = fxattr.functionalize(_tiny_cnn())
    if name == "rise_drawn":
        explain = fxattr.rise(f, num_masks=6, cell_size=3, chunk_size=None)
        noise = {"grid": torch.rand(6, 3, 3) < 0.5, "shift": torch.randint(3, (6, 2))}
        explain_fixed = lambda p, x, t: explain(p, x, t, noise=noise)  # noqa: E731
    else:
        explain_fixed = _explainers(torch.float32)[name](f)
    assert_compile_equals_eager(explain_fixed, params, torch.randn(2, 3, 8, 8), torch.tensor([1, 3]))


# ---------------------------------------------------------------------------------------- errors

def test_clear_errors():
    f, params = fxattr.functionalize(_cnn(torch.float32, nn.ReLU))
    x = torch.randn(3, 8, 8)
    E = fxattr.FxattrError
    with pytest.raises(E, match="occlusion: window must be an int >= 1"):
        fxattr.occlusion(f, window=(3, 0, 2))
    with pytest.raises(E, match="occlusion: stride must be"):
        fxattr.occlusion(f, window=2, stride=1.5)
    with pytest.raises(E, match=r"occlusion: window \(3, 9, 2\) is larger than x's shape \(3, 8, 8\) in dimension 1"):
        fxattr.occlusion(f, window=(3, 9, 2))(params, x, 0)
    with pytest.raises(E, match=r"occlusion: window \(2, 2\) has 2 entries but x has 3 dimensions"):
        fxattr.occlusion(f, window=(2, 2))(params, x, 0)
    with pytest.raises(E, match=r"occlusion: stride \(1, 3, 3\) is larger than window"):
        fxattr.occlusion(f, window=(1, 2, 2), stride=(1, 3, 3))(params, x, 0)
    with pytest.raises(E, match=r"occlusion: baseline of shape \(2, 8, 8\) does not broadcast"):
        fxattr.occlusion(f, window=2, baseline=torch.zeros(2, 8, 8))(params, x, 0)
    with pytest.raises(E, match="occlusion: baseline must be a number"):
        fxattr.occlusion(f, window=2, baseline="zero")
    with pytest.raises(E, match="occlusion: target 9 is out of range"):
        fxattr.occlusion(f, window=(1, 4, 4))(params, x, 9)
    with pytest.raises(E, match=r"^fxattr\.occlusion: x is a dict with keys \['x'\], but the model's forward "
                                r"takes 1 input"):
        fxattr.occlusion(f, window=(1, 4, 4))(params, {"x": x}, 0)
    with pytest.raises(E, match="feature_ablation: feature_mask must be an integer tensor"):
        fxattr.feature_ablation(f, feature_mask=torch.zeros(8, 8))
    with pytest.raises(E, match=r"feature_ablation: feature_mask of shape \(4, 8\) does not broadcast"):
        fxattr.feature_ablation(f, feature_mask=torch.zeros(4, 8, dtype=torch.long))(params, x, 0)
    with pytest.raises(E, match=r"rise: p \(the keep probability of a cell\) must be a number in \(0, 1\]"):
        fxattr.rise(f, p=0.0)
    with pytest.raises(E, match="rise: masks must be a floating-point tensor"):
        fxattr.rise(f, masks=torch.ones(4, 8, 8, dtype=torch.long))
    with pytest.raises(E, match="rise: num_masks=5 but masks holds 4 masks"):
        fxattr.rise(f, masks=torch.ones(4, 8, 8), num_masks=5)
    with pytest.raises(E, match=r"rise: masks of shape \(4, 7, 8\) do not broadcast to x's shape"):
        fxattr.rise(f, masks=torch.ones(4, 7, 8))(params, x, 0)
    with pytest.raises(E, match="rise: cell_size must be an int >= 1"):
        fxattr.rise(f, cell_size=0)
    explain = fxattr.rise(f, num_masks=3, cell_size=3)
    with pytest.raises(E, match=r"rise: noise\['grid'\] must have shape \(3, 3, 3\)"):
        explain(params, x, 0, noise={"grid": torch.ones(3, 2, 2), "shift": torch.zeros(3, 2, dtype=torch.long)})
    with pytest.raises(E, match=r"rise: noise\['shift'\] must lie in \[0, 3\) x \[0, 3\)"):
        explain(params, x, 0, noise={"grid": torch.ones(3, 3, 3), "shift": torch.full((3, 2), 3)})
    with pytest.raises(E, match="rise: drawn masks cover x's last two dimensions"):
        fxattr.rise(fxattr.functionalize(smooth_mlp())[0], num_masks=3)(params, torch.randn(5), 0)
    with pytest.raises(E, match=r"rise_masks: shape must be \(H, W\)"):
        fxattr.rise_masks((8,), num_masks=2)
