"""The evaluation front door: every explainer scored by every metric, as a table with a markdown
printer.

``fxattr.metrics.evaluate(explainers, metrics, params, x, target, mask=None)`` explains the batch
with each explainer (one ``torch.vmap`` per explainer), scores the attributions with each metric
(one ``torch.vmap`` per pair, ``randomness="different"``; the metrics that compare examples with
each other are called on the whole batch) and returns a :class:`MetricTable` of the mean and the
standard error over the examples.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fxattr.errors import api_boundary, fail

__all__ = ["MetricTable", "evaluate", "metric_kind"]

# The Quantus metrics that compare the examples of a batch with each other: called on the batch.
# sensitivity_n gives one curve for the batch (a correlation per subset size), the others a score
# per example.
BATCH_METRICS = ("sensitivity_n", "sufficiency", "consistency")
BATCH_CURVES = ("sensitivity_n",)


def quantus_name(metric) -> str | None:
    """The fxattr.metrics name a metric was built by (``"metrics.sufficiency"`` -> ``"sufficiency"``)."""
    name = getattr(metric, "__name__", None)
    return name.rsplit(".", 1)[-1] if isinstance(name, str) else None


def metric_kind(metric) -> str:
    """How :func:`evaluate` calls ``metric``: ``"builder"``, ``"batch"``, ``"extra"`` or ``"example"``.

    ``"builder"``: a function of one argument, the explainer, that builds the metric for it (the
    metrics that re-explain: ``lambda explain: fxattr.metrics.mprt(f, explain=explain)``);
    ``"batch"``: called once on the whole batch, ``metric(params, X, T, A)`` (a metric with a true
    ``batch_level`` attribute, or one built by ``fxattr.metrics.sensitivity_n`` / ``sufficiency`` /
    ``consistency``); ``"extra"``: per example with a fifth argument (a mask, the quadrant flags,
    a segment map), ``metric(params, x, t, a, mask)``; ``"example"``: per example,
    ``metric(params, x, t, a)``.
    """
    flag = getattr(metric, "batch_level", None)
    if flag is None:
        flag = quantus_name(metric) in BATCH_METRICS
    if flag:
        return "batch"
    try:
        parameters = inspect.signature(metric).parameters.values()
    except (TypeError, ValueError):
        return "example"
    positional = [p for p in parameters
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    if len(positional) == 1:
        return "builder"
    return "extra" if len(positional) >= 5 else "example"


def area(curve: Tensor) -> Tensor:
    """Trapezoidal area under curves sampled evenly on [0, 1] (last axis); a 1-point curve is its
    value."""
    if curve.shape[-1] == 1:
        return curve[..., 0]
    return torch.trapezoid(curve, dx=1.0 / (curve.shape[-1] - 1), dim=-1)


def per_example_scores(name: str, value, batch: int, kind: str, batch_curve: bool) -> Tensor:
    """A metric's output as ``(B,)`` scores or ``(B, T)`` curves (a batch-level metric's scalar as
    ``(1,)``, its curve as ``(1, T)``). A batch-level metric's 1-d output of length B counts as a
    score per example unless ``batch_curve``."""
    value = torch.as_tensor(value).detach()
    if kind == "batch" and (batch_curve or not (value.ndim == 1 and value.shape[0] == batch)):
        value = value.reshape(1, *value.shape)
    if value.ndim not in (1, 2):
        raise fail(None, f"metric {name!r} gave shape {tuple(value.shape)}; evaluate takes a scalar or a "
                          "1-d curve per example")
    return value


def mean_and_stderr(values: Tensor) -> tuple[float, float, int]:
    """Mean, standard error (sample standard deviation / sqrt(n)) and n over the non-NaN values."""
    finite = values[~torch.isnan(values)].double()
    n = finite.numel()
    if n == 0:
        return math.nan, math.nan, 0
    mean = finite.mean().item()
    stderr = (finite.std(correction=1) / math.sqrt(n)).item() if n > 1 else math.nan
    return mean, stderr, n


@dataclass
class MetricTable:
    """Explainer x metric: mean and standard error of each metric's score over the examples.

    Attributes:
        explainers: the explainer names (rows), in the order given.
        metrics: the metric names (columns), in the order given.
        mean: ``(len(explainers), len(metrics))`` float64 tensor of means (NaN scores left out).
        stderr: same shape, standard errors ``std / sqrt(n)`` (sample std; NaN where n < 2, e.g. a
            batch-level metric's single score).
        count: same shape, int64: how many non-NaN scores went into each mean.
        scores: ``scores[explainer][metric]``: the per-example scores (for a curve-valued metric the
            area under each curve), a 1-d float64 tensor (of one entry for a batch-level scalar).
        curves: ``curves[explainer][metric]``: the raw ``(B, T)`` curves of curve-valued metrics
            (deletion / insertion curves for :func:`fxattr.viz.plot_curves`).
        attributions: ``attributions[explainer]``: the explanations of the batch.

    ``str(table)`` and :meth:`to_markdown` print it as a markdown table, ``mean ± stderr``.
    """

    explainers: tuple[str, ...]
    metrics: tuple[str, ...]
    mean: Tensor
    stderr: Tensor
    count: Tensor
    scores: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)
    attributions: dict = field(default_factory=dict)

    def __getitem__(self, key: tuple[str, str]) -> tuple[float, float]:
        """``table["gradient", "sparseness"]`` -> ``(mean, stderr)``."""
        explainer, metric = key
        if explainer not in self.explainers or metric not in self.metrics:
            raise KeyError(key)
        i, j = self.explainers.index(explainer), self.metrics.index(metric)
        return self.mean[i, j].item(), self.stderr[i, j].item()

    def to_markdown(self, digits: int = 3) -> str:
        """A markdown table: one row per explainer, one column per metric, ``mean ± stderr``
        (``(n=k)`` appended where NaN scores were left out)."""
        def cell(i, j):
            mean, stderr, n = self.mean[i, j].item(), self.stderr[i, j].item(), int(self.count[i, j])
            if n == 0 and self.metrics[j] not in self.scores.get(self.explainers[i], {}):
                return "–"
            if math.isnan(mean):
                return "nan"
            text = f"{mean:.{digits}f}" if math.isnan(stderr) else f"{mean:.{digits}f} ± {stderr:.{digits}f}"
            scored = self.scores.get(self.explainers[i], {}).get(self.metrics[j])
            dropped = scored is not None and n < scored.numel()
            return text + (f" (n={n})" if dropped else "")

        lines = ["| explainer | " + " | ".join(self.metrics) + " |",
                 "|---|" + "---|" * len(self.metrics)]
        for i, name in enumerate(self.explainers):
            lines.append(f"| {name} | " + " | ".join(cell(i, j) for j in range(len(self.metrics))) + " |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


@api_boundary("metrics.evaluate")
def evaluate(explainers: Mapping, metrics: Mapping, params, x: Tensor, target, mask=None, *,
             chunk_size: int | None = None) -> MetricTable:
    """Scores every explainer with every metric on one batch: mean ± standard error per pair.

    For each explainer, ``A = torch.vmap(explain, in_dims=(None, 0, 0), randomness="different")``
    over the batch; for each metric (see :func:`metric_kind`):

    - per-example metrics: ``torch.vmap(metric, in_dims=(None, 0, 0, 0), randomness="different")``;
    - metrics with a fifth argument (localisation: the ``(1, H, W)`` bool mask; ``focus``: the
      quadrant flags; ``irof``: the segment map) get ``mask`` the same way, per example;
    - batch-level metrics (``sensitivity_n``, ``sufficiency``, ``consistency``) are called once,
      ``metric(params, X, T, A)``; a 1-d result of length B is taken as a score per example (as
      ``sufficiency`` and ``consistency`` give), anything else (``sensitivity_n``'s curve) as one
      score for the batch (stderr NaN);
    - a function of one argument builds the metric for each explainer, for the metrics that
      re-explain (``{"MPRT": lambda explain: fxattr.metrics.mprt(f, explain=explain)}``); where it
      returns ``None`` the cell stays empty (NaN, count 0, ``–`` in the markdown).

    A scalar per example enters the table as is; a curve per example (pixel flipping, ROAD, ...)
    as its area over an evenly spaced [0, 1] axis (trapezoid; the curves are kept in
    ``table.curves``). The mean and standard error leave out NaN scores (e.g. an empty mask) and
    ``table.count`` says how many were used. Scores are detached; nothing is trained.

    Args:
        explainers: a mapping name -> explainer ``explain(params, x, target)`` (for one example).
        metrics: a mapping name -> metric from ``fxattr.metrics`` (or name -> ``explain -> metric``).
        params: the model's parameters (``fxattr.functionalize``).
        x: the batch of inputs, ``(B, ...)``.
        target: ``(B,)`` integer targets (or ``None``: each explainer's and metric's argmax).
        mask: what the metrics with a fifth argument get: a ``(B, ...)`` tensor (e.g. ``(B, 1, H, W)``
            bool masks), or a mapping metric name -> such a tensor when they need different ones
            (a ``focus`` metric's ``(B, 4)`` flags next to localisation masks).
        chunk_size: examples per vmapped call (``None``: the whole batch at once).

    Returns:
        A :class:`MetricTable`; ``print(table)`` prints markdown.

    Example:
        >>> table = fxattr.metrics.evaluate(
        ...     {"gradient": fxattr.gradient(f), "IG": fxattr.integrated_gradients(f)},
        ...     {"sparseness": fxattr.metrics.sparseness(f),
        ...      "pointing game": fxattr.metrics.pointing_game(f)},
        ...     params, images, labels, mask=masks)
        >>> print(table)
    """
    for name, mapping in (("explainers", explainers), ("metrics", metrics)):
        if not isinstance(mapping, Mapping) or not mapping:
            raise fail(None, f"{name} must be a non-empty dict name -> callable, "
                              f"got {type(mapping).__name__}")
        for key, value in mapping.items():
            if not isinstance(key, str) or not callable(value):
                raise fail(None, f"{name}[{key!r}] must be a callable under a str name, "
                                  f"got {type(value).__name__}")
    if not isinstance(x, Tensor) or x.ndim < 1 or x.shape[0] == 0:
        raise fail(None, f"x must be a batch (B, ...) tensor with B >= 1, got "
                          f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    batch = x.shape[0]
    if target is not None and (not isinstance(target, Tensor) or target.shape[:1] != (batch,)
                               or target.is_floating_point()):
        got = (f"{tuple(target.shape)} of dtype {target.dtype}" if isinstance(target, Tensor)
               else type(target).__name__)
        raise fail(None, f"target must be None or a ({batch},) integer tensor, got {got}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise fail(None, f"chunk_size must be None or an int >= 1, got {chunk_size!r}")

    def extra_for(name: str) -> Tensor:
        value = mask.get(name) if isinstance(mask, Mapping) else mask
        if value is None:
            raise fail(None, f"metric {name!r} takes a fifth argument (a mask, the quadrant flags or "
                              "a segment map): pass mask= a (B, ...) tensor, or a dict with an entry "
                              f"for {name!r}")
        if not isinstance(value, Tensor) or value.shape[:1] != (batch,):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise fail(None, f"mask for metric {name!r} must be a ({batch}, ...) tensor, got {shape}")
        return value

    target_dim = None if target is None else 0
    explainer_names, metric_names = tuple(explainers), tuple(metrics)
    mean = torch.full((len(explainer_names), len(metric_names)), math.nan, dtype=torch.float64)
    stderr = mean.clone()
    count = torch.zeros(mean.shape, dtype=torch.int64)
    scores, curves, attributions = {}, {}, {}
    for i, explainer_name in enumerate(explainer_names):
        explain = torch.vmap(explainers[explainer_name], in_dims=(None, 0, target_dim),
                             randomness="different", chunk_size=chunk_size)
        a = explain(params, x, target).detach()
        attributions[explainer_name] = a
        scores[explainer_name], curves[explainer_name] = {}, {}
        for j, metric_name in enumerate(metric_names):
            metric = metrics[metric_name]
            if metric_kind(metric) == "builder":
                metric = metric(explainers[explainer_name])
                if metric is None:  # the builder declines this explainer: the cell stays empty
                    continue
                if not callable(metric) or metric_kind(metric) == "builder":
                    raise fail(None, f"metrics[{metric_name!r}] given the explainer must build a metric "
                                      f"(params, x, target, attribution), got {metric!r}")
            kind = metric_kind(metric)
            if kind == "batch":
                value = metric(params, x, target, a)
            elif kind == "extra":
                value = torch.vmap(metric, in_dims=(None, 0, target_dim, 0, 0), randomness="different",
                                   chunk_size=chunk_size)(params, x, target, a, extra_for(metric_name))
            else:
                value = torch.vmap(metric, in_dims=(None, 0, target_dim, 0), randomness="different",
                                   chunk_size=chunk_size)(params, x, target, a)
            value = per_example_scores(metric_name, value, batch, kind,
                                       quantus_name(metric) in BATCH_CURVES)
            if value.ndim == 2:  # a curve per example: its area enters the table
                curves[explainer_name][metric_name] = value
                value = area(value.to(torch.float64))
            value = value.to(torch.float64)
            scores[explainer_name][metric_name] = value
            mean[i, j], stderr[i, j], count[i, j] = mean_and_stderr(value.reshape(-1))
    return MetricTable(explainer_names, metric_names, mean, stderr, count, scores, curves, attributions)
