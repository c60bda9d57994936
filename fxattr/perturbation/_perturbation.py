"""Perturbation explainers: occlusion, feature ablation and RISE.

Each one evaluates the model on many perturbed copies of x -- one per window, feature group or
random mask -- and these copies are evaluated by ``torch.vmap`` (``chunk_size`` at a time), never
by a Python loop over perturbations. Only what changes is materialised: a copy's mask is built
inside the vmapped function from a few small per-perturbation rows, so memory grows with
``chunk_size``, not with the number of perturbations, and the results are accumulated in closed
form (occlusion: a separable sum of window indicators; RISE: a sum in the low-resolution grid,
upsampled once). All of it is plain differentiable torch, so the explanations are differentiable
w.r.t. the parameters and x (to any order), vmap over a batch and compile.
"""

from __future__ import annotations

import math
import string
from numbers import Real

import optree
import torch
import torch.nn.functional as F
from torch import Tensor

from fxattr._explainer import (
    check_int,
    check_model,
    explainer,
    fixed_target,
    tree_map,
    upcast,
)
from fxattr.errors import api_boundary, fail
from fxattr.functional import CAPTURE_LOCK
from fxattr.perturbation import _incremental
from fxattr.perturbation._features import (
    FeatureGroups,
    ablate,
    check_perturbation_baseline,
    check_perturbation_x,
    check_progress,
    leaf_baselines,
    map_chunks,
)
from fxattr.targets import check_target, is_concrete, select

__all__ = ["feature_ablation", "occlusion", "rise", "rise_masks"]


# --------------------------------------------------------------------------------------- helpers

def _check_x(where: str, x) -> None:
    if not isinstance(x, Tensor):
        raise fail(where, f"x must be a tensor (one example), got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise fail(where, f"x must be a floating-point tensor, got dtype {x.dtype}")


def _broadcastable(shape, to) -> bool:
    if len(shape) > len(to):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(to)))


