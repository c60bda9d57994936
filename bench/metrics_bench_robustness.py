#!/usr/bin/env python
"""fxattr.metrics against Quantus 0.6.0: max_sensitivity and mprt, same model, batch, settings, ONE process.

max_sensitivity re-explains every noisy copy with the gradient: Quantus loops over ``nr_samples``
(one batched captum ``Saliency`` call and numpy norms per sample, its ``quantus.explain`` with
``method="Gradient"``); fxattr vmaps the gradient over all noisy copies (``chunk_size`` at a time)
and over the batch. MPRT explains the batch with every randomised model: Quantus deep-copies the
model, re-initialises one layer at a time and calls the explainer per layer; fxattr explains all
parameter sets in one vmap (the sets built inside it with ``torch.where`` from seeded
re-initialisations made once, when the metric is built -- included in the fxattr time).

Both run on a small CNN (random weights, float32, eval mode) at 1x28x28, batch 8, interleaved repeat
by repeat so that CPU contention hits both alike; the table reports the median process CPU time
(1 thread) of each, the speed ratio and the autograd floor (one plain-torch forward + backward of
all the gradient rows the metric needs, in one batch), and checks that both give the same numbers:
max-sensitivity on the same noise (Quantus's ``perturb_func`` replaced by a replay of fxattr's
draws for that call), MPRT's whole layer-by-layer Spearman curve.

    python bench/metrics_bench_robustness.py --quick     # smoke test (seconds)
    python bench/metrics_bench_robustness.py             # 1x28x28, batch 8, 50 noise samples
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import quantus  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fxattr  # noqa: E402
import fxattr.metrics as metrics  # noqa: E402


def small_cnn(channels: int, size: int, classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * (size // 4) ** 2, classes)).eval()


def quantus_gradient(model, inputs, targets, **kwargs):
    """Quantus's own explainer: captum Saliency without abs (``quantus.explain(method="Gradient")``)."""
    return quantus.explain(model, inputs, targets, method="Gradient", device="cpu")


