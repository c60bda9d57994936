#!/usr/bin/env python
"""fxattr benchmark: every explainer against the autograd floor and its peer, in ONE process.

For each model (torchvision resnet18 and vgg11 with random weights, and a small CNN; eval mode) and
each method, the script times, interleaved repeat by repeat so that CPU contention hits all alike:

- the **autograd floor**: what a plain-torch user writes for saliency -- one forward of the batch
  and one ``torch.autograd.grad`` of the selected logits' sum with respect to the input, with the
  parameters not requiring grad (fxattr's params are detached too, and a frozen model is the
  fastest plain-torch version, so this is the strictest floor; the variant with parameters
  requiring grad, nn.Module's default, is timed once per model as ``floor_params_grad``);
- the fxattr explainer applied to the batch as ``torch.vmap(explain, in_dims=(None, 0, 0))``,
  eager, and the same under ``torch.compile`` (compile time excluded from the median and reported
  separately: the first call's time);
- the peer implementations (captum, zennit, pytorch-grad-cam, or a plain-torch loop), set up the
  way their docs show, on the same frozen model copy.

It prints medians over ``--repeats`` and ratios to the floor measured in the same block (and to the
fastest peer), checks that fxattr and a deterministic peer agree (max relative error), and writes a
markdown table to ``bench/results/<device>.md``. Methods that fxattr does not have yet are skipped
with a note. ``--sweep-chunks`` measures integrated gradients' and smoothgrad's ``chunk_size``.

    python bench/bench.py --quick                      # smoke test, small images
    python bench/bench.py                              # full CPU run (tens of minutes on 2 cores)
    python bench/bench.py --device cuda --repeats 10   # on a GPU
    python bench/bench.py --models resnet18 --methods ig --sweep-chunks
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
import traceback


os.environ.setdefault("TQDM_DISABLE", "1")   # ScoreCAM's progress bars
# On a CPU shared with other processes, OpenMP's default spin-waiting makes every parallel region
# wait for a descheduled thread: resnet18's floor measured 6x slower with 2 threads than with 1
# (and 10x noisier). Passive waiting avoids the worst of it; --threads defaults to 1 on CPU.

import torch  # noqa: E402

import fxattr  # noqa: E402
from harness import CLOCK, HERE, Ctx, build_model, frozen_copy, run_block, sweep_chunks, timed  # noqa: E402
from methods import METHODS  # noqa: E402
from report import fmt_s, markdown  # noqa: E402


# -------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet18,vgg11,small_cnn")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {', '.join(METHODS)}")
    p.add_argument("--device", default="cpu", help="cpu, cuda, or auto (cuda when present)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: see OMP_WAIT_POLICY above; 2 cores shared here)")
    p.add_argument("--steps", type=int, default=32, help="IG steps")
    p.add_argument("--ig-method", default="gausslegendre")
    p.add_argument("--ig-chunk", type=int, default=4, help="fxattr IG chunk_size (0 = None, all steps)")
    p.add_argument("--samples", type=int, default=16, help="smoothgrad samples")
    p.add_argument("--sg-chunk", type=int, default=4, help="fxattr smoothgrad chunk_size (0 = None)")
    p.add_argument("--occlusion-window", type=int, default=None, help="default size/4")
    p.add_argument("--occlusion-stride", type=int, default=None, help="default = window")
    p.add_argument("--rise-masks", type=int, default=None,
                   help="fixed RISE masks (default 32 on CPU, 1000 on CUDA)")
    p.add_argument("--force", action="store_true",
                   help="run ScoreCAM on the torchvision models on CPU too (hours on 2 cores)")
    p.add_argument("--mask-chunk", type=int, default=16,
                   help="masks/windows per forward for the perturbation peers")
    p.add_argument("--block-budget", type=float, default=1200.0,
                   help="seconds of timed repeats per (model, method) block; fewer repeats past it")
    p.add_argument("--heavy-s", type=float, default=60.0,
                   help="blocks whose warm-ups take longer count the warm-up call as a sample")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-methods", default=None,
                   help="compile only these methods (IG's unrolled chunks compiled for 20+ min here)")
    p.add_argument("--compile-models", default=None,
                   help="compile only for these models (compiling resnet18 took ~8 min on the shared CPU)")
    p.add_argument("--quick", action="store_true", help="small images, batch 2, 2 repeats: a smoke test")
    p.add_argument("--sweep-chunks", action="store_true", help="also sweep IG / smoothgrad chunk_size")
    p.add_argument("--sweep-only", action="store_true", help="only the chunk sweep")
    p.add_argument("--sweep-compiled", action="store_true", help="sweep compiled variants too")
    p.add_argument("--ig-chunks", default="0,2,4,8,16")
    p.add_argument("--sg-chunks", default="0,4,8")
    p.add_argument("--out", default=None, help="markdown path (default bench/results/<device>.md)")
    p.add_argument("--clock", default=None, choices=("wall", "process"),
                   help="wall time, or process CPU time (default on CPU: robust to other processes)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.size = min(args.size, 64)
        args.batch = min(args.batch, 2)
        args.repeats = min(args.repeats, 2)
    args.ig_chunks = [int(v) for v in args.ig_chunks.split(",")]
    args.sg_chunks = [int(v) for v in args.sg_chunks.split(",")]
    args.sweep_chunks = args.sweep_chunks or args.sweep_only
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.clock is None:
        args.clock = "process" if device.type == "cpu" and args.threads == 1 else "wall"
    CLOCK["fn"] = time.process_time if args.clock == "process" else time.perf_counter
    if args.rise_masks is None:
        args.rise_masks = 1000 if device.type == "cuda" else 32
    torch._dynamo.config.cache_size_limit = 64
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    # vmap's "performance drop ... batching rule" warnings name the ops that fall back to a loop.
    for name in ("_set_vmap_fallback_warning_enabled", "_set_vmap_fallback_warn_enabled"):
        if hasattr(torch._C._functorch, name):
            getattr(torch._C._functorch, name)(True)
            break
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    rows, sweep_rows, extra = [], [], []
    out_path = args.out or os.path.join(HERE, "results", f"{device.type}{'-quick' if args.quick else ''}.md")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
          f"batch {args.batch}, size {args.size}, repeats {args.repeats}", flush=True)
    for model_name in args.models.split(","):
        model = build_model(model_name).to(device)
        frozen = frozen_copy(model)
        f, params = fxattr.functionalize(model, input_shape=(3, args.size, args.size))
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device)
        with torch.no_grad():
            t = frozen(x).argmax(1)
        # Different targets per example so that a per-example target matters.
        t = (t + torch.arange(args.batch, device=device)) % frozen(x[:1]).shape[1]

        def floor(model=frozen, x=x, t=t):
            xr = x.detach().requires_grad_(True)
            out = model(xr)
            return torch.autograd.grad(out.gather(1, t[:, None]).sum(), xr)[0]

        def floor_params_grad(model=model, x=x, t=t):
            xr = x.detach().requires_grad_(True)
            out = model(xr)
            return torch.autograd.grad(out.gather(1, t[:, None]).sum(), xr)[0]

        timed(floor, device)
        timed(floor_params_grad, device)
        a, b = [], []
        for _ in range(args.repeats):
            a.append(timed(floor, device)[0])
            b.append(timed(floor_params_grad, device)[0])
        extra.append(f"{model_name}: floor {fmt_s(statistics.median(a))} (parameters frozen), "
                     f"{fmt_s(statistics.median(b))} with parameters requiring grad")
        print(f"{model_name}: floor {fmt_s(statistics.median(a))}, params requiring grad "
              f"{fmt_s(statistics.median(b))}", flush=True)
        c = Ctx(model_name, model, frozen, f, params, x, t, args)
        if not args.sweep_only:
            for method in methods:
                try:
                    run_block(rows, model_name, method, c, floor, args, device)
                except Exception:  # noqa: BLE001 - keep the other rows
                    traceback.print_exc()
                with open(out_path, "w") as fh:
                    fh.write(markdown(rows, sweep_rows, extra, args, device))
        if args.sweep_chunks:
            sweep_chunks(sweep_rows, model_name, c, floor, args, device)
        with open(out_path, "w") as fh:
            fh.write(markdown(rows, sweep_rows, extra, args, device))
        del c, model, frozen, f, params
        torch._dynamo.reset()
        gc.collect()
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
