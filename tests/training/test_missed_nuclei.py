"""references/nuclei/missed_nuclei.py: what each annotated nucleus is (size, elongation, contact, stain) and what the
predictions did with the ones they missed (absent, merged)."""

from __future__ import annotations

import numpy as np
import tifffile

from cellseg.evaluation import load_image_masks, match, pair_iou
from references.nuclei.missed_nuclei import nucleus_features, outcome


def disc(labels: np.ndarray, row: int, col: int, radius: float, value: int, stretch: float = 1.0) -> None:
    yy, xx = np.mgrid[:labels.shape[0], :labels.shape[1]]
    labels[((yy - row) / radius) ** 2 + ((xx - col) / (radius * stretch)) ** 2 <= 1] = value


def test_features_and_outcomes_of_touching_elongated_and_dim_nuclei(tmp_path):
    truth = np.zeros((80, 120), np.int32)
    disc(truth, 20, 20, 8, 1)
    disc(truth, 20, 36, 8, 2)          # touches 1
    disc(truth, 60, 60, 4, 3, stretch=4)   # 4:1, apart
    disc(truth, 20, 90, 8, 4)          # dim, apart
    image = np.where(truth > 0, 200, 10).astype(np.uint8)
    image[truth == 4] = 50
    features = nucleus_features(truth, image, brightfield=False)
    assert list(features["label"]) == [1, 2, 3, 4]
    assert list(features["touching"]) == [1, 1, 0, 0]
    assert features["elongation"][2] > 3 and features["elongation"][0] < 1.2
    assert features["tilt"][2] < 1 and np.isnan(features["tilt"][0])
    assert features["stain"][3] < 0.3 and abs(features["stain"][0] - 1) < 0.01
    pred = np.zeros_like(truth)
    from scipy import ndimage
    pred[ndimage.binary_dilation((truth == 1) | (truth == 2), iterations=3)] = 1   # the touching pair found as one
    pred[truth == 4] = 2
    tifffile.imwrite(tmp_path / "truth.tif", truth)
    tifffile.imwrite(tmp_path / "pred.tif", pred)
    (t,), (p,) = load_image_masks(tmp_path / "truth.tif").values(), load_image_masks(tmp_path / "pred.tif").values()
    ious = pair_iou(p, t)
    result = match(p, t, 0.5, ious=ious)
    matched = np.zeros(len(t), bool)
    matched[result.pairs[:, 1]] = True
    assert list(outcome(p, t, matched, ious)) == ["merged", "merged", "absent", "found"]
