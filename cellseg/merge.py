"""Seams: turn per-tile detections into one set of slide cells — none lost, none counted twice.

The rule (DESIGN.md §4), applied while tiles stream in row-major order:
1. Ownership: a tile keeps only cells whose mask centroid lies in its core grown by a seam band
   (halo / 4). Neighbouring tiles predict slightly different masks, so with the bare core a cell on a seam
   could have its centroid pushed out of both cores and be lost; the band makes both tiles keep it and
   step 2 removes the double. A partial view (a cell smaller than the halo cut by an inner read edge) has
   its centroid deeper in the halo than the band, so it is dropped there and its owner sees it whole. A
   cell larger than the halo can reach the read edge with its centroid in the core: it is kept, clipped,
   marked `cut`, and loses any dedupe against an uncut view of itself.
2. Seam-band dedupe: any two cells whose masks overlap by more than
   `dedupe_overlap` (intersection over the smaller mask) are one cell: the uncut one wins, then the higher
   score. The same test removes Mask R-CNN's near-duplicate masks inside a tile.
3. Painter's order: pixels still claimed by two kept cells go to the higher score.

Cells kept by a tile can only touch cells of the 8 neighbouring tiles (a cell reaches at most one halo
beyond its core and 2 * halo <= tile), so once grid row r + 1 is in, row r is final. Memory therefore
holds three tile rows of cells, never the slide.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .detect import TileDetections
from .tiling import TileSpec

log = logging.getLogger(__name__)


@dataclass
class Instances:
    """N cells in slide coordinates (level-0 px), masks cropped to their boxes.

    boxes: (N, 4) int64 half-open (row0, col0, row1, col1); masks[i] bool of shape boxes[i] size;
    scores: (N,) float32; class_ids: (N,) int64 >= 1; tile_index: (N,) int64 owning tile;
    cut: (N,) bool, True where the cell was larger than the halo and clipped at a read edge.
    """

    boxes: np.ndarray
    masks: list[np.ndarray]
    scores: np.ndarray
    class_ids: np.ndarray
    tile_index: np.ndarray
    cut: np.ndarray

    def __len__(self) -> int:
        return len(self.masks)

    @classmethod
    def empty(cls) -> "Instances":
        return cls(np.zeros((0, 4), np.int64), [], np.zeros(0, np.float32), np.zeros(0, np.int64),
                   np.zeros(0, np.int64), np.zeros(0, bool))

    def take(self, index: np.ndarray) -> "Instances":
        index = np.asarray(index, np.int64)
        return Instances(self.boxes[index], [self.masks[i] for i in index], self.scores[index],
                         self.class_ids[index], self.tile_index[index], self.cut[index])

    @staticmethod
    def concat(parts: list["Instances"]) -> "Instances":
        parts = [p for p in parts if len(p)]
        if not parts:
            return Instances.empty()
        return Instances(np.concatenate([p.boxes for p in parts]), [m for p in parts for m in p.masks],
                         np.concatenate([p.scores for p in parts]), np.concatenate([p.class_ids for p in parts]),
                         np.concatenate([p.tile_index for p in parts]), np.concatenate([p.cut for p in parts]))


def mask_centroids(boxes: np.ndarray, masks: list[np.ndarray]) -> np.ndarray:
    """(N, 2) float centroid (row, col) of each mask in the boxes' frame."""
    out = np.zeros((len(masks), 2))
    for i, m in enumerate(masks):
        rows, cols = np.nonzero(m)
        out[i] = boxes[i, 0] + rows.mean(), boxes[i, 1] + cols.mean()
    return out


def seam_band_px(halo_px: int) -> int:
    """How far beyond its core a tile still keeps cells (the doubles there are deduped)."""
    return halo_px // 4


