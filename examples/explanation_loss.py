"""Right for the right reasons (Ross, Hughes and Doshi-Velez 2017) with an fxattr explainer in the loss.

The training digits carry a decoy: a 2x2 patch in the top-left corner whose shade encodes the
label (``1 - 0.1 * label``; ``--random-corner`` puts it in a random corner, as in the paper's decoy
MNIST, which on 8x8 digits weakens the shortcut: plain 0.82 against 0.92 decoy-free). A plainly trained model learns the patch -- it is easier than the digit --
and fails on test digits without it. The same model trained with a penalty on its input-gradient
relevance inside the patch,

    loss = cross_entropy + lam * sum((mask * explain(params, x)) ** 2)

where ``explain = fxattr.gradient(f)`` (or ``input_x_gradient``) explains the summed log-probabilities
as in the paper, batched with ``torch.vmap`` and differentiated with respect to the parameters by
``torch.func.grad`` (an exact second derivative, no hooks, no double-backward tricks), learns the
digits instead and stays accurate without the decoy.

    python examples/explanation_loss.py            # about a minute on 2 CPU cores
    python examples/explanation_loss.py --quick    # fewer epochs (used by the tests)
"""

from __future__ import annotations

import argparse
import time
from collections import OrderedDict

import torch
from sklearn.datasets import load_digits
from torch import nn
from tqdm.auto import tqdm

import fxattr

PATCH = 2
ALL_CORNERS = ((0, 0), (0, 8 - PATCH), (8 - PATCH, 0), (8 - PATCH, 8 - PATCH))


def load_data(n_train: int, seed: int = 0):
    """Digits (N, 1, 8, 8) in [0, 1]: ``n_train`` for training, the rest for testing."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def add_decoy(x: torch.Tensor, shade: torch.Tensor, generator: torch.Generator, corners=((0, 0),)):
    """Paints a PATCH x PATCH square of the given shade into one of ``corners`` (drawn at random)
    of each image; returns the images and the masks of the painted squares."""
    corner = torch.randint(len(corners), (len(x),), generator=generator)
    rows = torch.arange(8)
    top = torch.tensor([c[0] for c in corners])[corner]
    left = torch.tensor([c[1] for c in corners])[corner]
    inside_rows = (rows >= top[:, None]) & (rows < top[:, None] + PATCH)
    inside_cols = (rows >= left[:, None]) & (rows < left[:, None] + PATCH)
    mask = (inside_rows[:, :, None] & inside_cols[:, None, :])[:, None].to(x.dtype)
    return x * (1 - mask) + shade.reshape(-1, 1, 1, 1) * mask, mask


def make_model() -> nn.Module:
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 16, 3, padding=1)), ("relu1", nn.ReLU()),
        ("pool", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(16 * 4 * 4, 64)), ("relu2", nn.ReLU()),
        ("fc2", nn.Linear(64, 10)),
    ]))


def train(x, y, mask, *, lam: float, explainer: str, epochs: int, seed: int, batch_size: int = 50,
          lr: float = 3e-3, desc: str = "training", progress: bool = True) -> nn.Module:
    """Trains a fresh model; ``lam = 0`` is plain training (the penalty is then not computed)."""
    torch.manual_seed(seed)
    model = make_model()
    f, _ = fxattr.functionalize(model, input_shape=(1, 8, 8))
    names = [name for name, _ in model.named_parameters()]

    def log_probability_sum(out):  # Ross et al. explain the sum of the log-probabilities
        return torch.log_softmax(out, -1).sum()

    explain = getattr(fxattr, explainer)(f)
    relevance = torch.vmap(lambda p, x_: explain(p, x_, log_probability_sum), in_dims=(None, 0))
    logits = torch.vmap(f, in_dims=(None, 0))

    def loss_fn(params, xb, yb, mb):
        loss = nn.functional.cross_entropy(logits(params, xb), yb)
        if lam:
            loss = loss + lam * (mb * relevance(params, xb)).square().sum() / len(xb)
        return loss

    grad_fn = torch.func.grad(loss_fn)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        order = torch.randperm(len(x))
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            params = {name: p.detach() for name, p in model.named_parameters()}
            grads = grad_fn(params, x[idx], y[idx], mask[idx])
            for name, p in model.named_parameters():
                p.grad = grads[name]
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs (for tests)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default 30; 10 quick)")
    parser.add_argument("--random-corner", action="store_true",
                        help="put the decoy in a random corner (default: top left)")
    parser.add_argument("--train", type=int, default=500, help="training digits (default 500)")
    parser.add_argument("--lam", type=float, default=10.0, help="penalty weight (default 10)")
    parser.add_argument("--explainer", choices=("gradient", "input_x_gradient"), default="gradient")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args) -> dict:
    epochs = args.epochs if args.epochs is not None else (10 if args.quick else 30)
    progress = not args.no_progress
    (x_train, y_train), (x_test, y_test) = load_data(args.train, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    corners = ALL_CORNERS if args.random_corner else ((0, 0),)
    # training data: the decoy's shade leaks the label
    x_decoy, mask = add_decoy(x_train, 1 - 0.1 * y_train.float(), generator, corners)
    # test data with the same leak (to show the plain model uses it), and with a random shade
    x_test_leak, _ = add_decoy(x_test, 1 - 0.1 * y_test.float(), generator, corners)
    x_test_random, _ = add_decoy(x_test, 1 - 0.1 * torch.randint(10, y_test.shape, generator=generator),
                                 generator, corners)

    results = {}
    for name, lam in (("plain", 0.0), ("penalised", args.lam)):
        start = time.perf_counter()
        model = train(x_decoy, y_train, mask, lam=lam, explainer=args.explainer, epochs=epochs,
                      seed=args.seed, desc=name, progress=progress)
        results[name] = {
            "decoy_free": accuracy(model, x_test, y_test),
            "random_decoy": accuracy(model, x_test_random, y_test),
            "leaking_decoy": accuracy(model, x_test_leak, y_test),
            "train": accuracy(model, x_decoy, y_train),
            "seconds": time.perf_counter() - start,
        }

    print(f"{len(x_train)} training digits with a label-leaking {PATCH}x{PATCH} decoy, {epochs} epochs; "
          f"penalty: lam={args.lam} on fxattr.{args.explainer} relevance in the decoy\n")
    print(f"{'model':<10} {'decoy-free test':>16} {'random-shade decoy':>19} {'leaking decoy':>14} "
          f"{'train':>7} {'time':>7}")
    for name, r in results.items():
        print(f"{name:<10} {r['decoy_free']:>16.3f} {r['random_decoy']:>19.3f} {r['leaking_decoy']:>14.3f} "
              f"{r['train']:>7.3f} {r['seconds']:>6.1f}s")
    print(f"\naccuracy on decoy-free test digits: plain {results['plain']['decoy_free']:.3f}, "
          f"right for the right reasons {results['penalised']['decoy_free']:.3f}")
    return results


if __name__ == "__main__":
    main()
