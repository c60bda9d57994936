#!/usr/bin/env python
"""The Shapley family against captum, at equal forward counts, in one process per measurement.

For Shapley value sampling, KernelSHAP and LIME on a random-init torchvision resnet18 (eval, BN
statistics randomised) with superpixel feature groups, times fxattr (``torch.vmap`` over the batch,
``chunk_size`` coalitions per example per forward) and captum (``perturbations_per_eval`` set so
that one forward holds the same number of rows), checks that both agree where the draws can be
replayed (Shapley value sampling: same permutations), and measures each one's peak resident memory
in a fresh subprocess (``ru_maxrss``, minus the same process's RSS before the call).

    python bench/shapley_bench.py --quick
    python bench/shapley_bench.py --size 64 --batch 4 --samples 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import fxattr  # noqa: E402


def build(size: int, batch: int, cell: int):
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    x = torch.randn(batch, 3, size, size)
    side = size // cell
    mask = (torch.arange(size)[:, None] // cell * side + torch.arange(size)[None, :] // cell)[None]
    with torch.no_grad():
        target = model(x).argmax(1)
    return model, x, mask, target, side * side


def run_one(method: str, library: str, args, captum_rows: int = 1) -> dict:
    torch.set_num_threads(1)
    model, x, mask, target, groups = build(args.size, args.batch, args.cell)
    f, params = fxattr.functionalize(model)
    torch.manual_seed(1)
    permutations = torch.stack([torch.randperm(groups) for _ in range(args.samples)])
    rows = args.chunk
    if library == "fxattr":
        if method == "svs":
            explain = fxattr.shapley_value_sampling(f, feature_mask=mask, permutations=permutations, chunk_size=rows)
        elif method == "kernel_shap":
            explain = fxattr.kernel_shap(f, feature_mask=mask, samples=args.coalitions, chunk_size=rows)
        else:
            explain = fxattr.lime(f, feature_mask=mask, samples=args.coalitions, regression="ridge",
                                  alpha=1.0, chunk_size=rows)
        batch = torch.vmap(explain, in_dims=(None, 0, 0), randomness="different")
        call = lambda: batch(params, x, target)  # noqa: E731
    else:
        from captum.attr import KernelShap, Lime, ShapleyValueSampling
        from captum._utils.models.linear_model import SkLearnRidge
        if method == "svs":
            def call():
                torch.manual_seed(1)  # the same permutations as fxattr's
                return ShapleyValueSampling(model).attribute(
                    x, baselines=0.0, target=target, feature_mask=mask[None], n_samples=args.samples,
                    perturbations_per_eval=captum_rows)
        elif method == "kernel_shap":
            def call():
                return torch.cat([KernelShap(model).attribute(
                    x[i:i + 1], baselines=0.0, target=int(target[i]), feature_mask=mask[None],
                    n_samples=args.coalitions, perturbations_per_eval=captum_rows) for i in range(len(x))])
        else:
            def call():
                return torch.cat([Lime(model, interpretable_model=SkLearnRidge(alpha=1.0)).attribute(
                    x[i:i + 1], baselines=0.0, target=int(target[i]), feature_mask=mask[None],
                    n_samples=args.coalitions, perturbations_per_eval=captum_rows) for i in range(len(x))])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.process_time()
    with torch.no_grad() if library == "captum" else torch.enable_grad():
        out = call()
    first = time.process_time() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    times = [first]
    for _ in range(args.repeats - 1):
        start = time.process_time()
        out = call()
        times.append(time.process_time() - start)
    result = {"median": statistics.median(times), "peak_kib": peak, "groups": groups}
    if method == "svs":
        result["out"] = out.detach().double().flatten()[:4096].tolist()
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--cell", type=int, default=8, help="superpixel side (groups = (size / cell)^2)")
    p.add_argument("--samples", type=int, default=4, help="Shapley value sampling: permutations")
    p.add_argument("--coalitions", type=int, default=128, help="KernelSHAP / LIME: coalitions")
    p.add_argument("--chunk", type=int, default=16, help="coalitions per forward, both libraries")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default="svs,kernel_shap,lime")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.size, args.batch, args.samples, args.coalitions, args.repeats = 32, 2, 2, 32, 1
    if args.child:
        print(json.dumps(run_one(args.child[0], args.child[1], args, int(args.child[2]))))
        return
    rows = []
    for method in args.methods.split(","):
        results = {}
        for library, captum_rows in (("fxattr", 0), ("captum", args.chunk), ("captum default", 1)):
            argv = [sys.executable, __file__, "--child", method, library.split()[0], str(captum_rows)] + [
                a for a in sys.argv[1:] if a != "--quick"] + (["--quick"] if args.quick else [])
            done = subprocess.run(argv, capture_output=True, text=True, check=True)
            results[library] = json.loads(done.stdout.strip().splitlines()[-1])
        fx, cp, cd = results["fxattr"], results["captum"], results["captum default"]
        agree = "-"
        if method == "svs":
            a, b = torch.tensor(fx["out"]), torch.tensor(cp["out"])
            agree = f"{float((a - b).abs().max() / b.abs().max()):.1e}"
        rows.append((method, fx["groups"], fx["median"], cp["median"], cp["median"] / fx["median"],
                     cd["median"], cd["median"] / fx["median"], fx["peak_kib"] / 1024,
                     cp["peak_kib"] / 1024, cd["peak_kib"] / 1024, agree))
    print(f"resnet18 (10 classes), batch {args.batch}, {args.size}x{args.size}, the same forwards; fxattr "
          f"{args.chunk} coalitions per forward per example; captum with perturbations_per_eval={args.chunk} "
          f"(matched) and 1 (its default); 1 thread, process time, median of {args.repeats}")
    print("| method | groups | fxattr | captum matched | speed-up | captum default | speed-up | "
          "fxattr peak | captum matched peak | captum default peak | max rel. diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m, g, a, b, r, c, rc, pa, pb, pc, agree in rows:
        print(f"| {m} | {g} | {a:.2f} s | {b:.2f} s | {r:.2f}x | {c:.2f} s | {rc:.2f}x | +{pa:.0f} MiB | "
              f"+{pb:.0f} MiB | +{pc:.0f} MiB | {agree} |")


if __name__ == "__main__":
    main()
