"""Test-time augmentation: run the detector on the 8 flips and 90° rotations of each tile and merge the cells.

A cell found in most views is a cell; one found in a single view is probably noise. Each view's detections are
mapped back to the tile's frame, then cells of different views that overlap (mask IoU >= MATCH_IOU) are one cell:

- members: seeded by score (the best detection not yet taken starts a cell; from every other view the detection
  with the highest IoU with the seed joins it), at most one per view;
- score: the sum of the members' scores over the number of views (a view that missed the cell adds 0), so a cell
  seen in every view at 0.9 scores 0.9 and one seen in two views of eight scores about 0.2;
- mask: the pixels that at least half of the members cover (a pixel vote); class: the seed's.

The merged scores are thresholded like single-view scores, at thresholds tuned with TTA on held-out images when
the bundle has them (bundle.Bundle.threshold_for(modality, tta=True)), the gray one for a slide whose network input
has no colour (planning.NetworkInput.gray), as without TTA. Each view's detector keeps cells down to
MEMBER_FLOOR (it is built with `member_threshold`), so a cell's merged score does not depend on where the final
threshold sits.

Each view is detected in its own frame: the image, the frame its cells come back in and the box its tile owns are
all viewed, and the cells unviewed. The normalisation is shared: flips and rotations do not change a slide's
GroupNorm statistics, so `calibrated` goes to the wrapped detector as it is.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np

from ..errors import ParameterError
from ..geometry import Box, HostInput, MaskRows, TileDetections, TileSpec, detection_frames

# (rotations by 90° counter-clockwise, flip left-right first): the 8 symmetries of the square.
VIEWS: tuple[tuple[int, bool], ...] = tuple((k, flip) for flip in (False, True) for k in range(4))
MATCH_IOU = 0.5
MEMBER_FLOOR = 0.3


def member_threshold(score_threshold: float) -> float:
    """The score threshold of the detector whose views are merged and kept from `score_threshold`: each view's
    cells are kept down to MEMBER_FLOOR (or to `score_threshold`, when that is lower)."""
    return min(score_threshold, MEMBER_FLOOR)


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


def view_shape(shape: tuple[int, int], view: tuple[int, bool]) -> tuple[int, int]:
    """The (height, width) of a frame as seen in `view`."""
    return tuple(shape) if view[0] % 2 == 0 else tuple(shape)[::-1]


def view_box(box: Box, shape: tuple[int, int], view: tuple[int, bool]) -> Box:
    """A box of an H x W frame, as seen in `view` (not clipped: it may reach beyond the frame)."""
    return Box(*(int(v) for v in view_boxes(np.array([tuple(box)]), shape, view)[0]))


class AugmentedDetector(HostInput):
    """A TileDetector that runs `inner` on every view of each tile and merges the cells (module docstring).

    inner: a detect.Detector (or anything with its `detect_images`, `calibrated`, `score_threshold`, `device`,
        `class_names` and `batch_size`) built with score_threshold=member_threshold(the lower of the two below).
    score_threshold: kept cells' merged score floor; gray_score_threshold: the floor instead for a slide whose network
        input has no colour (chosen by `calibrated`; None: score_threshold).
    """

    def __init__(self, inner, score_threshold: float, views: Sequence[tuple[int, bool]] = VIEWS,
                 gray_score_threshold: float | None = None):
        colour = float(score_threshold)
        gray = colour if gray_score_threshold is None else float(gray_score_threshold)
        expected = member_threshold(min(colour, gray))
        if inner.score_threshold != expected:
            raise ParameterError(f"expected a detector that keeps each view's cells down to a score of {expected} "
                                 f"(tta.member_threshold({min(colour, gray)})), found one that keeps them down to "
                                 f"{inner.score_threshold}")
        self.inner = inner
        self.score_threshold = colour       # the one in force: a calibrated detector's is its slide's
        self.colour_and_gray_thresholds = (colour, gray)
        self.views = tuple(views)

    @property
    def device(self):
        return self.inner.device

    @property
    def class_names(self):
        return self.inner.class_names

    @property
    def batch_size(self) -> int:
        return self.inner.batch_size

    def calibrated(self, windows: Sequence[np.ndarray], gray: bool = False) -> AugmentedDetector:
        """The inner detector calibrated for a slide, and the slide's merged score floor (Detector.calibrated)."""
        other = copy.copy(self)
        other.inner = self.inner.calibrated(windows)    # built with one threshold: keeps its views' floor
        colour_threshold, gray_threshold = self.colour_and_gray_thresholds
        other.score_threshold = gray_threshold if gray else colour_threshold
        return other

    def detect(self, images: Sequence[np.ndarray], tiles: Sequence[TileSpec] | None = None,
               scale: float = 1.0) -> list[TileDetections]:
        """The TileDetector's detect (detect.Detector.detect), each tile in every view."""
        if tiles is None:
            return self.detect_images(images, scale)
        frame_shapes, owned_boxes = detection_frames(tiles)
        return self.detect_images(images, scale, frame_shapes=frame_shapes, owned_boxes=owned_boxes)

    def detect_images(self, images: Sequence[np.ndarray], scale: float = 1.0, *,
                      frame_shapes: Sequence[tuple[int, int]] | None = None,
                      owned_boxes: Sequence[Box] | None = None) -> list[TileDetections]:
        """detect.Detector.detect_images, each image in every view: the inner detector sees the viewed images, frames
        and owned boxes; its cells are mapped back to each image's frame and merged."""
        shapes = [im.shape[-2:] for im in images] if frame_shapes is None else list(frame_shapes)
        per_view = []
        for view in self.views:
            per_view.append(self.inner.detect_images(
                [view_array(im, view) for im in images], scale,
                frame_shapes=None if frame_shapes is None else [view_shape(s, view) for s in frame_shapes],
                owned_boxes=None if owned_boxes is None else [view_box(b, s, view)
                                                              for b, s in zip(owned_boxes, shapes)]))
        out = []
        for i, shape in enumerate(shapes):
            back = []
            for view, found in zip(self.views, per_view):
                det = found[i]
                back.append(TileDetections(unview_boxes(det.boxes, shape, view),
                                           [unview_array(m, view) for m in det.masks], det.scores, det.class_ids))
            out.append(merge_views(back, self.score_threshold))
        return out


def merge_views(views: list, score_threshold: float, match_iou: float = MATCH_IOU):
    """One set of cells from the detections of several views, all in the same frame (module docstring)."""
    from ..cells import overlapping_pairs
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
