"""A/B benchmark: the working tree's fxattr against an earlier revision, in ONE process.

``git archive <rev> fxattr`` is unpacked into a temporary directory and renamed to the package
``fxattr_base`` (its absolute imports rewritten), so that both versions are imported side by side and
timed interleaved repeat by repeat: CPU contention on a shared machine hits the floor, the old and
the new explainer alike, and the ratios to the floor of the same repeats are comparable. Each case
first checks that old and new give the same numbers (max relative difference printed).

    python bench/ab_bench.py --rev 3808cd1 --repeats 5 \\
        efficientnet_b0:2:128:deeplift,lrp_epsilon_plus resnet18:8:224:epsilon_plus_flat

A case is ``model:batch:size:method,method``; models: the zoo bench's (efficientnet_b0,
convnext_tiny, vit_b_16; random weights, calibrated batch norms) and bench.py's (resnet18, vgg11,
small_cnn); methods: deeplift, lrp_epsilon_plus, epsilon_plus_flat, epsilon_alpha2_beta1,
guided_backprop. Process CPU time, one torch thread, medians.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)


def import_revision(rev: str, directory: str):
    """``fxattr`` at ``rev`` as the package ``fxattr_base`` (imports rewritten), imported."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "fxattr"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", directory], input=archive, check=True)
    os.rename(os.path.join(directory, "fxattr"), os.path.join(directory, "fxattr_base"))
    for base, _, files in os.walk(os.path.join(directory, "fxattr_base")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(base, name)
            with open(path) as handle:
                text = handle.read()
            text = re.sub(r"\bfxattr\.", "fxattr_base.", text)
            text = text.replace("from fxattr import", "from fxattr_base import")
            text = re.sub(r"^import fxattr$", "import fxattr_base as fxattr", text, flags=re.MULTILINE)
            with open(path, "w") as handle:
                handle.write(text)
    sys.path.insert(0, directory)
    return importlib.import_module("fxattr_base")


def explainer(package, method: str, f):
    if method == "deeplift":
        return package.deeplift(f, baseline=0.0)
    if method == "lrp_epsilon_plus":
        return package.lrp(f, composite="epsilon_plus")
    if method in ("epsilon_plus_flat", "epsilon_alpha2_beta1"):
        return package.lrp(f, composite=method)
    if method == "guided_backprop":
        return package.guided_backprop(f)
    raise SystemExit(f"unknown method {method!r}")


def build(name: str, size: int):
    if name in ("resnet18", "vgg11", "small_cnn"):
        from harness import build_model, frozen_copy
        return frozen_copy(build_model(name))
    from zoo_bench import _bench_model
    return _bench_model(name, size)


def run_case(case: str, packages: dict, repeats: int) -> list[str]:
    name, batch, size, methods = case.split(":")
    batch, size = int(batch), int(size)
    model = build(name, size)
    xs = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        targets = model(xs).argmax(-1)

    def floor():
        x = xs.clone().requires_grad_(True)
        return torch.autograd.grad(model(x)[torch.arange(batch), targets].sum(), x)[0]

    candidates = {("floor", ""): floor}
    for method in methods.split(","):
        results = {}
        for label, package in packages.items():
            f, params = package.functionalize(model)
            explain = torch.vmap(explainer(package, method, f), in_dims=(None, 0, 0))
            candidates[(method, label)] = (lambda e=explain, p=params: e(p, xs, targets))
            results[label] = candidates[(method, label)]()
        old, new = results["base"], results["new"]
        difference = float((old - new).abs().max() / old.abs().max().clamp(min=1e-30))
        print(f"{case}: {method} old vs new max relative difference {difference:.1e}", flush=True)
    times = {key: [] for key in candidates}
    for _ in range(repeats):
        for key, fn in candidates.items():
            start = time.process_time()
            fn()
            times[key].append(time.process_time() - start)
    base = statistics.median(times[("floor", "")])
    rows = [f"| {name} b{batch} {size}px | floor | {base:.3f} s | 1.00x | |"]
    for method in methods.split(","):
        old = statistics.median(times[(method, "base")]) / base
        new = statistics.median(times[(method, "new")]) / base
        rows.append(f"| {name} b{batch} {size}px | {method} | {statistics.median(times[(method, 'new')]):.3f} s | "
                    f"{old:.2f}x -> {new:.2f}x | {old / new:.2f}x |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cases", nargs="+")
    parser.add_argument("--rev", required=True, help="the baseline revision (git)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import warnings
    warnings.simplefilter("ignore")
    import fxattr
    with tempfile.TemporaryDirectory() as directory:
        packages = {"base": import_revision(args.rev, directory), "new": fxattr}
        rows = ["| case | method | new median | x floor (base -> new) | speed-up |", "|---|---|---:|---:|---:|"]
        for case in args.cases:
            rows += run_case(case, packages, args.repeats)
            print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
