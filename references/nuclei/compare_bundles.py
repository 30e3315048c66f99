"""Whether a candidate bundle may replace the shipped one, from both bundles' figures on the held-out groups.

Both bundles are scored first by validate_bundle.py on the same held-out images (same split, each at thresholds
tuned its own way, gray input apart), each into its own --out folder; this reads the two metrics.json and prints one
table and two verdicts:

- the ship rule (issue 47, item 5): AP50 pooled better on the held-out images no training stage saw (validate_bundle
  --seen or the split's own record; every held-out image where none is recorded), and no modality's AP50 pooled down
  by more than 0.01. This decides the exit status, and is the rule the shipped bundles since v4 were chosen by.
- the stricter comparison: on every modality no figure worse (AP50 pooled, F1 pooled, median count error, DSB2018
  score) and at least one better. Printed for the reader (no bundle since v3 has met it: the DSB2018 score or a
  count error somewhere moves the other way).

Beside each AP50 change, its 90 % interval from a paired bootstrap over the modality's images (both bundles' per-image
TP/FP/FN resampled together): a change of 0.02 on 29 images may be a few nuclei either way, and the interval says how
far the figure would move on another draw of such images. The verdicts stay the rules'.

    python -m references.nuclei.compare_bundles --current runs/final/shipped --candidate runs/final/candidate

Exit status 0 when the candidate ships by the ship rule, 1 when it does not (2: the inputs are not usable).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .plot_heldout import MODALITIES
from .validate_bundle import PREDICTIONS_MADE_WITH

LABELS = {"fluorescence": "fluorescence", "stained_tissue": "stained tissue",
          "brightfield_gray": "grayscale brightfield", "he_breast": "H&E (TNBC)",
          "fluorescence_kromp": "fluorescence (Kromp)", "he_nuinsseg": "H&E (NuInsSeg)", "all": "all"}
# card_figures' key, its name, and whether a higher value is better
FIGURES = (("ap50_tp_fp_fn_pooled", "AP50 pooled", True), ("f1_pooled", "F1", True),
           ("median_rel_count_error", "median count error", False),
           ("dsb_score_mean_over_images", "DSB2018 score", True))


# Settings of a validation that move its figures besides the weights (predictions_made_with.json): where the two
# differ, a figure that depends on them (the DSB2018 score on the mask threshold, Kromp on the count size) is not
# like for like. A bundle's own count size is part of what it is; the rest are choices of the validation.
SCORING_SETTINGS = (("mask_threshold", "mask threshold"), ("nucleus_diameter_px", "count size (px)"),
                    ("count_at", "datasets counted at --diameter auto"), ("precision", "precision"),
                    ("tta", "test-time augmentation"), ("floor", "score floor"),
                    ("proposal_threshold", "proposal threshold"))


def scoring_differences(current: Path, candidate: Path) -> list[str]:
    """One line per setting the two validations were scored with differently: how the score thresholds were chosen
    (metrics.json), and what made the predictions (predictions_made_with.json; nothing when either lacks one)."""
    chosen_on = [_threshold_choice(folder) for folder in (current, candidate)]
    lines = ([f"score thresholds chosen on: {chosen_on[0]} (current) against {chosen_on[1]} (candidate)"]
             if None not in chosen_on and chosen_on[0] != chosen_on[1] else [])
    made_with = []
    for folder in (current, candidate):
        try:
            made_with.append(json.loads((folder / PREDICTIONS_MADE_WITH).read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return lines
    a, b = made_with
    return lines + [f"{name}: {_setting(a.get(key))} (current) against {_setting(b.get(key))} (candidate)"
                    for key, name in SCORING_SETTINGS if a.get(key) != b.get(key)]


def _threshold_choice(folder: Path) -> str | None:
    """How the validation in `folder` chose its score thresholds (metrics.json's threshold_chosen_on)."""
    try:
        return json.loads((folder / "metrics.json").read_text(encoding="utf-8")).get("threshold_chosen_on")
    except (OSError, ValueError, AttributeError):
        return None


def _setting(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_setting(v)}" for k, v in sorted(value.items())) or "none"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def read_metrics(folder: Path) -> dict:
    """validate_bundle.py's metrics.json in `folder` (ValueError, with a one-line message, when it is unusable)."""
    path = folder / "metrics.json"
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"expected validate_bundle.py's metrics.json in {folder}, found no such file") from None
    except ValueError as e:
        raise ValueError(f"expected JSON in {path}, found unreadable text ({e})") from None
    missing = [m for m in MODALITIES if m not in metrics]
    if missing:
        raise ValueError(f"expected figures for every modality in {path}, found none for {', '.join(missing)}")
    return metrics


