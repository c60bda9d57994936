"""NaN / Inf in any float option is refused at construction, naming the option (was accepted for
sigma, epsilon, gamma, alpha, baseline, low / high, eps=inf; relative='no' too)."""

import pytest
import torch
from torch import nn

import fxattr

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def f():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()
    return fxattr.functionalize(model)[0]


CASES = [
    ("integrated_gradients", r"baseline must be finite", lambda f: fxattr.integrated_gradients(f, baseline=NAN)),
    ("integrated_gradients", r"baseline holds NaN", lambda f: fxattr.integrated_gradients(f, baseline=torch.full((3, 6, 6), INF))),
    ("smoothgrad", r"sigma must be a number >= 0 \(finite\), got inf", lambda f: fxattr.smoothgrad(f, sigma=INF)),
    ("noise_tunnel", r"sigma must be .*got nan", lambda f: fxattr.noise_tunnel(fxattr.gradient(f), sigma=NAN)),
    ("smoothgrad", r"relative must be True or False, got 'no'", lambda f: fxattr.smoothgrad(f, relative="no")),
    ("expected_gradients", r"sigma must be .*got nan", lambda f: fxattr.expected_gradients(f, baselines=torch.zeros(1, 3, 6, 6), sigma=NAN)),
    ("expected_gradients", r"baselines hold NaN", lambda f: fxattr.expected_gradients(f, baselines=torch.full((1, 3, 6, 6), NAN))),
    ("random", r"stddev must be .*got nan", lambda f: fxattr.random(f, stddev=NAN)),
    ("occlusion", r"baseline must be a number \(finite\), got inf", lambda f: fxattr.occlusion(f, window=2, baseline=INF)),
    ("feature_ablation", r"baseline holds NaN", lambda f: fxattr.feature_ablation(f, baseline=torch.full((3, 6, 6), NAN))),
    ("rise", r"p \(the keep probability", lambda f: fxattr.rise(f, p=NAN)),
    ("rise", r"masks hold NaN", lambda f: fxattr.rise(f, masks=torch.full((2, 6, 6), NAN))),
    ("lrp", r"epsilon must be finite, got nan", lambda f: fxattr.lrp(f, rule="epsilon", epsilon=NAN)),
    ("lrp", r"epsilon must be finite, got nan", lambda f: fxattr.lrp(f, composite="epsilon_plus", epsilon=NAN)),
    ("lrp", r"alpha must be finite, got nan", lambda f: fxattr.lrp(f, rule="alpha_beta", alpha=NAN, beta=1.0)),
    ("lrp", r"gamma must be finite, got inf", lambda f: fxattr.lrp(f, composite="epsilon_gamma_box", gamma=INF, low=-1.0, high=1.0)),
    ("lrp", r"low must be finite", lambda f: fxattr.lrp(f, composite="epsilon_gamma_box", low=NAN, high=1.0)),
    ("deep_taylor_bounded", r"high must be finite", lambda f: fxattr.deep_taylor_bounded(f, low=-1.0, high=INF)),
    ("deeplift", r"eps must be finite, got inf", lambda f: fxattr.deeplift(f, eps=INF)),
    ("deeplift", r"baseline must be finite", lambda f: fxattr.deeplift(f, baseline=NAN)),
    ("deeplift_shap", r"baselines must be finite", lambda f: fxattr.deeplift_shap(f, baselines=torch.full((2, 3, 6, 6), NAN))),
]


@pytest.mark.parametrize("name, message, build", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_non_finite_options_are_refused(f, name, message, build):
    with pytest.raises(fxattr.FxattrError, match=rf"^fxattr\.{name}: .*{message}"):
        build(f)


def test_viz_options_and_nan_maps():
    with pytest.raises(fxattr.FxattrError, match=r"fxattr\.viz\.gamma: gamma must be a number > 0 \(finite\)"):
        fxattr.viz.gamma(torch.randn(4), gamma=NAN)
    with pytest.raises(fxattr.FxattrError, match=r"fxattr\.viz\.overlay: alpha must be"):
        fxattr.viz.overlay(torch.rand(3, 4, 4), torch.randn(3, 4, 4), alpha=NAN)
    with pytest.raises(fxattr.FxattrError, match=r"fxattr\.viz\.project: output_range must be finite"):
        fxattr.viz.project(torch.randn(1, 4), output_range=(0, INF))
    maps = torch.randn(2, 3, 4, 4)
    maps[0, :, 0, 0] = NAN
    maps[1, 0, 1, 1] = INF
    rgb = fxattr.viz.heatmap(maps)
    assert rgb.shape == (2, 4, 4, 3) and torch.isfinite(rgb).all()
    assert rgb[0, 0, 0].tolist() == list(fxattr.viz.NAN_COLOR)  # NaN drawn in its colour
    torch.testing.assert_close(rgb[1, 1, 1], fxattr.viz.heatmap(torch.ones(3, 1, 1))[0, 0])  # +Inf: the top
