"""The fxattr side of each benchmark row and the METHODS table pairing it with its peers."""

from __future__ import annotations

from collections import OrderedDict


import fxattr

from peers import (bench_rise_masks, captum_deeplift, captum_ig, captum_layer_gradcam, captum_occlusion,
                   captum_saliency, captum_smoothgrad, gradcam_lib_gradcam, gradcam_lib_scorecam,
                   occlusion_geometry, torch_rise, zennit_epsilon_alpha2_beta1, zennit_epsilon_plus_flat)

def fx_gradient(c):
    return fxattr.gradient(c.f)


def fx_ig(c, chunk=None):
    chunk = c.args.ig_chunk if chunk is None else chunk
    return fxattr.integrated_gradients(c.f, steps=c.args.steps, method=c.args.ig_method,
                                       chunk_size=None if chunk == 0 else chunk)


def fx_smoothgrad(c, chunk=None):
    chunk = c.args.sg_chunk if chunk is None else chunk
    std = 0.15 * float(c.x.max() - c.x.min())  # captum's stdevs is absolute: the same noise level
    return fxattr.smoothgrad(c.f, samples=c.args.samples, sigma=std, relative=False,
                             chunk_size=None if chunk == 0 else chunk)


def fx_lrp_epf(c):
    return fxattr.lrp(c.f, composite="epsilon_plus_flat")


def fx_lrp_a2b1(c):
    try:
        return fxattr.lrp(c.f, composite="epsilon_alpha2_beta1")
    except (ValueError, TypeError):
        return fxattr.lrp(c.f, rule="alpha_2_beta_1")


def fx_gradcam(c):
    return fxattr.gradcam(c.f, layer=c.layer_name)


def fx_deeplift(c):
    return fxattr.deeplift(c.f)


def fx_occlusion(c):
    w, s = occlusion_geometry(c)
    ch = c.x.shape[1]
    return fxattr.occlusion(c.f, window=(ch, w, w), stride=(ch, s, s), chunk_size=c.args.mask_chunk)


def fx_rise(c):
    return fxattr.rise(c.f, masks=bench_rise_masks(c), p=0.5, chunk_size=c.args.mask_chunk)


def fx_scorecam(c):
    # pytorch-grad-cam runs batch_size masks of ONE image per forward; fxattr's chunk is per example
    # inside the outer vmap (chunk x batch rows), so match rows per forward, not chunk numbers.
    return fxattr.scorecam(c.f, layer=c.layer_name, chunk_size=max(1, c.args.mask_chunk // c.x.shape[0]))


# name: (fxattr attribute it needs, fxattr factory, vmap randomness, [(peer name, factory)],
#        whether fxattr and the first peer compute the same numbers, target: a ratio to the floor,
#        the name of the argument that gives it, or ("peer", ratio to the fastest peer))
METHODS = OrderedDict([
    ("gradient", ("gradient", fx_gradient, "error", [("captum Saliency", captum_saliency)], True, 1.05)),
    ("ig", ("integrated_gradients", fx_ig, "error", [("captum IntegratedGradients", captum_ig)], True, "steps")),
    ("smoothgrad", ("smoothgrad", fx_smoothgrad, "different",
                    [("captum NoiseTunnel(Saliency)", captum_smoothgrad)], False, "samples")),
    ("lrp_epsilon_plus_flat", ("lrp", fx_lrp_epf, "error",
                               [("zennit EpsilonPlusFlat", zennit_epsilon_plus_flat)], False, 2.0)),
    ("lrp_epsilon_alpha2_beta1", ("lrp", fx_lrp_a2b1, "error",
                                  [("zennit EpsilonAlpha2Beta1", zennit_epsilon_alpha2_beta1)], False, 2.0)),
    ("gradcam", ("gradcam", fx_gradcam, "error", [("captum LayerGradCam", captum_layer_gradcam),
                                                  ("pytorch-grad-cam GradCAM", gradcam_lib_gradcam)], False, 1.1)),
    ("deeplift", ("deeplift", fx_deeplift, "error", [("captum DeepLift", captum_deeplift)], False, None)),
    ("occlusion", ("occlusion", fx_occlusion, "error", [("captum Occlusion", captum_occlusion)], True, ("peer", 0.5))),
    ("rise", ("rise", fx_rise, "error", [("torch loop (RISE reference)", torch_rise)], True, ("peer", 0.5))),
    ("scorecam", ("scorecam", fx_scorecam, "error", [("pytorch-grad-cam ScoreCAM", gradcam_lib_scorecam)],
                  False, ("peer", 0.5))),
])


