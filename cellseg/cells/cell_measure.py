"""Cell and cytoplasm measurements of expanded cells (cells/expansion.py): the cells.csv columns added when expansion is on.

    cells (labels over a box, the owned ids) + nuclei (labels over the same box) + the box's raw pixels
    -> one row per cell id: area and perimeter of the cell, nucleus/cell area ratio, intensity of the cell and of
       its cytoplasm per channel, and for brightfield RGB the hematoxylin and DAB optical densities of the nucleus
       and the cytoplasm.

A cell's cytoplasm is its pixels that are not its nucleus's (empty when the expansion is 0 or the nucleus is
hemmed in: its columns are then NaN). Values follow skimage.measure.regionprops (area, perimeter with
4-connectivity, population std) and are computed for all cells of a box at once with bincount over their
pixels, with cells/nucleus_measure.py's vectorised perimeter.

Stains: colour deconvolution with skimage.color.rgb2hed (Ruifrok & Johnston's hematoxylin / eosin / DAB
vectors). rgb2hed divides the natural log of the transmitted light by log(1e-6); multiplied by -log10(1e-6) = 6
its values are optical densities in the usual log10 units (QuPath's "OD"): 0 is glass, and OD x of a stain
lets 10^-x of the light along its colour vector through.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np

# cells/nucleus_measure.py's vectorised perimeter (regionprops' definition, tested there against regionprops).
from .nucleus_measure import _perimeters

STAINS = ("hematoxylin", "dab")
_OD_PER_HED_UNIT = -np.log10(1e-6)      # rgb2hed's scale (see above) to log10 optical density
_HED_COLUMNS = [0, 2]                   # STAINS in rgb2hed's (hematoxylin, eosin, DAB) output


def stains_apply(modality: str, n_channels: int) -> bool:
    """Stain columns are measured on brightfield RGB only (transmitted light, three colour channels)."""
    return modality == "brightfield" and n_channels == 3


def expanded_columns(channel_names: list[str], stains: bool) -> dict[str, str]:
    """The columns cells.csv gains when cells are expanded (name -> dtype), the same for 0 or 1e6 cells."""
    columns = {"cell_area_px": "int64", "cell_area_um2": "float64",
               "cell_perimeter_px": "float64", "cell_perimeter_um": "float64",
               "nucleus_cell_area_ratio": "float64"}
    for name in channel_names:
        for part in ("cell", "cytoplasm"):
            columns[f"{part}_mean_intensity_{name}"] = "float64"
            columns[f"{part}_std_intensity_{name}"] = "float64"
    if stains:
        for part in ("nucleus", "cytoplasm"):
            for stain in STAINS:
                columns[f"{part}_{stain}_od_mean"] = "float64"
                columns[f"{part}_{stain}_od_std"] = "float64"
    return columns


class _Pixels(NamedTuple):
    """Cells' pixels in a label image: per pixel its flat index in the image, its row and its cell (0 .. n - 1)."""

    index: np.ndarray
    row: np.ndarray
    cell: np.ndarray
    n: int


def measure_expanded(cell_ids: np.ndarray, cells: np.ndarray, nuclei: np.ndarray, pixels: np.ndarray,
                     mpp: float | None, channel_names: list[str], stains: bool,
                     white: float | None = None) -> dict[str, np.ndarray]:
    """Measure the cells `cell_ids` (rows in this order) of one box.

    cells: (h, w) labels from expansion.expand_owned; labels not in cell_ids are ignored. nuclei: (h, w) labels
    over the same box, holding these cells' nuclei with the same ids. pixels: (h, w, C) original pixels of the
    box, C = len(channel_names); with stains, RGB (C = 3), uint8 / uint16 or float in 0..1, the optical densities
    taken against `white` (stain_white; None: the pixel type's full scale).
    Returns expanded_columns(channel_names, stains) in order.
    """
    cell_ids = np.asarray(cell_ids, np.int64).reshape(-1)
    cells, nuclei, pixels = np.asarray(cells), np.asarray(nuclei), np.asarray(pixels)
    height, width = cells.shape
    if nuclei.shape != cells.shape or pixels.shape[:2] != cells.shape or pixels.ndim != 3:
        raise ValueError(f"expected cells, nuclei and pixels over one box, got shapes {cells.shape}, "
                         f"{nuclei.shape} and {pixels.shape}")
    if pixels.shape[2] != len(channel_names) or (stains and pixels.shape[2] != 3):
        raise ValueError(f"expected {3 if stains else len(channel_names)} channels, got {pixels.shape[2]}")
    n = len(cell_ids)
    px = _pixels_of(cell_ids, cells)
    # Each pixel's part: its cell's nucleus (group cell) or its cytoplasm (group n + cell); one bincount per
    # statistic then serves nucleus, cytoplasm and (pooled) cell.
    part = px.cell + n * (nuclei.reshape(-1)[px.index] != cell_ids[px.cell])
    counts = np.bincount(part, minlength=2 * n)
    area = counts[:n] + counts[n:]
    scale = np.nan if mpp is None else float(mpp)
    out: dict[str, np.ndarray] = {"cell_area_px": area.astype(np.int64)}
    out["cell_area_um2"] = area * scale ** 2
    out["cell_perimeter_px"] = _perimeters(cells, px.index, px.row, px.cell, n) if n else np.zeros(0)
    out["cell_perimeter_um"] = out["cell_perimeter_px"] * scale
    with np.errstate(invalid="ignore", divide="ignore"):
        out["nucleus_cell_area_ratio"] = counts[:n] / area
    values = pixels.reshape(height * width, -1)[px.index]
    for k, name in enumerate(channel_names):
        stats = _part_stats(part, values[:, k].astype(np.float64), counts)
        for which in ("cell", "cytoplasm"):
            out[f"{which}_mean_intensity_{name}"], out[f"{which}_std_intensity_{name}"] = stats[which]
    if stains:
        od = stain_densities(values, white)
        for k, stain in enumerate(STAINS):
            stats = _part_stats(part, od[:, k], counts)
            for which in ("nucleus", "cytoplasm"):
                out[f"{which}_{stain}_od_mean"], out[f"{which}_{stain}_od_std"] = stats[which]
    return {name: out[name] for name in expanded_columns(channel_names, stains)}


