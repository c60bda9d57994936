"""Dynamo captures: cut at a layer, and one capture for every sequence length (issue 9 / 12, session 4).

Three tables, tiny random Hugging Face models (hidden 32, 2 layers, 2 heads, eager attention,
float32), batch 8, 1 torch thread, process CPU time, medians over interleaved repeats:

1. capture: ``fxattr.graph.trace`` with ``input_shape=(16, 32)`` (fixed length) and
   ``(None, 32)`` (the length symbolic), each on a fresh ``functionalize``;
2. free / fixed: a graph explainer (DeepLIFT, AttnLRP) on the free-length capture against the same
   explainer on a capture fixed to the batch's length, at two lengths (the symbolic shape reads
   are the only difference);
3. split methods: Grad-CAM on HF ViT (``vit.layers.1.layernorm_before``) and
   ``layer_gradient_x_activation`` on BERT's ``encoder.layer.0`` through ``fxattr.graph.split`` of
   the dynamo capture, as a ratio to ``fxattr.gradient`` on the same function (the floor: one
   forward and one backward).

    python bench/dynamo_split_bench.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import fxattr


class Logits(nn.Module):
    def __init__(self, model, name):
        super().__init__()
        self.model, self.name = model, name

    def forward(self, x):
        return self.model(**{self.name: x}).logits


def models():
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    common = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, attn_implementation="eager")
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(hidden_size=32, vocab_size=64, **common))
    gpt2 = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=64, pad_token_id=0, attn_implementation="eager"))
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, image_size=16, patch_size=4, num_channels=3, num_labels=10, **common))
    return {"bert": Logits(bert.eval(), "inputs_embeds").eval(), "gpt2": Logits(gpt2.eval(), "inputs_embeds").eval(),
            "vit": Logits(vit.eval(), "pixel_values").eval()}


def cpu_time(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def median_times(fns: dict, repeats: int) -> dict:
    for fn in fns.values():  # warm up (first calls build programs)
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(cpu_time(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    zoo = models()
    print(f"- torch {torch.__version__}; 1 thread; process CPU time; medians over {args.repeats} interleaved "
          "repeats; batch 8; float32")

    print("\n| model | capture, fixed length 16 | capture, free length |")
    print("|---|---:|---:|")
    for name in ("bert", "gpt2"):
        fixed, _ = fxattr.functionalize(zoo[name], input_shape=(16, 32))
        free, _ = fxattr.functionalize(zoo[name], input_shape=(None, 32))
        print(f"| {name} | {cpu_time(lambda: fxattr.graph.trace(fixed)):.2f} s | "
              f"{cpu_time(lambda: fxattr.graph.trace(free)):.2f} s |")

    print("\n| model | method | length | fixed capture | free capture | free / fixed |")
    print("|---|---|---:|---:|---:|---:|")
    for name in ("bert", "gpt2"):
        free, params = fxattr.functionalize(zoo[name], input_shape=(None, 32))
        methods = {"deeplift": lambda g: fxattr.deeplift(g), "lrp attnlrp": lambda g: fxattr.lrp(g, composite="attnlrp")}
        built_free = {m: torch.vmap(make(free), in_dims=(None, 0, 0)) for m, make in methods.items()}
        for length in (8, 16):
            fixed, _ = fxattr.functionalize(zoo[name], input_shape=(length, 32))
            x = torch.randn(8, length, 32, generator=torch.Generator().manual_seed(length))
            t = torch.arange(8) % 2
            fns = {}
            for m, make in methods.items():
                built_fixed = torch.vmap(make(fixed), in_dims=(None, 0, 0))
                fns[(m, "fixed")] = lambda e=built_fixed: e(params, x, t)
                fns[(m, "free")] = lambda e=built_free[m]: e(params, x, t)
            times = median_times(fns, args.repeats)
            for m in methods:
                a, b = times[(m, "fixed")], times[(m, "free")]
                print(f"| {name} | {m} | {length} | {1e3 * a:.1f} ms | {1e3 * b:.1f} ms | {b / a:.2f}x |")

    print("\n| model | method (layer) | gradient | method | / gradient |")
    print("|---|---|---:|---:|---:|")
    cases = [
        ("vit", (3, 16, 16), "gradcam (vit.layers.1.layernorm_before)",
         lambda g: fxattr.gradcam(g, layer="model.vit.layers.1.layernorm_before")),
        ("bert", (16, 32), "layer_gradient_x_activation (bert.encoder.layer.0)",
         lambda g: fxattr.layers.layer_gradient_x_activation(g, layer="model.bert.encoder.layer.0")),
    ]
    for name, shape, label, make in cases:
        f, params = fxattr.functionalize(zoo[name], input_shape=shape)
        x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(1))
        t = torch.arange(8) % 2
        gradient = torch.vmap(fxattr.gradient(f), in_dims=(None, 0, 0))
        method = torch.vmap(make(f), in_dims=(None, 0, 0))
        times = median_times({"gradient": lambda: gradient(params, x, t), "method": lambda: method(params, x, t)},
                             args.repeats)
        print(f"| {name} | {label} | {1e3 * times['gradient']:.1f} ms | {1e3 * times['method']:.1f} ms | "
              f"{times['method'] / times['gradient']:.2f}x |")


if __name__ == "__main__":
    main()
