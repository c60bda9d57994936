#!/usr/bin/env python
"""Generation attribution against the per-token loop, in ONE process (fxattr.text).

A tiny random GPT-2 (hidden 32, 2 layers, 2 heads, vocabulary 128; from_config, eval mode), one
prompt of ``--prompt`` tokens followed by ``T`` tokens; every generated token's log-probability
explained with the same method two ways, interleaved repeat by repeat:

- **loop**: ``fxattr.text.attribute(method)`` once per generated token with the target
  ``fxattr.text.next_token(x_s, position=s - 1)`` (a forward and a backward per token), what a user
  writes without generation attribution;
- **vmapped**: ``fxattr.text.generation_attribution(method)``: one forward, ``vjp`` once, ``vmap``
  over the ``T`` output cotangents (all at once, and in chunks of 8 with IG's points 4 at a time).

Prints medians (CPU time of the process, 1 torch thread), the ratio loop / vmapped and the largest
difference between the two results (they must agree), and a markdown table.

    python bench/text_bench.py                 # T = 8, 32, 64
    python bench/text_bench.py --lengths 32 --repeats 3

``--graph`` measures graph-based explainers through the front door instead (DeepLIFT, AttnLRP,
CP-LRP, guided backprop on a padded batch of 8 sequences of mixed lengths, tiny GPT-2 and BERT):
the first call at a length (the dynamo capture), then per-batch medians as ratios to
``fxattr.gradient`` through the same door, and to the same explainer on
``fxattr.functionalize(model, input_shape=)`` applied to the embeddings (the door's own cost).

    python bench/text_bench.py --graph --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
)
from transformers.utils import logging as hf_logging

import fxattr

hf_logging.set_verbosity_error()


def tiny_gpt2(dtype=torch.float32):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_positions=160, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")
    return GPT2LMHeadModel(config).to(dtype).eval()


def tiny_bert(dtype=torch.float32):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3, pad_token_id=0,
                        attn_implementation="sdpa")
    return BertForSequenceClassification(config).to(dtype).eval()


class Logits(nn.Module):
    """embeddings -> logits, for fxattr.functionalize(..., input_shape=) (the door-less path)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(inputs_embeds=x).logits


def graph_main(args, clock):
    """Graph-based explainers through the front door (see the module doc)."""
    rows = []
    batch, length = 8, 16
    for kind, build in (("gpt2", tiny_gpt2), ("bert", tiny_bert)):
        model = build()
        f, params = fxattr.text.functionalize(model)
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(3, 128, (batch, length), generator=generator)
        lengths = torch.tensor([16, 9, 12, 16, 5, 14, 11, 16])
        mask = (torch.arange(length)[None] < lengths[:, None]).long()
        ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
        if kind == "gpt2":  # a logit difference at the last real token
            targets = fxattr.text.contrast(torch.randint(3, 128, (batch,), generator=generator),
                                           torch.randint(3, 128, (batch,), generator=generator))
            flat = length * 128 - 128 + 7  # door-less: one logit of the last position (no mask there)
        else:
            targets = fxattr.text.class_logit(torch.arange(batch) % 3)
            flat = 1
        g, g_params = fxattr.functionalize(Logits(model), input_shape=(length, 32))
        embeddings = torch.vmap(f.embed, in_dims=(None, 0))(params, ids)
        methods = {"gradient": (fxattr.gradient, {}), "deeplift (pad)": (fxattr.deeplift, {"baseline": "pad"}),
                   "deeplift (zeros)": (fxattr.deeplift, {"baseline": "zeros"}),
                   "lrp attnlrp": (fxattr.lrp, {"composite": "attnlrp"}),
                   "lrp cp_lrp": (fxattr.lrp, {"composite": "cp_lrp"}),
                   "guided_backprop": (fxattr.guided_backprop, {})}
        door, plain = {}, {}
        for name, (method, config) in methods.items():
            explain = torch.vmap(fxattr.text.attribute(method, f, **config), in_dims=(None, 0, 0, 0))
            door[name] = partial(explain, params, ids, mask, targets)
            plain_config = {"baseline": 0.0} if "baseline" in config else config  # pad: ~ zeros
            inner = torch.vmap(method(g, **plain_config), in_dims=(None, 0, None))
            plain[name] = partial(inner, g_params, embeddings, flat)
        first = {}
        for name, fn in door.items():  # warm-up; the first graph method at this length captures it
            first[name], _ = timed(fn, clock)
            plain[name]()
        times = {(w, k): [] for w in ("door", "plain") for k in methods}
        for _ in range(args.repeats):
            for name in methods:
                times["door", name].append(timed(door[name], clock)[0])
                times["plain", name].append(timed(plain[name], clock)[0])
        floor = statistics.median(times["door", "gradient"])
        for name in methods:
            d, q = statistics.median(times["door", name]), statistics.median(times["plain", name])
            rows.append((kind, name, first[name], d, d / floor, d / q))
            print(f"{kind:5s} {name:16s} first call {first[name]:6.2f} s  {d * 1e3:8.1f} ms  "
                  f"/gradient {d / floor:5.2f}x  door/plain {d / q:5.2f}x", flush=True)
    print()
    print(f"- torch {torch.__version__}; 1 thread; clock: {args.clock}; medians over {args.repeats} "
          f"interleaved repeats; batch {batch} padded to {length} tokens (lengths 5-16); tiny GPT-2 / BERT "
          f"(hidden 32, 2 layers, 2 heads, vocab 128, sdpa math kernel), float32")
    print()
    print("| model | method | first call (capture) | batch of 8 | / gradient (door) | door / functionalize |")
    print("|---|---|---:|---:|---:|---:|")
    for kind, name, first_s, d, ratio, overhead in rows:
        print(f"| {kind} | {name} | {first_s:.2f} s | {d * 1e3:.1f} ms | {ratio:.2f}x | {overhead:.2f}x |")
    return rows


