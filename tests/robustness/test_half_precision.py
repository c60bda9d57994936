"""Every explainer in float16 and bfloat16: finite, and within 1e-2 (float16) / 5e-2 (bfloat16)
relative (norm of the difference / norm of the reference) of float32 on the same rounded weights
and inputs, on the test CNN (batch norm with random statistics, ReLUs, max pooling).

Before: DeepLIFT / DeepLiftShap all NaN in float16 (eps 1e-10 rounds to 0), LRP flat / w_square
NaN (the 1e-7 SafeDivide stabiliser overflowed), Score-CAM NaN (its 1e-8), occlusion and feature
ablation 6e-2 / 1.2 off (differences of half-precision outputs)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxattr
from tests.models import small_cnn

BUILD = {
    "gradient": lambda f: fxattr.gradient(f),
    "input_x_gradient": lambda f: fxattr.input_x_gradient(f),
    "integrated_gradients": lambda f: fxattr.integrated_gradients(f, steps=8),
    "smoothgrad": lambda f: fxattr.smoothgrad(f, samples=4),
    "expected_gradients": lambda f: fxattr.expected_gradients(f, baselines=torch.zeros(2, 3, 8, 8), samples=4),
    "lrp.epsilon": lambda f: fxattr.lrp(f, rule="epsilon"),
    "lrp.z": lambda f: fxattr.lrp(f, rule="z"),
    "lrp.alpha_2_beta_1": lambda f: fxattr.lrp(f, rule="alpha_2_beta_1"),
    "lrp.z_plus": lambda f: fxattr.lrp(f, rule="z_plus"),
    "lrp.flat": lambda f: fxattr.lrp(f, rule="flat"),
    "lrp.w_square": lambda f: fxattr.lrp(f, rule="w_square"),
    "lrp.gamma": lambda f: fxattr.lrp(f, rule="gamma"),
    "lrp.epsilon_plus": lambda f: fxattr.lrp(f, composite="epsilon_plus"),
    "deep_taylor": lambda f: fxattr.deep_taylor(f),
    "deep_taylor_bounded": lambda f: fxattr.deep_taylor_bounded(f, low=-3.0, high=3.0),
    "guided_backprop": lambda f: fxattr.guided_backprop(f),
    "deconvnet": lambda f: fxattr.deconvnet(f),
    "deeplift": lambda f: fxattr.deeplift(f),
    "deeplift_shap": lambda f: fxattr.deeplift_shap(f, baselines=torch.randn(2, 3, 8, 8) * 0.1),
    "gradcam": lambda f: fxattr.gradcam(f, layer="4"),
    "gradcam_plus_plus": lambda f: fxattr.gradcam_plus_plus(f, layer="4"),
    "xgradcam": lambda f: fxattr.xgradcam(f, layer="4"),
    "layercam": lambda f: fxattr.layercam(f, layer="4"),
    "cam": lambda f: fxattr.cam(f, layer="5"),
    "scorecam": lambda f: fxattr.scorecam(f, layer="5"),
    "guided_gradcam": lambda f: fxattr.guided_gradcam(f, layer="4"),
    "occlusion": lambda f: fxattr.occlusion(f, window=(3, 2, 2), stride=(3, 2, 2)),
    "feature_ablation": lambda f: fxattr.feature_ablation(f),
    "rise": lambda f: fxattr.rise(f, num_masks=16, cell_size=2),
}
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
# measured misses (see the closing note of issue 10): propagation internals that need float32
# accumulation (the engine's), guided Grad-CAM's products in float16's subnormal range, and the
# integrand / noise of IG / SmoothGrad at bfloat16-rounded points crossing ReLU boundaries
KNOWN = {
    (torch.float16, "lrp.alpha_2_beta_1"), (torch.float16, "deeplift"), (torch.float16, "deeplift_shap"),
    (torch.float16, "guided_gradcam"),
    (torch.bfloat16, "lrp.alpha_2_beta_1"), (torch.bfloat16, "deeplift"),
    (torch.bfloat16, "integrated_gradients"), (torch.bfloat16, "smoothgrad"),
}


def _pair(dtype):
    low = copy.deepcopy(small_cnn()).to(dtype)
    return fxattr.functionalize(low), fxattr.functionalize(copy.deepcopy(low).float())


def _run(name, dtype):
    (fl, pl), (fr, pr) = _pair(dtype)
    xs = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    ts = torch.tensor([0, 1, 2, 3])
    torch.manual_seed(0)
    low = torch.vmap(BUILD[name](fl), in_dims=(None, 0, 0), randomness="same")(pl, xs, ts)
    torch.manual_seed(0)
    ref = torch.vmap(BUILD[name](fr), in_dims=(None, 0, 0), randomness="same")(pr, xs.float(), ts)
    return low, ref


CASES = [pytest.param(dtype, name, marks=[pytest.mark.xfail(strict=True, reason="measured miss")]
                      if (dtype, name) in KNOWN else [], id=f"{str(dtype)[6:]}-{name}")
         for dtype in TOLERANCE for name in BUILD]


@pytest.mark.slow
@pytest.mark.parametrize("dtype, name", CASES)
def test_half_precision_is_finite_and_close_to_float32(dtype, name):
    low, ref = _run(name, dtype)
    assert low.dtype == dtype
    assert torch.isfinite(low).all()
    error = ((low.float() - ref).norm() / ref.norm()).item()
    assert error <= TOLERANCE[dtype], f"{name} in {dtype}: {error:.2e} relative"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted({n for _, n in KNOWN}))
def test_known_misses_are_still_finite(name):
    for dtype in TOLERANCE:
        low, _ = _run(name, dtype)
        assert torch.isfinite(low).all()


def test_dead_relu_network_in_float16_stays_finite():
    """A float16 network whose second layer's ReLUs are all dead: ten LRP rules were all NaN
    (R / 1e-7 overflowed); DeepLIFT too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with torch.no_grad():  # test-side: kill the second layer
        model[2].bias.fill_(-100.0)
    f, params = fxattr.functionalize(model.eval().half())
    xs = torch.randn(2, 3, 6, 6).half()
    explainers = [fxattr.lrp(f, rule=rule) for rule in (
        "z", "z_IB", "epsilon", "epsilon_IB", "w_square", "flat", "alpha_beta", "alpha_2_beta_1", "alpha_1_beta_0",
        "z_plus", "z_plus_fast", "gamma")]
    explainers += [fxattr.lrp(f, composite="epsilon_plus_flat"), fxattr.deeplift(f), fxattr.deep_taylor(f)]
    for explain in explainers:
        out = torch.vmap(explain, in_dims=(None, 0, None))(params, xs, 0)
        assert torch.isfinite(out).all(), explain.__name__
