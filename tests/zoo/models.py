"""The model zoo: today's torchvision and ``transformers`` architectures, small and random.

Every builder returns ``(model, xs)``: a model in eval mode and a batch of two inputs it accepts.
No weights are downloaded. So that the networks are not constant (a freshly initialised network
has zero biases, unit norm affines and running statistics of 0 / 1, which make LRP and DeepLIFT
degenerate), every model gets

- random biases (convolutions, linear layers, ``transformers``' biases): N(0, 0.1^2);
- weights initialised to zero (ViT's head) drawn N(0, 1 / fan_in); ConvNeXt's layer scales (1e-6 at
  init, which make every block nearly the identity) drawn U(0.1, 0.5);
- random norm affines (BatchNorm, LayerNorm, GroupNorm, RMSNorm): weight U(0.5, 1.5), bias N(0, 0.1^2);
- calibrated batch-norm statistics: a few random batches in train mode under ``torch.no_grad`` with
  ``momentum=None`` (cumulative averages), then eval — so each batch norm normalises what it sees.

Inputs are small (3x32x32 for most CNNs; 64x64 where a model needs it); ``transformers`` models are
wrapped as ``inputs_embeds -> logits`` (text) or ``pixel_values -> logits`` (ViT).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["BUILDERS", "PROPAGATION_METHODS", "baselines", "build", "calibrate_batch_norms", "make_explainer",
           "randomise"]

PROPAGATION_METHODS = ("lrp_epsilon", "lrp_epsilon_plus", "deep_taylor", "guided_backprop", "deconvnet", "deeplift",
                       "deeplift_shap", "pattern_attribution")

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _is_norm(module: nn.Module) -> bool:
    # transformers' LlamaRMSNorm (and torch's nn.RMSNorm) are norms with a weight only
    return isinstance(module, _NORMS) or "RMSNorm" in type(module).__name__


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random biases and random norm affines (test-side set-up of a model we built)."""
    gen = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if name.endswith("layer_scale"):
            parameter.copy_(0.1 + 0.4 * torch.rand(parameter.shape, generator=gen))
        elif name.endswith("weight") and parameter.ndim >= 2 and not parameter.any():
            fan_in = parameter[0].numel()
            parameter.copy_(torch.randn(parameter.shape, generator=gen) / fan_in ** 0.5)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        if _is_norm(module):
            if isinstance(weight, nn.Parameter):
                weight.copy_(0.5 + torch.rand(weight.shape, generator=gen))
            if isinstance(bias, nn.Parameter):
                bias.copy_(0.1 * torch.randn(bias.shape, generator=gen))
        elif isinstance(bias, nn.Parameter):
            bias.copy_(0.1 * torch.randn(bias.shape, generator=gen))
    return model


@torch.no_grad()
def calibrate_batch_norms(model: nn.Module, make_batch: Callable[[], torch.Tensor], steps: int = 3) -> nn.Module:
    """Running statistics from ``steps`` random batches (cumulative averages), then eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        probe = copy.deepcopy(model)  # dropout / stochastic depth act in train mode: run a copy
        probe_norms = [m for m in probe.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in probe_norms:
            m.reset_running_stats()
            m.momentum = None
        for m in probe.modules():  # only the batch norms train; dropout and stochastic depth do not
            m.train(isinstance(m, nn.modules.batchnorm._BatchNorm))
        for _ in range(steps):
            probe(make_batch())
        for m, p in zip(norms, probe_norms):
            m.running_mean.copy_(p.running_mean)
            m.running_var.copy_(p.running_var)
    return model.eval()


def _vision(constructor: Callable[[], nn.Module], size: int, wrap=None):
    def build(seed: int = 0):
        torch.manual_seed(seed)
        model = randomise(constructor(), seed)
        gen = torch.Generator().manual_seed(seed + 1)
        calibrate_batch_norms(model, lambda: torch.randn(8, 3, size, size, generator=gen))
        if wrap is not None:
            model = wrap(model).eval()
        xs = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed + 2))
        return model, xs
    return build


class SegmentationLogits(nn.Module):
    """A torchvision segmentation model as a classifier: ``out['out']`` summed over the pixels
    (one score per class), the usual way to explain a region-level class."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"].sum(dim=(-2, -1))


class TextLogits(nn.Module):
    """A ``transformers`` model as ``inputs_embeds (batch, tokens, dim) -> logits (batch, classes)``;
    causal language models give the next-token logits of the last position."""

    def __init__(self, model: nn.Module, last_token: bool):
        super().__init__()
        self.model = model
        self.last_token = last_token

    def forward(self, embeds):
        logits = self.model(inputs_embeds=embeds).logits
        return logits[:, -1] if self.last_token else logits


