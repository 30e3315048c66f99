"""The report's pictures (results/report.py): each one a PNG as bytes, drawn with matplotlib's Agg canvas (no pyplot, no
global state, no display) or Pillow, to be inlined into report.html as base64."""

from __future__ import annotations

import io

import numpy as np

from .pictures import NUCLEUS_OUTLINE, _display_rgb, outline_pixels, png_bytes


def _figure(width: float = 6.0, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=90)
    FigureCanvasAgg(fig)
    return fig


def _png(fig, tight: bool = True) -> bytes:
    """The figure as PNG bytes; tight=False keeps the margins already set (tight_layout draws the figure once more
    to measure its text: ~40 % of a histogram's time)."""
    buf = io.BytesIO()
    if tight:
        fig.tight_layout()
    # zlib level 1: a third of a plot's time went to level 6's search, for ~15 % smaller flat-coloured pictures
    fig.savefig(buf, format="png", pil_kwargs={"compress_level": 1})
    return buf.getvalue()


def histogram_png(values: np.ndarray, xlabel: str, title: str, marks: dict[str, float] | None = None) -> bytes:
    """A histogram of `values` (non-finite ones dropped) with its median and any `marks` (label -> x) drawn as
    vertical lines; an empty plot that says so when there are no values."""
    values = np.asarray(values, np.float64).ravel()
    values = values[np.isfinite(values)]
    fig = _figure()
    # fixed margins (in figure fractions) that fit six-digit counts on the y axis, instead of tight_layout
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.14, top=0.91)
    ax = fig.add_subplot()
    if values.size:
        edges = np.histogram_bin_edges(values, bins="auto")
        counts, edges = np.histogram(values, bins=edges if len(edges) <= 101 else 100)   # outliers: "auto" too fine
        ax.stairs(counts, edges, fill=True, color="#4878a8")   # one artist, not a rectangle per bin
        median = float(np.median(values))
        ax.axvline(median, color="#c03030", linestyle="--", label=f"median {median:.4g}")
        for k, (label, x) in enumerate((marks or {}).items()):
            ax.axvline(x, color=("#208020", "#a06000", "#606060")[k % 3], linestyle=":", label=label)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no cells", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("cells")
    # y given: matplotlib then skips placing the title above the axis' ticks (their extent measured: ~15 % of a plot)
    ax.set_title(f"{title} (n = {values.size})", fontsize=10, y=1.0)
    return _png(fig, tight=False)


HEATMAP_ALPHA = 0.55       # the density's opacity over the slide's picture


def _density_range(density: np.ndarray) -> tuple[float, float] | None:
    """The lowest and highest density of the tiles that have one (not NaN); None when none has."""
    valid = density[np.isfinite(density)]
    return (float(valid.min()), float(valid.max())) if valid.size else None


