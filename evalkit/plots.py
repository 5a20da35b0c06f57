"""Pictures for the report: class colours, scatter panels as PNG ``data:`` URIs, heat colours.

matplotlib is imported inside the functions (Agg canvas, no pyplot state), so importing this
module costs nothing.
"""
from __future__ import annotations

import base64
import io
import math

import numpy as np

#: Side of one scatter panel in pixels. Shown at about 280 CSS px; a little extra keeps it
#: sharp without making a 15-panel report heavy.
PANEL_PX = 320
_DPI = 80

# Two anchors of the point-size and opacity curves: (n_points, diameter_px, alpha).
_SMALL = (500, 8.0, 0.85)
_LARGE = (70_000, 0.6, 0.35)


def class_colors(n_classes: int) -> list[str]:
    """Distinct, stable colours for ``n_classes`` classes, as ``#rrggbb`` strings.

    tab10 up to 10 classes; tab20 up to 20 (dark shades first, so classes 0-9 keep their tab10
    colours); beyond that tab20 + tab20b + tab20c (60 colours), then the list repeats.
    The same list colours every scatter panel and the HTML legend.
    """
    if n_classes < 0:
        raise ValueError(f"n_classes must be >= 0, got {n_classes}")
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    def shades(name: str, per_hue: int) -> list:
        colors = list(colormaps[name].colors)
        # Reorder hue-major lists (dark, light, dark, light...) to shade-major, so
        # neighbouring class indices get different hues.
        return [colors[h + s] for s in range(per_hue) for h in range(0, len(colors), per_hue)]

    if n_classes <= 10:
        palette = list(colormaps["tab10"].colors)
    elif n_classes <= 20:
        palette = shades("tab20", 2)
    else:
        palette = shades("tab20", 2) + shades("tab20b", 4) + shades("tab20c", 4)
    hexes = [to_hex(c) for c in palette]
    return [hexes[i % len(hexes)] for i in range(n_classes)]


def marker_style(n_points: int) -> tuple[float, float]:
    """Point diameter in pixels and opacity for a scatter of ``n_points`` points.

    Interpolated on a log scale between 8 px / 0.85 at 500 points and 0.6 px / 0.35 at
    70,000 points, clamped outside that range.
    """
    n = max(int(n_points), 1)
    (n0, d0, a0), (n1, d1, a1) = _SMALL, _LARGE
    t = (math.log(n) - math.log(n0)) / (math.log(n1) - math.log(n0))
    t = min(max(t, 0.0), 1.0)
    diameter = math.exp(math.log(d0) + t * (math.log(d1) - math.log(d0)))
    alpha = a0 + t * (a1 - a0)
    return diameter, alpha


