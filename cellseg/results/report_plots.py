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
    ax.set_title(f"{title} (n = {values.size})", fontsize=10)
    return _png(fig, tight=False)


def heatmap_png(picture: np.ndarray, density: np.ndarray, unit: str, height: int, width: int, tile_px: int) -> bytes:
    """The overview `picture` (h, w, 3 uint8) of a `height` x `width` px slide with `density` (tile rows, tile cols;
    NaN: no tissue) drawn over it, one square of tile_px per tile, and a colour bar in `unit`."""
    fig = _figure(7.0, min(9.0, 6.0 * height / max(width, 1) + 0.5))
    ax = fig.add_subplot()
    ax.imshow(picture, extent=(0, width, height, 0), interpolation="nearest")
    shown = np.ma.masked_invalid(density)
    if shown.count():
        rows, cols = density.shape      # the last row and column of tiles may overhang the slide
        image = ax.imshow(shown, extent=(0, cols * tile_px, rows * tile_px, 0), cmap="magma", alpha=0.55,
                          interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label=unit)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    # fixed margins, room for the colour bar's ticks and label (tight_layout would draw the figure twice)
    fig.subplots_adjust(left=0.01, right=0.9, bottom=0.01, top=0.99)
    return _png(fig, tight=False)


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
    ax.set_title("The count against the score threshold", fontsize=10)
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
