"""The report's pictures (results/report.py): its charts as `Chart`s, plain data the page draws as inline SVG
(templates/_chart.svg.j2); its pictures, and area_histogram.png, as PNG bytes (numpy and libpng, or matplotlib's Agg
canvas: no pyplot, no global state, no display) inlined into report.html as base64."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

from .pictures import NUCLEUS_OUTLINE, _display_rgb, outline_pixels, png_bytes

# the plots' colours: bars and curves, the median and the estimate, other marks
_BLUE, _RED, _MARKS = "#4878a8", "#c03030", ("#208020", "#a06000", "#606060")


def _figure(width: float = 6.0, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=90)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    """The figure as PNG bytes, with the margins already set (tight_layout would draw the figure once more to
    measure its text: ~40 % of a histogram's time)."""
    buf = io.BytesIO()
    # zlib level 1: a third of a plot's time went to level 6's search, for ~15 % smaller flat-coloured pictures
    fig.savefig(buf, format="png", pil_kwargs={"compress_level": 1})
    return buf.getvalue()


def _finite(values) -> np.ndarray:
    values = np.asarray(values, np.float64).ravel()
    return values[np.isfinite(values)]


def _bins(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts and edges of the histograms (the PNG's and the chart's): numpy's "auto" bins, at most 100."""
    edges = np.histogram_bin_edges(values, bins="auto")
    return np.histogram(values, bins=edges if len(edges) <= 101 else 100)   # outliers: "auto" too fine


def _round_values(lo: float, hi: float, integer: bool = False) -> list[float]:
    """matplotlib's round tick values (MaxNLocator, as its own plots place them) from lo to hi."""
    from matplotlib.ticker import MaxNLocator
    slack = 1e-9 * max(abs(lo), abs(hi), hi - lo)
    return [float(v) for v in MaxNLocator(nbins=6, integer=integer).tick_values(lo, hi) if lo - slack <= v <= hi + slack]


def histogram_png(values: np.ndarray, xlabel: str, title: str, marks: dict[str, float] | None = None) -> bytes:
    """A histogram of `values` (non-finite ones dropped) with its median and any `marks` (label -> x) drawn as
    vertical lines; an empty plot that says so when there are no values."""
    values = _finite(values)
    fig = _figure()
    # fixed margins (in figure fractions) that fit six-digit counts on the y axis, instead of tight_layout
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.14, top=0.91)
    ax = fig.add_subplot()
    if values.size:
        counts, edges = _bins(values)
        ax.stairs(counts, edges, fill=True, color=_BLUE)   # one artist, not a rectangle per bin
        median = float(np.median(values))
        ax.axvline(median, color=_RED, linestyle="--", label=f"median {median:.4g}")
        for k, (label, x) in enumerate((marks or {}).items()):
            ax.axvline(x, color=_MARKS[k % 3], linestyle=":", label=label)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no cells", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("cells")
    # y given: matplotlib then skips placing the title above the axis' ticks (their extent measured: ~15 % of a plot)
    ax.set_title(f"{title} (n = {values.size})", fontsize=10, y=1.0)
    return _png(fig)


# A chart's size and its plot area in SVG px (the page scales them): the PNG plots' 6 x 3.6 inches at 90 dpi
CHART_WIDTH, CHART_HEIGHT = 540, 324
_PLOT_LEFT, _PLOT_RIGHT, _PLOT_TOP, _PLOT_BOTTOM = 70, 528, 30, 278


@dataclass
class Chart:
    """A chart as the page draws it (templates/_chart.svg.j2), in SVG px: axes with (px, label) ticks, filled areas
    (path data), lines (points, stroke, dash), round markers, rectangles (bands), a legend (label, stroke, dash;
    fill for a band) and, where there is nothing to plot, a note in the middle.

    Drawn by the page, not rendered to a PNG: a matplotlib figure cost 0.1-0.15 s of every count's report (three
    to five a report), a chart ~1 ms, and it stays sharp at any zoom and in print."""

    title: str
    xlabel: str
    ylabel: str
    x_ticks: list[tuple[float, str]] = field(default_factory=list)
    y_ticks: list[tuple[float, str]] = field(default_factory=list)
    areas: list[dict] = field(default_factory=list)
    lines: list[dict] = field(default_factory=list)
    markers: list[dict] = field(default_factory=list)
    bands: list[dict] = field(default_factory=list)
    legend: list[dict] = field(default_factory=list)
    note: str | None = None
    legend_at: tuple[float, float, float, float] = (0, 0, 0, 0)     # its box: x, y, width, height
    width: int = CHART_WIDTH
    height: int = CHART_HEIGHT
    plot: tuple[int, int, int, int] = (_PLOT_LEFT, _PLOT_TOP, _PLOT_RIGHT, _PLOT_BOTTOM)
    x_label_angle: int = 0      # the x tick labels turned by this many degrees (the cohort's slide names)


def _tick_label(value: float) -> str:
    if float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:.4g}"


