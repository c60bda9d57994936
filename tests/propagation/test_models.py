"""LRP on real architectures: torchvision VGG (with and without batch norm), ResNet18/50,
DenseNet121, MobileNetV2, an MLP.

The strong check: with every bias and every batch-norm shift set to zero, a ReLU network is
positively homogeneous and LRP-0 equals gradient x input exactly, layer by layer. That holds only
if residual additions split in proportion to their addends, DenseNet's concatenations route,
max pooling gives relevance to the winner, average pooling is a linear layer under the z rule,
batch norm is folded (or, unfoldable, treated as a linear layer), and in-place ReLUs/additions are
made pure. Small inputs (3x32x32), random weights.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxattr
from tests.contract import model_unchanged

torchvision = pytest.importorskip("torchvision")
pytestmark = pytest.mark.slow


def _zero_shifts(model: nn.Module) -> nn.Module:
    """Zero biases and batch-norm shifts, random positive batch-norm scales (test-side set-up)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.zero_()
                module.bias.zero_()
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=gen))
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
            elif isinstance(getattr(module, "bias", None), torch.Tensor):
                module.bias.zero_()
    return model.eval()


HOMOGENEOUS = {
    "vgg11": lambda: torchvision.models.vgg11(num_classes=10),
    "vgg11_bn": lambda: torchvision.models.vgg11_bn(num_classes=10),
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "densenet121": lambda: torchvision.models.densenet121(num_classes=10),
}


@pytest.mark.parametrize("name", list(HOMOGENEOUS))
def test_z_rule_is_gradient_times_input_on_homogeneous_models(name):
    torch.manual_seed(0)
    model = _zero_shifts(HOMOGENEOUS[name]()).double()
    f, params = fxattr.functionalize(model)
    xs = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    targets = torch.tensor([3, 7])
    with model_unchanged(model):
        got = torch.vmap(fxattr.lrp(f, rule="z"), in_dims=(None, 0, 0))(params, xs, targets)
    want = torch.vmap(fxattr.input_x_gradient(f), in_dims=(None, 0, 0))(params, xs, targets)
    scale = want.abs().max()
    assert scale > 0
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10 * float(scale))


OTHERS = {
    "resnet50": lambda: torchvision.models.resnet50(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "vgg11_bn": lambda: torchvision.models.vgg11_bn(num_classes=10),
}


@pytest.mark.parametrize("name", list(OTHERS))
def test_presets_run_on_models_and_conserve_where_they_should(name):
    """resnet50 (bottlenecks, downsampling), mobilenet_v2 (ReLU6, depthwise convolutions, residuals
    without a final ReLU) and vgg11_bn: every preset runs, batched, finite, model untouched; with
    zero shifts, z+ on the kernel layers conserves the explained output up to the relevance that
    max pooling/ReLU6 clipping cannot see (checked exactly on resnet50: ReLU only)."""
    torch.manual_seed(0)
    model = _zero_shifts(OTHERS[name]())
    f, params = fxattr.functionalize(model)
    xs = torch.rand(2, 3, 32, 32)
    targets = torch.tensor([1, 2])
    with model_unchanged(model):
        for composite in ("epsilon_plus_flat", "epsilon_alpha2_beta1", "sequential_preset_b"):
            out = torch.vmap(fxattr.lrp(f, composite=composite), in_dims=(None, 0, 0))(params, xs, targets)
            assert out.shape == xs.shape and torch.isfinite(out).all() and out.abs().sum() > 0, composite
        relevance = torch.vmap(fxattr.lrp(f, rule="z_plus"), in_dims=(None, 0, 0))(params, xs, targets)
    if name == "resnet50":
        value = torch.vmap(f, in_dims=(None, 0))(params, xs).gather(1, targets[:, None])[:, 0]
        torch.testing.assert_close(relevance.sum((1, 2, 3)), value, rtol=1e-4, atol=1e-6)


def test_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 16),
                          nn.LeakyReLU(0.1), nn.Linear(16, 3)).double().eval()
    f, params = fxattr.functionalize(model)
    xs = torch.randn(5, 3, 4, dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 0, 1])
    for rule in ("epsilon", "alpha_2_beta_1", "w_square"):
        out = torch.vmap(fxattr.lrp(f, rule=rule), in_dims=(None, 0, 0))(params, xs, targets)
        assert out.shape == xs.shape and torch.isfinite(out).all()


class _FunctionalConvNet(nn.Module):
    """Convolution and linear layers written as F.conv2d / F.linear with parameter weights."""

    def __init__(self):
        super().__init__()
        self.conv_weight = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.5)
        self.conv_bias = nn.Parameter(torch.randn(4) * 0.1)
        self.fc_weight = nn.Parameter(torch.randn(5, 4 * 3 * 3) * 0.3)

    def forward(self, x):
        h = torch.nn.functional.conv2d(x, self.conv_weight, self.conv_bias, stride=2, padding=1)
        h = torch.nn.functional.relu(h)
        return torch.nn.functional.linear(h.flatten(1), self.fc_weight)


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_alpha2_beta1", "epsilon_gamma_box"])
def test_functional_kernel_layers_equal_their_module_form(composite):
    """F.conv2d / F.linear with parameter weights are kernel layers: LRP gives exactly what the
    same network written with nn.Conv2d / nn.Linear gives."""
    torch.manual_seed(0)
    functional = _FunctionalConvNet().double().eval()
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).double()
    fc = nn.Linear(36, 5, bias=False).double()
    with torch.no_grad():  # test-side set-up: the same weights in module form
        conv.weight.copy_(functional.conv_weight)
        conv.bias.copy_(functional.conv_bias)
        fc.weight.copy_(functional.fc_weight)
    modules = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), fc).eval()
    kwargs = {"low": -3.0, "high": 3.0} if composite == "epsilon_gamma_box" else {}
    xs = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    targets = torch.tensor([0, 3, 4])
    results = []
    for model in (functional, modules):
        f, params = fxattr.functionalize(model)
        explain = fxattr.lrp(f, composite=composite, **kwargs)
        with model_unchanged(model):
            results.append(torch.vmap(explain, in_dims=(None, 0, 0))(params, xs, targets))
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-12)
    assert results[0].abs().sum() > 0
