import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxattr
from tests.contract import (assert_compile_equals_eager, assert_second_order, assert_vmap_equals_loop,
                            model_unchanged)
from tests.models import small_cnn

GRADIENT_CAMS = ["gradcam", "gradcam_plus_plus", "xgradcam", "layercam"]
ALL_CAMS = GRADIENT_CAMS + ["scorecam"]


class OneConv(nn.Module):
    """captum's BasicModel_ConvNet_One_Conv (tests/helpers/basic_models.py), without its optional
    second input: conv 1 -> 2 channels 3x3 (weights 1, biases -50, -75), ReLU, view 8, linear with
    weights [1, 1, 1, 1, 1, -1, -1, -1] for every class, ReLU."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, 1)
        self.relu1 = nn.ReLU()
        self.fc1 = nn.Linear(8, 4)
        self.relu2 = nn.ReLU()
        with torch.no_grad():  # test-side set-up of captum's hand-chosen weights
            self.conv1.weight.fill_(1.0)
            self.conv1.bias.copy_(torch.tensor([-50.0, -75.0]))
            self.fc1.weight.copy_(torch.cat([torch.ones(4, 5), -torch.ones(4, 3)], dim=1))
            self.fc1.bias.zero_()

    def forward(self, x):
        return self.relu2(self.fc1(self.relu1(self.conv1(x)).view(-1, 8)))


class GapNet(nn.Module):
    """conv features -> global average pool -> linear: the architecture CAM is defined for."""

    def __init__(self, dtype=torch.float64, activation=nn.Softplus):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), activation(),
                                      nn.Conv2d(4, 6, 3, padding=1), activation())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)
        self.to(dtype)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def _cnn(dtype=torch.float32, activation=nn.ReLU):
    return small_cnn(dtype, activation=activation)


def _make(name, f, **options):
    if name == "scorecam":
        options.setdefault("chunk_size", 4)
    return getattr(fxattr, name)(f, **options)


# ---------------------------------------------------------------------------------- known values

def test_gradcam_of_captums_one_conv_network():
    f, params = fxattr.functionalize(OneConv().eval())
    x = torch.arange(16.0).view(1, 4, 4)
    got = fxattr.gradcam(f, layer="conv1", relu=False, upsample=False)(params, x, 0)
    torch.testing.assert_close(got, torch.tensor([[11.25, 13.5], [20.25, 22.5]]))


def test_gradcam_is_cam_over_the_number_of_positions():
    model = GapNet().eval()
    f, params = fxattr.functionalize(model)
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    options = dict(layer="features", relu=False, upsample=False)
    grad_cam = fxattr.gradcam(f, **options)(params, x, 3)
    class_map = fxattr.cam(f, fc="fc", **options)(params, x, 3)
    torch.testing.assert_close(grad_cam, class_map / (6 * 5))
    # CAM by hand: the weight row of the class times the activation.
    a = model.features(x[None])[0].detach()
    torch.testing.assert_close(class_map, torch.einsum("k,khw->hw", model.fc.weight[3].detach(), a))
    # fc defaults to the last nn.Linear; target None is the argmax class.
    top = int(model(x[None]).argmax())
    torch.testing.assert_close(fxattr.cam(f, **options)(params, x, None), fxattr.cam(f, **options)(params, x, top))


def test_cam_family_by_hand_on_a_gap_net():
    """The channel weights of each method, written out from A and dy/dA."""
    model = GapNet().eval()
    f, params = fxattr.functionalize(model)
    x = torch.randn(3, 6, 6, dtype=torch.float64)
    a = model.features(x[None])[0].detach().requires_grad_()
    y = model.fc(model.pool(a[None]).flatten(1))[0, 2]
    g, = torch.autograd.grad(y, a)
    a = a.detach()
    s = a.sum((1, 2), keepdim=True)
    alpha = torch.where(g != 0, g ** 2 / (2 * g ** 2 + s * g ** 3 + 1e-6), torch.zeros_like(g))
    expected = {
        "gradcam": (g.mean((1, 2), keepdim=True) * a).sum(0),
        "gradcam_plus_plus": ((alpha * g.clamp(min=0)).sum((1, 2), keepdim=True) * a).sum(0),
        "xgradcam": ((g * a / (s + 1e-7)).sum((1, 2), keepdim=True) * a).sum(0),
        "layercam": (g.clamp(min=0) * a).sum(0),
    }
    for name, value in expected.items():
        got = _make(name, f, layer="features", relu=False, upsample=False)(params, x, 2)
        torch.testing.assert_close(got, value, msg=name)
    # ReLU, upsampling (bilinear, align_corners=False) and min-max normalisation, in that order.
    got = fxattr.gradcam(f, layer="features", relu=True, upsample=True, normalize=True)(params, x, 2)
    up = F.interpolate(expected["gradcam"].clamp(min=0)[None, None], size=(6, 6), mode="bilinear",
                       align_corners=False)[0, 0]
    up = (up - up.min()) / (up.max() - up.min() + 1e-7)
    torch.testing.assert_close(got, up.expand(3, 6, 6))


def test_scorecam_by_hand():
    model = GapNet().eval()
    f, params = fxattr.functionalize(model)
    x = torch.randn(3, 6, 6, dtype=torch.float64)
    a = model.features[:2](x[None])[0].detach()  # layer "features.1": 4 channels
    scores = []
    for k in range(4):
        up = F.interpolate(a[k][None, None], size=(6, 6), mode="bilinear", align_corners=True)[0, 0]
        mask = (up - up.min()) / (up.max() - up.min() + 1e-8)
        scores.append(model((x * mask)[None])[0, 1].detach())
    weights = torch.softmax(torch.stack(scores), 0)
    expected = (weights[:, None, None] * a).sum(0)
    got = fxattr.scorecam(f, layer="features.1", relu=False, upsample=False, chunk_size=3)(params, x, 1)
    torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------------------- other libraries

def _pytorch_grad_cam(name, model, layers, x, target):
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    cls = {"gradcam": pgc.GradCAM, "gradcam_plus_plus": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM,
           "layercam": pgc.LayerCAM, "scorecam": pgc.ScoreCAM}[name]
    with cls(model=model, target_layers=layers) as method:
        return torch.from_numpy(method(input_tensor=x[None], targets=[ClassifierOutputTarget(target)]))[0]


@pytest.mark.parametrize("name", ALL_CAMS)
def test_agrees_with_pytorch_grad_cam_on_a_small_cnn(name):
    model = _cnn(torch.float32)
    f, params = fxattr.functionalize(model)
    x = torch.randn(3, 8, 8)
    ours = _make(name, f, layer="4", normalize=True)(params, x, 3)
    theirs = _pytorch_grad_cam(name, model, [model[4]], x, 3)
    # pytorch-grad-cam normalises twice (at the layer's resolution, then after upsampling), each
    # time with eps 1e-7 added to the range, fxattr once: they differ by O(1e-7 / range).
    scale = _make(name, f, layer="4")(params, x, 3).max()
    torch.testing.assert_close(ours[0], theirs, rtol=0, atol=1e-5 + 4e-7 / float(scale))
    # several layers: stacked, one map per layer.
    stacked = _make(name, f, layer=["0", "4"], normalize=True)(params, x, 3)
    torch.testing.assert_close(stacked[1], ours)
    torch.testing.assert_close(stacked[0], _make(name, f, layer="0", normalize=True)(params, x, 3))
    # pytorch-grad-cam normalises each layer's map at the layer's resolution, upsamples, averages
    # and normalises again: the same from fxattr's per-layer maps.
    theirs = _pytorch_grad_cam(name, model, [model[0], model[4]], x, 3)
    per_layer = [F.interpolate(_make(name, f, layer=layer, upsample=False, normalize=True)(params, x, 3)[None, None],
                               size=(8, 8), mode="bilinear", align_corners=False)[0, 0] for layer in ("0", "4")]
    mean = torch.stack(per_layer).mean(0)
    torch.testing.assert_close((mean - mean.min()) / (mean.max() + 1e-7), theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_CAMS)
def test_agrees_with_pytorch_grad_cam_on_resnet18(name):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    f, params = fxattr.functionalize(model)
    x = torch.randn(3, 48, 48)  # layer1: 12 x 12, layer3: 3 x 3
    explain = getattr(fxattr, name)
    if name == "scorecam":  # one forward per channel: layer1's 64 rather than layer3's 256
        layer, options, target = "layer1", {"chunk_size": 64}, 7
    else:
        layer, options = "layer3", {}
        # a class whose rectified map is not all zero (random weights): no 0 == 0 comparison
        target = next(t for t in range(10) if explain(f, layer=layer)(params, x, t).max() > 0)
    raw = explain(f, layer=layer, **options)(params, x, target)
    ours = (raw - raw.min()) / (raw.max() - raw.min() + 1e-7)  # = normalize=True (test_unnormalised_map_keeps_its_scale)
    theirs = _pytorch_grad_cam(name, model, [model.get_submodule(layer)], x, target)
    scale = raw.max()
    torch.testing.assert_close(ours[0], theirs, rtol=0, atol=2e-5 + 4e-7 / float(scale))


def test_agrees_with_captum_layer_gradcam():
    captum = pytest.importorskip("captum.attr")
    model = _cnn(torch.float64)
    f, params = fxattr.functionalize(model)
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    for layer, module in (("4", model[4]), ("2", model[2])):
        for relu in (False, True):
            theirs = captum.LayerGradCam(model, module).attribute(x[None], target=1,
                                                                   relu_attributions=relu)[0, 0]
            ours = fxattr.gradcam(f, layer=layer, relu=relu, upsample=False)(params, x, 1)
            torch.testing.assert_close(ours, theirs.detach())
            up = captum.LayerAttribution.interpolate(theirs[None, None], (8, 8), "bilinear")[0, 0]
            ours = fxattr.gradcam(f, layer=layer, relu=relu)(params, x, 1)
            torch.testing.assert_close(ours, up.detach().expand(3, 8, 8))


@pytest.mark.slow
def test_agrees_with_captum_on_resnet18():
    captum = pytest.importorskip("captum.attr")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    f, params = fxattr.functionalize(model)
    x = torch.randn(3, 64, 64)
    theirs = captum.LayerGradCam(model, model.layer4).attribute(x[None], target=2)[0, 0].detach()
    torch.testing.assert_close(fxattr.gradcam(f, layer="layer4", relu=False, upsample=False)(params, x, 2),
                               theirs, rtol=1e-4, atol=1e-6)


def test_guided_gradcam_agrees_with_captum():
    captum = pytest.importorskip("captum.attr")
    model = _cnn(torch.float64)
    f, params = fxattr.functionalize(model)
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    with model_unchanged(model):
        ours = fxattr.guided_gradcam(f, layer="4")(params, x, 2)
    theirs = captum.GuidedGradCam(model, model[4]).attribute(x[None], target=2)[0].detach()
    assert ours.shape == x.shape
    assert theirs.abs().max() > 0
    torch.testing.assert_close(ours, theirs)
    ours = fxattr.guided_gradcam(f, layer="4", interpolate="bilinear")(params, x, 2)
    theirs = captum.GuidedGradCam(model, model[4]).attribute(x[None], target=2,
                                                             interpolate_mode="bilinear")[0].detach()
    torch.testing.assert_close(ours, theirs)


# ------------------------------------------------------------------------------------ guarantees

@pytest.mark.parametrize("name", ALL_CAMS + ["cam", "guided_gradcam"])
def test_vmap_equals_loop_and_model_unchanged(name, dtype):
    model = GapNet(dtype, nn.ReLU).eval()
    f, params = fxattr.functionalize(model)
    layer = "features" if name in ("cam", "guided_gradcam") else ["features.1", "features"]
    explain = _make(name, f, layer=layer)
    xs, targets = torch.randn(3, 3, 6, 6, dtype=dtype), torch.tensor([0, 4, 2])
    with model_unchanged(model):
        if isinstance(layer, list):
            vmapped = torch.vmap(explain, in_dims=(None, 0, 0))(params, xs, targets)
            looped = torch.stack([explain(params, x, t) for x, t in zip(xs, targets)])
            assert vmapped.shape == (3, 2, 3, 6, 6)
            torch.testing.assert_close(vmapped, looped)
        else:
            vmapped = assert_vmap_equals_loop(explain, params, xs, targets)
        explain(params, xs[0], None)
    assert vmapped.dtype == dtype


@pytest.mark.parametrize("name", ALL_CAMS + ["cam"])
def test_derivatives_match_finite_differences(name):
    """Grad-CAM & co. hold dy/dA, so these are second derivatives of the model."""
    f, params = fxattr.functionalize(GapNet().eval())
    explain = _make(name, f, layer="features.2", relu=False)
    assert_second_order(explain, params, torch.randn(3, 5, 5, dtype=torch.float64), 1,
                        param_names=["features.0.weight", "fc.weight"], gradgrad=name == "gradcam")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gradcam", "scorecam", "cam", "guided_gradcam"])
def test_compile_equals_eager(name):
    f, params = fxattr.functionalize(GapNet(torch.float32, nn.ReLU).eval())
    options = {} if name == "guided_gradcam" else {"normalize": True}
    explain = _make(name, f, layer="features", **options)
    assert_compile_equals_eager(explain, params, torch.randn(2, 3, 6, 6), torch.tensor([1, 3]))


def test_unnormalised_map_keeps_its_scale():
    f, params = fxattr.functionalize(GapNet().eval())
    x = torch.randn(3, 6, 6, dtype=torch.float64)
    plain = fxattr.gradcam(f, layer="features")(params, x, 0)
    normalised = fxattr.gradcam(f, layer="features", normalize=True)(params, x, 0)
    assert plain.min() >= 0 and normalised.min() >= 0 and normalised.max() <= 1
    torch.testing.assert_close(normalised, (plain - plain.min()) / (plain.max() - plain.min() + 1e-7))


def test_layer_given_as_a_submodule():
    model = GapNet().eval()
    f, params = fxattr.functionalize(model)
    x = torch.randn(3, 6, 6, dtype=torch.float64)
    by_name = fxattr.gradcam(f, layer=["features.1", "features"])(params, x, 2)
    by_module = fxattr.gradcam(f, layer=[model.features[1], model.features])(params, x, 2)
    torch.testing.assert_close(by_module, by_name)
    with pytest.raises(fxattr.FxattrError, match="gradcam: layer Conv2d is not a submodule of the model"):
        fxattr.gradcam(f, layer=nn.Conv2d(1, 1, 1))


# ---------------------------------------------------------------------------------------- errors

def test_clear_errors():
    model = GapNet(torch.float32).eval()
    f, params = fxattr.functionalize(model)
    x = torch.randn(3, 6, 6)
    E = fxattr.FxattrError
    with pytest.raises(E, match="gradcam: layer 'featurs' is not a module or graph node of the model; "
                                "close matches: 'features'"):
        fxattr.gradcam(f, layer="featurs")
    with pytest.raises(E, match="scorecam: layer must be a module name"):
        fxattr.scorecam(f, layer=3)
    with pytest.raises(E, match="layercam: layer must be a module name"):
        fxattr.layercam(f, layer=[])
    with pytest.raises(E, match="xgradcam: relu must be True or False"):
        fxattr.xgradcam(f, layer="features", relu=None)
    with pytest.raises(E, match="gradcam_plus_plus: interpolate must be one of"):
        fxattr.gradcam_plus_plus(f, layer="features", interpolate="cubic")
    with pytest.raises(E, match="gradcam: f must be a function"):
        fxattr.gradcam(model, layer="features")
    with pytest.raises(E, match="cam: fc='features.0' is not an nn.Linear of the model; its linear layers are 'fc'"):
        fxattr.cam(f, layer="features", fc="features.0")
    with pytest.raises(E, match="cam: layer 'features.1' has 4 channels but 'fc' takes 6 features"):
        fxattr.cam(f, layer="features.1")(params, x, 0)
    with pytest.raises(E, match="cam: target must be a class index"):
        fxattr.cam(f, layer="features")(params, x, lambda out: out[0])
    with pytest.raises(E, match="gradcam: the activation of layer 'fc' has shape \\(5,\\)"):
        fxattr.gradcam(f, layer="fc")(params, x, 0)
    with pytest.raises(E, match="gradcam: target 9 is out of range"):
        fxattr.gradcam(f, layer="features")(params, x, 9)
    with pytest.raises(E, match="gradcam: the layers' maps have different shapes"):
        fxattr.gradcam(f, layer=["features", "pool"], upsample=False)(params, x, 0)
    with pytest.raises(E, match="scorecam: chunk_size must be an int >= 1"):
        fxattr.scorecam(f, layer="features", chunk_size=0)
    with pytest.raises(E, match="guided_gradcam: layer must be one module"):
        fxattr.guided_gradcam(f, layer=["features"])
    assert np.isfinite(fxattr.gradcam(f, layer="features")(params, x, 0).numpy()).all()


# --------------------------------------------------------------- token and channels-last layers

def _tiny_vit():
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2,
                                                 hidden_dim=8, mlp_dim=16, num_classes=5).eval()
    with torch.no_grad():  # torchvision initialises the head to zero: no gradient would flow
        model.heads.head.weight.normal_()
    return model


def _tiny_swin():
    import torchvision
    torch.manual_seed(0)
    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1],
                                              num_heads=[1, 1], window_size=[2, 2], num_classes=5).eval()


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_gradcam_on_vit_tokens_uses_the_patch_grid():
    """A ViT block's output is (1 + 4 * 4, 8): the class token is dropped and the 16 patch tokens
    become a 4 x 4 grid of 8 channels (was: 17 tokens taken as channels, every row of the map
    equal)."""
    model = _tiny_vit()
    f, params = fxattr.functionalize(model)
    xs, ts = torch.randn(2, 3, 16, 16), torch.tensor([0, 3])
    layer = "encoder.layers.encoder_layer_0"
    auto = torch.vmap(fxattr.gradcam(f, layer=layer, upsample=False, relu=False),
                      in_dims=(None, 0, 0))(params, xs, ts)
    by_hand = fxattr.gradcam(f, layer=layer, upsample=False, relu=False,
                             reshape=lambda a: a[1:].reshape(4, 4, 8).permute(2, 0, 1))
    assert auto.shape == (2, 4, 4)
    torch.testing.assert_close(auto, torch.vmap(by_hand, in_dims=(None, 0, 0))(params, xs, ts))
    # by hand from the split: the mean gradient of each feature over the patches weighs it
    body, head = fxattr.graph.split(f, layer)
    a = body(params, xs[0])
    g = torch.func.grad(lambda a_: head(params, xs[0], a_)[0])(a)
    weights = g[1:].mean(0)
    expected = (a[1:] * weights).sum(-1).reshape(4, 4)
    torch.testing.assert_close(auto[0], expected)
    assert not torch.allclose(auto[0], auto[0][:1].expand(4, 4))  # rows differ


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_gradcam_on_swin_is_channels_first():
    """Swin's stages are (H, W, C); its ``permute`` layer only moves C first, so Grad-CAM at the
    stage and at ``permute`` must agree (was: H taken as the channels)."""
    model = _tiny_swin()
    f, params = fxattr.functionalize(model)
    xs, ts = torch.randn(2, 3, 32, 32), torch.tensor([1, 4])
    at = {layer: torch.vmap(fxattr.gradcam(f, layer=layer, upsample=False), in_dims=(None, 0, 0))(params, xs, ts)
          for layer in ("norm", "permute")}
    assert at["permute"].shape == (2, 4, 4)
    torch.testing.assert_close(at["norm"], at["permute"])


def test_token_layer_of_another_model_is_a_clear_error():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(3, 8)
            self.block = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.block(self.embed(x)).mean(1))

    torch.manual_seed(0)
    model = Tokens().eval()
    f, params = fxattr.functionalize(model)
    explain = fxattr.gradcam(f, layer="embed")
    with pytest.raises(fxattr.FxattrError, match=r"fxattr\.gradcam: the activation of layer 'embed' has "
                                                 r"shape \(5, 8\): \(tokens, features\).*reshape="):
        explain(params, torch.randn(5, 3), 0)
    with pytest.raises(fxattr.FxattrError, match=r"fxattr\.gradcam: reshape must be None or a callable"):
        fxattr.gradcam(f, layer="embed", reshape="tokens")
    out = fxattr.gradcam(f, layer="embed", upsample=False, reshape=lambda a: a.T)(params, torch.randn(5, 3), 0)
    assert out.shape == (5,)


def test_cam_negative_target_under_vmap_is_an_error():
    """``weight[target]`` read a negative target from the end: class K - 1 was explained."""
    model = small_cnn()
    f, params = fxattr.functionalize(model)
    explain = fxattr.cam(f, layer="5", fc="8")
    xs = torch.randn(2, 3, 8, 8)
    with pytest.raises(fxattr.FxattrError, match=r"fxattr\.cam: target -1 is out of range for the 5 classes"):
        torch.vmap(explain, in_dims=(None, 0, 0))(params, xs, torch.tensor([0, -1]))
    with pytest.raises(fxattr.FxattrError, match=r"fxattr\.cam: target 5 is out of range"):
        torch.vmap(explain, in_dims=(None, 0, 0))(params, xs, torch.tensor([5, 1]))


def test_errors_inside_the_model_are_reported_under_the_cam_name():
    model = small_cnn()
    f, params = fxattr.functionalize(model)
    # a batch passed as one example: caught before the model runs (from its first layer) or when
    # the model fails on it; either way under the CAM's name and saying it looks like a batch
    with pytest.raises(fxattr.FxattrError, match=r"^fxattr\.gradcam: (the model failed on one example of "
                                                 r"shape \(2, 3, 8, 8\).*If x is a batch|x has shape "
                                                 r"\(2, 3, 8, 8\).*looks like a batch)"):
        fxattr.gradcam(f, layer="4")(params, torch.randn(2, 3, 8, 8), 0)
    with pytest.raises(fxattr.FxattrError, match=r"^fxattr\.gradcam: x must be a floating-point tensor"):
        fxattr.gradcam(f, layer="4")(params, torch.ones(3, 8, 8, dtype=torch.long), 0)