def scatter_png(coords: np.ndarray, labels: np.ndarray, colors: list[str], *,
                size_px: int = PANEL_PX) -> str:
    """One embedding panel as a ``data:image/png;base64,...`` URI.

    Parameters
    ----------
    coords : ndarray of shape (n_samples, 2)
    labels : ndarray of shape (n_samples,), int
        Class index per sample; ``colors[labels[i]]`` colours sample i.
    colors : list of str
        From :func:`class_colors`.
    size_px : int
        Width and height of the image.

    Points are drawn in a fixed random order, so no class is systematically painted over the
    others; the axes keep an equal aspect because distances are what an embedding shows.
    Non-finite coordinates are left out.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_rgba_array
    from matplotlib.figure import Figure

    coords = np.asarray(coords, dtype=np.float64)
    labels = np.asarray(labels)
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected coords of shape (n_samples, 2) and labels of shape (n_samples,), "
            f"got {coords.shape} and {labels.shape}")
    finite = np.isfinite(coords).all(axis=1)
    order = np.random.default_rng(0).permutation(coords.shape[0])
    order = order[finite[order]]

    diameter, alpha = marker_style(len(order))
    points = diameter * 72.0 / _DPI
    rgba = to_rgba_array(colors) if len(colors) else np.zeros((0, 4))
    point_colors = rgba[labels[order] % max(len(colors), 1)] if len(order) else np.zeros((0, 4))

    fig = Figure(figsize=(size_px / _DPI, size_px / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))  # the page draws the frame around the image
    ax.set_axis_off()
    ax.margins(0.04)
    ax.scatter(coords[order, 0], coords[order, 1], s=points ** 2, c=point_colors, alpha=alpha,
               linewidths=0, rasterized=True)
    ax.set_aspect("equal", adjustable="datalim")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, facecolor="white",
                metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def curves_png(curves, *, title: str = "", xlabel: str = "K (log scale)", ylabel: str = "R_NX(K)",
               width_px: int = 420, height_px: int = 300) -> str:
    """Line chart of curves on a log-x axis (the R_NX charts), as a PNG ``data:`` URI.

    Parameters
    ----------
    curves : sequence of (label, x, y)
        One line each, in legend order; x > 0. Colours follow the order (tab10, repeating).
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / _DPI, height_px / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    palette = colormaps["tab10"].colors
    top = 1.0
    for i, (label, x, y) in enumerate(curves):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        ax.plot(x, y, color=palette[i % len(palette)], linewidth=1.6, label=str(label))
        if x.size:
            top = max(top, float(x.max()))
    ax.set_xscale("log")
    ax.set_xlim(1, top)
    if top >= 100:
        # Over two decades or more matplotlib labels no minor tick; it still lays out an empty
        # label for each of them: half of each chart's time (0.18 s -> 0.12 s, the same pixels)
        from matplotlib.ticker import NullFormatter

        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(min(0.0, *(float(np.nanmin(c[2])) for c in curves if len(c[2]))), 1.0)
    ax.axhline(0, color="#999999", linewidth=0.8)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, which="major", color="#e5e5e5", linewidth=0.6)
    if title:
        ax.set_title(title, fontsize=10)
    if curves:
        ax.legend(fontsize=7.5, frameon=False, loc="best")
    # Fixed margins, those tight_layout finds for this size and these fonts (R_NX lies in
    # [-1, 1], so no tick label is wider than "-0.2"): tight_layout measured every text again
    # and took half of each chart's 0.23 s (one chart per method).
    fig.subplots_adjust(left=0.12, right=0.985, bottom=0.13, top=0.93 if title else 0.975)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, facecolor="white", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# Sequential "Blues"-like ramp (ColorBrewer), light to dark.
_RAMP = ("#f7fbff", "#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5",
         "#08519c", "#08306b")


def heat_color(value: float | None, vmin: float = 0.0, vmax: float = 1.0) -> tuple[str, str]:
    """Background and text colour (``#rrggbb``) of a heat-map cell holding ``value``.

    Values are clamped to ``[vmin, vmax]``; ``None`` or NaN give a neutral grey. The text
    colour switches to white on dark cells so the printed value stays readable.
    """
    if value is None or not math.isfinite(value):
        return "#eeeeee", "#555555"
    span = vmax - vmin
    t = 0.0 if span <= 0 else min(max((value - vmin) / span, 0.0), 1.0)
    pos = t * (len(_RAMP) - 1)
    i = min(int(pos), len(_RAMP) - 2)
    frac = pos - i
    lo, hi = _hex_rgb(_RAMP[i]), _hex_rgb(_RAMP[i + 1])
    rgb = tuple(round(a + (b - a) * frac) for a, b in zip(lo, hi))
    background = "#%02x%02x%02x" % rgb
    return background, ("#ffffff" if t > 0.55 else "#1b1f24")


def _hex_rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


