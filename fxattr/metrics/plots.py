"""Plots for metric results: perturbation (deletion / insertion) curves and a metric x method chart.

Exposed as ``fxattr.viz.plot_curves`` and ``fxattr.viz.plot_metrics``. matplotlib is imported only
when a plot is drawn (Agg canvas, no pyplot, no display needed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from torch import Tensor

from fxattr.errors import api_boundary, fail
from fxattr.metrics.evaluate import MetricTable

__all__ = ["plot_curves", "plot_metrics"]


def agg_figure(size: tuple[float, float], dpi: int):
    """A matplotlib Figure on an Agg canvas; a clear error when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise fail(None, "matplotlib is needed for plots: pip install matplotlib "
                          "(or pip install 'fxattr[examples]')") from None
    figure = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def curve_array(name: str, curve) -> np.ndarray:
    """A ``(B, T)`` float array from a ``(B, T)`` or ``(T,)`` tensor / array."""
    arr = curve.detach().cpu().double().numpy() if isinstance(curve, Tensor) else np.asarray(curve, float)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise fail(None, f"curves[{name!r}] must be (B, T) or (T,), got shape {arr.shape}")
    return arr


@api_boundary("viz.plot_curves")
def plot_curves(curves, metric: str | None = None, *, file=None, title: str | None = None,
                xlabel: str = "perturbation step (first to last)", ylabel: str = "target score",
                step_labels: Sequence[str] | None = None, size: tuple[float, float] = (5.0, 3.5),
                dpi: int = 100):
    """Perturbation curves, one line per method: the mean over examples and a ± standard error band.

    The curve's steps are spread evenly over [0, 1] (the fraction of features removed, for a
    deletion curve such as ``pixel_flipping``; added, for an insertion curve), and the legend gives
    each method's area under its mean curve (the number :func:`fxattr.metrics.evaluate` tabulates).

    Args:
        curves: a mapping method name -> ``(B, T)`` (or ``(T,)``) curves, or a
            :class:`fxattr.metrics.MetricTable` together with ``metric``, the name of a
            curve-valued metric in it.
        metric: with a table: which metric's curves to draw.
        file: where to save the PNG (a path or a binary file object); ``None``: do not save.
        title: the figure title (default: the metric's name, if given).
        xlabel, ylabel: the axis labels.
        step_labels: one tick label per step (e.g. the layers an MPRT curve randomises), instead of
            the [0, 1] fraction axis.
        size: the figure size in inches.
        dpi: the PNG's resolution.

    Returns:
        The ``matplotlib.figure.Figure``.

    Example:
        >>> table = fxattr.metrics.evaluate(explainers, {"deletion": fxattr.metrics.pixel_flipping(f)},
        ...                                 params, x, y)
        >>> fxattr.viz.plot_curves(table, "deletion", file="deletion.png")
    """
    if isinstance(curves, MetricTable):
        if metric is None or metric not in curves.metrics:
            raise fail(None, f"with a MetricTable, metric must name one of its metrics "
                              f"({', '.join(curves.metrics)}); got {metric!r}")
        table = curves
        curves = {name: table.curves[name][metric] for name in table.explainers
                  if metric in table.curves[name]}
        if not curves:
            raise fail(None, f"metric {metric!r} gave one score per example, not a curve")
    if not isinstance(curves, Mapping) or not curves:
        raise fail(None, "curves must be a non-empty dict name -> (B, T) curves, "
                          f"got {type(curves).__name__}")
    arrays = {str(name): curve_array(name, c) for name, c in curves.items()}
    lengths = {arr.shape[1] for arr in arrays.values()}
    if step_labels is not None and (len(lengths) != 1 or len(step_labels) not in lengths):
        raise fail(None, f"step_labels has {len(step_labels)} labels for curves of {sorted(lengths)} steps")
    figure = agg_figure(size, dpi)
    ax = figure.subplots()
    for name, arr in arrays.items():
        steps = np.linspace(0.0, 1.0, arr.shape[1]) if arr.shape[1] > 1 else np.zeros(1)
        mean = np.nanmean(arr, 0)
        n = np.sum(~np.isnan(arr), 0)
        spread = np.nanstd(arr, 0, ddof=1) if len(arr) > 1 else np.zeros_like(mean)
        stderr = np.where(n > 1, spread / np.sqrt(np.maximum(n, 1)), 0.0)
        auc = float(np.trapezoid(mean, steps)) if len(steps) > 1 else float(mean[0])
        line, = ax.plot(steps, mean, label=f"{name} (AUC {auc:.3g})", linewidth=1.5)
        ax.fill_between(steps, mean - stderr, mean + stderr, color=line.get_color(), alpha=0.2, linewidth=0)
    if step_labels is not None:
        ax.set_xticks(np.linspace(0.0, 1.0, len(step_labels)) if len(step_labels) > 1 else [0.0])
        ax.set_xticklabels([str(label) for label in step_labels], fontsize=7, rotation=30, ha="right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title or metric:
        ax.set_title(title or metric, fontsize=10)
    figure.tight_layout()
    if file is not None:
        figure.savefig(file, format="png", dpi=dpi)
    return figure


@api_boundary("viz.plot_metrics")
def plot_metrics(table: MetricTable, metrics: Sequence[str] | None = None, *, file=None,
                 title: str | None = None, cell_size: tuple[float, float] = (2.6, 0.3), dpi: int = 100):
    """The metric x method chart: one panel per metric, one horizontal bar per method (its mean)
    with a ± standard error whisker. Metrics have different scales and directions, so each panel has
    its own axis.

    Args:
        table: the result of :func:`fxattr.metrics.evaluate`.
        metrics: which of its metrics, in order (default: all).
        file: where to save the PNG (a path or a binary file object); ``None``: do not save.
        title: an optional figure title.
        cell_size: (width of a panel, height per method) in inches.
        dpi: the PNG's resolution.

    Returns:
        The ``matplotlib.figure.Figure``.

    Example:
        >>> table = fxattr.metrics.evaluate(explainers, metrics, params, x, y, mask=masks)
        >>> fxattr.viz.plot_metrics(table, file="metrics.png")
    """
    if not isinstance(table, MetricTable):
        raise fail(None, "table must be a MetricTable (from fxattr.metrics.evaluate), "
                          f"got {type(table).__name__}")
    chosen = list(table.metrics if metrics is None else metrics)
    unknown = [m for m in chosen if m not in table.metrics]
    if unknown or not chosen:
        raise fail(None, f"metrics must name some of the table's metrics ({', '.join(table.metrics)}); "
                          f"got {chosen!r}")
    n_methods = len(table.explainers)
    columns = min(len(chosen), 4)
    rows = math.ceil(len(chosen) / columns)
    width, per_method = cell_size
    height = (0.7 + per_method * n_methods) * rows + (0.4 if title else 0)
    figure = agg_figure((1.4 + width * columns, height), dpi)
    axes = figure.subplots(rows, columns, squeeze=False)
    positions = np.arange(n_methods)[::-1]
    colours = [f"C{i % 10}" for i in range(n_methods)]
    for k, name in enumerate(chosen):
        ax = axes[k // columns][k % columns]
        j = table.metrics.index(name)
        mean = table.mean[:, j].numpy()
        stderr = np.nan_to_num(table.stderr[:, j].numpy())
        ax.barh(positions, np.nan_to_num(mean), xerr=stderr, color=colours, alpha=0.85,
                error_kw={"elinewidth": 1, "capsize": 2})
        ax.set_title(name, fontsize=8)
        ax.set_yticks(positions)
        ax.set_yticklabels(table.explainers if k % columns == 0 else [], fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        ax.axvline(0, color="black", linewidth=0.5)
        ax.grid(axis="x", alpha=0.3)
    for k in range(len(chosen), rows * columns):
        axes[k // columns][k % columns].set_visible(False)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    if file is not None:
        figure.savefig(file, format="png", dpi=dpi)
    return figure

