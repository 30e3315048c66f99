"""Fine-tuning on a few annotated fields, measured as a user would (issue 49, not a test).

For each case, a group of images the shipped bundle never trained on (a TNBC patient held out of its split, a
NuInsSeg organ, a Kromp preparation; the NuInsSeg organs and Kromp groups are also held out of
references/nuclei/splits/v4.json): 4 annotated fields are the user's data, `cellseg train` fine-tunes the protocol's
bundle on them within the time budget (the default recipe: training.finetune.Recipe, its own held-out part and
its refusal when not better), then the other fields of the group are counted with the shipped bundle and with the
fine-tuned one (each at its own thresholds, both with the --diameter the train command tells the user) and scored:
AP50 (TP/(TP+FP+FN) at IoU 0.5, pooled), F1, median relative count error, DSB2018 score. "after the check" is the
fine-tuned bundle when `cellseg train` kept it (exit 0), else the shipped one (the user was told to keep it).

    python benchmarks/finetune_few.py --out runs/finetune_few [--cases tnbc-p01,...] [--minutes 10]
        [--recipe default] [--steps N] [--max-test 0]

--steps N trains a fixed number of steps instead of a time budget (recipe comparisons on a loaded machine);
--max-test K counts at most K of a case's other fields (0: all). Reads ../shared/data (SHARED_DATA to override).
Every case's figures go to OUT/results.json (a re-run skips the cases already there with the same settings).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data"))
SEED = 0
N_TRAIN = 4


def _kromp(*names):
    return [f"images/{n}.png" for n in names]


# name -> (dataset folder, protocol, the group's images (file_name in its annotations.json), how the 4 are chosen)
CASES = {
    # TNBC patient 01: held out of the shipped bundle's split (cellseg/models/nuclei/split.json), 7 fields
    "tnbc-p01": ("tnbc-train", "he-nuclei", [f"images/tnbc_01_{k}.jpg" for k in range(1, 8)]),
    # NuInsSeg organs held out of splits/v4.json; the shipped bundle never saw NuInsSeg
    "nuinsseg-human-spleen": ("nuinsseg-he", "he-nuclei", "human spleen"),
    "nuinsseg-human-tongue": ("nuinsseg-he", "he-nuclei", "human tongue"),
    "nuinsseg-mouse-heart": ("nuinsseg-he", "he-nuclei", "mouse heart"),
    # Kromp: neuroblastoma tumour touch imprints, 63x, one microscope (held out of v4); nuclei ~100 px
    "kromp-touch-imprint": ("kromp-fluo", "fluorescence-nuclei",
                            _kromp("Neuroblastoma_0", "Neuroblastoma_6", "Neuroblastoma_12", "Neuroblastoma_13",
                                   "Neuroblastoma_14")),
    # Kromp: neuroblastoma cell-line cytospins at 63x (held out of v4)
    "kromp-cytospin-63x": ("kromp-fluo", "fluorescence-nuclei",
                           _kromp("otherspecimen_0", "otherspecimen_1", "otherspecimen_5", "otherspecimen_7",
                                  "otherspecimen_8", "otherspecimen_9")),
}
DEFAULT_CASES = "tnbc-p01,nuinsseg-human-spleen,nuinsseg-mouse-heart,kromp-touch-imprint"


def recipes() -> dict:
    """The recipes compared (docs/finetune.md); "default" is cellseg's."""
    from cellseg.training import Recipe
    from cellseg.training.augment import Augmentation
    base = Recipe()
    return {
        "default": base,
        # the fine-tune before issue 49: whole network at 1e-4 with the long warm-up, zoom 0.5-2x, no early stop
        "naive": replace(base, backbone_lr_scale=1.0, warmup=100, augmentation=Augmentation(), patience=10 ** 6),
        "backbone-0.1": replace(base, backbone_lr_scale=0.1),
        "full": replace(base, backbone_lr_scale=1.0),
        "3e-4": replace(base, lr=3e-4),
        "wide-zoom": replace(base, augmentation=Augmentation()),
        # copy-paste of the image's own nuclei (training.copy_paste) on half the crops
        "paste": replace(base, augmentation=Augmentation(scale=(0.75, 1.33), paste_p=0.5)),
        # the recipe before it planned 1 step per annotated nucleus (at least 200) and stopped after 4 scorings
        # without a better one: 0.25 a nucleus, at least 100, patience 3
        "quarter-steps": replace(base, steps_per_nucleus=0.25, min_steps=100, patience=3),
        "light-aug": replace(base, augmentation=Augmentation(scale=(0.75, 1.33), hed_p=0.3, blur_p=0.1,
                                                              noise_p=0.1, dim_p=0.1, gray_p=0.0)),
    }


