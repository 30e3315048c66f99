"""Cell and cytoplasm measurements of expanded cells (expansion.py): the cells.csv columns added when expansion is on.

    cells (labels over a box, the owned ids) + nuclei (labels over the same box) + the box's raw pixels
    -> one row per cell id: area and perimeter of the cell, nucleus/cell area ratio, intensity of the cell and of
       its cytoplasm per channel, and for brightfield RGB the hematoxylin and DAB optical densities of the nucleus
       and the cytoplasm.

A cell's cytoplasm is its pixels that are not its nucleus's (empty when the expansion is 0 or the nucleus is
hemmed in: its columns are then NaN). Values follow skimage.measure.regionprops (area, perimeter with
4-connectivity, population std) and are computed for all cells of a box at once with bincount over their
pixels, reusing measure.py's vectorised perimeter and mean/std.

Stains: colour deconvolution with skimage.color.rgb2hed (Ruifrok & Johnston's hematoxylin / eosin / DAB
vectors). rgb2hed divides the natural log of the transmitted light by log(1e-6); multiplied by -log10(1e-6) = 6
its values are optical densities in the usual log10 units (QuPath's "OD"): 0 is glass, and OD x of a stain
lets 10^-x of the light along its colour vector through.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .measure import _mean_std, _perimeters

STAINS = ("hematoxylin", "dab")
_OD_PER_HED_UNIT = -np.log10(1e-6)      # rgb2hed's scale (see above) to log10 optical density
_HED_INDEX = {"hematoxylin": 0, "dab": 2}


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


@dataclass
class _Pixels:
    """Some cells' pixels in a label image as measure.py's helpers take them: per pixel its flat index in the
    image, its row and its cell (0 .. n - 1)."""

    index: np.ndarray
    row: np.ndarray
    cell: np.ndarray
    n: int

    def sum(self, weights: np.ndarray) -> np.ndarray:
        return np.bincount(self.cell, weights=weights, minlength=self.n)

    def where(self, keep: np.ndarray) -> "_Pixels":
        return _Pixels(self.index[keep], self.row[keep], self.cell[keep], self.n)


def measure_expanded(cell_ids: np.ndarray, cells: np.ndarray, nuclei: np.ndarray, pixels: np.ndarray,
                     mpp: float | None, channel_names: list[str], stains: bool) -> dict[str, np.ndarray]:
    """Measure the cells `cell_ids` (rows in this order) of one box.

    cells: (h, w) labels from expansion.expand_owned; labels not in cell_ids are ignored. nuclei: (h, w) labels
    over the same box, holding these cells' nuclei with the same ids. pixels: (h, w, C) original pixels of the
    box, C = len(channel_names); with stains, RGB (C = 3), uint8 / uint16 full range or float in 0..1.
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
    own_label = cell_ids[px.cell]
    in_nucleus = nuclei.reshape(-1)[px.index] == own_label
    cytoplasm = px.where(~in_nucleus)
    area = px.sum(None)
    scale = np.nan if mpp is None else float(mpp)
    out: dict[str, np.ndarray] = {"cell_area_px": area.astype(np.int64)}
    out["cell_area_um2"] = area * scale ** 2
    out["cell_perimeter_px"] = _perimeters(px, cells) if n else np.zeros(0)
    out["cell_perimeter_um"] = out["cell_perimeter_px"] * scale
    with np.errstate(invalid="ignore", divide="ignore"):
        out["nucleus_cell_area_ratio"] = px.where(in_nucleus).sum(None) / area
    values = pixels.reshape(height * width, -1)
    cytoplasm_area = cytoplasm.sum(None)
    for k, name in enumerate(channel_names):
        for part, where, count in (("cell", px, area), ("cytoplasm", cytoplasm, cytoplasm_area)):
            mean, std = _mean_std(where, values[where.index, k].astype(np.float64), count)
            out[f"{part}_mean_intensity_{name}"] = mean
            out[f"{part}_std_intensity_{name}"] = std
    if stains:
        from skimage.color import rgb2hed
        od = rgb2hed(values[px.index]) * _OD_PER_HED_UNIT if len(px.index) else np.zeros((0, 3))
        nucleus = px.where(in_nucleus)
        for part, where, keep, count in (("nucleus", nucleus, in_nucleus, area - cytoplasm_area),
                                         ("cytoplasm", cytoplasm, ~in_nucleus, cytoplasm_area)):
            for stain in STAINS:
                mean, std = _mean_std(where, od[keep, _HED_INDEX[stain]], count)
                out[f"{part}_{stain}_od_mean"] = mean
                out[f"{part}_{stain}_od_std"] = std
    return out


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
