"""Expansion row by row: in the streaming pipeline, each owning tile's final nuclei grown into cells (cells/expansion.py)
and measured (cells/cell_measure.py), against the final nuclei of the tile rows around them.

    a tile's final nuclei (ids, label image over its read box) + FinalNuclei (rows r - k .. r + k)
        -> expand_tile -> cells (labels over the cells' box, the nuclei's ids) + the expanded cells.csv columns

pipeline.NucleusEmitter drives it: the cells of grid row r are drawn once the nuclei of rows <= r + k are final
(k = expansion.context_rows: 1 with the shipped tiling), and only the nuclei of the rows still needed are kept, so
memory holds 2k + 1 tile rows of nuclei (cropped masks) whatever the slide's size. Every cell is drawn against all
the final nuclei that could reach it, so it is the cell the whole slide expanded in one piece would give it.
Coordinates are (row, col) level-0 px, boxes half-open (geometry/tiling.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..geometry import Box, Instances
from ..tissue import TissueMask
from .cell_measure import expanded_columns, measure_expanded
from .expansion import context_margin_px, expand_owned, grow_box
from .nucleus_measure import label_tile


@dataclass(frozen=True)
class CellExpansion:
    """What drawing and measuring a slide's cells needs, decided once per slide (planning.SlidePlan.cell_expansion).

    distance_px: D in level-0 px (> 0); rows: how many tile rows on each side a row's cells depend on
    (expansion.context_rows); tissue: cells stay on it (None: everywhere); mpp: µm/px or None; channel_names:
    the cells.csv channel names; stains: hematoxylin and DAB optical densities too (brightfield RGB), taken against
    the light level `stain_white` (cell_measure.stain_white; None: the pixel type's full scale).
    """

    distance_px: float
    rows: int
    slide_shape: tuple[int, int]
    tissue: TissueMask | None
    mpp: float | None
    channel_names: list[str]
    stains: bool
    stain_white: float | None = None

    @property
    def columns(self) -> dict[str, str]:
        """The columns cells.csv gains (cells.expanded_columns)."""
        return expanded_columns(self.channel_names, self.stains)


class FinalNuclei:
    """The final nuclei of the tile rows still needed as context, with their ids (pipeline.NucleusEmitter adds
    each owning tile's as they are numbered and forgets whole rows once no cell left to draw can reach them)."""

    def __init__(self) -> None:
        self._parts: list[tuple[int, np.ndarray, Instances, Box]] = []   # (grid row, ids, nuclei, their extent)

    def add(self, grid_row: int, ids: np.ndarray, nuclei: Instances) -> None:
        if len(nuclei):
            b = nuclei.boxes
            extent = Box(int(b[:, 0].min()), int(b[:, 1].min()), int(b[:, 2].max()), int(b[:, 3].max()))
            self._parts.append((grid_row, np.asarray(ids, np.int64), nuclei, extent))

    def forget(self, through_row: int) -> None:
        """Drop the nuclei of grid rows <= through_row."""
        self._parts = [p for p in self._parts if p[0] > through_row]

    @property
    def rows(self) -> set[int]:
        """The grid rows whose nuclei are held."""
        return {p[0] for p in self._parts}

    def labels(self, box: Box) -> np.ndarray:
        """uint32 labels over `box`: every held nucleus that reaches into it, painted as its id (0 elsewhere)."""
        ids, parts = [], []
        for _, part_ids, nuclei, extent in self._parts:
            if extent.row0 < box.row1 and extent.row1 > box.row0 and extent.col0 < box.col1 and extent.col1 > box.col0:
                b = nuclei.boxes
                near = np.flatnonzero((b[:, 0] < box.row1) & (b[:, 2] > box.row0)
                                      & (b[:, 1] < box.col1) & (b[:, 3] > box.col0))
                ids.append(part_ids[near])
                parts.append(nuclei.take(near))
        near_nuclei = Instances.concat(parts)
        if not len(near_nuclei):
            return np.zeros(box.shape, np.uint32)
        b = near_nuclei.boxes       # painted whole on a canvas holding them all, then cut to the box
        canvas = Box(min(box.row0, int(b[:, 0].min())), min(box.col0, int(b[:, 1].min())),
                     max(box.row1, int(b[:, 2].max())), max(box.col1, int(b[:, 3].max())))
        return label_tile(near_nuclei, np.concatenate(ids), canvas)[box.slices(canvas[:2])]


def expand_tile(expansion: CellExpansion, nuclei: FinalNuclei, ids: np.ndarray, owned: Instances,
                owned_labels: np.ndarray, read: Box, pixels: np.ndarray,
                read_region: Callable[[Box], np.ndarray]) -> tuple[np.ndarray, Box, dict[str, np.ndarray]]:
    """The cells of one tile's final nuclei and their cells.csv columns.

    ids, owned: the tile's final nuclei (their ids, in cells.csv order); owned_labels: measure.label_tile of them
    over the tile's read box; pixels: the slide's pixels of the read box; read_region(box): the slide's pixels of
    any box (for cells reaching beyond the read box). `nuclei` must hold every final nucleus within 2 D of them.
    Returns (cells, cells_box, columns): uint32 cell labels over cells_box (the nuclei's bounding box grown by D,
    clipped to the slide) and expansion.columns for `ids`, in that order.
    """
    b = owned.boxes
    owned_box = Box(int(b[:, 0].min()), int(b[:, 1].min()), int(b[:, 2].max()), int(b[:, 3].max()))
    margin = context_margin_px(expansion.distance_px)
    context_box = grow_box(owned_box, 2 * margin, expansion.slide_shape)
    context = nuclei.labels(context_box)
    cells, cells_box = expand_owned(owned_labels[owned_box.slices(read[:2])], owned_box, context, context_box,
                                    expansion.distance_px, expansion.slide_shape, expansion.tissue)
    cell_pixels = pixels[cells_box.slices(read[:2])] if read.contains(cells_box) else read_region(cells_box)
    columns = measure_expanded(ids, cells, context[cells_box.slices(context_box[:2])], cell_pixels, expansion.mpp,
                               expansion.channel_names, expansion.stains, expansion.stain_white)
    return cells.astype(np.uint32, copy=False), cells_box, columns
