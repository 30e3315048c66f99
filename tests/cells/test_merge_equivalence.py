"""The vectorised SeamMerger against the plain per-nucleus version it replaced.

cells/merge.py finds overlapping masks with a pixel canvas per tile and looks painter's-order rivals up from
pairs recorded at add time; `ReferenceMerger` below is the straightforward statement of the same rule
(the previous implementation: scan every alive nucleus per nucleus). On random tiled slides whose tiles see
each nucleus slightly differently, with double detections, tied scores, cut nuclei, loose boxes and tiny
remnants, both must hand back exactly the same nuclei (boxes, masks, scores, order) and statistics.
"""

from __future__ import annotations

import numpy as np
import pytest

from cellseg.cells import SeamMerger, centroids_and_areas, owned_instances
from cellseg.geometry import Instances, TileDetections, plan_tiles, seam_band_px


def _intersecting(boxes, box):
    return np.flatnonzero((boxes[:, 0] < box[2]) & (boxes[:, 2] > box[0])
                          & (boxes[:, 1] < box[3]) & (boxes[:, 3] > box[1]))


def _overlap(box_a, mask_a, box_b, mask_b) -> int:
    r0, c0 = max(box_a[0], box_b[0]), max(box_a[1], box_b[1])
    r1, c1 = min(box_a[2], box_b[2]), min(box_a[3], box_b[3])
    if r0 >= r1 or c0 >= c1:
        return 0
    a = mask_a[r0 - box_a[0]:r1 - box_a[0], c0 - box_a[1]:c1 - box_a[1]]
    b = mask_b[r0 - box_b[0]:r1 - box_b[0], c0 - box_b[1]:c1 - box_b[1]]
    return int(np.count_nonzero(a & b))


class ReferenceMerger:
    """The seam rule nucleus by nucleus: dedupe each new nucleus against every alive one, best new nucleus first;
    then give every final nucleus's pixels claimed by a better alive nucleus away, and crop."""

    def __init__(self, dedupe_overlap: float, min_area_px: int):
        self.dedupe_overlap, self.min_area_px = dedupe_overlap, max(min_area_px, 1)
        self.stats = dict(duplicates_removed=0, cells_cut=0, pixels_reassigned=0, cells_emptied=0)
        self.nuclei = Instances.empty()
        self.row, self.areas, self.priority, self.alive, self.emitted = [], [], [], [], []
        self.serial = 0

    def add_tile(self, tile, nuclei: Instances) -> None:
        areas = [int(m.sum()) for m in nuclei.masks]
        priority = (~nuclei.cut).astype(float) * 2 + nuclei.scores - 1e-9 * (self.serial + np.arange(len(nuclei)))
        self.serial += len(nuclei)
        near = [j for j in _intersecting(self.nuclei.boxes, tile.read) if self.alive[j]]
        boxes = np.concatenate([self.nuclei.boxes[near], nuclei.boxes])
        masks = [self.nuclei.masks[j] for j in near] + nuclei.masks
        local_areas = [self.areas[j] for j in near] + areas
        local_priority = np.concatenate([np.array([self.priority[j] for j in near]), priority])
        alive = [True] * len(near) + [False] * len(nuclei)
        for i in np.argsort(-priority, kind="stable"):
            j_new, duplicate = len(near) + i, False
            for j in _intersecting(boxes, boxes[j_new]):
                if not alive[j] or j == j_new:
                    continue
                shared = _overlap(boxes[j_new], masks[j_new], boxes[j], masks[j])
                if shared > self.dedupe_overlap * min(local_areas[j_new], local_areas[j]):
                    if local_priority[j] >= local_priority[j_new]:
                        duplicate = True
                        break
                    alive[j] = False
                    self.stats["duplicates_removed"] += 1
            self.stats["duplicates_removed"] += duplicate
            alive[j_new] = not duplicate
        for k, j in enumerate(near):
            self.alive[j] = alive[k]
        self.nuclei = Instances.concat([self.nuclei, nuclei])
        self.row += [tile.grid_row] * len(nuclei)
        self.areas += areas
        self.priority += list(priority)
        self.alive += alive[len(near):]
        self.emitted += [False] * len(nuclei)

    def pop_final(self, through_grid_row=None) -> Instances:
        last = np.iinfo(np.int64).max if through_grid_row is None else through_grid_row
        final = [i for i in range(len(self.nuclei)) if self.alive[i] and not self.emitted[i] and self.row[i] <= last]
        for i in final:
            self.emitted[i] = True
        final = np.array(final, np.int64)
        boxes = self.nuclei.boxes
        if len(final):
            final = final[np.lexsort((boxes[final, 1], boxes[final, 0], self.nuclei.tile_index[final]))]
        out, keep = self.nuclei.take(final), []
        for k, i in enumerate(final):
            box, mask = boxes[i], self.nuclei.masks[i].copy()
            for j in range(len(self.nuclei)):
                if not self.alive[j] or self.priority[j] <= self.priority[i]:
                    continue
                rbox = boxes[j]
                r0, c0, r1, c1 = max(box[0], rbox[0]), max(box[1], rbox[1]), min(box[2], rbox[2]), min(box[3], rbox[3])
                if r0 < r1 and c0 < c1:
                    mine = mask[r0 - box[0]:r1 - box[0], c0 - box[1]:c1 - box[1]]
                    theirs = self.nuclei.masks[j][r0 - rbox[0]:r1 - rbox[0], c0 - rbox[1]:c1 - rbox[1]]
                    self.stats["pixels_reassigned"] += int(np.count_nonzero(mine & theirs))
                    mine &= ~theirs
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            if rows.size == 0 or mask.sum() < self.min_area_px:
                self.stats["cells_emptied"] += 1
                continue
            keep.append(k)
            out.masks[k] = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
            out.boxes[k] = (box[0] + rows[0], box[1] + cols[0], box[0] + rows[-1] + 1, box[1] + cols[-1] + 1)
        out = out.take(np.array(keep, np.int64))
        self.stats["cells_cut"] += int(out.cut.sum())
        forget = np.flatnonzero(np.array(self.row) > last - 1)
        self.nuclei = self.nuclei.take(forget)
        for name in ("row", "areas", "priority", "alive", "emitted"):
            setattr(self, name, [getattr(self, name)[i] for i in forget])
        return out


