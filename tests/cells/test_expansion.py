"""Cells by expansion (cellseg.cells.expansion): nearest-nucleus partition limited to D px and to tissue, ties broken by
position only, and tiles that give exactly the cells of the slide expanded in one piece."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cellseg.cells import (
    context_margin_px,
    context_rows,
    expand_nuclei,
    expand_owned,
    expansion_distance_px,
    grow_box,
    tissue_in,
)
from cellseg.errors import CellsegError, ParameterError
from cellseg.geometry import Box, plan_tiles
from cellseg.tissue.finder import TissueMask

from ..helpers import random_nuclei


def brute_force_cells(nuclei: np.ndarray, distance_px: float) -> np.ndarray:
    """The documented rule by exhaustive search: each pixel takes the nucleus of its nearest nucleus pixel within
    D, ties to the nucleus pixel of the smallest column, then row."""
    height, width = nuclei.shape
    fr, fc = np.nonzero(nuclei)
    rows, cols = np.indices(nuclei.shape)
    d2 = (rows.reshape(-1, 1) - fr) ** 2 + (cols.reshape(-1, 1) - fc) ** 2          # (pixels, nucleus pixels)
    key = d2 * (width * height) + fc * height + fr                                 # distance, then column, row
    best = np.argmin(key, axis=1)
    out = nuclei[fr[best], fc[best]].reshape(nuclei.shape)
    out[d2[np.arange(d2.shape[0]), best].reshape(nuclei.shape) > distance_px ** 2] = 0
    return out


# --- the partition --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("distance_px", [1.0, 3.5, 7.0, 12.0])
def test_expansion_is_the_nearest_nucleus_within_d_with_ties_by_position(distance_px):
    """Pins scipy's tie rule (expand_labels calls it undefined): tiles are exact only because it holds."""
    nuclei = random_nuclei((40, 50), 30, seed=int(distance_px * 10), max_radius=3)
    np.testing.assert_array_equal(expand_nuclei(nuclei, distance_px), brute_force_cells(nuclei, distance_px))


def test_expansion_stops_at_the_midline_between_two_nuclei():
    rows, cols = np.indices((41, 52))
    nuclei = np.zeros((41, 52), np.int32)
    nuclei[(rows - 20) ** 2 + (cols - 15) ** 2 <= 16] = 7       # left, centre column 15
    nuclei[(rows - 20) ** 2 + (cols - 36) ** 2 <= 16] = 3       # right, centre column 36: midline at 25.5
    cells = expand_nuclei(nuclei, 30.0)
    d_left = ndimage.distance_transform_edt(nuclei != 7)
    d_right = ndimage.distance_transform_edt(nuclei != 3)
    assert (cells[d_left < d_right] == 7).all() and (cells[d_right < d_left] == 3).all()
    assert (cells[d_left == d_right] == 7).all()               # a tie goes to the nucleus further left
    assert (cells[:, :26] == 7).all() and (cells[:, 26:] == 3).all()   # here, exactly the midline


def test_expansion_never_exceeds_d_never_enters_another_nucleus_and_misses_nothing():
    nuclei = random_nuclei((60, 70), 25, seed=3, max_radius=4)
    distance = 5.0
    cells = expand_nuclei(nuclei, distance)
    np.testing.assert_array_equal(cells[nuclei > 0], nuclei[nuclei > 0])
    for cid in np.unique(nuclei[nuclei > 0]):
        own = ndimage.distance_transform_edt(nuclei != cid)
        assert own[cells == cid].max() <= distance
    nearest = ndimage.distance_transform_edt(nuclei == 0)
    np.testing.assert_array_equal(cells > 0, nearest <= distance)


def test_expansion_never_enters_background_but_keeps_nuclei_there():
    rows, cols = np.indices((30, 40))
    nuclei = np.zeros((30, 40), np.int32)
    nuclei[(rows - 15) ** 2 + (cols - 18) ** 2 <= 9] = 5        # straddles the tissue edge at column 20
    nuclei[(rows - 5) ** 2 + (cols - 30) ** 2 <= 4] = 9         # wholly on background
    tissue = cols < 20
    cells = expand_nuclei(nuclei, 6.0, tissue)
    assert not ((cells > 0) & ~tissue & (nuclei == 0)).any()
    np.testing.assert_array_equal(cells[nuclei > 0], nuclei[nuclei > 0])
    assert (cells == 5).sum() > (nuclei == 5).sum()             # it did grow, inside the tissue
    assert (cells == 9).sum() == (nuclei == 9).sum()