class ImageLogits(nn.Module):
    """A ``transformers`` image classifier as ``pixel_values -> logits``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels):
        return self.model(pixel_values=pixels).logits


def _text(make: Callable[[], nn.Module], dim: int, last_token: bool, tokens: int = 6):
    def build(seed: int = 0):
        torch.manual_seed(seed)
        model = randomise(make().eval(), seed)
        xs = torch.randn(2, tokens, dim, generator=torch.Generator().manual_seed(seed + 2))
        return TextLogits(model, last_token).eval(), xs
    return build


def _torchvision_builders() -> dict:
    import torchvision.models as tvm
    from torchvision.models import segmentation

    def maxvit():
        # maxvit_t's architecture; the partition size 7 needs 224x224 inputs (every stage's grid
        # divisible by 7), partition 2 takes 64x64
        return tvm.MaxVit(input_size=(64, 64), stem_channels=64, partition_size=2,
                          block_channels=[64, 128, 256, 512], block_layers=[2, 2, 5, 2], head_dim=32,
                          stochastic_depth_prob=0.2, num_classes=10)

    return {
        "resnet50": _vision(lambda: tvm.resnet50(num_classes=10), 32),
        "densenet121": _vision(lambda: tvm.densenet121(num_classes=10), 32),
        "mobilenet_v3_small": _vision(lambda: tvm.mobilenet_v3_small(num_classes=10), 32),
        "efficientnet_b0": _vision(lambda: tvm.efficientnet_b0(num_classes=10), 32),
        "regnet_y_400mf": _vision(lambda: tvm.regnet_y_400mf(num_classes=10), 32),
        "convnext_tiny": _vision(lambda: tvm.convnext_tiny(num_classes=10), 32),
        "swin_t": _vision(lambda: tvm.swin_t(num_classes=10), 32),
        "vit_b_16": _vision(lambda: tvm.vit_b_16(image_size=32, num_classes=10), 32),
        "maxvit_t": _vision(maxvit, 64),
        "shufflenet_v2_x0_5": _vision(lambda: tvm.shufflenet_v2_x0_5(num_classes=10), 32),
        "googlenet": _vision(lambda: tvm.googlenet(num_classes=10, aux_logits=False, init_weights=True), 32),
        "squeezenet1_0": _vision(lambda: tvm.squeezenet1_0(num_classes=10), 32),
        "fcn_resnet50": _vision(lambda: segmentation.fcn_resnet50(
            weights=None, weights_backbone=None, num_classes=5, aux_loss=False), 32, SegmentationLogits),
        "deeplabv3_mobilenet_v3_large": _vision(lambda: segmentation.deeplabv3_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=5, aux_loss=False), 32, SegmentationLogits),
    }


def _transformers_builders() -> dict:
    import transformers as hf

    def bert():
        config = hf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=16, num_labels=3)
        return hf.BertForSequenceClassification(config)

    def gpt2():
        config = hf.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16, bos_token_id=0,
                               eos_token_id=0)
        return hf.GPT2LMHeadModel(config)

    def llama():
        config = hf.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
        return hf.LlamaForCausalLM(config)

    def vit(seed: int = 0):
        torch.manual_seed(seed)
        config = hf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=32, num_labels=3)
        model = randomise(hf.ViTForImageClassification(config).eval(), seed)
        xs = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed + 2))
        return ImageLogits(model).eval(), xs

    return {
        "hf_bert": _text(bert, 16, last_token=False),
        "hf_gpt2": _text(gpt2, 16, last_token=True),
        "hf_llama": _text(llama, 16, last_token=True),
        "hf_vit": vit,
    }


TORCHVISION = ("resnet50", "densenet121", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf",
               "convnext_tiny", "swin_t", "vit_b_16", "maxvit_t", "shufflenet_v2_x0_5", "googlenet",
               "squeezenet1_0", "fcn_resnet50", "deeplabv3_mobilenet_v3_large")
TRANSFORMERS = ("hf_bert", "hf_gpt2", "hf_llama", "hf_vit")
BUILDERS = TORCHVISION + TRANSFORMERS


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float64):
    """``(model, xs)`` for a zoo name, in ``dtype``."""
    table = _torchvision_builders() if name in TORCHVISION else _transformers_builders()
    model, xs = table[name](seed)
    return model.to(dtype), xs.to(dtype)


def baselines(xs: torch.Tensor) -> torch.Tensor:
    """Two fixed baselines for DeepLiftShap (half-scale noise)."""
    gen = torch.Generator().manual_seed(7)
    return 0.5 * torch.randn((2,) + xs.shape[1:], generator=gen, dtype=xs.dtype)


def make_explainer(method: str, f, params, xs):
    """The zoo's explainer for ``method`` (``"gradient"`` or one of ``PROPAGATION_METHODS``)."""
    import fxattr

    if method == "gradient":
        return fxattr.gradient(f)
    if method == "lrp_epsilon":
        return fxattr.lrp(f, rule="epsilon")
    if method == "lrp_epsilon_plus":
        return fxattr.lrp(f, composite="epsilon_plus")
    if method == "deep_taylor":
        return fxattr.deep_taylor(f)
    if method == "guided_backprop":
        return fxattr.guided_backprop(f)
    if method == "deconvnet":
        return fxattr.deconvnet(f)
    if method == "deeplift":
        return fxattr.deeplift(f, baseline=0.0)
    if method == "deeplift_shap":
        return fxattr.deeplift_shap(f, baselines=baselines(xs))
    if method == "pattern_attribution":
        gen = torch.Generator().manual_seed(3)
        data = [torch.randn((4,) + xs.shape[1:], generator=gen, dtype=xs.dtype) for _ in range(2)]
        return fxattr.pattern_attribution(f).fit(params, data)
    raise ValueError(f"unknown zoo method {method!r}")
