"""Which held-out nuclei does a bundle miss? Recall at IoU 0.5 by the nucleus's size, elongation, contact with
others, crowding and stain, per modality (issue 47: "what we still miss", and whether anchors for elongated nuclei
or copy-paste of dim and touching nuclei aim at it).

Reads the predictions `validate_bundle` kept in its --out folder (run it first; nothing is predicted here) at the
bundle's own score thresholds per modality, and every held-out image's annotations and pixels. Each annotated
nucleus is measured:

- size: its equivalent diameter over the median of its image's (so a bin means the same in every dataset);
- elongation: major over minor axis (regionprops' moments);
- tilt (nuclei at least 2:1 only): degrees between the long axis and the nearer image axis;
- touching: it shares an edge with another nucleus (8-neighbourhood);
- crowding: annotated centroids within 3 median diameters of its own;
- stain: its mean stain (brightness in fluorescence, darkness in brightfield: 255 minus the gray value) over the
  median nucleus's in its image, both above the image's background (its 10th percentile of stain).

A missed nucleus is also told apart by what the predictions did there: "absent" (no prediction covers a third of
it), "merged" (one prediction covers it and another annotated nucleus, each by a third), or "other" (found, but
its mask matches at IoU < 0.5).

    python -m references.nuclei.validate_bundle --bundle cellseg/models/nuclei --out runs/val --bundle-thresholds
    python -m references.nuclei.missed_nuclei --bundle cellseg/models/nuclei --predictions runs/val [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cellseg.bundles import GRAY_SUFFIX, load_bundle
from cellseg.evaluation import above, load_image_masks, match, pair_iou

from .datasets import DATASET_DIAMETER, PROJECT_DATA_ROOT, THRESHOLD_KEY, Split
from .plot_heldout import MODALITIES
from .validate_bundle import ground_truth, image_paths

BINS = {
    "size": [0, 0.6, 0.8, 1.25, 1.6, np.inf],
    "elongation": [1, 1.5, 2, 3, np.inf],
    "touching": [0, 1, 2],
    "tilt": [0, 15, 30, 45.01],
    "crowding": [0, 3, 6, 10, np.inf],
    "stain": [-np.inf, 0.5, 0.75, 1.33, np.inf],
}


def nucleus_features(labels: np.ndarray, image: np.ndarray, brightfield: bool) -> dict[str, np.ndarray]:
    """Per label 1..N of `labels` (in order), the features the module's docstring lists."""
    from scipy import ndimage
    from skimage.measure import regionprops

    gray = image.astype(np.float32).mean(-1) if image.ndim == 3 else image.astype(np.float32)
    stain = (gray.max() - gray) if brightfield else gray
    props = regionprops(labels, intensity_image=stain)
    diameter = np.array([p.equivalent_diameter_area for p in props])
    minor = np.array([max(p.axis_minor_length, 1e-3) for p in props])
    elongation = np.array([p.axis_major_length for p in props]) / minor
    # degrees between the long axis and the nearer image axis (0-45), for nuclei at least 2:1: a tilted one has a
    # square box much larger than itself, which its neighbours' boxes overlap
    off_axis = np.abs(np.degrees([p.orientation for p in props])) % 90
    tilt = np.where(elongation >= 2, np.minimum(off_axis, 90 - off_axis), np.nan)
    background = np.percentile(stain, 10)
    mean_stain = np.array([p.intensity_mean for p in props]) - background
    centroids = np.array([p.centroid for p in props]).reshape(-1, 2)
    median_d = float(np.median(diameter)) if len(diameter) else 1.0
    from scipy.spatial import cKDTree
    tree = cKDTree(centroids)
    crowding = np.array([len(n) - 1 for n in tree.query_ball_point(centroids, 3 * median_d)])
    # touching: a larger or a smaller label among a pixel's 8 neighbours (the background left out of the smallest)
    largest = ndimage.maximum_filter(labels, size=3)
    smallest = ndimage.minimum_filter(np.where(labels > 0, labels, labels.max() + 1), size=3)
    contact = (labels > 0) & ((largest > labels) | (smallest < labels))
    touching = np.zeros(len(props), bool)
    ids = np.unique(labels[contact])
    index = {p.label: i for i, p in enumerate(props)}
    touching[[index[i] for i in ids if i in index]] = True
    return {"size": diameter / median_d, "elongation": elongation, "tilt": tilt, "touching": touching.astype(float),
            "crowding": crowding.astype(float),
            "stain": mean_stain / max(float(np.median(mean_stain)), 1e-6), "label": np.array([p.label for p in props])}


def rle_to_labels(rles: list[dict], height: int, width: int) -> np.ndarray:
    import pycocotools.mask as mask_utils
    labels = np.zeros((height, width), np.int32)
    for i, rle in enumerate(rles, 1):
        labels[mask_utils.decode(rle).astype(bool) & (labels == 0)] = i
    return labels


