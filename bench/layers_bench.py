#!/usr/bin/env python
"""fxattr.layers against captum's Layer* / Neuron* classes, same process, same numbers.

resnet18 (10 classes, random init, BN statistics calibrated on random data), batch 4, 3x64x64,
float32, 1 thread, process CPU time, median of ``--repeats``; each row also reports the max
relative difference between the two results (they compute the same quantity).

    python bench/layers_bench.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxattr
import fxattr.layers as L
from tests.layers.models import resnet18


def timed(fn, repeats):
    out = fn()  # warm-up (tracing, caches)
    times = []
    for _ in range(repeats):
        start = time.process_time()
        out = fn()
        times.append(time.process_time() - start)
    return statistics.median(times), out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from captum import attr as captum

    model = resnet18(torch.float32, size=args.size)
    f, params = fxattr.functionalize(model)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    t = torch.arange(args.batch) % 10
    units = torch.arange(16) * 37  # 16 neurons of layer3 (256 x 4 x 4 at 64 px)

    def batched(explain):
        return lambda: torch.vmap(explain, in_dims=(None, 0, 0))(params, x, t)

    def neurons_fx():
        explain = fxattr.integrated_gradients(L.neuron(f, layer="layer3"), steps=8)
        inner = torch.vmap(explain, in_dims=(None, None, 0))  # all neurons of one example
        return torch.vmap(inner, in_dims=(None, 0, None))(params, x, units).transpose(0, 1)

    def neurons_captum():
        shape = (256, args.size // 16, args.size // 16)
        method = captum.NeuronIntegratedGradients(model, model.layer3)
        out = []
        for u in units.tolist():
            index = []
            for s in reversed(shape):
                index.append(u % s)
                u //= s
            out.append(method.attribute(x, tuple(reversed(index)), n_steps=8))
        return torch.stack(out)

    rows = [
        ("LayerGradientXActivation layer4",
         batched(L.layer_gradient_x_activation(f, layer="layer4")),
         lambda: captum.LayerGradientXActivation(model, model.layer4).attribute(x, target=t)),
        ("LayerIntegratedGradients layer3, 16 steps",
         batched(L.layer_integrated_gradients(f, layer="layer3", steps=16)),
         lambda: captum.LayerIntegratedGradients(model, model.layer3).attribute(x, target=t, n_steps=16)),
        ("LayerConductance layer3, 16 steps",
         batched(L.layer_conductance(f, layer="layer3", steps=16)),
         lambda: captum.LayerConductance(model, model.layer3).attribute(x, target=t, n_steps=16)),
        ("NeuronIntegratedGradients layer3, 16 neurons x 8 steps",
         neurons_fx, neurons_captum),
    ]
    print("| method | fxattr | captum | speed-up | max rel. diff |\n|---|---:|---:|---:|---:|")
    for name, ours_fn, theirs_fn in rows:
        ours_time, ours = timed(ours_fn, args.repeats)
        theirs_time, theirs = timed(theirs_fn, args.repeats)
        theirs = theirs.detach()
        diff = float((ours - theirs).abs().max() / theirs.abs().max())
        print(f"| {name} | {ours_time:.2f} s | {theirs_time:.2f} s | {theirs_time / ours_time:.2f}x | {diff:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
