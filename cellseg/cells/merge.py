"""Seams: turn per-tile detections into one set of slide nuclei — none lost, none counted twice.

The rule (docs/architecture.md, "Seams"), applied while tiles stream in row-major order:
1. Ownership: a tile keeps only nuclei whose mask centroid lies in its core grown by a seam band
   (halo / 4). Neighbouring tiles predict slightly different masks, so with the bare core a nucleus on a seam
   could have its centroid pushed out of both cores and be lost; the band makes both tiles keep it and
   step 2 removes the double. A partial view (a nucleus smaller than the halo cut by an inner read edge) has
   its centroid deeper in the halo than the band, so it is dropped there and its owner sees it whole. A
   nucleus larger than the halo can reach the read edge with its centroid in the core: it is kept, clipped,
   marked `cut`, and loses any dedupe against an uncut view of itself.
2. Seam-band dedupe: any two nuclei whose masks overlap by more than
   `dedupe_overlap` (intersection over the smaller mask) are one nucleus: the uncut one wins, then the higher
   score. The same test removes Mask R-CNN's near-duplicate masks inside a tile.
3. Painter's order: pixels still claimed by two kept nuclei go to the higher score.

Nuclei kept by a tile can only touch nuclei of the 8 neighbouring tiles (a nucleus reaches at most one halo
beyond its core and 2 * halo <= tile), so once grid row r + 1 is in, row r is final. Memory therefore
holds three tile rows of nuclei, never the slide.

Cost scales with the number of nuclei, not with the slide (performance goal: >= 1e6 nuclei/min with
cells/nucleus_measure.py). Per tile, every overlapping pair of masks is found at once by painting pixel counts on a
canvas the size of the tile; only the few pairs that are duplicates go through the (inherently
sequential) keep-the-better-one loop. The pairs that survive are remembered with their shared pixels,
so pop_final resolves painter's order without searching again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from ..geometry import Box, Instances, MaskRows, TileDetections, TileSpec, owned_box
from ..util import thread_scratch

log = logging.getLogger(__name__)


def centroids_and_areas(boxes: np.ndarray, masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) centroid (row, col) and (N,) pixel count of each mask, exactly as rows.mean() would give."""
    rows = MaskRows.of(boxes, masks)
    count, row_sum, col_sum = rows.sums()
    # The sums of integer offsets are exact in float64, so these means equal numpy's rows.mean() bit for
    # bit (ownership at a core edge must not flip on rounding).
    with np.errstate(invalid="ignore", divide="ignore"):
        centroids = np.stack([rows.boxes[:, 0] + row_sum / count, rows.boxes[:, 1] + col_sum / count], axis=1)
    return centroids.reshape(-1, 2), count.astype(np.int64)


def owned_instances(det: TileDetections, tile: TileSpec, slide_shape: tuple[int, int],
                    min_area_px: int = 0, band_px: int = 0) -> Instances:
    """The nuclei of one tile's detections that this tile keeps (centroid in core + band), in slide coordinates,
    with its below-threshold candidates (boxes only) whose box centre lies in its core: cores partition the slide,
    so each candidate is kept by one tile (two tiles' views of one are not deduped: the count curve is an estimate)."""
    below = owned_candidates(det.below, tile)
    if len(det) == 0:
        return Instances.empty() if not len(below) else replace(Instances.empty(), below=below)
    boxes = np.asarray(det.boxes, np.int64).reshape(-1, 4) + np.array([tile.read.row0, tile.read.col0] * 2)
    centroids, areas = centroids_and_areas(boxes, det.masks)
    own = owned_box(tile, band_px)
    owned = ((centroids[:, 0] >= own.row0) & (centroids[:, 0] < own.row1)
             & (centroids[:, 1] >= own.col0) & (centroids[:, 1] < own.col1)
             & (areas >= max(min_area_px, 1)))
    height, width = slide_shape
    read = tile.read
    # A read edge is "inner" when the slide goes on beyond it; touching the slide border is no cut.
    touches = (((boxes[:, 0] <= read.row0) & (read.row0 > 0)) | ((boxes[:, 2] >= read.row1) & (read.row1 < height))
               | ((boxes[:, 1] <= read.col0) & (read.col0 > 0)) | ((boxes[:, 3] >= read.col1) & (read.col1 < width)))
    keep = np.flatnonzero(owned)
    return Instances(boxes[keep], [det.masks[i] for i in keep], det.scores[keep].astype(np.float32),
                     det.class_ids[keep], np.full(len(keep), tile.index, np.int64), touches[keep], below)


