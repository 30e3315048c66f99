"""Test-time augmentation: run the detector on the 8 flips and 90° rotations of each tile and merge the cells.

A cell found in most views is a cell; one found in a single view is probably noise. Each view's detections are
mapped back to the tile's frame, then cells of different views that overlap (mask IoU >= MATCH_IOU) are one cell:

- members: seeded by score (the best detection not yet taken starts a cell; from every other view the detection
  with the highest IoU with the seed joins it), at most one per view;
- score: the sum of the members' scores over the number of views (a view that missed the cell adds 0), so a cell
  seen in every view at 0.9 scores 0.9 and one seen in two views of eight scores about 0.2;
- mask: the pixels that at least half of the members cover (a pixel vote); class: the seed's.

The merged scores are thresholded like single-view scores, at thresholds tuned with TTA on held-out images when
the bundle has them (bundle.Bundle.threshold_for(modality, tta=True)). Each view's detector keeps cells down to
MEMBER_FLOOR, so a cell's merged score does not depend on where the final threshold sits.

The normalisation is shared: flips and rotations do not change a slide's GroupNorm statistics, so `calibrate`
goes to the wrapped detector as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .maskrows import MaskRows
from .tiling import Box, TileSpec

# (rotations by 90° counter-clockwise, flip left-right first): the 8 symmetries of the square.
VIEWS: tuple[tuple[int, bool], ...] = tuple((k, flip) for flip in (False, True) for k in range(4))
MATCH_IOU = 0.5
MEMBER_FLOOR = 0.3


def view_array(a: np.ndarray, view: tuple[int, bool]) -> np.ndarray:
    """The array (..., H, W) as seen in `view`."""
    k, flip = view
    if flip:
        a = a[..., ::-1]
    return np.ascontiguousarray(np.rot90(a, k, axes=(-2, -1)))


def unview_array(a: np.ndarray, view: tuple[int, bool]) -> np.ndarray:
    """Inverse of view_array."""
    k, flip = view
    a = np.rot90(a, -k, axes=(-2, -1))
    if flip:
        a = a[..., ::-1]
    return np.ascontiguousarray(a)


def _rot_box(box: np.ndarray, height: int, width: int) -> np.ndarray:
    """Half-open boxes (N, 4) of a height x width frame after one np.rot90 (counter-clockwise): the point
    (r, c) goes to (width - c, r) and the frame becomes width x height."""
    r0, c0, r1, c1 = box.T
    return np.stack([width - c1, r0, width - c0, r1], axis=1)


def view_boxes(boxes: np.ndarray, shape: tuple[int, int], view: tuple[int, bool]) -> np.ndarray:
    """Boxes of an H x W frame, as seen in `view`."""
    k, flip = view
    h, w = shape
    out = np.asarray(boxes, np.int64).reshape(-1, 4).copy()
    if flip:
        out[:, [1, 3]] = w - out[:, [3, 1]]
    for _ in range(k):
        out = _rot_box(out, h, w)
        h, w = w, h
    return out


def unview_boxes(boxes: np.ndarray, shape: tuple[int, int], view: tuple[int, bool]) -> np.ndarray:
    """Boxes seen in `view` of an H x W frame (shape: the original frame), back in the original frame."""
    k, flip = view
    h, w = shape if k % 2 == 0 else shape[::-1]    # the viewed frame
    out = np.asarray(boxes, np.int64).reshape(-1, 4).copy()
    for _ in range((4 - k) % 4):                   # rotating 4 - k more times returns to the original orientation
        out = _rot_box(out, h, w)
        h, w = w, h
    if flip:
        out[:, [1, 3]] = shape[1] - out[:, [3, 1]]
    return out


def view_tile(tile: TileSpec, view: tuple[int, bool]) -> TileSpec:
    """The tile in its own viewed frame: read box at the origin, core where the view puts it (the detector uses
    them for what the tile may own and for the size masks are pasted at)."""
    read, core = tile.read, tile.core
    core_local = np.array([[core.row0 - read.row0, core.col0 - read.col0, core.row1 - read.row0,
                            core.col1 - read.col0]])
    r0, c0, r1, c1 = view_boxes(core_local, read.shape, view)[0]
    h, w = read.shape if view[0] % 2 == 0 else read.shape[::-1]
    return TileSpec(tile.index, tile.grid_row, tile.grid_col, Box(0, 0, h, w), Box(int(r0), int(c0), int(r1), int(c1)))


class AugmentedDetector:
    """A TileDetector that runs `inner` on every view of each tile and merges the cells (module docstring).

    score_threshold: kept cells' merged score floor; the inner detector keeps cells down to MEMBER_FLOOR.
    """

    def __init__(self, inner, score_threshold: float | None = None, views: Sequence[tuple[int, bool]] = VIEWS):
        self.inner = inner
        self.views = tuple(views)
        self.score_threshold = float(inner.score_threshold if score_threshold is None else score_threshold)
        inner.score_threshold = min(inner.score_threshold, MEMBER_FLOOR)
        if hasattr(inner, "model"):   # the Mask R-CNN filters inside torchvision too (Detector.__post_init__)
            inner.model.roi_heads.score_thresh = inner.score_threshold

    @property
    def device(self):
        return self.inner.device

    @property
    def class_names(self):
        return self.inner.class_names

    @property
    def batch_size(self) -> int:
        return self.inner.batch_size

    def calibrate(self, windows: Sequence[np.ndarray]) -> None:
        self.inner.calibrate(windows)

    def detect(self, images: Sequence[np.ndarray], tiles: Sequence[TileSpec] | None = None, scale: float = 1.0):
        from .instances import TileDetections
        per_view = []
        for view in self.views:
            viewed_tiles = None if tiles is None else [view_tile(t, view) for t in tiles]
            found = self.inner.detect([view_array(im, view) for im in images], viewed_tiles, scale)
            per_view.append(found)
        out = []
        for i, image in enumerate(images):
            shape = tiles[i].read.shape if tiles is not None and scale != 1.0 else image.shape[-2:]
            back = []
            for view, found in zip(self.views, per_view):
                det = found[i]
                back.append(TileDetections(unview_boxes(det.boxes, shape, view),
                                           [unview_array(m, view) for m in det.masks], det.scores, det.class_ids))
            out.append(merge_views(back, self.score_threshold))
        return out


def merge_views(views: list, score_threshold: float, match_iou: float = MATCH_IOU):
    """One set of cells from the detections of several views, all in the same frame (module docstring)."""
    from .instances import TileDetections
    from .merge import overlapping_pairs
    n_views = len(views)
    boxes = np.concatenate([np.asarray(v.boxes, np.int64).reshape(-1, 4) for v in views])
    masks = [m for v in views for m in v.masks]
    scores = np.concatenate([np.asarray(v.scores, np.float64) for v in views])
    class_ids = np.concatenate([np.asarray(v.class_ids, np.int64) for v in views])
    view_of = np.concatenate([np.full(len(v), k) for k, v in enumerate(views)])
    n = len(masks)
    if n == 0:
        return TileDetections.empty()
    rows = MaskRows.of(boxes, masks)
    areas = rows.areas()
    f0, f1 = boxes[:, :2].min(0), boxes[:, 2:].max(0)
    width = int(f1[1] - f0[1])
    a, b, shared, _, _ = overlapping_pairs(rows.pixel_masks(), rows.canvas_index(int(f0[0]), int(f0[1]), width),
                                            int((f1[0] - f0[0]) * width), n)
    iou = shared / (areas[a] + areas[b] - shared)
    ok = (iou >= match_iou) & (view_of[a] != view_of[b])
    a, b, iou = a[ok], b[ok], iou[ok]
    neighbours: dict[int, list[tuple[float, int]]] = {}
    for x, y, v in zip(a.tolist(), b.tolist(), iou.tolist()):
        neighbours.setdefault(x, []).append((v, y))
        neighbours.setdefault(y, []).append((v, x))
    taken = np.zeros(n, bool)
    out_boxes, out_masks, out_scores, out_classes = [], [], [], []
    for seed in np.lexsort((np.arange(n), -scores)):          # best first; ties by arrival
        if taken[seed]:
            continue
        members, views_in = [seed], {view_of[seed]}
        taken[seed] = True
        for _, other in sorted(neighbours.get(seed, []), key=lambda vi: (-vi[0], vi[1])):
            if not taken[other] and view_of[other] not in views_in:
                members.append(other)
                views_in.add(view_of[other])
                taken[other] = True
        merged_score = scores[members].sum() / n_views
        if merged_score < score_threshold:
            continue
        mb = boxes[members]
        r0, c0 = mb[:, :2].min(0)
        r1, c1 = mb[:, 2:].max(0)
        votes = np.zeros((r1 - r0, c1 - c0), np.int32)
        for j in members:
            br0, bc0, br1, bc1 = boxes[j]
            votes[br0 - r0:br1 - r0, bc0 - c0:bc1 - c0] += masks[j]
        mask = votes * 2 >= len(members)
        rr, cc = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if rr.size == 0:
            continue
        out_masks.append(np.ascontiguousarray(mask[rr[0]:rr[-1] + 1, cc[0]:cc[-1] + 1]))
        out_boxes.append((r0 + rr[0], c0 + cc[0], r0 + rr[-1] + 1, c0 + cc[-1] + 1))
        out_scores.append(merged_score)
        out_classes.append(class_ids[seed])
    return TileDetections(np.asarray(out_boxes, np.int64).reshape(-1, 4), out_masks,
                          np.asarray(out_scores, np.float32), np.asarray(out_classes, np.int64))
