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

import torch
import torch.nn.functional as F
from torch import Tensor

from fxattr._explainer import check_int, check_model, explainer, fixed_target, upcast
from fxattr.errors import api_boundary, check_finite, fail
from fxattr.functional import CAPTURE_LOCK
from fxattr.perturbation import _incremental
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


def _check_baseline(where: str, baseline) -> None:
    if isinstance(baseline, bool) or not isinstance(baseline, (Real, Tensor)):
        raise fail(where, f"baseline must be a number or a tensor broadcastable to x's shape, got "
                          f"{type(baseline).__name__}")
    if isinstance(baseline, Real):
        check_finite(where, "baseline", baseline)
    elif not baseline.dtype.is_floating_point:
        raise fail(where, f"baseline must be a floating-point tensor, got dtype {baseline.dtype}")
    elif baseline.numel() and not bool(torch.isfinite(baseline).all()):
        raise fail(where, "baseline holds NaN or Inf values")


def _baseline(where: str, baseline, x: Tensor) -> Tensor:
    if isinstance(baseline, Real):
        return torch.tensor(float(baseline), dtype=x.dtype, device=x.device)
    if not _broadcastable(tuple(baseline.shape), tuple(x.shape)):
        raise fail(where, f"baseline of shape {tuple(baseline.shape)} does not broadcast to x's shape "
                          f"{tuple(x.shape)}")
    return baseline.to(dtype=x.dtype, device=x.device)


def _ablate(x: Tensor, mask: Tensor, base: Tensor) -> Tensor:
    # captum's form, x (1 - m) + b m, so that the numbers match captum's to the last bit.
    return x * (1 - mask) + base * mask


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
    if value is None and allow_none:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    ok = ok or (isinstance(value, tuple) and value != () and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value))
    if not ok:
        raise fail(where, f"{name} must be an int >= 1 or a tuple of them, got {value!r}")


# -------------------------------------------------------------------------------------- occlusion

@api_boundary("occlusion")
def occlusion(f, *, window, stride=None, baseline=0.0, chunk_size: int | None = 16,
              incremental="auto"):
    """Occlusion (Zeiler and Fergus 2014) with captum's ``Occlusion`` semantics.

    A window slides over x with the given stride (starts ``0, s, 2s, ...``; there are
    ``ceil((size - window) / stride) + 1`` positions per dimension, the last one clipped at the
    border, exactly as captum). For each position the window is replaced by ``baseline`` and the
    drop of the target output ``f(x)[t] - f(x_occluded)[t]`` is credited to every feature under the
    window; a feature's attribution is the mean of the drops of the windows covering it.

    Args:
        f: the function of ``fxattr.functionalize``.
        window: the window's shape, one int per dimension of x (channels included, as captum's
            ``sliding_window_shapes``), or one int for all dimensions.
        stride: the step, an int or one per dimension (default 1, as captum); at most the window
            wherever the window is smaller than x, so every feature is covered.
        baseline: the value occluded features take: a number, or a tensor broadcastable to x.
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

    Example:
        >>> explain = fxattr.occlusion(f, window=(3, 4, 4), stride=(3, 2, 2))
        >>> torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
    """
    where = "occlusion"
    check_model(where, f)
    _check_tuple_config(where, "window", window)
    _check_tuple_config(where, "stride", stride, allow_none=True)
    _check_baseline(where, baseline)
    check_int(where, "chunk_size", chunk_size, 1, allow_none=True)
    if incremental not in ("auto", True, False) or (incremental != "auto" and not isinstance(incremental, bool)):
        raise fail(where, f"incremental must be 'auto', True or False, got {incremental!r}")
    steps = None
    if incremental is not False:
        with CAPTURE_LOCK:  # torch.fx tracing is not thread-safe
            steps = _incremental.traced(where, f, required=incremental is True)

    def explain(params, x, target=None):
        params, x, half = upcast(params, x)
        out = explain_float(params, x, target)
        return out if half is None else out.to(half)

    def explain_float(params, x, target):
        check_target(where, target)
        _check_x(where, x)
        shape = tuple(x.shape)
        win = _as_tuple(where, "window", window, x.ndim)
        step = _as_tuple(where, "stride", 1 if stride is None else stride, x.ndim)
        for d, (s, w, k) in enumerate(zip(shape, win, step)):
            if w > s:
                raise fail(where, f"window {win} is larger than x's shape {shape} in dimension {d}")
            if k > w and s > w:
                raise fail(where, f"stride {step} is larger than window {win} in dimension {d}; "
                                  "features between windows would never be occluded")
        base = _baseline(where, baseline, x)
        # indicators[d]: (positions_d, size_d), 1 where the window at that position covers.
        indicators = []
        for s, w, k in zip(shape, win, step):
            starts = torch.arange(math.ceil((s - w) / k) + 1, device=x.device) * k
            cells = torch.arange(s, device=x.device)
            indicators.append(((cells >= starts[:, None]) & (cells < starts[:, None] + w)).to(x.dtype))
        counts = [a.shape[0] for a in indicators]
        grids = torch.meshgrid(*[torch.arange(c, device=x.device) for c in counts], indexing="ij")
        rows = [a[g.reshape(-1)] for a, g in zip(indicators, grids)]  # (positions, size_d) each

        fast = None
        if steps is not None:
            fast = _incremental.occlusion_scores(where, f, steps, params, x, base, win, step, grids,
                                                 rows, target, chunk_size,
                                                 required=incremental is True)
        if fast is not None:
            reference, scores = fast
        else:
            target, reference = _reference(where, f, params, x, target)

            def occluded(*row):
                mask = _outer(row)
                return select(where, f(params, _ablate(x, mask, base)), target)

            scores = torch.vmap(occluded, chunk_size=chunk_size)(*rows)
        drops = reference - scores
        total = _separable_sum(drops.reshape(counts), indicators)
        covered = _separable_sum(torch.ones(counts, dtype=x.dtype, device=x.device), indicators)
        return total / covered

    config = {"window": window, "stride": stride, "baseline": baseline, "chunk_size": chunk_size,
              "incremental": incremental}
    return explainer(where, f, config, explain)