def owned_candidates(below: np.ndarray, tile: TileSpec) -> np.ndarray:
    """A tile's below-threshold candidates ((K, 5) row0, col0, row1, col1, score in its read box) in slide
    coordinates, those whose box centre lies in its core."""
    if not len(below):
        return below
    out = below.copy()
    out[:, [0, 2]] += tile.read.row0
    out[:, [1, 3]] += tile.read.col0
    row, col = (out[:, 0] + out[:, 2]) / 2, (out[:, 1] + out[:, 3]) / 2
    core = tile.core
    return out[(row >= core.row0) & (row < core.row1) & (col >= core.col0) & (col < core.col1)]


def _intersecting(boxes: np.ndarray, box) -> np.ndarray:
    return np.flatnonzero((boxes[:, 0] < box[2]) & (boxes[:, 2] > box[0])
                          & (boxes[:, 1] < box[3]) & (boxes[:, 3] > box[1]))


def overlapping_pairs(mask: np.ndarray, pix: np.ndarray, canvas_size: int, n_masks: int):
    """All pairs of masks sharing pixels: (a, b) with a < b, shared pixel count, and (pair, pixel) lists.

    mask/pix: the mask (0 .. n_masks - 1) and canvas index of each painted pixel, mask-major (so a < b within a
    pixel), as maskrows.MaskRows.pixel_masks and canvas_index give them.
    The few shared pixels are picked first, sorting only those groups them. To pick them, each pixel writes its
    ordinal into this thread's scratch canvas and reads back what is there: a pixel painted by several masks reads
    one of their ordinals, so every painting but that one reads another's, and that one is read by them. (A count
    per canvas pixel, np.bincount, needs a fresh canvas of a few MB a tile: ~0.8 ms of the kernel's new pages on our
    virtual machines, most of this function's time.)
    """
    ordinal = np.arange(len(pix), dtype=np.int32 if len(pix) < 2 ** 31 else np.int64)
    canvas = thread_scratch("overlapping_pairs", canvas_size, ordinal.dtype)
    canvas[pix] = ordinal               # whichever of a pixel's writes lands, it is one of them
    landed = canvas[pix]
    shared = landed != ordinal
    shared[landed[shared]] = True
    pix, mask = pix[shared], mask[shared]
    order = np.argsort(pix, kind="stable")
    pix, mask = pix[order], mask[order]
    a_parts, b_parts, pix_parts = [], [], []
    d = 1
    while d < len(pix):          # a pixel shared by k masks gives k(k-1)/2 pairs; k is 2, rarely 3
        same = np.flatnonzero(pix[d:] == pix[:-d])
        if same.size == 0:
            break
        a_parts.append(mask[same])
        b_parts.append(mask[same + d])
        pix_parts.append(pix[same])
        d += 1
    if not a_parts:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, empty, empty
    key = np.concatenate(a_parts) * n_masks + np.concatenate(b_parts)
    keys, pair_of_pixel, counts = np.unique(key, return_inverse=True, return_counts=True)
    return keys // n_masks, keys % n_masks, counts, pair_of_pixel, np.concatenate(pix_parts)


