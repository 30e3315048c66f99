"""Cells from nuclei: each nucleus grown outwards by at most D px, stopping where it meets a neighbour's territory.

    final nuclei (label image) -> expand_nuclei -> cells (label image, the same ids)

A background pixel joins the nucleus nearest to it (Euclidean distance to the nearest nucleus pixel) when that
distance is <= D and, where a tissue mask is given, the pixel is tissue: a nearest-nucleus (Voronoi) partition
limited by distance, as QuPath's cell expansion draws it. Nucleus pixels always stay with their nucleus, so a
cell never enters another nucleus. This is skimage.segmentation.expand_labels: one exact Euclidean feature
transform of scipy's, ~40 ms for a 560 px square of dense nuclei here. A distance-limited watershed (flooding the
distance to the nuclei from them) was 2.8x slower on the same square and not even the nearest-nucleus partition:
its flood, pixel to neighbouring pixel, gave 2.5 % of the pixels to another nucleus than the nearest.

Ties (a pixel at the same distance from two nuclei) go to the nucleus whose nearest pixel comes first by column,
then by row. expand_labels calls its tie rule undefined; this one is what scipy's feature transform does (a pass
down each column, then one along each row, each keeping the earlier of two equally near candidates), and
tests/cells/test_expansion.py checks it against a brute-force search, so a scipy that changed it would be caught. It
depends on where the nuclei lie relative to each other only, never on their ids or on where the image starts: a
region cut out of a slide gets the slide's cells wherever every nucleus within D of its pixels is inside it.
That is what makes tiles exact (expand_owned).

Units: D in px of level 0 (expansion_distance_px converts µm with the pixel size); coordinates (row, col),
boxes half-open, as in geometry/tiling.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..errors import CellsegError, ParameterError
from ..geometry import Box
from ..tissue import TissueMask

# Tissue for a region: a bool array over the region, TissueMask (level-0 px), or a function of level-0 pixel
# rows and columns giving bool (len(rows), len(cols)), as TissueMask.at does. None: everything is tissue.
TissueLike = np.ndarray | TissueMask | Callable[[np.ndarray, np.ndarray], np.ndarray] | None


def expansion_distance_px(cell_expansion_um: float = 0.0, cell_expansion_px: float | None = None,
                          mpp: float | None = None) -> float:
    """D in px from the protocol's cell_expansion_um (needs the pixel size mpp, µm/px) or cell_expansion_px.

    0 means nuclei only. Give one of the two: both set is an error, as is µm without a pixel size.
    """
    um = float(cell_expansion_um or 0.0)
    if um < 0 or (cell_expansion_px is not None and cell_expansion_px < 0):
        raise ParameterError(f"expected a cell expansion >= 0, got {um if um < 0 else cell_expansion_px}")
    if cell_expansion_px is not None:
        if um > 0:
            raise ParameterError(f"expected the cell expansion in µm or in px, got both ({um:g} µm and "
                                 f"{cell_expansion_px:g} px)")
        return float(cell_expansion_px)
    if um == 0:
        return 0.0
    if not mpp:
        raise CellsegError(f"a cell expansion of {um:g} µm needs the image's pixel size, and it has none; "
                           f"pass --mpp, or give the expansion in px (--cell-expansion-px)")
    return um / mpp


def context_margin_px(distance_px: float) -> int:
    """How far (px, per side) a pixel's cell label looks: every nucleus pixel it could join is within it."""
    if distance_px < 0:
        raise ParameterError(f"expected a cell expansion >= 0 px, got {distance_px:g}")
    return math.floor(distance_px)


def context_rows(distance_px: float, tile_px: int, halo_px: int) -> int:
    """How many tile rows k on each side the cells of one grid row depend on: the cells of row r are final once
    rows <= r + k are, and are drawn against the nuclei of rows r - k .. r + k (k >= 1).

    A tile keeps nuclei reaching up to halo beyond its core; their cells reach m = context_margin_px(D) further
    and are decided by the nuclei up to m beyond that (expand_owned). A nucleus of row r + q reaches at most halo
    above its own core, so it cannot matter once (q - 1) * tile >= 2 * (halo + m); the same holds for rows above.
    With the shipped tiling (512 px tiles, 64 px halo) k is 1 up to D = 192 px.
    """
    if tile_px <= 0 or halo_px < 0:
        raise ParameterError(f"expected a positive tile size and a halo >= 0, got {tile_px} and {halo_px} px")
    margin = context_margin_px(distance_px)
    return max(1, math.ceil(2 * (halo_px + margin) / tile_px))


