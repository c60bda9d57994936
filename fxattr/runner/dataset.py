"""Whole datasets through one explainer: ``attribute_dataset`` writes, ``load_attributions`` reads.

The runner maps the explainer over each batch with ``torch.vmap`` (optionally compiled once),
writes each shard atomically as soon as it is computed (see :mod:`fxattr.runner.storage`), and
resumes by computing only the shards that are missing. Every shard is computed from the same
examples in the same batches with the same random seed whoever computes it, so an interrupted
and resumed run, or one split over ``torchrun`` ranks, writes exactly the bytes of one
uninterrupted process.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fxattr.errors import FxattrError, api_boundary, fail
from fxattr.runner import storage
from fxattr.runner.distributed import Group, join, my_shards

__all__ = ["RunSummary", "attribute_dataset", "load_attributions"]

TARGETS = ("predicted", "label")
RANDOMNESS = ("different", "same")


class RunSummary(NamedTuple):
    """What one call of :func:`attribute_dataset` did (on this rank)."""
    out: Path
    examples: int            # examples in the dataset
    shards: int              # shards in the whole run
    computed: int            # shards this call computed
    skipped: int             # shards of this rank found complete on disk (resume)
    seconds: float


class TensorExamples(torch.utils.data.Dataset):
    """A tensor ``(N, ...)`` as a dataset of its rows."""

    def __init__(self, tensor: Tensor):
        self.tensor = tensor

    def __len__(self) -> int:
        return len(self.tensor)

    def __getitem__(self, i):
        return self.tensor[i]


# ------------------------------------------------------------------ checks

def check_positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(None, f"{name} must be an int >= 1, got {value!r}")


def storage_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str) and dtype in storage.DTYPES:
        return storage.DTYPES[dtype]
    if dtype in storage.DTYPES.values():
        return dtype
    raise fail(None, f"dtype must be one of torch.float16, torch.bfloat16, torch.float32 (or their "
                      f"names); got {dtype!r}")


def split_batch(batch) -> tuple[Tensor, Tensor | None]:
    """A collated batch: images, or (images, labels)."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and len(batch) == 2 and isinstance(batch[0], Tensor):
        labels = batch[1]
        if not isinstance(labels, Tensor):
            labels = torch.as_tensor(labels)
        return batch[0], labels
    raise fail(None, "each example must be an image tensor or an (image, label) pair; the dataset "
                      f"gave {type(batch).__name__}"
                      + (f" of {len(batch)} items" if isinstance(batch, (list, tuple)) else ""))


def loader_settings(data) -> tuple[torch.utils.data.Dataset, dict]:
    """The dataset, and the DataLoader settings to keep (workers, collate_fn, ...)."""
    if isinstance(data, torch.utils.data.DataLoader):
        settings = {"num_workers": data.num_workers, "collate_fn": data.collate_fn,
                    "pin_memory": data.pin_memory, "worker_init_fn": data.worker_init_fn,
                    "multiprocessing_context": data.multiprocessing_context}
        if data.num_workers > 0:
            settings["prefetch_factor"] = data.prefetch_factor
        dataset = data.dataset
    elif isinstance(data, Tensor):
        dataset, settings = TensorExamples(data), {}
    elif isinstance(data, torch.utils.data.Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        dataset, settings = data, {}
    else:
        raise fail(None, f"data must be a Dataset, a DataLoader or a tensor of examples, got {type(data).__name__}")
    if isinstance(dataset, torch.utils.data.IterableDataset):
        raise fail(None, "data must be a map-style Dataset (indexable): an IterableDataset has no "
                          "positions to resume from or to split across ranks")
    return dataset, settings


def explainer_description(explain) -> dict:
    config = getattr(explain, "config", None)
    return {"name": getattr(explain, "__name__", type(explain).__name__),
            "config": storage.fingerprint(dict(config)) if config is not None else None}


# ------------------------------------------------------------------ the writer thread

class ShardWriter:
    """Writes shards on a thread so that disk I/O overlaps the next batches; the queue is
    bounded (``depth`` shards), so memory stays bounded when the disk is slower than compute."""

    def __init__(self, out: Path, depth: int = 2):
        self.out = out
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.run, name="fxattr-shard-writer", daemon=True)
        self.thread.start()

    def run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    storage.write_shard(self.out, *item)
                except BaseException as error:  # reported to the main thread
                    self.error = error

    def put(self, shard: int, tensors: dict[str, Tensor]) -> None:
        self.check()
        self.queue.put((shard, tensors))

    def check(self) -> None:
        if self.error is not None:
            raise fail(None, f"writing a shard failed: {self.error}") from self.error

    def close(self, report: bool = True) -> None:
        """Writes what is queued (finished shards survive an error in the loop), then stops."""
        self.queue.put(None)
        self.thread.join()
        if report:
            self.check()