class _Axis:
    """Data values lo..hi onto px start..stop (stop < start for a y axis), with ticks at matplotlib's round values
    (MaxNLocator, as its own plots place them)."""

    def __init__(self, lo: float, hi: float, start: float, stop: float, integer: bool = False):
        if not hi > lo:         # one value: a unit span around it
            lo, hi = lo - 0.5, hi + 0.5
        self.lo, self.hi, self.start, self.stop = float(lo), float(hi), float(start), float(stop)
        self.ticks = [(round(float(self.px(v)), 1), _tick_label(v)) for v in _round_values(self.lo, self.hi, integer)]

    def px(self, value):
        return self.start + (np.asarray(value, float) - self.lo) * (self.stop - self.start) / (self.hi - self.lo)


def _place_legend(chart: Chart, xs: np.ndarray, tops: np.ndarray, filled: bool) -> None:
    """The legend's box in the plot's corner that hides least of the data (as matplotlib's loc="best"): the data's
    highest px `tops` at px `xs`, filled down to the axis (bars) or not (a curve)."""
    if not chart.legend:
        return
    width = 46 + 5.8 * max(len(e["label"]) for e in chart.legend)
    height = 8 + 17 * len(chart.legend)
    corners = [(_PLOT_RIGHT - 6 - width, _PLOT_TOP + 6), (_PLOT_LEFT + 6, _PLOT_TOP + 6)]
    if not filled:
        corners += [(_PLOT_RIGHT - 6 - width, _PLOT_BOTTOM - 6 - height), (_PLOT_LEFT + 6, _PLOT_BOTTOM - 6 - height)]

    def hidden(corner: tuple[float, float]) -> int:
        x0, y0 = corner
        under = (xs >= x0) & (xs <= x0 + width)
        reaches = tops[under] <= y0 + height
        return int(np.count_nonzero(reaches if filled else reaches & (tops[under] >= y0)))

    x0, y0 = min(corners, key=hidden)      # the first of the least hidden: top right where nothing is
    chart.legend_at = (round(x0, 1), round(y0, 1), round(width, 1), height)


def _points(xs: np.ndarray, ys: np.ndarray) -> str:
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(np.ravel(xs), np.ravel(ys)))