def aligned_pair_png(a: np.ndarray, b: np.ndarray, labels: np.ndarray, colors: list[str],
                     moved: np.ndarray, *, size_px: int = 260) -> tuple[str, str]:
    """Two aligned embeddings of the same samples as two PNG ``data:`` URIs on the same axes.

    Parameters
    ----------
    a, b : ndarray of shape (n_samples, 2)
        Already aligned (row i is the same sample in both).
    labels : ndarray of shape (n_samples,), int
    colors : list of str
        From :func:`class_colors`.
    moved : ndarray of int
        Rows to mark (the samples that moved most): ringed in black in both pictures, and in
        the second joined by a thin line to where they were in the first.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.colors import to_rgba_array
    from matplotlib.figure import Figure

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    labels = np.asarray(labels)
    moved = np.asarray(moved, dtype=np.int64)
    both = np.concatenate([a, b]) if len(a) else np.zeros((1, 2))
    lo, hi = both.min(axis=0), both.max(axis=0)
    centre, half = (lo + hi) / 2, max(float((hi - lo).max()) / 2, 1e-12) * 1.06
    order = np.random.default_rng(0).permutation(len(a))
    diameter, alpha = marker_style(len(a))
    points = diameter * 72.0 / _DPI
    rgba = to_rgba_array(colors) if len(colors) else np.zeros((1, 4))
    point_colors = rgba[labels % len(rgba)] if len(a) else np.zeros((0, 4))
    uris = []
    for which, coords in (("a", a), ("b", b)):
        fig = Figure(figsize=(size_px / _DPI, size_px / _DPI), dpi=_DPI)
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
        ax.set_axis_off()
        ax.set_xlim(centre[0] - half, centre[0] + half)
        ax.set_ylim(centre[1] - half, centre[1] + half)
        ax.set_aspect("equal", adjustable="box")
        if len(order):
            ax.scatter(coords[order, 0], coords[order, 1], s=points ** 2, c=point_colors[order],
                       alpha=alpha * 0.8, linewidths=0, rasterized=True)
        if len(moved):
            if which == "b":
                segments = np.stack([a[moved], b[moved]], axis=1)
                ax.add_collection(LineCollection(segments, colors="#1f2328", linewidths=0.6, alpha=0.55))
            ax.scatter(coords[moved, 0], coords[moved, 1], s=(points + 5) ** 2, facecolors=point_colors[moved],
                       edgecolors="#000000", linewidths=1.1, zorder=3)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=_DPI, facecolor="white", metadata={"Software": None})
        uris.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"))
    return uris[0], uris[1]


def history_png(run_labels: list[str], panels: list[tuple[str, list[tuple[str, str, list]]]], *,
                higher_is_better: bool = True, width_px: int = 300, height_px: int = 190) -> str:
    """Small line charts of one score across runs, one panel per method, as a PNG ``data:`` URI.

    ``panels`` is ``[(method_title, [(label, colour, values), ...]), ...]`` with one value (or
    None) per run; each line's best run is marked with a star.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(len(panels), 1)
    fig = Figure(figsize=(width_px * n / _DPI, height_px / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    x = np.arange(len(run_labels))
    step = max(1, int(math.ceil(len(run_labels) / 6)))
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (title, lines) in zip(axes, panels):
        ax.set_title(title, fontsize=9)
        for _, color, values in lines:
            y = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
            ax.plot(x, y, color=color, linewidth=1.3, marker="o", markersize=2.5)
            if np.isfinite(y).any():
                best = int(np.nanargmax(y) if higher_is_better else np.nanargmin(y))
                ax.plot([x[best]], [y[best]], marker="*", markersize=9, color=color,
                        markeredgecolor="#1f2328", markeredgewidth=0.6, linestyle="none")
        ax.set_xticks(x[::step])
        ax.set_xticklabels([run_labels[i][:14] for i in x[::step]], fontsize=7, rotation=20, ha="right")
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(True, linewidth=0.4, alpha=0.5)
        if len(x) == 1:
            ax.set_xlim(-0.5, 0.5)
    fig.tight_layout(pad=0.4)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, facecolor="white", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
