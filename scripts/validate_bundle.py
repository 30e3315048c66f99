"""Validate a bundle on the held-out DSB2018 split, tune its score threshold, and write its model card.

Every validation image goes through the real `count_slide` pipeline (tiling, seams, measurement) at a low
score floor; `cellseg.evaluate` then scores the predictions per modality, sweeps the score threshold
(0.3-0.9), and the threshold with the best pooled F1 becomes the bundle's default. The figures reported
in the card are at that threshold (chosen on the same split: say so when quoting them).

    python scripts/validate_bundle.py --bundle runs/nuclei --out runs/val --write-card
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path

from cellseg.bundle import load_bundle, update_bundle_metadata
from cellseg.evaluate import evaluate, load_instances
from cellseg.validate import above, card_figures, score, validation_detector
from cellseg.validate import predict as predict_images

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dsb2018-train"
# manifest.csv modality_guess -> name in the card
GROUPS = {"fluorescence": "fluorescence", "brightfield_color_histology": "stained_tissue",
          "brightfield_gray": "brightfield_gray"}


def modality_of(manifest: Path) -> dict[str, str]:
    return {r["image_id"]: r["modality_guess"] for r in csv.DictReader(open(manifest))}


def predict(bundle_dir: Path, data: Path, ids: list[str], out: Path, device: str, floor: float,
            diameter: str | None = None, mask_threshold: float | None = None) -> dict:
    """Every image through `count_slide` (cellseg.validate), kept in OUT/<id>/ so a rerun only scores."""
    bundle = load_bundle(bundle_dir)
    detector = validation_detector(bundle, device, floor, mask_threshold)
    images = {f"{i}.png": data / "images" / f"{i}.png" for i in ids}
    return predict_images(detector, images, out, bundle.nucleus_diameter_px, diameter, reuse=True, progress=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--floor", type=float, default=0.3, help="lowest score kept, the bottom of the sweep")
    p.add_argument("--diameter", default=None,
                   help="'auto': measure each image's nucleus size and resample it to the model's (--diameter auto)")
    p.add_argument("--mask-threshold", type=float, default=None,
                   help="mask probability threshold (default: the bundle's); with --write-card it becomes the bundle's")
    p.add_argument("--write-card", action="store_true", help="store threshold + figures in the bundle")
    p.add_argument("--limit", type=int, default=None, help="only the first N validation images (smoke test)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    split = json.loads((args.bundle / "split.json").read_text())
    modality = modality_of(args.data / "manifest.csv")
    ids = sorted(split["val"])[:args.limit]
    bundle = load_bundle(args.bundle)
    preds = predict(args.bundle, args.data, ids, args.out, args.device, args.floor, args.diameter,
                    args.mask_threshold)
    gt_all = load_instances(args.data / "annotations.json")
    gt_by_stem = {Path(name).stem: inst for name, inst in gt_all.items()}

    def subset(group: str) -> tuple[dict, dict]:
        chosen = [i for i in ids if group == "all" or modality[i] == group]
        return {f"{i}.png": preds[f"{i}.png"] for i in chosen}, {f"{i}.png": gt_by_stem[i] for i in chosen}

    overall = score(*subset("all"), fallback_threshold=bundle.score_threshold)
    logging.info("best pooled F1 %.3f at score threshold %.2f", overall.at_floor.best_f1 or 0, overall.threshold)
    metrics = {"score_threshold": overall.threshold, "iou": 0.5, "val_images": len(ids),
               "threshold_chosen_on": "this validation split (pooled F1)"}
    for name, key in list(GROUPS.items()) + [("all", "all")]:
        pred, gt = subset(name)
        if not gt:
            continue
        report = evaluate({k: above(v, overall.threshold) for k, v in pred.items()}, gt)
        (args.out / f"metrics_{key}.json").write_text(json.dumps(report.to_dict(), indent=1, default=str))
        metrics[key] = card_figures(report)
    print(json.dumps(metrics, indent=1))
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if args.write_card:
        write_card(args.bundle, metrics, overall, args.mask_threshold)


def write_card(bundle_dir: Path, metrics: dict, overall, mask_threshold: float | None = None) -> None:
    update_bundle_metadata(bundle_dir, score_threshold=metrics["score_threshold"], mask_threshold=mask_threshold,
                           card={"metrics": metrics, "threshold_sweep": overall.sweep_table()})
    (bundle_dir / "README.md").write_text(card_readme(load_bundle(bundle_dir)), encoding="utf-8")
    logging.info("card updated in %s", bundle_dir / "model.toml")


def card_readme(bundle) -> str:
    """The model card for people: data and licence, recipe, hardware and time, validation figures."""
    c, m, t = bundle.card, bundle.card["metrics"], bundle.card.get("training", {})
    data = c.get("data", {})
    rows = []
    for key, label in (("fluorescence", "fluorescence"), ("stained_tissue", "stained tissue (H&E-like)"),
                       ("brightfield_gray", "grayscale brightfield"), ("all", "all")):
        if key in m:
            g = m[key]
            rows.append(f"| {label} | {g['images']} | {g['ap50_tp_fp_fn_mean_over_images']:.3f} | "
                        f"{g['ap50_tp_fp_fn_pooled']:.3f} | {g['f1_pooled']:.3f} | {_fmt(g['coco_mask_ap'])} | "
                        f"{_fmt(g['median_rel_count_error'], pct=True)} |")
    cfg = bundle.model
    goals = []
    for key, label, metric, goal, better in (
            ("fluorescence", "fluorescence AP50 (mean over images)", "ap50_tp_fp_fn_mean_over_images", 0.90, "≥"),
            ("stained_tissue", "stained-tissue AP50 (mean over images)", "ap50_tp_fp_fn_mean_over_images", 0.75, "≥"),
            ("all", "median count error", "median_rel_count_error", 0.05, "≤")):
        value = m.get(key, {}).get(metric)
        met = value is not None and (value >= goal if better == "≥" else value <= goal)
        goals.append(f"- {label}: {_fmt(value)} (goal {better} {goal}): {'met' if met else 'NOT met'}")
    # Fine-tuned bundles list their earlier stages, oldest first (older cards: one [base_training] table).
    stages = list(c.get("earlier_stages") or ([c["base_training"]] if c.get("base_training") else []))
    recipe = _recipe(t, data)
    reproduce = ("`python scripts/train_default_bundle.py --out runs/nuclei` then\n"
                 "`python scripts/validate_bundle.py --bundle runs/nuclei --out runs/val --write-card`.")
    if stages:   # every stage, so the compute and the recipe add up
        parts, commands, previous = [], [], None
        for k, stage in enumerate(stages + [t]):
            named = (f" (bundle {stages[k].get('bundle')}, sha256 {str(stages[k].get('weights_sha256', ''))[:12]}…)"
                     if k < len(stages) else " (this bundle)")
            origin = "" if previous is None else ", fine-tuned from stage " + str(k)
            parts.append(f"Stage {k + 1}{named}{origin}: {_recipe(stage, data if k == len(stages) else {})}")
            out = f"runs/stage{k + 1}"
            commands.append(f"`python scripts/train_default_bundle.py --out {out} --steps {stage.get('steps')}"
                            + ("" if previous is None else f" --init {previous} --lr {stage.get('lr')}")
                            + (f" --stained-share {stage['stained_share']}" if stage.get("stained_share") else "") + "`")
            previous = out
        recipe = "\n\n".join(parts)
        reproduce = (", then ".join(commands) + ", then\n"
                     f"`python scripts/validate_bundle.py --bundle {previous} --out runs/val --write-card`.")
    return f"""# {bundle.name}: cellseg's nucleus model

