#!/usr/bin/env python
"""fxattr.metrics against Quantus 0.6.0: localisation and complexity metrics, ONE process.

Times Quantus's metric call (``metric(model=..., x_batch=..., a_batch=..., s_batch=...)``, numpy)
and fxattr's (``torch.vmap`` of the per-example metric over the batch) on the same random
attributions and box masks, interleaved repeat by repeat, and reports the median process CPU time
(1 thread) of each, the ratio, and the largest relative difference of the scores. These metrics
never call the model: Quantus's time is mostly its per-call preprocessing, so the ratio shrinks as
the images grow.

    python bench/metrics_localisation_bench.py                  # 1x32x32, batch 256
    python bench/metrics_localisation_bench.py --size 224 --batch 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import fxattr  # noqa: E402
import fxattr.metrics  # noqa: E402

CASES = [
    ("PointingGame", "pointing_game", {}),
    ("AttributionLocalisation", "attribution_localisation", {}),
    ("TopKIntersection", "top_k_intersection", {"k": 100}),
    ("RelevanceRankAccuracy", "relevance_rank_accuracy", {}),
    ("RelevanceMassAccuracy", "relevance_mass_accuracy", {}),
    ("AUC", "auc", {}),
    ("Sparseness", "sparseness", {}),
    ("Complexity", "complexity", {}),
    ("EffectiveComplexity", "effective_complexity", {"normalise": False}),
]
NO_MASK = ("sparseness", "complexity", "effective_complexity")


def cpu_seconds(fn):
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import quantus

    size, batch = args.size, args.batch
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(size * size, 10)).eval()
    f, params = fxattr.functionalize(model)
    x = torch.rand(batch, 1, size, size, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    masks = torch.zeros(batch, 1, size, size, dtype=torch.bool)
    masks[:, :, size // 4: size * 5 // 8, size // 5: size * 3 // 4] = True
    a = torch.randn(batch, 1, size, size, generator=generator) + masks
    x_np, y_np, s_np = x.numpy(), y.numpy(), masks.numpy().astype(np.float32)

    print(f"- torch {torch.__version__}, quantus {quantus.__version__}, 1 thread, process CPU time, "
          f"median of {args.repeats} interleaved repeats; batch {batch}, 1x{size}x{size}, float32")
    print("\n| metric | Quantus 0.6.0 | fxattr (vmap) | speed-up | max rel. difference |")
    print("|---|---:|---:|---:|---:|")
    for quantus_name, name, config in CASES:
        reference = getattr(quantus, quantus_name)(disable_warnings=True, **config)
        metric = getattr(fxattr.metrics, name)(f, **config)
        with_mask = name not in NO_MASK

        def run_quantus():
            return np.asarray(reference(model=model, x_batch=x_np, y_batch=y_np, a_batch=a.numpy().copy(),
                                        s_batch=s_np if with_mask else None), dtype=np.float64)

        if with_mask:
            batched = torch.vmap(metric, in_dims=(None, 0, 0, 0, 0))

            def run_fxattr():
                return batched(params, x, y, a, masks)
        else:
            batched = torch.vmap(metric, in_dims=(None, 0, 0, 0))

            def run_fxattr():
                return batched(params, x, y, a)

        times_q, times_f = [], []
        for _ in range(args.repeats):
            tq, expected = cpu_seconds(run_quantus)
            tf, got = cpu_seconds(run_fxattr)
            times_q.append(tq)
            times_f.append(tf)
        got = got.double().numpy()
        difference = np.max(np.abs(got - expected) / np.maximum(np.abs(expected), 1e-12))
        q, m = statistics.median(times_q), statistics.median(times_f)
        print(f"| {name} | {1e3 * q:.1f} ms | {1e3 * m:.2f} ms | {q / m:.0f}x | {difference:.1e} |")


if __name__ == "__main__":
    main()