def owned_instances(det: TileDetections, tile: TileSpec, slide_shape: tuple[int, int],
                    min_area_px: int = 0, band_px: int = 0) -> Instances:
    """The cells of one tile's detections that this tile keeps (centroid in core + band), in slide coordinates."""
    if len(det) == 0:
        return Instances.empty()
    boxes = det.boxes + np.array([tile.read.row0, tile.read.col0] * 2)
    areas = np.array([m.sum() for m in det.masks])
    centroids = mask_centroids(boxes, det.masks)
    core = tile.core
    b = band_px
    owned = ((centroids[:, 0] >= core.row0 - b) & (centroids[:, 0] < core.row1 + b)
             & (centroids[:, 1] >= core.col0 - b) & (centroids[:, 1] < core.col1 + b)
             & (areas >= max(min_area_px, 1)))
    height, width = slide_shape
    read = tile.read
    # A read edge is "inner" when the slide goes on beyond it; touching the slide border is no cut.
    touches = (((boxes[:, 0] <= read.row0) & (read.row0 > 0)) | ((boxes[:, 2] >= read.row1) & (read.row1 < height))
               | ((boxes[:, 1] <= read.col0) & (read.col0 > 0)) | ((boxes[:, 3] >= read.col1) & (read.col1 < width)))
    keep = np.flatnonzero(owned)
    return Instances(boxes[keep], [det.masks[i] for i in keep], det.scores[keep].astype(np.float32),
                     det.class_ids[keep], np.full(len(keep), tile.index, np.int64), touches[keep])


def _overlap(box_a, mask_a, box_b, mask_b) -> int:
    """Number of pixels two box-cropped masks share."""
    r0, c0 = max(box_a[0], box_b[0]), max(box_a[1], box_b[1])
    r1, c1 = min(box_a[2], box_b[2]), min(box_a[3], box_b[3])
    if r0 >= r1 or c0 >= c1:
        return 0
    a = mask_a[r0 - box_a[0]:r1 - box_a[0], c0 - box_a[1]:c1 - box_a[1]]
    b = mask_b[r0 - box_b[0]:r1 - box_b[0], c0 - box_b[1]:c1 - box_b[1]]
    return int(np.count_nonzero(a & b))


def _intersecting(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    return np.flatnonzero((boxes[:, 0] < box[2]) & (boxes[:, 2] > box[0])
                          & (boxes[:, 1] < box[3]) & (boxes[:, 3] > box[1]))


@dataclass
class SeamStats:
    duplicates_removed: int = 0       # cells dropped because a neighbour (or the same tile) had them already
    cells_cut: int = 0                # kept cells larger than the halo, clipped at a read edge
    pixels_reassigned: int = 0        # overlapping pixels given to the higher-score cell
    cells_emptied: int = 0            # cells left with fewer than min_area_px pixels after that

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Pool:
    """Alive candidate cells of recent tiles, with what the seam tests need precomputed."""

    cells: Instances = field(default_factory=Instances.empty)
    grid_row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    areas: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    priority: np.ndarray = field(default_factory=lambda: np.zeros(0))
    alive: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    emitted: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))   # handed out, kept as a rival


