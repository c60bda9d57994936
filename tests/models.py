"""Small models the tests share: smooth ones (non-trivial second derivatives), ReLU ones, one with
batch norm, a residual one and one written with functional ops that calls a module twice."""

import torch
import torch.nn.functional as F
from torch import nn


def smooth_mlp(dtype=torch.float64, inputs=5, hidden=7, classes=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Softplus(), nn.Linear(hidden, hidden),
                         nn.Tanh(), nn.Linear(hidden, classes)).to(dtype).eval()


def relu_mlp(dtype=torch.float32, inputs=6, hidden=8, classes=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.ReLU(), nn.Linear(hidden, classes)).to(dtype).eval()


def small_cnn(dtype=torch.float32, batch_norm=True, activation=nn.ReLU):
    """3x8x8 -> 5 classes, with (randomised) eval batch norm."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3, padding=1)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(4))
    layers += [activation(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1), activation(),
               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)]
    model = nn.Sequential(*layers).to(dtype)
    if batch_norm:
        with torch.no_grad():  # test-side set-up of a random eval state; fxattr never does this
            model[1].running_mean.normal_()
            model[1].running_var.uniform_(0.5, 2.0)
            model[1].weight.normal_()
            model[1].bias.normal_()
    return model.eval()


class Residual(nn.Module):
    """Functional ops, a residual add, concatenation, a view, and one module called twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.shared = nn.Conv2d(3, 3, 1)
        self.head = nn.Linear(6 * 4 * 4, 4)

    def forward(self, x):
        h = F.softplus(self.conv(x))
        h = self.shared(h) + x
        h = torch.cat([self.shared(h), h], dim=1)
        h = F.avg_pool2d(h, 2)
        return self.head(h.view(h.shape[0], -1))


def residual(dtype=torch.float64):
    torch.manual_seed(0)
    return Residual().to(dtype).eval()


class TwoInputs(nn.Module):
    """A model of a tuple of inputs, for pytree inputs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x, y):
        return self.out(torch.tanh(self.a(x) + self.b(y)))


class DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 4)

    def forward(self, x):
        return {"logits": self.body(x), "features": x}


class _ElementwiseBatchNorm(nn.Module):
    """An eval batch norm computed as fxattr computes it (``addcmul`` of its per-channel affine map)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        from fxattr.functional import batch_norm_affine
        scale, shift = batch_norm_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return torch.addcmul(self.shift.reshape(shape), x, self.scale.reshape(shape))


def with_fxattr_batch_norm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval) whose batch norms round exactly like fxattr's element-wise ones.

    For cross-checks against hook-free peers (captum): native ``batch_norm`` differs from fxattr's
    in the last bit, and on a ReLU / max-pool network that is enough to flip a near-tie at some
    integration point and change a whole region of the attribution by ~1e-3. With this copy the
    peer sees the very same forward values, so a difference can only come from the method.
    """
    import copy
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(module, child_name, _ElementwiseBatchNorm(child))
    return model.eval()
