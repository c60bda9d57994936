"""PatternNet / PatternAttribution: the paper's signal-vs-distractor toy, pattern properties,
streaming fits, save/load, composition guarantees and errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxattr
from tests import models
from tests.contract import (assert_compile_equals_eager, assert_second_order,
                            assert_vmap_equals_loop, model_unchanged)


def _toy(n=4000, dims=8, seed=0):
    """x = s a_s + d a_d with a linear filter w orthogonal to the distractor a_d, w^T a_s = 1
    (Kindermans et al. 2017, Fig. 2: a_s = (1, 0), a_d = (1, 1), w = (1, -1); or in more
    dimensions with a distractor close to the signal)."""
    g = torch.Generator().manual_seed(seed)
    if dims == 2:
        a_s, a_d = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)
    else:
        a_s = torch.randn(dims, generator=g, dtype=torch.float64)
        a_d = a_s + 0.5 * torch.randn(dims, generator=g, dtype=torch.float64)
    w = a_s - (a_s @ a_d) / (a_d @ a_d) * a_d  # removes the distractor ...
    w = w / (w @ a_s)                          # ... and passes the signal
    s, d = torch.randn(n, 1, generator=g, dtype=torch.float64), torch.randn(n, 1, generator=g, dtype=torch.float64)
    x = s * a_s + d * a_d
    model = nn.Sequential(nn.Linear(dims, 1, bias=False)).double().eval()
    with torch.no_grad():  # test-side set-up of the known filter
        model[0].weight.copy_(w[None])
    return model, x, a_s, w


def _batches(x, size):
    return [x[i:i + size] for i in range(0, len(x), size)]


def _cos(a, b):
    return F.cosine_similarity(a.reshape(-1), b.reshape(-1), dim=0).abs()


@pytest.mark.parametrize("dims", [2, 8])
@pytest.mark.parametrize("pattern_type", ["linear", "relu"])
def test_recovers_the_signal_direction_where_the_gradient_does_not(pattern_type, dims):
    model, x, a_s, w = _toy(dims=dims)
    f, params = fxattr.functionalize(model)
    explain = fxattr.patternnet(f, pattern_type=pattern_type).fit(params, _batches(x, 500))
    assert set(explain.patterns) == {"0"}
    torch.testing.assert_close(explain.patterns["0"][0], a_s, atol=0.05, rtol=0.05)
    signals = torch.vmap(explain, in_dims=(None, 0, None))(params, x[:50], 0)
    gradient = fxattr.gradient(f)(params, x[0], 0)
    assert _cos(gradient, a_s) < 0.9
    assert all(_cos(s, a_s) > 0.99 for s in signals if s.norm() > 1e-6)
    # PatternNet of a linear model: pattern * y; PatternAttribution: (pattern * w) * y
    y = f(params, x[3])[0]
    pattern = explain.patterns["0"][0]
    torch.testing.assert_close(explain(params, x[3], 0), pattern * y)
    attribution = fxattr.pattern_attribution(f, patterns=explain.patterns, pattern_type=pattern_type)
    torch.testing.assert_close(attribution(params, x[3], 0), pattern * w * y)


def _relu_data(n=300):
    return torch.randn(n, 6)


def test_patterns_of_a_relu_network():
    model = models.relu_mlp()
    f, params = fxattr.functionalize(model)
    with model_unchanged(model):
        explain = fxattr.patternnet(f).fit(params, _batches(_relu_data(), 64))
    assert set(explain.patterns) == {"0", "2", "4"}
    for name, pattern in explain.patterns.items():
        weight = params[f"{name}.weight"]
        assert pattern.shape == weight.shape and pattern.dtype == weight.dtype
        # w_j^T a_j = 1 for every neuron active on some sample (0 for never-active ones)
        norms = (weight * pattern).sum(1)
        assert torch.all(((norms - 1).abs() < 1e-4) | (norms == 0))
        assert (norms - 1).abs().lt(1e-4).any()
    # the linear estimator differs from the two-component one
    linear = fxattr.patternnet(f, pattern_type="linear").fit(params, _batches(_relu_data(), 64))
    assert not torch.allclose(linear.patterns["0"], explain.patterns["0"])


def test_fit_is_invariant_to_batching_and_matches_a_direct_computation():
    model = models.small_cnn(torch.float64)
    f, params = fxattr.functionalize(model)
    data = torch.randn(24, 3, 8, 8, dtype=torch.float64)
    one = fxattr.pattern_attribution(f).fit(params, [data]).patterns
    many = fxattr.pattern_attribution(f).fit(params, _batches(data, 7)).patterns
    pairs = [(b, torch.zeros(len(b))) for b in _batches(data, 13)]  # (inputs, labels) batches
    labelled = fxattr.pattern_attribution(f).fit(params, pairs).patterns
    assert set(one) == {"0", "4", "8"}
    for name in one:
        torch.testing.assert_close(one[name], many[name], atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(one[name], labelled[name], atol=1e-10, rtol=1e-9)
    # the last layer (linear, 6 -> 5) by hand: two-component statistics of its input and output
    h = torch.vmap(lambda x: model[:8](x[None])[0])(data)
    w, b = params["8.weight"], params["8.bias"]
    y = h @ w.T + b
    checked = 0
    for j in range(5):
        active = y[:, j] > 0
        if not active.any():  # a neuron never active has a zero pattern (safe division)
            assert torch.equal(one["8"][j], torch.zeros(6, dtype=torch.float64))
            continue
        checked += 1
        xa, ya = h[active], y[active, j]
        cov = (xa * ya[:, None]).mean(0) - xa.mean(0) * ya.mean()
        torch.testing.assert_close(one["8"][j], cov / (w[j] @ cov))
    assert checked >= 2
    # the convolution "4" (4 -> 6 channels, 3x3, padding 1) on explicit input patches
    h = torch.vmap(lambda x: model[:4](x[None])[0])(data)
    y = torch.vmap(lambda t: model[4](t[None])[0])(h).flatten(2)            # (N, 6, 16)
    patches = F.unfold(h, 3, padding=1)                                     # (N, 36, 16)
    w = params["4.weight"].flatten(1)
    for j in range(6):
        active = y[:, j] > 0
        xa = patches.permute(0, 2, 1)[active]                                # (samples, 36)
        ya = y[:, j][active]
        cov = (xa * ya[:, None]).mean(0) - xa.mean(0) * ya.mean()
        torch.testing.assert_close(one["4"][j].flatten(), cov / (w[j] @ cov))


def test_save_and_load_round_trip(tmp_path):
    model = models.relu_mlp()
    f, params = fxattr.functionalize(model)
    explain = fxattr.patternnet(f).fit(params, _batches(_relu_data(), 100))
    path = tmp_path / "patterns.safetensors"
    fxattr.save_patterns(explain.patterns, path)
    loaded = fxattr.load_patterns(path)
    assert loaded.keys() == explain.patterns.keys()
    for k in loaded:
        assert torch.equal(loaded[k], explain.patterns[k])
    x = torch.randn(6)
    torch.testing.assert_close(fxattr.patternnet(f, patterns=loaded)(params, x, 1), explain(params, x, 1))


@pytest.mark.parametrize("method", ["patternnet", "pattern_attribution"])
def test_vmap_equals_loop_and_dtypes(dtype, method):
    model = models.small_cnn(dtype)
    f, params = fxattr.functionalize(model)
    explain = getattr(fxattr, method)(f).fit(params, [torch.randn(16, 3, 8, 8, dtype=dtype)])
    xs = torch.randn(4, 3, 8, 8, dtype=dtype)
    with model_unchanged(model):
        out = assert_vmap_equals_loop(explain, params, xs, torch.tensor([0, 1, 2, 4]))
    assert out.dtype == dtype


@pytest.mark.parametrize("method", ["patternnet", "pattern_attribution"])
def test_second_order(method):
    model = models.smooth_mlp()
    f, params = fxattr.functionalize(model)
    explain = getattr(fxattr, method)(f, pattern_type="linear").fit(params, [torch.randn(50, 5, dtype=torch.float64)])
    assert_second_order(explain, params, torch.randn(5, dtype=torch.float64), 1)


def test_compile_equals_eager():
    torch.manual_seed(4)  # tiny: compile time dominates
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3)).eval()
    f, params = fxattr.functionalize(model)
    explain = fxattr.pattern_attribution(f).fit(params, [torch.randn(64, 4)])
    assert_compile_equals_eager(explain, params, torch.randn(3, 4), torch.tensor([0, 1, 2]))


def test_errors():
    model = models.relu_mlp()
    f, params = fxattr.functionalize(model)
    with pytest.raises(fxattr.FxattrError, match=r"fxattr.patternnet: pattern_type"):
        fxattr.patternnet(f, pattern_type="relu.positive.x")
    with pytest.raises(fxattr.FxattrError, match=r"fxattr.patternnet: no patterns"):
        fxattr.patternnet(f)(params, torch.randn(6), 0)
    with pytest.raises(fxattr.FxattrError, match=r"fxattr.pattern_attribution: patterns have no entry for layer '2'"):
        fxattr.pattern_attribution(f, patterns={"0": torch.zeros(8, 6)})
    with pytest.raises(fxattr.FxattrError, match=r"fxattr.patternnet: patterns must be a dict"):
        fxattr.patternnet(f, patterns=[torch.zeros(8, 6)])
    bad = {"0": torch.zeros(8, 6), "2": torch.zeros(8, 8), "4": torch.zeros(4, 7)}
    with pytest.raises(fxattr.FxattrError, match=r"fxattr.patternnet: the pattern of layer '4' has shape"):
        fxattr.patternnet(f, patterns=bad)(params, torch.randn(6), 0)
    with pytest.raises(fxattr.FxattrError, match=r"fxattr.patternnet: data gave no examples"):
        fxattr.patternnet(f).fit(params, [])
    with pytest.raises(fxattr.FxattrError, match=r"fxattr.patternnet: data must be an iterable of batches"):
        fxattr.patternnet(f).fit(params, ["x"])
    explain = fxattr.patternnet(f).fit(params, [_relu_data(20)])
    with pytest.raises(fxattr.FxattrError, match=r"fxattr.patternnet: target 7 is out of range"):
        explain(params, torch.randn(6), 7)
