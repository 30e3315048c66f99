"""Test-time augmentation (cellseg.detection.tta): the views' geometry, and merging back to the same cells."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cellseg.detection import (
    MEMBER_FLOOR,
    VIEWS,
    AugmentedDetector,
    member_threshold,
    merge_views,
    unview_array,
    unview_boxes,
    view_array,
    view_box,
    view_boxes,
    view_shape,
)
from cellseg.errors import ParameterError
from cellseg.geometry import Box, HostInput, TileDetections, TileSpec, detection_frames


class ThresholdDetector(HostInput):
    """An exactly rotation- and flip-equivariant stand-in for the network: bright connected blobs are cells,
    scored by their mean brightness. Whatever view it is shown, it finds the same blobs."""

    class_names = ("nucleus",)
    device = "cpu"
    batch_size = 4

    def __init__(self, score_threshold: float = 0.5):
        self.score_threshold = score_threshold
        self.frames_seen: list = []      # (frame_shapes, owned_boxes) of each call
        self.windows: list = []

    def calibrated(self, windows, gray=False) -> ThresholdDetector:
        calibrated = ThresholdDetector(self.score_threshold)
        calibrated.windows = list(windows)
        return calibrated

    def detect_images(self, images, scale=1.0, *, frame_shapes=None, owned_boxes=None):
        self.frames_seen.append((frame_shapes, owned_boxes))
        out = []
        for im in images:
            labels, n = ndimage.label(im[0] > 0.5)
            boxes, masks, scores = [], [], []
            for k, sl in enumerate(ndimage.find_objects(labels), start=1):
                m = labels[sl] == k
                s = float(im[0][sl][m].mean())
                if s >= self.score_threshold:
                    boxes.append((sl[0].start, sl[1].start, sl[0].stop, sl[1].stop))
                    masks.append(m)
                    scores.append(s)
            out.append(TileDetections(np.asarray(boxes, np.int64).reshape(-1, 4), masks,
                                      np.asarray(scores, np.float32), np.ones(len(masks), np.int64)))
        return out


def blobs_image(h=40, w=56, seed=0) -> np.ndarray:
    """An asymmetric image of blobs of different shapes and brightness, (3, h, w) in [0, 1]."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w), np.float32)
    for _ in range(7):
        r, c = rng.integers(3, h - 8), rng.integers(3, w - 9)
        img[r:r + rng.integers(2, 6), c:c + rng.integers(2, 7)] = rng.uniform(0.6, 1.0)
    img[2, w - 4:w - 1] = 0.9          # a thin bar: orientation matters
    return np.repeat(img[None], 3, axis=0)


@pytest.mark.parametrize("view", VIEWS)
def test_boxes_and_crops_follow_the_view(view):
    rng = np.random.default_rng(1)
    h, w = 23, 31
    image = rng.random((h, w))
    boxes = np.array([[0, 0, 5, 7], [10, 20, 23, 31], [3, 4, 4, 5]])
    viewed = view_array(image, view)
    vb = view_boxes(boxes, (h, w), view)
    for (r0, c0, r1, c1), (v0, w0, v1, w1) in zip(boxes, vb):
        assert np.array_equal(viewed[v0:v1, w0:w1], view_array(image[r0:r1, c0:c1], view))
    assert np.array_equal(unview_boxes(vb, (h, w), view), boxes)
    assert np.array_equal(unview_array(viewed, view), image)


@pytest.mark.parametrize("view", VIEWS)
def test_a_viewed_frame_owns_the_viewed_box(view):
    """Owned boxes reach beyond their frame (tiling.owned_box is not clipped): marked on a canvas with room around
    the frame, the viewed box is where the view puts the marked pixels."""
    shape, owned = (30, 50), Box(-4, 6, 19, 54)
    pad = 10
    marked = np.zeros((shape[0] + 2 * pad, shape[1] + 2 * pad), bool)
    marked[owned.row0 + pad:owned.row1 + pad, owned.col0 + pad:owned.col1 + pad] = True
    seen = view_array(marked, view)
    rows, cols = np.flatnonzero(seen.any(1)), np.flatnonzero(seen.any(0))
    assert view_shape(shape, view) == view_array(np.zeros(shape), view).shape
    assert view_box(owned, shape, view) == Box(rows[0] - pad, cols[0] - pad, rows[-1] + 1 - pad, cols[-1] + 1 - pad)
    assert all(isinstance(v, int) for v in view_box(owned, shape, view))


def test_tta_finds_the_same_cells_as_one_view_with_an_equivariant_detector():
    image = blobs_image()
    plain = ThresholdDetector().detect_images([image])[0]
    assert len(plain) >= 5
    augmented = AugmentedDetector(ThresholdDetector(member_threshold(0.5)), score_threshold=0.5).detect([image])[0]
    key = lambda det: sorted((tuple(b), m.tobytes(), round(float(s), 4))   # noqa: E731
                             for b, m, s in zip(det.boxes.tolist(), det.masks, det.scores))
    assert key(augmented) == key(plain)