def make_slide(seed: int, height: int, width: int, tile: int, halo: int):
    """Per-tile detections of random nuclei: each tile sees them shifted by up to 1 px, with a slightly
    different shape now and then, ~5 % reported twice, scores on a coarse grid (ties), a few nuclei larger
    than the halo (cut), some masks in loose boxes, some tiny."""
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[-40:41, -40:41]
    nuclei = []
    for _ in range(height * width // 120):
        big = rng.random() < 0.08
        a, b = rng.uniform(halo * 0.8, halo * 1.6, 2) if big else rng.uniform(0.7, halo / 2.5, 2)
        t = rng.uniform(0, np.pi)
        u, v = rr * np.cos(t) + cc * np.sin(t), -rr * np.sin(t) + cc * np.cos(t)
        m = (u / a) ** 2 + (v / b) ** 2 <= 1
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        m = m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        nuclei.append((int(rng.integers(-5, height)), int(rng.integers(-5, width)), m))
    for _ in range(4):                          # bars longer than a tile: every view of them is cut
        bar = np.ones((int(rng.integers(3, 7)), int(rng.integers(2 * tile, 3 * tile))), bool)
        nuclei.append((int(rng.integers(0, height - 6)), int(rng.integers(-tile, width - tile)), bar))
    tiles = plan_tiles(height, width, tile, halo)
    detections = []
    for t in tiles:
        read = t.read
        dr, dc = rng.integers(-1, 2, 2)
        boxes, masks = [], []
        for r0, c0, m in nuclei:
            if rng.random() < 0.1:
                m = np.pad(m, 1)[rng.integers(0, 3):, rng.integers(0, 3):]        # a slightly different view
            for _ in range(2 if rng.random() < 0.05 else 1):                       # double hits
                rs, cs = r0 + dr + rng.integers(-1, 2), c0 + dc + rng.integers(-1, 2)
                a0, b0 = max(rs, read.row0), max(cs, read.col0)
                a1, b1 = min(rs + m.shape[0], read.row1), min(cs + m.shape[1], read.col1)
                if a0 >= a1 or b0 >= b1:
                    continue
                crop = m[a0 - rs:a1 - rs, b0 - cs:b1 - cs]
                if not crop.any():
                    continue
                box = [a0 - read.row0, b0 - read.col0, a1 - read.row0, b1 - read.col0]   # loose: not cropped
                boxes.append(box)
                masks.append(crop)
        n = len(masks)
        detections.append(TileDetections(np.asarray(boxes, np.int64).reshape(-1, 4), masks,
                                         (rng.integers(5, 10, n) / 10).astype(np.float32), rng.integers(1, 3, n)))
    return tiles, detections


def run_merger(merger, tiles, detections, shape, halo, min_area):
    tiles_per_row = max(t.grid_col for t in tiles) + 1
    out = []
    for tile, det in zip(tiles, detections):
        merger.add_tile(tile, owned_instances(det, tile, shape, min_area, seam_band_px(halo)))
        if tile.grid_col == tiles_per_row - 1 and tile.grid_row > 0:
            out.append(merger.pop_final(tile.grid_row - 1))
    out.append(merger.pop_final(None))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_same_nuclei_as_the_reference(seed):
    height, width, tile, halo = 150 + 10 * seed, 170, 48 + 8 * (seed % 3), 16
    tiles, detections = make_slide(seed, height, width, tile, halo)
    min_area = 3
    merger = SeamMerger(0.5, min_area)
    got = run_merger(merger, tiles, detections, (height, width), halo, min_area)
    reference = ReferenceMerger(0.5, min_area)
    want = run_merger(reference, tiles, detections, (height, width), halo, min_area)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert len(g) == len(w)
        for name in ("boxes", "scores", "class_ids", "tile_index", "cut"):
            np.testing.assert_array_equal(getattr(g, name), getattr(w, name), err_msg=name)
        for a, b in zip(g.masks, w.masks):
            np.testing.assert_array_equal(a, b)
    assert merger.stats.to_dict() == reference.stats
    stats = reference.stats
    assert stats["duplicates_removed"] > 0 and stats["pixels_reassigned"] > 0 and stats["cells_cut"] > 0
    assert sum(map(len, want)) > 100


def test_centroids_equal_numpy_means_exactly():
    rng = np.random.default_rng(0)
    masks = [rng.random((rng.integers(1, 30), rng.integers(1, 30))) < 0.6 for _ in range(300)]
    masks = [m if m.any() else np.ones_like(m) for m in masks]
    boxes = np.array([[r, c, r + m.shape[0], c + m.shape[1]] for m, r, c in
                      zip(masks, rng.integers(0, 10_000, 300), rng.integers(0, 10_000, 300))])
    want = np.array([(b[0] + np.nonzero(m)[0].mean(), b[1] + np.nonzero(m)[1].mean()) for b, m in zip(boxes, masks)])
    centroids, areas = centroids_and_areas(boxes, masks)
    np.testing.assert_array_equal(centroids, want)
    np.testing.assert_array_equal(areas, [m.sum() for m in masks])


def test_overlapping_pairs_match_a_count_of_every_pair_call_after_call():
    """Every pair of masks sharing pixels, its shared pixel count and the pixels, against a plain count; the thread's
    scratch canvas is reused from call to call (its earlier contents must not matter), pixels shared by 3 masks too."""
    from cellseg.cells.merge import overlapping_pairs
    rng = np.random.default_rng(3)
    triples = False
    for size, n in ((400, 30), (900, 60), (100, 12), (900, 2)):
        masks, pixels = [], []
        for k in range(n):
            painted = np.unique(rng.integers(0, size, rng.integers(1, 40)))
            masks.append(np.full(len(painted), k))
            pixels.append(painted)
        mask, pix = np.concatenate(masks), np.concatenate(pixels)
        a, b, shared, pair_of_pixel, pair_pix = overlapping_pairs(mask, pix, size, n)
        want = {}
        for p in np.unique(pix):
            owners = sorted(mask[pix == p].tolist())
            for i in range(len(owners)):
                for j in range(i + 1, len(owners)):
                    want.setdefault((owners[i], owners[j]), []).append(int(p))
        assert {(int(x), int(y)): int(c) for x, y, c in zip(a, b, shared)} == {k: len(v) for k, v in want.items()}
        got = {}
        for pair, p in zip(pair_of_pixel, pair_pix):
            got.setdefault((int(a[pair]), int(b[pair])), []).append(int(p))
        assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in want.items()}
        triples |= bool((np.bincount(pix) >= 3).any())
    assert triples
