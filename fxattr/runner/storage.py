"""On-disk layout of a dataset run: the manifest, atomic shard files, consolidated HDF5 / zarr.

A run directory holds

- ``manifest.json``: the configuration of the run (compared on resume) and its state;
- ``shards/shard-000000.safetensors`` ...: examples ``[k * shard_size, (k + 1) * shard_size)``
  of the dataset, written atomically (temporary file, fsync, rename) as soon as they are
  computed: a shard file is complete or absent, whenever the process dies;
- ``class_mean.safetensors``: the mean attribution and the count of each target class;
- with ``format="hdf5"``: ``attribution.h5`` in ViRelAy's attribution-database layout (datasets
  ``attribution``, ``label``, ``prediction``, ``index``); with ``format="zarr"``:
  ``attribution.zarr``. Both are consolidated from the shards at the end (the shard files are
  then removed).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fxattr.errors import fail

__all__ = [
    "DTYPES",
    "FORMATS",
    "MANIFEST",
    "LazyAttributions",
    "atomic_write_bytes",
    "fingerprint",
    "read_manifest",
    "read_shard",
    "shard_path",
    "write_manifest",
    "write_shard",
]

MANIFEST = "manifest.json"
SHARDS = "shards"
CLASS_MEAN = "class_mean.safetensors"
HDF5_FILE = "attribution.h5"
ZARR_DIR = "attribution.zarr"
FORMATS = ("safetensors", "hdf5", "zarr")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
LAYOUT_VERSION = 1


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fsync_directory(path: Path) -> None:
    """Makes a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that ``path`` is either complete or absent: a temporary file
    in the same directory, fsync, then ``os.replace`` (atomic on POSIX and Windows)."""
    path = Path(path)
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    fsync_directory(path.parent)


# ------------------------------------------------------------------ manifest

def write_manifest(out: Path, manifest: dict) -> None:
    atomic_write_bytes(Path(out) / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())


def read_manifest(out: Path) -> dict:
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise fail(None, f"{str(out)!r} holds no fxattr run (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise fail(None, f"cannot read {str(path)!r}: {error}") from error
    if manifest.get("layout") != LAYOUT_VERSION:
        raise fail(None, f"{str(path)!r} has layout {manifest.get('layout')!r}; this fxattr reads "
                          f"layout {LAYOUT_VERSION}")
    return manifest


def fingerprint(value: Any) -> str:
    """A short, stable description of a configuration value for the manifest: tensors and arrays
    by shape, dtype and a hash of their bytes, callables by qualified name, the rest by repr."""
    if isinstance(value, Tensor):
        data = value.detach().cpu().contiguous()
        if data.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        digest = hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16]
        return f"tensor{tuple(value.shape)}:{dtype_name(value.dtype)}:{digest}"
    if isinstance(value, np.ndarray):
        digest = hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()[:16]
        return f"array{value.shape}:{value.dtype}:{digest}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {fingerprint(v)}" for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fingerprint(v) for v in value) + "]"
    if callable(value) and not isinstance(value, type):
        module = getattr(value, "__module__", None) or ""
        return f"<{module}.{getattr(value, '__qualname__', type(value).__name__)}>"
    # default reprs carry a memory address, which differs between processes: drop it
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


def params_fingerprint(params) -> str:
    """One hash over every parameter and buffer (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256()
    for name in sorted(params):
        value = params[name]
        digest.update(f"{name}:{fingerprint(value)}".encode())
    return digest.hexdigest()[:32]


# ------------------------------------------------------------------ shards

def shard_path(out: Path, shard: int) -> Path:
    return Path(out) / SHARDS / f"shard-{shard:06d}.safetensors"


def write_shard(out: Path, shard: int, tensors: dict[str, Tensor]) -> None:
    """One shard, atomically (see :func:`atomic_write_bytes`)."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"shard": str(shard)})
    atomic_write_bytes(shard_path(out, shard), data)


def read_shard(out: Path, shard: int, keys: Sequence[str] | None = None) -> dict[str, Tensor]:
    from safetensors import safe_open

    with safe_open(str(shard_path(out, shard)), framework="pt") as file:
        return {k: file.get_tensor(k) for k in (keys if keys is not None else file.keys())}


def missing_shards(out: Path, shards: Sequence[int]) -> list[int]:
    return [k for k in shards if not shard_path(out, k).is_file()]


def remove_temporaries(out: Path) -> None:
    """Temporary files of writes that a killed process never renamed."""
    for directory in (Path(out), Path(out) / SHARDS):
        if directory.is_dir():
            for path in directory.glob(".tmp-*"):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


# ------------------------------------------------------------------ lazy reading

class LazyAttributions:
    """The attributions of a run, ``(N, C, H, W)`` in dataset order, read on demand.

    Indexing (an int, a slice, a list or a 1-d integer tensor / array along the first axis, then
    anything torch accepts) reads only the shards (safetensors), chunks (zarr) or hyperslabs (HDF5)
    it needs and returns a tensor in the storage dtype. ``tensor()`` (or ``torch.as_tensor``-free
    ``x[:]``) reads everything; ``numpy()`` gives a numpy array (bfloat16 as float32).

    Example:
        >>> run = fxattr.load_attributions("out")
        >>> run["attribution"].shape, run["attribution"][10:20].shape
        ((50000, 3, 224, 224), torch.Size([10, 3, 224, 224]))
    """

    def __init__(self, length: int, example_shape: Sequence[int], dtype: torch.dtype, read_rows):
        self._length = int(length)
        self._example_shape = tuple(int(s) for s in example_shape)
        self.dtype = dtype
        self._read_rows = read_rows  # (start, stop) -> tensor of rows [start, stop)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._length, *self._example_shape)

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        return f"LazyAttributions(shape={self.shape}, dtype={self.dtype})"

    def tensor(self) -> Tensor:
        """Everything, as one tensor in the storage dtype."""
        return self._read_rows(0, self._length)

    def numpy(self) -> np.ndarray:
        t = self.tensor()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()

    def __array__(self, dtype=None, copy=None):
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)

    def __iter__(self):
        for i in range(self._length):
            yield self[i]

    def __getitem__(self, key):
        rest = ()
        if isinstance(key, tuple):
            key, rest = (key[0], key[1:]) if key else (slice(None), ())
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            i = int(key) + (self._length if key < 0 else 0)
            if not 0 <= i < self._length:
                raise IndexError(f"index {int(key)} is out of range for {self._length} examples")
            rows = self._read_rows(i, i + 1)[0]
        elif isinstance(key, slice):
            start, stop, step = key.indices(self._length)
            if step == 1 and stop <= start:
                rows = torch.empty((0, *self._example_shape), dtype=self.dtype)
            elif step == 1:
                rows = self._read_rows(start, stop)
            else:
                rows = self._take(torch.arange(start, stop, step))
        elif key is Ellipsis:
            rows, rest = self.tensor(), ((Ellipsis,) + rest if rest else ())
        else:
            rows = self._take(torch.as_tensor(np.asarray(key)))
        # the first axis is kept (slices, sequences) or gone (an int): index the rest after it
        return rows[(slice(None),) * (rows.ndim - len(self._example_shape)) + rest] if rest else rows

    def _take(self, index: Tensor) -> Tensor:
        if index.dtype == torch.bool:
            if index.shape != (self._length,):
                raise IndexError(f"a boolean index must have shape ({self._length},), got {tuple(index.shape)}")
            index = index.nonzero().squeeze(1)
        if index.dtype.is_floating_point or index.ndim != 1:
            raise IndexError("index with an int, a slice or a 1-d integer sequence")
        index = torch.where(index < 0, index + self._length, index)
        if len(index) and (index.min() < 0 or index.max() >= self._length):
            raise IndexError(f"an index is out of range for {self._length} examples")
        if len(index) == 0:
            return torch.empty((0, *self._example_shape), dtype=self.dtype)
        # Read the covering range once per contiguous run of sorted indices; then reorder.
        order = torch.argsort(index)
        sorted_index = index[order]
        pieces = []
        start = 0
        for stop in [*((torch.diff(sorted_index) > 1).nonzero().squeeze(1) + 1).tolist(), len(sorted_index)]:
            lo, hi = int(sorted_index[start]), int(sorted_index[stop - 1]) + 1
            pieces.append(self._read_rows(lo, hi)[sorted_index[start:stop] - lo])
            start = stop
        gathered = torch.cat(pieces)
        result = torch.empty_like(gathered)
        result[order] = gathered
        return result


def safetensors_rows(out: Path, length: int, shard_size: int, key: str = "attribution"):
    """``read_rows(start, stop)`` of ``key`` over the shard files (each opened memory-mapped when needed)."""
    from safetensors import safe_open

    def read_rows(start: int, stop: int) -> Tensor:
        pieces = []
        for shard in range(start // shard_size, (max(stop, start + 1) - 1) // shard_size + 1):
            first = shard * shard_size
            lo, hi = max(start, first) - first, min(stop, first + shard_size) - first
            if hi <= lo:
                continue
            with safe_open(str(shard_path(out, shard)), framework="pt") as file:
                pieces.append(file.get_slice(key)[lo:hi])
        return torch.cat(pieces) if len(pieces) != 1 else pieces[0]

    return read_rows


# ------------------------------------------------------------------ HDF5 / zarr

def import_h5py():
    try:
        import h5py
    except ImportError:
        raise fail(None, "format 'hdf5' needs h5py: pip install h5py (or pip install 'fxattr[hdf5]')") from None
    return h5py


def import_zarr():
    try:
        import zarr
    except ImportError:
        raise fail(None, "format 'zarr' needs zarr: pip install zarr (or pip install 'fxattr[zarr]')") from None
    return zarr


def numpy_storage(t: Tensor) -> np.ndarray:
    """numpy has no bfloat16: its bits are stored as uint16 (the manifest says what they are)."""
    t = t.detach().cpu().contiguous()
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def from_numpy_storage(array: np.ndarray, dtype: torch.dtype) -> Tensor:
    t = torch.from_numpy(np.ascontiguousarray(array))
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


class ConsolidatedWriter:
    """Writes the shards, in order, into one HDF5 file (ViRelAy's attribution database) or one
    zarr group, under a temporary name renamed into place when complete."""

    def __init__(self, out: Path, fmt: str, length: int, example_shape, output_size: int,
                 dtype: torch.dtype, chunk: int, has_labels: bool, strategy: str):
        self.fmt = fmt
        self.final = Path(out) / (HDF5_FILE if fmt == "hdf5" else ZARR_DIR)
        self.temporary = self.final.with_name(f".tmp-{os.getpid()}-{self.final.name}")
        if self.temporary.exists():
            shutil.rmtree(self.temporary) if self.temporary.is_dir() else self.temporary.unlink()
        shape = (length, *example_shape)
        storage = np.uint16 if dtype == torch.bfloat16 else numpy_storage(torch.empty(0, dtype=dtype)).dtype
        index_dtype = np.uint64
        chunks = (max(1, min(chunk, length)), *example_shape)
        if fmt == "hdf5":
            h5py = import_h5py()
            self.file = h5py.File(self.temporary, "w")
            create = lambda name, shape_, dtype_, chunks_=None: self.file.create_dataset(
                name, shape=shape_, dtype=dtype_, chunks=chunks_)
            self.root = self.file
        else:
            zarr = import_zarr()
            self.file = None
            self.root = zarr.open_group(str(self.temporary), mode="w")

            def create(name, shape_, dtype_, chunks_=None):
                chunks_ = chunks_ or (max(1, min(chunk, length)), *shape_[1:])
                if hasattr(self.root, "create_array"):
                    return self.root.create_array(name, shape=shape_, dtype=dtype_, chunks=chunks_)
                return self.root.create_dataset(name, shape=shape_, dtype=dtype_, chunks=chunks_)  # zarr 2
        # ViRelAy: 'attribution' (samples x C x H x W), 'prediction' (samples x classes, the model's
        # output), 'label' (the class each attribution explains), 'index' (position in the dataset).
        self.arrays = {
            "attribution": create("attribution", shape, storage, chunks),
            "prediction": create("prediction", (length, output_size), np.float32),
            "label": create("label", (length,), np.int64),
            "index": create("index", (length,), index_dtype),
            "predicted_class": create("predicted_class", (length,), np.int64),
            "target": create("target", (length,), np.int64),
        }
        if has_labels:
            self.arrays["dataset_label"] = create("dataset_label", (length,), np.int64)
        attrs = self.root.attrs
        attrs["attribution_strategy"] = strategy
        attrs["attribution_dtype"] = dtype_name(dtype)
        attrs["fxattr_layout"] = LAYOUT_VERSION

    def write(self, start: int, shard: dict[str, Tensor]) -> None:
        stop = start + len(shard["index"])
        values = {
            "attribution": numpy_storage(shard["attribution"]),
            "prediction": shard["output"].float().numpy(),
            "label": shard["target"].numpy(),
            "index": shard["index"].numpy().astype(np.uint64),
            "predicted_class": shard["prediction"].numpy(),
            "target": shard["target"].numpy(),
        }
        if "dataset_label" in self.arrays:
            values["dataset_label"] = shard["label"].numpy()
        for name, value in values.items():
            self.arrays[name][start:stop] = value

    def close(self) -> None:
        if self.file is not None:
            self.file.flush()
            self.file.close()
            with open(self.temporary, "rb+") as file:
                os.fsync(file.fileno())
        if self.final.exists():
            shutil.rmtree(self.final) if self.final.is_dir() else self.final.unlink()
        os.replace(self.temporary, self.final)
        fsync_directory(self.final.parent)


def open_consolidated(fmt: str, path: Path):
    """The HDF5 file or zarr group of a finished run, opened for reading."""
    if fmt == "hdf5":
        return import_h5py().File(path, "r")
    return import_zarr().open_group(str(path), mode="r")


def array_rows(array, dtype: torch.dtype):
    """``read_rows(start, stop)`` over an h5py dataset or a zarr array (bfloat16 from its bits)."""

    def read_rows(start: int, stop: int) -> Tensor:
        return from_numpy_storage(array[start:stop], dtype)

    return read_rows


def read_class_means(out: Path) -> dict[str, Tensor]:
    """``classes`` (the target classes seen), ``class_count`` and ``class_mean`` (float32)."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(out) / CLASS_MEAN))
    return {"classes": tensors["class"], "class_count": tensors["count"], "class_mean": tensors["mean"]}
