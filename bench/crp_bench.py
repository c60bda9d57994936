"""64 conditional heatmaps (CRP) of one image: fxattr.crp against zennit-crp's CondAttribution.

Same model (random-init torchvision vgg11 / resnet18, random biases, randomised BN statistics with
eps = 0 so that zennit's canonized twin computes the same function),
same input, same composite (EpsilonPlusFlat <-> "epsilon_plus_flat"), same process, one thread;
process CPU time (``time.process_time``), the best of ``--repeats`` after one warm-up.

zennit-crp is timed both ways it offers: ``CondAttribution.__call__`` with 64 conditions (the
image repeated 64 times: 64 forwards and one backward of the batch) and
``CondAttribution.generate`` (one forward of a batch of ``--crp-batch`` copies, the backward graph
kept, one masked backward per chunk of conditions); the faster one is the reference. fxattr runs
the forward and the reverse walk down to the layer once and the walk below the layer vmapped over
the 64 concept masks (eager). The heatmaps are checked to agree before timing.

    python bench/crp_bench.py            # vgg11 and resnet18 at 64x64
    python bench/crp_bench.py --quick
    python bench/crp_bench.py --parallel --models resnet18   # exclude_parallel=False at
        # layer1.1.conv1 (a skip connection around it), both libraries
"""

from __future__ import annotations

import argparse
import copy
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

import fxattr

MODELS = {"vgg11": "features.8", "resnet18": "layer2"}
PARALLEL_LAYERS = {"vgg11": "features.8", "resnet18": "layer1.1.conv1"}  # --parallel: a skip around it


def build(name: str, size: int):
    import torchvision
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(0.1 * torch.randn(bias.shape, generator=gen))
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=gen))
                module.eps = 0.0  # zennit's merged BN is not the identity otherwise (test_zennit.py)
    model.eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        target = int(model(x).argmax(1))
    return model, x, target


def best_time(fn, repeats: int) -> tuple[float, object]:
    result = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.process_time()
        result = fn()
        times.append(time.process_time() - start)
    return min(times), result


def bench(name: str, size: int, concepts: int, repeats: int, crp_batch: int, parallel: bool = False) -> list[dict]:
    from crp.attribution import CondAttribution
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer

    layer = PARALLEL_LAYERS[name] if parallel else MODELS[name]
    exclude = not parallel
    model, x, target = build(name, size)
    canonizer = ResNetCanonizer if name == "resnet18" else SequentialMergeBatchNorm
    twin = copy.deepcopy(model)
    attribution = CondAttribution(twin)
    conditions = [{layer: [c], "y": [target]} for c in range(concepts)]

    def crp_call():
        data = x.clone().requires_grad_(True)
        return attribution(data, conditions, EpsilonPlusFlat(canonizers=[canonizer()]),
                           exclude_parallel=exclude).heatmap

    def crp_generate():
        data = x.clone().requires_grad_(True)
        parts = [r.heatmap for r in attribution.generate(
            data, conditions, EpsilonPlusFlat(canonizers=[canonizer()]), batch_size=crp_batch, verbose=False,
            exclude_parallel=exclude)]
        return torch.cat(parts)

    f, params = fxattr.functionalize(model)
    explain = fxattr.crp(f, composite="epsilon_plus_flat", layer=layer, concepts=range(concepts),
                         exclude_parallel=exclude)

    def ours():
        return explain(params, x[0], target).heatmap

    rows = []
    t_ours, got = best_time(ours, repeats)
    for label, fn in ((f"zennit-crp CondAttribution({concepts} conditions)", crp_call),
                      (f"zennit-crp generate(batch_size={crp_batch})", crp_generate)):
        t, want = best_time(fn, repeats)
        error = float((got.sum(1) - want).norm() / want.norm())
        rows.append({"model": name, "layer": layer, "method": label, "seconds": t, "rel_err": error})
    rows.append({"model": name, "layer": layer, "method": "fxattr.crp (one call, vmapped concepts)",
                 "seconds": t_ours, "rel_err": 0.0})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--concepts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--crp-batch", type=int, default=16)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="32x32, 8 concepts, 1 repeat")
    parser.add_argument("--parallel", action="store_true",
                        help="exclude_parallel=False (resnet18 at layer1.1.conv1) in both libraries")
    args = parser.parse_args()
    if args.quick:
        args.size, args.concepts, args.repeats = 32, 8, 1
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, {args.size}x{args.size}, {args.concepts} concepts, "
          f"EpsilonPlusFlat, process CPU time, best of {args.repeats}"
          f"{', exclude_parallel=False' if args.parallel else ''}")
    print("| model / layer | method | time | fxattr speed-up | heatmap rel. diff |")
    print("|---|---|---:|---:|---:|")
    for name in args.models:
        rows = bench(name, args.size, args.concepts, args.repeats, args.crp_batch, args.parallel)
        ours = rows[-1]["seconds"]
        for row in rows:
            print(f"| {row['model']} / {row['layer']} | {row['method']} | {row['seconds'] * 1e3:.0f} ms | "
                  f"{row['seconds'] / ours:.1f}x | {row['rel_err']:.1e} |")


if __name__ == "__main__":
    main()
