#!/usr/bin/env python
"""captum's options in fxattr against captum with the same options, in one process (issue 14 item 5).

A small two-input CNN (an image 3x32x32 and a vector of 16, random init, eval): feature ablation
and occlusion of the tuple input (fxattr ``torch.vmap`` over the batch, ``chunk_size`` perturbations
per example per forward; captum with ``perturbations_per_eval`` holding the same rows per forward,
and with its default 1), DeepLiftShap and GradientShap with convergence deltas, and the cost of
``show_progress`` (a callback per chunk: the chunks become separate vmapped calls). Process CPU
time, 1 thread, the median of interleaved repeats; every fxattr result is checked against captum's.

    python bench/captum_options_bench.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

import fxattr

warnings.filterwarnings("ignore")


class ImageAndVector(nn.Module):
    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                                   nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.vector = nn.Sequential(nn.Linear(16, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, image, vector):
        return self.head(self.image(image) + self.vector(vector))


def measure(cases: dict, repeats: int) -> dict:
    """``{name: (median seconds, result)}``: one warm-up call each, then the repeats interleaved."""
    outs = {name: fn() for name, fn in cases.items()}
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    return {name: (statistics.median(times[name]), outs[name]) for name in cases}


def close(ours, theirs):
    ours = ours if isinstance(ours, tuple) else (ours,)
    theirs = theirs if isinstance(theirs, tuple) else (theirs,)
    return max(float((a - b.to(a.dtype)).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(ours, theirs))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from captum import attr as captum

    torch.manual_seed(0)
    model = ImageAndVector().eval()
    f, params = fxattr.functionalize(model)
    b = args.batch
    x = (torch.randn(b, 3, 32, 32), torch.randn(b, 16))
    t = torch.arange(b) % 10
    cells = (torch.arange(32)[:, None] // 4 * 8 + torch.arange(32)[None, :] // 4)[None]  # 64 superpixels
    masks = (cells, 64 + torch.arange(16) // 4)  # and 4 groups of the vector: 68 features
    batched = lambda e: torch.vmap(e, in_dims=(None, 0, 0))  # noqa: E731
    rows = []

    # feature ablation of the tuple input
    fx = batched(fxattr.feature_ablation(f, feature_mask=masks, chunk_size=8))
    calls = []
    fx_progress = batched(fxattr.feature_ablation(f, feature_mask=masks, chunk_size=8,
                                                  show_progress=lambda d, n: calls.append(d)))
    fa = captum.FeatureAblation(model)
    fx_all = batched(fxattr.feature_ablation(f, feature_mask=masks, chunk_size=None))
    cases = {
        "fxattr (chunk 8)": lambda: fx(params, x, t),
        "fxattr (all 68 at once)": lambda: fx_all(params, x, t),
        "captum (perturbations_per_eval=68)": lambda: fa.attribute(x, target=t, feature_mask=tuple(m[None] for m in masks),
                                                                   perturbations_per_eval=68),
        "fxattr, show_progress callback": lambda: fx_progress(params, x, t),
        "captum (perturbations_per_eval=8)": lambda: fa.attribute(x, target=t, feature_mask=tuple(m[None] for m in masks),
                                                                  perturbations_per_eval=8),
        "captum (default, 1)": lambda: fa.attribute(x, target=t, feature_mask=tuple(m[None] for m in masks)),
    }
    results = measure(cases, args.repeats)
    base = results["fxattr (chunk 8)"][0]
    error = close(results["fxattr (chunk 8)"][1], results["captum (default, 1)"][1])
    for name, (seconds, _) in results.items():
        rows.append(("feature ablation, tuple x (68 groups)", name, seconds, seconds / base, error))

    # occlusion of the tuple input
    windows, strides = ((3, 8, 8), (4,)), ((3, 4, 4), (4,))
    fx = batched(fxattr.occlusion(f, window=windows, stride=strides, chunk_size=16))
    oc = captum.Occlusion(model)
    cases = {
        "fxattr (chunk 16)": lambda: fx(params, x, t),
        "captum (perturbations_per_eval=16)": lambda: oc.attribute(x, sliding_window_shapes=windows, strides=strides,
                                                                   target=t, perturbations_per_eval=16),
        "captum (default, 1)": lambda: oc.attribute(x, sliding_window_shapes=windows, strides=strides, target=t),
    }
    results = measure(cases, args.repeats)
    base = results["fxattr (chunk 16)"][0]
    error = close(results["fxattr (chunk 16)"][1], results["captum (default, 1)"][1])
    for name, (seconds, _) in results.items():
        rows.append(("occlusion, tuple x (53 windows)", name, seconds, seconds / base, error))

    # DeepLiftShap with deltas, 8 baselines (one input: captum's DeepLift needs one ReLU module per use)
    image_model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                                nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                nn.Linear(128, 10)).eval()
    fi, pi = fxattr.functionalize(image_model)
    refs = torch.randn(8, 3, 32, 32)
    fx = batched(fxattr.deeplift_shap(fi, baselines=refs, return_convergence_delta=True))
    ds = captum.DeepLiftShap(image_model)
    cases = {"fxattr": lambda: fx(pi, x[0], t)[0],
             "captum": lambda: ds.attribute(x[0], baselines=refs, target=t, return_convergence_delta=True)[0]}
    results = measure(cases, args.repeats)
    base = results["fxattr"][0]
    error = close(results["fxattr"][1], results["captum"][1].detach())
    for name, (seconds, _) in results.items():
        rows.append(("DeepLiftShap + deltas (8 baselines)", name, seconds, seconds / base, error))

    # GradientShap with deltas, a callable reference set, 16 samples (draws differ: no error column)
    fx = torch.vmap(fxattr.gradient_shap(fi, baselines=lambda: refs, samples=16, sigma=0.1,
                                         return_convergence_delta=True), in_dims=(None, 0, 0), randomness="different")
    gs = captum.GradientShap(image_model)
    cases = {"fxattr": lambda: fx(pi, x[0], t)[0],
             "captum": lambda: gs.attribute(x[0], baselines=lambda: refs, n_samples=16, stdevs=0.1, target=t,
                                            return_convergence_delta=True)[0]}
    results = measure(cases, args.repeats)
    base = results["fxattr"][0]
    for name, (seconds, _) in results.items():
        rows.append(("GradientShap + deltas (16 samples)", name, seconds, seconds / base, float("nan")))

    print(f"batch {b}, 1 thread, process CPU time, median of {args.repeats}\n")
    print("| case | run | time | vs fxattr | max rel. difference to captum |")
    print("|---|---|---:|---:|---:|")
    for case, name, seconds, ratio, error in rows:
        err = "" if error != error else f"{error:.1e}"
        print(f"| {case} | {name} | {seconds * 1e3:.0f} ms | {ratio:.2f}x | {err} |")


if __name__ == "__main__":
    main()