def case_images(case: str) -> tuple[Path, str, list[str], list[str]]:
    """(annotations.json, protocol, the 4 training fields, the other fields) of a case."""
    folder, protocol, group = CASES[case]
    ann = DATA / folder / "annotations.json"
    if isinstance(group, str):   # a NuInsSeg organ: its fields from manifest.csv
        import csv
        with open(DATA / folder / "manifest.csv", newline="") as f:
            group = sorted(f"images/{r['image_id']}.jpg" for r in csv.DictReader(f) if r["organ"] == group)
    rng = np.random.default_rng(SEED)
    chosen = sorted(rng.choice(len(group), N_TRAIN, replace=False).tolist())
    return ann, protocol, [group[k] for k in chosen], [g for k, g in enumerate(group) if k not in chosen]


def subset_coco(ann: Path, names: list[str], out: Path) -> Path:
    """A COCO file of the named images only, file_name made absolute (the images stay where they are)."""
    data = json.loads(ann.read_text())
    images = [im for im in data["images"] if im["file_name"] in set(names)]
    if len(images) != len(names):
        raise SystemExit(f"expected {len(names)} images of {ann}, found {len(images)}")
    ids = {im["id"] for im in images}
    for im in images:
        im["file_name"] = str((ann.parent / im["file_name"]).resolve())
    out.write_text(json.dumps({"images": images, "annotations": [a for a in data["annotations"]
                                                                  if a["image_id"] in ids],
                               "categories": data["categories"]}))
    return out


def count_as_user(bundle_dir, test_json: Path, protocol, work: Path, diameter_px=None,
                  score_threshold: float | None = None) -> dict:
    """The test fields counted as `cellseg count -p PROTOCOL --model BUNDLE [--diameter D] [--score-threshold T]`
    counts them (CellCounter.load: the bundle's thresholds for the protocol's modality, the scale count chooses by
    itself unless --diameter; every pixel analysed: single fields), scored."""
    from cellseg import evaluation as ev
    from cellseg.planning import DEFAULT_SCALE
    from cellseg.run import CellCounter
    gt, paths = ev.annotated_images(test_json)
    counting = ev.VALIDATION_PROTOCOL.replace(modality=protocol.modality, channel=protocol.channel,
                                              model=str(bundle_dir), score_threshold=score_threshold)
    counter = CellCounter.load(counting, "cpu", diameter_px=DEFAULT_SCALE if diameter_px is None else diameter_px)
    predictions, factors = {}, []
    for k, (name, path) in enumerate(paths.items()):
        summary = counter.count(path, work / f"{k:04d}")
        factors.append(summary.get("scale", {}).get("factor", 1.0))
        (cells,) = ev.load_image_masks(work / f"{k:04d}").values()
        predictions[name] = cells
    report = ev.evaluate(predictions, gt)
    return {"score_thresholds": counter.run_info.model["score_thresholds"],
            "scale_factor_median": float(np.median(factors)), **ev.card_figures(report)}


def run_case(case: str, args, recipe_name: str, out: Path) -> dict:
    import shutil

    from cellseg.bundles import load_bundle
    from cellseg.planning import load_protocol
    from cellseg.training import finetune, load_coco
    ann, protocol_name, train_names, test_names = case_images(case)
    if args.max_test:
        test_names = test_names[:args.max_test]
    protocol = load_protocol(protocol_name)
    work = out / case / recipe_name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    train_json = subset_coco(ann, train_names, work / "train.json")
    test_json = subset_coco(ann, test_names, work / "test.json")
    items, classes = load_coco(train_json)
    t0 = time.monotonic()
    verdict = finetune(items, classes, work / "bundle", protocol.model, protocol, recipe=recipes()[recipe_name],
                       minutes=None if args.steps else args.minutes, steps=args.steps, device="cpu",
                       progress=False, seed=SEED)
    train_s = time.monotonic() - t0
    card = load_bundle(work / "bundle").card
    t1 = time.monotonic()
    hint = card["finetune"]["scale"]["count_options"]
    diameter = float(hint.removeprefix("--diameter ")) if hint.startswith("--diameter") else None
    retuned = verdict.table[1]["score_threshold"]
    shipped = count_as_user(protocol.model, test_json, protocol, work / "count_shipped")
    tuned = count_as_user(work / "bundle", test_json, protocol, work / "count_tuned")
    # the fine-tuned bundle at the scale it was trained at (the --diameter the train command prints), and the
    # shipped one with the threshold retuned on the user's held-out part (what a refused fine-tune still teaches)
    tuned_hint = (count_as_user(work / "bundle", test_json, protocol, work / "count_hint", diameter_px=diameter)
                  if diameter else None)
    shipped_retuned = count_as_user(protocol.model, test_json, protocol, work / "count_retuned",
                                    score_threshold=retuned)
    count_s = time.monotonic() - t1
    for folder in ("count_shipped", "count_tuned", "count_hint", "count_retuned"):
        shutil.rmtree(work / folder, ignore_errors=True)
    result = {"case": case, "recipe": recipe_name, "protocol": protocol_name, "train_fields": train_names,
              "test_fields": len(test_names), "test_nuclei": _nuclei(test_json),
              "train_nuclei": _nuclei(train_json), "steps_run": card["finetune"]["steps_run"],
              "chosen_step": verdict.chosen_step, "kept": verdict.better, "heldout_gain": round(verdict.gain, 4),
              "noise_margin": round(verdict.margin, 4), "train_wall_s": round(train_s, 1),
              "count_wall_s": round(count_s, 1), "scale": card["finetune"]["scale"],
              "heldout_table": verdict.table, "shipped": shipped, "shipped_retuned": shipped_retuned,
              "tuned": tuned, "tuned_at_training_scale": tuned_hint,
              "after_check": tuned if verdict.better else shipped,
              "settings": {"minutes": None if args.steps else args.minutes, "steps": args.steps,
                           "max_test": args.max_test}}
    return result