def per_token_loop(per_token, params, ids, start):
    """The per-token loop: one explanation (a forward and a backward) per generated token."""
    return torch.stack([per_token(params, ids, None, fxattr.text.next_token(ids[s], s - 1))
                        for s in range(start, len(ids))])


def timed(fn, clock):
    start = clock()
    out = fn()
    return clock() - start, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="8,32,64")
    p.add_argument("--prompt", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--methods", default="gradient,input_x_gradient,integrated_gradients")
    p.add_argument("--steps", type=int, default=8, help="integration points for integrated_gradients")
    p.add_argument("--clock", choices=("process", "wall"), default="process")
    p.add_argument("--graph", action="store_true", help="graph-based explainers through the front door")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    if args.graph:
        return graph_main(args, clock)
    model = tiny_gpt2()
    f, params = fxattr.text.functionalize(model)
    factories = {"gradient": fxattr.gradient, "input_x_gradient": fxattr.input_x_gradient,
                 "integrated_gradients": fxattr.integrated_gradients}
    rows = []
    for length in [int(t) for t in args.lengths.split(",")]:
        torch.manual_seed(1)
        ids = torch.randint(3, 128, (args.prompt + length,))
        start = args.prompt
        for name in args.methods.split(","):
            extra = {"steps": args.steps, "baseline": "zeros"} if name == "integrated_gradients" else {}
            # the per-token loop reduces with the same rule as the vmapped version (sum over D)
            per_token = fxattr.text.attribute(factories[name], f, **extra)
            all_at_once = fxattr.text.generation_attribution(f, method=name, chunk_size=None,
                                                             steps_chunk_size=None, **extra)
            chunked = fxattr.text.generation_attribution(f, method=name, chunk_size=8, steps_chunk_size=4, **extra)
            variants = {
                "loop": partial(per_token_loop, per_token, params, ids, start),
                "vmapped (all T)": partial(all_at_once, params, ids, None, start),
                "vmapped (chunks of 8)": partial(chunked, params, ids, None, start),
            }
            times = {k: [] for k in variants}
            results = {}
            for k, fn in variants.items():  # warm-up
                results[k] = fn()
            for _ in range(args.repeats):
                for k, fn in variants.items():
                    seconds, _ = timed(fn, clock)
                    times[k].append(seconds)
            loop = statistics.median(times["loop"])
            for k in variants:
                median = statistics.median(times[k])
                error = (results[k] - results["loop"]).abs().max().item()
                scale = results["loop"].abs().max().item()
                rows.append((name, length, k, median, loop / median, error / scale))
                print(f"{name:22s} T={length:3d} {k:22s} {median * 1e3:9.1f} ms  loop/this {loop / median:6.1f}x"
                      f"  max |diff| / max |loop| {error / scale:.1e}", flush=True)
    print()
    print(f"- torch {torch.__version__}; 1 thread; clock: {args.clock}; medians over {args.repeats} "
          f"interleaved repeats; tiny GPT-2 (hidden 32, 2 layers, 2 heads, vocab 128, sdpa math kernel), "
          f"prompt {args.prompt} tokens, float32; IG {args.steps} Gauss-Legendre points, baseline zeros")
    print()
    print("| method | T | variant | median | loop / variant | max rel. diff to loop |")
    print("|---|---:|---|---:|---:|---:|")
    for name, length, k, median, ratio, error in rows:
        print(f"| {name} | {length} | {k} | {median * 1e3:.1f} ms | {ratio:.1f}x | {error:.1e} |")
    return rows


if __name__ == "__main__":
    main()