BOOTSTRAP_LEVEL = 0.9
BOOTSTRAP_RESAMPLES = 2000


def per_image_outcomes(folder: Path, modality: str) -> dict[str, tuple[int, int, int]] | None:
    """image -> (TP, FP, FN) at the validation's thresholds, from validate_bundle.py's metrics_MODALITY.json; None
    when the folder has none."""
    try:
        images = json.loads((folder / f"metrics_{modality}.json").read_text(encoding="utf-8"))["images"]
        return {im["image"]: (im["tp"], im["fp"], im["fn"]) for im in images}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def ap50_change_interval(current: dict[str, tuple[int, int, int]], candidate: dict[str, tuple[int, int, int]],
                         level: float = BOOTSTRAP_LEVEL, resamples: int = BOOTSTRAP_RESAMPLES,
                         seed: int = 0) -> tuple[float, float] | None:
    """The `level` interval of the change in pooled AP50 (TP/(TP+FP+FN)), candidate minus current, from a paired
    bootstrap over the images both were scored on; None unless both hold the same images (at least two)."""
    if current.keys() != candidate.keys() or len(current) < 2:
        return None
    names = sorted(current)
    a = np.array([current[n] for n in names], dtype=np.int64)
    b = np.array([candidate[n] for n in names], dtype=np.int64)
    draws = np.random.default_rng(seed).integers(0, len(names), size=(resamples, len(names)))
    sa, sb = a[draws].sum(axis=1), b[draws].sum(axis=1)
    change = sb[:, 0] / np.maximum(sb.sum(axis=1), 1) - sa[:, 0] / np.maximum(sa.sum(axis=1), 1)
    low, high = np.quantile(change, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def compare_row(current: dict, candidate: dict) -> dict:
    """Per figure: 'better', 'same' or 'worse' for the candidate (figures as card_figures gives them)."""
    verdicts = {}
    for key, _, higher_is_better in FIGURES:
        a, b = current.get(key), candidate.get(key)
        if a is None or b is None:
            verdicts[key] = "missing"
        elif a == b:
            verdicts[key] = "same"
        else:
            verdicts[key] = "better" if (b > a) == higher_is_better else "worse"
    return verdicts


def beats(verdicts: dict) -> bool:
    """The ship rule for one modality: nothing worse (or missing), something better."""
    values = set(verdicts.values())
    return not values & {"worse", "missing"} and "better" in values


def ships(current: dict, candidate: dict) -> tuple[bool, list[str]]:
    """The stricter comparison: whether the candidate beats the current bundle on every modality (beats), and the
    modalities where it does not."""
    losing = [m for m in MODALITIES if not beats(compare_row(current[m], candidate[m]))]
    return not losing, losing


MAX_MODALITY_LOSS = 0.01   # issue 47's ship rule: no modality's AP50 pooled down by more than this
AP50 = "ap50_tp_fp_fn_pooled"


def ship_rule(current: dict, candidate: dict) -> tuple[bool, str]:
    """Issue 47's ship rule: AP50 pooled better on the held-out images no training stage saw ("all_unseen"; "all"
    where the validations record none) and no modality's AP50 pooled down by more than MAX_MODALITY_LOSS (a
    modality without a figure fails it). Returns the verdict and why, in words."""
    key = "all_unseen" if "all_unseen" in current and "all_unseen" in candidate else "all"
    before, after = current[key].get(AP50), candidate[key].get(AP50)
    what = (f"the {candidate[key].get('images', '?')} images "
            + ("no training stage saw" if key == "all_unseen" else "held out (no record of what training saw)"))
    changes = {m: (None if current[m].get(AP50) is None or candidate[m].get(AP50) is None
                   else round(candidate[m][AP50] - current[m][AP50], 4)) for m in MODALITIES}
    missing = [LABELS[m] for m, c in changes.items() if c is None]
    if before is None or after is None or missing:
        return False, f"no AP50 pooled for {', '.join(missing) or what}"
    worst = min(changes, key=changes.get)
    pooled = f"{what} {before:.4f} -> {after:.4f} pooled"
    if after <= before:
        return False, f"{pooled}, not better"
    if changes[worst] < -MAX_MODALITY_LOSS:
        return False, f"{LABELS[worst]} down by {-changes[worst]:.4f}, more than {MAX_MODALITY_LOSS}"
    loss = (f"the most {LABELS[worst]} {changes[worst]:+.4f}" if changes[worst] < 0 else "none down")
    return True, f"{pooled}; no modality down by more than {MAX_MODALITY_LOSS} ({loss})"


def _fmt(key: str, value) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f} %" if key == "median_rel_count_error" else f"{value:.4f}"