@dataclass
class SeamStats:
    """What the seam rule did, for summary.json's "seams" (the field names are its keys, kept as users know them)."""

    duplicates_removed: int = 0       # nuclei dropped because a neighbour (or the same tile) had them already
    cells_cut: int = 0                # kept nuclei larger than the halo, clipped at a read edge
    pixels_reassigned: int = 0        # overlapping pixels given to the higher-score nucleus
    cells_emptied: int = 0            # nuclei left with fewer than min_area_px pixels after that

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Chunk:
    """One tile's owned nuclei while they may still change, with what the seam tests need precomputed.

    Nuclei are numbered by arrival (`serial0 + k`) across the whole run. `pairs` are the (earlier, later)
    serials of nuclei of this tile that share pixels with an earlier or same-tile nucleus, both alive when
    this tile was added; `pair_pixels` their shared pixels as (pair index, row, col) in slide px.
    """

    tile: TileSpec
    nuclei: Instances
    extent: Box                       # holds every nucleus's box (the read box, unless a detector overstepped it)
    serial0: int
    areas: np.ndarray
    priority: np.ndarray
    tight: np.ndarray                 # mask's bounding box equals its box
    alive: np.ndarray
    emitted: np.ndarray               # handed out, kept as a rival
    pairs: np.ndarray
    pair_pixels: np.ndarray           # (3, P): pair index, row, col


