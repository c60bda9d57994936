"""The peers fxattr is timed against, set up the way their docs show: captum, zennit,
pytorch-grad-cam and plain-torch reference loops. Each takes a harness.Ctx and returns a
callable that explains the batch."""

from __future__ import annotations

import copy

import torch

import fxattr

def captum_saliency(c):
    from captum.attr import Saliency
    sal = Saliency(c.frozen)
    return lambda: sal.attribute(c.x, target=c.t, abs=False)


def captum_ig(c):
    from captum.attr import IntegratedGradients
    ig = IntegratedGradients(c.frozen)
    # The same number of rows per forward as fxattr's chunks (steps per chunk x batch), so both
    # hold about the same memory; captum's default (all steps at once) is 256 rows at batch 8.
    chunk = c.args.ig_chunk or c.args.steps
    return lambda: ig.attribute(c.x, target=c.t, n_steps=c.args.steps, method=c.args.ig_method,
                                internal_batch_size=chunk * c.x.shape[0])


def captum_smoothgrad(c):
    from captum.attr import NoiseTunnel, Saliency
    nt = NoiseTunnel(Saliency(c.frozen))
    std = 0.15 * float(c.x.max() - c.x.min())
    # the same rows per forward as fxattr's chunks (samples per chunk x batch)
    return lambda: nt.attribute(c.x, target=c.t, nt_type="smoothgrad", nt_samples=c.args.samples,
                                nt_samples_batch_size=c.args.sg_chunk or None, stdevs=std, abs=False)


def _zennit(c, composite_name):
    from zennit import composites
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer
    canon = {"resnet18": ResNetCanonizer, "vgg11": VGGCanonizer}.get(c.name, SequentialMergeBatchNorm)()
    composite = getattr(composites, composite_name)(canonizers=[canon])
    model = c.model_copy()          # canonizers rewrite the model while attached: keep it private
    attributor = c.exit.enter_context(Gradient(model=model, composite=composite))
    out_dim = c.frozen(c.x[:1]).shape[1]
    one_hot = torch.nn.functional.one_hot(c.t, out_dim).to(c.x.dtype)
    return lambda: attributor(c.x, one_hot)[1]


def zennit_epsilon_plus_flat(c):
    return _zennit(c, "EpsilonPlusFlat")


def zennit_epsilon_alpha2_beta1(c):
    return _zennit(c, "EpsilonAlpha2Beta1")


def captum_layer_gradcam(c):
    from captum.attr import LayerAttribution, LayerGradCam
    cam = LayerGradCam(c.frozen, c.layer)
    size = tuple(c.x.shape[-2:])
    return lambda: LayerAttribution.interpolate(cam.attribute(c.x, target=c.t, relu_attributions=True),
                                                size, "bilinear")


def _pytorch_grad_cam(c, cls, **attrs):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    # pytorch-grad-cam calls loss.backward() on the output and needs parameters that require grad
    # (it does not make the input require grad): its documented set-up, weight gradients included.
    model = copy.deepcopy(c.model)
    cam = cls(model=model, target_layers=[model.get_submodule(c.layer_name)])
    for k, v in attrs.items():
        setattr(cam, k, v)
    c.exit.callback(cam.activations_and_grads.release)
    targets = [ClassifierOutputTarget(int(i)) for i in c.t]
    return lambda: cam(input_tensor=c.x, targets=targets)


def gradcam_lib_gradcam(c):
    from pytorch_grad_cam import GradCAM
    return _pytorch_grad_cam(c, GradCAM)


def gradcam_lib_scorecam(c):
    from pytorch_grad_cam import ScoreCAM
    return _pytorch_grad_cam(c, ScoreCAM, batch_size=c.args.mask_chunk)


def captum_deeplift(c):
    from captum.attr import DeepLift
    dl = DeepLift(c.model_copy())
    return lambda: dl.attribute(c.x, target=c.t, baselines=0.0)


def occlusion_geometry(c):
    size = c.x.shape[-1]
    window = max(1, size // 4) if c.args.occlusion_window is None else c.args.occlusion_window
    stride = window if c.args.occlusion_stride is None else c.args.occlusion_stride
    return window, stride


def captum_occlusion(c):
    from captum.attr import Occlusion
    occ = Occlusion(c.frozen)
    w, s = occlusion_geometry(c)
    return lambda: occ.attribute(c.x, target=c.t, sliding_window_shapes=(c.x.shape[1], w, w),
                                 strides=(c.x.shape[1], s, s), baselines=0.0,
                                 perturbations_per_eval=c.args.mask_chunk)


def bench_rise_masks(c):
    """Fixed RISE masks ``(N, H, W)`` shared by fxattr and the reference loop (Petsiuk et al.'s
    masks: 7x7 cells kept with p=0.5, upsampled bilinearly, shifted by less than a cell)."""
    if not hasattr(c, "_rise_masks"):
        torch.manual_seed(0)
        if hasattr(fxattr, "rise_masks"):
            masks = fxattr.rise_masks(tuple(c.x.shape[-2:]), num_masks=c.args.rise_masks,
                                      cell_size=7, p=0.5)
        else:
            masks = (torch.rand(c.args.rise_masks, *c.x.shape[-2:]) < 0.5).float()
        c._rise_masks = masks.to(c.x.device, c.x.dtype)
    return c._rise_masks


def torch_rise(c):
    """The reference RISE loop (Petsiuk et al.'s code), batched over the examples: chunks of masked
    copies (batch x mask_chunk rows per forward, as fxattr's vmap) through the model."""
    masks = bench_rise_masks(c)
    n, chunk = masks.shape[0], c.args.mask_chunk
    rows = torch.arange(c.x.shape[0], device=c.x.device)

    @torch.no_grad()
    def run():
        b, ch, h, w = c.x.shape
        sal = torch.zeros(b, h * w, dtype=c.x.dtype, device=c.x.device)
        for i in range(0, n, chunk):
            m = masks[i:i + chunk]
            out = c.frozen((c.x[:, None] * m[None, :, None]).reshape(-1, ch, h, w))
            p = out.reshape(b, m.shape[0], -1)[rows, :, c.t]          # (b, chunk)
            sal += p @ m.reshape(m.shape[0], -1)
        return (sal / (n * 0.5)).reshape(b, 1, h, w).expand(b, ch, h, w)
    return run


