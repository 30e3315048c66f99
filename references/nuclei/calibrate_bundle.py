"""Fit a bundle's score calibration and count interval on the held-out groups, check them by cross-validation by
group, and (with --write) store them in the bundle (issue 48). Rerun it whenever a new bundle ships: a calibration
fitted for other weights is not used (bundles.calibration).

It reads the predictions validate_bundle.py kept (every held-out image counted by the real `cellseg count` pipeline
down to a score floor of 0.3), so run that first with the same split and subset, then:

    python -m references.nuclei.validate_bundle --bundle cellseg/models/nuclei --split references/nuclei/splits/v4.json \
        --out runs/val_v3
    python -m references.nuclei.calibrate_bundle --bundle cellseg/models/nuclei \
        --split references/nuclei/splits/v4.json --predictions runs/val_v3 --write

Per threshold key (fluorescence, brightfield, brightfield_gray: datasets.THRESHOLD_KEY) with held-out images of at
least 3 groups: cellseg.evaluation.calibration fits the score map, the recall table and the interval's spread, and
cross-validates them leaving one group out at a time; the figures per modality (expected calibration error of
p_nucleus, the 90 % interval's coverage of the true count and its median width) go into PREDICTIONS/calibration.json
and, with --write, into the bundle's model.toml [calibration] and its card (README.md, reliability.png).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from cellseg.bundles import GRAY_SUFFIX, load_bundle, update_bundle_metadata
from cellseg.bundles.appearance import BundleAppearance
from cellseg.evaluation import image_folder, load_image_masks
from cellseg.evaluation.appearance import fit_appearance
from cellseg.evaluation.calibration import LEVEL, MATCH_IOU, fit_bundle_calibration, image_outcomes, reliability
from cellseg.results.appearance import appearance_features, feature_names
from cellseg.results.uncertainty import CURVE_WARN, CURVE_WARN_MIN

from .datasets import DATASET_DIAMETER, PROJECT_DATA_ROOT, PROTOCOL_MODALITIES, THRESHOLD_KEY, Split
from .model_card import LABELS, card_readme
from .plot_heldout import MODALITIES
from .validate_bundle import (
    PREDICTIONS_MADE_WITH,
    ground_truth,
    mask_threshold_record,
    mask_thresholds,
    prediction_groups,
)

METHOD = ("isotonic regression of 'matched to an annotated nucleus at IoU 0.3' on the detection score per threshold "
          "key, each held-out modality weighing the same, on the held-out groups counted by the cellseg count "
          "pipeline; estimated true count = sum of p_nucleus / held-out recall at that threshold and nuclear area "
          "fraction; 90 % interval from out-of-fold errors by group, the widest of the modalities'")


def prediction_folders(out: Path, keys: list[str], modality: dict[str, str], made_with: dict) -> dict[str, Path]:
    """Where validate_bundle kept each image's predictions (validate_bundle.prediction_groups, with the count scales
    and mask thresholds its PREDICTIONS_MADE_WITH records)."""
    scale_of = made_with.get("count_at", dict(DATASET_DIAMETER))     # a record from before the key: the defaults
    recorded = made_with["mask_threshold"]
    mask_of = dict(recorded) if isinstance(recorded, dict) else {m: recorded for m in PROTOCOL_MODALITIES}
    folders = {}
    for root, _, _, chosen in prediction_groups(out, keys, modality, scale_of, mask_of):
        for n, key in enumerate(chosen):
            folder = image_folder(root, n, key)
            if not (folder / "predictions.coco.json").is_file():
                raise SystemExit(f"expected validate_bundle's predictions for {key} in {folder}, found none: run "
                                 f"validate_bundle with the same --split and subset and --out {out}")
            folders[key] = folder
    return folders


def plot_reliability(validations: dict, png: Path) -> None:
    """One panel per threshold key: out-of-fold p_nucleus against the share of detections matched, per modality."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(4.2 * max(1, len(validations)), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    for k, (key, cv) in enumerate(sorted(validations.items())):
        ax = fig.add_subplot(1, len(validations), k + 1)
        ax.plot([0, 1], [0, 1], color="#999999", linestyle=":", label="perfect")
        for modality in sorted(cv.p):
            points = reliability(cv.p[modality], cv.matched[modality])
            line, = ax.plot([q["mean_p"] for q in points], [q["share_matched"] for q in points],
                            label=f"{LABELS.get(modality, modality)} ({len(cv.p[modality]):,})")
            ax.scatter([q["mean_p"] for q in points], [q["share_matched"] for q in points], color=line.get_color(),
                       s=[4 + 3 * np.sqrt(q["detections"]) for q in points], zorder=3)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("p_nucleus (out of fold)")
        ax.set_ylabel(f"share matched at IoU {MATCH_IOU}")
        ax.set_title(f"{key}: detections >= {cv.threshold:.2f} (dot area ~ detections)", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, format="png")