def cpu_seconds(fn):
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1x16x16, batch 4, 8 samples, 1 repeat")
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--samples", type=int, default=50, help="max_sensitivity's nr_samples")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=16, help="fxattr chunk_size (0 = None)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd fxattr column")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.samples, args.repeats = 16, 4, 8, 1
        args.no_compile = True
    torch.set_num_threads(args.threads)
    chunk = args.chunk or None

    model = small_cnn(args.channels, args.size)
    f, params = fxattr.functionalize(model)
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, args.channels, args.size, args.size, generator=generator)
    y = torch.randint(0, 10, (args.batch,), generator=generator)
    gradient = fxattr.gradient(f)
    a = torch.vmap(gradient, in_dims=(None, 0, 0))(params, x, y)
    x_np, y_np, a_np = x.numpy(), y.numpy(), a.numpy()
    noise = 0.2 * (2 * torch.rand(args.batch, args.samples, *x.shape[1:], generator=generator) - 1)

    def quantus_max_sensitivity(replay):
        metric = quantus.MaxSensitivity(nr_samples=args.samples, lower_bound=0.2, disable_warnings=True)
        if replay:
            draws = iter(noise.transpose(0, 1))
            metric.perturb_func = lambda arr, indices, **kw: arr + next(draws).reshape(arr.shape).numpy()
        return np.asarray(metric(model=model, x_batch=x_np, y_batch=y_np, a_batch=a_np,
                                 explain_func=quantus_gradient), dtype=np.float64)

    def fxattr_max_sensitivity(replay):
        metric = metrics.max_sensitivity(f, explain=gradient, nr_samples=args.samples, lower_bound=0.2,
                                         chunk_size=chunk)
        if replay:
            run = torch.vmap(lambda xx, t, aa, n: metric(params, xx, t, aa, noise=n))
            return run(x, y, a, noise).double().numpy()
        run = torch.vmap(metric, in_dims=(None, 0, 0, 0), randomness="different")
        return run(params, x, y, a).double().numpy()

    def quantus_mprt():
        scores = quantus.MPRT(disable_warnings=True)(model=model, x_batch=x_np, y_batch=y_np, a_batch=a_np,
                                                     explain_func=quantus_gradient)
        return np.array([np.asarray(v, dtype=np.float64) for v in scores.values()]).T

    def fxattr_mprt():
        metric = metrics.mprt(f, explain=gradient, chunk_size=chunk)  # seeded re-initialisation included
        return torch.vmap(metric, in_dims=(None, 0, 0, 0))(params, x, y, a).double().numpy()

    # the same numbers first (float32 on both sides: compare to 1e-4)
    checks = {
        "max_sensitivity": np.abs(quantus_max_sensitivity(True) - fxattr_max_sensitivity(True)).max()
        / np.abs(fxattr_max_sensitivity(True)).max(),
        "mprt": np.abs(quantus_mprt() - fxattr_mprt()).max(),
    }
    layers = len(metrics.mprt(f, explain=gradient).layer_names)

    def floor(rows):
        """The autograd floor: ONE plain-torch forward + backward to the input of ``rows`` examples
        (the gradients the metric needs, without any metric arithmetic)."""
        xx = x.repeat(rows // args.batch, 1, 1, 1).requires_grad_()
        tt = y.repeat(rows // args.batch)

        def run():
            out = model(xx)
            return torch.autograd.grad(out.gather(1, tt[:, None]).sum(), xx)[0]
        return run

    cases = {
        "max_sensitivity": (lambda: quantus_max_sensitivity(False), lambda: fxattr_max_sensitivity(False),
                            floor(args.batch * args.samples), args.batch * args.samples),
        "mprt": (quantus_mprt, fxattr_mprt, floor(args.batch * (layers + 1)), args.batch * (layers + 1)),
    }
    compiled, compile_seconds = {}, {}
    if not args.no_compile:
        # compiled: the metric built once outside, the noise passed in (replayed) -- the same arithmetic
        sensitivity = metrics.max_sensitivity(f, explain=gradient, nr_samples=args.samples, lower_bound=0.2,
                                              chunk_size=chunk)
        randomisation = metrics.mprt(f, explain=gradient, chunk_size=chunk)
        run_sensitivity = torch.compile(lambda p, xx, t, aa, n: torch.vmap(
            lambda *r: sensitivity(p, *r[:3], noise=r[3]))(xx, t, aa, n))
        run_mprt = torch.compile(
            lambda p, xx, t, aa: torch.vmap(randomisation, in_dims=(None, 0, 0, 0))(p, xx, t, aa))
        compiled = {"max_sensitivity": lambda: run_sensitivity(params, x, y, a, noise),
                    "mprt": lambda: run_mprt(params, x, y, a)}
        eager = {"max_sensitivity": fxattr_max_sensitivity(True), "mprt": fxattr_mprt()}
        for name, fn in compiled.items():
            start = time.perf_counter()
            out = fn().double().numpy()
            compile_seconds[name] = time.perf_counter() - start
            assert np.allclose(out, eager[name], rtol=1e-4, atol=1e-6), (name, out, eager[name])

    for _, ours, base, _ in cases.values():  # warm-up (first vmap traces, allocator)
        ours()
        base()
    rows = []
    for name, (theirs, ours, base, count) in cases.items():
        times_q, times_f, times_b, times_c = [], [], [], []
        for _ in range(args.repeats):
            times_q.append(cpu_seconds(theirs)[0])
            times_f.append(cpu_seconds(ours)[0])
            times_b.append(cpu_seconds(base)[0])
            if name in compiled:
                times_c.append(cpu_seconds(compiled[name])[0])
        tq, tf, tb = (statistics.median(t) for t in (times_q, times_f, times_b))
        tc = statistics.median(times_c) if times_c else float("nan")
        rows.append((name, count, tb, tq, tf, tc, checks[name]))

    print(f"\n{args.channels}x{args.size}x{args.size}, batch {args.batch}, small CNN (float32), "
          f"{args.threads} thread(s), process CPU time, median of {args.repeats}; max_sensitivity "
          f"nr_samples={args.samples}, mprt {layers} layers top-down, fxattr chunk_size={chunk}\n")
    print("| metric | gradient rows | floor (s) | Quantus 0.6.0 (s) | fxattr (s) | speed-up | "
          "Quantus / floor | fxattr / floor | fxattr compiled (s) | speed-up compiled | max difference |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, count, tb, tq, tf, tc, diff in rows:
        kind = "relative" if name == "max_sensitivity" else "absolute"
        compiled_cells = f"{tc:.3f} | {tq / tc:.1f}x" if tc == tc else "- | -"
        print(f"| {name} | {count} | {tb:.3f} | {tq:.3f} | {tf:.3f} | {tq / tf:.1f}x | {tq / tb:.1f}x | "
              f"{tf / tb:.2f}x | {compiled_cells} | {diff:.1e} ({kind}) |")
    if compile_seconds:
        print("\ncompile time (first call, wall clock, excluded): "
              + ", ".join(f"{k} {v:.0f} s" for k, v in compile_seconds.items()))


if __name__ == "__main__":
    main()