def _reference(where, f, params, x, target):
    """The target (``None`` -> the argmax at x, without gradient) and its value at x: one forward."""
    out = f(params, x)
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
def feature_ablation(f, *, feature_mask=None, baseline=0.0, chunk_size: int | None = 8):
    """Feature ablation with captum's ``FeatureAblation`` semantics.

    Features are groups of x's elements sharing an id in ``feature_mask``; each group in turn is
    set to ``baseline`` and every element of the group gets ``f(x)[t] - f(x_ablated)[t]``.

    Args:
        f: the function of ``fxattr.functionalize``.
        feature_mask: an integer tensor broadcastable to x's shape (e.g. ``(1, H, W)`` superpixels
            shared by the channels); any ids. ``None``: every element of x is its own feature.
        baseline: the value ablated features take: a number, or a tensor broadcastable to x.
        chunk_size: how many groups are ablated at once, per example (``None``: all).

    Example:
        >>> segments = torch.arange(16).reshape(1, 4, 4).repeat_interleave(8, 1).repeat_interleave(8, 2)
        >>> explain = fxattr.feature_ablation(f, feature_mask=segments)
        >>> torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
    """
    where = "feature_ablation"
    check_model(where, f)
    _check_baseline(where, baseline)
    check_int(where, "chunk_size", chunk_size, 1, allow_none=True)
    if feature_mask is not None:
        if (not isinstance(feature_mask, Tensor) or feature_mask.dtype.is_floating_point
                or feature_mask.dtype.is_complex or feature_mask.dtype == torch.bool):
            raise fail(where, "feature_mask must be an integer tensor of feature ids broadcastable to "
                              f"x's shape, got {getattr(feature_mask, 'dtype', type(feature_mask).__name__)}")
        if feature_mask.numel() == 0:
            raise fail(where, "feature_mask is empty")
        # Ids -> 0..G-1 once, at construction (torch.unique cannot run under vmap or compile).
        ids, inverse = torch.unique(feature_mask, return_inverse=True)
        groups = ids.numel()

    def explain(params, x, target=None):
        params, x, half = upcast(params, x)
        out = explain_float(params, x, target)
        return out if half is None else out.to(half)

    def explain_float(params, x, target):
        check_target(where, target)
        _check_x(where, x)
        if feature_mask is None:
            group_of, count = torch.arange(x.numel(), device=x.device).reshape(x.shape), x.numel()
        else:
            if not _broadcastable(tuple(feature_mask.shape), tuple(x.shape)):
                raise fail(where, f"feature_mask of shape {tuple(feature_mask.shape)} does not "
                                  f"broadcast to x's shape {tuple(x.shape)}")
            group_of, count = inverse.to(x.device), groups
        base = _baseline(where, baseline, x)
        target, reference = _reference(where, f, params, x, target)

        def ablated(group):
            mask = (group_of == group).to(x.dtype)
            return select(where, f(params, _ablate(x, mask, base)), target)

        groups_ = torch.arange(count, device=x.device)
        drops = reference - torch.vmap(ablated, chunk_size=chunk_size)(groups_)
        return drops[group_of].expand(x.shape)

    config = {"feature_mask": None if feature_mask is None else tuple(feature_mask.shape),
              "baseline": baseline, "chunk_size": chunk_size}
    return explainer(where, f, config, explain)


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
         chunk_size: int | None = 8):
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

    Example:
        >>> explain = fxattr.rise(f, num_masks=2000)
        >>> torch.manual_seed(0)
        >>> torch.vmap(explain, in_dims=(None, 0, 0), randomness="same")(params, images, labels)
    """
    where = "rise"
    check_model(where, f)
    check_int(where, "chunk_size", chunk_size, 1, allow_none=True)
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
            scores = torch.vmap(lambda m: select(where, f(params, x * m), target),
                                chunk_size=chunk_size)(fixed)
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

        scores = torch.vmap(score, chunk_size=chunk_size)(grid, shift)
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
              "cell_size": cell_size, "p": p, "chunk_size": chunk_size}
    return explainer(where, f, config, explain)
