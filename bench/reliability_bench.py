"""What the private module view costs (issue 10): ``f(params, x)`` runs on a fresh structural copy
of the module tree per call (no parameter swapping into the user's module) instead of
``functional_call`` on the module itself. Measured in one process as ratios:

- the view alone (building it) per call, and per module;
- a vmapped gradient (batch 8) through ``fxattr.gradient`` against the same computation with
  ``torch.func.functional_call`` on the user's module (the old path).

Run: ``python bench/reliability_bench.py`` (1 thread, process CPU time, median of repeats).
"""

from __future__ import annotations

import statistics
import time

import torch
import torchvision
from torch import nn

import fxattr
from fxattr.functional import EvalBatchNormAsElementwise, stateless_view


def cpu_time(fn, repeats=9, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def old_gradient(model, params, xs, targets):
    def one(x, t):
        def out(x_):
            with EvalBatchNormAsElementwise():
                return torch.func.functional_call(model, params, (x_[None],))[0][t]
        return torch.func.grad(out)(x)
    return torch.vmap(one)(xs, targets)


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    models = {
        "mlp (3 layers)": (nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                         nn.Linear(64, 10)).eval(), (64,)),
        "resnet18 (64 px)": (torchvision.models.resnet18().eval(), (3, 64, 64)),
        "resnet50 (64 px)": (torchvision.models.resnet50().eval(), (3, 64, 64)),
    }
    for name, (model, shape) in models.items():
        f, params = fxattr.functionalize(model)
        modules = sum(1 for _ in model.modules())
        view = cpu_time(lambda: stateless_view(model), repeats=51)
        xs, ts = torch.randn(8, *shape), torch.randint(0, 10, (8,))
        new = cpu_time(lambda: torch.vmap(fxattr.gradient(f), in_dims=(None, 0, 0))(params, xs, ts))
        old = cpu_time(lambda: old_gradient(model, params, xs, ts))
        rows.append((name, modules, view * 1e6, view * 1e6 / modules, old * 1e3, new * 1e3, new / old))
    print("| model | modules | view per call (us) | per module (us) | old vmapped gradient, batch 8 (ms) "
          "| with the view (ms) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| {} | {} | {:.0f} | {:.2f} | {:.2f} | {:.2f} | {:.3f} |".format(*row))


if __name__ == "__main__":
    main()
