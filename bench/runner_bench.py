#!/usr/bin/env python
"""The dataset runner against the in-memory vmapped explainer, on the same images, in ONE process.

For each method, timed interleaved repeat by repeat (wall clock: the runner's decode workers and
writer thread are part of what it offers), medians over ``--repeats`` of two clocks: CPU time
(this process, its writer thread and its finished DataLoader workers: the work, robust to other
processes on a shared machine) and wall time (what a dedicated machine would see):

- **in-memory**: the images already decoded in one tensor; per batch one vmapped forward for the
  predictions and ``torch.vmap(explain, in_dims=(None, 0, 0))`` on them (the same quantities the
  runner stores: attributions, outputs, predictions); results kept in memory. Also ``explain
  target=None`` (the argmax resolved inside the explainer, no outputs kept), for reference;
- **runner, PNG**: ``fxattr.attribute_dataset`` on an ImageFolder tree of PNG files (decoded with
  PIL, in the main process or in ``--workers`` DataLoader processes), shards written atomically (fsync) on a writer
  thread, class means in the final pass: decode and I/O included;
- **runner, tensor**: the same from the in-memory tensor (no decode; storage overhead only).

    python bench/runner_bench.py                      # 512 images 3x32x32, small CNN, CPU
    python bench/runner_bench.py --device cuda --images 4096 --batch 256
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxattr
from fxattr.runner import ImageFolder


def small_cnn(classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(128, classes)).eval()


def write_tree(root: Path, n: int, size: int, classes: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        directory = root / f"class_{i % classes:02d}"
        directory.mkdir(parents=True, exist_ok=True)
        # smooth-ish images compress like photographs rather than like noise
        base = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
        Image.fromarray(base).resize((size, size), Image.BILINEAR).save(directory / f"{i:05d}.png")


def methods(f):
    return {
        "gradient": fxattr.gradient(f),
        "lrp epsilon_plus": fxattr.lrp(f, composite="epsilon_plus"),
        "smoothgrad 8": fxattr.smoothgrad(f, samples=8),
    }


def clocks() -> tuple[float, float]:
    """Wall time, and CPU time of this process plus its finished children (DataLoader workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), time.process_time() + children.ru_utime + children.ru_stime


def since(start: tuple[float, float]) -> tuple[float, float]:
    now = clocks()
    return now[0] - start[0], now[1] - start[1]


def in_memory(explain, f, params, x, batch: int, device) -> tuple[float, float]:
    forward = torch.vmap(f, in_dims=(None, 0))
    batched = torch.vmap(explain, in_dims=(None, 0, 0), randomness="different")
    start = clocks()
    kept = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch].to(device)
        outputs = forward(params, xb)
        prediction = outputs.argmax(1)
        kept.append((batched(params, xb, prediction).cpu(), outputs.cpu(), prediction.cpu()))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return since(start)


def in_memory_none(explain, params, x, batch: int, device) -> tuple[float, float]:
    batched = torch.vmap(lambda p, xi: explain(p, xi, None), in_dims=(None, 0), randomness="different")
    start = clocks()
    kept = [batched(params, x[i:i + batch].to(device)).cpu() for i in range(0, len(x), batch)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    del kept
    return since(start)


def runner(explain, params, data, out: Path, batch: int, device, workers: int, dtype) -> tuple[float, float]:
    if out.exists():
        shutil.rmtree(out)
    start = clocks()
    fxattr.attribute_dataset(explain, params, data, out, batch_size=batch, progress=False, num_workers=workers,
                             device=device, dtype=dtype)
    return since(start)


def variants_of(explain, f, params, x, tree, tensor_data, work: Path, args, device) -> dict:
    """The timed variants of one explainer, each a function returning its wall time."""
    return {
        "in-memory (predictions + vmapped explainer)": lambda: in_memory(explain, f, params, x, args.batch, device),
        "in-memory, explain target=None only": lambda: in_memory_none(explain, params, x, args.batch, device),
        **{f"runner, PNG tree, {w} workers, float32": (lambda w=w: runner(
            explain, params, tree, work / "run", args.batch, device, w, torch.float32)) for w in args.workers},
        f"runner, PNG tree, {args.workers[0]} workers, float16": lambda: runner(
            explain, params, tree, work / "run", args.batch, device, args.workers[0], torch.float16),
        "runner, tensor dataset, no workers, float32": lambda: runner(
            explain, params, tensor_data, work / "run", args.batch, device, 0, torch.float32),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=lambda text: [int(w) for w in text.split(",")], default=[0, 2],
                   help="DataLoader workers of the PNG variants, a comma list (default 0,2)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", default="gradient,lrp epsilon_plus,smoothgrad 8")
    p.add_argument("--tmp", default=None, help="where the PNG tree and the runs go (default: a temp dir)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = small_cnn().to(device)
    f, params = fxattr.functionalize(model)
    work = Path(tempfile.mkdtemp(prefix="fxattr-runner-bench-", dir=args.tmp))
    try:
        write_tree(work / "tree", args.images, args.size, 10)
        tree = ImageFolder(work / "tree")
        x = torch.stack([tree[i][0] for i in range(len(tree))])  # the same images, decoded once
        tensor_data = torch.utils.data.TensorDataset(x, torch.tensor([label for _, label in tree.samples]))
        chosen = [m for m in args.methods.split(",") if m]
        rows = []
        for name in chosen:
            variants = variants_of(methods(f)[name], f, params, x, tree, tensor_data, work, args, device)
            for run in variants.values():  # warm-up: first calls, page cache
                run()
            times = {key: [] for key in variants}
            for _ in range(args.repeats):
                for key, run in variants.items():
                    times[key].append(run())
            base = [statistics.median(v[i] for v in times["in-memory (predictions + vmapped explainer)"])
                    for i in (0, 1)]
            for key, values in times.items():
                wall, cpu = (statistics.median(v[i] for v in values) for i in (0, 1))
                rows.append((name, key, wall, cpu, args.images / cpu, base[1] / cpu, base[0] / wall))
                print(f"{name:18s} {key:48s} cpu {cpu * 1000:8.1f} ms {args.images / cpu:6.0f} img/s "
                      f"{base[1] / cpu:6.1%}   wall {wall * 1000:8.1f} ms {base[0] / wall:6.1%}", flush=True)
        print()
        print(f"- {args.images} images 3x{args.size}x{args.size} (PNG, {len(tree.classes)} classes), batch "
              f"{args.batch}, small CNN ({sum(p.numel() for p in model.parameters())} parameters), device "
              f"{device.type}, {args.threads} torch thread(s), medians of {args.repeats} "
              f"interleaved repeats, CPU time (process + DataLoader workers) and wall clock; torch {torch.__version__}; {os.cpu_count()} CPUs")
        print()
        print("| method | variant | CPU time | images/s (CPU) | vs in-memory (CPU) | wall | vs in-memory (wall) |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for name, key, wall, cpu, rate, ratio, wall_ratio in rows:
            print(f"| {name} | {key} | {cpu * 1000:.0f} ms | {rate:.0f} | {ratio:.0%} | {wall * 1000:.0f} ms "
                  f"| {wall_ratio:.0%} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