def curve_warning_share(images: list, threshold: float) -> float | None:
    """The share of `images` whose count moves more than CURVE_WARN (and CURVE_WARN_MIN nuclei) between the
    threshold and a neighbour 0.05 away: how often a held-out image of the modality would get the report's warning
    (the detections under the threshold counted as the pipeline keeps them, at validation's floor of 0.3)."""
    warned = []
    for im in images:
        def count(t: float) -> int:
            return int(np.count_nonzero(im.scores.astype(np.float32) >= np.float32(t)))
        n = count(threshold)
        if n:
            change = max(abs(count(threshold - 0.05) - n), abs(count(threshold + 0.05) - n))
            warned.append(change / n > CURVE_WARN and change >= CURVE_WARN_MIN)
    return round(float(np.mean(warned)), 4) if warned else None


def folder_features(folder: Path, threshold: float) -> dict[str, float]:
    """A validation result folder's appearance features (results.appearance) at `threshold`: its cells.csv holds
    every detection from the floor up, so the nuclei kept and the kept share are those of a count at `threshold`."""
    import pandas as pd
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    run = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    cells = pd.read_csv(folder / "cells.csv")
    kept = cells[cells["score"].to_numpy(np.float32) >= np.float32(threshold)]
    return appearance_features(summary, run, kept, kept_share=len(kept) / len(cells) if len(cells) else 0.0)


def fit_appearance_reference(folders: dict, keys: list[str], modality: dict, group_of: dict, thresholds: dict,
                             calibrated: dict, weights_sha256: str, examples: list[Path]) -> BundleAppearance:
    """The held-out images' appearance per calibrated threshold key (bundles.appearance), checked by holding each
    modality out whole; the example slides' result folders scored against it."""
    by_key: dict[str, list] = {}
    for key in keys:
        tkey = THRESHOLD_KEY[modality[key]]
        if tkey in calibrated:
            by_key.setdefault(tkey, []).append((folder_features(folders[key], thresholds[tkey]), group_of[key],
                                                modality[key]))
    references, report = {}, {"keys": {}, "examples": {}}
    for tkey, rows in sorted(by_key.items()):
        names = feature_names(tkey.startswith("brightfield"))
        x = np.array([[f[n] for n in names] for f, _, _ in rows])
        references[tkey], report["keys"][tkey] = fit_appearance(x, [g for _, g, _ in rows], [m for _, _, m in rows],
                                                                names)
    import pandas as pd
    for folder in examples:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        run = json.loads((folder / "run.json").read_text(encoding="utf-8"))
        features = appearance_features(summary, run, pd.read_csv(folder / "cells.csv"))
        tkey = (summary.get("count_estimate") or {}).get("calibration_key")
        if tkey in references:
            score = references[tkey].score(features)
            report["examples"][folder.name] = {"key": tkey, "score": round(score, 3),
                                               "threshold": round(references[tkey].threshold, 3),
                                               "warns": bool(score > references[tkey].threshold)}
    return BundleAppearance(weights_sha256, references, report)