def test_tissue_from_an_array_a_function_or_a_tissue_mask():
    box = Box(8, 4, 24, 36)
    mask = TissueMask(np.array([[True, False], [True, True]]), 16.0, 20.0, "test")
    from_mask = tissue_in(mask, box)
    rows, cols = np.arange(8, 24)[:, None], np.arange(4, 36)[None, :]
    np.testing.assert_array_equal(from_mask, ~((rows < 16) & (cols >= 20)))
    np.testing.assert_array_equal(tissue_in(mask.at, box), from_mask)
    np.testing.assert_array_equal(tissue_in(from_mask, box), from_mask)
    assert tissue_in(mask, Box(16, 0, 32, 40)) is None          # all tissue: nothing to mask
    assert tissue_in(None, box) is None
    with pytest.raises(ValueError, match="shape"):
        tissue_in(np.ones((3, 3), bool), box)


def test_zero_expansion_and_no_nuclei_give_the_nuclei_back():
    nuclei = random_nuclei((20, 20), 5, seed=1)
    np.testing.assert_array_equal(expand_nuclei(nuclei, 0.0), nuclei)
    empty = np.zeros((20, 20), np.uint32)
    np.testing.assert_array_equal(expand_nuclei(empty, 5.0), empty)
    with pytest.raises(ParameterError, match="got -1"):
        expand_nuclei(nuclei, -1.0)


# --- seams ------------------------------------------------------------------------------------------------------

SLIDE = (200, 230)
HALO = 12                    # twice the largest nucleus radius: an owned nucleus lies inside its read box


def tile_by_tile(nuclei: np.ndarray, tile_px: int, distance: float, tissue, tight: bool) -> np.ndarray:
    """The slide's cells assembled from expand_owned per tile, as the pipeline will run it: a tile owns the
    nuclei whose centroid lies in its core; its context holds only the nuclei owned by its 3 x 3 neighbourhood
    (all that is final a tile row later), numbered afresh except its own. The owned nuclei come over the read
    box, or with `tight` over their own bounding box, so that they touch its edges and every margin counts."""
    assert context_rows(distance, tile_px, HALO) == 1     # the 3 x 3 neighbourhood holds every nucleus needed
    tiles = plan_tiles(*SLIDE, tile_px, HALO)
    ids = np.unique(nuclei[nuclei > 0])
    centroid = ndimage.center_of_mass(np.ones(SLIDE), nuclei, ids)
    owner = np.array([next(t.index for t in tiles if t.core.row0 <= r < t.core.row1 and t.core.col0 <= c < t.core.col1)
                      for r, c in centroid])
    grid = {(t.grid_row, t.grid_col): t for t in tiles}
    assembled = np.zeros(SLIDE, nuclei.dtype)
    margin = context_margin_px(distance)
    for t in tiles:
        mine = ids[owner == t.index]
        where = np.isin(nuclei, mine)
        box = t.read
        if tight and where.any():
            rows, cols = np.nonzero(where)
            box = Box(rows.min(), cols.min(), rows.max() + 1, cols.max() + 1)
        owned = np.where(where, nuclei, 0)[box.slices()]
        assert where.sum() == (owned > 0).sum() and t.read.contains(box)   # inside the read box
        near = [grid[(t.grid_row + dr, t.grid_col + dc)].index for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                if (t.grid_row + dr, t.grid_col + dc) in grid]
        context_box = grow_box(box, 2 * margin, SLIDE)
        window = nuclei[context_box.slices()]
        final = np.isin(window, ids[np.isin(owner, near)])
        provisional = np.where(np.isin(window, mine), window, window + 100_000)  # others' ids do not matter
        context = np.where(final, provisional, 0)
        cells, cells_box = expand_owned(owned, box, context, context_box, distance, SLIDE, tissue)
        region = assembled[cells_box.slices()]
        assert not (region[cells > 0]).any()                    # tiles never draw the same pixel twice
        region[cells > 0] = cells[cells > 0]
    return assembled