def test_tta_passes_each_view_its_own_frame_and_owned_box():
    image = blobs_image()
    tile = TileSpec(3, 0, 0, read=Box(0, 0, 40, 56), core=Box(0, 0, 30, 40))
    inner = ThresholdDetector(MEMBER_FLOOR)
    AugmentedDetector(inner, 0.5).detect([image], [tile])
    (shape,), (owned,) = detection_frames([tile])
    assert (shape, owned) == ((40, 56), Box(-6, -6, 36, 46))     # the core grown by the seam band (4 px) + 2 px
    assert inner.frames_seen == [([view_shape(shape, v)], [view_box(owned, shape, v)]) for v in VIEWS]
    assert inner.frames_seen[1] == ([(56, 40)], [Box(10, -6, 62, 36)])   # a quarter turn counter-clockwise


def test_tta_is_configured_by_its_constructor():
    """The inner detector is built keeping each view's cells down to member_threshold: TTA does not change it."""
    assert member_threshold(0.6) == MEMBER_FLOOR and member_threshold(0.1) == 0.1
    with pytest.raises(ParameterError, match=r"down to a score of 0.3 .* found one that keeps them down to 0.6"):
        AugmentedDetector(ThresholdDetector(0.6), 0.6)
    inner = ThresholdDetector(MEMBER_FLOOR)
    augmented = AugmentedDetector(inner, 0.6)
    assert (augmented.score_threshold, inner.score_threshold) == (0.6, MEMBER_FLOOR)
    windows = [blobs_image()]
    calibrated = augmented.calibrated(windows)                  # the inner detector's calibration, wrapped alike
    assert calibrated is not augmented and calibrated.inner.windows == windows and inner.windows == []
    assert (calibrated.score_threshold, calibrated.views) == (augmented.score_threshold, augmented.views)


def test_a_cell_seen_in_few_views_scores_low_and_is_dropped():
    mask = np.ones((4, 4), bool)
    one = TileDetections(np.array([[2, 2, 6, 6]]), [mask], np.array([0.9], np.float32), np.array([1]))
    none = TileDetections.empty()
    # seen in 2 of 8 views: merged score 0.9 * 2 / 8
    merged = merge_views([one, one] + [none] * 6, score_threshold=0.0)
    assert len(merged) == 1 and merged.scores[0] == pytest.approx(0.225)
    assert len(merge_views([one, one] + [none] * 6, score_threshold=0.5)) == 0
    # seen in all 8 views with masks that disagree on a pixel column: the majority's pixels are kept
    wide = np.ones((4, 5), bool)
    views = [one] * 5 + [TileDetections(np.array([[2, 2, 6, 7]]), [wide], np.array([0.9], np.float32),
                                        np.array([1]))] * 3
    merged = merge_views(views, score_threshold=0.5)
    assert len(merged) == 1 and np.array_equal(merged.boxes[0], [2, 2, 6, 6]) and merged.masks[0].all()
    assert merged.scores[0] == pytest.approx(0.9)


@pytest.mark.slow
def test_tta_on_a_symmetric_image_keeps_the_shipped_models_cells():
    """The shipped network on an image that every view leaves unchanged: TTA gives the cells of one view."""
    from cellseg.bundles import load_bundle
    from cellseg.evaluation import ImageMasks, match, validation_detector
    from cellseg.results import crop_rle

    size = 128
    yy, xx = np.mgrid[:size, :size] + 0.5
    img = np.zeros((size, size), np.float32)
    centres = [(c, d) for c in (24, 64, 104) for d in (24, 64, 104)]
    for r, c in centres:
        img[(yy - r) ** 2 + (xx - c) ** 2 <= 8.5 ** 2] = 0.8
    image = np.repeat(img[None], 3, axis=0)
    assert all(np.array_equal(view_array(image, v), image) for v in VIEWS)   # symmetric under every view
    bundle = load_bundle("nuclei")
    plain = validation_detector(bundle, "cpu", floor=0.5).detect([image])[0]
    augmented = validation_detector(bundle, "cpu", floor=0.5, tta=True).detect([image])[0]
    assert len(plain) == len(centres)

    def instances(det):
        return ImageMasks(None, None, size, size, [crop_rle(m, b[0], b[1], size, size)
                                                    for b, m in zip(det.boxes, det.masks)],
                          np.asarray(det.boxes), np.asarray(det.scores, float), np.zeros(len(det), bool), True)
    result = match(instances(augmented), instances(plain), iou=0.8)
    assert (result.tp, result.fp, result.fn) == (len(centres), 0, 0)


@pytest.mark.slow
def test_cellseg_count_tta_runs_the_augmented_detector(tmp_path, fluo_png, tiny_bundle):
    """`cellseg count --tta`: every tile seen in 8 views, merged; run.json says so."""
    import json
    import shutil

    from ..helpers import invoke
    image = shutil.copy(fluo_png, tmp_path / "dsb_fluo.png")
    result = invoke(["count", image, "--model", tiny_bundle, "--device", "cpu", "-q", "--tile-size", "256",
                     "--halo", "16", "--tissue", "none", "--tta"])
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "dsb_fluo.cellseg" / "run.json").read_text())
    assert run["model"]["test_time_augmentation"] is True
