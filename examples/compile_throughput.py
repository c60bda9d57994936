"""Throughput of ``torch.compile(torch.vmap(explain))`` against eager ``torch.vmap(explain)``.

An fxattr explainer is a pure function of ``(params, x, target)``, so the batched explainer is an
ordinary function that ``torch.compile`` can trace whole (``fullgraph=True``): the forward pass,
the reverse pass (autograd's or the LRP rules') and the batching fuse into one graph. This script
explains a batch of CIFAR-sized images with a small CNN (random weights) and prints examples per
second, eager and compiled, the compile time and the largest difference between the two.

    python examples/compile_throughput.py            # a minute or two on 2 CPU cores
    python examples/compile_throughput.py --quick    # one explainer, small batch (used by the tests)
"""

from __future__ import annotations

import argparse
import time
from collections import OrderedDict

import torch
from torch import nn

import fxattr


def make_model() -> nn.Module:
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 16, 3, padding=1)), ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(16, 32, 3, padding=1)), ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),
        ("conv3", nn.Conv2d(32, 32, 3, padding=1)), ("relu3", nn.ReLU()),
        ("avgpool", nn.AdaptiveAvgPool2d(4)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(32 * 16, 64)), ("relu4", nn.ReLU()),
        ("fc2", nn.Linear(64, 10)),
    ])).eval()


METHODS = [
    ("gradient", "gradient", {}),
    ("integrated_gradients(steps=16)", "integrated_gradients", {"steps": 16}),
    ("lrp(epsilon)", "lrp", {"rule": "epsilon", "epsilon": 0.1}),
    ("lrp(sequential_preset_a)", "lrp", {"composite": "sequential_preset_a"}),
    ("gradcam(relu3)", "gradcam", {"layer": "relu3"}),
]


def throughput(fn, args, repeats: int) -> float:
    """Examples per second: the best of ``repeats`` timed calls (after one warm-up call)."""
    fn(*args)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return len(args[1]) / best


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one explainer, batch 8 (for tests)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 64; 8 quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 5; 2 quick)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--methods", nargs="*", default=None,
                        help="fxattr attribute names to run (default: all; gradient when quick)")
    args = parser.parse_args(argv)
    batch = args.batch or (8 if args.quick else 64)
    repeats = args.repeats or (2 if args.quick else 5)
    wanted = args.methods if args.methods is not None else (["gradient"] if args.quick else None)

    torch.manual_seed(0)
    model = make_model()
    f, params = fxattr.functionalize(model, input_shape=(3, 32, 32))
    images = torch.randn(batch, 3, 32, 32)
    labels = torch.randint(10, (batch,))
    print(f"batch of {batch} images 3x32x32, a {sum(p.numel() for p in model.parameters())}-parameter "
          f"CNN, {torch.get_num_threads()} threads, torch {torch.__version__}, backend {args.backend}\n")
    print(f"{'explainer':<32} {'eager ex/s':>11} {'compiled ex/s':>14} {'speed-up':>9} "
          f"{'compile s':>10} {'max |diff|':>11}")
    results = {}
    for label, attribute, config in METHODS:
        if wanted is not None and attribute not in wanted:
            continue
        method = getattr(fxattr, attribute, None)
        if method is None:
            print(f"{label:<32} skipped: fxattr.{attribute} is not in this version of fxattr")
            continue
        batched = torch.vmap(method(f, **config), in_dims=(None, 0, 0))
        eager = throughput(batched, (params, images, labels), repeats)
        note = ""
        for fullgraph in (True, False):
            torch._dynamo.reset()
            compiled_fn = torch.compile(batched, fullgraph=fullgraph, backend=args.backend)
            try:
                start = time.perf_counter()
                compiled_out = compiled_fn(params, images, labels)
                compile_seconds = time.perf_counter() - start
                compiled = throughput(compiled_fn, (params, images, labels), repeats)
                error = None
                break
            except Exception as failure:  # noqa: BLE001 - retry with graph breaks, then report
                error = failure
                note = f"  (fullgraph=True failed: {str(failure).splitlines()[0][:120]}; with graph breaks)"
        if error is not None:
            print(f"{label:<32} {eager:>11.0f}   compile failed: {type(error).__name__}: "
                  f"{str(error).splitlines()[0][:200]}")
            results[label] = {"eager": eager, "error": str(error)}
            continue
        diff = (compiled_out - batched(params, images, labels)).abs().max().item()
        print(f"{label:<32} {eager:>11.0f} {compiled:>14.0f} {compiled / eager:>8.2f}x "
              f"{compile_seconds:>10.1f} {diff:>11.2e}{note}")
        results[label] = {"eager": eager, "compiled": compiled, "compile_seconds": compile_seconds,
                          "max_diff": diff, "fullgraph": not note}
    return results


if __name__ == "__main__":
    main()