@pytest.mark.parametrize("distance", [6.0, 4.5])
def test_tiles_give_the_cells_of_the_slide_expanded_in_one_piece(distance):
    nuclei = random_nuclei(SLIDE, 160, seed=11)
    mask = np.random.default_rng(5).random((25, 23)) < 0.8      # coarse tissue: 8 x 10 px per mask pixel
    tissue = TissueMask(mask, 8.0, 10.0, "test")
    whole = expand_nuclei(nuclei, distance, tissue_in(tissue, Box(0, 0, *SLIDE)))
    # The data has ties that matter: mirrored, the rule picks other nuclei for some pixels.
    assert (np.fliplr(expand_nuclei(np.fliplr(nuclei), distance, np.fliplr(tissue_in(tissue, Box(0, 0, *SLIDE)))))
            != whole).any()
    assert ((whole > 0) & (nuclei == 0)).sum() > 0.2 * SLIDE[0] * SLIDE[1]   # cells reach well beyond their nuclei
    for tile_px in (48, 80):
        for tight in (False, True):
            np.testing.assert_array_equal(tile_by_tile(nuclei, tile_px, distance, tissue, tight), whole)


def test_context_of_twice_the_margin_is_needed_and_enough():
    """Owned nucleus at the read box's left edge (column 20), D = 4: its cell may reach column 16, which is as far
    from a neighbour at column 12 = 20 - 2 * 4 as from it; the tie goes to the neighbour (further left). A context
    that stops one pixel short of that neighbour gives the owned cell a pixel that is not its own."""
    nuclei = np.zeros((9, 30), np.int32)
    nuclei[4, 20] = 1
    nuclei[4, 12] = 2
    whole = expand_nuclei(nuclei, 4.0)
    assert whole[4, 16] == 2
    np.testing.assert_array_equal(expand_nuclei(nuclei[:, 12:], 4.0)[:, 4:], whole[:, 16:])
    assert expand_nuclei(nuclei[:, 13:], 4.0)[4, 3] == 1


def test_expand_owned_refuses_too_little_context():
    nuclei = random_nuclei((60, 60), 10, seed=2)
    read = Box(10, 10, 40, 40)
    with pytest.raises(ValueError, match="grown by twice"):
        expand_owned(nuclei[read.slices()], read, nuclei[5:45, 5:45], Box(5, 5, 45, 45), 4.0, (60, 60))
    wrong_ids = nuclei + (nuclei > 0)
    with pytest.raises(ValueError, match="same ids"):
        expand_owned(nuclei[read.slices()], read, wrong_ids, Box(0, 0, 60, 60), 4.0, (60, 60))


def test_expand_owned_at_the_slide_edge_needs_no_context_beyond_it():
    nuclei = random_nuclei((50, 50), 30, seed=4, max_radius=3)
    read = Box(0, 0, 30, 30)
    mine = np.setdiff1d(nuclei[:30, :30], np.concatenate([nuclei[30:].ravel(), nuclei[:, 30:].ravel(), [0]]))
    owned = np.where(np.isin(nuclei[read.slices()], mine), nuclei[read.slices()], 0)
    cells, cells_box = expand_owned(owned, read, nuclei[:40, :40], Box(0, 0, 40, 40), 5.0, (50, 50))
    assert cells_box == Box(0, 0, 35, 35)
    whole = expand_nuclei(nuclei, 5.0)[cells_box.slices()]
    assert len(mine) >= 3
    np.testing.assert_array_equal(cells, np.where(np.isin(whole, mine), whole, 0))


# --- distance and tiling ----------------------------------------------------------------------------------------

def test_distance_from_um_needs_a_pixel_size_and_px_does_not():
    assert expansion_distance_px(5.0, None, 0.25) == 20.0
    assert expansion_distance_px(0.0, None, None) == 0.0
    assert expansion_distance_px(0.0, 12.0, None) == 12.0
    with pytest.raises(CellsegError, match="pixel size.*--cell-expansion-px"):
        expansion_distance_px(5.0, None, None)
    with pytest.raises(ParameterError, match="both"):
        expansion_distance_px(5.0, 10.0, 0.5)
    with pytest.raises(ParameterError, match="got -2"):
        expansion_distance_px(-2.0, None, 0.5)


def test_context_margin_and_rows():
    assert context_margin_px(4.99) == 4 and context_margin_px(5.0) == 5
    assert context_rows(0.0, 512, 64) == 1
    assert context_rows(192.0, 512, 64) == 1                    # 2 * (64 + 192) = 512: the next row is enough
    assert context_rows(193.0, 512, 64) == 2
    assert context_rows(20.0, 64, 16) == 2                      # small tiles wait for more rows
    assert context_rows(2000.0, 512, 64) == 9
    with pytest.raises(ParameterError, match="positive tile size"):
        context_rows(5.0, 0, 0)
