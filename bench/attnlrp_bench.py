#!/usr/bin/env python
"""AttnLRP / CP-LRP cost as a ratio to the gradient floor, and LXT 2.1 on the same model and input,
in ONE process (issue 12, item 8).

Tiny random Hugging Face models (eager attention, float32, eval): GPT-2 and BERT (hidden 32,
2 layers, 4 heads, MLP 64, 16 tokens of ``inputs_embeds``) and ViT (hidden 32, 2 layers, 4 heads,
16x16 images of 3 channels in 4x4 patches: 17 tokens), a batch of 8, captured once with
``fxattr.functionalize(..., input_shape=...)``. Timed (CPU time of the process, 1 torch thread,
median of ``--repeats`` interleaved repeats):

- **floor**: ``torch.vmap(fxattr.gradient(f))`` over the batch (one forward and one backward);
- **attnlrp / cp_lrp**: ``torch.vmap(fxattr.lrp(f, composite=...))`` over the batch: the gradient
  form (one vector-Jacobian product of a modified forward, ``propagation/_gradient_form.py``);
- **walk**: the same presets by the engine's node-by-node reverse walk (what ``fxattr.lrp`` ran
  before the gradient form; the A/B in one process);
- **autograd**: the model's own batched forward + backward (what LXT's time compares to);
- **lxt attnlrp / lxt cp_lrp**: LXT's efficient-mode patches (``tests/propagation/lxt_reference``,
  applied after fxattr's timings and removed between variants), the batched forward + backward,
  relevance ``x * grad``.

Also prints the largest relative difference between fxattr's and LXT's relevance per model, and between
the gradient form and the walk (float32).

    python bench/attnlrp_bench.py               # --repeats 5
    python bench/attnlrp_bench.py --best        # the fastest repeat (a loaded machine)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from transformers.utils import logging as hf_logging

import fxattr
from fxattr.propagation._engine import Plan
from fxattr.propagation._transformers import transformer_composite

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "propagation"))
import lxt_reference

hf_logging.set_verbosity_error()
BATCH, LENGTH = 8, 16
VARIANTS = ("attnlrp", "cp_lrp")


def build(kind: str):
    import transformers
    torch.manual_seed(0)
    common = {"num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
              "attn_implementation": "eager"}
    if kind == "gpt2":
        model = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_inner=64, vocab_size=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=1, num_labels=3, attn_implementation="eager"))
        shape, name = (LENGTH, 32), "inputs_embeds"
    elif kind == "bert":
        model = transformers.BertForSequenceClassification(transformers.BertConfig(
            hidden_size=32, vocab_size=64, num_labels=3, **common))
        shape, name = (LENGTH, 32), "inputs_embeds"
    else:
        model = transformers.ViTForImageClassification(transformers.ViTConfig(
            hidden_size=32, image_size=16, patch_size=4, num_channels=3, num_labels=3, **common))
        shape, name = (3, 16, 16), "pixel_values"
    model = model.eval()
    x = torch.randn(BATCH, *shape, generator=torch.Generator().manual_seed(1))
    target = torch.arange(BATCH) % 3
    return model, x, target, name


def cpu_time(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def lxt_relevance(model, name, x, target):
    x = x.clone().requires_grad_(True)
    logits = lxt_reference.Logits(model, name)(x)
    logits.gather(1, target[:, None]).sum().backward()
    return x * x.grad


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--best", action="store_true", help="report the fastest repeat instead of the median")
    args = parser.parse_args()
    torch.set_num_threads(1)
    kinds = ("gpt2", "bert", "vit")
    setups, times, ours, walk_difference = {}, {}, {}, {}
    for kind in kinds:
        model, x, target, name = build(kind)
        f, params = fxattr.functionalize(lxt_reference.Logits(model, name).eval(), input_shape=tuple(x.shape[1:]))
        calls = {"floor": torch.vmap(fxattr.gradient(f), in_dims=(None, 0, 0))}
        calls.update({v: torch.vmap(fxattr.lrp(f, composite=v), in_dims=(None, 0, 0)) for v in VARIANTS})
        for v in VARIANTS:
            assert fxattr.lrp(f, composite=v).gradient_form is True
            plan = Plan(f, "lrp", transformer_composite(v))
            calls[f"{v} walk"] = torch.vmap(lambda p, x, t, plan=plan: plan.explain(p, x, t), in_dims=(None, 0, 0))

        def autograd(model=model, name=name, x=x, target=target):
            return lxt_relevance(model, name, x, target)
        setups[kind] = (model, name, x, target)
        runs = {label: (lambda c=call, p=params, x=x, t=target: c(p, x, t)) for label, call in calls.items()}
        runs["autograd"] = autograd
        for label, run in runs.items():
            run()  # warm-up (first call classifies / builds the program)
        for _ in range(args.repeats):
            for label, run in runs.items():
                times.setdefault((kind, label), []).append(cpu_time(run))
        ours[kind] = {v: runs[v]() for v in VARIANTS}
        for v in VARIANTS:  # the gradient form equals the walk (float32 here)
            walk_difference[kind, v] = ((ours[kind][v] - runs[f"{v} walk"]()).abs().max()
                                        / ours[kind][v].abs().max()).item()
    difference = {}
    for variant in VARIANTS:
        for kind in kinds:
            lxt_reference.patch(kind, variant)
        for kind in kinds:
            model, name, x, target = setups[kind]
            run = lambda m=model, n=name, x=x, t=target: lxt_relevance(m, n, x, t)
            reference = run()
            mine = ours[kind][variant]
            difference[kind, variant] = ((mine - reference).flatten(1).abs().amax(1)
                                         / reference.flatten(1).abs().amax(1)).max().item()
            for _ in range(args.repeats):
                times.setdefault((kind, f"lxt {variant}"), []).append(cpu_time(run))
        lxt_reference.unpatch()

    if args.best:  # the fastest repeat: less sensitive to other processes on a loaded machine
        median = {key: min(v) for key, v in times.items()}
    else:
        median = {key: statistics.median(v) for key, v in times.items()}
    print("| model | floor (fxattr.gradient) | AttnLRP | CP-LRP | AttnLRP / floor | CP-LRP / floor | "
          "walk AttnLRP / floor | walk CP-LRP / floor | autograd | LXT AttnLRP | LXT CP-LRP | "
          "LXT AttnLRP / autograd | LXT AttnLRP / floor | max rel. diff to LXT (float32) | to the walk |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind in kinds:
        m = {label: median[kind, label] for label in ("floor", "attnlrp", "cp_lrp", "attnlrp walk", "cp_lrp walk",
                                                      "autograd", "lxt attnlrp", "lxt cp_lrp")}
        print(f"| {kind} | {m['floor'] * 1e3:.1f} ms | {m['attnlrp'] * 1e3:.1f} ms | {m['cp_lrp'] * 1e3:.1f} ms | "
              f"{m['attnlrp'] / m['floor']:.2f}x | {m['cp_lrp'] / m['floor']:.2f}x | "
              f"{m['attnlrp walk'] / m['floor']:.2f}x | {m['cp_lrp walk'] / m['floor']:.2f}x | "
              f"{m['autograd'] * 1e3:.1f} ms | "
              f"{m['lxt attnlrp'] * 1e3:.1f} ms | {m['lxt cp_lrp'] * 1e3:.1f} ms | "
              f"{m['lxt attnlrp'] / m['autograd']:.2f}x | {m['lxt attnlrp'] / m['floor']:.2f}x | "
              f"{max(difference[kind, v] for v in VARIANTS):.1e} | "
              f"{max(walk_difference[kind, v] for v in VARIANTS):.1e} |")


if __name__ == "__main__":
    main()