# ------------------------------------------------------------------ the runner

@api_boundary("attribute_dataset")
def attribute_dataset(explain, params, data, out, *, batch_size: int = 32,
                      target: str | Callable = "predicted", format: str = "safetensors",
                      dtype=torch.float32, shard_size: int | None = None, resume: bool = False,
                      progress: bool = True, compile: bool | dict = False, num_workers: int = 0,
                      device=None, model=None, seed: int = 0, randomness: str = "different",
                      config: dict | None = None) -> RunSummary:
    """Explains every example of a dataset and writes the attributions to ``out``, resumably.

    Each batch is explained with ``torch.vmap(explain, in_dims=(None, 0, 0))``; each shard of
    ``shard_size`` examples is written atomically as soon as it is computed (a file is complete or
    absent, even under ``kill -9``), so ``resume=True`` computes only the missing shards and the
    result is bitwise that of an uninterrupted run. Under ``torchrun`` every rank computes every
    ``world_size``-th shard (gloo on CPU, NCCL on CUDA) and rank 0 finishes the run.

    Args:
        explain: any fxattr explainer ``explain(params, x, target)`` (its ``.model`` gives the
            predictions; otherwise pass ``model``).
        params: the parameters from :func:`fxattr.functionalize`.
        data: a map-style ``Dataset`` (or a ``DataLoader``: its dataset, workers and collate_fn
            are used, its sampler and batch size replaced) of images or ``(image, label)`` pairs,
            or a tensor of images. ``index`` is the position in this dataset.
        out: the run directory (created; must be empty or hold this run when resuming).
        batch_size: examples per vmapped call.
        target: ``"predicted"`` (the argmax of the model's output), ``"label"`` (the dataset's
            label) or a callable ``(outputs, labels) -> (B,) int tensor`` of class indices, given
            the batch's model outputs and labels (``None`` without labels).
        format: ``"safetensors"`` (shards), ``"hdf5"`` (one ``attribution.h5`` in ViRelAy's
            attribution-database layout) or ``"zarr"`` (``attribution.zarr``).
        dtype: the storage dtype: ``torch.float32``, ``torch.float16`` or ``torch.bfloat16``.
        shard_size: examples per shard file, a multiple of ``batch_size`` (default: one batch).
        resume: continue the run in ``out`` (refused if its configuration differs).
        progress: show a progress bar (tqdm, rank 0).
        compile: ``torch.compile`` the vmapped explainer once; the last batch is padded to
            ``batch_size`` so that it does not recompile. A dict is passed to ``torch.compile``
            as options (``{"mode": "max-autotune"}``, ``{"backend": "aot_eager"}``).
        num_workers: DataLoader worker processes decoding ahead of the computation.
        device: where to compute (default: the parameters' device; ``cuda`` under torchrun means
            ``cuda:LOCAL_RANK``).
        model: the functional model for the predictions, if ``explain`` has no ``.model``.
        seed: random explainers (SmoothGrad, RISE, ...) draw each batch's noise from
            ``seed`` and the batch's position, so any rank and any resume draws the same noise;
            torch's global random state is left as it was.
        randomness: ``torch.vmap``'s randomness for the explainer: ``"different"`` or ``"same"``.
        config: extra entries recorded in the manifest and compared on resume (the command line
            puts the model, weights and data there).

    Returns:
        A :class:`RunSummary`.

    Example:
        >>> f, params = fxattr.functionalize(model.eval())
        >>> fxattr.attribute_dataset(fxattr.lrp(f, composite="epsilon_plus"), params, dataset, "out",
        ...                          batch_size=64, dtype=torch.float16)
        >>> run = fxattr.load_attributions("out")
        >>> run["attribution"][:8].shape, run["target"][:8]  # vmap-batched, in dataset order
    """
    started = time.perf_counter()
    if not callable(explain):
        raise fail(None, f"explain must be an fxattr explainer (a callable), got {type(explain).__name__}")
    f = model if model is not None else getattr(explain, "model", None)
    if not callable(f):
        raise fail(None, "explain has no .model to predict with (not an fxattr explainer?): pass model=f, "
                          "the function of fxattr.functionalize")
    if not isinstance(params, dict):
        raise fail(None, f"params must be the dict of fxattr.functionalize, got {type(params).__name__}")
    check_positive_int("batch_size", batch_size)
    check_positive_int("shard_size", shard_size, allow_none=True)
    shard_size = batch_size if shard_size is None else shard_size
    if shard_size % batch_size:
        raise fail(None, f"shard_size ({shard_size}) must be a multiple of batch_size ({batch_size})")
    if not (callable(target) or (isinstance(target, str) and target in TARGETS)):
        raise fail(None, f"target must be 'predicted', 'label' or a callable (outputs, labels) -> "
                          f"class indices; got {target!r}")
    if format not in storage.FORMATS:
        raise fail(None, f"format must be one of {', '.join(map(repr, storage.FORMATS))}; got {format!r}")
    stored = storage_dtype(dtype)
    if format == "hdf5" and stored == torch.bfloat16:
        raise fail(None, "HDF5 has no bfloat16 (ViRelAy could not read it): use dtype float16 or "
                          "float32, or format 'safetensors' / 'zarr'")
    if format == "hdf5":
        storage.import_h5py()
    if format == "zarr":
        storage.import_zarr()
    for name, flag in (("resume", resume), ("progress", progress)):
        if not isinstance(flag, bool):
            raise fail(None, f"{name} must be True or False, got {flag!r}")
    if not isinstance(compile, (bool, dict)):
        raise fail(None, f"compile must be True, False or a dict of torch.compile options, got {compile!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise fail(None, f"num_workers must be an int >= 0, got {num_workers!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise fail(None, f"seed must be an int, got {seed!r}")
    if randomness not in RANDOMNESS:
        raise fail(None, f"randomness must be one of {RANDOMNESS}, got {randomness!r}")
    if config is not None and not isinstance(config, dict):
        raise fail(None, f"config must be a dict, got {type(config).__name__}")
    if isinstance(out, (str, Path)):
        out = Path(out)
    else:
        raise fail(None, f"out must be a directory path, got {type(out).__name__}")

    dataset, settings = loader_settings(data)
    length = len(dataset)
    if length == 0:
        raise fail(None, "the dataset is empty")
    if settings.get("num_workers", 0) == 0 and num_workers:
        settings["num_workers"] = num_workers
        settings["prefetch_factor"] = 4

    first_param = next(iter(params.values()), None)
    if device is None:
        device = first_param.device if isinstance(first_param, Tensor) else torch.device("cpu")
    device = torch.device(device)
    group = join(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", group.local_rank if group.active else torch.cuda.current_device())
    try:
        return run(explain, f, params, dataset, settings, out, length, group, device, batch_size=batch_size,
                   target=target, fmt=format, stored=stored, shard_size=shard_size, resume=resume,
                   progress=progress, compile=compile, seed=seed, randomness=randomness,
                   config=config, started=started)
    finally:
        group.leave()


def run(explain, f, params, dataset, settings, out: Path, length: int, group: Group, device, *, batch_size,
        target, fmt, stored, shard_size, resume, progress, compile, seed, randomness, config, started) -> RunSummary:
    params = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in params.items()}
    first = dataset[0]
    has_labels = isinstance(first, (tuple, list))
    x0, _ = split_batch(torch.utils.data.default_collate([first]))
    try:
        output0 = f(params, x0[0].to(device))
    except FxattrError:
        raise
    except Exception as error:
        raise fail(None, f"the model fails on the dataset's first example (shape {tuple(x0.shape[1:])}, "
                          f"dtype {x0.dtype}): {type(error).__name__}: {error}") from error
    output_size = output0.numel()
    if target == "label" and not has_labels:
        raise fail(None, "target='label' needs (image, label) examples; this dataset gives images only")
    shards = math.ceil(length / shard_size)
    manifest = {
        "layout": storage.LAYOUT_VERSION,
        "complete": False,
        "config": {
            "explainer": explainer_description(explain),
            "params": storage.params_fingerprint(params),
            "examples": length,
            "example_shape": list(x0.shape[1:]),
            "example_dtype": storage.dtype_name(x0.dtype),
            "output_size": output_size,
            "has_labels": has_labels,
            "batch_size": batch_size,
            "shard_size": shard_size,
            "target": target if isinstance(target, str) else storage.fingerprint(target),
            "format": fmt,
            "dtype": storage.dtype_name(stored),
            "compile": storage.fingerprint(compile),
            "seed": seed,
            "randomness": randomness,
            "device": device.type,
            "user": {str(k): storage.fingerprint(v) for k, v in (config or {}).items()},
        },
        "extra": {k: v for k, v in (config or {}).items() if isinstance(v, (str, int, float, bool, list, type(None)))},
    }

    # Rank 0 creates or checks the run directory; the others wait, then check the manifest too.
    refusal = None
    if group.rank == 0:
        try:
            existing = prepare_directory(out, manifest, resume)
        except FxattrError as error:
            refusal = error
    if not group.all_ok(refusal is None):
        raise refusal or fail(None, f"rank 0 refused the run in {str(out)!r} (see its error)")
    existing = storage.read_manifest(out)
    differences = compare_configs(existing["config"], manifest["config"])
    if differences:
        raise fail(None, f"{str(out)!r} holds a run with a different configuration ({differences}); "
                          "resume it with the same configuration, or choose another directory")
    if existing.get("complete"):
        return RunSummary(out, length, shards, 0, len(my_shards(shards, group)), time.perf_counter() - started)

    mine = my_shards(shards, group)
    todo = storage.missing_shards(out, mine)
    batches = [list(range(start, min(start + batch_size, (k + 1) * shard_size, length)))
               for k in todo for start in range(k * shard_size, min((k + 1) * shard_size, length), batch_size)]
    # A generator of its own: the loader's worker seeds are not drawn from torch's global generator.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(seed),
                                         **{k: v for k, v in settings.items() if k != "pin_memory"})
    step = make_step(explain, f, target, batch_size, compile, randomness, output_size)
    writer = ShardWriter(out)
    bar = progress_bar(progress and group.rank == 0, len(batches), explainer_description(explain)["name"])
    buffer: list[dict[str, Tensor]] = []
    try:
        for indices, batch in zip(batches, loader):
            x, labels = split_batch(batch)
            x = x.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True) if labels is not None else None
            index = torch.tensor(indices, dtype=torch.int64)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                # The noise of random explainers depends only on the batch's first example.
                torch.manual_seed(seed * 1_000_003 + indices[0])
                attribution, outputs, prediction, targets = step(params, x, labels)
            buffer.append({
                "attribution": attribution.detach().to(stored).cpu(),
                "output": outputs.detach().float().cpu(),
                "prediction": prediction.cpu(),
                "target": targets.cpu(),
                "index": index,
                "label": labels.long().cpu() if labels is not None else torch.full_like(index, -1),
            })
            shard = indices[0] // shard_size
            if indices[-1] + 1 == min((shard + 1) * shard_size, length):
                writer.put(shard, {k: torch.cat([b[k] for b in buffer]) for k in buffer[0]})
                buffer = []
            if bar is not None:
                bar.update(1)
    except BaseException:
        writer.close(report=False)  # the loop's error is the one to see
        raise
    else:
        writer.close()
    finally:
        if bar is not None:
            bar.close()
    group.barrier()
    if group.rank == 0:
        finalize(out, existing, shards)
    group.barrier()
    return RunSummary(out, length, shards, len(todo), len(mine) - len(todo), time.perf_counter() - started)


