"""Zoo benchmark and zoo table: propagation methods on today's architectures.

``python bench/zoo_bench.py`` times LRP (``epsilon_plus``) and DeepLIFT on efficientnet_b0,
convnext_tiny and vit_b_16 as ratios to the autograd floor (one forward + one backward to the input
through the module), beside zennit's EpsilonPlus where zennit runs; process CPU time, one torch
thread, interleaved repeats, medians. A method fxattr refuses is reported with its error.

``python bench/zoo_bench.py --table`` prints the zoo table (tests/zoo/models.py, float64, the tests'
inputs): per model and method whether it runs under ``torch.vmap``, DeepLIFT's summation-to-delta
error (relative), and the LRP conservation ``sum(R_in) / f(x)[t]`` (mean over the two examples).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxattr  # noqa: E402
from fxattr.errors import FxattrError  # noqa: E402
from tests.zoo.models import BUILDERS, PROPAGATION_METHODS, baselines, build, make_explainer  # noqa: E402


# --- the zoo table -----------------------------------------------------------------------------

def _cell(method, model, f, params, xs, targets):
    try:
        explain = make_explainer(method, f, params, xs)
        got = torch.vmap(explain, in_dims=(None, 0, 0))(params, xs, targets)
    except Exception as error:  # noqa: BLE001 - the table reports what does not run
        text = str(error).replace("|", "/").split("\n")[0]
        return f"no ({type(error).__name__}: {text[:70]})"
    if not torch.isfinite(got).all():
        return "runs, NON-FINITE"
    with torch.no_grad():
        value = model(xs)[torch.arange(2), targets]
        total = got.flatten(1).sum(1)
        if method == "deeplift":
            delta = value - model(torch.zeros_like(xs))[torch.arange(2), targets]
        elif method == "deeplift_shap":
            refs = baselines(xs)
            delta = value - torch.stack([model(refs)[:, t].mean() for t in targets])
        else:
            delta = None
    if delta is not None:
        error = ((total - delta).abs() / (got.flatten(1).abs().sum(1) + delta.abs())).max()
        return f"runs, delta err {float(error):.0e}"
    if method.startswith("lrp"):
        return f"runs, conservation {float((total / value).mean()):.3f}"
    return "runs"


def zoo_table(models) -> str:
    header = "| model | " + " | ".join(("gradient",) + PROPAGATION_METHODS) + " |"
    lines = [header, "|" + "---|" * (len(PROPAGATION_METHODS) + 2)]
    for name in models:
        model, xs = build(name)
        f, params = fxattr.functionalize(model, input_shape=tuple(xs.shape[1:]))
        with torch.no_grad():
            targets = model(xs).argmax(-1)
        cells = [_cell(m, model, f, params, xs, targets) for m in ("gradient",) + PROPAGATION_METHODS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


# --- timing ------------------------------------------------------------------------------------

BENCH_MODELS = ("efficientnet_b0", "convnext_tiny", "vit_b_16")


def _bench_model(name: str, size: int):
    import torchvision.models as tvm

    from tests.zoo.models import calibrate_batch_norms, randomise

    torch.manual_seed(0)
    constructor = {"efficientnet_b0": lambda: tvm.efficientnet_b0(),
                   "convnext_tiny": lambda: tvm.convnext_tiny(),
                   "vit_b_16": lambda: tvm.vit_b_16(image_size=size)}[name]
    model = randomise(constructor())
    gen = torch.Generator().manual_seed(1)
    return calibrate_batch_norms(model, lambda: torch.randn(4, 3, size, size, generator=gen))


def _zennit(model, xs, targets):
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlus

    peer = copy.deepcopy(model)  # zennit registers hooks: never on the benchmarked module
    composite = EpsilonPlus(canonizers=[SequentialMergeBatchNorm()])
    eye = torch.eye(peer(xs[:1]).shape[-1])[targets]

    def run():
        with Gradient(model=peer, composite=composite) as attributor:
            return attributor(xs, eye)[1]
    return run


def bench(models, batch: int, size: int, repeats: int) -> str:
    rows = ["| model | method | implementation | median (min-max, n) | x floor | target | x zennit | note |",
            "|---|---|---|---:|---:|---|---:|---|"]
    for name in models:
        model = _bench_model(name, size)
        f, params = fxattr.functionalize(model)
        xs = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            targets = model(xs).argmax(-1)

        def floor():
            x = xs.clone().requires_grad_(True)
            return torch.autograd.grad(model(x)[torch.arange(batch), targets].sum(), x)[0]

        candidates = {("gradient", "autograd floor"): floor}
        notes = {}
        for method, label in (("lrp_epsilon_plus", "fxattr eager"), ("deeplift", "fxattr eager")):
            try:
                explain = torch.vmap(make_explainer(method, f, params, xs), in_dims=(None, 0, 0))
                explain(params, xs, targets)  # warm-up and check that it runs
                candidates[(method, label)] = (lambda e=explain: e(params, xs, targets))
            except FxattrError as error:
                notes[(method, label)] = "refused: " + str(error).split(". Supported")[0][:110]
        try:
            run = _zennit(model, xs, targets)
            run()
            candidates[("lrp_epsilon_plus", "zennit EpsilonPlus")] = run
        except Exception as error:  # noqa: BLE001 - reported in the table
            notes[("lrp_epsilon_plus", "zennit EpsilonPlus")] = f"zennit fails: {type(error).__name__}: {error}"[:120]
        times = {key: [] for key in candidates}
        for _ in range(repeats):  # interleaved: each repeat times every candidate once
            for key, fn in candidates.items():
                start = time.process_time()
                fn()
                times[key].append(time.process_time() - start)
        base = statistics.median(times[("gradient", "autograd floor")])
        zennit_time = times.get(("lrp_epsilon_plus", "zennit EpsilonPlus"))
        for key in list(candidates) + list(notes):
            method, label = key
            if key in notes:
                rows.append(f"| {name} | {method} | {label} | - | - | <= 2x floor | - | {notes[key]} |")
                continue
            t = times[key]
            med = statistics.median(t)
            ratio = med / base
            target = "" if method == "gradient" or label.startswith("zennit") else \
                f"<= 2x floor {'ok' if ratio <= 2 else 'MISS'}"
            peer = f"{med / statistics.median(zennit_time):.2f}x" if (zennit_time and method.startswith("lrp")
                                                                        and label.startswith("fxattr")) else "-"
            rows.append(f"| {name} | {method} | {label} | {med:.2f} s ({min(t):.2f} s-{max(t):.2f} s, {len(t)}) | "
                        f"{ratio:.2f}x | {target} | {peer} |  |")
        print("\n".join(rows[-len(candidates) - len(notes):]), flush=True)
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", action="store_true", help="the zoo table instead of timings")
    parser.add_argument("--models", default=None, help="comma-separated model names")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.table:
        models = args.models.split(",") if args.models else BUILDERS
        print(zoo_table(models))
    else:
        models = args.models.split(",") if args.models else BENCH_MODELS
        print(bench(models, args.batch, args.size, args.repeats))


if __name__ == "__main__":
    main()