def stain_white(dtype, brightest: float | None) -> float | None:
    """The light level a slide's optical densities are taken against: 255 for 8-bit pixels; for 16-bit ones the full
    scale of the bits they use (the smallest 2^k - 1, k >= 8, at or above `brightest`, the slide's brightest pixels:
    the intensity range's high end), so that a 12-bit camera's white (4095) stored in 16 bits is glass, not an OD of
    1.2; None for other types (floats in 0..1, skimage's convention)."""
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return 255.0
    if dtype != np.uint16:
        return None
    bits = 16 if brightest is None or not np.isfinite(brightest) else int(np.ceil(np.log2(max(brightest, 1) + 1)))
    return float(2 ** min(16, max(8, bits)) - 1)


def mean_colour_stains(colours: np.ndarray, dtype, white: float | None = None) -> np.ndarray:
    """(k, 3) mean RGB colours (cells.csv's mean intensities, floats in the slide's units) -> (k, 2) hematoxylin
    and DAB optical densities of those colours, the pixel type `dtype` (summary.json's "dtype") giving their range:
    an 8- or 16-bit slide's means rounded back into it, against `white` (summary.json's "stain_white")."""
    colours = np.asarray(colours, np.float64).reshape(-1, 3)
    dtype = np.dtype(dtype)
    if dtype in (np.uint8, np.uint16):
        top = np.iinfo(dtype).max
        return stain_densities(np.clip(np.round(colours), 0, top).astype(dtype), white)
    return stain_densities(colours)


def stain_densities(rgb: np.ndarray, white: float | None = None) -> np.ndarray:
    """(k, 3) RGB -> (k, 2) hematoxylin and DAB optical densities: skimage.color.rgb2hed x 6, of the pixels as a
    share of `white` (stain_white; None: the pixel type's full scale, as rgb2hed).

    8- and 16-bit pixels look up each channel's share of both densities in a table of every possible value (the
    same arithmetic as rgb2hed's, in a fifth of its time); other types go through rgb2hed itself.
    """
    from skimage.color import rgb2hed
    rgb = np.asarray(rgb).reshape(-1, 3)
    if rgb.dtype in (np.uint8, np.uint16):
        red, green, blue = _stain_tables(rgb.dtype, float(white or np.iinfo(rgb.dtype).max))
        stains = red[rgb[:, 0]]
        stains += green[rgb[:, 1]]
        stains += blue[rgb[:, 2]]
        np.maximum(stains, 0, out=stains)
    else:
        stains = rgb2hed(rgb)[:, _HED_COLUMNS] if len(rgb) else np.zeros((0, 2))
    return stains * _OD_PER_HED_UNIT


@lru_cache(maxsize=4)
def _stain_tables(dtype: np.dtype, white: float) -> np.ndarray:
    """(3, values, 2): what each value of each channel adds to rgb2hed's hematoxylin and DAB, before clipping at 0:
    log(max(value / white, 1e-6)) / log(1e-6) times that channel's row of skimage's hed_from_rgb; values above
    `white` count as white."""
    from skimage.color import hed_from_rgb
    light = np.clip(np.arange(np.iinfo(dtype).max + 1, dtype=np.float64) / white, 1e-6, 1.0)
    log_light = np.log(light) / np.log(1e-6)
    return log_light[None, :, None] * hed_from_rgb[:, _HED_COLUMNS][:, None, :]


def _part_stats(part: np.ndarray, values: np.ndarray, counts: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Mean and population std of `values` per nucleus part, cytoplasm part and whole cell.

    part: each value's group (cell for its nucleus part, n + cell for its cytoplasm); counts: pixels per group.
    Two passes like np.std per part; the cell's pooled from its parts (Chan et al.'s parallel variance).
    """
    n = len(counts) // 2
    with np.errstate(invalid="ignore", divide="ignore"):
        sums = np.bincount(part, weights=values, minlength=2 * n)
        means = sums / counts
        dev = values - means[part]
        squares = np.bincount(part, weights=dev * dev, minlength=2 * n)
        n1, n2 = counts[:n], counts[n:]
        total = n1 + n2
        between = np.where((n1 > 0) & (n2 > 0), n1 * n2 / total * (means[:n] - means[n:]) ** 2, 0.0)
        return {"nucleus": (means[:n], np.sqrt(squares[:n] / n1)),
                "cytoplasm": (means[n:], np.sqrt(squares[n:] / n2)),
                "cell": ((sums[:n] + sums[n:]) / total, np.sqrt((squares[:n] + squares[n:] + between) / total))}


def _pixels_of(cell_ids: np.ndarray, cells: np.ndarray) -> _Pixels:
    """The pixels of cells labelled with one of cell_ids, each with its position in cell_ids."""
    index = np.flatnonzero(cells)
    labels = cells.reshape(-1)[index]
    order = np.argsort(cell_ids, kind="stable")
    ranked = cell_ids[order]
    at = np.minimum(np.searchsorted(ranked, labels), max(len(ranked) - 1, 0))
    listed = ranked[at] == labels if len(ranked) else np.zeros(len(labels), bool)
    index = index[listed]
    return _Pixels(index, index // cells.shape[1], order[at[listed]], len(cell_ids))
