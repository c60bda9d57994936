"""Class activation maps: CAM, Grad-CAM and its variants, Score-CAM, guided Grad-CAM.

All of them weigh the channels of one layer's activation ``A`` (shape ``(K, *spatial)`` for one
example) and sum them. fxattr cuts the model at the layer with :func:`fxattr.graph.split` into
``body(params, x) -> A`` and ``head(params, x, A) -> output``; the gradient of the target w.r.t.
``A`` is one ``torch.func.grad`` of the head, so Grad-CAM costs one body forward plus one head
forward and backward -- the autograd floor -- and composes with ``torch.vmap``, higher-order
``torch.func.grad`` (no hooks, no custom backward) and ``torch.compile``.

Conventions (matched to pytorch-grad-cam and captum, checked in the tests):

- the map is computed at the layer's resolution, then (``relu=True``) rectified, then
  (``upsample=True``) resized to x's trailing spatial size with ``F.interpolate`` (bilinear,
  ``align_corners=False``: what pytorch-grad-cam's ``cv2.resize`` and captum's
  ``LayerAttribution.interpolate`` do), then (``normalize=True``) min-max scaled to [0, 1]
  (pytorch-grad-cam's ``scale_cam_image``, eps 1e-7). pytorch-grad-cam always rectifies and
  normalises -- twice, at the layer's resolution and again after upsampling, so its maps differ
  from ``normalize=True`` by O(1e-7 / range of the map); captum's ``LayerGradCam`` does neither by
  default (``relu_attributions=False``) and does not upsample. fxattr's defaults: ``relu=True, upsample=True, normalize=False`` (the
  unnormalised map keeps its scale, so it can be differentiated and compared across examples).
- upsampled maps are returned broadcast to x's shape (an expanded view: every channel holds the
  same ``(H, W)`` map; take ``[0]``), so they compose with everything that expects an attribution
  of x's shape; without upsampling the map has the layer's spatial shape.
- ``layer`` may be a list of layers: one map per layer, stacked on a new leading axis (upsampled,
  so they share a shape); each layer costs its own body forward and head backward.
  pytorch-grad-cam instead normalises each layer's map at the layer's resolution, upsamples,
  averages and normalises again: that is ``upsample=False, normalize=True`` per layer, then
  ``F.interpolate``, mean and min-max (as tests/test_cam.py does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxattr._explainer import (
    check_choice,
    check_int,
    check_model,
    explainer,
    fixed_target,
    tree_map,
)
from fxattr.errors import api_boundary, fail
from fxattr.functional import CAPTURE_LOCK
from fxattr.targets import check_index, check_target, select, take

__all__ = ["cam", "gradcam", "gradcam_plus_plus", "guided_gradcam", "layercam", "scorecam", "xgradcam"]

_INTERPOLATE = ("bilinear", "nearest", "bicubic", "area", "nearest-exact")
_EPS_NORMALIZE = 1e-7  # pytorch-grad-cam's scale_cam_image


# ---------------------------------------------------------------------------------------- shared

def _layer_names(where: str, f, layer) -> list[str]:
    if isinstance(layer, (str, nn.Module)):
        layer = [layer]
    if not (isinstance(layer, Sequence) and layer and all(isinstance(n, (str, nn.Module)) for n in layer)):
        raise fail(where, "layer must be a module name (e.g. 'layer4'), a graph node name, a submodule "
                          f"of the model, or a non-empty list of them; got {layer!r:.100}")
    return [_module_name(where, f, n) if isinstance(n, nn.Module) else n for n in layer]


def _module_name(where: str, f, module: nn.Module) -> str:
    """The qualified name of a submodule passed as an object (pytorch-grad-cam's style)."""
    root = getattr(f, "module", None)
    if isinstance(root, nn.Module):
        for name, m in root.named_modules():
            if m is module and name:
                return name
    raise fail(where, f"layer {type(module).__name__} is not a submodule of the model; pass its "
                      "qualified name (e.g. 'layer4')")


def _split_layers(where: str, f, names, inputs=None):
    from fxattr import graph  # graph imports torch.fx; load it only when needed
    with CAPTURE_LOCK:  # torch.fx patches nn.Module.__call__ while it traces: one capture at a time
        return [graph.split(f, name, where=where, inputs=inputs) for name in names]


def _splits_for(where: str, f, names, splits: dict, x):
    """The splits for x's inputs: a tuple / dict x may pass ``forward`` parameters that have a
    default (captum's ``BasicModel_ConvNet_One_Conv(x, x2=None)``), traced with them (once each)."""
    key = None
    if isinstance(x, (tuple, dict)):
        from fxattr import graph
        key = graph.input_names(f, x)
    if key not in splits:
        splits[key] = _split_layers(where, f, names, inputs=key)
    return splits[key]


def _check_options(where, relu, upsample, interpolate, normalize):
    for name, value in (("relu", relu), ("upsample", upsample), ("normalize", normalize)):
        if not isinstance(value, bool):
            raise fail(where, f"{name} must be True or False, got {value!r}")
    check_choice(where, "interpolate", interpolate, _INTERPOLATE)


def _activation(where: str, body, params, x, f=None) -> Tensor:
    guarded = getattr(f, "guarded", None)
    a = body(params, x) if guarded is None else guarded(x, lambda: body(params, x), where)
    if not isinstance(a, Tensor):
        raise fail(where, f"the activation of layer {body.layer!r} is a {type(a).__name__}, not a "
                          "tensor; choose a layer that returns one tensor")
    return a


def _layout(where: str, f, reshape):
    """``to_channels(layer, a) -> (channels, *spatial)``: the user's ``reshape``, or the automatic
    handling of token and channels-last layers, or a clear error -- never tokens taken as channels.
    """
    module = getattr(f, "module", None)
    kind = type(module).__name__ if module is not None else ""
    vit = kind == "VisionTransformer" and hasattr(module, "class_token")
    swin = kind == "SwinTransformer" and hasattr(module, "permute")
    patch_tokens = _patch_token_layout(module)
    token_model = module is not None and any(
        isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.LayerNorm))
        for m in module.modules())
    has_conv1d = module is not None and any(
        isinstance(m, (nn.Conv1d, nn.ConvTranspose1d, nn.MaxPool1d, nn.AvgPool1d)) for m in module.modules())
    widths = set()
    if module is not None:
        for m in module.modules():
            if isinstance(m, nn.Linear):
                widths |= {m.in_features, m.out_features}
            elif isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
                widths.add(m.normalized_shape[0])

    def to_channels(layer: str, a: Tensor) -> Tensor:
        if reshape is not None:
            out = reshape(a)
            if not isinstance(out, Tensor) or out.ndim < 2:
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise fail(where, f"reshape must return the activation of layer {layer!r} as "
                                  f"(channels, *spatial), got {shape}")
            return out
        if a.ndim < 2:
            raise fail(where, f"the activation of layer {layer!r} has shape {tuple(a.shape)}; CAM "
                              "methods need (channels, *spatial) per example -- choose a "
                              "convolutional layer, or pass reshape=")
        if a.ndim == 2 and vit:
            tokens, dim = a.shape
            side = math.isqrt(tokens - 1)
            if side * side == tokens - 1:
                # torchvision's ViT: the class token first, then the patches row by row
                return a[1:].reshape(side, side, dim).permute(2, 0, 1)
        if a.ndim == 2 and patch_tokens is not None:
            prefix, grid = patch_tokens
            tokens, dim = a.shape
            if grid is None:
                side = math.isqrt(max(tokens - prefix, 0))
                grid = (side, side) if side > 0 and side * side == tokens - prefix else None
            if grid is not None and tokens == prefix + grid[0] * grid[1]:
                # a Hugging Face ViT / DeiT: class (and distillation / register) tokens first,
                # then the patches row by row
                return a[prefix:].reshape(grid[0], grid[1], dim).permute(2, 0, 1)
        if a.ndim == 2 and (token_model or not has_conv1d):
            raise fail(where, f"the activation of layer {layer!r} has shape {tuple(a.shape)}: "
                              "(tokens, features) of a token layer, not (channels, positions); "
                              "taking tokens as channels would give a meaningless map. Pass "
                              "reshape= a function (tokens, features) -> (features, height, width), "
                              "e.g. reshape=lambda a: a[1:].reshape(14, 14, -1).permute(2, 0, 1) "
                              "for a class token and a 14 x 14 patch grid")
        if a.ndim >= 3 and (swin or token_model) and a.shape[-1] in widths and a.shape[0] not in widths:
            # channels-last (Swin's (H, W, C) stages, ConvNeXt's inner blocks)
            return a.movedim(-1, 0)
        return a

    return to_channels