def expand_nuclei(nuclei: np.ndarray, distance_px: float, tissue: np.ndarray | None = None) -> np.ndarray:
    """Cells of a nucleus label image: (h, w) integer labels, 0 = background, ids kept.

    tissue: bool (h, w) or None; background pixels outside it stay 0 (nucleus pixels stay theirs).
    Pixels within context_margin_px(D) of the image edge may miss nuclei beyond it: see expand_owned.
    """
    from skimage.segmentation import expand_labels
    nuclei = np.asarray(nuclei)
    if nuclei.ndim != 2:
        raise ValueError(f"expected a 2-D label image, got shape {nuclei.shape}")
    if tissue is not None and np.shape(tissue) != nuclei.shape:
        raise ValueError(f"expected a tissue mask of the labels' shape {nuclei.shape}, got {np.shape(tissue)}")
    if distance_px < 0:
        raise ParameterError(f"expected a cell expansion >= 0 px, got {distance_px:g}")
    if distance_px == 0 or not nuclei.any():
        return nuclei.copy()
    cells = expand_labels(nuclei, distance_px)
    if tissue is not None:
        cells[~np.asarray(tissue, bool) & (nuclei == 0)] = 0
    return cells


def tissue_in(tissue: TissueLike, box: Box) -> np.ndarray | None:
    """Tissue over `box` (level-0 px) as bool (h, w), or None when all of it is tissue (or none is given).

    An array is taken to lie over `box` already.
    """
    if tissue is None:
        return None
    if isinstance(tissue, np.ndarray):
        if tissue.shape != box.shape:
            raise ValueError(f"expected a tissue mask over {box} of shape {box.shape}, got {tissue.shape}")
        return None if tissue.all() else tissue.astype(bool, copy=False)
    rows, cols = np.arange(box.row0, box.row1), np.arange(box.col0, box.col1)
    if isinstance(tissue, TissueMask):
        if tissue.constant(rows, cols):        # the usual tile, inside tissue: no mask to build
            return None
        tissue = tissue.at
    mask = np.asarray(tissue(rows, cols), bool)
    if mask.shape != box.shape:
        raise ValueError(f"expected the tissue function to give shape {box.shape} for {box}, got {mask.shape}")
    return None if mask.all() else mask


def grow_box(box: Box, by_px: int, slide_shape: tuple[int, int]) -> Box:
    """`box` grown by by_px on every side, clipped to the slide."""
    height, width = slide_shape
    return Box(max(box.row0 - by_px, 0), max(box.col0 - by_px, 0),
               min(box.row1 + by_px, height), min(box.col1 + by_px, width))


def expand_owned(owned: np.ndarray, owned_box: Box, nuclei: np.ndarray, nuclei_box: Box, distance_px: float,
                 slide_shape: tuple[int, int], tissue: TissueLike = None) -> tuple[np.ndarray, Box]:
    """The cells of one tile's own nuclei, exactly as expanding the whole slide in one piece would draw them.

    owned: labels (ids > 0) of the nuclei the tile owns, over owned_box: its read box, or any box that holds them
    (their bounding box is smaller, so faster).
    nuclei: the slide's final nuclei over nuclei_box, the owned ones with the same ids; the others may carry any
    distinct ids (ties do not depend on ids), so nuclei not yet numbered can be painted with provisional ones.
    nuclei_box must hold owned_box grown by 2 * m, m = context_margin_px(D), clipped to the slide:
    an owned cell lies within m of its nucleus, so within owned_box grown by m, and each of its pixels is decided
    by the nuclei within m of it. Beyond the slide there are no nuclei, so a clipped box loses nothing.
    tissue: see TissueLike (an array lies over nuclei_box).

    Returns (cells, cells_box): labels over cells_box = owned_box grown by m (clipped to the slide), holding
    the owned ids only.
    """
    owned, nuclei = np.asarray(owned), np.asarray(nuclei)
    if owned.shape != owned_box.shape or nuclei.shape != nuclei_box.shape:
        raise ValueError(f"expected labels of their boxes' shapes, got {owned.shape} over {owned_box} and "
                         f"{nuclei.shape} over {nuclei_box}")
    margin = context_margin_px(distance_px)
    cells_box = grow_box(owned_box, margin, slide_shape)
    needed = grow_box(owned_box, 2 * margin, slide_shape)
    if not nuclei_box.contains(needed):
        raise ValueError(f"expected the nuclei around the tile over {needed} (its box grown by twice the "
                         f"{margin} px expansion), got them over {nuclei_box}")
    on = owned != 0
    if not np.array_equal(nuclei[owned_box.slices(nuclei_box[:2])][on], owned[on]):
        raise ValueError("expected the owned nuclei among the nuclei around them, with the same ids")
    if isinstance(tissue, np.ndarray):
        tissue = tissue[needed.slices(nuclei_box[:2])]
    window = nuclei[needed.slices(nuclei_box[:2])]
    cells = expand_nuclei(window, distance_px, tissue_in(tissue, needed))[cells_box.slices(needed[:2])]
    ids = np.unique(owned[on])
    if len(ids) == 0:
        return np.zeros(cells_box.shape, cells.dtype), cells_box
    cells = np.where(np.isin(cells, ids, kind="table"), cells, 0).astype(cells.dtype, copy=False)
    return cells, cells_box
