"""`cellseg evaluate`: hand-made label images and COCO files with known TP / FP / FN."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

import cellseg.evaluation.scoring as ev
from cellseg.cli import main
from cellseg.errors import CellsegError, EvaluationError
from cellseg.evaluation import box_pairs
from cellseg.results import CocoWriter, crop_rle

# A cell is (row0, col0, mask crop, score); rect() makes a filled rectangle.


def rect(r0, c0, h, w, score=0.9):
    return (r0, c0, np.ones((h, w), bool), score)


def disc(r0, c0, d, score=0.9):
    yy, xx = np.mgrid[:d, :d]
    return (r0, c0, (yy - (d - 1) / 2) ** 2 + (xx - (d - 1) / 2) ** 2 <= (d / 2) ** 2, score)


def grid(n, size=6, step=10, cols=5, score=0.9):
    return [rect(2 + step * (k // cols), 2 + step * (k % cols), size, size, score) for k in range(n)]


def write_labels(path: Path, shape, cells) -> Path:
    labels = np.zeros(shape, np.uint16)
    for k, (r0, c0, m, _) in enumerate(cells):
        labels[r0:r0 + m.shape[0], c0:c0 + m.shape[1]][m] = k + 1
    tifffile.imwrite(path, labels)
    return path


def write_pred(path: Path, shape, cells, file_name="img.png") -> Path:
    """Predictions the way the pipeline writes them (CocoWriter, one image)."""
    with CocoWriter(path, file_name, *shape, [{"id": 1, "name": "cell"}]) as coco:
        for k, (r0, c0, m, s) in enumerate(cells):
            coco.append([k + 1], [[r0, c0, r0 + m.shape[0], c0 + m.shape[1]]], [m], [s], [1])
    return path


def write_coco(path: Path, images, scores=False, iscrowd=()) -> Path:
    """A multi-image COCO file: images = [(file_name, id, (h, w), cells)]."""
    data = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "nucleus"}]}
    for name, iid, (h, w), cells in images:
        data["images"].append({"id": iid, "file_name": name, "height": h, "width": w})
        for r0, c0, m, s in cells:
            ann = {"id": len(data["annotations"]) + 1, "image_id": iid, "category_id": 1,
                   "segmentation": crop_rle(m, r0, c0, h, w), "area": int(m.sum()),
                   "bbox": [c0, r0, m.shape[1], m.shape[0]], "iscrowd": int(len(data["annotations"]) in iscrowd)}
            if scores:
                ann["score"] = s
            data["annotations"].append(ann)
    path.write_text(json.dumps(data))
    return path


SHAPE = (40, 60)


def run(tmp_path, pred_cells, gt_cells=None, **kw):
    gt = write_labels(tmp_path / "gt.tif", SHAPE, grid(5) if gt_cells is None else gt_cells)
    pred = write_pred(tmp_path / "pred.json", SHAPE, pred_cells)
    return ev.evaluate(pred, gt, **kw)


def test_dsb_score_is_the_mean_over_iou_thresholds(tmp_path):
    # GT: 5 squares of 6 x 6. Predictions: the first exact (IoU 1); the second shifted by one column (IoU 30/42
    # = 0.714: a TP up to 0.70, missed from 0.75 on); the rest missing.
    cells = grid(5)
    r0, c0, m, s = cells[1]
    r = run(tmp_path, [cells[0], (r0, c0 + 1, m, s)])
    # at IoU 0.50..0.70 (5 thresholds): TP 2, FP 0, FN 3 -> 2/5; at 0.75..0.95 (5): TP 1, FP 1, FN 4 -> 1/6
    expected = (5 * 2 / 5 + 5 * 1 / 6) / 10
    assert r.images[0]["dsb_score"] == pytest.approx(expected)
    assert r.mean_over_images["dsb_score"] == pytest.approx(expected)
    (pred,), (gt,) = (ev.load_image_masks(tmp_path / n).values() for n in ("pred.json", "gt.tif"))
    assert ev.dsb_score(pred, gt) == pytest.approx(expected)


def test_perfect_prediction_scores_one_everywhere(tmp_path):
    r = run(tmp_path, grid(5))
    p = r.pooled
    assert (p["tp"], p["fp"], p["fn"], p["true_count"], p["pred_count"]) == (5, 0, 0, 5, 5)
    assert p["precision"] == p["recall"] == p["f1"] == p["ap_tp"] == p["mean_matched_iou"] == 1.0
    assert r.coco["ap"] == r.coco["ap50"] == r.coco["ap75"] == r.coco["ar"] == 1.0
    assert r.coco["max_dets"] >= 1000
    assert p["count_error"] == 0 and r.median_rel_count_error == 0.0
    assert r.mean_over_images == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "ap_tp": 1.0, "dsb_score": 1.0}


def test_one_missed_cell(tmp_path):
    r = run(tmp_path, grid(5)[:4])
    p = r.pooled
    assert (p["tp"], p["fp"], p["fn"]) == (4, 0, 1)
    assert p["ap_tp"] == pytest.approx(4 / 5) and p["recall"] == pytest.approx(4 / 5) and p["precision"] == 1.0
    assert p["count_error"] == -1 and r.images[0]["rel_count_error"] == pytest.approx(0.2)
    assert r.coco["ap50"] == pytest.approx(0.8, abs=0.01)  # COCO's 101-point recall grid


def test_a_true_mask_with_no_pixel_in_its_image_is_left_out_and_said(tmp_path, caplog):
    gt = write_coco(tmp_path / "gt.json", [("img.png", 1, SHAPE, grid(5))])
    data = json.loads(gt.read_text())
    data["annotations"].append({"id": 99, "image_id": 1, "category_id": 1, "iscrowd": 0,
                                "segmentation": [[70, 50, 80, 50, 80, 60, 70, 60]]})     # beyond the 60 x 40 image
    gt.write_text(json.dumps(data))
    pred = write_pred(tmp_path / "pred.json", SHAPE, grid(5))
    r = ev.evaluate(pred, gt)
    p = r.pooled
    assert (p["tp"], p["fp"], p["fn"], p["true_count"]) == (5, 0, 0, 5)   # not a nucleus missed
    assert any("1 mask(s)" in m and "no pixel inside" in m and "99" in m for m in caplog.messages)


def test_an_image_without_predictions_leaves_the_best_threshold_to_the_others(tmp_path):
    shape = SHAPE
    gt = write_coco(tmp_path / "gt.json", [("a.png", 1, shape, grid(5)), ("b.png", 2, shape, grid(3))])
    cells = grid(5, score=0.9)[:4] + [rect(30, 50, 6, 6, 0.3)]           # 4 found, 1 false at a low score
    pred = write_coco(tmp_path / "pred.json", [("a.png", 1, shape, cells), ("b.png", 2, shape, [])], scores=True)
    r = ev.evaluate(pred, gt)
    assert r.best_threshold is not None and r.best_threshold > 0.3        # the false one cut


def _results_list(path: Path, images) -> Path:
    """A COCO results list as pycocotools and detectron2 write it: [{image_id, segmentation, score}], no entry for
    an image without detections. images = [(id, (h, w), cells)]."""
    results = [{"image_id": iid, "category_id": 1, "score": s, "segmentation": crop_rle(m, r0, c0, h, w)}
               for iid, (h, w), cells in images for r0, c0, m, s in cells]
    path.write_text(json.dumps(results))
    return path


def test_an_image_a_results_list_leaves_out_had_no_detections_its_nuclei_are_missed(tmp_path):
    gt = write_coco(tmp_path / "gt.json", [("a.png", 1, SHAPE, grid(5)), ("b.png", 2, SHAPE, grid(3))])
    r = ev.evaluate(_results_list(tmp_path / "res.json", [(1, SHAPE, grid(5))]), gt)
    p = r.pooled
    assert len(r.images) == 2 and (p["tp"], p["fp"], p["fn"], p["true_count"]) == (5, 0, 3, 8)
    assert r.coco["ap50"] == pytest.approx(5 / 8, abs=0.02)
    nothing = ev.evaluate(_results_list(tmp_path / "none.json", []), gt)        # a model that found nothing
    assert (nothing.pooled["tp"], nothing.pooled["fn"]) == (0, 8)


@pytest.mark.parametrize("score, counts, words", [
    (None, None, "expected a number as the score"), ("high", None, "expected a number as the score"),
    (float("nan"), None, "expected a number as the score"), (0.9, "!!!garbage", "expected a valid RLE mask"),
])
def test_a_bad_score_or_rle_in_a_results_list_is_one_line(tmp_path, score, counts, words):
    results = json.loads(_results_list(tmp_path / "res.json", [(1, SHAPE, grid(2))]).read_text())
    results[1]["score"] = score
    if counts is not None:
        results[1]["segmentation"]["counts"] = counts
    (tmp_path / "res.json").write_text(json.dumps(results))
    gt = write_coco(tmp_path / "gt.json", [("a.png", 1, SHAPE, grid(2))])
    with pytest.raises(EvaluationError, match=words):
        ev.evaluate(tmp_path / "res.json", gt)


def test_images_pair_by_the_name_that_pairs_the_most(tmp_path):
    """One prediction named as its ground truth, the others by stem only (another folder and extension): all pair."""
    gt = write_coco(tmp_path / "gt.json", [(f"images/f{k}.jpg", k, SHAPE, grid(3)) for k in (1, 2, 3)])
    names = ["images/f1.jpg", "preds/f2.png", "preds/f3.png"]
    pred = write_coco(tmp_path / "pred.json", [(n, k, SHAPE, grid(3)) for n, k in zip(names, (7, 8, 9))], scores=True)
    r = ev.evaluate(pred, gt)
    assert len(r.images) == 3 and r.pooled["tp"] == 9


def test_one_false_positive(tmp_path):
    r = run(tmp_path, grid(5) + [rect(30, 50, 5, 5, 0.3)])  # on background
    p = r.pooled
    assert (p["tp"], p["fp"], p["fn"]) == (5, 1, 0)
    assert p["ap_tp"] == pytest.approx(5 / 6) and p["precision"] == pytest.approx(5 / 6) and p["recall"] == 1.0
    assert p["f1"] == pytest.approx(10 / 11) and p["count_error"] == 1
    assert r.coco["ap50"] == 1.0  # the FP scores lowest: COCO AP does not see it, TP/(TP+FP+FN) does


def test_duplicate_prediction_is_a_false_positive(tmp_path):
    dup = rect(3, 2, 6, 6, 0.95)  # cell 0 shifted by one row: IoU 30/42 = 0.71, higher score
    r = run(tmp_path, grid(5) + [dup])
    p = r.pooled
    assert (p["tp"], p["fp"], p["fn"]) == (5, 1, 0)
    assert p["ap_tp"] == pytest.approx(5 / 6)
    assert p["mean_matched_iou"] == 1.0  # the exact copy is matched, the duplicate left over


def test_iou_threshold_decides_a_poor_overlap(tmp_path):
    poor, edge = rect(2, 5, 6, 6), rect(2, 14, 6, 6)  # cell 0 moved 3 px: IoU 18/54; cell 1 by 2 px: 24/48
    r = run(tmp_path, [poor, edge], gt_cells=grid(2))
    assert (r.pooled["tp"], r.pooled["fp"], r.pooled["fn"]) == (1, 1, 1)  # IoU exactly 0.5 counts
    assert r.pooled["mean_matched_iou"] == pytest.approx(0.5)
    r = ev.evaluate(tmp_path / "pred.json", tmp_path / "gt.tif", iou=0.3)
    assert (r.pooled["tp"], r.pooled["fp"], r.pooled["fn"]) == (2, 0, 0)
    assert r.coco["ap50"] == pytest.approx(0.5 * 51 / 101)  # FP ranked first (equal scores); COCO keeps .50:.95


def test_hungarian_beats_greedy_on_overlapping_gt(tmp_path):
    # GT cells overlap (allowed in COCO). Greedy by IoU takes A-G1 (0.82) and leaves B unmatched;
    # the one-to-one optimum is A-G2 (0.67) + B-G1 (0.70).
    g1, g2 = rect(0, 0, 10, 10), rect(0, 3, 10, 10)
    a, b = rect(0, 1, 10, 10), rect(0, 0, 10, 7)
    gt = write_coco(tmp_path / "gt.json", [("img.png", 1, (20, 20), [g1, g2])])
    pred = write_pred(tmp_path / "pred.json", (20, 20), [a, b])
    r = ev.evaluate(pred, gt)
    assert (r.pooled["tp"], r.pooled["fp"], r.pooled["fn"]) == (2, 0, 0)
    assert r.pooled["mean_matched_iou"] == pytest.approx((8 / 12 + 7 / 10) / 2)


def test_empty_images_conventions(tmp_path):
    full = grid(3)
    gt = write_coco(tmp_path / "gt.json", [("a.png", 1, SHAPE, full), ("empty.png", 2, SHAPE, []),
                                           ("missed.png", 3, SHAPE, full)])
    pred = write_coco(tmp_path / "pred.json", [("a.png", 1, SHAPE, full[:2]), ("empty.png", 2, SHAPE, []),
                                               ("missed.png", 3, SHAPE, [])], scores=True)
    r = ev.evaluate(pred, gt)
    by = {im["image"]: im for im in r.images}
    empty, missed = by["empty.png"], by["missed.png"]
    # nothing to find, nothing found: perfect (and defined: no division by zero)
    assert (empty["tp"], empty["fp"], empty["fn"]) == (0, 0, 0)
    assert empty["precision"] == empty["recall"] == empty["f1"] == empty["ap_tp"] == 1.0
    assert empty["rel_count_error"] == 0.0 and empty["mean_matched_iou"] is None
    # cells present, nothing predicted: zero
    assert (missed["tp"], missed["fn"]) == (0, 3)
    assert missed["precision"] == missed["recall"] == missed["f1"] == missed["ap_tp"] == 0.0
    assert missed["rel_count_error"] == 1.0
    assert (r.pooled["tp"], r.pooled["fp"], r.pooled["fn"]) == (2, 0, 4)  # summed over images
    assert r.pooled["ap_tp"] == pytest.approx(2 / 6) and r.pooled["rel_count_error"] == pytest.approx(4 / 6)
    assert r.mean_over_images["ap_tp"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert r.median_rel_count_error == pytest.approx(1 / 3)  # of [1/3, 0, 1]
    assert r.coco["ap50"] == pytest.approx(34 / 101)  # precision 1 up to recall 2/6 on COCO's 101-point grid


def test_no_cells_at_all_is_defined(tmp_path):
    r = run(tmp_path, [], gt_cells=[])
    assert r.pooled["ap_tp"] == r.pooled["f1"] == 1.0 and r.pooled["true_count"] == 0
    assert r.coco["ap"] is None  # COCO AP is undefined without GT: null, not -1 or NaN
    json.dumps(r.to_dict(), allow_nan=False)


def test_sweep_picks_the_threshold_above_the_false_positives(tmp_path):
    good = [rect(*c[:2], 6, 6, s) for c, s in zip(grid(4), [0.8, 0.7, 0.65, 0.6])]
    bad = [rect(30, 40, 5, 5, 0.4), rect(30, 50, 5, 5, 0.45)]
    r = run(tmp_path, good + bad, gt_cells=grid(4))
    f1 = {s["threshold"]: s["f1"] for s in r.sweep}
    count = {s["threshold"]: s["pred_count"] for s in r.sweep}
    assert [s["threshold"] for s in r.sweep] == pytest.approx(np.arange(0.3, 0.951, 0.05))
    assert f1[0.3] == f1[0.4] == pytest.approx(8 / 10) and f1[0.45] == pytest.approx(8 / 9)
    assert f1[0.5] == f1[0.55] == f1[0.6] == 1.0 and f1[0.65] == pytest.approx(6 / 7) and f1[0.85] == 0.0
    assert count[0.3] == 6 and count[0.6] == 4 and count[0.9] == 0
    assert r.best_threshold == 0.5 and r.best_f1 == 1.0  # ties at 0.5-0.6: the lower one
    assert r.scores_available


def test_best_threshold_is_not_below_the_cut_the_predictions_already_had(tmp_path):
    # Predictions written with a pipeline threshold of 0.6: F1 is flat from 0.3 to 0.6 because nothing
    # below 0.6 exists, so 0.3 would be an unmeasured choice; 0.6 is the lowest measured one.
    cells = [rect(*c[:2], 6, 6, s) for c, s in zip(grid(4), [0.62, 0.7, 0.8, 0.9])]
    r = run(tmp_path, cells, gt_cells=grid(4))
    assert {s["f1"] for s in r.sweep if s["threshold"] <= 0.6} == {1.0}
    assert r.best_threshold == 0.6 and r.min_score == 0.62
    assert [s["threshold"] for s in r.sweep if not s["eligible"]] == pytest.approx([0.3, 0.35, 0.4, 0.45, 0.5, 0.55])


def test_label_image_predictions_have_no_best_threshold(tmp_path):
    gt = write_labels(tmp_path / "gt.tif", SHAPE, grid(5))
    r = ev.evaluate(write_labels(tmp_path / "pred.tif", SHAPE, grid(4)), gt)
    assert not r.scores_available and r.best_threshold is None and r.min_score is None
    assert r.pooled["tp"] == 4 and all(s["pred_count"] == 4 for s in r.sweep)


def test_more_than_100_cells_in_one_image_all_count(tmp_path):
    cells = [rect(1 + 5 * (k // 20), 1 + 5 * (k % 20), 3, 3, 0.5 + k / 1000) for k in range(300)]
    shape = (80, 100)
    gt = write_labels(tmp_path / "gt.tif", shape, cells)
    pred = write_pred(tmp_path / "pred.json", shape, cells)
    r = ev.evaluate(pred, gt)
    assert r.pooled["tp"] == 300 and r.pooled["pred_count"] == 300
    assert r.coco["max_dets"] >= 1000
    assert r.coco["ap50"] == 1.0 and r.coco["ap"] == 1.0  # with maxDets=100 recall would stop at 1/3


def test_label_image_and_coco_inputs_agree(tmp_path):
    gt_cells = [disc(2, 2, 9), disc(3, 15, 7), rect(20, 5, 8, 12), disc(22, 30, 11), rect(5, 45, 6, 6)]
    pred_cells = [disc(3, 2, 9, 1.0), disc(3, 17, 7, 1.0), rect(20, 5, 8, 10, 1.0), disc(23, 33, 8, 1.0),
                  rect(30, 50, 5, 5, 1.0)]
    gt_tif = write_labels(tmp_path / "gt.tif", SHAPE, gt_cells)
    gt_json = write_coco(tmp_path / "gt.json", [("img.png", 7, SHAPE, gt_cells)])  # paired by name
    pred_tif = write_labels(tmp_path / "pred.tif", SHAPE, pred_cells)
    pred_json = write_pred(tmp_path / "pred.json", SHAPE, pred_cells)
    results = [ev.evaluate(p, g).to_dict() for p, g in
               [(pred_json, gt_tif), (pred_json, gt_json), (pred_tif, gt_tif), (pred_tif, gt_json)]]
    first = results[0]
    assert 0 < first["pooled"]["tp"] < 5 and first["pooled"]["fp"] > 0  # a case with something to get wrong
    assert 0 < first["coco"]["ap"] < 1
    for other in results[1:]:
        for key in ("pooled", "coco", "mean_over_images", "median_rel_count_error"):
            assert other[key] == first[key], key
        assert [{k: v for k, v in im.items() if k != "image"} for im in other["images"]] == \
               [{k: v for k, v in im.items() if k != "image"} for im in first["images"]]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools decode
def test_label_image_read_in_tiles_gives_the_same_masks(tmp_path, monkeypatch):
    import pycocotools.mask as mu
    cells = [disc(10, 10, 13), rect(0, 14, 20, 4), disc(25, 28, 11), rect(33, 0, 7, 60)]
    path = write_labels(tmp_path / "gt.tif", SHAPE, cells)
    whole = ev.load_image_masks(path)["gt.tif"]
    monkeypatch.setattr(ev, "LABEL_TILE", 16)  # every cell crosses a tile edge
    tiled = ev.load_image_masks(path)["gt.tif"]
    assert len(whole) == len(tiled) == 4
    assert np.array_equal(whole.boxes, tiled.boxes)
    labels = tifffile.imread(path)
    for k in range(4):
        assert np.array_equal(mu.decode(tiled.rles[k]).astype(bool), labels == k + 1)
    assert np.array_equal(tiled.boxes[3], [33, 0, 40, 60])


def test_images_are_paired_by_file_name_before_id(tmp_path):
    gt = write_coco(tmp_path / "gt.json", [("dir/a.png", 1, SHAPE, grid(2)), ("dir/b.png", 2, SHAPE, grid(4))])
    pred = write_pred(tmp_path / "pred.json", SHAPE, grid(4), file_name="b.png")  # image id 1
    r = ev.evaluate(pred, gt)
    assert [im["image"] for im in r.images] == ["dir/b.png"]
    assert r.pooled["tp"] == 4 and r.pooled["fp"] == 0
    assert r.images_unmatched_gt == ["dir/a.png"]


def test_prediction_on_a_crowd_region_is_not_a_false_positive(tmp_path):
    gt = write_coco(tmp_path / "gt.json", [("img.png", 1, SHAPE, grid(2) + [rect(25, 30, 12, 25)])],
                    iscrowd={2})
    pred = write_pred(tmp_path / "pred.json", SHAPE, grid(2) + [rect(27, 33, 6, 6)])
    r = ev.evaluate(pred, gt)
    assert (r.pooled["tp"], r.pooled["fp"], r.pooled["fn"], r.pooled["ignored"]) == (2, 0, 0, 1)
    # nor a counted nucleus: the true count leaves the crowd region out, so the count compared does too
    assert (r.pooled["true_count"], r.pooled["pred_count"], r.pooled["count_error"]) == (2, 2, 0)
    assert r.images[0]["rel_count_error"] == 0


def test_box_pairs_matches_brute_force():
    rng = np.random.default_rng(0)
    def boxes(n):
        r, c = rng.integers(0, 200, (2, n))
        return np.stack([r, c, r + rng.integers(0, 30, n), c + rng.integers(1, 30, n)], 1)
    a, b = boxes(700), boxes(500)
    i, j = box_pairs(a, b, chunk=64)
    brute = ((a[:, None, 0] < b[None, :, 2]) & (b[None, :, 0] < a[:, None, 2])
             & (a[:, None, 1] < b[None, :, 3]) & (b[None, :, 1] < a[:, None, 3]))
    assert sorted(zip(i.tolist(), j.tolist())) == sorted(zip(*np.nonzero(brute)))
    assert len(i) > 100


@pytest.mark.parametrize("setup, message", [
    (lambda d: (d / "missing.json", write_labels(d / "gt.tif", SHAPE, grid(2))), "does not exist"),
    (lambda d: ((d / "p.json").write_text('{"foo": 1}') and d / "p.json", write_labels(d / "gt.tif", SHAPE, grid(2))),
     "expected a COCO instance JSON"),
    (lambda d: ((d / "p.json").write_text("{not json") and d / "p.json", write_labels(d / "gt.tif", SHAPE, grid(2))),
     "is not valid JSON"),
    (lambda d: (write_coco(d / "p.json", [("c.png", 7, SHAPE, grid(1))], scores=True),
                write_coco(d / "g.json", [("a.png", 1, SHAPE, grid(1)), ("b.png", 2, SHAPE, [])])),
     "expected PRED and GT to share images"),
    (lambda d: (write_pred(d / "p.json", (40, 50), grid(2)), write_labels(d / "gt.tif", SHAPE, grid(2))),
     "same size"),
    (lambda d: (d, write_labels(d / "gt.tif", SHAPE, grid(2))), "predictions.coco.json"),
])
def test_bad_inputs_raise_one_line_errors(tmp_path, setup, message):
    pred, gt = setup(tmp_path)
    with pytest.raises(CellsegError, match=message) as info:
        ev.evaluate(pred, gt)
    assert "\n" not in str(info.value)


def test_result_folder_is_read_through_its_predictions(tmp_path):
    folder = tmp_path / "img.cellseg"
    folder.mkdir()
    write_pred(folder / "predictions.coco.json", SHAPE, grid(5)[:3])
    r = ev.evaluate(folder, write_labels(tmp_path / "gt.tif", SHAPE, grid(5)))
    assert (r.pooled["tp"], r.pooled["fn"]) == (3, 2)


@pytest.mark.slow
def test_cli_writes_metrics_plot_and_table(tmp_path):
    gt = write_labels(tmp_path / "gt.tif", SHAPE, grid(5))
    pred = write_pred(tmp_path / "pred.json", SHAPE, grid(4) + [rect(30, 50, 5, 5, 0.4)])
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["evaluate", str(pred), "--gt", str(gt), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "TP 4 FP 1 FN 1" in result.stdout and "best score threshold (max F1): 0.45" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pooled"]["tp"] == 4 and metrics["best_threshold"] == 0.45
    assert metrics["coco"]["max_dets"] >= 1000 and len(metrics["sweep"]) == 14
    assert (out / "threshold_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (out / "per_image.csv").read_text().splitlines()
    assert rows[0].startswith("image,height,width,true_count,pred_count") and rows[1].startswith("gt.tif,40,60,5,5,")
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "per_image.csv", "threshold_sweep.png"]


@pytest.mark.slow
def test_cli_never_overwrites_files_it_did_not_write(tmp_path):
    gt = write_labels(tmp_path / "gt.tif", SHAPE, grid(5))
    pred = write_pred(tmp_path / "pred.json", SHAPE, grid(4))
    out = tmp_path / "my_analysis"
    out.mkdir()
    (out / "metrics.json").write_text('{"my": "statistics"}')
    result = CliRunner().invoke(main, ["evaluate", str(pred), "--gt", str(gt), "--out", str(out)])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "metrics.json" in result.stderr and "did not write" in result.stderr
    assert result.stdout == ""          # refused before scoring, not after
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]
    assert (out / "metrics.json").read_text() == '{"my": "statistics"}'
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    result = CliRunner().invoke(main, ["evaluate", str(pred), "--gt", str(gt), "--out", str(a_file)])
    assert result.exit_code == 1 and result.stdout == "" and result.stderr.count("\n") == 1
    assert "expected a folder at" in result.stderr and "found a file" in result.stderr
    assert a_file.read_text() == "mine"
    (out / "metrics.json").unlink()
    for _ in range(2):            # an earlier evaluation of its own is replaced
        result = CliRunner().invoke(main, ["evaluate", str(pred), "--gt", str(gt), "--out", str(out)])
        assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["pooled"]["tp"] == 4


def test_cli_size_mismatch_is_a_one_line_error(tmp_path):
    gt = write_labels(tmp_path / "gt.tif", SHAPE, grid(2))
    pred = write_pred(tmp_path / "pred.json", (40, 50), grid(2))
    result = CliRunner().invoke(main, ["evaluate", str(pred), "--gt", str(gt), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.stderr.startswith("cellseg: error: expected PRED and GT images of the same size")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_coco_ap_equals_stock_cocoeval_at_the_last_maxdets(tmp_path):
    """Our COCOeval (IoUs fed from the box-pruned sparse table) gives stock COCOeval's precision array."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    rng = np.random.default_rng(1)
    shape = (120, 150)

    def random_cells(n):
        return [rect(int(rng.integers(0, 108)), int(rng.integers(0, 138)), *(int(v) for v in rng.integers(4, 12, 2)),
                     float(rng.random())) for _ in range(n)]
    gt_cells = random_cells(150)
    pred_cells = [(min(108, max(0, r + int(rng.integers(-2, 3)))), c, m, float(rng.random()))
                  for r, c, m, _ in gt_cells[:120]] + random_cells(60)
    gt = write_coco(tmp_path / "gt.json", [("img.png", 1, shape, gt_cells)], iscrowd={3})
    pred = write_coco(tmp_path / "pred.json", [("img.png", 1, shape, pred_cells)], scores=True)
    mine = ev.evaluate(pred, gt).coco
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt))
        coco_dt = coco_gt.loadRes([{k: a[k] for k in ("image_id", "category_id", "segmentation", "score")}
                                   for a in json.loads(pred.read_text())["annotations"]])
        stock = COCOeval(coco_gt, coco_dt, "segm")
        stock.params.useCats, stock.params.maxDets = 0, [1, 100, 1000]
        stock.evaluate()
        stock.accumulate()
    p = stock.eval["precision"][:, :, 0, 0, -1]
    assert mine["ap"] == pytest.approx(p[p > -1].mean())
    assert mine["ap50"] == pytest.approx(p[0][p[0] > -1].mean())
    assert mine["ap75"] == pytest.approx(p[5][p[5] > -1].mean())
    assert 0.1 < mine["ap"] < 0.5 < mine["ap50"] < 0.9  # a case with partial credit


def test_a_label_in_separate_pieces_is_scored_as_one_cell_with_a_warning(tmp_path, caplog):
    """A label image whose label covers two nuclei apart (a dataset's Wilms tumour section had 48 of 55 so) is scored
    as it says, one cell a label, and `cellseg evaluate` warns: each nucleus found there would count as false."""
    labels = np.zeros((60, 60), np.uint16)
    labels[2:12, 2:12] = 1
    labels[40:50, 40:50] = 1          # label 1: two pieces of 100 px
    labels[20:30, 2:12] = 2
    labels[35, 2] = 2                 # label 2: one piece and a stray pixel, no warning for it
    tifffile.imwrite(tmp_path / "gt.tif", labels)
    with caplog.at_level("WARNING"):
        (gt,) = ev.load_image_masks(tmp_path / "gt.tif").values()
    assert len(gt) == 2
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "1 of its 2 labels are each made of separate pieces of 30 px or more (e.g. label 1)" \
        in warned[0]
    caplog.clear()
    labels[40:50, 40:50] = 3
    tifffile.imwrite(tmp_path / "gt.tif", labels)
    with caplog.at_level("WARNING"):
        ev.load_image_masks(tmp_path / "gt.tif")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