def _toml_safe(x):
    """TOML has no null: None values left out of tables."""
    if isinstance(x, dict):
        return {k: _toml_safe(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_toml_safe(v) for v in x]
    return x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--split", type=Path, default=None, help="default: the bundle's split.json")
    p.add_argument("--predictions", type=Path, required=True, help="validate_bundle's --out for this bundle")
    p.add_argument("--data-root", type=Path, default=PROJECT_DATA_ROOT)
    p.add_argument("--per-modality", type=int, default=None, help="as given to validate_bundle")
    p.add_argument("--write", action="store_true", help="store the calibration and its figures in the bundle")
    p.add_argument("--examples", type=Path, nargs="*", default=[],
                   help="result folders of slides counted with this bundle (the example slides) whose appearance "
                        "score is reported: they should not warn")
    args = p.parse_args()
    for folder in args.examples:     # checked before the minutes of fitting, not after
        if not (folder / "summary.json").is_file():
            p.error(f"expected --examples to be result folders of `cellseg count` (with summary.json), found "
                    f"{folder} without one")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    bundle = load_bundle(args.bundle)
    made_with = json.loads((args.predictions / PREDICTIONS_MADE_WITH).read_text(encoding="utf-8"))
    if made_with["weights_sha256"] != bundle.weights_sha256 or made_with.get("tta"):
        raise SystemExit(f"expected predictions of this bundle's weights without TTA in {args.predictions}, found "
                         f"weights {made_with['weights_sha256'][:12]}… (tta {made_with.get('tta')})")
    # the calibration describes a count's cells: their masks must be at the thresholds a count uses
    counted_masks = mask_threshold_record(mask_thresholds(bundle))
    if made_with["mask_threshold"] != counted_masks:
        raise SystemExit(f"expected predictions made at the bundle's mask thresholds ({counted_masks}) in "
                         f"{args.predictions}, found {made_with['mask_threshold']}: validate the bundle as it is")
    split = Split.from_json(json.loads((args.split or args.bundle / "split.json").read_text()))
    modality = split.modality_of()
    group_of = {k: g for g, t in split.groups.items() for k in t["images"]}
    keys = sorted(split.val)
    if args.per_modality:     # validate_bundle's fixed subset
        keys = [k for m in MODALITIES for k in [k for k in keys if modality[k] == m][:args.per_modality]]
    folders = prediction_folders(args.predictions, keys, modality, made_with)
    truth = ground_truth(args.data_root, keys)
    images = {iou: [] for iou in (MATCH_IOU, 0.5)}
    for key in keys:
        (pred,) = load_image_masks(folders[key]).values()
        for iou, found in images.items():
            found.append(image_outcomes(pred, truth[key], modality=modality[key],
                                        key=THRESHOLD_KEY[modality[key]], group=group_of[key], iou=iou))
    thresholds = {key: bundle.threshold_for(key.removesuffix(GRAY_SUFFIX), gray=key.endswith(GRAY_SUFFIX))
                  for key in {im.key for im in images[MATCH_IOU]}}
    calibration, report, validations = fit_bundle_calibration(images[MATCH_IOU], thresholds, bundle.weights_sha256,
                                                              METHOD)
    # the same checks with segmentation's IoU 0.5 as "a true nucleus", and without the widening rule
    _, at_half, _ = fit_bundle_calibration(images[0.5], thresholds, bundle.weights_sha256, METHOD)
    _, plain, _ = fit_bundle_calibration(images[MATCH_IOU], thresholds, bundle.weights_sha256, METHOD, widest=False)
    for key, table in report.items():
        for m, figures in table.get("by_modality", {}).items():
            figures["ece_iou_0.5"] = at_half[key]["by_modality"][m]["ece"]
            figures["coverage_without_widening"] = plain[key]["by_modality"][m]["coverage"]
            figures["median_relative_width_without_widening"] = plain[key]["by_modality"][m]["median_relative_width"]
            figures["curve_warning_share"] = curve_warning_share([im for im in images[MATCH_IOU] if im.modality == m],
                                                                 thresholds[key])
    fitted_on = (f"{len(keys)} held-out images of {args.split or 'the bundle split'} "
                 f"({'first ' + str(args.per_modality) + ' per modality' if args.per_modality else 'all'}), "
                 f"predictions {args.predictions} (score floor {made_with['floor']}, {made_with['precision']})")
    report = {"fitted_on": fitted_on, "level": LEVEL, "match_iou": MATCH_IOU,
              "curve_warn": CURVE_WARN, "keys": report}
    appearance = fit_appearance_reference(folders, keys, modality, group_of, thresholds, calibration.keys,
                                          bundle.weights_sha256, args.examples)
    report["appearance"] = appearance.report
    print(json.dumps(report, indent=1))
    (args.predictions / "calibration.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    if args.write:
        import dataclasses
        calibration = dataclasses.replace(calibration, report=_toml_safe(report))
        plot_reliability(validations, args.bundle / "reliability.png")
        update_bundle_metadata(args.bundle, calibration=calibration)
        appearance.write(args.bundle)
        (args.bundle / "README.md").write_text(card_readme(load_bundle(args.bundle)), encoding="utf-8")
        logging.info("calibration stored in %s", args.bundle / "model.toml")


if __name__ == "__main__":
    main()
