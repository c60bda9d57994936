"""Pictures of attributions: iNNvestigate's visualisation helpers for torch tensors and numpy arrays.

``project``, ``heatmap``, ``graymap``, ``gamma`` and ``clip_quantile`` keep the semantics of
iNNvestigate's ``innvestigate.utils.visualizations`` (per-example absmax normalisation, colour
look-up in 256 levels, gamma applied separately to both signs around ``minamp``, percentile
clipping over the whole array), with two PyTorch conventions: images are channels-first (``CHW`` or
``NCHW``) and every function returns the type it was given (a tensor on the input's device, or a
numpy array). ``overlay`` lays a heatmap over the input image and ``plot_grid`` draws the classic
figure, one row per example and one column per method, to a PNG.

matplotlib is optional: the ``seismic``, ``bwr`` and ``gray`` colour maps are built in, and only
``plot_grid`` and other colour-map names import it (lazily, with a clear error when it is missing).

Example:
    >>> relevance = torch.vmap(fxattr.lrp(f, rule="epsilon"), in_dims=(None, 0, 0))(params, x, y)
    >>> fxattr.viz.plot_grid([[fxattr.viz.graymap(x[i]), fxattr.viz.heatmap(relevance[i])]
    ...                        for i in range(len(x))],
    ...                       col_labels=["input", "LRP-epsilon"], file="lrp.png")
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fxattr.errors import api_boundary, check_finite, fail

__all__ = ["clip_quantile", "gamma", "graymap", "heatmap", "overlay", "plot_grid", "project"]

# matplotlib's own definitions of these maps: colours at equally spaced positions, interpolated
# linearly into a 256-entry table (LinearSegmentedColormap.from_list), so no import is needed.
_BUILTIN_CMAPS = {
    "seismic": ((0.0, 0.0, 0.3), (0.0, 0.0, 1.0), (1.0, 1.0, 1.0), (1.0, 0.0, 0.0), (0.5, 0.0, 0.0)),
    "bwr": ((0.0, 0.0, 1.0), (1.0, 1.0, 1.0), (1.0, 0.0, 0.0)),
    "gray": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
_REDUCE = ("sum", "absmax")
NAN_COLOR = (0.0, 0.0, 0.0)  # heatmap pixels whose value is NaN are drawn black


def _as_tensor(x, name: str = "x") -> tuple[Tensor, bool]:
    """``x`` as a floating tensor (no copy where possible) and whether it came as numpy."""
    if isinstance(x, Tensor):
        t = x.detach()
        return (t if t.is_floating_point() else t.double()), False
    if isinstance(x, (np.ndarray, np.generic, list, tuple, int, float)):
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiub":
            raise fail(None, f"{name} must hold numbers, got an array of dtype {arr.dtype}")
        t = torch.from_numpy(np.array(arr, dtype=arr.dtype if arr.dtype.kind == "f" else np.float64))
        return t, True
    raise fail(None, f"{name} must be a torch tensor or a numpy array, got {type(x).__name__}")


def _back(t: Tensor, was_numpy: bool):
    return t.cpu().numpy() if was_numpy else t


def _batch_shape(t: Tensor) -> tuple[int, ...]:
    return (t.shape[0],) + (1,) * (t.ndim - 1)


@api_boundary("viz.project")
def project(x, output_range=(0, 1), absmax=None, input_is_positive_only: bool = False):
    """Maps values into ``output_range`` by their magnitude, as iNNvestigate's ``project``.

    Each example (axis 0 is the batch axis) is divided by its largest absolute value ``absmax``
    (examples that are all zero are left as they are), mapped from ``[-1, 1]`` to ``[0, 1]`` by
    ``(v + 1) / 2`` unless ``input_is_positive_only``, clipped to ``[0, 1]`` and scaled to
    ``output_range``. So 0 lands in the middle of the range and ``+absmax`` / ``-absmax`` at its
    ends. For one example without batch axis, pass ``x[None]`` or ``absmax=x.abs().max()``.

    Args:
        x: a tensor or numpy array whose axis 0 is the batch axis (not modified).
        output_range: ``(low, high)``.
        absmax: the normaliser: ``None`` (each example's own), a number (shared), or one value per
            example (shape ``(N,)``).
        input_is_positive_only: skip the shift to ``[0, 1]``, for non-negative maps.

    Returns:
        The projected values, of x's type and shape.

    Example:
        >>> fxattr.viz.project(torch.tensor([[-2.0, 0.0, 1.0]]))
        tensor([[0.0000, 0.5000, 0.7500]])
    """
    t, was_numpy = _as_tensor(x)
    low, high = _range(output_range)
    _check_flag("input_is_positive_only", input_is_positive_only)
    if t.ndim == 0:
        raise fail(None, "x must have a batch axis (axis 0); got a 0-d value")
    if absmax is None:
        # NaN / Inf values do not set the scale: NaN stays NaN (heatmap draws it in NAN_COLOR),
        # +-Inf lands on the ends of the range
        magnitude = torch.where(torch.isfinite(t), t, torch.zeros_like(t)).abs()
        absmax_t = magnitude.amax(dim=tuple(range(1, t.ndim))) if t.ndim > 1 else magnitude
    else:
        absmax_t, _ = _as_tensor(absmax, "absmax")
        absmax_t = absmax_t.to(device=t.device, dtype=t.dtype)
        if absmax_t.numel() and not bool((torch.isfinite(absmax_t) & (absmax_t >= 0)).all()):
            raise fail(None, "absmax must be finite and >= 0")
        if absmax_t.ndim > 1 or (absmax_t.ndim == 1 and absmax_t.shape[0] not in (1, t.shape[0])):
            raise fail(None, f"absmax must be a number or hold one value per example ({t.shape[0]}), "
                              f"got shape {tuple(absmax_t.shape)}")
    absmax_t = absmax_t.expand(t.shape[0])
    scale = torch.where(absmax_t != 0, absmax_t, torch.ones_like(absmax_t)).reshape(_batch_shape(t))
    y = t / scale
    if not input_is_positive_only:
        y = (y + 1) / 2
    y = y.clamp(0, 1)
    return _back(low + y * (high - low), was_numpy)


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise fail(None, f"{name} must be True or False, got {value!r}")


def _range(output_range):
    try:
        low, high = output_range
        low, high = float(low), float(high)
    except (TypeError, ValueError):
        raise fail(None, f"output_range must be a pair (low, high), got {output_range!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise fail(None, f"output_range must be finite, got {output_range!r}")
    return low, high


def _reduce_channels(t: Tensor, reduce: str, channel_axis) -> Tensor:
    """NCHW -> NHW (or CHW -> HW) by ``reduce`` over the channel axis."""
    if channel_axis is None:
        return t
    if reduce == "sum":
        return t.sum(channel_axis)
    # absmax: the signed value of largest magnitude; ties between +m and -m go to +m, as iNNvestigate.
    pos = t.amax(channel_axis)
    neg = t.amin(channel_axis)
    return torch.where(pos >= -neg, pos, neg)


def _colormap_table(cmap, dtype, device) -> Tensor:
    """The (256, 3) RGB table of ``cmap`` (a name or a matplotlib Colormap)."""
    if isinstance(cmap, str) and cmap in _BUILTIN_CMAPS:
        colors = torch.tensor(_BUILTIN_CMAPS[cmap], dtype=torch.float64)
        positions = torch.linspace(0, 1, 256, dtype=torch.float64) * (len(colors) - 1)
        lower = positions.floor().long().clamp(max=len(colors) - 2)
        frac = (positions - lower)[:, None]
        table = colors[lower] * (1 - frac) + colors[lower + 1] * frac
        return table.to(dtype=dtype, device=device)
    mpl = _matplotlib(f"the colour map {cmap!r} (built in: {', '.join(_BUILTIN_CMAPS)})")
    try:
        colormap = mpl.colormaps[cmap] if isinstance(cmap, str) else cmap
        table = np.asarray(colormap(np.arange(256)))[:, :3]
    except (KeyError, ValueError, TypeError) as error:
        raise fail(None, f"cmap must be a matplotlib colour map or its name, got {cmap!r}: {error}") from None
    return torch.as_tensor(table, dtype=dtype, device=device)


@api_boundary("viz.heatmap")
def heatmap(x, reduce: str = "sum", cmap="seismic", *, channel_axis: int | None = -3,
            absmax=None, input_is_positive_only: bool = False):
    """An RGB picture of an attribution, as iNNvestigate's ``heatmap``.

    The channel axis is reduced (``"sum"``, or ``"absmax"``: the signed value of largest
    magnitude), each map is projected to ``[0, 255]`` by its own absmax (see :func:`project`),
    truncated to an integer level and looked up in ``cmap``. With ``"seismic"`` (or ``"bwr"``)
    zero is white, ``+absmax`` red and ``-absmax`` blue.

    Args:
        x: an attribution of shape ``(C, H, W)`` or ``(N, C, H, W)``; or ``(H, W)`` /
            ``(N, H, W)`` with ``channel_axis=None`` (maps already reduced, e.g. Grad-CAM).
        reduce: ``"sum"`` or ``"absmax"``.
        cmap: ``"seismic"``, ``"bwr"``, ``"gray"`` (built in), or any matplotlib colour map or name.
        channel_axis: the axis to reduce (``-3``: channels-first), or ``None`` for none.
        absmax, input_is_positive_only: passed to :func:`project` (``absmax`` per example).

    Returns:
        RGB values in ``[0, 1]``, channels-last for ``imshow``: ``(H, W, 3)`` or ``(N, H, W, 3)``,
        of x's type.

    Example:
        >>> relevance = torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
        >>> fxattr.viz.heatmap(relevance).shape  # images: (8, 3, 224, 224)
        torch.Size([8, 224, 224, 3])
    """
    if reduce not in _REDUCE:
        raise fail(None, f"reduce must be one of {', '.join(map(repr, _REDUCE))}; got {reduce!r}")
    t, was_numpy = _as_tensor(x)
    if channel_axis is not None and channel_axis not in (-3, -1, 0, 1):
        raise fail(None, f"channel_axis must be -3, -1, 0, 1 or None, got {channel_axis!r}")
    expected = (3, 4) if channel_axis is not None else (2, 3)
    if t.ndim not in expected:
        what = "(C, H, W) or (N, C, H, W)" if channel_axis is not None else "(H, W) or (N, H, W)"
        raise fail(None, f"x must have shape {what}, got {tuple(t.shape)}"
                          + (" (pass channel_axis=None for maps without channels)"
                             if channel_axis is not None and t.ndim == 2 else ""))
    single = t.ndim == expected[0]
    if single:
        t = t.unsqueeze(0)
        if channel_axis is not None and channel_axis >= 0:
            channel_axis += 1
    maps = _reduce_channels(t, reduce, channel_axis)
    projected = project(maps, output_range=(0, 255), absmax=absmax,
                        input_is_positive_only=input_is_positive_only)
    missing = torch.isnan(projected)
    levels = torch.where(missing, torch.zeros_like(projected), projected).long()
    rgb = _colormap_table(cmap, t.dtype, t.device)[levels]
    if bool(missing.any()):  # NaN is drawn, not crashed on: NAN_COLOR marks it
        rgb = torch.where(missing[..., None], torch.tensor(NAN_COLOR, dtype=rgb.dtype, device=rgb.device), rgb)
    return _back(rgb[0] if single else rgb, was_numpy)


@api_boundary("viz.graymap")
def graymap(x, reduce: str = "sum", **kwargs):
    """:func:`heatmap` with the ``"gray"`` colour map (for the input image, or unsigned maps)."""
    return heatmap(x, reduce, cmap="gray", **kwargs)


@api_boundary("viz.gamma")
def gamma(x, gamma: float = 0.5, minamp: float = 0, maxamp=None):
    """Gamma correction that keeps the order of values and their sign around ``minamp``.

    ``y = minamp + sign(v) * maxamp * (|v| / maxamp) ** gamma`` with ``v = x - minamp`` and
    ``maxamp = max |v|`` unless given (iNNvestigate's ``gamma``). ``gamma < 1`` brightens weak
    relevance, ``gamma > 1`` darkens it; ``gamma = 1`` is the identity.

    Example:
        >>> fxattr.viz.gamma(torch.tensor([-4.0, 1.0, 4.0]), gamma=0.5)
        tensor([-4.,  2.,  4.])
    """
    t, was_numpy = _as_tensor(x)
    check_finite(None, "gamma", gamma, minimum=0, strict_minimum=True)
    check_finite(None, "minamp", minamp)
    if maxamp is None or not isinstance(maxamp, Tensor):
        check_finite(None, "maxamp", maxamp, minimum=0, strict_minimum=True, allow_none=True)
    v = t - minamp
    amp = v.abs().max() if maxamp is None else torch.as_tensor(maxamp, dtype=t.dtype, device=t.device)
    if v.numel() == 0 or amp == 0:
        return _back(t.clone(), was_numpy)
    v = v / amp
    y = torch.sign(v) * v.abs() ** gamma
    return _back(y * amp + minamp, was_numpy)


@api_boundary("viz.clip_quantile")
def clip_quantile(x, quantile=1):
    """Clips x to its percentiles ``quantile`` and ``100 - quantile`` (or a ``(low, high)`` pair of
    percentiles), computed over the whole array with linear interpolation, as iNNvestigate's
    ``clip_quantile`` (which uses ``np.percentile``). Returns a new array; x is not modified.

    Example:
        >>> fxattr.viz.clip_quantile(torch.arange(11.0), 10)
        tensor([1., 1., 2., 3., 4., 5., 6., 7., 8., 9., 9.])
    """
    t, was_numpy = _as_tensor(x)
    q = quantile if isinstance(quantile, (list, tuple)) else (quantile, 100 - quantile)
    if len(q) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 100 for v in q):
        raise fail(None, f"quantile must be a percentile in [0, 100] or a (low, high) pair of them, "
                          f"got {quantile!r}")
    if t.numel() == 0:
        return _back(t.clone(), was_numpy)
    low, high = (_percentile(t, v) for v in q)
    return _back(t.clamp(low, high), was_numpy)


def _percentile(t: Tensor, p: float) -> Tensor:
    # numpy's default ("linear"): position p / 100 * (n - 1) in the sorted values.
    values = t.reshape(-1).sort().values
    position = p / 100 * (values.numel() - 1)
    i = min(int(position), values.numel() - 1)
    j = min(i + 1, values.numel() - 1)
    frac = position - i
    return values[i] * (1 - frac) + values[j] * frac


@api_boundary("viz.overlay")
def overlay(image, attribution, alpha: float = 0.5, *, reduce: str = "sum", cmap="seismic",
            channel_axis: int | None = -3, absmax=None):
    """The heatmap of ``attribution`` blended over a gray version of ``image``.

    The image is reduced to its channel mean, min-max scaled to ``[0, 1]`` per example and shown in
    gray; ``heatmap(attribution)`` is resized bilinearly to the image's size if it is smaller (a
    Grad-CAM map, say) and blended: ``(1 - alpha) * gray + alpha * heat``.

    Args:
        image: ``(C, H, W)`` / ``(N, C, H, W)``, or ``(H, W)`` / ``(N, H, W)`` for gray images.
        attribution: an attribution for :func:`heatmap` (with ``channel_axis``, ``reduce``,
            ``cmap``, ``absmax``); one per image.
        alpha: the heatmap's weight in ``[0, 1]``.

    Returns:
        RGB values in ``[0, 1]``, channels-last, of the image's type.

    Example:
        >>> cam = torch.vmap(fxattr.gradcam(f, layer="layer4"), in_dims=(None, 0, 0))(params, x, y)
        >>> fxattr.viz.overlay(x, cam, channel_axis=None, cmap="bwr")
    """
    check_finite(None, "alpha", alpha, minimum=0, maximum=1)
    img, was_numpy = _as_tensor(image, "image")
    if img.ndim not in (2, 3, 4):
        raise fail(None, f"image must have shape (H, W), (C, H, W) or (N, C, H, W), got {tuple(img.shape)}")
    if img.is_floating_point() and img.numel() and not bool(torch.isfinite(img).all()):
        # the min-max scaling would turn the whole gray image into NaN (an empty picture)
        raise fail(None, f"image holds {int((~torch.isfinite(img)).sum())} NaN or Inf values")
    heat = heatmap(attribution, reduce, cmap, channel_axis=channel_axis, absmax=absmax)
    heat, _ = _as_tensor(heat, "attribution")
    heat = heat.to(device=img.device, dtype=img.dtype)
    single = heat.ndim == 3
    if single:
        heat = heat.unsqueeze(0)
    # A batch of images is 4-d, or 3-d when the heatmap is a batch (N, H, W gray images).
    if img.ndim == 4 or (img.ndim == 3 and not single):
        gray = img.mean(1) if img.ndim == 4 else img
    else:
        gray = (img.mean(0) if img.ndim == 3 else img).unsqueeze(0)
    if gray.shape[0] != heat.shape[0]:
        raise fail(None, f"got {gray.shape[0]} image(s) but {heat.shape[0]} attribution(s)")
    flat = gray.reshape(gray.shape[0], -1)
    low, high = flat.amin(1), flat.amax(1)
    span = torch.where(high > low, high - low, torch.ones_like(high))
    gray = (gray - low[:, None, None]) / span[:, None, None]
    if heat.shape[1:3] != gray.shape[1:]:
        heat = torch.nn.functional.interpolate(heat.permute(0, 3, 1, 2), size=tuple(gray.shape[1:]),
                                               mode="bilinear", align_corners=False)
        heat = heat.permute(0, 2, 3, 1).clamp(0, 1)
    out = (1 - alpha) * gray[..., None].expand(*gray.shape, 3) + alpha * heat
    return _back(out[0] if single else out, was_numpy)


def _matplotlib(purpose: str):
    try:
        import matplotlib
    except ImportError:
        raise fail(None, f"matplotlib is needed for {purpose}: pip install matplotlib "
                          "(or pip install 'fxattr[examples]')") from None
    return matplotlib


def _image_array(image) -> np.ndarray:
    """A picture for imshow: (H, W), (H, W, 3|4), or channels-first (1|3, H, W)."""
    if isinstance(image, Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (3, 4):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise fail(None, f"each image must be (H, W), (H, W, 3), (H, W, 4) or (1|3, H, W), "
                          f"got shape {arr.shape}")
    return arr


@api_boundary("viz.plot_grid")
def plot_grid(rows: Sequence[Sequence], row_labels: Sequence[str] | None = None,
              col_labels: Sequence[str] | None = None, file=None, *, cell_size: float = 1.6,
              dpi: int = 100, title: str | None = None):
    """The classic attribution figure: one row per example, one column per method.

    Draws with matplotlib's Agg canvas (no pyplot, no display needed) and saves a PNG.

    Args:
        rows: a sequence of rows, each a sequence of pictures: RGB(A) images ``(H, W, 3|4)`` in
            ``[0, 1]`` (from :func:`heatmap`, :func:`graymap`, :func:`overlay`), gray images
            ``(H, W)`` (shown in gray, scaled to their range) or channels-first ``(1|3, H, W)``;
            ``None`` leaves a cell empty.
        row_labels: one label per row (left), e.g. ``"label 3 / pred 3"``.
        col_labels: one label per column (top), e.g. the method names.
        file: where to save the PNG (a path or a binary file object); ``None``: do not save.
        cell_size: the size of one cell in inches.
        dpi: the PNG's resolution.
        title: an optional figure title.

    Returns:
        The ``matplotlib.figure.Figure``.

    Example:
        >>> rows = [[fxattr.viz.graymap(x[i])] + [fxattr.viz.heatmap(a[i]) for a in results]
        ...         for i in range(len(x))]
        >>> fxattr.viz.plot_grid(rows, col_labels=["input", *names], file="grid.png")
    """
    check_finite(None, "cell_size", cell_size, minimum=0, strict_minimum=True)
    if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi < 1:
        raise fail(None, f"dpi must be an int >= 1, got {dpi!r}")
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or len(rows) == 0:
        raise fail(None, "rows must be a non-empty sequence of rows (sequences of images)")
    grid = [list(row) for row in rows]
    n_cols = max(len(row) for row in grid)
    if n_cols == 0:
        raise fail(None, "rows must hold at least one image")
    if row_labels is not None and len(row_labels) != len(grid):
        raise fail(None, f"row_labels has {len(row_labels)} entries for {len(grid)} rows")
    if col_labels is not None and len(col_labels) != n_cols:
        raise fail(None, f"col_labels has {len(col_labels)} entries for {n_cols} columns")
    images = [[None if im is None else _image_array(im) for im in row] for row in grid]
    _matplotlib("plot_grid")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(cell_size * n_cols + (0.9 if row_labels else 0.1),
                             cell_size * len(grid) + (0.5 if col_labels else 0.1) + (0.4 if title else 0)),
                    dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(grid), n_cols, squeeze=False)
    for i, row in enumerate(images):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            image = row[j] if j < len(row) else None
            if image is not None:
                if image.ndim == 2:
                    ax.imshow(image, cmap="gray", interpolation="nearest")
                else:
                    ax.imshow(np.clip(image, 0, 1), interpolation="nearest")
            if i == 0 and col_labels is not None:
                ax.set_title(str(col_labels[j]), fontsize=8, rotation=30, ha="left",
                             rotation_mode="anchor", loc="left")
            if j == 0 and row_labels is not None:
                ax.set_ylabel(str(row_labels[i]), fontsize=8, rotation=0, ha="right", va="center")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    if file is not None:
        figure.savefig(file, format="png", dpi=dpi)
    return figure


def __getattr__(name: str):
    """``plot_curves`` and ``plot_metrics`` live in ``fxattr.metrics.plots`` (imported on first use)."""
    if name in ("plot_curves", "plot_metrics"):
        from fxattr.metrics import plots
        return getattr(plots, name)
    raise AttributeError(f"module 'fxattr.viz' has no attribute {name!r}")
