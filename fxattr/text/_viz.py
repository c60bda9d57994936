"""Token heat maps: relevance per token as coloured text, in HTML and as a PNG.

Colours follow fxattr.viz's ``bwr`` map (blue: negative, white: zero, red: positive), each row
normalised by its own largest absolute value unless ``absmax`` is given (a shared scale for
comparing rows). matplotlib is needed for the PNG only, and imported lazily.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import torch

from fxattr.errors import fail

__all__ = ["token_colors", "token_heatmap_html", "token_heatmap_png"]


def _values(where: str, tokens: Sequence[str] | None, relevance) -> np.ndarray:
    if isinstance(relevance, torch.Tensor):
        relevance = relevance.detach().cpu().double().numpy()
    values = np.asarray(relevance, dtype=np.float64)
    if values.ndim != 1 or (tokens is not None and len(values) != len(tokens)):
        expected = "one row" if tokens is None else f"one value per token ({len(tokens)} tokens)"
        raise fail(where, f"relevance must hold {expected}, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise fail(where, "relevance has NaN or infinite values")
    return values


def _scale(where: str, values: np.ndarray, absmax) -> float:
    if absmax is None:
        top = float(np.abs(values).max()) if len(values) else 0.0
        return top if top > 0 else 1.0
    if isinstance(absmax, bool) or not isinstance(absmax, (int, float)) or not absmax > 0 or not np.isfinite(absmax):
        raise fail(where, f"absmax must be None or a finite number > 0, got {absmax!r}")
    return float(absmax)


def token_colors(relevance, absmax: float | None = None) -> np.ndarray:
    """RGB colours in [0, 1] (``(L, 3)``) for one row of relevance: blue - white - red.

    Example:
        >>> fxattr.text.token_colors(torch.tensor([-1.0, 0.0, 2.0]))[:, 0]   # red channel
        array([0.5, 1. , 1. ])
    """
    values = _values("text.token_colors", None, relevance)
    v = np.clip(values / _scale("text.token_colors", values, absmax), -1.0, 1.0)[:, None]
    white, red, blue = np.ones(3), np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0])
    return np.where(v >= 0, white + v * (red - white), white - v * (blue - white))


def token_heatmap_html(tokens: Sequence[Sequence[str]] | Sequence[str], relevance, *,
                       labels: Sequence[str] | None = None, absmax: float | None = None) -> str:
    """An HTML fragment: each token on a background coloured by its relevance (title: the value).

    ``tokens`` is one sequence of strings or a list of them (one row per sequence, with
    ``relevance`` of shape ``(rows, L)`` or a list of rows); padding can be left out of ``tokens``
    by passing only the real tokens with their relevance.

    Example:
        >>> relevance = torch.vmap(explain, in_dims=(None, 0, 0, 0))(params, ids, mask, y)
        >>> page = fxattr.text.token_heatmap_html([tokenizer.convert_ids_to_tokens(i) for i in ids], relevance)
        >>> Path("tokens.html").write_text(page)
    """
    where = "text.token_heatmap_html"
    rows = [tokens] if tokens and isinstance(tokens[0], str) else list(tokens)
    values = [relevance] if tokens and isinstance(tokens[0], str) else list(relevance)
    if len(rows) != len(values):
        raise fail(where, f"{len(rows)} rows of tokens but {len(values)} rows of relevance")
    if labels is not None and len(labels) != len(rows):
        raise fail(where, f"{len(rows)} rows but {len(labels)} labels")
    lines = ['<div style="font-family: monospace; line-height: 2">']
    for i, (row, value) in enumerate(zip(rows, values)):
        v = _values(where, row, value)
        colours = token_colors(v, _scale(where, v, absmax))
        label = f'<b>{html.escape(str(labels[i]))}</b> ' if labels is not None else ""
        spans = "".join(
            f'<span title="{x:.4g}" style="background: rgb({round(255 * c[0])}, {round(255 * c[1])}, '
            f'{round(255 * c[2])}); padding: 2px 1px; margin: 0 1px">{html.escape(str(t))}</span>'
            for t, x, c in zip(row, v, colours))
        lines.append(f"<div>{label}{spans}</div>")
    lines.append("</div>")
    return "\n".join(lines)


def token_heatmap_png(panels: Sequence[tuple[str, Sequence[str], object]], file=None, *,
                      absmax: float | None = None, width: float = 10.0):
    """Draws rows of coloured tokens with matplotlib and saves them to ``file`` (PNG), if given.

    Args:
        panels: ``(label, tokens, relevance)`` per row, e.g. one row per method and example.
        file: a path to save to (``None``: only return the figure).
        absmax: a shared colour scale (``None``: each row its own).
        width: the figure's width in inches; long rows wrap.

    Returns:
        The matplotlib figure.

    Example:
        >>> fxattr.text.token_heatmap_png([("IG", tokens, ig[0]), ("gradient", tokens, grad[0])],
        ...                               "tokens.png")
    """
    where = "text.token_heatmap_png"
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - matplotlib is in the examples extra
        raise fail(where, "needs matplotlib (pip install matplotlib)") from error
    if not panels:
        raise fail(where, "panels is empty")
    chars_per_line = int(width * 9)
    laid_out = []
    for label, tokens, relevance in panels:
        v = _values(where, tokens, relevance)
        colours = token_colors(v, _scale(where, v, absmax))
        lines, line, used = [], [], 0
        for token, colour in zip(tokens, colours):
            text = str(token)
            if used + len(text) + 1 > chars_per_line and line:
                lines.append(line)
                line, used = [], 0
            line.append((text, colour))
            used += len(text) + 1
        lines.append(line)
        laid_out.append((str(label), lines))
    height_lines = sum(len(lines) + 1 for _, lines in laid_out)
    figure = plt.figure(figsize=(width, 0.3 * height_lines + 0.3))
    axis = figure.add_axes((0, 0, 1, 1))
    axis.set_axis_off()
    y, step = 1.0, 1.0 / (height_lines + 1)
    for label, lines in laid_out:
        y -= step
        axis.text(0.01, y, label, fontsize=9, fontweight="bold", va="center", family="monospace")
        for line in lines:
            y -= step
            x = 0.02
            for text, colour in line:
                axis.text(x, y, text, fontsize=9, va="center", family="monospace",
                          bbox={"facecolor": tuple(colour), "edgecolor": "none", "pad": 1.5})
                x += (len(text) + 1) / chars_per_line * 0.96
    if file is not None:
        figure.savefig(file, dpi=120)
    return figure