def _patch_token_layout(module) -> tuple[int, tuple[int, int] | None] | None:
    """``(prefix tokens, patch grid or None)`` of a Hugging Face ViT-style model (a submodule with
    a ``cls_token`` parameter and ``patch_embeddings``: ViT, DeiT, BEiT-like embeddings), read from
    its embeddings: the class token, DeiT's distillation token and register tokens come before
    the patches; ``None`` for other models."""
    if not isinstance(module, nn.Module):
        return None
    for m in module.modules():
        cls_token = getattr(m, "cls_token", None)
        patches = getattr(m, "patch_embeddings", None)
        if not (isinstance(cls_token, Tensor) and isinstance(patches, nn.Module)):
            continue
        prefix = 1
        if isinstance(getattr(m, "distillation_token", None), Tensor):
            prefix += 1
        registers = getattr(m, "register_tokens", None)
        if isinstance(registers, Tensor) and registers.ndim == 3:
            prefix += registers.shape[1]
        image, patch = getattr(patches, "image_size", None), getattr(patches, "patch_size", None)
        grid = None
        if image is not None and patch is not None:
            image = tuple(image) if isinstance(image, Sequence) else (image, image)
            patch = tuple(patch) if isinstance(patch, Sequence) else (patch, patch)
            if len(image) == 2 and len(patch) == 2:
                grid = (image[0] // patch[0], image[1] // patch[1])
        return prefix, grid
    return None


def _grad_at_layer(where: str, head, params, x, a, target) -> Tensor:
    """d head(params, x, a)[target] / da: the head's vjp, nothing else."""
    return torch.func.grad(lambda a_: select(where, head(params, x, a_), target))(a)


def _spatial_sum(t: Tensor) -> Tensor:
    return t.sum(dim=tuple(range(1, t.ndim)), keepdim=True)


def _weighted(weights: Tensor, a: Tensor) -> Tensor:
    """sum_k w_k A_k for channel weights ``(K,)`` (or per-position weights of A's shape)."""
    if weights.ndim == 1:
        weights = weights.reshape(-1, *(1,) * (a.ndim - 1))
    return (weights * a).sum(0)


def _upsample(where: str, m: Tensor, x, interpolate: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise fail(where, "upsample=True needs a tensor x (to read its spatial size); pass "
                          "upsample=False for a pytree input")
    k = m.ndim
    if x.ndim < k:
        raise fail(where, f"a map of spatial shape {tuple(m.shape)} cannot be upsampled to x of shape "
                          f"{tuple(x.shape)}; pass upsample=False")
    size = tuple(x.shape[-k:])
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}.get(k) if interpolate == "bilinear" else interpolate
    if mode is None:
        raise fail(where, f"cannot interpolate a map with {k} spatial dimensions")
    extra = {"align_corners": False} if mode in ("linear", "bilinear", "bicubic", "trilinear") else {}
    return F.interpolate(m[None, None], size=size, mode=mode, **extra)[0, 0]


def _eps(value: float, dtype) -> float:
    """A stabiliser that does not round to 0 in ``dtype`` (float16 rounds 1e-8 to 0): at least the
    smallest subnormal."""
    info = torch.finfo(dtype)
    return max(value, info.tiny * info.eps)


def _normalize(m: Tensor) -> Tensor:
    m = m - m.min()
    return m / (m.max() + _eps(_EPS_NORMALIZE, m.dtype))


def _finish(where, maps, x, relu, upsample, interpolate, normalize):
    out = []
    for m in maps:
        if relu:
            m = torch.relu(m)
        if upsample:
            m = _upsample(where, m, x, interpolate)
        if normalize:
            m = _normalize(m)
        if upsample:  # broadcast last: an expanded view, no copy per channel
            m = m.expand(x.shape)
        out.append(m)
    if len(out) == 1:
        return out[0]
    shapes = {tuple(m.shape) for m in out}
    if len(shapes) > 1:
        raise fail(where, f"the layers' maps have different shapes {sorted(shapes)}; pass "
                          "upsample=True to stack them at x's size")
    return torch.stack(out)


def _takes_token_ids(f) -> bool:
    """Integer x is accepted by the layer-gradient CAMs of models that embed token ids."""
    module = getattr(f, "module", None)
    return isinstance(module, nn.Module) and any(isinstance(m, (nn.Embedding, nn.EmbeddingBag))
                                                 for m in module.modules())


def _check_reshape(where, reshape):
    if reshape is not None and not callable(reshape):
        raise fail(where, f"reshape must be None or a callable activation -> (channels, *spatial), "
                          f"got {reshape!r}")


def _gradient_cam(name: str, f, layer, relu, upsample, interpolate, normalize, mapper, reshape=None):
    """The Grad-CAM family: ``mapper(a, g) -> map`` from the activation and its gradient."""
    check_model(name, f)
    _check_options(name, relu, upsample, interpolate, normalize)
    _check_reshape(name, reshape)
    names = _layer_names(name, f, layer)
    splits = {None: _split_layers(name, f, names)}
    to_channels = _layout(name, f, reshape)

    def explain(params, x, target=None):
        check_target(name, target)
        maps = []
        for body, head in _splits_for(name, f, names, splits, x):
            a = _activation(name, body, params, x, f)
            g = _grad_at_layer(name, head, params, x, a, target)
            maps.append(mapper(to_channels(body.layer, a), to_channels(body.layer, g)))
        return _finish(name, maps, x, relu, upsample, interpolate, normalize)

    config = {"layer": layer, "relu": relu, "upsample": upsample, "interpolate": interpolate,
              "normalize": normalize, "reshape": reshape}
    return explainer(name, f, config, explain, integer_x=_takes_token_ids(f), empty="run")


# ----------------------------------------------------------------------------------- explainers

@api_boundary("gradcam")
def gradcam(f, *, layer, relu: bool = True, upsample: bool = True, interpolate: str = "bilinear",
            normalize: bool = False, reshape=None):
    """Grad-CAM (Selvaraju et al. 2017): channels weighted by their mean gradient.

    ``map = sum_k alpha_k A_k`` with ``alpha_k = mean_ij dy/dA_kij``, ``y`` the target output;
    then ReLU, upsampling and normalisation as set (see the module docstring). With
    ``relu=False, upsample=False`` it is captum's ``LayerGradCam`` (default options) without its
    channel axis; with ``normalize=True`` pytorch-grad-cam's ``GradCAM``. On a global-average-pool
    + linear head it is :func:`cam` divided by the number of positions ``H * W``.

    Args:
        f: the function of ``fxattr.functionalize`` (its module traceable by torch.fx, or, as
            Hugging Face models, captured by torch dynamo: ``functionalize(..., input_shape=)``).
        layer: a module name (``"layer4"``), a graph node name, the submodule itself
            (``model.layer4``), or a list of them (maps stacked).
        relu: rectify the map (pytorch-grad-cam: always; captum: ``relu_attributions=False``).
        upsample: resize the map to x's trailing spatial size and broadcast it to x's shape.
        interpolate: the ``F.interpolate`` mode of the upsampling (``"bilinear"`` means linear in
            every spatial dimension, ``align_corners=False``).
        normalize: min-max scale each map to [0, 1] (pytorch-grad-cam).
        reshape: a function taking the layer's activation (one example, as the layer gives it)
            to ``(channels, *spatial)``, like pytorch-grad-cam's ``reshape_transform`` (applied to
            the activation and its gradient). ``None``: channels-first activations are used as
            they are; torchvision's ``VisionTransformer`` token layers ``(1 + h * w, dim)`` lose
            the class token and become a ``(dim, h, w)`` grid, as do Hugging Face ViT / DeiT
            token layers (class, distillation and register tokens dropped, the grid read from
            the patch embeddings; on models captured by torch dynamo, layers are named by their
            module path, e.g. ``"model.vit.layers.1"``); channels-last layers of
            ``SwinTransformer`` and of token models (``(H, W, C)``, C a feature width of the
            model) are moved to channels-first; any other token layer ``(tokens, features)`` is a
            clear error asking for ``reshape`` (tokens are never taken as channels).

    Example:
        >>> f, params = fxattr.functionalize(torchvision.models.resnet18().eval())
        >>> explain = fxattr.gradcam(f, layer="layer4")
        >>> maps = torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)  # (B, 3, H, W)
    """
    return _gradient_cam("gradcam", f, layer, relu, upsample, interpolate, normalize,
                         lambda a, g: _weighted(g.mean(dim=tuple(range(1, g.ndim))), a), reshape)


@api_boundary("gradcam_plus_plus")
def gradcam_plus_plus(f, *, layer, relu: bool = True, upsample: bool = True,
                      interpolate: str = "bilinear", normalize: bool = False, reshape=None):
    """Grad-CAM++ (Chattopadhyay et al. 2018) in pytorch-grad-cam's form.

    ``alpha_kij = g^2 / (2 g^2 + (sum_ij A_kij) g^3 + 1e-6)`` (0 where ``g = 0``), channel weights
    ``w_k = sum_ij alpha_kij relu(g_kij)``, ``map = sum_k w_k A_k``; ``g = dy/dA``. This is the
    paper's closed form with the exponential's derivatives replaced by powers of the gradient, as
    pytorch-grad-cam does. Options as :func:`gradcam`.

    Example:
        >>> torch.vmap(fxattr.gradcam_plus_plus(f, layer="layer4"), in_dims=(None, 0, 0))(params, images, labels)
    """
    def mapper(a, g):
        g2 = g * g
        alpha = g2 / (2 * g2 + _spatial_sum(a) * g2 * g + _eps(1e-6, g.dtype))
        alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
        weights = (alpha * torch.relu(g)).sum(dim=tuple(range(1, g.ndim)))
        return _weighted(weights, a)

    return _gradient_cam("gradcam_plus_plus", f, layer, relu, upsample, interpolate, normalize,
                         mapper, reshape)


@api_boundary("xgradcam")
def xgradcam(f, *, layer, relu: bool = True, upsample: bool = True, interpolate: str = "bilinear",
             normalize: bool = False, reshape=None):
    """XGrad-CAM (Fu et al. 2020): ``w_k = sum_ij g_kij A_kij / (sum_ij A_kij + 1e-7)``,
    ``map = sum_k w_k A_k`` (pytorch-grad-cam's ``XGradCAM``). Options as :func:`gradcam`.

    Example:
        >>> torch.vmap(fxattr.xgradcam(f, layer="layer4"), in_dims=(None, 0, 0))(params, images, labels)
    """
    def mapper(a, g):
        weights = (g * a / (_spatial_sum(a) + _eps(1e-7, a.dtype))).sum(dim=tuple(range(1, g.ndim)))
        return _weighted(weights, a)

    return _gradient_cam("xgradcam", f, layer, relu, upsample, interpolate, normalize, mapper, reshape)


@api_boundary("layercam")
def layercam(f, *, layer, relu: bool = True, upsample: bool = True, interpolate: str = "bilinear",
             normalize: bool = False, reshape=None):
    """LayerCAM (Jiang et al. 2021): position-wise weights, ``map = sum_k relu(g_k) * A_k``
    (pytorch-grad-cam's ``LayerCAM``). Options as :func:`gradcam`.

    Example:
        >>> torch.vmap(fxattr.layercam(f, layer="layer3"), in_dims=(None, 0, 0))(params, images, labels)
    """
    return _gradient_cam("layercam", f, layer, relu, upsample, interpolate, normalize,
                         lambda a, g: (torch.relu(g) * a).sum(0), reshape)


@api_boundary("cam")
def cam(f, *, layer, fc: str | None = None, relu: bool = False, upsample: bool = True,
        interpolate: str = "bilinear", normalize: bool = False, reshape=None):
    """CAM (Zhou et al. 2016) for a network ending in global average pooling and a linear layer.

    ``map = sum_k W[t, k] A_k`` with ``W`` the weight of the linear layer ``fc`` and ``t`` the
    target class; no gradient is taken. Grad-CAM of the same layer is this map divided by the number
    of positions. ``target`` must be a class index (int, 0-d tensor, or ``None`` for the argmax);
    CAM has no meaning for a callable target.

    Args:
        f: the function of ``fxattr.functionalize``.
        layer: the layer feeding the pooling (a module or node name, or a list of them).
        fc: the qualified name of the final ``nn.Linear`` (default: the last ``nn.Linear`` of the
            module); its weight is read from ``params`` at every call, so the map is differentiable
            w.r.t. it.
        relu, upsample, interpolate, normalize: as :func:`gradcam` (``relu=False`` by default: the
            original CAM is not rectified).

    Example:
        >>> explain = fxattr.cam(f, layer="layer4", fc="fc")
        >>> torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
    """
    where = "cam"
    check_model(where, f)
    _check_options(where, relu, upsample, interpolate, normalize)
    _check_reshape(where, reshape)
    names = _layer_names(where, f, layer)
    module = getattr(f, "module", None)
    if not isinstance(module, nn.Module):
        raise fail(where, "f must be the function of fxattr.functionalize")
    linears = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if fc is None:
        if not linears:
            raise fail(where, "the model has no nn.Linear; name the classifier's weight with fc=")
        fc = linears[-1]
    elif fc not in linears:
        raise fail(where, f"fc={fc!r} is not an nn.Linear of the model; its linear layers are "
                          f"{', '.join(map(repr, linears)) or 'none'}")
    splits = _split_layers(where, f, names)
    to_channels = _layout(where, f, reshape)
    key = f"{fc}.weight"

    def explain(params, x, target=None):
        check_target(where, target)
        if callable(target) and not isinstance(target, Tensor):
            raise fail(where, "target must be a class index (int, 0-d tensor) or None; CAM reads the "
                              "classifier's weight row of the class, a callable target has none")
        if key not in params:
            raise fail(where, f"params has no {key!r}")
        weight = params[key]
        if target is None:
            target = f(params, x).detach().reshape(-1).argmax()
        elif isinstance(target, int):
            if not 0 <= target < weight.shape[0]:
                raise fail(where, f"target {target} is out of range for the {weight.shape[0]} "
                                  f"classes of {fc!r}")
            target = torch.tensor(target, device=weight.device)
        index = check_index(where, target.to(weight.device), weight.shape[0],
                            f"the {weight.shape[0]} classes of {fc!r}")
        # weight[target] would read a negative index from the end (class K - 1): a checked row
        # that is NaN for an index out of range where it cannot be read (torch.compile)
        row = torch.vmap(lambda column: take(column, index), in_dims=1)(weight)
        maps = []
        for body, _ in splits:
            a = to_channels(body.layer, _activation(where, body, params, x, f))
            if a.shape[0] != row.shape[0]:
                raise fail(where, f"layer {body.layer!r} has {a.shape[0]} channels but {fc!r} takes "
                                  f"{row.shape[0]} features; CAM needs the layer feeding the global "
                                  "average pool before fc")
            maps.append(_weighted(row.to(a.dtype), a))
        return _finish(where, maps, x, relu, upsample, interpolate, normalize)

    config = {"layer": layer, "fc": fc, "relu": relu, "upsample": upsample,
              "interpolate": interpolate, "normalize": normalize, "reshape": reshape}
    return explainer(where, f, config, explain, integer_x=_takes_token_ids(f), empty="run")


@api_boundary("scorecam")
def scorecam(f, *, layer, relu: bool = True, upsample: bool = True, interpolate: str = "bilinear",
             normalize: bool = False, chunk_size: int | None = 8, reshape=None):
    """Score-CAM (Wang et al. 2020) in pytorch-grad-cam's form: channels weighted by the softmax of
    the target output on the input masked by each channel.

    Every activation channel ``A_k`` is upsampled to x's trailing spatial size (bilinear,
    ``align_corners=True``, as pytorch-grad-cam's ``UpsamplingBilinear2d``), min-max normalised
    (eps 1e-8) into a mask ``M_k``, and scored ``s_k = f(x * M_k)[t]``; ``map = sum_k
    softmax(s)_k A_k`` (the paper subtracts the baseline score, which the softmax ignores). The K
    masked copies are evaluated with ``torch.vmap``, ``chunk_size`` at a time, each building its own
    mask (memory does not grow with K). Under ``torch.vmap`` over a batch one forward holds
    ``batch x chunk_size`` rows; 8 by default, as the perturbation explainers (on CPU 8-16 rows per
    forward were fastest; 64 rows were 20% slower per row on resnet18). ``target=None`` is the
    argmax at x, held fixed. Options as :func:`gradcam`.

    Example:
        >>> explain = fxattr.scorecam(f, layer="layer4", chunk_size=64)
        >>> torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
    """
    where = "scorecam"
    check_model(where, f)
    _check_options(where, relu, upsample, interpolate, normalize)
    check_int(where, "chunk_size", chunk_size, 1, allow_none=True)
    _check_reshape(where, reshape)
    names = _layer_names(where, f, layer)
    splits = _split_layers(where, f, names)
    to_channels = _layout(where, f, reshape)

    def explain(params, x, target=None):
        check_target(where, target)
        if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
            raise fail(where, "x must be a floating-point tensor (masks multiply it), got "
                              f"{getattr(x, 'dtype', type(x).__name__)}")
        target = fixed_target(f, params, x, target)
        maps = []
        for body, _ in splits:
            a = to_channels(body.layer, _activation(where, body, params, x, f))
            k = a.ndim - 1
            if k not in (1, 2, 3) or x.ndim < k:
                raise fail(where, f"cannot build masks for x of shape {tuple(x.shape)} from an "
                                  f"activation of shape {tuple(a.shape)}")
            size = tuple(x.shape[-k:])
            mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[k]

            def score(channel):
                up = F.interpolate(channel[None, None], size=size, mode=mode, align_corners=True)[0, 0]
                lo, hi = up.min(), up.max()
                mask = (up - lo) / (hi - lo + _eps(1e-8, up.dtype))
                return select(where, f(params, x * mask), target)

            scores = torch.vmap(score, chunk_size=chunk_size)(a)
            maps.append(_weighted(torch.softmax(scores, 0), a))
        return _finish(where, maps, x, relu, upsample, interpolate, normalize)

    config = {"layer": layer, "relu": relu, "upsample": upsample, "interpolate": interpolate,
              "normalize": normalize, "chunk_size": chunk_size, "reshape": reshape}
    return explainer(where, f, config, explain, empty="run")


@api_boundary("guided_gradcam")
def guided_gradcam(f, *, layer, interpolate: str = "nearest"):
    """Guided Grad-CAM (Selvaraju et al. 2017): guided backpropagation times the rectified Grad-CAM
    map upsampled to x, as captum's ``GuidedGradCam`` (nearest-neighbour upsampling by default,
    captum's ``interpolate_mode``; guided backprop seeded with 1).

    For a tuple x (a model of several inputs) the one layer map is upsampled to each input's
    trailing spatial size and multiplies that input's guided backpropagation, as captum does for
    tuple inputs. An input with fewer dimensions than the map is an error (captum returns an empty
    tensor for it, with a warning).

    Example:
        >>> explain = fxattr.guided_gradcam(f, layer="layer4")
        >>> torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)  # x's shape
    """
    from fxattr.propagation import guided_backprop

    where = "guided_gradcam"
    check_model(where, f)
    check_choice(where, "interpolate", interpolate, _INTERPOLATE)
    if not isinstance(layer, (str, nn.Module)):
        raise fail(where, f"layer must be one module or graph node name (or submodule), got {layer!r}")
    grad_cam = gradcam(f, layer=layer, relu=True, upsample=True, interpolate=interpolate)
    layer_map = gradcam(f, layer=layer, relu=True, upsample=False)
    guided = guided_backprop(f, seed="one")

    def explain(params, x, target=None):
        check_target(where, target)
        if isinstance(x, Tensor):
            return guided(params, x, target) * grad_cam(params, x, target)
        m = layer_map(params, x, target)

        def one(g, leaf):
            if leaf.ndim < m.ndim + 1:
                raise fail(where, f"the layer's map of shape {tuple(m.shape)} cannot be upsampled to an input "
                                  f"of shape {tuple(leaf.shape)} (channels and {m.ndim} spatial dimensions needed)")
            return g * _upsample(where, m, leaf, interpolate).expand(leaf.shape)
        return tree_map(one, guided(params, x, target), x)

    return explainer(where, f, {"layer": layer, "interpolate": interpolate}, explain)
