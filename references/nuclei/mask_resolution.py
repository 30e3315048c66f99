"""How much does the mask head's M x M output cost the masks? The ceiling of each resolution on the held-out truth.

Issue 47 asks whether a finer mask head (56 x 56) or a PointRend point head would lift the DSB2018 score (IoU 0.5 to
0.95). Both exist because a 28 x 28 grid is coarse against large objects. This script measures what the grid itself
can represent at the scale our network sees nuclei: every held-out nucleus's own annotation is cut into an M x M
target exactly as training cuts it (torchvision's RoIAlign on the tight box, aligned=False) and pasted back exactly
as a count pastes a prediction (detector.paste_masks_at_box_size at 0.5), then compared with the annotation. A
perfect network with an M x M head can do no better than this, so the gap between the ceiling and today's score is
the network's, not the grid's.

    python -m references.nuclei.mask_resolution [--sizes 14 28 56] [--split references/nuclei/splits/v4.json]

Images are taken at the scale a count sees them (validate_bundle's): natively, except Kromp's, whose labels are
resampled (nearest) so that their median nucleus is `--nucleus-px` (the v4 bundles' 20.4 px). Prints, per modality
and mask size, the mean IoU, the share of nuclei at IoU >= 0.75 and >= 0.9, and the DSB2018 score the masks would
get with every nucleus found (one prediction per nucleus: TP/(TP + FP + FN) = TP / (2N - TP) at each threshold).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import roi_align

from cellseg.detection.detector import paste_masks_at_box_size

from .datasets import DATASET_FOLDERS, read_dataset, read_pixels

THRESHOLDS = np.arange(0.5, 1.0, 0.05)


def nuclei_of(labels: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Each labelled nucleus's boolean crop and its tight box (row0, col0, row1, col1; ends exclusive)."""
    from scipy import ndimage
    crops, boxes = [], []
    for value, found in enumerate(ndimage.find_objects(labels), start=1):
        if found is None:
            continue
        crop = labels[found] == value
        if crop.sum() < 4:      # training drops such specks too (crops.py)
            continue
        crops.append(crop)
        boxes.append([found[0].start, found[1].start, found[0].stop, found[1].stop])
    return crops, np.asarray(boxes, np.int64).reshape(-1, 4)


def round_trip_ious(crops: list[np.ndarray], boxes: np.ndarray, size: int) -> np.ndarray:
    """IoU of each nucleus with itself after an M x M training target (RoIAlign, aligned=False, on its tight box)
    pasted back as a count pastes (threshold 0.5)."""
    ious = np.zeros(len(crops))
    for k, (crop, box) in enumerate(zip(crops, boxes)):
        h, w = crop.shape
        pad = 2     # the target's samples reach half a pixel past the box; the paste's extent a cell beyond it
        canvas = np.zeros((h + 2 * pad, w + 2 * pad), np.float32)
        canvas[pad:pad + h, pad:pad + w] = crop
        xyxy = torch.tensor([[0, pad, pad, pad + w, pad + h]], dtype=torch.float32)
        target = roi_align(torch.from_numpy(canvas)[None, None], xyxy, (size, size), 1.0)   # as training cuts it
        kept_boxes, masks, kept = paste_masks_at_box_size(xyxy[:, 1:].double(), target, canvas.shape[0],
                                                          canvas.shape[1], threshold=0.5)
        if len(kept) == 0:
            continue
        pasted = np.zeros(canvas.shape, bool)
        r0, c0, r1, c1 = kept_boxes[0]
        pasted[r0:r1, c0:c1] = masks[0]
        truth = canvas > 0
        ious[k] = (pasted & truth).sum() / (pasted | truth).sum()
    return ious


def dsb_score(ious: np.ndarray) -> float:
    """Mean over IoU thresholds 0.5..0.95 of TP / (TP + FP + FN) with one prediction per nucleus."""
    n = len(ious)
    if n == 0:
        return float("nan")
    return float(np.mean([(tp := (ious > t).sum()) / (2 * n - tp) for t in THRESHOLDS]))


def resample_labels(labels: np.ndarray, factor: float) -> np.ndarray:
    """Labels zoomed by `factor` (nearest: pixel centres), as a count resamples a slide before the network sees it."""
    h, w = labels.shape
    rows = np.minimum(((np.arange(max(1, round(h * factor))) + 0.5) / factor).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(max(1, round(w * factor))) + 0.5) / factor).astype(np.int64), w - 1)
    return labels[np.ix_(rows, cols)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    p.add_argument("--split", type=Path, default=Path("references/nuclei/splits/v4.json"))
    p.add_argument("--sizes", type=int, nargs="+", default=[14, 28, 56])
    p.add_argument("--nucleus-px", type=float, default=20.4, help="the median nucleus Kromp's images are brought to")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    held = set(json.loads(args.split.read_text())["val"])
    ious: dict[tuple[str, int], list[np.ndarray]] = defaultdict(list)
    diameters: dict[str, list[float]] = defaultdict(list)
    for name, folder in DATASET_FOLDERS.items():
        for image in read_dataset(args.data_root / folder, name):
            if image.key not in held:
                continue
            _, labels = read_pixels(image)
            if name == "kromp":
                areas = np.bincount(labels.ravel())[1:]
                median = 2 * np.sqrt(np.median(areas[areas > 0]) / np.pi)
                labels = resample_labels(labels, args.nucleus_px / median)
            crops, boxes = nuclei_of(labels)
            diameters[image.modality] += list(2 * np.sqrt(np.array([c.sum() for c in crops], float) / np.pi))
            for size in args.sizes:
                ious[image.modality, size].append(round_trip_ious(crops, boxes, size))
    out = {}
    print("| held-out | nuclei (median px) | " + " | ".join(f"{s}x{s}: mean IoU / >= 0.75 / >= 0.9 / DSB2018 score"
                                                          for s in args.sizes) + " |")
    print("|---|---|" + "---|" * len(args.sizes))
    for modality in sorted(diameters):
        cells = []
        for size in args.sizes:
            v = np.concatenate(ious[modality, size])
            figures = {"mean_iou": float(v.mean()), "at_0.75": float((v >= 0.75).mean()),
                       "at_0.9": float((v >= 0.9).mean()), "dsb2018_score": dsb_score(v)}
            out.setdefault(modality, {})[str(size)] = figures
            cells.append(" / ".join(f"{figures[k]:.3f}" for k in ("mean_iou", "at_0.75", "at_0.9", "dsb2018_score")))
        d = np.asarray(diameters[modality])
        print(f"| {modality} | {len(d)} ({np.median(d):.1f}) | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