def table(current: dict, candidate: dict, intervals: dict[str, tuple[float, float] | None] | None = None) -> str:
    """Markdown: every modality (and its 'images no training stage saw' row where both have one), each figure as
    current -> candidate, the AP50 change's bootstrap interval where `intervals` has one (by row key), and the stricter
    comparison's verdict (beats)."""
    intervals = intervals or {}
    header = (["modality", "images"] + [name for _, name, _ in FIGURES]
              + [f"AP50 change, {BOOTSTRAP_LEVEL:.0%} interval", "candidate beats current"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in MODALITIES + ("all",):
        for suffix, note in (("", ""), ("_unseen", ", images no training stage saw")):
            if name + suffix not in current or name + suffix not in candidate:
                continue
            a, b = current[name + suffix], candidate[name + suffix]
            verdicts = compare_row(a, b)
            cells = [LABELS[name] + note, str(b.get("images", "-"))]
            cells += [f"{_fmt(k, a.get(k))} → {_fmt(k, b.get(k))}" + ("" if verdicts[k] == "same" else
                                                                    f" ({verdicts[k]})") for k, _, _ in FIGURES]
            interval = intervals.get(name + suffix)
            cells.append("-" if interval is None else f"{interval[0]:+.3f} to {interval[1]:+.3f}")
            cells.append(("yes" if beats(verdicts) else "no") + ("" if name in MODALITIES and not suffix
                                                                 else " (not part of the comparison)"))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--current", type=Path, required=True, help="validate_bundle.py --out folder of the shipped bundle")
    p.add_argument("--candidate", type=Path, required=True, help="the same for the candidate")
    args = p.parse_args(argv)
    try:
        current, candidate = read_metrics(args.current), read_metrics(args.candidate)
    except ValueError as e:
        print(f"compare_bundles: {e}", file=sys.stderr)
        return 2
    for key in ("val_images", "held_out_groups"):   # the same images, or the comparison means nothing
        if current.get(key) != candidate.get(key):
            print(f"compare_bundles: expected both scored on the same held-out images, found different {key} "
                  f"({args.current} and {args.candidate})", file=sys.stderr)
            return 2
    intervals = {}
    for name in MODALITIES + ("all",):
        for key in (name, name + "_unseen"):
            a, b = per_image_outcomes(args.current, key), per_image_outcomes(args.candidate, key)
            intervals[key] = ap50_change_interval(a, b) if a is not None and b is not None else None
    print(table(current, candidate, intervals))
    differences = scoring_differences(args.current, args.candidate)
    if differences:
        print("\nscored differently (figures that depend on these are not like for like):\n"
              + "\n".join(f"- {line}" for line in differences))
    better_everywhere, losing = ships(current, candidate)
    print("\nbetter on every figure of every modality (the stricter comparison): "
          + ("yes" if better_everywhere else "no (not on " + ", ".join(LABELS[m] for m in losing) + ")"))
    ok, why = ship_rule(current, candidate)
    print(f"ships: {'yes' if ok else 'no'} (issue 47's rule: {why})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
