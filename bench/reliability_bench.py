"""What the private module view costs (issue 10): ``f(params, x)`` runs on a fresh structural copy
of the module tree per call (no parameter swapping into the user's module) instead of
``functional_call`` on the module itself. Measured in one process as ratios:

- the view alone (building it) per call, and per module;
- a vmapped gradient (batch 8) through ``fxattr.gradient`` against the same computation with
  ``torch.func.functional_call`` on the user's module (the old path).

Run: ``python bench/reliability_bench.py`` (1 thread, process CPU time, median of repeats).

``python bench/reliability_bench.py --half`` measures the half-precision policy instead: a float16 /
bfloat16 resnet18 explained in float32 from its rounded weights (the policy, ``fxattr.<method>``)
against the same computation in the half dtype itself (``explain.__wrapped__``, the pre-policy
path) and against the float32 model, on CPU (where half-precision kernels are slow).
"""

from __future__ import annotations

import copy
import statistics
import sys
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


def half(repeats: int = 3):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    xs, ts = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    methods = {"gradient": lambda f: fxattr.gradient(f),
               "LRP epsilon_plus": lambda f: fxattr.lrp(f, composite="epsilon_plus"),
               "DeepLIFT": lambda f: fxattr.deeplift(f)}
    print("| method | dtype | in the half dtype (ms) | policy: float32 from the rounded weights (ms) "
          "| float32 model (ms) | policy / half | policy / float32 |")
    print("|---|---|---|---|---|---|---|")
    f32, p32 = fxattr.functionalize(model)
    for dtype in (torch.float16, torch.bfloat16):
        f, params = fxattr.functionalize(copy.deepcopy(model).to(dtype))
        x = xs.to(dtype)
        for name, build in methods.items():
            explain = build(f)
            native = cpu_time(lambda: torch.vmap(explain.__wrapped__, in_dims=(None, 0, 0))(params, x, ts),
                              repeats=repeats, warmup=1)
            policy = cpu_time(lambda: torch.vmap(explain, in_dims=(None, 0, 0))(params, x, ts),
                              repeats=repeats, warmup=1)
            full = cpu_time(lambda: torch.vmap(build(f32), in_dims=(None, 0, 0))(p32, xs, ts),
                            repeats=repeats, warmup=1)
            print(f"| {name} | {str(dtype)[6:]} | {native * 1e3:.0f} | {policy * 1e3:.0f} | {full * 1e3:.0f} "
                  f"| {policy / native:.2f} | {policy / full:.2f} |", flush=True)


def main():
    if "--half" in sys.argv:
        return half()
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
