"""A PNG of a layer-by-layer similarity matrix, optionally with one bar per layer underneath.

The figure is drawn on a private ``Figure`` with the Agg canvas and never through ``pyplot``: pyplot keeps
global figures and a global backend, and switching that backend from library code would break the
interactive plots of a notebook that imports us.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter
from torch import Tensor

DPI = 120
MAX_TICKS = 16
"""More layer numbers than this per axis overlap at the font size used for 80-layer models."""
_TICK_STEPS = (1, 2, 5, 10, 20, 25, 50, 100)
_COLORMAP = "viridis"


def _value_range(matrix: Tensor) -> tuple[float, float]:
    """Min and max of the finite values, widened when flat so the colour norm has a span to divide."""
    finite = matrix[torch.isfinite(matrix)]
    if finite.numel() == 0:
        raise ValueError("the matrix has no finite value to draw")
    low, high = float(finite.min()), float(finite.max())
    if high > low:
        return low, high
    pad = max(abs(low) * 1e-3, 1e-3)
    return low - pad, high + pad


def _decimals(low: float, high: float) -> int:
    """Enough decimals that colorbar ticks across a narrow range such as 0.9991..0.9999 stay distinct."""
    return max(2, min(8, math.ceil(-math.log10(high - low)) + 1))


def _tick_positions(count: int) -> list[int]:
    """Every layer for small models, a round step (5, 10, ...) for deep ones, at most about MAX_TICKS."""
    step = next((s for s in _TICK_STEPS if count / s <= MAX_TICKS), math.ceil(count / MAX_TICKS))
    return list(range(0, count, step))


def _check_inputs(matrix: Tensor, labels: Sequence[str] | None, per_layer: Sequence[float] | None) -> None:
    """Fail before drawing, since a mislabelled axis would silently point at the wrong layers."""
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"matrix must be square [L, L] with L >= 1, got shape {tuple(matrix.shape)}")
    count = matrix.shape[0]
    if labels is not None and len(labels) != count:
        raise ValueError(f"got {len(labels)} labels for a matrix of {count} layers")
    if per_layer is not None and len(per_layer) != count:
        raise ValueError(f"got {len(per_layer)} per-layer scores for a matrix of {count} layers")


def _figure(count: int, with_bars: bool) -> tuple[Figure, Axes, Axes, Axes | None]:
    """Heatmap, a thin colorbar beside it and the bar axes below, sized so a cell stays visible at 80 layers.

    The bar axes share the heatmap's x axis and the colorbar takes a column of its own, so each bar
    sits exactly under its column of the matrix.
    """
    side = min(10.0, max(6.0, 4.5 + 0.07 * count))
    bar_height = 0.28 * side if with_bars else 0.0
    fig = Figure(figsize=(side + 1.2, side + bar_height + 0.6), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ratios = [side, bar_height] if with_bars else [side]
    grid = fig.add_gridspec(len(ratios), 2, height_ratios=ratios, width_ratios=[1.0, 0.04])
    heat_ax = fig.add_subplot(grid[0, 0])
    colorbar_ax = fig.add_subplot(grid[0, 1])
    bar_ax = fig.add_subplot(grid[1, 0], sharex=heat_ax) if with_bars else None
    return fig, heat_ax, colorbar_ax, bar_ax


def _label_layers(ax: Axes, count: int, labels: Sequence[str], axes: str) -> None:
    """Put thinned-out layer names on the requested axes (``"x"``, ``"y"`` or ``"xy"``)."""
    ticks = _tick_positions(count)
    names = [labels[t] for t in ticks]
    fontsize = 9 if count <= 40 else 8
    if "x" in axes:
        ax.set_xticks(ticks, names, fontsize=fontsize)
    if "y" in axes:
        ax.set_yticks(ticks, names, fontsize=fontsize)


def _draw_matrix(fig: Figure, heat_ax: Axes, colorbar_ax: Axes, matrix: Tensor) -> None:
    """Colour from the matrix's own min to max, and say so: CKA of real models often spans 0.999..1."""
    low, high = _value_range(matrix)
    image = heat_ax.imshow(
        matrix.detach().to("cpu", torch.float64).numpy(),
        cmap=_COLORMAP,
        vmin=low,
        vmax=high,
        aspect="auto",
        interpolation="nearest",
    )
    digits = _decimals(low, high)
    colorbar = fig.colorbar(image, cax=colorbar_ax)
    colorbar.ax.yaxis.set_major_formatter(FormatStrFormatter(f"%.{digits}f"))
    colorbar.set_label(f"scale: matrix min {low:.{digits}f} to max {high:.{digits}f} (not 0 to 1)")


def _draw_bars(bar_ax: Axes, per_layer: Sequence[float], per_layer_label: str) -> None:
    """One bar per layer, aligned with the matrix columns, for a per-layer score such as redundancy."""
    bar_ax.bar(range(len(per_layer)), list(per_layer), width=0.8, color="tab:orange")
    bar_ax.set_ylabel(per_layer_label or "per-layer score")
    bar_ax.grid(axis="y", alpha=0.3)


def save_heatmap(
    matrix: Tensor,
    path: Path,
    title: str,
    labels: Sequence[str] | None = None,
    per_layer: Sequence[float] | None = None,
    per_layer_label: str = "",
) -> Path:
    """Draw a layer-by-layer similarity matrix to a PNG, readable from 6 to about 80 layers.

    Args:
        matrix: ``[L, L]`` scores; non-finite entries are drawn blank and ignored by the colour scale.
        path: where to write the PNG; missing parent folders are created.
        title: shown above the matrix; name the metric and the data here.
        labels: one name per layer for the axes; default the 0-based layer numbers.
        per_layer: optional ``L`` scores drawn as bars under the matrix, column for column.
        per_layer_label: y-axis label of those bars.

    Returns:
        ``path``, so callers can record where the figure went.

    Raises:
        ValueError: a non-square matrix, no finite value, or labels/scores of the wrong length.
    """
    _check_inputs(matrix, labels, per_layer)
    count = matrix.shape[0]
    names = list(labels) if labels is not None else [str(i) for i in range(count)]
    fig, heat_ax, colorbar_ax, bar_ax = _figure(count, per_layer is not None)
    _draw_matrix(fig, heat_ax, colorbar_ax, matrix)
    heat_ax.set_title(title)
    heat_ax.set_ylabel("layer")
    _label_layers(heat_ax, count, names, "xy")
    if bar_ax is not None and per_layer is not None:
        _draw_bars(bar_ax, per_layer, per_layer_label)
        bar_ax.set_xlabel("layer")
        heat_ax.tick_params(axis="x", labelbottom=False)
    else:
        heat_ax.set_xlabel("layer")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path
