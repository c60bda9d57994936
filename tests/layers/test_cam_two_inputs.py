"""Grad-CAM / guided Grad-CAM on a model given a second, optional input (issue 14 item 5 leftover):
captum's ``BasicModel_ConvNet_One_Conv.forward(x, x2=None)`` adds ``x2`` when given. The layer split
is traced for the inputs x passes (a tuple x: both), so the maps equal captum's ``LayerGradCam`` /
``GuidedGradCam`` given ``(x, x2)``; a tensor x still explains the one-input model.
"""

from __future__ import annotations

import pytest
import torch

import fxattr
from tests.contract import model_unchanged

captum = pytest.importorskip("captum.attr")
basic_models = pytest.importorskip("captum.testing.helpers.basic_models")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def setup():
    model = basic_models.BasicModel_ConvNet_One_Conv().double().eval()
    generator = torch.Generator().manual_seed(0)
    # inputs large enough to pass captum's conv biases (-50, -75): non-zero maps
    x = 8 * torch.rand(3, 1, 4, 4, generator=generator, dtype=torch.float64)
    x2 = 8 * torch.rand(3, 1, 4, 4, generator=generator, dtype=torch.float64)
    return model, x, x2, torch.tensor([0, 1, 3])


def test_gradcam_and_guided_gradcam_with_two_inputs_equal_captum():
    model, x, x2, t = setup()
    f, params = fxattr.functionalize(model)
    with model_unchanged(model):
        cam = fxattr.gradcam(f, layer="conv1", relu=False, upsample=False)
        ours = torch.vmap(cam, in_dims=(None, 0, 0))(params, (x, x2), t)
        guided = torch.vmap(fxattr.guided_gradcam(f, layer="conv1"), in_dims=(None, 0, 0))(params, (x, x2), t)
    theirs = captum.LayerGradCam(model, model.conv1).attribute((x, x2), target=t)[:, 0]
    assert float(theirs.abs().max()) > 1
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-8)
    theirs_guided = captum.GuidedGradCam(model, model.conv1).attribute((x, x2), target=t)
    for o, w in zip(guided, theirs_guided):
        assert float(w.abs().max()) > 1
        torch.testing.assert_close(o, w.detach(), rtol=1e-5, atol=1e-8)
    # vmap == loop; the one-input model (x alone) is another function, still explained
    for b in range(3):
        torch.testing.assert_close(cam(params, (x[b], x2[b]), t[b]), ours[b])
    alone = torch.vmap(cam, in_dims=(None, 0, 0))(params, x + x2, t)
    torch.testing.assert_close(alone, ours)  # forward adds x2 to x before the convolution
    one = torch.vmap(cam, in_dims=(None, 0, 0))(params, x, t)
    torch.testing.assert_close(one, captum.LayerGradCam(model, model.conv1).attribute(x, target=t)[:, 0].detach())


def test_gradcam_two_inputs_second_order():
    model, x, x2, _ = setup()
    f, params = fxattr.functionalize(model)
    cam = fxattr.gradcam(f, layer="conv1", relu=False, upsample=False)
    v = torch.randn(2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def loss(a, b, w):
        return (cam({**params, "fc1.weight": w}, (a, b), 1) * v).sum()

    inputs = (x[0].clone().requires_grad_(True), x2[0].clone().requires_grad_(True),
              params["fc1.weight"].detach().clone().requires_grad_(True))
    assert torch.autograd.gradcheck(loss, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(loss, inputs, fast_mode=True)