Mask R-CNN ({cfg.backbone}-FPN, {cfg.norm}, {cfg.fpn_channels} FPN channels), anchors {cfg.anchor_sizes[0]}-{cfg.anchor_sizes[-1]} px,
tiles run at their own scale (no resize), up to {cfg.detections_per_tile} cells per tile, masks kept at box size.
Trained from random initialisation: no ImageNet or COCO weights were used or downloaded.
Weights: `weights.safetensors` (float16, sha256 `{bundle.weights_sha256[:16]}…`), loaded without unpickling.

## Data

{data.get('name', 'DSB2018')} — licence {data.get('licence', 'CC0 1.0')}; cite {data.get('source', '')}.
{data.get('train_images', '?')} images for training, {data.get('val_images', '?')} held out for validation
({data.get('split', '')}). Typical nucleus diameter in the training data: {bundle.nucleus_diameter_px:.1f} px.

## Recipe

{recipe}
Reproduce: {reproduce}

## Validation (held-out images, IoU 0.5, score threshold {m['score_threshold']})

AP50 is TP/(TP+FP+FN) (the DSB2018 / StarDist definition), as the mean over images and pooled over all
cells; COCO AP is mask AP@[.5:.95] at maxDets >= 1000. Every image went through the full `cellseg count`
pipeline (512 px tiles, 64 px halo). The score threshold maximises pooled F1 on this same split.

| modality | images | AP50 mean | AP50 pooled | F1 pooled | COCO AP | median count error |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

## Against the project's goals

{chr(10).join(goals)}

## Limitations

Trained on one dataset of 2D nuclei at its native pixel sizes (nuclei ~10-40 px across). Nuclei much
larger or smaller than that, cytoplasm/whole-cell segmentation, and 3D stacks are out of scope. Some
DSB2018 histology images are only partly annotated, which lowers the stained-tissue figures.
"""


def _recipe(t: dict, data: dict) -> str:
    sampling = f" {data['sampling'][0].upper()}{data['sampling'][1:]}." if data.get("sampling") else (
        f" Stained images drawn with probability {t['stained_share']}." if t.get("stained_share") else "")
    return (f"Random {t.get('crop_px')}² crops with scale jitter (0.75-1.33), flips, 90° rotations, gamma, intensity "
            f"and per-channel colour jitter; AdamW, lr {t.get('lr')}, 100 warm-up steps then cosine decay; batch "
            f"{t.get('batch_size')}; {t.get('steps')} steps in {t.get('wall_seconds', 0) / 60:.0f} min on "
            f"{t.get('hardware')} ({t.get('device')}).{sampling}")


def _fmt(x, pct=False):
    if x is None:
        return "n/a"
    return f"{100 * x:.1f} %" if pct else f"{x:.3f}"


if __name__ == "__main__":
    main()