def _as_tuple(where: str, name: str, value, ndim: int):
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * ndim
    if (not isinstance(value, tuple) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
        raise fail(where, f"{name} must be an int >= 1 or a tuple of them, got {value!r}")
    if len(value) != ndim:
        raise fail(where, f"{name} {value} has {len(value)} entries but x has {ndim} dimensions; "
                          "give one per dimension of x (channels included), as captum's "
                          "sliding_window_shapes")
    return value


def _check_tuple_config(where: str, name: str, value, allow_none=False) -> None:
    """An int >= 1, a tuple of them (one per dimension), or -- for a tuple x -- a tuple with one
    such entry per input (captum's ``sliding_window_shapes`` / ``strides`` for tuple inputs)."""
    if value is None and allow_none:
        return

    def one(v):
        return (isinstance(v, int) and not isinstance(v, bool) and v >= 1) or (
            isinstance(v, tuple) and v != () and all(isinstance(e, int) and not isinstance(e, bool) and e >= 1
                                                     for e in v))
    ok = one(value) or (isinstance(value, tuple) and value != () and all(
        one(v) or (v is None and allow_none) for v in value))
    if not ok:
        raise fail(where, f"{name} must be an int >= 1 or a tuple of them (for a tuple x: one such entry "
                          f"per input), got {value!r}")


def _per_input(where: str, name: str, value, count: int) -> list:
    """A window / stride / baseline option split over the ``count`` inputs of a tuple x."""
    if not isinstance(value, tuple) or (name in ("window", "stride") and all(isinstance(v, int) for v in value)
                                        and len(value) != count):
        return [value] * count
    if len(value) != count:
        raise fail(where, f"{name} has {len(value)} entries but x has {count} inputs; give one per input")
    return list(value)


# -------------------------------------------------------------------------------------- occlusion

@api_boundary("occlusion")
def occlusion(f, *, window, stride=None, baseline=0.0, chunk_size: int | None = 16,
              incremental="auto", show_progress=False):
    """Occlusion (Zeiler and Fergus 2014) with captum's ``Occlusion`` semantics.

    A window slides over x with the given stride (starts ``0, s, 2s, ...``; there are
    ``ceil((size - window) / stride) + 1`` positions per dimension, the last one clipped at the
    border, exactly as captum). For each position the window is replaced by ``baseline`` and the
    drop of the target output ``f(x)[t] - f(x_occluded)[t]`` is credited to every feature under the
    window; a feature's attribution is the mean of the drops of the windows covering it.

    x may be a tensor or a tuple of tensors (a model of several inputs, captum's tuple inputs:
    each input is occluded in turn, the others kept), floating-point, integer or boolean (an
    integer or boolean input takes a baseline of its kind; its attributions are in the model
    output's dtype).

    Args:
        f: the function of ``fxattr.functionalize``.
        window: the window's shape, one int per dimension of x (channels included, as captum's
            ``sliding_window_shapes``), or one int for all dimensions; for a tuple x, a tuple with
            one such entry per input (or one int for all).
        stride: the step, an int or one per dimension (default 1, as captum); at most the window
            wherever the window is smaller than x, so every feature is covered. For a tuple x, one
            entry per input (or one int for all).
        baseline: the value occluded features take: a number, or a tensor broadcastable to x; for
            a tuple x, one per input (or one number for all).
        chunk_size: how many windows are evaluated at once, per example (``None``: all); one
            forward holds ``batch x chunk_size`` copies under ``torch.vmap``.
        incremental: ``"auto"`` (default), ``True`` or ``False``. Incremental occlusion (Krypton:
            Nakandala, Kumar and Papakonstantinou, SIGMOD 2019, "Incremental and approximate
            inference for faster occlusion-based deep CNN explanations") evaluates the model once
            on x, keeping every feature map, and for each window recomputes only the box of each
            map the window can change (its receptive-field footprint, growing layer by layer);
            the rest of every map is the unoccluded value. The result is the same (exact, up to
            rounding). It needs a traceable model (``fxattr.graph.trace``) of ``f`` from
            ``fxattr.functionalize``, x of shape ``(C, H, W)``, and Conv2d / MaxPool2d / AvgPool2d
            modules: element-wise ops, eval batch norm, ``+`` and ``*`` keep the box, anything else
            (flatten, linear, adaptive pooling, functional convs) is computed on full maps. It pays
            when windows are small against the image and the early layers hold most of the work
            (resnet18 at 224 px, 16x16 windows: about half of the convolution work is skipped).
            ``"auto"`` uses it when it applies and skips something, ``True`` raises an error
            naming the reason when it cannot, ``False`` always evaluates full occluded copies.
            Only for one floating-point tensor x.
        show_progress: ``True`` (a tqdm bar if tqdm is installed, else a line on stderr), or a
            callable ``(done, total)`` called after each chunk of windows (eager and vmap; nothing
            is reported under ``torch.compile``; the incremental path reports once, at the end).

    Example:
        >>> explain = fxattr.occlusion(f, window=(3, 4, 4), stride=(3, 2, 2))
        >>> torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
    """
    where = "occlusion"
    check_model(where, f)
    _check_tuple_config(where, "window", window)
    _check_tuple_config(where, "stride", stride, allow_none=True)
    check_perturbation_baseline(where, baseline)
    check_int(where, "chunk_size", chunk_size, 1, allow_none=True)
    if incremental not in ("auto", True, False) or (incremental != "auto" and not isinstance(incremental, bool)):
        raise fail(where, f"incremental must be 'auto', True or False, got {incremental!r}")
    reporter = check_progress(where, show_progress)
    steps = None
    if incremental is not False:
        with CAPTURE_LOCK:  # torch.fx tracing is not thread-safe
            steps = _incremental.traced(where, f, required=incremental is True)

    def explain(params, x, target=None):
        params, x, half = upcast(params, x)
        out = explain_float(params, x, target)
        return out if half is None else tree_map(lambda t: t.to(half), out)

    def explain_float(params, x, target):
        check_target(where, target)
        check_perturbation_x(where, x)
        if isinstance(x, Tensor):
            return occlude_one(params, x, target)
        if not isinstance(x, (tuple, list)):
            raise fail(where, f"x must be a tensor or a tuple of tensors (one per input of the model), got "
                              f"{type(x).__name__}")
        if incremental is True:
            raise fail(where, "incremental=True cannot be used: x is a tuple of inputs")
        leaves, tree = optree.tree_flatten(x, namespace="torch")
        if len(leaves) != len(x):
            raise fail(where, "x must be a flat tuple of tensors (one per input of the model)")
        windows = _per_input(where, "window", window, len(x))
        strides = _per_input(where, "stride", stride, len(x))
        bases = leaf_baselines(where, baseline if not isinstance(baseline, list) else tuple(baseline), tuple(x))
        target, reference = _reference(where, f, params, x, target)
        results = []
        for i, leaf in enumerate(leaves):  # one input at a time, as captum; the windows are vmapped
            def score(copy, i=i):
                copies = list(leaves)
                copies[i] = copy
                return select(where, as_float(f(params, tree.unflatten(copies))), target)
            results.append(_occlude(where, leaf, windows[i], strides[i], bases[i], score, reference,
                                    chunk_size, reporter))
        return tree.unflatten(results)

    def occlude_one(params, x, target):
        base = leaf_baselines(where, baseline, x)[0]
        if steps is not None and x.dtype.is_floating_point:
            shape = tuple(x.shape)
            win, step = _window_and_stride(where, window, stride, shape)
            indicators, counts, grids, rows = _window_rows(shape, win, step, x.dtype, x.device)
            fast = _incremental.occlusion_scores(where, f, steps, params, x, base, win, step, grids,
                                                 rows, target, chunk_size, required=incremental is True)
            if fast is not None:
                reference, scores = fast
                if reporter is not None:
                    report = reporter(scores.shape[0])
                    report(scores.shape[0], scores.shape[0])
                    report.close()
                return _spread(reference - scores, indicators, counts, x.dtype, x.device)
        elif incremental is True:
            raise fail(where, f"incremental=True cannot be used: x has dtype {x.dtype}")
        target, reference = _reference(where, f, params, x, target)
        return _occlude(where, x, window, stride, base, lambda copy: select(where, as_float(f(params, copy)), target),
                        reference, chunk_size, reporter)

    config = {"window": window, "stride": stride, "baseline": baseline, "chunk_size": chunk_size,
              "incremental": incremental, "show_progress": bool(show_progress)}
    return explainer(where, f, config, explain, integer_x="bool")


def _window_and_stride(where, window, stride, shape):
    ndim = len(shape)
    win = _as_tuple(where, "window", window, ndim)
    step = _as_tuple(where, "stride", 1 if stride is None else stride, ndim)
    for d, (s, w, k) in enumerate(zip(shape, win, step)):
        if w > s:
            raise fail(where, f"window {win} is larger than x's shape {shape} in dimension {d}")
        if k > w and s > w:
            raise fail(where, f"stride {step} is larger than window {win} in dimension {d}; "
                              "features between windows would never be occluded")
    return win, step


def _window_rows(shape, win, step, dtype, device):
    """Per dimension, the (positions, size) indicators of the window at each position; the grid of
    positions; and per dimension the indicator row of every window position (flattened grid)."""
    indicators = []
    for s, w, k in zip(shape, win, step):
        starts = torch.arange(math.ceil((s - w) / k) + 1, device=device) * k
        cells = torch.arange(s, device=device)
        indicators.append(((cells >= starts[:, None]) & (cells < starts[:, None] + w)).to(dtype))
    counts = [a.shape[0] for a in indicators]
    grids = torch.meshgrid(*[torch.arange(c, device=device) for c in counts], indexing="ij")
    rows = [a[g.reshape(-1)] for a, g in zip(indicators, grids)]  # (positions, size_d) each
    return indicators, counts, grids, rows


def _spread(drops, indicators, counts, dtype, device):
    """Each feature's mean drop over the windows covering it."""
    total = _separable_sum(drops.reshape(counts), indicators)
    covered = _separable_sum(torch.ones(counts, dtype=drops.dtype, device=device), indicators)
    return total / covered


def _occlude(where, x, window, stride, base, score, reference, chunk_size, reporter):
    """Occlusion of the one tensor ``x`` (a model input): ``score(x_occluded)`` for every window
    position, vmapped; the mean drop per feature."""
    shape = tuple(x.shape)
    win, step = _window_and_stride(where, window, stride, shape)
    acc = reference.dtype
    indicators, counts, _, rows = _window_rows(shape, win, step, acc, x.device)

    def occluded(*row):
        return score(ablate(x, _outer(row), base))

    scores = map_chunks(occluded, tuple(rows), chunk_size, reporter)
    return _spread(reference - scores, indicators, counts, acc, x.device)


def as_float(out: Tensor) -> Tensor:
    """A model output in floating point (a model of integer or boolean inputs may output integers,
    whose drops would be rounded and cannot be selected with NaN for bad targets)."""
    return out if out.dtype.is_floating_point else out.to(torch.get_default_dtype())


def _reference(where, f, params, x, target):
    """The target (``None`` -> the argmax at x, without gradient) and its value at x: one forward."""
    out = as_float(f(params, x))
    if target is None:
        target = out.detach().reshape(-1).argmax()
    return target, select(where, out, target)


def _outer(rows):
    """The outer product of 1-d rows: the box mask of one window position."""
    mask = rows[0]
    for r in rows[1:]:
        mask = mask[..., None] * r
    return mask


def _separable_sum(values: Tensor, indicators) -> Tensor:
    """``sum_p values[p] * prod_d indicators[d][p_d, i_d]`` for every feature i, in one einsum."""
    letters = string.ascii_letters
    k = len(indicators)
    positions, features = letters[:k], letters[k:2 * k]
    spec = positions + "," + ",".join(p + i for p, i in zip(positions, features)) + "->" + features
    return torch.einsum(spec, values, *indicators)


# ------------------------------------------------------------------------------- feature ablation

@api_boundary("feature_ablation")
def feature_ablation(f, *, feature_mask=None, baseline=0.0, chunk_size: int | None = 8,
                     cross_tensor: bool = True, num_features: int | None = None, show_progress=False):
    """Feature ablation with captum's ``FeatureAblation`` semantics.

    Features are groups of x's elements sharing an id in ``feature_mask``; each group in turn is
    set to ``baseline`` and every element of the group gets ``f(x)[t] - f(x_ablated)[t]``.

    x may be a tensor or a tuple / dict of tensors (a model of several inputs, captum's tuple
    inputs), floating-point, integer (e.g. token ids) or boolean; an integer or boolean input
    takes a baseline of its kind, and its attributions are in the model output's dtype.

    The returned explainer is ``explain(params, x, target=None, *, feature_mask=None)``: a mask
    given at call time replaces the construction-time one and may differ per example under
    ``torch.vmap`` (``in_dims`` 0 for it); its ids must be ``0..G-1`` (G = ``num_features``, or
    the largest id + 1 read from the masks).

    Args:
        f: the function of ``fxattr.functionalize``.
        feature_mask: an integer tensor broadcastable to x's shape (e.g. ``(1, H, W)`` superpixels
            shared by the channels), or a tuple / dict of those for a tuple / dict x; any ids.
            ``None``: every element of x is its own feature.
        baseline: the value ablated features take: a number, a tensor broadcastable to x, or a
            tuple / dict of those for a tuple / dict x.
        chunk_size: how many groups are ablated at once, per example (``None``: all).
        cross_tensor: ``True`` (default, as captum 0.9): one id is one feature across all inputs
            of a tuple x, ablated in all of them at once (without a mask every element is its own
            feature anyway); ``False``: each input's ids are its own features (captum <= 0.7).
        num_features: the number of ids of call-time masks (needed under ``torch.compile``).
        show_progress: ``True`` (a tqdm bar if tqdm is installed, else a line on stderr), or a
            callable ``(done, total)`` called after each chunk of ablations (eager and vmap;
            nothing is reported under ``torch.compile``).

    Example:
        >>> segments = torch.arange(16).reshape(1, 4, 4).repeat_interleave(8, 1).repeat_interleave(8, 2)
        >>> explain = fxattr.feature_ablation(f, feature_mask=segments)
        >>> torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
        >>> per_example = torch.vmap(lambda p, x, t, m: explain(p, x, t, feature_mask=m))
    """
    where = "feature_ablation"
    check_model(where, f)
    check_perturbation_baseline(where, baseline)
    check_int(where, "chunk_size", chunk_size, 1, allow_none=True)
    features = FeatureGroups(where, feature_mask, cross_tensor=cross_tensor, num_features=num_features)
    reporter = check_progress(where, show_progress)

    def explain(params, x, target=None, *, feature_mask=None):
        params, x, half = upcast(params, x)
        out = explain_float(params, x, target, feature_mask)
        return out if half is None else tree_map(lambda t: t.to(half), out)

    def explain_float(params, x, target, call_mask):
        check_target(where, target)
        check_perturbation_x(where, x)
        leaves, tree = optree.tree_flatten(x, namespace="torch")
        group_of, count = features.resolve(x, call_mask)
        bases = leaf_baselines(where, baseline, x)
        target, reference = _reference(where, f, params, x, target)

        def ablated(group):
            copies = [ablate(t, g == group, b) for t, g, b in zip(leaves, group_of, bases)]
            return select(where, as_float(f(params, tree.unflatten(copies))), target)

        groups_ = torch.arange(count, device=leaves[0].device)
        drops = reference - map_chunks(ablated, (groups_,), chunk_size, reporter)
        return tree.unflatten([drops[g].expand(t.shape) for g, t in zip(group_of, leaves)])

    config = {"feature_mask": features.mask_shape, "baseline": baseline, "chunk_size": chunk_size,
              "cross_tensor": cross_tensor, "num_features": num_features, "show_progress": bool(show_progress)}
    return explainer(where, f, config, explain, integer_x="bool")


# ------------------------------------------------------------------------------------------- RISE

def _rise_geometry(size: int, cells: int, dtype, device):
    """The linear map from a row of ``cells`` grid values to every shifted, cropped mask row.

    Reproduces TorchRay's mask construction, which follows Petsiuk et al.: cell = ceil(size /
    cells); the grid is reflect-padded by one cell, upsampled (linear, align_corners=False) to
    ``cell * (cells + 2)``, cropped to ``size + cell`` starting at ``cell``, then a random shift in
    ``[0, cell)`` crops ``size`` values. All of it is linear in the grid, so it is a matrix per
    shift: returns ``(cell, size, cells)``.
    """
    cell = math.ceil(size / cells)
    eye = torch.eye(cells, dtype=dtype, device=device)[:, None, :]  # (cells, 1, cells): one-hot rows
    padded = F.pad(eye, (1, 1), mode="reflect") if cells > 1 else F.pad(eye, (1, 1), mode="replicate")
    up = F.interpolate(padded, size=cell * (cells + 2), mode="linear", align_corners=False)[:, 0]
    up = up[:, cell:cell + size + cell]  # (cells, size + cell)
    shifted = torch.stack([up[:, s:s + size] for s in range(cell)])  # (cell, cells, size)
    return shifted.transpose(1, 2).contiguous()  # (cell, size, cells)


def _check_rise_config(where, num_masks, cell_size, p):
    check_int(where, "num_masks", num_masks, 1)
    check_int(where, "cell_size", cell_size, 1)
    if isinstance(p, bool) or not isinstance(p, Real) or not 0 < p <= 1:
        raise fail(where, f"p (the keep probability of a cell) must be a number in (0, 1], got {p!r}")


def _draw(num_masks, cell_size, p, height, width, device):
    """The random part of RISE masks: binary grids and shifts, in torch's global generator."""
    grid = torch.rand(num_masks, cell_size, cell_size, device=device) < p
    shift_h = torch.randint(math.ceil(height / cell_size), (num_masks,), device=device)
    shift_w = torch.randint(math.ceil(width / cell_size), (num_masks,), device=device)
    return {"grid": grid, "shift": torch.stack([shift_h, shift_w], -1)}


@api_boundary("rise_masks")
def rise_masks(shape, *, num_masks: int = 8000, cell_size: int = 7, p: float = 0.5,
               dtype=torch.float32, device=None, noise=None) -> Tensor:
    """The random masks :func:`rise` draws, materialised: a tensor ``(num_masks, H, W)``.

    With the same seed, ``rise(f, num_masks=N, cell_size=s, p=p)`` evaluates exactly these masks:
    ``torch.manual_seed(0); m = rise_masks((H, W), ...)`` then ``rise(f, masks=m, p=p)`` explains
    like ``torch.manual_seed(0)`` then ``rise(f, num_masks=..., ...)``. Useful to share masks with
    other tools or to store them.

    Args:
        shape: ``(H, W)``, the last two dimensions of x.
        num_masks, cell_size, p: as in :func:`rise`.
        noise: the draws to use instead of torch's generator (see :func:`rise`).

    Example:
        >>> masks = fxattr.rise_masks((32, 32), num_masks=1000, cell_size=7, p=0.5)
    """
    where = "rise_masks"
    _check_rise_config(where, num_masks, cell_size, p)
    if (not isinstance(shape, tuple) or len(shape) != 2
            or not all(isinstance(s, int) and s >= 1 for s in shape)):
        raise fail(where, f"shape must be (H, W), two ints >= 1, got {shape!r}")
    height, width = shape
    if noise is None:
        noise = _draw(num_masks, cell_size, p, height, width, device)
    else:
        _check_rise_noise(where, noise, num_masks, cell_size, height, width)
    rows = _rise_geometry(height, cell_size, dtype, device)
    cols = _rise_geometry(width, cell_size, dtype, device)
    grid = noise["grid"].to(dtype)
    return torch.vmap(_rise_mask, in_dims=(None, None, 0, 0))(rows, cols, grid, noise["shift"])


def _rise_mask(rows, cols, grid, shift):
    """One mask: (H, cells) @ (cells, cells) @ (cells, W) for the mask's shifts."""
    return rows[shift[0]] @ grid @ cols[shift[1]].T


def _check_rise_noise(where, noise, num_masks, cell_size, height, width):
    if not isinstance(noise, dict) or set(noise) != {"grid", "shift"}:
        raise fail(where, "noise must be a dict with 'grid' (num_masks, cell_size, cell_size) kept "
                          "cells and 'shift' (num_masks, 2) integer shifts")
    grid, shift = noise["grid"], noise["shift"]
    if not isinstance(grid, Tensor) or tuple(grid.shape) != (num_masks, cell_size, cell_size):
        raise fail(where, f"noise['grid'] must have shape {(num_masks, cell_size, cell_size)}, got "
                          f"{tuple(getattr(grid, 'shape', ()))}")
    if (not isinstance(shift, Tensor) or shift.dtype.is_floating_point
            or tuple(shift.shape) != (num_masks, 2)):
        raise fail(where, f"noise['shift'] must be an integer tensor of shape {(num_masks, 2)}")
    limits = (math.ceil(height / cell_size), math.ceil(width / cell_size))
    if is_concrete(shift) and shift.numel() and not _inside(shift, limits):
        raise fail(where, f"noise['shift'] must lie in [0, {limits[0]}) x [0, {limits[1]}) (one cell)")


def _inside(shift, limits) -> bool:
    return bool((shift >= 0).all() and (shift[:, 0] < limits[0]).all() and (shift[:, 1] < limits[1]).all())


@api_boundary("rise")
def rise(f, *, masks=None, num_masks: int | None = None, cell_size: int = 7, p: float = 0.5,
         chunk_size: int | None = 8, show_progress=False):
    """RISE (Petsiuk et al. 2018): the target output on randomly masked inputs, averaged per pixel.

    ``saliency = sum_k f(x * m_k)[t] * m_k / (N * p)`` over N masks ``m_k``, returned broadcast to
    x's shape. ``p`` is the KEEP probability of a cell (Petsiuk et al.'s ``p1``; TorchRay's code
    keeps a cell when ``rand < p`` too) and the ``1 / (N p)`` normalisation is Petsiuk et al.'s,
    under which ``E[m_i] / p = 1``. With it, for a bias-free linear model and masks whose entries
    are independent Bernoulli(p), the expectation is ``(1 - p) * w * x + p * f(x)``
    (``E[m_i m_j] = p^2`` for ``i != j`` and ``p`` for ``i = j``). TorchRay instead divides by N only
    and applies a sigmoid to the output; pass ``target=lambda out: out.sigmoid()[c]`` (or
    ``out.softmax(-1)[c]``, Petsiuk et al.'s class probability) to explain a probability.

    Masks are either passed in (``masks``, a tensor ``(N, *s)`` with ``s`` broadcastable to x's
    shape, e.g. ``(N, H, W)`` shared by the channels) or drawn at every call as Petsiuk et al. and
    TorchRay do: a ``cell_size x cell_size`` grid of cells kept with probability ``p``, upsampled
    bilinearly to x's last two dimensions plus one cell, and cropped at a random shift of less than
    one cell. A mask is built inside the vmapped evaluation from its grid and shift (two small
    matrix products) and the saliency is accumulated in grid space, so memory does not grow with
    the number of masks.

    The returned explainer is ``explain(params, x, target=None, *, noise=None)``. Drawn masks come
    from torch's global generator: ``grid = torch.rand(N, s, s) < p``, then ``torch.randint``
    shifts (rows, then columns); ``torch.manual_seed`` reproduces a run, ``torch.vmap(...,
    randomness="same")`` shares the masks over a batch (as RISE does) and ``"different"`` draws per
    example. ``noise=dict(grid=..., shift=...)`` replays given draws; :func:`rise_masks`
    materialises the masks.

    Args:
        f: the function of ``fxattr.functionalize``.
        masks: fixed masks ``(N, *s)``; when given, nothing is drawn.
        num_masks: N for drawn masks (default 8000, as TorchRay).
        cell_size: the grid has ``cell_size x cell_size`` cells (TorchRay's ``num_cells``, Petsiuk
            et al.'s ``s``; default 7, as TorchRay).
        p: the probability of keeping a cell, in (0, 1]; also the normalisation of fixed masks.
        chunk_size: how many masked copies are evaluated at once, per example (``None``:
            all). 8 by measurement: resnet18 at 224 px, batch 2, 64 masks cost 81 ms per
            masked copy in chunks of 8, 89 ms in 16 and 97 ms in 32 (CPU, 1 thread).
        show_progress: ``True`` (a tqdm bar if tqdm is installed, else a line on stderr) or a
            callable ``(done, total)`` called after each chunk of masks (eager and vmap; nothing
            is reported under ``torch.compile``).

    Example:
        >>> explain = fxattr.rise(f, num_masks=2000)
        >>> torch.manual_seed(0)
        >>> torch.vmap(explain, in_dims=(None, 0, 0), randomness="same")(params, images, labels)
    """
    where = "rise"
    check_model(where, f)
    check_int(where, "chunk_size", chunk_size, 1, allow_none=True)
    reporter = check_progress(where, show_progress)
    if masks is not None:
        if not isinstance(masks, Tensor) or not masks.dtype.is_floating_point or masks.ndim < 2:
            raise fail(where, "masks must be a floating-point tensor (N, *s) of N masks with s "
                              "broadcastable to x's shape, got "
                              f"{getattr(masks, 'dtype', type(masks).__name__)} {tuple(getattr(masks, 'shape', ()))}")
        if masks.numel() and not bool(torch.isfinite(masks).all()):
            raise fail(where, "masks hold NaN or Inf values")
        if num_masks is not None and num_masks != masks.shape[0]:
            raise fail(where, f"num_masks={num_masks} but masks holds {masks.shape[0]} masks; give one")
        num_masks = masks.shape[0]
    num_masks = 8000 if num_masks is None else num_masks
    _check_rise_config(where, num_masks, cell_size, p)
    scale = 1.0 / (num_masks * p)

    def explain(params, x, target=None, *, noise=None):
        check_target(where, target)
        _check_x(where, x)
        target = fixed_target(f, params, x, target)
        if masks is not None:
            if noise is not None:
                raise fail(where, "noise replays drawn masks; this explainer has fixed masks")
            if not _broadcastable(tuple(masks.shape[1:]), tuple(x.shape)):
                raise fail(where, f"masks of shape {tuple(masks.shape)} do not broadcast to x's shape "
                                  f"{tuple(x.shape)}: expected (N, *s) with s broadcastable to it")
            fixed = masks.to(dtype=x.dtype, device=x.device)
            scores = map_chunks(lambda m: select(where, f(params, x * m), target), (fixed,), chunk_size, reporter)
            saliency = torch.tensordot(scores, fixed, dims=1) * scale
            return saliency.expand(x.shape)
        if x.ndim < 2:
            raise fail(where, f"drawn masks cover x's last two dimensions, but x has shape "
                              f"{tuple(x.shape)}; pass masks= for other inputs")
        height, width = x.shape[-2:]
        if noise is None:
            noise = _draw(num_masks, cell_size, p, height, width, x.device)
        else:
            _check_rise_noise(where, noise, num_masks, cell_size, height, width)
        rows = _rise_geometry(height, cell_size, x.dtype, x.device)
        cols = _rise_geometry(width, cell_size, x.dtype, x.device)
        grid, shift = noise["grid"].to(x.dtype), noise["shift"]

        def score(g, s):
            return select(where, f(params, x * _rise_mask(rows, cols, g, s)), target)

        scores = map_chunks(score, (grid, shift), chunk_size, reporter)
        # sum_k score_k * rows[sh_k] @ grid_k @ cols[sw_k]^T, grouped by shift: accumulate the
        # weighted grids per (sh, sw) pair, then apply each shift's matrices once.
        n_h, n_w = rows.shape[0], cols.shape[0]
        pair = shift[:, 0] * n_w + shift[:, 1]
        weighted = scores[:, None, None] * grid
        per_shift = torch.zeros((n_h * n_w, cell_size, cell_size), dtype=x.dtype, device=x.device)
        per_shift = per_shift.index_add(0, pair, weighted).reshape(n_h, n_w, cell_size, cell_size)
        saliency = torch.einsum("aHi,abij,bWj->HW", rows, per_shift, cols) * scale
        return saliency.expand(x.shape)

    config = {"masks": None if masks is None else tuple(masks.shape), "num_masks": num_masks,
              "cell_size": cell_size, "p": p, "chunk_size": chunk_size, "show_progress": bool(show_progress)}
    return explainer(where, f, config, explain)
