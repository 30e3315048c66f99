"""Choose a bundle's mask probability threshold per protocol modality from validations at several thresholds.

    for t in 0.45 0.5 0.55 0.6 0.65; do
        python -m references.nuclei.validate_bundle --bundle B --out runs/val_mask_$t --mask-threshold $t
    done
    python -m references.nuclei.mask_thresholds --bundle B runs/val_mask_*            # the table and the choice
    (a run may hold one modality's images, validate_bundle --modality: e.g. 0.65 on fluorescence only)
    python -m references.nuclei.mask_thresholds --bundle B runs/val_mask_* --write    # ... stored in B's model.toml

A count's masks are the network's soft masks above the threshold: fluorescence nuclei have sharp edges that a
threshold of 0.5 overshoots, H&E nuclei soft ones, so one threshold cannot serve both. For each protocol modality
(fluorescence | brightfield: every held-out image a protocol of that modality counts, validate_bundle's
protocol_<modality> figures) the threshold with the highest COCO mask AP@[.5:.95] is chosen (pooled over the cells:
how tight the masks are as well as which nuclei are found; the DSB2018 score, a mean over images, lets a few small
images weigh as much as a dense one); a tie keeps the one nearer the bundle's default.
Chosen on the held-out images it is then reported on, as the score thresholds are: `--write` stores the table in
the card. Then `validate_bundle --write-card` (the bundle's own thresholds per modality) and `calibrate_bundle`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cellseg.bundles import load_bundle, update_bundle_metadata

from .datasets import PROTOCOL_MODALITIES
from .validate_bundle import PREDICTIONS_MADE_WITH

CRITERION = "coco_mask_ap"
SHOWN = ("images", "ap50_tp_fp_fn_pooled", "dsb_score_mean_over_images", CRITERION, "median_rel_count_error")


def read_validation(folder: Path, weights_sha256: str) -> tuple[float, dict]:
    """(mask threshold, metrics.json) of one validate_bundle run of the bundle with these weights, at one mask
    threshold for every modality."""
    made_with_path, metrics_path = folder / PREDICTIONS_MADE_WITH, folder / "metrics.json"
    if not made_with_path.is_file() or not metrics_path.is_file():
        raise SystemExit(f"expected a validate_bundle run in {folder} ({PREDICTIONS_MADE_WITH} and metrics.json), "
                         f"found {'neither' if not made_with_path.is_file() else 'no metrics.json'}")
    made_with = json.loads(made_with_path.read_text(encoding="utf-8"))
    if made_with.get("weights_sha256") != weights_sha256:
        raise SystemExit(f"expected {folder} to hold predictions of weights {weights_sha256[:12]}, found "
                         f"{str(made_with.get('weights_sha256'))[:12]}")
    threshold = made_with.get("mask_threshold")
    if not isinstance(threshold, (int, float)):
        raise SystemExit(f"expected {folder} to be made at one mask threshold for every modality (--mask-threshold),"
                         f" found {threshold!r}")
    if made_with.get("tta"):
        raise SystemExit(f"expected {folder} to be made without --tta (a count's masks), found it made with")
    return float(threshold), json.loads(metrics_path.read_text(encoding="utf-8"))


def choose(runs: dict[float, dict], default: float) -> tuple[dict[str, float], dict]:
    """Per protocol modality the threshold with the best CRITERION (a tie: the one nearer `default`), and the
    table it was chosen from: {modality: {"mask_threshold": [...], figure: [...]}}."""
    chosen, table = {}, {}
    for modality in PROTOCOL_MODALITIES:
        rows = {t: m[f"protocol_{modality}"] for t, m in sorted(runs.items()) if f"protocol_{modality}" in m}
        if not rows:
            continue
        usable = {t: r for t, r in rows.items() if r.get(CRITERION) is not None}
        if usable:
            chosen[modality] = max(sorted(usable, key=lambda t: abs(t - default)), key=lambda t: usable[t][CRITERION])
        table[modality] = {"mask_threshold": list(rows),
                           **{key: [r.get(key) for r in rows.values()] for key in SHOWN}}
    return chosen, table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("runs", type=Path, nargs="+", help="validate_bundle --out folders, one per --mask-threshold")
    p.add_argument("--write", action="store_true", help="store the thresholds and the table in the bundle")
    args = p.parse_args()
    bundle = load_bundle(args.bundle)
    runs: dict[float, dict] = {}
    for folder in args.runs:
        threshold, metrics = read_validation(folder, bundle.weights_sha256)
        # runs of one threshold may cover different modalities (validate_bundle --modality), never the same one
        groups = {k: v for k, v in metrics.items() if k.startswith("protocol_")}
        twice = sorted(groups.keys() & runs.get(threshold, {}).keys())
        if twice:
            raise SystemExit(f"expected one run per mask threshold and modality, found {', '.join(twice)} twice at "
                             f"{threshold:g} ({folder})")
        runs.setdefault(threshold, {}).update(groups)
    chosen, table = choose(runs, bundle.mask_threshold)
    for modality, rows in table.items():
        print(f"{modality}: chosen {chosen.get(modality, 'none')} (best {CRITERION})")
        print("  " + "  ".join(f"{key:>24}" for key in ("mask_threshold",) + SHOWN))
        for i, threshold in enumerate(rows["mask_threshold"]):
            print("  " + "  ".join(f"{'-' if v is None else v:>24}" for v in [threshold] + [rows[key][i] for key in SHOWN]))
    if not chosen:
        raise SystemExit("expected protocol_<modality> figures in the runs' metrics.json (validate_bundle writes "
                         "them), found none: rerun them")
    if args.write:
        update_bundle_metadata(args.bundle, mask_thresholds=chosen,
                               card={"mask_threshold_choice": {"criterion": CRITERION, **table}})
        print(f"mask thresholds {chosen} stored in {args.bundle / 'model.toml'}")


if __name__ == "__main__":
    main()
