"""Tiny models shared by the metric tests: small enough that a Quantus comparison takes milliseconds.

``cnn1`` / ``cnn3``: a conv -> ReLU -> maxpool -> conv -> ReLU -> flatten -> linear network on
1x8x8 / 3x8x8 inputs with 4 classes; ``mlp``: a 2-layer MLP on 6 features with 3 classes. Every
bias is random (not zero) so that no output is exactly homogeneous in the input. Each fixture
gives ``(model, f, params)`` in float64 and its inputs are drawn by ``inputs(model_fixture, n)``.
"""

import pytest
import torch
from torch import nn

import fxattr


def _randomise_biases(model: nn.Module, generator: torch.Generator) -> nn.Module:
    for module in model.modules():
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            with torch.no_grad():
                bias.copy_(torch.randn(bias.shape, generator=generator) * 0.2)
    return model


def tiny_cnn(channels: int, classes: int = 4, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, classes))
    return _randomise_biases(model, generator).double().eval()


def tiny_mlp(features: int = 6, classes: int = 3, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(features, 8), nn.Tanh(), nn.Linear(8, classes))
    return _randomise_biases(model, generator).double().eval()


def _bundle(model):
    f, params = fxattr.functionalize(model)
    return model, f, params


@pytest.fixture
def cnn1():
    return _bundle(tiny_cnn(1))


@pytest.fixture
def cnn3():
    return _bundle(tiny_cnn(3))


@pytest.fixture
def mlp():
    return _bundle(tiny_mlp())


def inputs(bundle, n: int, seed: int = 1, dtype=torch.float64):
    """``n`` inputs for the bundle's model, uniform in [0, 1), and targets in range."""
    model = bundle[0]
    generator = torch.Generator().manual_seed(seed)
    first = model[0]
    if isinstance(first, nn.Conv2d):
        shape = (n, first.in_channels, 8, 8)
    else:
        shape = (n, first.in_features)
    x = torch.rand(shape, generator=generator, dtype=torch.float64).to(dtype)
    classes = model[-1].out_features
    targets = torch.randint(0, classes, (n,), generator=generator)
    return x, targets
