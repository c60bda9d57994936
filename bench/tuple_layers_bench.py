"""Layer attributions on a layer returning two tensors (issue 14 item 1): fxattr.layers against
captum's Layer* classes, same model, same process, same numbers.

A CNN whose block returns its two convolution branches as a tuple (tests/layers/test_tuple_layers.py's
``TwoWay``, widened: 16 + 16 channels at 32x32), batch 8, float32, 1 thread, process CPU time,
median of ``--repeats`` after a warm-up; each row reports the max relative difference over both
parts (they compute the same quantity).

    python bench/tuple_layers_bench.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxattr
from layers_bench import timed  # bench/ is on sys.path when run as a script
import fxattr.layers as L


class TwoWay(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.a = nn.Conv2d(width, width, 3, padding=1)
        self.b = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        return self.b(x).relu(), torch.tanh(self.a(x))


class Net(nn.Module):
    def __init__(self, width=16, size=32):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.block = TwoWay(width)
        self.head = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1, stride=2), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(width * (size // 2) ** 2, 10))

    def forward(self, x):
        b, a = self.block(torch.relu(self.stem(x)))
        return self.head(torch.cat([a, b], 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import captum.attr as captum
    torch.manual_seed(0)
    model = Net().eval()
    f, params = fxattr.functionalize(model)
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.arange(args.batch) % 10
    steps = args.steps
    cases = [
        ("LayerGradientXActivation", L.layer_gradient_x_activation(f, layer="block"),
         lambda: captum.LayerGradientXActivation(model, model.block).attribute(x, target=t)),
        (f"LayerIntegratedGradients ({steps} steps)", L.layer_integrated_gradients(f, layer="block", steps=steps,
                                                                                 chunk_size=None),
         lambda: captum.LayerIntegratedGradients(model, model.block).attribute(x, target=t, n_steps=steps)),
        (f"LayerConductance ({steps} steps)", L.layer_conductance(f, layer="block", steps=steps, chunk_size=None),
         lambda: captum.LayerConductance(model, model.block).attribute(x, target=t, n_steps=steps)),
    ]
    print(f"torch {torch.__version__}, 1 thread, batch {args.batch}, 3x32x32, float32, process CPU time, "
          f"median of {args.repeats}")
    print("| captum class (tuple layer, 2 parts) | fxattr | captum | fxattr speed-up | max rel. diff |")
    print("|---|---:|---:|---:|---:|")
    for name, explain, theirs_fn in cases:
        batched = torch.vmap(explain, in_dims=(None, 0, 0))
        t_ours, ours = timed(lambda run=batched: run(params, x, t), args.repeats)
        t_theirs, theirs = timed(theirs_fn, args.repeats)
        diff = max(float((o - w.detach()).abs().max() / w.detach().abs().max()) for o, w in zip(ours, theirs))
        print(f"| {name} | {t_ours * 1e3:.0f} ms | {t_theirs * 1e3:.0f} ms | {t_theirs / t_ours:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
