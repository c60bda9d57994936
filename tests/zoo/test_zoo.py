"""Every propagation method on every zoo model (tests/zoo/models.py), under torch.vmap, in float64.

The table of what works is explicit: a (model, method) pair that does not run yet is marked
``xfail(strict=True)`` with the reason seen, so the test fails loudly the day it starts to work
(remove the mark then) as much as the day a working pair breaks. Checks per pair:

- every method: the vmapped explanation has the input's shape, is finite and not all zero;
- gradient (the floor): equals ``torch.autograd.grad`` through the module itself;
- DeepLIFT / DeepLiftShap: summation-to-delta, ``sum(attribution) = f(x)[t] - f(baseline)[t]``
  (the mean over the baselines for DeepLiftShap), to 1e-6 relative;
- LRP-0 equals gradient x input on the piecewise-linear zoo models with every bias and norm shift
  set to zero (positively homogeneous: the identity holds layer by layer).

LRP conservation figures per model are reported by ``bench/zoo_bench.py --table`` (bench/RESULTS.md,
"Zoo"), not asserted: with biases a conservative rule is not expected to conserve.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import fxattr
from fxattr.errors import FxattrError
from tests.zoo.models import BUILDERS, PROPAGATION_METHODS, TRANSFORMERS, baselines, build, make_explainer

pytest.importorskip("torchvision")
pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

METHODS = ("gradient",) + PROPAGATION_METHODS

_NO_MUL = "no LRP/DeepLIFT rule for an element-wise product of two data tensors (squeeze-excitation gate)"
_NO_LAYER_NORM = "no LRP/DeepLIFT rule for LayerNorm"
_NO_INTERPOLATE = "no LRP/DeepLIFT rule for F.interpolate"
_NO_FX = "torch.fx symbolic tracing fails on transformers models"
_NO_PATTERN_LAYER_NORM = "PatternAttribution's walk has no rule for LayerNorm"
_NO_PATTERN_MUL = "PatternAttribution's walk has no rule for a product of two data tensors"
_PROPAGATION = ("lrp_epsilon", "lrp_epsilon_plus", "deep_taylor", "deeplift", "deeplift_shap")


def _expected_failures() -> dict:
    """(model, method) -> why it does not run yet."""
    table = {}
    for model in ("mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "deeplabv3_mobilenet_v3_large"):
        table.update({(model, m): _NO_MUL for m in _PROPAGATION})
        table[(model, "pattern_attribution")] = _NO_PATTERN_MUL
    for model in ("convnext_tiny", "swin_t", "vit_b_16"):
        table.update({(model, m): _NO_LAYER_NORM for m in _PROPAGATION})
        table[(model, "pattern_attribution")] = _NO_PATTERN_LAYER_NORM
    table.update({("maxvit_t", m): _NO_MUL for m in _PROPAGATION})
    table[("maxvit_t", "pattern_attribution")] = _NO_PATTERN_MUL
    for m in ("guided_backprop", "deconvnet"):
        table[("vit_b_16", m)] = ("nn.MultiheadAttention returns (out, None): the gradient-mode walk "
                                  "passes None to a vjp")
        table[("maxvit_t", m)] = "the torch.fx graph bakes the traced batch size into a reshape"
    table.update({("fcn_resnet50", m): _NO_INTERPOLATE for m in _PROPAGATION + ("pattern_attribution",)})
    for model in TRANSFORMERS:
        table.update({(model, m): _NO_FX for m in METHODS if m != "gradient"})
    return table


EXPECTED_FAILURES = _expected_failures()


def _cases():
    for model in BUILDERS:  # model-major order: each model is built once (cache of one)
        for method in METHODS:
            marks = []
            if (model, method) in EXPECTED_FAILURES:
                reason = EXPECTED_FAILURES[(model, method)]
                # fxattr's own refusal; a different exception is a failure, not an expected one
                raises = ValueError if reason.startswith("nn.MultiheadAttention") else FxattrError
                marks.append(pytest.mark.xfail(strict=True, raises=raises, reason=reason))
            yield pytest.param(model, method, id=f"{model}-{method}", marks=marks)


@functools.lru_cache(maxsize=1)
def _zoo(name: str):
    model, xs = build(name)
    f, params = fxattr.functionalize(model)
    with torch.no_grad():
        out = model(xs)
    return model, f, params, xs, out.argmax(-1)


def _value(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)[torch.arange(x.shape[0]), t]


@pytest.mark.parametrize("name,method", list(_cases()))
def test_zoo(name, method):
    model, f, params, xs, targets = _zoo(name)
    explain = make_explainer(method, f, params, xs)
    got = torch.vmap(explain, in_dims=(None, 0, 0))(params, xs, targets)
    assert got.shape == xs.shape and got.dtype == torch.float64
    assert torch.isfinite(got).all() and got.abs().amax() > 0
    if method == "gradient":
        x = xs.clone().requires_grad_(True)
        (want,) = torch.autograd.grad(model(x)[torch.arange(2), targets].sum(), x)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * float(want.abs().amax()))
    elif method in ("deeplift", "deeplift_shap"):
        value = _value(model, xs, targets)
        if method == "deeplift":
            reference = _value(model, torch.zeros_like(xs), targets)
        else:
            refs = baselines(xs)
            reference = torch.stack([_value(model, refs, t.expand(2)).mean() for t in targets])
        total = got.flatten(1).sum(1)
        scale = got.flatten(1).abs().sum(1) + (value - reference).abs()
        assert ((total - (value - reference)).abs() <= 1e-6 * scale).all(), (total, value - reference)


# LRP-0 == gradient x input on the piecewise-linear models with zero biases and norm shifts

HOMOGENEOUS = ("resnet50", "densenet121", "shufflenet_v2_x0_5", "googlenet", "squeezenet1_0", "fcn_resnet50")


@torch.no_grad()
def _zero_shifts(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.zero_()
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):
            bias.zero_()
    return model


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=[pytest.mark.xfail(strict=True, raises=FxattrError, reason=_NO_INTERPOLATE)]
                 if n == "fcn_resnet50" else [])
    for n in HOMOGENEOUS])
def test_lrp_zero_is_gradient_times_input_without_shifts(name):
    model, xs = build(name)
    model = _zero_shifts(model)
    f, params = fxattr.functionalize(model)
    targets = torch.tensor([1, 2])
    got = torch.vmap(fxattr.lrp(f, rule="z"), in_dims=(None, 0, 0))(params, xs, targets)
    want = torch.vmap(fxattr.input_x_gradient(f), in_dims=(None, 0, 0))(params, xs, targets)
    scale = float(want.abs().amax())
    assert scale > 0
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9 * scale)