class SeamMerger:
    """Streams tiles in row-major order; hands back each grid row's final, disjoint nuclei."""

    def __init__(self, dedupe_overlap: float = 0.5, min_area_px: int = 1):
        self.dedupe_overlap = dedupe_overlap
        self.min_area_px = max(min_area_px, 1)
        self.stats = SeamStats()
        self._pool: list[_Chunk] = []         # in arrival order
        self._serial = 0   # ties in score are broken by arrival order, so results are deterministic

    def add_tile(self, tile: TileSpec, nuclei: Instances) -> None:
        """Dedupe a tile's owned nuclei against everything alive, then add the survivors."""
        n = len(nuclei)
        if n == 0:
            return
        serial0 = self._serial
        self._serial += n
        # Uncut nuclei beat cut ones; then score; then earlier arrival.
        priority = (~nuclei.cut).astype(float) * 2 + nuclei.scores - 1e-9 * (serial0 + np.arange(n))
        # Only alive pool nuclei inside this tile's read box can touch its nuclei: test against those alone.
        # Nuclei of a tile lie inside its read box, so only tiles whose read boxes meet this one can hold any.
        read = np.asarray(tile.read)
        near_parts = []
        for chunk in self._pool:
            e = chunk.extent
            if not (e.row0 < read[2] and e.row1 > read[0] and e.col0 < read[3] and e.col1 > read[1]):
                continue
            idx = _intersecting(chunk.nuclei.boxes, read)
            near_parts.append((chunk, idx[chunk.alive[idx]]))
        n_near = sum(len(idx) for _, idx in near_parts)
        boxes = np.concatenate([c.nuclei.boxes[i] for c, i in near_parts] + [nuclei.boxes])
        rows = MaskRows.of(boxes, [c.nuclei.masks[j] for c, i in near_parts for j in i] + nuclei.masks)
        counts = rows.areas()
        # One canvas covers the read box and every nucleus involved, so no pixel needs clipping.
        f0 = np.minimum(read[:2], boxes[:, :2].min(0))
        f1 = np.maximum(read[2:], boxes[:, 2:].max(0))
        fw = f1[1] - f0[1]
        a, b, shared, pair_of_pixel, pix = overlapping_pairs(
            rows.pixel_masks(), rows.canvas_index(f0[0], f0[1], fw), (f1[0] - f0[0]) * fw, n_near + n)
        new_pair = b >= n_near                  # pairs of two earlier nuclei are not this tile's business
        a, b, shared = a[new_pair], b[new_pair], shared[new_pair]
        keep_pixel = new_pair[pair_of_pixel]
        pair_of_pixel = (np.cumsum(new_pair) - 1)[pair_of_pixel[keep_pixel]]
        pix = pix[keep_pixel]

        areas = np.concatenate([c.areas[i] for c, i in near_parts] + [counts[n_near:]])
        local_priority = np.concatenate([c.priority[i] for c, i in near_parts] + [priority])
        alive = np.concatenate([np.ones(n_near, bool), np.ones(n, bool)])
        self._dedupe(a, b, shared, areas, local_priority, alive, n_near)

        # Remember the pairs whose both nuclei survived, with their shared pixels, for painter's order.
        both = alive[a] & alive[b]
        serials = np.concatenate([c.serial0 + i for c, i in near_parts] + [serial0 + np.arange(n)])
        pairs = np.stack([serials[a[both]], serials[b[both]]], axis=1)
        keep_pixel = both[pair_of_pixel]
        pair_pixels = np.stack([(np.cumsum(both) - 1)[pair_of_pixel[keep_pixel]],
                                pix[keep_pixel] // fw + f0[0], pix[keep_pixel] % fw + f0[1]])
        start = 0
        for chunk, idx in near_parts:
            chunk.alive[idx] = alive[start:start + len(idx)]
            start += len(idx)
        bounds, has = rows.bounds()
        tight = has[n_near:] & (bounds[n_near:] == nuclei.boxes).all(1)
        extent = Box(*map(int, f0), *map(int, f1))
        self._pool.append(_Chunk(tile, nuclei, extent, serial0, counts[n_near:], priority, tight, alive[n_near:],
                                 np.zeros(n, bool), pairs, pair_pixels))

    def _dedupe(self, a, b, shared, areas, priority, alive, n_near) -> None:
        """Keep the better of each duplicate pair, visiting new nuclei best first (updates `alive`).

        Only pairs overlapping by more than dedupe_overlap of the smaller mask matter; a new nucleus kills
        the worse earlier nuclei it duplicates until it meets a better one, which makes it the duplicate.
        """
        dup = shared > self.dedupe_overlap * np.minimum(areas[a], areas[b])
        a, b = a[dup], b[dup]
        alive[n_near:] = True
        if a.size == 0:
            return
        alive[n_near:] = False
        ends, partners = np.concatenate([a, b]), np.concatenate([b, a])
        order = np.lexsort((partners, ends))
        ends, partners = ends[order], partners[order]
        bounds = np.searchsorted(ends, np.arange(len(alive) + 1))
        has_dup = np.zeros(len(alive), bool)
        has_dup[ends] = True
        new_order = n_near + np.argsort(-priority[n_near:], kind="stable")
        alive[new_order[~has_dup[new_order]]] = True
        for j_new in new_order[has_dup[new_order]]:
            duplicate = False
            for j in partners[bounds[j_new]:bounds[j_new + 1]]:
                if not alive[j]:
                    continue
                if priority[j] >= priority[j_new]:
                    duplicate = True
                    break
                alive[j] = False            # the new nucleus is the better view of it
                self.stats.duplicates_removed += 1
            if duplicate:
                self.stats.duplicates_removed += 1
            else:
                alive[j_new] = True

    def pop_final(self, through_grid_row: int | None = None) -> Instances:
        """Final nuclei of grid rows <= through_grid_row (None: all), overlaps resolved, sorted by tile.

        Call with r - 1 once every tile of grid row r has been added, and with None at the end.
        """
        last = np.iinfo(np.int64).max if through_grid_row is None else through_grid_row
        picked = []
        for chunk in self._pool:
            if chunk.tile.grid_row <= last:
                idx = np.flatnonzero(chunk.alive & ~chunk.emitted)
                chunk.emitted[idx] = True
                picked.append((chunk, idx))
        out = Instances.concat([c.nuclei.take(i) for c, i in picked])
        if not len(out):
            self._forget(last - 1)
            return out
        order = np.lexsort((out.boxes[:, 1], out.boxes[:, 0], out.tile_index))
        out = out.take(order)
        serial = np.concatenate([c.serial0 + i for c, i in picked])[order]
        areas = np.concatenate([c.areas[i] for c, i in picked])[order]
        tight = np.concatenate([c.tight[i] for c, i in picked])[order]
        loser, lost_row, lost_col = self._painters_order(serial)     # sorted by loser
        lost = np.bincount(loser, minlength=len(out))
        keep = areas - lost >= self.min_area_px
        self._trim(out, np.flatnonzero(keep & ((lost > 0) | ~tight)), loser, lost_row, lost_col)
        self.stats.cells_emptied += int((~keep).sum())
        out = out.take(np.flatnonzero(keep))
        self.stats.cells_cut += int(out.cut.sum())
        # Rows before the finalised ones can no longer touch anything still to come: forget them.
        self._forget(last - 1)
        return out

    @staticmethod
    def _trim(out: Instances, which: np.ndarray, loser: np.ndarray, lost_row: np.ndarray,
              lost_col: np.ndarray) -> None:
        """Clear the lost pixels of nuclei `which` of `out` and crop them to their remaining pixels, in place.

        All their masks are copied into one buffer, cleared and bounded there at once; each nucleus then gets
        a view of its part (contiguous when not cropped).
        """
        if which.size == 0:
            return
        boxes = out.boxes[which]
        heights, widths = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        sizes = heights * widths
        starts = np.cumsum(sizes) - sizes
        flat = np.concatenate([out.masks[k].reshape(-1) for k in which]).astype(bool, copy=False)
        position = np.full(len(out), -1)
        position[which] = np.arange(len(which))
        p = position[loser]
        sel = p >= 0
        p = p[sel]
        flat[starts[p] + (lost_row[sel] - boxes[p, 0]) * widths[p] + lost_col[sel] - boxes[p, 1]] = False
        bounds, _ = MaskRows(boxes, flat).bounds()
        rel = bounds - boxes[:, [0, 1, 0, 1]]
        cropped = (rel[:, 0] > 0) | (rel[:, 1] > 0) | (rel[:, 2] < heights) | (rel[:, 3] < widths)
        for i, k in enumerate(which.tolist()):
            mask = flat[starts[i]:starts[i] + sizes[i]].reshape(heights[i], widths[i])
            if cropped[i]:
                mask = np.ascontiguousarray(mask[rel[i, 0]:rel[i, 2], rel[i, 1]:rel[i, 3]])
            out.masks[k] = mask
        out.boxes[which] = bounds

    def _painters_order(self, final_serial: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pixels the final nuclei lose to alive nuclei of higher priority: (final index, row, col), unique,
        sorted by final index.

        Every pair of alive nuclei sharing pixels was recorded by the later one's add_tile (the earlier one
        was alive and in the pool then, as it is now), so the rivals are looked up, not searched for.
        """
        chunks = self._pool
        lo = min(c.serial0 for c in chunks)
        size = self._serial - lo
        alive = np.zeros(size, bool)
        priority = np.zeros(size)
        final_pos = np.full(size, -1)
        for c in chunks:
            s = c.serial0 - lo + np.arange(len(c.nuclei))
            alive[s], priority[s] = c.alive, c.priority
        final_pos[final_serial - lo] = np.arange(len(final_serial))
        pairs = np.concatenate([c.pairs for c in chunks]) - lo
        offsets = np.cumsum([0] + [len(c.pairs) for c in chunks[:-1]])
        pixels = np.concatenate([c.pair_pixels + np.array([[o], [0], [0]]) for c, o in zip(chunks, offsets)], axis=1)
        a, b = pairs[:, 0], pairs[:, 1]
        known = (a >= 0) & (b >= 0)                     # a nucleus forgotten already cannot be a rival
        a, b = np.where(known, a, 0), np.where(known, b, 0)
        live = known & alive[a] & alive[b] & (priority[a] != priority[b])
        loser = np.where(priority[a] < priority[b], a, b)
        loser_pos = np.where(live, final_pos[loser], -1)
        pixel_loser = loser_pos[pixels[0]]
        sel = pixel_loser >= 0
        loser, row, col = pixel_loser[sel], pixels[1][sel], pixels[2][sel]
        order = np.lexsort((col, row, loser))
        loser, row, col = loser[order], row[order], col[order]
        # A pixel lost to two rivals is lost once.
        first = np.ones(len(loser), bool)
        first[1:] = (np.diff(loser) != 0) | (np.diff(row) != 0) | (np.diff(col) != 0)
        self.stats.pixels_reassigned += int(first.sum())
        return loser[first], row[first], col[first]

    def _forget(self, through_grid_row: int) -> None:
        self._pool = [c for c in self._pool if c.tile.grid_row > through_grid_row]
