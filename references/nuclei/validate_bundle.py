"""Validate a bundle on held-out acquisition groups and patients, tune its score threshold per modality, and write
its model card.

Every held-out image (split.json's "val": whole DSB2018 acquisition groups and whole TNBC patients, see
datasets.py) goes through the real `count_slide` pipeline (tiling, seams, measurement) at a low score floor;
`cellseg.evaluation.scoring` scores the predictions per modality. For each threshold key (datasets.THRESHOLD_KEY:
fluorescence; brightfield = stained tissue and H&E; brightfield_gray = grayscale brightfield, for a slide whose network
input has no colour) the score threshold with the best pooled F1 on its held-out images becomes the bundle's
threshold for it (chosen on the same images it is reported on: the card says so).

    python -m references.nuclei.validate_bundle --bundle runs/nuclei --out runs/val --write-card
    python -m references.nuclei.validate_bundle --bundle cellseg/models/nuclei --split runs/nuclei/split.json \
        --out runs/base --seen references/nuclei/splits/stage12.json   # also score the images no stage has seen

A split's own "seen" list (held-out images an earlier stage of the lineage trained on: the v4 split records the 137
that stages 1-2 did) counts as seen without --seen.

Inference settings can be tried without touching the bundle: --tta, --mask-threshold, --set box_nms_thresh=0.5
(any [model] key of model.toml), --proposal-threshold. Predictions are kept in OUT/<n>_<image>/ so a rerun only
scores; OUT/predictions_made_with.json records the weights and settings that made them, and another bundle or
setting is refused there: give each its own --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from cellseg.bundles import GRAY_SUFFIX, load_bundle, update_bundle_metadata
from cellseg.errors import CellsegError
from cellseg.evaluation import (
    VALIDATION_PROTOCOL,
    above,
    card_figures,
    evaluate,
    load_image_masks,
    score,
    validation_detector,
)
from cellseg.evaluation import predict as predict_images
from cellseg.run.counter import mask_threshold_for

from .datasets import (
    DATASET_DIAMETER,
    DATASET_FOLDERS,
    PROJECT_DATA_ROOT,
    PROTOCOL_MODALITIES,
    THRESHOLD_KEY,
    Split,
    seen_images,
    separated_annotations,
)
from .model_card import card_readme, curve_table
from .plot_heldout import MODALITIES, plot_curve, read_curve


def ground_truth(data_root: Path, keys: list[str]) -> dict:
    """key -> annotations (each dataset's COCO annotations.json, every mask whole, the nuclei of a shared id apart:
    datasets.separated_annotations)."""
    wanted = set(keys)
    by_key = {}
    for dataset in sorted({k.split("/")[0] for k in keys}):
        for name, inst in load_image_masks(data_root / DATASET_FOLDERS[dataset] / "annotations.json").items():
            key = f"{dataset}/{Path(name).stem}"
            if key in wanted:
                by_key[key] = separated_annotations(inst)
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise SystemExit(f"expected annotations for every held-out image, found none for {len(missing)} "
                         f"(e.g. {missing[0]})")
    return {k: by_key[k] for k in keys}


def image_paths(data_root: Path, keys: list[str]) -> dict[str, Path]:
    out = {}
    for k in keys:
        dataset, image_id = k.split("/", 1)
        folder = data_root / DATASET_FOLDERS[dataset] / "images"
        matches = sorted(folder.glob(f"{image_id}.*"))
        if not matches:
            raise SystemExit(f"expected the image {image_id} in {folder}, found none")
        out[k] = matches[0]
    return out


def tuned_bundle(bundle, overrides: list[str]):
    """The bundle with [model] keys replaced (key=value, parsed as TOML values) for an experiment."""
    import tomllib
    if not overrides:
        return bundle
    changes = {}
    for item in overrides:
        key, _, value = item.partition("=")
        changes[key] = tomllib.loads(f"v = {value}")["v"]
    return dataclasses.replace(bundle, model=dataclasses.replace(bundle.model, **changes))


PREDICTIONS_MADE_WITH = "predictions_made_with.json"


def protocol_modality(modality: str) -> str:
    """The protocol modality (fluorescence | brightfield) a held-out image of a dataset `modality` is counted with."""
    return THRESHOLD_KEY[modality].removesuffix(GRAY_SUFFIX)


def modality_mean_threshold(reports: list, fallback: float) -> float:
    """The score threshold with the best mean F1 over `reports` (each one dataset modality's held-out images scored
    at the floor: evaluation.scoring's sweep), each modality weighted alike, not by its nuclei; among thresholds
    every modality measured (eligible), ties to the lower; `fallback` when no modality has a scored cell."""
    sweeps = [{s["threshold"]: s for s in report.sweep} for report in reports if report.pooled["pred_count"]]
    if not sweeps:
        return fallback
    common = set.intersection(*({t for t, s in sweep.items() if s.get("eligible", True)} for sweep in sweeps))
    if not common:
        return fallback
    return float(max(sorted(common), key=lambda t: (sum(sweep[t]["f1"] for sweep in sweeps) / len(sweeps), -t)))


def mask_thresholds(bundle, override: float | None = None) -> dict[str, float]:
    """The mask threshold a count of each protocol modality uses (run.counter.mask_threshold_for): `override`
    (--mask-threshold) for all, else the bundle's per modality."""
    return {m: mask_threshold_for(bundle, VALIDATION_PROTOCOL.replace(mask_threshold=override, modality=m))
            for m in PROTOCOL_MODALITIES}


def mask_threshold_record(thresholds: dict[str, float]) -> float | dict[str, float]:
    """One figure when every modality has the same (as records had before thresholds per modality), else the table."""
    return next(iter(thresholds.values())) if len(set(thresholds.values())) == 1 else dict(thresholds)


def prediction_groups(out: Path, keys: list[str], modality: dict[str, str], scale_of: dict[str, str],
                      mask_of: dict[str, float]) -> list[tuple[Path, str | None, float, list[str]]]:
    """How a run lays out its predictions: (folder, the count's --diameter, mask threshold, images), each image's
    result folder numbered in its group's order (evaluation.image_folder). A folder per count scale (scale_of: a
    dataset's, counted_at; native: OUT itself), and within it one per mask threshold where the protocol modalities'
    (mask_of) differ. calibrate_bundle finds the predictions by it."""
    several = len(set(mask_of.values())) > 1
    groups = []
    for diameter in sorted({scale_of.get(k.split("/")[0]) for k in keys}, key=str):
        for threshold in sorted(set(mask_of.values())):
            chosen = [k for k in keys if scale_of.get(k.split("/")[0]) == diameter
                      and mask_of[protocol_modality(modality[k])] == threshold]
            if chosen:
                folder = out / f"diameter_{diameter}" if diameter else out
                groups.append((folder / f"mask_{threshold:g}" if several else folder, diameter, threshold, chosen))
    return groups


def heldout_group_figures(split: Split, keys: list[str], figures_of) -> dict[str, dict]:
    """The card's figures for each held-out group among `keys` (a DSB2018 acquisition, a TNBC patient, a Kromp
    preparation, a NuInsSeg organ): a new lab's images are most like one of them, so the spread between groups is
    what a lab may see, which a modality's pooled figure hides. figures_of(image keys) -> that group's figures."""
    chosen = set(keys)
    out = {}
    for name, group in sorted(split.groups.items()):
        members = [k for k in group["images"] if k in chosen]
        if group["side"] == "val" and members:
            out[name] = {"modality": group["modality"], **figures_of(members)}
    return out


def predictions_made_with(bundle, args: argparse.Namespace) -> dict:
    """What a prediction of this run depends on: the weights, the [model] keys, the inference settings, the data."""
    return {"weights_sha256": bundle.weights_sha256, "model": dataclasses.asdict(bundle.model),
            "proposal_threshold": bundle.proposal_threshold, "floor": args.floor,
            "mask_threshold": mask_threshold_record(mask_thresholds(bundle, args.mask_threshold)),
            "tta": args.tta, "precision": args.precision, "data_root": str(args.data_root.resolve()),
            "nucleus_diameter_px": bundle.nucleus_diameter_px, "count_at": counted_at(args.count_at)}


def counted_at(overrides: list[str]) -> dict[str, str]:
    """Each dataset's scale in a count (DATASET_DIAMETER: "auto", --diameter auto's; absent: native), with the
    --count-at DATASET=auto|native overrides."""
    scales = dict(DATASET_DIAMETER)
    for item in overrides:
        dataset, _, scale = item.partition("=")
        if dataset not in DATASET_FOLDERS or scale not in ("auto", "native"):
            raise SystemExit(f"expected --count-at DATASET=auto|native with DATASET one of {', '.join(DATASET_FOLDERS)}, "
                             f"found {item!r}")
        if scale == "native":
            scales.pop(dataset, None)
        else:
            scales[dataset] = scale
    return scales


def claim_predictions_folder(out: Path, made_with: dict) -> None:
    """OUT keeps its predictions so that a rerun only scores (predict's reuse): they must then be the predictions of
    the same bundle weights, settings and data, which OUT/predictions_made_with.json records (the folders are
    named by image). A folder holding another's predictions, or predictions of unknown origin, is refused before any
    work, and nothing in it changes."""
    made_with = json.loads(json.dumps(made_with))   # as it reads back (tuples become lists)
    record = out / PREDICTIONS_MADE_WITH
    if record.is_file():
        found = json.loads(record.read_text(encoding="utf-8"))
        # a record from before these keys were: predictions made at the bundle's scale, the datasets as they were
        for key, then in (("nucleus_diameter_px", made_with.get("nucleus_diameter_px")),
                          ("count_at", dict(DATASET_DIAMETER))):
            if key in made_with:
                found.setdefault(key, then)
        if found != made_with:
            differ = sorted(k for k in made_with.keys() | found.keys() if found.get(k) != made_with.get(k))
            raise SystemExit(f"expected {out} to hold predictions of this bundle and these settings (or none), found "
                             f"ones with another {', '.join(differ)}: give this run its own --out")
        return
    if any(out.glob("*/predictions.coco.json")):
        raise SystemExit(f"expected {out} to hold no predictions of unknown origin, found some without "
                         f"{PREDICTIONS_MADE_WITH}: give this run its own --out")
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(made_with, indent=1), encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--split", type=Path, default=None, help="default: the bundle's split.json")
    p.add_argument("--data-root", type=Path, default=PROJECT_DATA_ROOT,
                   help="folder holding dsb2018-train/ and tnbc-train/")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--floor", type=float, default=0.3, help="lowest score kept, the bottom of the sweep")
    p.add_argument("--mask-threshold", type=float, default=None,
                   help="mask probability threshold for every modality (default: the bundle's for each image's "
                        "protocol modality, as in a count); with --write-card it is recorded in the bundle as the "
                        "default for every modality, replacing any per-modality ones (mask_thresholds.py chooses those "
                        "from such runs)")
    p.add_argument("--proposal-threshold", type=float, default=None, help="RPN objectness floor (default: bundle's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a [model] key of the bundle for this run, e.g. box_nms_thresh=0.5")
    p.add_argument("--tta", action="store_true", help="test-time augmentation (flips and 90° rotations)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32",
                   help="the network's arithmetic on a CPU (default fp32: figures comparable across machines)")
    p.add_argument("--seen", type=Path, action="append", default=[],
                   help="a split.json whose 'train' images a training stage of this bundle used: figures are also "
                        "given on the held-out images no stage has seen (the split's own 'seen' images, which "
                        "earlier stages of the lineage trained on, count as seen without it)")
    p.add_argument("--write-card", action="store_true", help="store thresholds + figures in the bundle")
    p.add_argument("--heldout-curve", type=Path, default=None, metavar="RUN",
                   help="with --write-card: the long run this bundle comes from; its held-out curve (RUN/heldout.csv) "
                        "goes into the card, as a table and heldout_curve.png")
    p.add_argument("--bundle-thresholds", action="store_true",
                   help="score at the bundle's own thresholds per modality instead of tuning them on these images: "
                        "two runs of one bundle (precisions, settings) then compare at the same thresholds")
    p.add_argument("--threshold-by", choices=["pooled", "modality"], default="pooled",
                   help="how a threshold key's score threshold is tuned on its held-out images: the best F1 of them "
                        "all pooled (default; brightfield's is then mostly NuInsSeg's 158 images'), or the best "
                        "mean of its dataset modalities' pooled F1, each weighted alike (stained tissue, TNBC and "
                        "NuInsSeg for brightfield), as the ship rule weighs them")
    p.add_argument("--limit", type=int, default=None, help="only the first N held-out images (smoke test)")
    p.add_argument("--per-modality", type=int, default=None,
                   help="only the first N held-out images of each modality (a fixed subset, e.g. a long run's "
                        "snapshots)")
    p.add_argument("--modality", choices=MODALITIES, action="append", default=None,
                   help="only the held-out images of this modality (repeatable; a quick look, not a card)")
    p.add_argument("--count-at", action="append", default=[], metavar="DATASET=auto|native",
                   help="count a dataset's images at --diameter auto's scale or at their own (default: Kromp auto, "
                        "the others native): what a user without a pixel size gets, e.g. dsb2018=auto")
    args = p.parse_args()
    if args.bundle_thresholds and args.write_card:
        p.error("--bundle-thresholds scores at the thresholds the card already has: it cannot also --write-card")
    if args.heldout_curve and not args.write_card:
        p.error("--heldout-curve goes into a card: it needs --write-card")
    curve = None
    if args.heldout_curve:
        try:   # before minutes of scoring, not after
            curve = read_curve(args.heldout_curve)
        except CellsegError as e:
            p.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    split = Split.from_json(json.loads((args.split or args.bundle / "split.json").read_text()))
    modality = split.modality_of()
    keys = [k for k in sorted(split.val) if args.modality is None or modality[k] in args.modality][:args.limit]
    if args.per_modality:   # a fixed subset: the first N of each modality in sorted order (same images every time)
        keys = [k for m in MODALITIES for k in [k for k in keys if modality[k] == m][:args.per_modality]]
    bundle = tuned_bundle(load_bundle(args.bundle), args.set)
    if args.proposal_threshold is not None:
        bundle = dataclasses.replace(bundle, proposal_threshold=args.proposal_threshold)
    made_with = predictions_made_with(bundle, args)
    claim_predictions_folder(args.out, made_with)
    # A detector per mask threshold: each image's masks at its protocol modality's, as a count of it would be
    mask_of = mask_thresholds(bundle, args.mask_threshold)
    detectors = {t: validation_detector(bundle, args.device, args.floor, t, tta=args.tta, precision=args.precision)
                 for t in sorted(set(mask_of.values()))}
    paths = image_paths(args.data_root, keys)
    preds = {}
    for folder, diameter, threshold, chosen in prediction_groups(args.out, keys, modality, made_with["count_at"],
                                                                 mask_of):
        preds |= predict_images(detectors[threshold], {k: paths[k] for k in chosen}, folder,
                                bundle.nucleus_diameter_px, diameter_px=diameter, reuse=True, progress=True)
    gt = ground_truth(args.data_root, keys)
    # the split's own record of what earlier stages of the lineage saw, and any --seen split's training images
    seen = (seen_images(args.seen) if args.seen else set()) | set(split.seen)

    def subset(wanted) -> tuple[dict, dict]:
        chosen = [k for k in keys if wanted(k)]
        return {k: preds[k] for k in chosen}, {k: gt[k] for k in chosen}

    metrics: dict = {"iou": 0.5, "val_images": len(keys), "split_method": split.method,
                     "held_out_groups": sorted(g for g, t in split.groups.items() if t["side"] == "val"),
                     "threshold_chosen_on": "these held-out images, per protocol modality, gray input apart "
                                            + ("(pooled F1)" if args.threshold_by == "pooled" else
                                               "(the mean of its dataset modalities' pooled F1, each alike)"),
                     "settings": {"tta": args.tta, "precision": args.precision, "threshold_by": args.threshold_by,
                                  "mask_threshold": made_with["mask_threshold"],
                                  "proposal_threshold": bundle.proposal_threshold, "model_overrides": args.set}}
    thresholds = {}
    for key in sorted(set(THRESHOLD_KEY.values())):
        pred, truth = subset(lambda k: THRESHOLD_KEY[modality[k]] == key)
        if not truth:
            continue
        if args.bundle_thresholds:
            thresholds[key] = bundle.threshold_for(key.removesuffix(GRAY_SUFFIX), tta=args.tta,
                                                   gray=key.endswith(GRAY_SUFFIX))
        elif args.threshold_by == "modality":
            members = sorted({modality[k] for k in keys if THRESHOLD_KEY[modality[k]] == key})
            thresholds[key] = modality_mean_threshold(
                [evaluate(*subset(lambda k, m=m: modality[k] == m)) for m in members], bundle.score_threshold)
        else:
            thresholds[key] = score(pred, truth, bundle.score_threshold).threshold
    overall = None if args.bundle_thresholds else score(*subset(lambda k: True),
                                                        fallback_threshold=bundle.score_threshold)
    overall_threshold = bundle.score_threshold if overall is None else overall.threshold
    if args.bundle_thresholds:
        metrics["threshold_chosen_on"] = "the bundle's own thresholds (--bundle-thresholds), not these images"
    metrics["score_threshold"] = overall_threshold
    metrics["score_threshold_by_modality"] = thresholds
    logging.info("score thresholds: %s (all together %.2f)", thresholds, overall_threshold)

    def at_thresholds(pred: dict) -> dict:
        return {k: above(v, thresholds.get(THRESHOLD_KEY[modality[k]], overall_threshold))
                for k, v in pred.items()}

    def in_group(k: str, name: str) -> bool:
        """Whether image `k` is one of `name`'s: a dataset modality, protocol_<modality> (every image a protocol of
        that modality counts), or all."""
        if name.startswith("protocol_"):
            return protocol_modality(modality[k]) == name.removeprefix("protocol_")
        return name == "all" or modality[k] == name

    for name in MODALITIES + tuple(f"protocol_{m}" for m in PROTOCOL_MODALITIES) + ("all",):
        for suffix, extra in (("", lambda k: True), ("_unseen", lambda k: k not in seen)):
            if suffix and not seen:
                continue
            pred, truth = subset(lambda k: in_group(k, name) and extra(k))
            if not truth:
                continue
            report = evaluate(at_thresholds(pred), truth)
            (args.out / f"metrics_{name}{suffix}.json").write_text(json.dumps(report.to_dict(), indent=1,
                                                                              default=str))
            metrics[name + suffix] = card_figures(report)

    def group_figures(members: list[str]) -> dict:
        wanted = set(members)
        pred, truth = subset(wanted.__contains__)
        report = evaluate(at_thresholds(pred), truth)
        figures = {**card_figures(report), "nuclei": int(report.pooled["true_count"])}
        if report.pooled["true_count"]:
            figures["recall_pooled"] = round(float(report.pooled["recall"]), 4)
        return figures

    metrics["by_group"] = heldout_group_figures(split, keys, group_figures)
    print(json.dumps(metrics, indent=1))
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if args.write_card and args.tta:   # TTA's merged scores get thresholds of their own; the card stays
        update_bundle_metadata(args.bundle, tta_score_thresholds=thresholds,
                               card={"metrics_tta": metrics})
        (args.bundle / "README.md").write_text(card_readme(load_bundle(args.bundle)), encoding="utf-8")
    elif args.write_card:
        card = {"metrics": metrics, "threshold_sweep": overall.sweep_table()}
        if curve is not None:
            card["heldout_curve"] = curve_table(curve, args.heldout_curve)
            plot_curve(curve, args.bundle / "heldout_curve.png")
        # a card measured at one --mask-threshold for every modality: the count's masks become that, per-modality
        # ones dropped, or the card would describe masks no count makes
        update_bundle_metadata(args.bundle, score_threshold=overall_threshold, score_thresholds=thresholds,
                               mask_threshold=args.mask_threshold,
                               mask_thresholds=None if args.mask_threshold is None else {}, card=card)
        (args.bundle / "README.md").write_text(card_readme(load_bundle(args.bundle)), encoding="utf-8")
        logging.info("card updated in %s", args.bundle / "model.toml")


if __name__ == "__main__":
    main()