def density_scale(density: np.ndarray, stops: int = 9) -> dict | None:
    """The heat map's colour scale (magma from the lowest to the highest density; None when no tile has one) for
    the page's colour bar: the bar's CSS gradient, its range and tick marks at matplotlib's round values."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex
    from matplotlib.ticker import MaxNLocator
    extent = _density_range(density)
    if extent is None:
        return None
    low, high = extent
    magma = colormaps["magma"]
    gradient = ", ".join(f"{to_hex(magma(k / (stops - 1)))} {100 * k / (stops - 1):.0f}%" for k in range(stops))
    span = high - low
    ticks = [(float(v), 100 * (v - low) / span if span else 0.0)
             for v in MaxNLocator(nbins=6).tick_values(low, high) if low - 1e-9 * abs(low) <= v <= high + 1e-9 * abs(high)]
    return {"low": low, "high": high, "gradient": gradient, "opacity": HEATMAP_ALPHA, "ticks": ticks}


def heatmap_png(picture: np.ndarray, density: np.ndarray, height: int, width: int, tile_px: int) -> bytes:
    """The overview `picture` (h, w, 3 uint8) of a `height` x `width` px slide at its own size, with `density`
    (tile rows, tile cols; NaN: no tissue, left as it is) drawn over it in magma (density_scale's range) at
    HEATMAP_ALPHA, one square of tile_px slide px per tile.
    Composed in numpy, not drawn by matplotlib: a figure with a colour bar cost ~0.25 s of a count's last second;
    the page draws the colour bar (density_scale)."""
    from matplotlib import colormaps
    picture = np.asarray(picture)
    ph, pw = picture.shape[:2]
    rows, cols = density.shape      # the last row and column of tiles may overhang the slide
    # the tile under the centre of each picture row and column
    tile_row = np.minimum(((np.arange(ph) + 0.5) * height / ph // tile_px).astype(np.intp), rows - 1)
    tile_col = np.minimum(((np.arange(pw) + 0.5) * width / pw // tile_px).astype(np.intp), cols - 1)
    extent = _density_range(density)
    if extent is None:
        return png_bytes(picture)
    low, high = extent
    valid = np.isfinite(density)
    scaled = np.where(valid, (density - low) / (high - low) if high > low else 0.0, 0.0)
    tile_rgb = colormaps["magma"](scaled)[..., :3] * 255                        # (rows, cols, 3)
    tile_alpha = np.where(valid, HEATMAP_ALPHA, 0.0)[..., None]
    # each pixel of the picture takes its tile's colour and opacity
    alpha = tile_alpha[tile_row][:, tile_col]
    blended = picture * (1 - alpha) + tile_rgb[tile_row][:, tile_col] * alpha
    return png_bytes(np.rint(blended).astype(np.uint8))


def density_bars_png(names: list[str], values: list[float | None], unit: str) -> bytes:
    """One bar per slide (None: no density, drawn as an empty slot) for the cohort report."""
    fig = _figure(max(5.0, 0.35 * len(names) + 2), 3.6)
    ax = fig.add_subplot()
    heights = [v if v is not None else 0.0 for v in values]
    ax.bar(range(len(names)), heights, color="#4878a8")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(unit)
    ax.set_title("density per slide", fontsize=10)
    return _png(fig)


def outlined_png(pixels: np.ndarray, labels: np.ndarray) -> bytes:
    """A full-resolution crop: `pixels` (h, w, C) of the slide with the outlines of the nuclei `labels` (h, w) in
    yellow."""
    rgb = _display_rgb(pixels)
    rgb[outline_pixels(labels)] = NUCLEUS_OUTLINE
    return png_bytes(rgb)


def score_curve_png(curve: dict, estimate: dict | None = None) -> bytes:
    """The count against the score threshold (summary.json's "score_curve"): the counts at and above the count's
    threshold solid (exact), those under it dashed (the detections scored there, boxes only: an approximation), the
    threshold marked; with an estimate, the estimated true count and its interval as a band."""
    thresholds = np.asarray(curve["thresholds"], float)
    counts = np.asarray(curve["counts"], float)
    threshold = curve.get("threshold")
    fig = _figure(6.0, 3.6)
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.14, top=0.91)
    ax = fig.add_subplot()
    at_or_above = thresholds >= (threshold if threshold is not None else -1) - 1e-9
    ax.plot(thresholds[at_or_above], counts[at_or_above], color="#4878a8", marker="o", label="nuclei kept")
    if (~at_or_above).any():
        k = np.flatnonzero(~at_or_above)
        k = np.r_[k, k[-1] + 1] if k[-1] + 1 < len(thresholds) else k
        ax.plot(thresholds[k], counts[k], color="#4878a8", marker="o", linestyle="--", fillstyle="none",
                label="with detections under the threshold")
    if threshold is not None:
        ax.axvline(threshold, color="#208020", linestyle=":", label=f"threshold {threshold:.2f}")
    if estimate and estimate.get("estimated_true_count") is not None:
        ax.axhspan(estimate["interval_low"], estimate["interval_high"], color="#c03030", alpha=0.12,
                   label=f"estimated true count, {estimate['interval_level']:.0%} interval")
        ax.axhline(estimate["estimated_true_count"], color="#c03030", linestyle="--", linewidth=1)
    ax.set_xlabel("score threshold")
    ax.set_ylabel("nuclei")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title("The count against the score threshold", fontsize=10, y=1.0)      # y: as histogram_png's
    return _png(fig, tight=False)


def boxed_png(pixels: np.ndarray, labels: np.ndarray, box: tuple[int, int, int, int], colour) -> bytes:
    """outlined_png with one detection's box (row0, col0, row1, col1 in the crop, half-open) drawn in `colour`."""
    rgb = _display_rgb(pixels)
    rgb[outline_pixels(labels)] = NUCLEUS_OUTLINE
    h, w = rgb.shape[:2]
    r0, c0 = max(0, int(box[0]) - 1), max(0, int(box[1]) - 1)
    r1, c1 = min(h - 1, int(np.ceil(box[2]))), min(w - 1, int(np.ceil(box[3])))
    rgb[r0, c0:c1 + 1] = rgb[r1, c0:c1 + 1] = colour
    rgb[r0:r1 + 1, c0] = rgb[r0:r1 + 1, c1] = colour
    return png_bytes(rgb.repeat(2, axis=0).repeat(2, axis=1))     # twice the size, each pixel a 2 x 2 block
