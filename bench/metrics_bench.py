#!/usr/bin/env python
"""fxattr.metrics against Quantus 0.6.0: faithfulness metrics, same model, batch and settings, ONE process.

For pixel_flipping, region_perturbation, road and faithfulness_correlation the script times
Quantus's metric (``metric(model=..., x_batch=..., a_batch=...)``, numpy, a Python loop over the
perturbation steps with one model call each) and fxattr's (``torch.vmap`` of the per-example
metric over the batch: one chunked, vmapped forward of all perturbed copies), interleaved repeat by
repeat so that CPU contention hits both alike, on a small CNN (random weights, float32, eval mode)
at 1x28x28 with batch 8. It reports the median process CPU time (1 thread) of each, the speed
ratio, and checks that both give the same numbers: the curves of the deterministic metrics, and
ROAD (noise 0) and faithfulness correlation on the same random subsets (Quantus's
``np.random.choice`` replaced by a replay of fxattr's subsets for that one call).

    python bench/metrics_bench.py --quick        # smoke test (a few seconds)
    python bench/metrics_bench.py                # 1x28x28, batch 8 (a couple of minutes)
    python bench/metrics_bench.py --size 32 --channels 3 --repeats 5
    python bench/metrics_bench.py --compile      # also torch.compile (minutes of compile time)

The "forward floor" column is one plain-torch forward of as many images as the metric evaluates
(64 at a time): the arithmetic no non-incremental implementation can avoid. Where Quantus's time is
close to it (the model, not the loop, dominates), a batched implementation cannot be much faster.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
from torch import nn

if not hasattr(np, "trapz"):  # Quantus 0.6.0 calls np.trapz, removed in numpy 2.4
    np.trapz = np.trapezoid

import quantus

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fxattr
from fxattr import metrics


def small_cnn(channels: int, size: int, classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * (size // 4) ** 2, classes)).eval()


def cases(args, n_features):
    """name -> (Quantus metric, fxattr metric, Quantus call keywords, replay?)."""
    fis = args.features_in_step
    return {
        "pixel_flipping": (
            quantus.PixelFlipping(features_in_step=fis, disable_warnings=True),
            metrics.pixel_flipping, {"features_in_step": fis, "chunk_size": args.chunk}, {}),
        "region_perturbation": (
            quantus.RegionPerturbation(patch_size=args.patch, regions_evaluation=100, disable_warnings=True),
            metrics.region_perturbation,
            {"patch_size": args.patch, "regions_evaluation": 100, "chunk_size": args.chunk}, {}),
        "road": (
            quantus.ROAD(noise=0.0, disable_warnings=True, return_aggregate=False),
            metrics.road, {"noise": 0.0, "chunk_size": args.chunk}, {}),
        "faithfulness_correlation": (
            quantus.FaithfulnessCorrelation(nr_runs=args.runs, subset_size=args.subset,
                                            disable_warnings=True, return_aggregate=False),
            metrics.faithfulness_correlation,
            {"nr_runs": args.runs, "subset_size": args.subset, "chunk_size": args.chunk}, {"subsets": True}),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1x16x16, batch 4, 1 repeat")
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--features-in-step", type=int, default=1)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--subset", type=int, default=224)
    p.add_argument("--chunk", type=int, default=64, help="fxattr chunk_size (0: all copies at once)")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile(torch.vmap(metric)) (compile time excluded, reported)")
    p.add_argument("--metrics", default="pixel_flipping,region_perturbation,road,faithfulness_correlation")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.repeats, args.subset, args.runs = 16, 4, 1, 32, 20
    args.chunk = args.chunk or None
    torch.set_num_threads(args.threads)

    model = small_cnn(args.channels, args.size)
    f, params = fxattr.functionalize(model)
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, args.channels, args.size, args.size, generator=generator)
    y = model(x).argmax(1)
    a = torch.randn(x.shape, generator=generator)
    if args.channels > 1:  # ROAD ranks pixels: one map (Quantus needs a single channel there)
        a_road = a[:, :1]
    else:
        a_road = a
    n_features = x[0].numel()
    table = []
    for name, (q_metric, build, config, replay) in cases(args, n_features).items():
        if name not in args.metrics.split(","):
            continue
        if name == "road" and args.channels > 1:
            print("road: skipped for more than one channel (Quantus's ROAD needs one)")
            continue
        metric = build(f, **config)
        a_used = a_road if name == "road" else a
        table.append(measure(args, name, q_metric, metric, replay, model, params, x, y, a_used,
                             generator, n_features))

    print()
    print(f"small CNN, {args.channels}x{args.size}x{args.size}, batch {args.batch}, float32, "
          f"{args.threads} thread(s), median of {args.repeats} (process CPU time); features_in_step "
          f"{args.features_in_step}, patch {args.patch}, ROAD 50 percentages (noise 0), faithfulness "
          f"correlation {args.runs} runs x {args.subset}; fxattr chunk_size {args.chunk}")
    print()
    print("| metric | model calls | Quantus 0.6.0 (s) | fxattr eager (s) | speed-up | fxattr compiled (s) "
          "| speed-up | compile (s) | forward floor (s) | Quantus / floor | max abs difference |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, mq, mf, ratio, mc, ratio_c, tc, mfloor, difference in table:
        calls = model_calls(name, args, n_features) * args.batch
        print(f"| {name} | {calls} | {mq:.3f} | {mf:.3f} | {ratio:.1f}x | {mc:.3f} | {ratio_c:.1f}x | "
              f"{tc:.0f} | {mfloor:.3f} | {mq / mfloor:.1f}x | {difference:.1e} |")



def measure(args, name, q_metric, metric, replay, model, params, x, y, a_used, generator, n_features):
    """Times Quantus, fxattr (eager, optionally compiled) and the forward floor on one metric."""
    subsets = None
    if replay.get("subsets"):
        subsets = torch.argsort(torch.rand(args.batch, args.runs, n_features, generator=generator),
                                dim=-1)[..., :args.subset]

    def run_fxattr():
        extra = () if subsets is None else (subsets,)
        in_dims = (None, 0, 0, 0) + (0,) * len(extra)
        with torch.no_grad():
            return torch.vmap(metric, in_dims=in_dims, randomness="different")(params, x, y, a_used, *extra)

    def run_quantus():
        original = np.random.choice
        if subsets is not None:
            queue = iter([subsets[b, r].numpy() for r in range(args.runs) for b in range(args.batch)])
            np.random.choice = lambda *a_, **k_: next(queue)
        try:
            out = q_metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a_used.numpy(),
                           device="cpu", channel_first=True)
        finally:
            np.random.choice = original
        if isinstance(out, dict):
            return torch.tensor(list(out.values()), dtype=torch.float64)
        return torch.as_tensor(np.asarray(out, dtype=np.float64))

    ours, theirs = run_fxattr(), run_quantus()  # warm-up, and the agreement check
    compiled, compile_time = None, float("nan")
    if args.compile:
        torch._dynamo.reset()
        extra = () if subsets is None else (subsets,)
        in_dims = (None, 0, 0, 0) + (0,) * len(extra)
        batched = torch.compile(torch.vmap(metric, in_dims=in_dims, randomness="different"))

        def compiled():
            with torch.no_grad():
                return batched(params, x, y, a_used, *extra)

        start = time.process_time()
        compiled()
        compile_time = time.process_time() - start
    # the arithmetic floor of any non-incremental method: one plain forward of as many images
    # as the metric evaluates (the perturbed copies of the batch), 64 at a time.
    copies = torch.rand(model_calls(name, args, n_features) * args.batch, *x.shape[1:])

    def floor():
        with torch.no_grad():
            for start_ in range(0, len(copies), 64):
                model(copies[start_:start_ + 64])

    if name == "road":
        ours = ours.double().mean(0)
    difference = (ours.double() - theirs).abs().max().item()
    runs = [(run_quantus, []), (run_fxattr, []), (floor, [])]
    if compiled is not None:
        runs.append((compiled, []))
    for _ in range(args.repeats):
        for fn, store in runs:
            start = time.process_time()
            fn()
            store.append(time.process_time() - start)
    mq, mf, mfloor = (statistics.median(store) for _, store in runs[:3])
    mc = statistics.median(runs[3][1]) if compiled is not None else float("nan")
    print(f"{name:26s} quantus {mq:8.3f} s  fxattr {mf:8.3f} s  speed-up {mq / mf:6.1f}x  "
          f"compiled {mc:8.3f} s ({mq / mc:5.1f}x)  floor {mfloor:8.3f} s  "
          f"max |diff| {difference:.1e}", flush=True)
    return name, mq, mf, mq / mf, mc, mq / mc, compile_time, mfloor, difference

def model_calls(name, args, n_features):
    """Perturbed copies per example that the metric evaluates."""
    if name == "pixel_flipping":
        return -(-n_features // args.features_in_step)
    if name == "region_perturbation":
        blocks = (-(-args.size // args.patch)) ** 2
        return min(100, blocks)
    if name == "road":
        return 50
    return args.runs


if __name__ == "__main__":
    main()
