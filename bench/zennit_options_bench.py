"""zennit's options in fxattr against zennit itself: cost of ``beta_smooth``, ``excitation_backprop``
and the stabiliser's ``norm_scale`` / ``clip``, and of a canonizer, as ratios to one vmapped
``fxattr.gradient`` measured in the same process.

Same model (random-init torchvision resnet18, random biases, randomised BN statistics with eps = 0
so that zennit's canonized twin computes the same function; zennit's twin with one out-of-place
ReLU per call, see tests/propagation/test_zennit_options.py), same batch, one thread, eager;
process CPU time (``time.process_time``), the best of ``--repeats`` after one warm-up. Each pair is
checked to agree before it is timed.

    python bench/zennit_options_bench.py            # resnet18, batch 8, 64x64
    python bench/zennit_options_bench.py --quick
"""

from __future__ import annotations

import argparse
import copy
import os
import time
import types

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

import fxattr
from fxattr.propagation import rules


def build(size: int, batch: int):
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(0.1 * torch.randn(bias.shape, generator=gen))
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=gen))
                module.eps = 0.0
    model.eval()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        targets = model(x).argmax(1)
    return model, x, targets


def zennit_twin(model):
    """One out-of-place ReLU per call (zennit's ReLUBetaSmooth is off otherwise)."""
    import torchvision
    twin = copy.deepcopy(model)

    def forward(block, x):
        identity = x if block.downsample is None else block.downsample(x)
        out = block.relu(block.bn1(block.conv1(x)))
        return block.relu_out(block.bn2(block.conv2(out)) + identity)
    for block in twin.modules():
        if isinstance(block, torchvision.models.resnet.BasicBlock):
            block.relu_out = nn.ReLU()
            block.forward = types.MethodType(forward, block)
    for module in twin.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return twin


def best_time(fn, repeats: int):
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        result = fn()
        times.append(time.process_time() - start)
    return min(times), result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.size, args.batch, args.repeats = 32, 2, 1
    torch.set_num_threads(1)
    from zennit.attribution import Gradient
    from zennit.composites import BetaSmooth, EpsilonPlus, ExcitationBackprop
    from zennit.core import Stabilizer
    from zennit.torchvision import ResNetCanonizer

    model, x, targets = build(args.size, args.batch)
    f, params = fxattr.functionalize(model)
    with torch.no_grad():
        out = model(x)
    one_hot = torch.zeros_like(out).scatter(1, targets[:, None], 1.0)
    value = one_hot * out

    def fx(explain):
        batched = torch.vmap(explain, in_dims=(None, 0, 0))
        return lambda: batched(params, x, targets)

    def zn(composite, seed):
        twin = zennit_twin(model)

        def run():
            with Gradient(model=twin, composite=composite) as attributor:
                return attributor(x, seed)[1]
        return run

    floor, _ = best_time(fx(fxattr.gradient(f)), args.repeats)
    norm = rules.stabiliser(1e-6, norm_scale=True)
    rows = [
        ("beta_smooth (beta 10)", fx(fxattr.beta_smooth(f)), zn(BetaSmooth(), one_hot)),
        ("excitation_backprop", fx(fxattr.lrp(f, composite="excitation_backprop")),
         zn(ExcitationBackprop(canonizers=[ResNetCanonizer()]), value)),
        ("epsilon_plus", fx(fxattr.lrp(f, composite="epsilon_plus")),
         zn(EpsilonPlus(canonizers=[ResNetCanonizer()]), value)),
        ("epsilon_plus, norm_scale stabiliser", fx(fxattr.lrp(f, composite="epsilon_plus", stabiliser=norm)),
         zn(EpsilonPlus(stabilizer=Stabilizer(1e-6, norm_scale=True), canonizers=[ResNetCanonizer()]), value)),
        ("epsilon_plus, clip stabiliser", fx(fxattr.lrp(f, composite="epsilon_plus",
                                                        stabiliser=rules.stabiliser(1e-6, clip=True))),
         zn(EpsilonPlus(stabilizer=Stabilizer(1e-6, clip=True), canonizers=[ResNetCanonizer()]), value)),
        ("epsilon_plus + merge_batch_norm canonizer",
         fx(fxattr.lrp(f, composite="epsilon_plus", canonizers=[fxattr.lrp.merge_batch_norm()])), None),
    ]
    print(f"resnet18, batch {args.batch}, {args.size}x{args.size}, float32, 1 thread; fxattr.gradient "
          f"(vmapped) = {floor * 1e3:.1f} ms")
    print("| method | fxattr / gradient | zennit / gradient | zennit / fxattr | max rel. diff |")
    print("|---|---:|---:|---:|---:|")
    for name, ours, theirs in rows:
        t_ours, r_ours = best_time(ours, args.repeats)
        if theirs is None:
            print(f"| {name} | {t_ours / floor:.2f}x | - | - | - |")
            continue
        t_theirs, r_theirs = best_time(theirs, args.repeats)
        diff = float((r_ours - r_theirs).abs().max() / r_theirs.abs().max())
        print(f"| {name} | {t_ours / floor:.2f}x | {t_theirs / floor:.2f}x | {t_theirs / t_ours:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
