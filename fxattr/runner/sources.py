"""Datasets the command line reads: ImageFolder trees (PIL) and ``.npy`` / ``.npz`` arrays."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fxattr.errors import api_boundary, fail

__all__ = ["IMAGE_EXTENSIONS", "ArrayDataset", "ImageFolder", "open_data"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
IMAGE_KEYS = ("x", "images", "image", "data", "inputs")
LABEL_KEYS = ("y", "labels", "label", "targets")


def check_normalize(normalize) -> tuple[Tensor, Tensor] | None:
    """``(mean, std)`` as tensors broadcastable to ``(C, H, W)``; std must be positive."""
    if normalize is None:
        return None
    try:
        mean, std = (torch.as_tensor(v, dtype=torch.float32).reshape(-1, 1, 1) for v in normalize)
    except (TypeError, ValueError) as error:
        raise fail(None, f"normalize must be (mean, std), numbers or one per channel; got {normalize!r}") from error
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all()) or (std <= 0).any():
        raise fail(None, f"normalize must have finite means and positive finite stds; got {normalize!r}")
    return mean, std


def check_resize(resize) -> tuple[int, int] | None:
    if resize is None:
        return None
    size = (resize, resize) if isinstance(resize, int) else tuple(resize)
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        raise fail(None, f"resize must be a positive int or (height, width); got {resize!r}")
    return size


class ImageFolder(torch.utils.data.Dataset):
    """``root/CLASS/IMAGE`` files as ``(image, label)``: classes sorted, files sorted within a class
    (the order of ``index``), images read with PIL as RGB and scaled to ``[0, 1]``.

    Args:
        root: the directory holding one sub-directory per class.
        resize: ``(height, width)`` or one int: each image is resized (bilinear) to it.
        normalize: ``(mean, std)``: ``(x - mean) / std`` after scaling, per channel or scalar.

    Example:
        >>> data = ImageFolder("val", resize=224, normalize=([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
        >>> fxattr.attribute_dataset(explain, params, data, "out", batch_size=32)
    """

    @api_boundary("ImageFolder")
    def __init__(self, root, *, resize=None, normalize=None):
        root = Path(root)
        if not root.is_dir():
            raise fail(None, f"{str(root)!r} is not a directory")
        self.root = root
        self.resize = check_resize(resize)
        self.normalize = check_normalize(normalize)
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise fail(None, f"{str(root)!r} has no class sub-directories (expected root/CLASS/IMAGE)")
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            files = sorted(p for p in (root / name).rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            self.samples.extend((str(p), label) for p in files)
        if not self.samples:
            raise fail(None, f"{str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as image:
                if image.mode != "RGB":
                    image = image.convert("RGB")
                if self.resize is not None:
                    image = image.resize((self.resize[1], self.resize[0]), Image.BILINEAR)
                array = np.array(image, dtype=np.uint8)
        except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
            raise fail("explain", f"cannot read image {path!r}: {error}") from None
        # one numpy pass (channels first, float32, / 255: the same correctly rounded division as torch's)
        x = torch.from_numpy(array.transpose(2, 0, 1).astype(np.float32, order="C") / np.float32(255))
        if self.normalize is not None:
            mean, std = self.normalize
            x = (x - mean) / std
        return x, label


class ArrayDataset(torch.utils.data.Dataset):
    """Examples from an array ``(N, C, H, W)`` (``(N, H, W)`` gets one channel), with labels if
    given. uint8 arrays are scaled to ``[0, 1]``; float arrays are taken as they are.
    ``normalize`` as :class:`ImageFolder`."""

    @api_boundary("ArrayDataset")
    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, *, normalize=None, name="array"):
        if images.ndim == 3:
            images = images[:, None]
        if images.ndim < 2:
            raise fail(None, f"{name}: the images must be (N, C, H, W) or (N, H, W), got shape {images.shape}")
        if not (np.issubdtype(images.dtype, np.floating) or images.dtype == np.uint8):
            raise fail(None, f"{name}: the images must be floats or uint8, got dtype {images.dtype}")
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
                raise fail(None, f"{name}: the labels must be {len(images)} integers, got shape "
                                  f"{labels.shape} and dtype {labels.dtype}")
        self.images, self.labels = images, labels
        self.normalize = check_normalize(normalize)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        array = np.array(self.images[i])  # a copy: the array may be memory-mapped read-only
        x = torch.from_numpy(array)
        x = x.float().div_(255) if array.dtype == np.uint8 else x
        if self.normalize is not None:
            mean, std = self.normalize
            x = (x - mean.to(x.dtype)) / std.to(x.dtype)
        return x if self.labels is None else (x, int(self.labels[i]))


def open_data(path, *, resize=None, normalize=None) -> torch.utils.data.Dataset:
    """An ImageFolder tree (a directory), an ``.npy`` array or an ``.npz`` archive (images under
    ``x``/``images``/``data``, labels under ``y``/``labels``, or one array)."""
    path = Path(path)
    if path.is_dir():
        return ImageFolder(path, resize=resize, normalize=normalize)
    if not path.exists():
        raise fail(None, f"--data {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise fail(None, f"--data {str(path)!r} must be an ImageFolder directory, an .npy or an .npz file")
    if resize is not None:
        raise fail(None, "--resize applies to image files; arrays are taken at their own size")
    try:
        if suffix == ".npy":
            images, labels = np.load(path, mmap_mode="r", allow_pickle=False), None
        else:
            archive = np.load(path, allow_pickle=False)
            keys = list(archive.keys())
            image_key = next((k for k in IMAGE_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
            if image_key is None:
                raise fail(None, f"--data {str(path)!r}: no images under {', '.join(IMAGE_KEYS)} "
                                  f"(keys: {', '.join(keys)})")
            label_key = next((k for k in LABEL_KEYS if k in keys), None)
            images = archive[image_key]
            labels = archive[label_key] if label_key else None
    except (OSError, ValueError) as error:
        raise fail(None, f"cannot read --data {str(path)!r}: {error}") from error
    return ArrayDataset(images, labels, normalize=normalize, name=str(path))


def parse_floats(text: str) -> Sequence[float]:
    return [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