class SeamMerger:
    """Streams tiles in row-major order; hands back each grid row's final, disjoint cells."""

    def __init__(self, dedupe_overlap: float = 0.5, min_area_px: int = 1):
        self.dedupe_overlap = dedupe_overlap
        self.min_area_px = max(min_area_px, 1)
        self.stats = SeamStats()
        self._pool = _Pool()
        self._serial = 0   # ties in score are broken by arrival order, so results are deterministic

    def add_tile(self, tile: TileSpec, cells: Instances) -> None:
        """Dedupe a tile's owned cells against everything alive, then add the survivors."""
        pool = self._pool
        areas = np.array([m.sum() for m in cells.masks], np.int64)
        # Uncut cells beat cut ones; then score; then earlier arrival.
        priority = (~cells.cut).astype(float) * 2 + cells.scores - 1e-9 * (self._serial + np.arange(len(cells)))
        self._serial += len(cells)
        # Only pool cells inside this tile's read box can touch its cells: test against those alone.
        near = _intersecting(pool.cells.boxes, np.asarray(tile.read))
        near = near[pool.alive[near]]
        boxes = np.concatenate([pool.cells.boxes[near], cells.boxes])
        masks = [pool.cells.masks[j] for j in near] + cells.masks
        local_areas = np.concatenate([pool.areas[near], areas])
        local_priority = np.concatenate([pool.priority[near], priority])
        alive = np.concatenate([np.ones(len(near), bool), np.zeros(len(cells), bool)])
        for i in np.argsort(-priority, kind="stable"):
            j_new = len(near) + i
            duplicate = False
            for j in _intersecting(boxes, boxes[j_new]):
                if not alive[j] or j == j_new:
                    continue
                shared = _overlap(boxes[j_new], masks[j_new], boxes[j], masks[j])
                if shared > self.dedupe_overlap * min(local_areas[j_new], local_areas[j]):
                    if local_priority[j] >= local_priority[j_new]:
                        duplicate = True
                        break
                    alive[j] = False            # the new cell is the better view of it
                    self.stats.duplicates_removed += 1
            if duplicate:
                self.stats.duplicates_removed += 1
            else:
                alive[j_new] = True
        pool.alive[near] = alive[:len(near)]
        pool.cells = Instances.concat([pool.cells, cells])
        pool.grid_row = np.concatenate([pool.grid_row, np.full(len(cells), tile.grid_row, np.int64)])
        pool.areas = np.concatenate([pool.areas, areas])
        pool.priority = np.concatenate([pool.priority, priority])
        pool.alive = np.concatenate([pool.alive, alive[len(near):]])
        pool.emitted = np.concatenate([pool.emitted, np.zeros(len(cells), bool)])

    def pop_final(self, through_grid_row: int | None = None) -> Instances:
        """Final cells of grid rows <= through_grid_row (None: all), overlaps resolved, sorted by tile.

        Call with r - 1 once every tile of grid row r has been added, and with None at the end.
        """
        pool = self._pool
        last = np.iinfo(np.int64).max if through_grid_row is None else through_grid_row
        final = np.flatnonzero(pool.alive & ~pool.emitted & (pool.grid_row <= last))
        pool.emitted[final] = True
        final = final[np.lexsort((pool.cells.boxes[final, 1], pool.cells.boxes[final, 0],
                                  pool.cells.tile_index[final]))]
        out = pool.cells.take(final)
        keep = np.ones(len(final), bool)
        alive_idx = np.flatnonzero(pool.alive)
        for k, i in enumerate(final):
            box = pool.cells.boxes[i]
            rivals = alive_idx[_intersecting(pool.cells.boxes[alive_idx], box)]
            rivals = rivals[pool.priority[rivals] > pool.priority[i]]
            mask = pool.cells.masks[i]
            if len(rivals):
                mask = mask.copy()
                for j in rivals:
                    rbox = pool.cells.boxes[j]
                    r0, c0 = max(box[0], rbox[0]), max(box[1], rbox[1])
                    r1, c1 = min(box[2], rbox[2]), min(box[3], rbox[3])
                    if r0 < r1 and c0 < c1:
                        mine = mask[r0 - box[0]:r1 - box[0], c0 - box[1]:c1 - box[1]]
                        theirs = pool.cells.masks[j][r0 - rbox[0]:r1 - rbox[0], c0 - rbox[1]:c1 - rbox[1]]
                        self.stats.pixels_reassigned += int(np.count_nonzero(mine & theirs))
                        mine &= ~theirs
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            if rows.size == 0 or np.count_nonzero(mask) < self.min_area_px:
                keep[k] = False
                self.stats.cells_emptied += 1
                continue
            out.masks[k] = np.ascontiguousarray(mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
            out.boxes[k] = (box[0] + rows[0], box[1] + cols[0], box[0] + rows[-1] + 1, box[1] + cols[-1] + 1)
        out = out.take(np.flatnonzero(keep))
        self.stats.cells_cut += int(out.cut.sum())
        # Rows before the finalised ones can no longer touch anything still to come: forget them.
        self._forget(last - 1)
        return out

    def _forget(self, through_grid_row: int) -> None:
        pool = self._pool
        keep = np.flatnonzero(pool.grid_row > through_grid_row)
        if len(keep) == len(pool.grid_row):
            return
        pool.cells = pool.cells.take(keep)
        pool.grid_row, pool.areas = pool.grid_row[keep], pool.areas[keep]
        pool.priority, pool.alive, pool.emitted = pool.priority[keep], pool.alive[keep], pool.emitted[keep]