def prepare_directory(out: Path, manifest: dict, resume: bool) -> dict:
    if (out / storage.MANIFEST).is_file():
        if not resume:
            raise fail(None, f"{str(out)!r} already holds an fxattr run ({storage.MANIFEST}); pass "
                              "resume=True (--resume) to continue it, or choose another directory")
        storage.remove_temporaries(out)
        return storage.read_manifest(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise fail(None, f"{str(out)!r} is not an empty directory (and holds no fxattr run); choose "
                          "a new or empty directory")
    (out / storage.SHARDS).mkdir(parents=True, exist_ok=True)
    storage.write_manifest(out, manifest)
    return manifest


def compare_configs(old: dict, new: dict, prefix: str = "") -> str:
    differences = []
    for key in sorted(set(old) | set(new)):
        before, now = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(now, dict):
            nested = compare_configs(before, now, f"{prefix}{key}.")
            differences += [nested] if nested else []
        elif before != now:
            differences.append(f"{prefix}{key}: {before!r} in the manifest, {now!r} now")
    return "; ".join(differences)


def make_step(explain, f, target, batch_size: int, compile: bool, randomness: str, output_size: int):
    """``step(params, x, labels) -> (attribution, outputs, prediction, targets)`` for one batch."""
    vmapped_f = torch.vmap(f, in_dims=(None, 0))
    vmapped_explain = torch.vmap(explain, in_dims=(None, 0, 0), randomness=randomness)

    # Functions of their own: torch.compile caches by code object, and both vmaps share one.
    def forward(params, x):
        return vmapped_f(params, x)

    def batched(params, x, targets):
        return vmapped_explain(params, x, targets)

    if compile:
        options = {"dynamic": False, **(compile if isinstance(compile, dict) else {})}
        forward = torch.compile(forward, **options)
        batched = torch.compile(batched, **options)

    def choose(outputs: Tensor, flat: Tensor, prediction: Tensor, labels: Tensor | None) -> Tensor:
        if target == "predicted":
            return prediction
        if target == "label":
            chosen = labels.long()
        else:
            chosen = target(outputs, labels)
            if not isinstance(chosen, Tensor) or chosen.shape != prediction.shape \
                    or chosen.dtype.is_floating_point or chosen.dtype == torch.bool:
                shape = tuple(chosen.shape) if isinstance(chosen, Tensor) else type(chosen).__name__
                raise fail(None, f"the target callable must return {len(prediction)} integer class "
                                  f"indices (shape ({len(prediction)},)), got {shape}")
            chosen = chosen.long()
        bad = (chosen < 0) | (chosen >= output_size)
        if bad.any():
            raise fail(None, f"target {int(chosen[bad][0])} is out of range for the model's "
                              f"{output_size} outputs")
        return chosen

    def step(params, x, labels):
        size = len(x)
        if compile and size < batch_size:  # pad with copies of the last example: one compiled shape
            x = torch.cat([x, x[-1:].expand(batch_size - size, *x.shape[1:])])
            if labels is not None:
                labels = torch.cat([labels, labels[-1:].expand(batch_size - size)])
        outputs = forward(params, x).detach()
        flat = outputs.reshape(len(x), -1)
        prediction = flat.argmax(1)
        targets = choose(outputs, flat, prediction, labels)
        attribution = batched(params, x, targets)
        if not isinstance(attribution, Tensor):
            raise fail(None, f"the explainer must return one tensor per batch, got {type(attribution).__name__}")
        return attribution[:size], flat[:size], prediction[:size], targets[:size]

    return step


def progress_bar(show: bool, total: int, name: str):
    if not show or total == 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=f"fxattr {name}", unit="batch")


