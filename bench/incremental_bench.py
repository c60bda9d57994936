#!/usr/bin/env python
"""Incremental occlusion: A/B of two implementations in ONE process, against plain occlusion and captum.

Times ``fxattr.occlusion(..., incremental=True)`` with the current ``_incremental`` module (on
``fxattr.graph.Program``) and with an older one loaded from a git revision (``--old``, default
the commit before the move onto the program: its own per-window interpreter), plus
``incremental=False`` (full occluded copies) and captum's ``Occlusion`` with
``perturbations_per_eval`` = fxattr's ``chunk_size`` (the same rows per forward). Random-init
torchvision models in eval with randomised batch-norm statistics; one torch thread; process CPU
time (explainers constructed once, one warm-up call each); the implementations interleaved in every repeat, so that the machine's load hits them alike.
Each row reports the median and the speed-ups of the current code over the others; every result is
checked against plain occlusion.

    python bench/incremental_bench.py --model resnet18 --size 224 --window 32 --stride 16
    python bench/incremental_bench.py --ceiling --model vgg11 --size 224 --window 16 --stride 16
    python bench/incremental_bench.py --ablation --model resnet18 --size 64 --window 8 --batch 4 [--peak]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import fxattr  # noqa: E402
from fxattr.perturbation import _perturbation  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = "fxattr/perturbation/_incremental.py"


def old_module(revision: str):
    """``_incremental`` as it was at ``revision`` (git show), imported under another name."""
    source = subprocess.run(["git", "show", f"{revision}:{PATH}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "incremental_old.py")
    with open(path, "w") as fh:
        fh.write(source)
    spec = importlib.util.spec_from_file_location("incremental_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(name: str, size: int, batch: int):
    import torchvision
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    with torch.no_grad():  # bench-side set-up of a random eval state
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        target = model(x).argmax(1)
    return model, x, target


def flop_ceiling(model, x, window: int, stride: int) -> tuple[float, float]:
    """``(full / incremental multiply-adds, fraction skipped)`` of the kernel layers (convolutions
    and linear layers; pooling and element-wise work left out) when every window of the geometry
    recomputes only its boxes: the most any exact incremental evaluation can gain on this model
    (Krypton's "theoretical speed-up"). A Shapley value sampling chain, where consecutive
    coalitions differ by one superpixel of side ``c``, has the boxes of windows ``c`` / stride ``c``."""
    from fxattr.graph import Program
    f, params = fxattr.functionalize(model)
    program = Program(f, "bench")
    with torch.no_grad():
        values = new_module().reference(program, params, x)[0]
    shape = tuple(x.shape)
    win, step = (3, window, window), (3, stride, stride)
    counts = [(s - w + k - 1) // k + 1 for s, w, k in zip(shape, win, step)]
    grids = torch.meshgrid(*[torch.arange(c) for c in counts], indexing="ij")
    plan = new_module().plan(program, values, shape, win, step, grids, x.device)
    full = incremental = 0
    for st in program.steps:
        if st.kind != "kernel" or not isinstance(values[st.slot], torch.Tensor):
            continue
        weight = st.kernel_params(params, values)["weight"] if not st.needs_values else None
        if weight is None:
            continue
        out = values[st.slot]
        per_position = weight.numel()  # per output position (C_out x C_in / groups x k x k)
        positions = out.shape[-2] * out.shape[-1] if out.ndim == 4 else out.numel() // out.shape[-1]
        full += positions * per_position
        box = plan.sizes.get(st.slot) if plan.kinds.get(st.slot) == "window" else None
        incremental += (box[0] * box[1] if box is not None else positions) * per_position
    return full / incremental, 1 - incremental / full


def ablation(args) -> None:
    """Feature ablation of ``--window`` x ``--window`` superpixels (G groups, G + 1 forwards per
    example in every implementation): captum's ``FeatureAblation`` (``perturbations_per_eval`` =
    chunk), ``fxattr.feature_ablation`` (full copies) and ``fxattr.occlusion`` with window = stride
    = the superpixel (the same numbers: every window is one group), incremental and not."""
    from captum.attr import FeatureAblation
    model, x, target = build(args.model, args.size, args.batch)
    f, params = fxattr.functionalize(model)
    cell, side = args.window, args.size // args.window
    mask = (torch.arange(args.size)[:, None] // cell * side + torch.arange(args.size)[None, :] // cell)[None]
    geometry = {"window": (3, cell, cell), "stride": (3, cell, cell), "chunk_size": args.chunk}
    vmapped = {
        "fxattr occlusion = ablation, incremental": fxattr.occlusion(f, incremental=True, **geometry),
        "fxattr occlusion = ablation, full copies": fxattr.occlusion(f, incremental=False, **geometry),
        "fxattr feature_ablation": fxattr.feature_ablation(f, feature_mask=mask, chunk_size=args.chunk),
    }
    runs = {k: (lambda e=e: torch.vmap(e, in_dims=(None, 0, 0))(params, x, target)) for k, e in vmapped.items()}
    runs["captum FeatureAblation"] = lambda: FeatureAblation(model).attribute(
        x, target=target, feature_mask=mask[None], perturbations_per_eval=args.chunk)
    if args.only is not None:  # one first call in this fresh process: its peak memory
        import resource
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with torch.no_grad():
            runs[args.only]()
        print(f"PEAK {(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024:.1f}")
        return
    if args.peak:
        print(f"\npeak memory (growth of max RSS during the first call, fresh process each), {args.model}, "
              f"{args.size} px, batch {args.batch}, {side * side} superpixels, chunk {args.chunk}\n")
        print("| implementation | peak |\n|---|---:|")
        for name in runs:
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", name], check=True,
                                 capture_output=True, text=True).stdout
            print(f"| {name} | +{out.split('PEAK ')[-1].strip()} MiB |")
        return
    timed_runs(runs, args, f"feature ablation, {args.model}, {args.size} px, batch {args.batch}, "
                             f"{side * side} superpixels of {cell}x{cell}, chunk {args.chunk}",
               "fxattr occlusion = ablation, incremental", "captum FeatureAblation")


def timed_runs(runs: dict, args, title: str, ours: str, reference: str) -> None:
    with torch.no_grad():  # warm-up
        for fn in runs.values():
            fn()
    times = {k: [] for k in runs}
    results = {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.process_time()
            with torch.no_grad():
                results[name] = fn()
            times[name].append(time.process_time() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    scale = results[reference].abs().max().item()
    print(f"\n{title}, {args.repeats} interleaved repeats, load {os.getloadavg()[0]:.1f}\n")
    print(f"| implementation | median (min-max) | speed-up of {ours.split(',')[-1].strip()} over it | "
          f"max abs diff / max |{reference}| |")
    print("|---|---:|---:|---:|")
    for name, t in times.items():
        diff = (results[name] - results[reference]).abs().max().item() / scale
        print(f"| {name} | {med[name]:.2f} s ({min(t):.2f}-{max(t):.2f}) | {med[name] / med[ours]:.2f}x | {diff:.1e} |")


def new_module():
    return _perturbation._incremental


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--old", default="72ae877^", help="git revision of the old _incremental.py")
    parser.add_argument("--no-captum", action="store_true")
    parser.add_argument("--ceiling", action="store_true",
                        help="only the multiply-add ceiling of exact incremental evaluation")
    parser.add_argument("--ablation", action="store_true",
                        help="feature ablation of window x window superpixels instead of occlusion")
    parser.add_argument("--peak", action="store_true", help="with --ablation: peak memory of each, "
                        "in a fresh process")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.ablation:
        return ablation(args)
    if args.ceiling:
        model, x, _ = build(args.model, args.size, 1)
        ratio, skipped = flop_ceiling(model, x[0], args.window, args.stride)
        print(f"| {args.model} | {args.size} px | {args.window} / {args.stride} | {skipped:.0%} | {ratio:.2f}x |")
        return 0

    model, x, target = build(args.model, args.size, args.batch)
    f, params = fxattr.functionalize(model)
    window, stride = (3, args.window, args.window), (3, args.stride, args.stride)
    config = {"window": window, "stride": stride, "chunk_size": args.chunk}
    new = _perturbation._incremental
    old = old_module(args.old)

    def fxattr_run(module, incremental):
        """The vmapped explainer, constructed once (tracing is not timed) with ``module`` as the
        implementation occlusion calls (bench only)."""
        _perturbation._incremental = module
        try:
            explain = torch.vmap(fxattr.occlusion(f, incremental=incremental, **config), in_dims=(None, 0, 0))
        finally:
            _perturbation._incremental = new

        def run():
            _perturbation._incremental = module
            try:
                return explain(params, x, target)
            finally:
                _perturbation._incremental = new
        return run

    runs = {
        "incremental (program)": fxattr_run(new, True),
        f"incremental (old, {args.old})": fxattr_run(old, True),
        "plain occlusion": fxattr_run(new, False),
    }
    if not args.no_captum:
        from captum.attr import Occlusion
        runs["captum Occlusion"] = lambda: Occlusion(model).attribute(
            x, sliding_window_shapes=window, strides=stride, target=target,
            perturbations_per_eval=args.chunk)
    windows = ((args.size - args.window + args.stride - 1) // args.stride + 1) ** 2
    timed_runs(runs, args, f"{args.model}, {args.size} px, batch {args.batch}, window {args.window} / stride "
                           f"{args.stride} ({windows} windows), chunk {args.chunk}",
               ours="incremental (program)", reference="plain occlusion")


if __name__ == "__main__":
    sys.exit(main())