def histogram_chart(values: np.ndarray, xlabel: str, title: str, marks: dict[str, float] | None = None) -> Chart:
    """histogram_png's plot as a Chart: the histogram of `values` (non-finite ones dropped; the same bins), their
    median and any `marks` (label -> x) as vertical lines; a note that says so when there are no values."""
    values = _finite(values)
    chart = Chart(f"{title} (n = {values.size:,})", xlabel, "cells")
    if not values.size:
        chart.note = "no cells"
        return chart
    counts, edges = _bins(values)
    median = float(np.median(values))
    marks = {label: float(x) for label, x in (marks or {}).items() if x is not None and np.isfinite(x)}
    lo, hi = min([edges[0], *marks.values()]), max([edges[-1], *marks.values()])
    pad = 0.02 * (hi - lo)
    x = _Axis(lo - pad, hi + pad, _PLOT_LEFT, _PLOT_RIGHT)
    y = _Axis(0, max(1, int(counts.max())) * 1.05, _PLOT_BOTTOM, _PLOT_TOP, integer=True)
    chart.x_ticks, chart.y_ticks = x.ticks, y.ticks
    # the bins as one filled outline (a stairs plot), not a rectangle per bin
    ex, top = x.px(edges), y.px(counts)
    steps = [f"M{ex[0]:.1f},{_PLOT_BOTTOM}"] + [f"L{a:.1f},{t:.1f}L{b:.1f},{t:.1f}"
                                                for a, b, t in zip(ex[:-1], ex[1:], top)]
    chart.areas.append({"d": "".join(steps) + f"L{ex[-1]:.1f},{_PLOT_BOTTOM}Z", "fill": _BLUE})
    lines = [(f"median {median:.4g}", median, _RED, "6 4")]
    lines += [(label, at, _MARKS[k % 3], "2 3") for k, (label, at) in enumerate(marks.items())]
    for label, at, colour, dash in lines:
        px = float(x.px(at))
        chart.lines.append({"points": _points([px, px], [_PLOT_BOTTOM, _PLOT_TOP]), "stroke": colour, "dash": dash})
        chart.legend.append({"label": label, "stroke": colour, "dash": dash})
    # the bars' tops sampled every px across the plot
    xs = np.arange(_PLOT_LEFT, _PLOT_RIGHT + 1, dtype=float)
    bin_at = np.searchsorted(ex, xs, side="right") - 1
    inside = (bin_at >= 0) & (bin_at < len(counts))
    _place_legend(chart, xs[inside], top[bin_at[inside]], filled=True)
    return chart


def score_curve_chart(curve: dict, estimate: dict | None = None) -> Chart:
    """The count against the score threshold (summary.json's "score_curve") as a Chart:
    solid at and above the count's threshold (exact), dashed with open markers under it (detections scored there,
    boxes only: an approximation), the threshold marked; with an estimate, the estimated true count and its
    interval as a band."""
    thresholds = np.asarray(curve["thresholds"], float)
    counts = np.asarray(curve["counts"], float)
    threshold = curve.get("threshold")
    chart = Chart("The count against the score threshold", "score threshold", "nuclei")
    if not len(thresholds):
        chart.note = "no score curve"
        return chart
    known = estimate and estimate.get("estimated_true_count") is not None
    top = max(counts.max(), estimate["interval_high"] if known else 0, 1)
    x = _Axis(thresholds.min(), thresholds.max(), _PLOT_LEFT + 8, _PLOT_RIGHT - 8)
    y = _Axis(0, top * 1.05, _PLOT_BOTTOM, _PLOT_TOP, integer=True)
    chart.x_ticks, chart.y_ticks = x.ticks, y.ticks
    if known:
        low, high = y.px(estimate["interval_low"]), y.px(estimate["interval_high"])
        chart.bands.append({"x": _PLOT_LEFT, "y": round(float(high), 1), "width": _PLOT_RIGHT - _PLOT_LEFT,
                            "height": round(float(low - high), 1), "fill": _RED, "opacity": 0.12})
        at = float(y.px(estimate["estimated_true_count"]))
        chart.lines.append({"points": _points([_PLOT_LEFT, _PLOT_RIGHT], [at, at]), "stroke": _RED, "dash": "6 4"})
        chart.legend.append({"label": f"estimated true count, {estimate['interval_level']:.0%} interval",
                             "stroke": _RED, "dash": "6 4", "fill": _RED})
    at_or_above = thresholds >= (threshold if threshold is not None else -1) - 1e-9
    kept = np.flatnonzero(at_or_above)
    if (~at_or_above).any():
        under = np.flatnonzero(~at_or_above)
        joined = np.r_[under, under[-1] + 1] if under[-1] + 1 < len(thresholds) else under
        chart.lines.append({"points": _points(x.px(thresholds[joined]), y.px(counts[joined])), "stroke": _BLUE,
                            "dash": "6 4"})
        chart.markers += [{"x": round(float(a), 1), "y": round(float(b), 1), "fill": "white", "stroke": _BLUE}
                          for a, b in zip(x.px(thresholds[under]), y.px(counts[under]))]
        chart.legend.append({"label": "with detections under the threshold", "stroke": _BLUE, "dash": "6 4"})
    if len(kept):
        chart.lines.append({"points": _points(x.px(thresholds[kept]), y.px(counts[kept])), "stroke": _BLUE,
                            "dash": None})
        chart.markers += [{"x": round(float(a), 1), "y": round(float(b), 1), "fill": _BLUE, "stroke": _BLUE}
                          for a, b in zip(x.px(thresholds[kept]), y.px(counts[kept]))]
        chart.legend.insert(0, {"label": "nuclei kept", "stroke": _BLUE, "dash": None})
    if threshold is not None:
        px = float(x.px(threshold))
        chart.lines.append({"points": _points([px, px], [_PLOT_BOTTOM, _PLOT_TOP]), "stroke": _MARKS[0],
                            "dash": "2 3"})
        chart.legend.append({"label": f"threshold {threshold:.2f}", "stroke": _MARKS[0], "dash": "2 3"})
    # the curve sampled every px across the plot, and its band
    xs = np.arange(_PLOT_LEFT, _PLOT_RIGHT + 1, dtype=float)
    order = np.argsort(thresholds)
    ys = np.interp(xs, x.px(thresholds[order]), y.px(counts[order]), left=np.nan, right=np.nan)
    if known:
        xs, ys = np.r_[xs, xs, xs], np.r_[ys, np.full(len(xs), low), np.full(len(xs), high)]
    _place_legend(chart, xs[np.isfinite(ys)], ys[np.isfinite(ys)], filled=False)
    return chart


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
    extent = _density_range(density)
    if extent is None:
        return None
    low, high = extent
    magma = colormaps["magma"]
    gradient = ", ".join(f"{to_hex(magma(k / (stops - 1)))} {100 * k / (stops - 1):.0f}%" for k in range(stops))
    span = high - low
    ticks = [(v, 100 * (v - low) / span if span else 0.0) for v in _round_values(low, high)]
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