def finalize(out: Path, manifest: dict, shards: int) -> None:
    """Class means (and the HDF5 / zarr file) in one pass over the shards, in shard order: the
    sums are then the same bits whichever process computed which shard."""
    config = manifest["config"]
    missing = storage.missing_shards(out, range(shards))
    if missing:
        raise fail(None, f"{len(missing)} of {shards} shards are missing after the run (first: "
                          f"{storage.shard_path(out, missing[0]).name}); run again with resume=True")
    consolidated = None
    sums: dict[int, Tensor] = {}
    counts: dict[int, int] = {}
    stored = storage.DTYPES[config["dtype"]]
    for shard in range(shards):
        tensors = storage.read_shard(out, shard)
        attribution, targets = tensors["attribution"], tensors["target"]
        if consolidated is None and config["format"] != "safetensors":
            consolidated = storage.ConsolidatedWriter(
                out, config["format"], config["examples"], attribution.shape[1:], config["output_size"],
                stored, config["shard_size"], config["has_labels"],
                {"predicted": "model", "label": "true"}.get(config["target"], "callable"))
        classes, inverse = torch.unique(targets, return_inverse=True)
        partial = torch.zeros((len(classes), *attribution.shape[1:]), dtype=torch.float64)
        partial.index_add_(0, inverse, attribution.double())
        for c, total, n in zip(classes.tolist(), partial, torch.bincount(inverse, minlength=len(classes)).tolist()):
            if c in sums:
                sums[c] += total
            else:
                sums[c] = total.clone()
            counts[c] = counts.get(c, 0) + n
        if consolidated is not None:
            consolidated.write(shard * config["shard_size"], tensors)
    classes = sorted(sums)
    from safetensors.torch import save

    storage.atomic_write_bytes(out / storage.CLASS_MEAN, save({
        "class": torch.tensor(classes, dtype=torch.int64),
        "count": torch.tensor([counts[c] for c in classes], dtype=torch.int64),
        "mean": torch.stack([sums[c] / counts[c] for c in classes]).float(),
    }))
    if consolidated is not None:
        consolidated.close()
    manifest = dict(manifest, complete=True)
    storage.write_manifest(out, manifest)
    if consolidated is not None:  # the consolidated file holds everything now
        for shard in range(shards):
            storage.shard_path(out, shard).unlink(missing_ok=True)
        try:
            (out / storage.SHARDS).rmdir()
        except OSError:
            pass


