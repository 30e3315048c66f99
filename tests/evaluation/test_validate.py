"""Validation of a bundle on held-out images (`cellseg train --val`, references/nuclei/validate_bundle.py): images go
through the real pipeline, the best-F1 score threshold is chosen and becomes the bundle's default."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tifffile
import tomllib

from cellseg.bundles import load_bundle
from cellseg.evaluation import above, annotated_images, card_figures, predict, score, validate_bundle
from cellseg.geometry import TileDetections

from ..helpers import DATA, LabelReadingDetector, coco_from_labels


class DetectorWithFalseCells(LabelReadingDetector):
    """The true cells at score 0.9, plus one made-up 8 x 8 cell on background in every tile at score 0.45."""

    def _tile(self, tile, shape) -> TileDetections:
        det = super()._tile(tile, shape)
        crop = self.labels[tile.read.slices()]
        for r in range(0, shape[0] - 8, 8):
            for c in range(0, shape[1] - 8, 8):
                row, col = tile.read.row0 + r + 4, tile.read.col0 + c + 4     # owned by this tile: its core
                if not crop[r:r + 8, c:c + 8].any() and tile.core.row0 <= row < tile.core.row1 \
                        and tile.core.col0 <= col < tile.core.col1:
                    return TileDetections(np.vstack([det.boxes, [[r, c, r + 8, c + 8]]]),
                                          det.masks + [np.ones((8, 8), bool)],
                                          np.append(det.scores, np.float32(0.45)), np.append(det.class_ids, 1))
        return det


@pytest.mark.slow
def test_the_threshold_that_drops_the_false_cells_is_chosen(tmp_path):
    ann, n_cells = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    gt, paths = annotated_images(ann)
    detector = DetectorWithFalseCells(tifffile.imread(DATA / "dsb_fluo_labels.tif"))
    predictions = predict(detector, paths, tmp_path / "work")
    (name,) = predictions
    assert predictions[name].file_name == name and len(predictions[name]) > n_cells
    validation = score(predictions, gt, fallback_threshold=0.5)
    assert validation.at_floor.pooled["fp"] == len(predictions[name]) - n_cells > 0
    assert 0.45 < validation.threshold <= 0.9
    assert validation.report.pooled["f1"] == 1.0 and validation.report.pooled["pred_count"] == n_cells
    assert card_figures(validation.report)["ap50_tp_fp_fn_mean_over_images"] == 1.0
    assert len(above(predictions[name], 0.5)) == n_cells


@pytest.mark.slow
def test_validate_bundle_stores_the_threshold_and_figures(tmp_path, tiny_bundle):
    bundle_dir = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    weights = (bundle_dir / "weights.safetensors").read_bytes()
    ann, _ = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    validation = validate_bundle(bundle_dir, ann, bundle_dir / "validation", device="cpu", progress=False)
    bundle = load_bundle(bundle_dir)
    assert bundle.score_threshold == validation.threshold
    metrics = bundle.card["metrics"]
    assert metrics["score_threshold"] == validation.threshold and metrics["val_images"] == 1
    assert metrics["all"] == card_figures(validation.report)
    assert bundle.card["threshold_sweep"]["thresholds"][0] == pytest.approx(0.3)
    assert (bundle_dir / "weights.safetensors").read_bytes() == weights          # only model.toml changes
    assert sorted(p.name for p in (bundle_dir / "validation").iterdir()) == [
        "metrics.json", "per_image.csv", "threshold_sweep.png"]                    # result folders removed
    meta = tomllib.loads((bundle_dir / "model.toml").read_text())
    assert meta["inference"]["score_threshold"] == validation.threshold


def test_missing_validation_images_fail_before_any_work(tmp_path):
    from cellseg.errors import CellsegError
    ann, _ = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    (tmp_path / "dsb_fluo.png").unlink()
    with pytest.raises(CellsegError, match="1 missing"):
        annotated_images(ann)


@pytest.mark.slow
def test_validation_takes_the_mask_threshold_of_the_bundle_as_counting_does(tiny_bundle, tmp_path):
    """A count takes the bundle's mask threshold (chosen with its score thresholds) unless the protocol sets one, and
    run.json says which; validation takes it the same way, so validated cells are counted cells; an explicit one
    (validate_bundle.py --mask-threshold) overrides it."""
    import dataclasses

    from cellseg.bundles import update_bundle_metadata
    from cellseg.errors import ParameterError
    from cellseg.evaluation import VALIDATION_PROTOCOL, validation_detector
    from cellseg.run import CellCounter
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_bundle, folder)
    bundle = update_bundle_metadata(folder, mask_threshold=0.3)
    counter = CellCounter.load(VALIDATION_PROTOCOL.replace(model=str(folder)), "cpu")
    assert validation_detector(bundle, "cpu").mask_threshold == counter.detector.mask_threshold == 0.3
    assert counter.run_info.model["mask_threshold"] == 0.3
    protocol_says = CellCounter.load(VALIDATION_PROTOCOL.replace(model=str(folder), mask_threshold=0.6), "cpu")
    assert protocol_says.detector.mask_threshold == protocol_says.run_info.model["mask_threshold"] == 0.6
    assert validation_detector(bundle, "cpu", mask_threshold=0.4).mask_threshold == 0.4
    assert validation_detector(dataclasses.replace(bundle, mask_threshold=0.5), "cpu").mask_threshold == 0.5
    with pytest.raises(ParameterError, match="mask_threshold: expected between 0.0 and 1.0, got 1.5"):
        validation_detector(bundle, "cpu", mask_threshold=1.5)


def _coco_of(folder, fields) -> object:
    """A COCO file of several images: fields are (file name, pixels, instance labels)."""
    import json

    import pycocotools.mask as mask_utils
    from PIL import Image
    images, anns = [], []
    for image_id, (name, pixels, labels) in enumerate(fields, start=1):
        Image.fromarray(pixels).save(folder / name)
        images.append({"id": image_id, "file_name": name, "height": labels.shape[0], "width": labels.shape[1]})
        for k in np.unique(labels[labels > 0]):
            rle = mask_utils.encode(np.asfortranarray((labels == k).astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "segmentation": rle,
                         "iscrowd": 0, "area": float(mask_utils.area(rle)), "bbox": list(mask_utils.toBbox(rle))})
    path = folder / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "nucleus"}]}))
    return path


@pytest.mark.slow
def test_an_image_without_cells_leaves_the_threshold_chosen_on_the_others(tmp_path):
    """The model finds cells in one held-out image and none in another: the threshold is still the best-F1 one
    (an image without cells has no scores to lack)."""
    from PIL import Image
    pixels = np.asarray(Image.open(DATA / "dsb_fluo.png"))
    labels = tifffile.imread(DATA / "dsb_fluo_labels.tif")
    found = labels.copy()
    found[:128, :128] = 0                           # what the detector finds: nothing in the top-left corner
    ann = _coco_of(tmp_path, [("a.png", pixels, found), ("corner.png", pixels[:100, :100], labels[:100, :100])])
    gt, paths = annotated_images(ann)
    predictions = predict(LabelReadingDetector(found, score=0.9), paths, tmp_path / "work")
    assert len(predictions["corner.png"]) == 0 and len(predictions["a.png"]) > 0
    validation = score(predictions, gt, fallback_threshold=0.5)
    assert validation.threshold == pytest.approx(0.9) and validation.tuned    # the cells' score, not the fallback
    assert validation.lines()[-1].startswith("best score threshold (max F1): 0.90")


@pytest.mark.slow
def test_train_val_of_a_model_that_finds_no_cells_says_no_threshold_was_chosen(tmp_path, tiny_bundle, monkeypatch,
                                                                                caplog):
    """`cellseg train --init none --val` of a network that finds nothing: no line may say its predictions carry no
    scores or that the default threshold is the best F1, and the counts' warnings name the user's protocol."""
    from ..helpers import invoke
    ann, _ = coco_from_labels(tmp_path, DATA / "dsb_he.png", DATA / "dsb_he_labels.tif")   # H&E: warned about

    def trained(items, classes, out, settings, **kwargs):       # the training itself is not what is tested
        shutil.copytree(tiny_bundle, out)
        return out
    monkeypatch.setattr("cellseg.training.train", trained)
    monkeypatch.setattr("cellseg.evaluation.validate.validation_detector",
                        lambda bundle, device, **kwargs: LabelReadingDetector(np.zeros((256, 320), np.uint16)))
    out = tmp_path / "scratch"
    result = invoke(["train", "--data", ann, "--val", ann, "--init", "none", "--steps", 1, "--out", out,
                     "--device", "cpu", "-q"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "0 predicted" in result.stdout and "carry no scores" not in result.stdout
    assert "best score threshold: none (no cells were found in these images)" in result.stdout
    assert "best F1" not in result.stdout
    assert "default score threshold 0.00 (not tuned: nothing on --val to choose it by) kept in" in result.stdout
    assert load_bundle(out).card["metrics"]["threshold_chosen_on"].startswith("none: ")
    assert "protocol fluorescence-nuclei is for fluorescence" in caplog.text
    assert "protocol validation" not in caplog.text