def _nuclei(coco: Path) -> int:
    return len(json.loads(coco.read_text())["annotations"])


def table(results: list[dict]) -> list[str]:
    def f(x):
        return "-" if x is None else f"{x:.3f}"

    def pct(x):
        return "-" if x is None else f"{100 * x:.0f} %"
    lines = ["| case (recipe) | fields train/test | steps (chosen) | kept | AP50 shipped → fine-tuned → after check | "
             "median count error shipped → fine-tuned → after check | shipped at the retuned threshold: AP50, "
             "count error | held-out part: AP50 start → fine-tuned |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        s, t, a = r["shipped"], r["tuned"], r["after_check"]
        h = r["heldout_table"]
        lines.append(f"| {r['case']} ({r['recipe']}) | {len(r['train_fields'])}/{r['test_fields']} | "
                     f"{r['steps_run']} ({r['chosen_step']}) | {'yes' if r['kept'] else 'no'} | "
                     f"{f(s['ap50_tp_fp_fn_pooled'])} → {f(t['ap50_tp_fp_fn_pooled'])} → "
                     f"{f(a['ap50_tp_fp_fn_pooled'])} | {pct(s['median_rel_count_error'])} → "
                     f"{pct(t['median_rel_count_error'])} → {pct(a['median_rel_count_error'])} | "
                     f"{_retuned(r, f, pct)} | "
                     f"{f(h[0]['ap50_tp_fp_fn_pooled'])} → {f(h[2]['ap50_tp_fp_fn_pooled'])} |")
    by_recipe: dict[str, list] = {}
    for r in results:
        by_recipe.setdefault(r["recipe"], []).append(r)
    for name, rs in by_recipe.items():
        gain = statistics.mean(r["tuned"]["ap50_tp_fp_fn_pooled"] - r["shipped"]["ap50_tp_fp_fn_pooled"] for r in rs)
        after = statistics.mean(r["after_check"]["ap50_tp_fp_fn_pooled"] - r["shipped"]["ap50_tp_fp_fn_pooled"]
                                for r in rs)
        worst = min(r["after_check"]["ap50_tp_fp_fn_pooled"] - r["shipped"]["ap50_tp_fp_fn_pooled"] for r in rs)
        lines.append(f"\n{name}: {len(rs)} cases, mean AP50 gain {gain:+.3f} fine-tuned, {after:+.3f} after the check "
                     f"(worst case {worst:+.3f})")
    return lines


def _retuned(result: dict, f, pct) -> str:
    at = result.get("shipped_retuned")
    if at is None:
        return "-"
    return (f"{f(at['ap50_tp_fp_fn_pooled'])}, {pct(at['median_rel_count_error'])} "
            f"(at {result['heldout_table'][1]['score_threshold']:.2f})")


def main() -> None:
    import logging
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cases", default=DEFAULT_CASES)
    p.add_argument("--recipe", default="default", help=f"one or more of {', '.join(recipes())}, comma-separated")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--max-test", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("cellseg.slides", "cellseg.results", "cellseg.run", "cellseg.evaluation.validate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else []
    settings = {"minutes": None if args.steps else args.minutes, "steps": args.steps, "max_test": args.max_test}
    from cellseg.detection import cpu_model
    print(f"CPU: {cpu_model()}; load average {os.getloadavg()[0]:.1f} at the start")
    for recipe_name in args.recipe.split(","):
        for case in args.cases.split(","):
            if any(r["case"] == case and r["recipe"] == recipe_name and r["settings"] == settings for r in results):
                continue
            result = run_case(case, args, recipe_name, args.out)
            result["load_average_after"] = round(os.getloadavg()[0], 2)
            results = [r for r in results if not (r["case"] == case and r["recipe"] == recipe_name)] + [result]
            store.write_text(json.dumps(results, indent=1))
            print("\n".join(table([result])), flush=True)
    chosen = [r for r in results if r["recipe"] in args.recipe.split(",") and r["settings"] == settings]
    print("\n".join(table(chosen)))


if __name__ == "__main__":
    main()
