"""AttnLRP vs Grad-CAM vs attention rollout on a small vision transformer trained here on digits.

The data: scikit-learn's bundled 8 x 8 handwritten digits (1797 images, no download). The model:
a Hugging Face ``ViTForImageClassification`` from a small config (2 x 2 patches, so a 4 x 4 grid
of 16 patch tokens plus the class token; hidden 32, 2 layers, 4 heads; random init, eager
attention so that rollout can read the attention maps), trained for a few seconds. Torch.fx
cannot trace it; fxattr captures it with torch dynamo (``functionalize(..., input_shape=)``).
Then a batch of test digits is explained in ONE ``torch.vmap`` call per method:

- AttnLRP (``fxattr.lrp(f, composite="attnlrp")``, Achtibat et al. 2024): pixel relevance;
- Grad-CAM on the last layer's ``layernorm_before`` (the tokens the last attention reads; the
  class token is dropped and the patches become the 4 x 4 grid automatically);
- attention rollout (Abnar & Zuidema 2020): class-agnostic, the class token's row over the
  patches.

The figure shows them side by side (``--out``). The script also prints a deletion check for each
method: the drop of the target logit when the 25 % of pixels a method ranks highest are set to
the background (0), against 25 % random pixels -- a faithful map removes more evidence.

    python examples/vit_attribution.py            # about 30 s of CPU time; test accuracy about 0.95
    python examples/vit_attribution.py --quick    # about 15 s; fewer steps and digits (the tests)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ViTConfig, ViTForImageClassification
from transformers.utils import logging as hf_logging

import fxattr
import fxattr.text

hf_logging.set_verbosity_error()

SIZE, PATCH = 8, 2
GRID = SIZE // PATCH


class Logits(nn.Module):
    """``pixel_values (batch, 1, 8, 8) -> logits (batch, 10)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels):
        return self.model(pixel_values=pixels).logits


def load_digits():
    """The digits as ``(images (n, 1, 8, 8) in [0, 1], labels)``, split 1500 / 297."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    return (images[:1500], labels[:1500]), (images[1500:], labels[1500:])


def make_model() -> ViTForImageClassification:
    config = ViTConfig(image_size=SIZE, patch_size=PATCH, num_channels=1, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, num_labels=10, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0,
                       attn_implementation="eager")  # eager: rollout reads the attention maps
    return ViTForImageClassification(config)


def train(model: nn.Module, images, labels, *, steps: int, batch_size: int = 64, lr: float = 3e-3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(images), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def explainers(f):
    """Each method as ``explain(params, x, target) -> (8, 8)`` pixel map of one digit."""
    lrp = fxattr.lrp(f, composite="attnlrp")
    gradcam = fxattr.gradcam(f, layer="model.vit.layers.1.layernorm_before")
    rollout = fxattr.text.attention_rollout(f)

    def rollout_map(params, x, target):
        tokens = rollout(params, x, target)[1:].reshape(GRID, GRID)    # the class token dropped
        return F.interpolate(tokens[None, None], size=(SIZE, SIZE), mode="nearest")[0, 0]

    return {
        "AttnLRP": lambda params, x, target: lrp(params, x, target)[0],
        "Grad-CAM": lambda params, x, target: gradcam(params, x, target)[0],
        "attention rollout": rollout_map,
    }


def deletion_drop(f, params, images, targets, maps, fraction: float = 0.25):
    """The mean drop of the target logit when the top ``fraction`` of pixels by ``maps`` (or, for
    ``maps=None``, random pixels) are set to 0."""
    flat = images.flatten(1)
    k = int(fraction * flat.shape[1])
    if maps is None:
        scores = torch.rand(flat.shape, generator=torch.Generator().manual_seed(3))
    else:
        scores = maps.flatten(1)
    top = scores.topk(k, dim=1).indices
    deleted = flat.scatter(1, top, 0.0).reshape(images.shape)
    logits = torch.vmap(f, in_dims=(None, 0))(params, images)
    after = torch.vmap(f, in_dims=(None, 0))(params, deleted)
    take = torch.arange(len(images))
    return (logits[take, targets] - after[take, targets]).mean().item()


def plot(images, maps: dict, labels, predictions, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, columns = len(images), 1 + len(maps)
    fig, axes = plt.subplots(n, columns, figsize=(1.8 * columns, 1.8 * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(images[i, 0].numpy(), cmap="gray_r")
        axes[i, 0].set_title(f"label {int(labels[i])}, pred {int(predictions[i])}", fontsize=8)
        for j, (name, m) in enumerate(maps.items(), start=1):
            values = m[i].numpy()
            if name == "AttnLRP":  # signed: red for, blue against; a few pixels dominate, so the
                # colour scale ends at the 95th percentile of |R|
                bound = float(m[i].abs().flatten().quantile(0.95)) or float(m[i].abs().max()) or 1.0
                axes[i, j].imshow(values, cmap="bwr", vmin=-bound, vmax=bound)
            else:
                axes[i, j].imshow(values, cmap="magma")
            if i == 0:
                axes[i, j].set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps and examples")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "vit_attribution.png"))
    parser.add_argument("--examples", type=int, default=None, help="digits in the figure")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args):
    torch.manual_seed(0)
    (train_images, train_labels), (test_images, test_labels) = load_digits()
    model = Logits(make_model())
    start = time.perf_counter()
    train(model, train_images, train_labels, steps=150 if args.quick else 600)
    with torch.no_grad():
        predictions = model(test_images).argmax(-1)
    accuracy = (predictions == test_labels).float().mean().item()
    print(f"test accuracy {accuracy:.3f} after {time.perf_counter() - start:.1f} s of training")

    start = time.perf_counter()
    f, params = fxattr.functionalize(model, input_shape=(1, SIZE, SIZE))
    n = args.examples or (16 if args.quick else 64)
    images, labels, targets = test_images[:n], test_labels[:n], predictions[:n]
    maps, drops = {}, {}
    for name, explain in explainers(f).items():
        tick = time.perf_counter()
        maps[name] = torch.vmap(explain, in_dims=(None, 0, 0))(params, images, targets).detach()
        drops[name] = deletion_drop(f, params, images, targets, maps[name])
        print(f"{name:18s} {1e3 * (time.perf_counter() - tick):8.1f} ms for {n} digits; "
              f"target logit drop after deleting its top 25 % pixels {drops[name]:.2f}")
    drops["random"] = deletion_drop(f, params, images, targets, None)
    print(f"{'random pixels':18s} {'':8s}    target logit drop {drops['random']:.2f}")
    print(f"capture and explanations took {time.perf_counter() - start:.1f} s")

    shown = min(n, 4 if args.quick else 8)
    out = Path(args.out)
    plot(images[:shown], {k: v[:shown] for k, v in maps.items()}, labels[:shown], targets[:shown], out)
    print(f"wrote {out}")
    return {"accuracy": accuracy, "maps": maps, "drops": drops, "images": images, "targets": targets,
            "f": f, "params": params}


if __name__ == "__main__":
    main()