def outcome(pred, truth, matched: np.ndarray, ious) -> np.ndarray:
    """Per annotated nucleus: "found", "absent", "merged" or "other" (the module's docstring)."""
    import pycocotools.mask as mask_utils
    def areas(rles: list[dict]) -> np.ndarray:
        return np.array([mask_utils.area(r) for r in rles], float)
    gt_area, pred_area = areas(truth.rles), areas(pred.rles)
    # intersection from IoU: i = iou * (a + b) / (1 + iou)
    inter = ious.iou * (pred_area[ious.pred] + gt_area[ious.gt]) / (1 + ious.iou) if len(ious.iou) else ious.iou
    covers = inter >= gt_area[ious.gt] / 3
    result = np.full(len(truth), "absent", dtype=object)
    result[matched] = "found"
    per_pred_covered = np.bincount(ious.pred[covers], minlength=len(pred))
    for g in np.flatnonzero(~matched):
        cov = covers & (ious.gt == g)
        if not cov.any():
            continue
        result[g] = "merged" if (per_pred_covered[ious.pred[cov]] > 1).any() else "other"
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="the bundle whose thresholds the predictions are cut at")
    p.add_argument("--predictions", type=Path, required=True, help="validate_bundle's --out folder")
    p.add_argument("--thresholds-of", type=Path, default=None, metavar="BUNDLE",
                   help="cut the predictions at this bundle's score thresholds instead (a training snapshot, whose "
                        "own are untuned, against the bundle it started from)")
    p.add_argument("--split", type=Path, default=None, help="default: the bundle's split.json")
    p.add_argument("--data-root", type=Path, default=PROJECT_DATA_ROOT)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    from PIL import Image

    bundle = load_bundle(args.bundle)
    judge = load_bundle(args.thresholds_of) if args.thresholds_of else bundle
    split = Split.from_json(json.loads((args.split or args.bundle / "split.json").read_text()))
    modality = split.modality_of()
    keys = sorted(split.val)
    folders = {}
    for k in keys:
        diameter = DATASET_DIAMETER.get(k.split("/")[0])
        base = args.predictions / f"diameter_{diameter}" if diameter else args.predictions
        # by name, so that a run of a subset (--modality) is found too; mask_T/: a run whose modalities' mask
        # thresholds differ (validate_bundle.prediction_groups)
        found = sorted(base.glob(f"*_{Path(k).name}")) + sorted(base.glob(f"mask_*/*_{Path(k).name}"))
        if found:
            folders[k] = found[0]
    if not folders:
        raise SystemExit(f"expected validate_bundle's predictions in {args.predictions}, found none for the "
                         f"{len(keys)} held-out images of the split")
    keys = [k for k in keys if k in folders]
    truth_by_key = ground_truth(args.data_root, keys)
    paths = image_paths(args.data_root, keys)
    rows: dict[str, list] = {}
    for k in keys:
        m = modality[k]
        key = THRESHOLD_KEY[m]
        threshold = judge.threshold_for(key.removesuffix(GRAY_SUFFIX), gray=key.endswith(GRAY_SUFFIX))
        pred = above(next(iter(load_image_masks(folders[k]).values())), threshold)
        truth = truth_by_key[k]
        ious = pair_iou(pred, truth)
        result = match(pred, truth, 0.5, ious=ious)
        matched = np.zeros(len(truth), bool)
        matched[result.pairs[:, 1]] = True
        image = np.asarray(Image.open(paths[k]))
        labels = rle_to_labels(truth.rles, truth.height, truth.width)
        features = nucleus_features(labels, image[..., :3] if image.ndim == 3 else image,
                                    brightfield=THRESHOLD_KEY[m] != "fluorescence")
        index = features.pop("label") - 1          # the truth nucleus each row is
        outcomes = outcome(pred, truth, matched, ious)
        rows.setdefault(m, []).append({"features": {f: v for f, v in features.items()},
                                       "found": matched[index], "outcome": outcomes[index]})
    report = {}
    for m in [m for m in MODALITIES if m in rows]:
        found = np.concatenate([r["found"] for r in rows[m]])
        outcomes = np.concatenate([r["outcome"] for r in rows[m]])
        report[m] = {"nuclei": int(len(found)), "recall": float(found.mean()),
                     "missed": {o: int((outcomes == o).sum()) for o in ("absent", "merged", "other")}}
        print(f"\n{m}: {len(found)} nuclei, recall {found.mean():.3f}; missed: "
              + ", ".join(f"{o} {(outcomes == o).sum()}" for o in ("absent", "merged", "other")))
        for name, edges in BINS.items():
            values = np.concatenate([r["features"][name] for r in rows[m]])
            cells = []
            report[m][name] = []
            for lo, hi in zip(edges[:-1], edges[1:]):
                sel = (values >= lo) & (values < hi)
                if not sel.sum():
                    continue
                label = {0: "apart", 1: "touching"}[int(lo)] if name == "touching" else f"[{lo:g},{hi:g})"
                absent, merged = int((outcomes[sel] == "absent").sum()), int((outcomes[sel] == "merged").sum())
                cells.append(f"{label} {sel.sum()} {found[sel].mean():.2f} ({absent}a {merged}m)")
                report[m][name].append({"from": lo, "to": hi, "nuclei": int(sel.sum()),
                                        "recall": float(found[sel].mean()), "absent": absent, "merged": merged})
            print(f"  {name:10s} " + " | ".join(cells))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
