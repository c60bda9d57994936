"""fxattr demo: train a small CNN on scikit-learn's bundled handwritten digits (no download), then
explain a handful of test digits with a dozen attribution methods, each batched with torch.vmap,
and draw the classic grid (one row per digit, one column per method) to examples/out/demo.png.

    python examples/demo.py            # about half a minute on 2 CPU cores
    python examples/demo.py --quick    # a few seconds (used by the tests)

Methods that this version of fxattr does not have yet are skipped with a note.
"""

from __future__ import annotations

import argparse
import time
from collections import OrderedDict
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn
from tqdm.auto import tqdm

import fxattr
from fxattr import viz

OUT = Path(__file__).resolve().parent / "out"


def load_data(seed: int = 0):
    """Digits as (N, 1, 8, 8) tensors in [0, 1], split 1400 / 397 (shuffled with ``seed``)."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def make_model() -> nn.Module:
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 8, 3, padding=1)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(8, 16, 3, padding=1)), ("relu2", nn.ReLU()),
        ("pool", nn.MaxPool2d(2)),
        ("conv3", nn.Conv2d(16, 32, 3, padding=1)), ("relu3", nn.ReLU()),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(32 * 4 * 4, 64)), ("relu4", nn.ReLU()),
        ("fc2", nn.Linear(64, 10)),
    ]))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int = 64,
          lr: float = 5e-3, progress: bool = True) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    bar = tqdm(range(epochs), desc="training", disable=not progress)
    for _ in bar:
        order = torch.randperm(len(x))
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def methods(f):
    """(column label, fxattr attribute, config): the methods the demo would like to show."""
    return [
        ("gradient", "gradient", {}),
        ("SmoothGrad", "smoothgrad", {"samples": 32, "sigma": 0.15}),
        ("integrated gradients", "integrated_gradients", {"steps": 32}),
        ("input x gradient", "input_x_gradient", {}),
        ("guided backprop", "guided_backprop", {}),
        ("deconvnet", "deconvnet", {}),
        ("LRP-z", "lrp", {"rule": "z"}),
        ("LRP-epsilon", "lrp", {"rule": "epsilon", "epsilon": 0.1}),
        ("LRP-alpha2beta1", "lrp", {"rule": "alpha_2_beta_1"}),
        ("LRP preset A", "lrp", {"composite": "sequential_preset_a"}),
        ("LRP preset B flat", "lrp", {"composite": "sequential_preset_b_flat"}),
        ("deep Taylor", "deep_taylor", {}),
        ("deep Taylor [0,1]", "deep_taylor_bounded", {"low": 0.0, "high": 1.0}),
        ("Grad-CAM", "gradcam", {"layer": "relu3"}),
        ("occlusion 2x2", "occlusion", {"window": (1, 2, 2)}),
        ("PatternAttribution", "pattern_attribution", {}),
    ]


def build(name: str, attribute: str, config: dict, f, params, x_train):
    """The explainer, or the reason it is skipped."""
    method = getattr(fxattr, attribute, None)
    if method is None:
        return None, f"fxattr.{attribute} is not in this version of fxattr"
    explain = method(f, **config)
    if hasattr(explain, "fit"):  # the pattern methods learn their patterns from data
        explain = explain.fit(params, x_train.split(200))  # an iterable of batches
    return explain, None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few epochs and examples (for tests)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 10; 2 quick)")
    parser.add_argument("--examples", type=int, default=None, help="test digits to explain (default 8)")
    parser.add_argument("--out", type=Path, default=OUT / "demo.png", help="where to write the grid PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: for a model this small, intra-op "
                             "parallelism costs more than it saves)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args) -> dict:
    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 10)
    n = args.examples if args.examples is not None else (4 if args.quick else 8)
    progress = not args.no_progress

    torch.manual_seed(0)
    (x_train, y_train), (x_test, y_test) = load_data()
    start = time.perf_counter()
    model = train(make_model(), x_train, y_train, epochs, progress=progress)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"trained a {sum(p.numel() for p in model.parameters())}-parameter CNN for {epochs} epochs "
          f"in {time.perf_counter() - start:.1f} s; test accuracy {accuracy:.3f} ({len(x_test)} digits)")

    f, params = fxattr.functionalize(model, input_shape=(1, 8, 8))
    # one digit of each class (0, 1, 2, ...) so the rows differ
    chosen = torch.stack([torch.nonzero(y_test == d % 10)[d // 10, 0] for d in range(n)])
    images, labels = x_test[chosen], y_test[chosen]
    with torch.no_grad():
        predictions = model(images).argmax(1)

    columns, results, times, skipped = [], [], {}, {}
    bar = tqdm(methods(f), desc="explaining", disable=not progress)
    for name, attribute, config in bar:
        bar.set_postfix_str(name)
        try:
            explain, reason = build(name, attribute, config, f, params, x_train)
            if explain is None:
                skipped[name] = reason
                continue
            batched = torch.vmap(explain, in_dims=(None, 0, 0), randomness="different")
            begin = time.perf_counter()
            attribution = batched(params, images, predictions)
            times[name] = time.perf_counter() - begin
        except Exception as error:  # noqa: BLE001 - the demo reports and goes on
            skipped[name] = f"failed: {type(error).__name__}: {error}"
            continue
        columns.append(name)
        results.append(attribution.detach())

    print(f"\nexplained {n} test digits (target: the predicted class), one torch.vmap call per method:")
    for name in columns:
        print(f"  {name:<22} {1e3 * times[name]:8.1f} ms  ({1e3 * times[name] / n:6.2f} ms per digit)")
    for name, reason in skipped.items():
        print(f"  {name:<22} skipped: {reason}")

    rows = []
    for i in range(n):
        row = [viz.graymap(images[i], input_is_positive_only=True)]
        row += [viz.heatmap(a[i]) for a in results]
        rows.append(row)
    row_labels = [f"label {int(labels[i])}\npred {int(predictions[i])}" for i in range(n)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    viz.plot_grid(rows, row_labels=row_labels, col_labels=["input", *columns], file=args.out,
                  cell_size=1.0, dpi=100)
    print(f"\nwrote {args.out}")
    return {"accuracy": accuracy, "times": times, "skipped": skipped, "out": args.out,
            "attributions": dict(zip(columns, results))}


if __name__ == "__main__":
    main()