def density_bars_chart(names: list[str], values: list[float | None], unit: str) -> Chart:
    """The cohort report's chart: one bar per slide (None: no density, an empty slot), the slides' names under
    them at 60 degrees; as wide as the slides need (28 px a slide) and as tall as their longest name."""
    slot = 28
    longest = max((len(n) for n in names), default=0)
    # names at 60 degrees under the plot: ~6 px a character at 11 px, sin 60 of it downwards (at most 40 characters)
    margin = 24 + round(0.87 * 6 * min(longest, 40))
    # and cos 60 of it to the left of its bar: the first name must not leave the chart
    left = max(_PLOT_LEFT, round(0.5 * 6 * min(longest, 40)) + 8 - slot // 2)
    width = max(CHART_WIDTH, left + 12 + slot * len(names))
    height = 250 + margin
    top, right, bottom = _PLOT_TOP, width - 12, height - margin
    chart = Chart("density per slide", "", unit, width=width, height=height, plot=(left, top, right, bottom),
                  x_label_angle=-60)
    known = [v for v in values if v is not None and np.isfinite(v)]
    if not known:
        chart.note = "no slide with a density"
        return chart
    y = _Axis(0, max(max(known), 1e-9) * 1.05, bottom, top)
    chart.y_ticks = y.ticks
    step = (right - left) / max(len(names), 1)
    bars = []
    for k, value in enumerate(values):
        centre = left + (k + 0.5) * step
        chart.x_ticks.append((round(centre, 1), names[k][:40] + ("…" if len(names[k]) > 40 else "")))
        if value is not None and np.isfinite(value):
            a, b, t = centre - 0.4 * step, centre + 0.4 * step, float(y.px(value))
            bars.append(f"M{a:.1f},{bottom}V{t:.1f}H{b:.1f}V{bottom}Z")
    chart.areas.append({"d": "".join(bars), "fill": _BLUE})
    return chart


def outlined_png(pixels: np.ndarray, labels: np.ndarray) -> bytes:
    """A full-resolution crop: `pixels` (h, w, C) of the slide with the outlines of the nuclei `labels` (h, w) in
    yellow."""
    rgb = _display_rgb(pixels)
    rgb[outline_pixels(labels)] = NUCLEUS_OUTLINE
    return png_bytes(rgb)


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