# ------------------------------------------------------------------ reading

@api_boundary("load_attributions")
def load_attributions(out) -> dict[str, Any]:
    """The attributions of a finished run in ``out``, in dataset order.

    Returns:
        A dict with ``attribution`` (a :class:`~fxattr.runner.storage.LazyAttributions`
        ``(N, C, H, W)`` that reads only what is indexed, in the storage dtype), ``index`` (N,)
        (each example's position in the dataset, ``0..N-1``), ``target`` (N,) (the class
        explained), ``prediction`` (N,) (the argmax of the model's output), ``output`` (N, K)
        (the model's outputs, float32, lazy like ``attribution``), ``label`` (N,) when the dataset
        had labels,
        ``class_mean`` / ``class_count`` / ``classes`` (mean attribution and count per target
        class), and ``manifest``.

    Example:
        >>> run = fxattr.load_attributions("out")
        >>> torch.vmap(fxattr.gradient(f), in_dims=(None, 0, 0))(params, x[:4], run["target"][:4])
    """
    out = Path(out)
    manifest = storage.read_manifest(out)
    config = manifest["config"]
    if not manifest.get("complete"):
        shards = math.ceil(config["examples"] / config["shard_size"])
        missing = storage.missing_shards(out, range(shards))
        raise fail(None, f"the run in {str(out)!r} is not complete ({len(missing)} of {shards} shards "
                          "missing); resume it first")
    stored = storage.DTYPES[config["dtype"]]
    length = config["examples"]
    result: dict[str, Any] = {"manifest": manifest}
    if config["format"] == "safetensors":
        shards = math.ceil(length / config["shard_size"])
        small = {k: [] for k in ("index", "target", "prediction", "label")}
        for shard in range(shards):
            tensors = storage.read_shard(out, shard, list(small))
            for key, pieces in small.items():
                pieces.append(tensors[key])
        result.update({k: torch.cat(v) for k, v in small.items()})
        first = storage.read_shard(out, 0, ["attribution", "output"])
        for key in ("attribution", "output"):
            result[key] = storage.LazyAttributions(length, first[key].shape[1:], first[key].dtype,
                                                   storage.safetensors_rows(out, length, config["shard_size"], key))
    else:
        name = storage.HDF5_FILE if config["format"] == "hdf5" else storage.ZARR_DIR
        root = storage.open_consolidated(config["format"], out / name)
        result.update({
            "index": torch.from_numpy(root["index"][:].astype("int64")),
            "target": torch.from_numpy(root["target"][:]),
            "prediction": torch.from_numpy(root["predicted_class"][:]),
        })
        if "dataset_label" in root:
            result["label"] = torch.from_numpy(root["dataset_label"][:])
        result["attribution"] = storage.LazyAttributions(length, root["attribution"].shape[1:], stored,
                                                         storage.array_rows(root["attribution"], stored))
        result["output"] = storage.LazyAttributions(length, root["prediction"].shape[1:], torch.float32,
                                                    storage.array_rows(root["prediction"], torch.float32))
    if not config["has_labels"]:
        result.pop("label", None)
    means = storage.read_class_means(out)
    result.update(means)
    return result
