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
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

import fxattr

hf_logging.set_verbosity_error()


def tiny_gpt2(dtype=torch.float32):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_positions=160, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")
    return GPT2LMHeadModel(config).to(dtype).eval()


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
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    clock = time.process_time if args.clock == "process" else time.perf_counter
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
