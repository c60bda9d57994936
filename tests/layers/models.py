"""Small models for the layer / neuron tests: a CNN with ReLU modules (what captum's DeepLift and
LRP hooks need), and a torchvision resnet18 at a small input with calibrated batch-norm statistics
and random biases (so every unit is live and no bias is zero)."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv-ReLU-conv-ReLU-pool, a functional flatten (captum's LRP has no rule for nn.Flatten),
    linear-ReLU-linear. ``pool="avg"`` for DeepLIFT parity: captum's DeepLift breaks summation to
    delta on an activation feeding max pooling, and fxattr deliberately does not follow it
    (tests/propagation/test_deeplift.py)."""

    def __init__(self, pool="max"):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
            nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Linear(5 * 3 * 3, 6), nn.ReLU(), nn.Linear(6, 3))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def small_cnn(dtype=torch.float64, seed=0, pool="max"):
    torch.manual_seed(seed)
    return SmallCNN(pool).to(dtype).eval()


def smooth_cnn(dtype=torch.float64, seed=0):
    """Tanh / softplus: smooth, for finite-difference checks of second derivatives."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(),
        nn.Conv2d(3, 3, 3, padding=1), nn.Softplus(),
        nn.Flatten(),
        nn.Linear(3 * 6 * 6, 3),
    )
    return model.to(dtype).eval()


def resnet18(dtype=torch.float64, seed=0, size=32):
    import torchvision
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
            m.momentum = None  # cumulative average: the statistics of the calibration batch
    model = model.to(dtype)
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, size, size, dtype=dtype))
    return model.eval()


def inputs(n=3, dtype=torch.float64, seed=1, shape=(2, 6, 6)):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=generator, dtype=dtype)
