"""A tiny CNN (the command line's --model target), image trees and the reference computation."""

from pathlib import Path

import numpy as np
import torch
from torch import nn


def tiny_cnn() -> nn.Module:
    """3x8x8 images -> 4 classes; deterministic weights so that every process builds the same model."""
    generator = torch.Generator().manual_seed(1234)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model.eval()


def images(n: int, seed: int = 0, shape=(3, 8, 8)) -> torch.Tensor:
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


def labelled(n: int, seed: int = 0) -> torch.utils.data.TensorDataset:
    x = images(n, seed)
    y = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(seed + 1))
    return torch.utils.data.TensorDataset(x, y)


def reference(explain, params, f, x, target=None):
    """The in-memory computation: predictions, then the vmapped explainer."""
    prediction = torch.vmap(f, in_dims=(None, 0))(params, x).argmax(1)
    target = prediction if target is None else target
    return torch.vmap(explain, in_dims=(None, 0, 0), randomness="different")(params, x, target), prediction


def image_tree(root: Path, per_class=(3, 2), size=(8, 8), seed: int = 0) -> torch.Tensor:
    """root/class_a/*.png, root/class_b/*.png (sorted names); returns the images as they are read."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arrays = []
    for c, count in enumerate(per_class):
        directory = Path(root) / f"class_{'abcdefgh'[c]}"
        directory.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            array = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(array).save(directory / f"img{i:02d}.png")
            arrays.append(array)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
