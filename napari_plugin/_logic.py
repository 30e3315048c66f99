"""The pure logic behind the widget: table filtering, colours by measurement, regions from shapes.

No Qt, no napari: plain numpy/pandas in, plain numpy/pandas out, tested without a display.
Coordinates are (row, col) level-0 pixels of the image a region or a cell lies in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cellseg.errors import ParameterError
from cellseg.geometry import Box

NAN_RGBA = (0.5, 0.5, 0.5, 1.0)          # cells without a value (e.g. µm columns without a pixel size)
TRANSPARENT = (0.0, 0.0, 0.0, 0.0)


# --------------------------------------------------------------------------- table

def numeric_columns(cells) -> list[str]:
    """Columns that can colour or filter cells: numbers and booleans, in table order."""
    return [c for c in cells.columns if cells[c].dtype.kind in "biuf"]


def filter_rows(cells, column: str | None = None, low: float | None = None, high: float | None = None,
                text: str | None = None) -> np.ndarray:
    """Positions (0..n-1) of the rows with low <= cells[column] <= high (bounds optional, inclusive;
    NaN never passes a bound) and, when `text` is given, with `text` in the column's value (any column
    type, case-insensitive). No column: all rows."""
    n = len(cells)
    keep = np.ones(n, bool)
    if column is None:
        return np.arange(n)
    if column not in cells.columns:
        raise ParameterError(f"expected a column of the cell table, got {column!r}")
    values = cells[column]
    if low is not None or high is not None:
        if values.dtype.kind not in "biuf":
            raise ParameterError(f"expected a numeric column for a range filter, {column!r} is {values.dtype}")
        v = values.to_numpy(np.float64)
        if low is not None:
            keep &= v >= low
        if high is not None:
            keep &= v <= high
    if text:
        keep &= values.astype(str).str.contains(text, case=False, regex=False).to_numpy()
    return np.flatnonzero(keep)


def format_value(value) -> str:
    """A table cell as text: floats with 4 significant digits, NaN as empty."""
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return ""
        return f"{value:.4g}"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    return str(value)


# --------------------------------------------------------------------------- colours

def colors_by_column(cells, column: str, colormap: str = "viridis",
                     limits: tuple[float, float] | None = None) -> tuple[np.ndarray, tuple[float, float] | None]:
    """RGBA float (n, 4) per cell and the value range used (None for categories).

    Numbers: the colormap over limits (default the 5th..95th percentile: contrast for the bulk of the cells,
    outliers saturate), NaN grey.
    Booleans and text: one colour per distinct value (tab10, in sorted order).
    """
    from matplotlib import colormaps

    values = cells[column]
    n = len(values)
    if n == 0:
        return np.zeros((0, 4), np.float32), None
    if values.dtype.kind in "iuf":
        v = values.to_numpy(np.float64)
        finite = v[np.isfinite(v)]
        if limits is None:
            limits = ((float(np.percentile(finite, 5)), float(np.percentile(finite, 95))) if finite.size
                      else (0.0, 1.0))
        lo, hi = limits
        t = np.clip((v - lo) / (hi - lo), 0, 1) if hi > lo else np.full(n, 0.5)
        rgba = colormaps[colormap](np.nan_to_num(t, nan=0.0)).astype(np.float32)
        rgba[~np.isfinite(v)] = NAN_RGBA
        return rgba, (float(lo), float(hi))
    keys = values.astype(str).to_numpy()
    categories = sorted(set(keys))
    lut = colormaps["tab10"](np.arange(len(categories)) % 10).astype(np.float32)
    index = {c: i for i, c in enumerate(categories)}
    return lut[[index[k] for k in keys]], None


def label_color_dict(cell_ids, colors: np.ndarray) -> dict:
    """{cell_id: rgba} for a napari DirectLabelColormap; background (0) and unknown ids (None) transparent."""
    out: dict = {None: TRANSPARENT, 0: TRANSPARENT}
    for cid, rgba in zip(np.asarray(cell_ids, np.int64).tolist(), np.asarray(colors, np.float32)):
        out[int(cid)] = tuple(float(x) for x in rgba)
    return out


# --------------------------------------------------------------------------- regions

def region_box(vertices, image_shape: tuple[int, int]) -> Box:
    """The pixel box covering a shape (its vertices as (row, col) in the image's pixel frame), clipped to
    the image. napari puts pixel i's centre at i, so a vertex at r covers pixel round(r)."""
    v = np.asarray(vertices, np.float64)
    if v.ndim != 2 or v.shape[1] < 2 or len(v) == 0:
        raise ParameterError(f"expected shape vertices as an (n, 2) array, got shape {v.shape}")
    v = v[:, -2:]                         # (row, col): the last two axes
    h, w = image_shape
    r0, c0 = np.floor(v.min(axis=0) + 0.5).astype(int)
    r1, c1 = np.floor(v.max(axis=0) + 0.5).astype(int) + 1
    box = Box(max(r0, 0), max(c0, 0), min(r1, h), min(c1, w))
    if box.row0 >= box.row1 or box.col0 >= box.col1:
        raise ParameterError(f"expected a rectangle overlapping the {h} x {w} px image, got rows "
                             f"{v[:, 0].min():.0f}..{v[:, 0].max():.0f}, cols {v[:, 1].min():.0f}..{v[:, 1].max():.0f}")
    if box.height < 16 or box.width < 16:
        raise ParameterError(f"expected a region of at least 16 x 16 px, got {box.height} x {box.width} px")
    return box


def displayed_plane(data, rgb: bool, point) -> tuple[object, tuple[int, ...]]:
    """The 2-D image (h, w) or RGB (h, w, 3|4) of an n-D layer's `data` that the viewer shows at `point` (the
    layer's data coordinates, Layer.world_to_data of the viewer's dims.point), and its indices along the leading
    axes (napari's, from 0; () for a 2-D image). A Z-stack or time series opened by napari's own reader is counted as
    the plane on screen, as `cellseg count --z N` counts plane N; lazy data (dask, zarr) stays lazy."""
    leading = data.ndim - (3 if rgb else 2)
    if leading <= 0:
        return data, ()
    at = tuple(min(max(int(round(float(p))), 0), n - 1) for p, n in zip(list(point)[:leading], data.shape))
    return data[at], at


def array_reader(data) -> Callable[[Box], np.ndarray]:
    """read(box) -> (h, w, C) pixels of a 2-D (h, w) or RGB(A) (h, w, 3|4) array-like (numpy, dask, zarr,
    LazyLevel), one region at a time; alpha is dropped."""
    if data.ndim not in (2, 3) or (data.ndim == 3 and data.shape[2] not in (3, 4)):
        raise ParameterError(f"expected a 2-D image (h, w) or RGB (h, w, 3), got an array of shape {data.shape}; "
                             "count one plane at a time")

    def read(box: Box) -> np.ndarray:
        part = np.asarray(data[box.row0:box.row1, box.col0:box.col1])
        return part[..., None] if part.ndim == 2 else part[..., :3]
    return read


def write_region_tiff(read: Callable[[Box], np.ndarray], box: Box, path: Path, *, n_channels: int, dtype,
                      mpp: float | None = None, rgb: bool = False, tile: int = 512,
                      channel_names: list[str] | None = None) -> Path:
    """Write the pixels of `box` to a tiled OME-TIFF at `path`, one tile at a time (memory: a few tiles).

    read(box) -> (h, w, n_channels) in `dtype`. One channel: YX; RGB: YXS; several: YXS minisblack, or, with
    `channel_names` (the slide's), CYX planes whose OME channels carry them, as the count of the whole slide
    names its intensity columns (each tile then read once per channel).
    The TIFF is the input of a count of the region (cellseg reads it lazily like any slide).
    """
    import tifffile

    from cellseg.results import ome_metadata, resolution_tags

    dtype = np.dtype(dtype)

    def tiles():
        for r in range(box.row0, box.row1, tile):
            for c in range(box.col0, box.col1, tile):
                part = read(Box(r, c, min(r + tile, box.row1), min(c + tile, box.col1)))
                part = np.asarray(part, dtype=dtype)
                yield part[..., 0] if n_channels == 1 else part

    named = n_channels > 1 and bool(channel_names) and len(channel_names) == n_channels

    def planes():
        for k in range(n_channels):
            for r in range(box.row0, box.row1, tile):
                for c in range(box.col0, box.col1, tile):
                    part = read(Box(r, c, min(r + tile, box.row1), min(c + tile, box.col1)))
                    yield np.asarray(part, dtype=dtype)[..., k]

    if named:
        shape, metadata = (n_channels, *box.shape), ome_metadata("CYX", mpp)
        metadata["Channel"] = {"Name": [str(n) for n in channel_names]}
    else:
        shape = box.shape if n_channels == 1 else (*box.shape, n_channels)
        metadata = ome_metadata("YX" if n_channels == 1 else "YXS", mpp)
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        # named: one page per channel (a page of several samples carries one OME channel, so one name)
        tif.write(planes() if named else tiles(), shape=shape, dtype=dtype, tile=(tile, tile), compression="zlib",
                  compressionargs={"level": 1},
                  photometric="rgb" if rgb and n_channels == 3 and not named else "minisblack",
                  planarconfig=None if named else "contig", metadata=metadata, **resolution_tags(mpp))
    return path


def place_on_image(kwargs: dict, image_scale, image_translate) -> dict:
    """Layer kwargs in an image's pixel frame (scale/translate in px) -> the same layer in world coordinates,
    on top of an image layer shown with `image_scale` and `image_translate` (its last two axes)."""
    s_img = np.asarray(image_scale, np.float64)[-2:]
    t_img = np.asarray(image_translate, np.float64)[-2:]
    scale = np.asarray(kwargs.get("scale", (1.0, 1.0)), np.float64)
    translate = np.asarray(kwargs.get("translate", (0.0, 0.0)), np.float64)
    return {**kwargs, "scale": tuple(scale * s_img), "translate": tuple(t_img + translate * s_img)}


# --------------------------------------------------------------------------- the count's uncertainty

def count_message(summary: dict, shown: int | None = None, folder: Path | str | None = None) -> str:
    """What the widget says of a finished count (summary.json): the nuclei counted, the estimated true count with
    its interval (an estimate from validation data) or why there is none, and `folder` (the result) on that line;
    then the count's warnings, one a line."""
    count = int(summary.get("cell_count", shown or 0)) if shown is None else shown
    text = f"{count:,} cells"
    estimate = summary.get("count_estimate") or {}
    if estimate.get("estimated_true_count") is not None:
        level = round(100 * float(estimate.get("interval_level", 0.9)))
        text += (f"; estimated true count {round(estimate['estimated_true_count']):,} ({level} % interval "
                 f"{round(estimate['interval_low']):,}–{round(estimate['interval_high']):,}; an estimate from "
                 f"validation data)")
    elif estimate.get("note"):
        text += f" ({estimate['note']})"
    if folder is not None:
        text += f" → {folder}"
    warnings = summary.get("warnings") or []
    if warnings:
        text += "\nwarning: " + "\nwarning: ".join(warnings)
    return text
