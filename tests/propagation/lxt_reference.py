"""Tiny seeded transformers and LXT 2.1's efficient-mode relevance on them, in a separate process.

LXT patches transformers' modules and classes globally (and its own ``lxt.efficient`` package does
not import under transformers 5), so the tests never import it: they run this file as a script,
``python lxt_reference.py VARIANT OUT``, which builds the same model as :func:`build`,
applies LXT's rules (its own functions: ``identity_rule_implicit``, ``divide_gradient``,
``stop_gradient``, its LayerNorm / RMSNorm / gated-MLP forwards and attention wrappers) and saves
``{(kind, dtype): {"x": inputs, "target": targets, "relevance": inputs * grad}}`` to OUT.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

KINDS = ("bert", "gpt2", "llama", "vit")
BATCH, LENGTH = 3, 5


def build(kind: str, dtype: torch.dtype, attn: str = "eager"):
    """``(model, x, target, input_name)``: a tiny random model (weights drawn with seed 0, scaled so
    that no layer is near-linear), a batch of inputs and target classes."""
    import transformers

    torch.manual_seed(0)
    common = {"num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 16,
              "attn_implementation": attn}
    if kind == "bert":
        model = transformers.BertForSequenceClassification(
            transformers.BertConfig(hidden_size=8, vocab_size=20, num_labels=3, **common))
        shape, name = (LENGTH, 8), "inputs_embeds"
    elif kind == "gpt2":
        model = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
            n_embd=8, n_layer=2, n_head=2, n_inner=16, vocab_size=20, pad_token_id=0, num_labels=3,
            bos_token_id=1, eos_token_id=1, attn_implementation=attn))
        shape, name = (LENGTH, 8), "inputs_embeds"
    elif kind == "llama":
        model = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
            hidden_size=8, vocab_size=20, num_key_value_heads=1, pad_token_id=0, num_labels=3, **common))
        shape, name = (LENGTH, 8), "inputs_embeds"
    elif kind == "vit":
        model = transformers.ViTForImageClassification(transformers.ViTConfig(
            hidden_size=8, image_size=8, patch_size=4, num_channels=2, num_labels=3, **common))
        shape, name = (2, 8, 8), "pixel_values"
    else:
        raise ValueError(kind)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, p in model.named_parameters():
            norm_weight = key.endswith("weight") and ("norm" in key.lower() or ".ln_" in key)
            p.copy_(torch.randn(p.shape, generator=generator) * (0.2 if norm_weight else 0.4) + norm_weight)
    model = model.to(dtype).eval()
    x = torch.randn(BATCH, *shape, generator=generator).to(dtype)
    target = torch.tensor([0, 1, 2][:BATCH])
    return model, x, target, name


class Logits(nn.Module):
    """The model as ``x -> logits`` (what fxattr.functionalize captures)."""

    def __init__(self, model, name):
        super().__init__()
        self.model, self.name = model, name

    def forward(self, x):
        return self.model(**{self.name: x}).logits


_SAVED: list = []


def _set(owner, name: str, value) -> None:
    _SAVED.append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)


def patch(kind: str, variant: str) -> None:
    """Applies LXT's rules of ``variant`` to the transformers classes of ``kind`` (globally)."""
    import importlib
    import os
    import types

    import lxt
    # lxt/efficient/__init__.py imports its transformers-4 BERT file: load the package's modules
    # without running it
    root = os.path.join(os.path.dirname(lxt.__file__), "efficient")
    for package, path in (("lxt.efficient", root), ("lxt.efficient.models", os.path.join(root, "models"))):
        module = types.ModuleType(package)
        module.__path__ = [path]
        sys.modules[package] = module
    patches = importlib.import_module("lxt.efficient.patches")
    rules = importlib.import_module("lxt.efficient.rules")
    modeling = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
    # the attention wrappers of patch_attention / patch_cp_attention, on the eager function only
    # (replacing ALL_ATTENTION_FUNCTIONS with a dict breaks transformers 5)
    wrap = patches.cp_wrap_attention_forward if variant == "cp_lrp" else patches.wrap_attention_forward
    _set(modeling, "eager_attention_forward", wrap(modeling.eager_attention_forward))
    _set(nn.Dropout, "forward", patches.dropout_forward)
    identity = rules.identity_rule_implicit
    if kind == "llama":
        _set(modeling.LlamaRMSNorm, "forward", patches.rms_norm_forward)
        _set(modeling.LlamaMLP, "forward",
             patches.cp_gated_mlp_forward if variant == "cp_lrp" else patches.gated_mlp_forward)
        return
    _set(nn.LayerNorm, "forward", patches.layer_norm_forward)
    if kind == "gpt2":
        _set(modeling.GPT2MLP, "forward", importlib.import_module("lxt.efficient.models.gpt2").mlp_forward)
    elif kind == "bert":
        _set(modeling.BertIntermediate, "forward", lambda self, h: identity(self.intermediate_act_fn, self.dense(h)))
        _set(modeling.BertPooler, "forward", lambda self, h: identity(self.activation, self.dense(h[:, 0])))
    elif kind == "vit":
        _set(modeling.ViTMLP, "forward", lambda self, h: self.fc2(identity(self.activation_fn, self.fc1(h))))


def unpatch() -> None:
    """Undoes every patch of :func:`patch` (the bench times both variants in one process)."""
    while _SAVED:
        owner, name, old = _SAVED.pop()
        setattr(owner, name, old)
    _patched.clear()


_patched: set = set()


def reference(kind: str, variant: str, dtype: torch.dtype) -> dict:
    """LXT's relevance (gradient x input of the patched model, seeded with 1 at the target logit)."""
    if kind not in _patched:
        patch(kind, variant)
        _patched.add(kind)
    model, x, target, name = build(kind, dtype)
    x = x.clone().requires_grad_(True)
    logits = Logits(model, name)(x)
    logits.gather(1, target[:, None]).sum().backward()
    return {"x": x.detach(), "target": target, "relevance": (x * x.grad).detach(), "logits": logits.detach()}


def references(variant: str, dtypes=(torch.float64, torch.float32)) -> dict:
    """``{(kind, dtype name): reference(kind, variant, dtype)}`` for every kind (LXT's patches of one
    variant touch disjoint classes per kind, so one process serves them all)."""
    return {(kind, str(dtype).removeprefix("torch.")): reference(kind, variant, dtype)
            for kind in KINDS for dtype in dtypes}


if __name__ == "__main__":
    torch.set_num_threads(1)
    variant_, out_ = sys.argv[1:3]
    torch.save(references(variant_), out_)
