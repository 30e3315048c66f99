"""A count a scientist can defend (issue 48): what a result folder says about how far its count can be trusted.

- cells.csv's p_nucleus: the bundle's score map (bundles.calibration) applied to each nucleus's score;
- summary.json "count_estimate" (and per region, regions.csv's estimate columns): the count at the threshold, the
  expected true nuclei among them (sum of p_nucleus), the nuclei estimated missed from the held-out recall at that
  threshold and nuclear area fraction, the estimated true count and its 90 % interval, stated as an estimate from
  validation data (bundles.calibration.estimate_count);
- summary.json "score_curve": the count at every threshold from 0.30 to 0.90, from the nuclei kept (exact) and the
  detections the network scored under the threshold (boxes only: not seam-deduped, not mask-checked), which are kept
  in below_threshold.csv; a slide whose count moves more than CURVE_WARN between the neighbours of its threshold gets a
  warning (results.report shows the curve and crops of the detections near the threshold).

`ScoreTally` gathers what this needs while the nuclei stream past (a few numbers per nucleus); the rest is arithmetic
on it at the end of the count.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tomllib

from ..bundles.bundle import GRAY_SUFFIX
from ..bundles.calibration import (
    ESTIMATE_NOTE,
    NO_CALIBRATION,
    BundleCalibration,
    KeyCalibration,
    ScoreMap,
    estimate_count,
)
from ..errors import BundleError

CURVE_THRESHOLDS = tuple(round(0.3 + 0.05 * k, 2) for k in range(13))    # 0.30, 0.35, ..., 0.90
CURVE_WARN = 0.10        # relative change of the count between the threshold and a neighbour (± 0.05) that warns
CURVE_WARN_MIN = 10      # ... and at least this many nuclei (a field of 20 moves 10 % with 2)
BELOW_FILE = "below_threshold.csv"
BELOW_NOTE = ("counts under the threshold add the detections the network scored there (boxes only, not "
              "seam-deduped or mask-checked: an approximation of a count made at that threshold)")
NO_TISSUE_NOTE = ("no tissue was analysed (the tissue prefilter found none there): a count of 0 says nothing of the "
                  "nuclei it may hold; --tissue none analyses every tile")
ESTIMATE_COLUMNS = ("expected_true_positives", "estimated_missed", "estimated_true_count", "interval_low",
                    "interval_high", "interval_level", "nuclear_area_fraction", "estimate_note")


def count_calibration(model: dict | None, modality: str | None, gray: bool) -> tuple[KeyCalibration | None, str]:
    """The calibration a count uses (run.json's "model": counter.model_record; the protocol's modality; whether the
    slide's network input is gray) and a note saying which, or why none: no bundle recorded, test-time augmentation
    (its merged scores are another scale), no [calibration] in the bundle or one fitted for other weights, no key for
    this modality. Read from the bundle's model.toml (TOML, never unpickled)."""
    if not model or not model.get("path"):
        return None, f"{NO_CALIBRATION} (no model bundle recorded)"
    if model.get("test_time_augmentation"):
        return None, "no calibration with test-time augmentation (the bundle's was fitted without it)"
    toml_path = Path(model["path"]) / "model.toml"
    try:
        bundle_toml = tomllib.loads(toml_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise BundleError(f"expected the bundle's model.toml at {toml_path} readable, found {e}") from e
    table = bundle_toml.get("calibration")
    if table is None:
        return None, NO_CALIBRATION
    calibration = BundleCalibration.from_dict(table, str(toml_path))
    if calibration.weights_sha256 != model.get("weights_sha256"):
        return None, f"{NO_CALIBRATION} for these weights (it was fitted for other weights: refit it)"
    thresholds = bundle_toml.get("inference", {}).get("score_threshold_by_modality", {})
    key = calibration.for_slide(modality, gray, gray_is_own_kind=f"{modality}{GRAY_SUFFIX}" in thresholds)
    if key is None:
        kind = f"{modality}{' (gray input)' if gray else ''}"
        return None, f"{NO_CALIBRATION} for {kind} slides (it has {', '.join(sorted(calibration.keys)) or 'none'})"
    return key, f"calibration {key.key!r}: {calibration.method}"


def slide_threshold(model: dict | None, gray: bool) -> float | None:
    """The score threshold a slide was counted at (counter.model_record's pair: its gray or its colour one)."""
    thresholds = (model or {}).get("score_thresholds")
    return float(thresholds["gray" if gray else "colour"]) if thresholds else None


@dataclass
class ScoreTally:
    """What a count's uncertainty needs, gathered as the nuclei are written: the nuclei counted at each curve
    threshold, the sum of p_nucleus, and the below-threshold candidates (Instances.below) of the analysed tiles."""

    score_map: ScoreMap | None
    threshold: float
    kept_at: np.ndarray = field(default_factory=lambda: np.zeros(len(CURVE_THRESHOLDS), np.int64))
    expected_true: float = 0.0
    below: list[np.ndarray] = field(default_factory=list)

    def p_nucleus(self, scores: np.ndarray) -> np.ndarray:
        """cells.csv's p_nucleus of nuclei with these scores (NaN, an empty field, without a calibration)."""
        if self.score_map is None:
            return np.full(len(scores), np.nan, np.float32)
        return self.score_map(scores)

    def add_nuclei(self, scores: np.ndarray, p_nucleus: np.ndarray) -> None:
        # in float32, as the detector compares its scores with its threshold
        scores = np.asarray(scores, np.float32)
        self.kept_at += (scores[None, :] >= np.asarray(CURVE_THRESHOLDS, np.float32)[:, None]).sum(1)
        if self.score_map is not None:
            self.expected_true += float(np.sum(p_nucleus, dtype=np.float64))

    def add_below(self, below: np.ndarray) -> None:
        if len(below):
            self.below.append(below)

    def candidates(self) -> np.ndarray:
        return np.concatenate(self.below) if self.below else np.zeros((0, 5), np.float32)

    def curve(self, available: bool = True) -> dict:
        """summary.json's "score_curve": the count at each threshold of CURVE_THRESHOLDS."""
        below = self.candidates()
        t = np.asarray(CURVE_THRESHOLDS, np.float32)
        counts = self.kept_at + (below[None, :, 4] >= t[:, None]).sum(1) if len(below) else self.kept_at
        return {"thresholds": list(CURVE_THRESHOLDS), "counts": [int(c) for c in counts],
                "threshold": self.threshold, "below_threshold_kept": bool(available),
                "note": BELOW_NOTE if available else "the detector kept nothing under the threshold (test-time "
                                                     "augmentation): counts only at and above it"}

    def write_below(self, path: Path) -> None:
        """below_threshold.csv: every candidate kept (box in level-0 px, half-open; score), by score, highest first."""
        below = self.candidates()
        below = below[np.argsort(-below[:, 4], kind="stable")] if len(below) else below
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["row0_px", "col0_px", "row1_px", "col1_px", "score"])
            writer.writerows([f"{v:.1f}" for v in row[:4]] + [f"{row[4]:.4f}"] for row in below)


def curve_warning(curve: dict) -> str | None:
    """A warning when the count moves more than CURVE_WARN (and CURVE_WARN_MIN nuclei) between the count's threshold
    and a neighbour 0.05 away, else None."""
    thresholds, counts, threshold = curve["thresholds"], curve["counts"], curve.get("threshold")
    if threshold is None or not curve.get("below_threshold_kept"):
        return None
    k = int(np.argmin(np.abs(np.asarray(thresholds) - threshold)))
    if abs(thresholds[k] - threshold) > 1e-6 or counts[k] == 0:
        return None
    moves = [(thresholds[j], counts[j]) for j in (k - 1, k + 1) if 0 <= j < len(counts)]
    worst = max(moves, key=lambda tc: abs(tc[1] - counts[k]), default=None)
    if worst is None:
        return None
    change = abs(worst[1] - counts[k])
    if change / counts[k] > CURVE_WARN and change >= CURVE_WARN_MIN:
        return (f"the count moves {change / counts[k]:.0%} between the threshold {threshold:.2f} ({counts[k]:,}) and "
                f"{worst[0]:.2f} ({worst[1]:,}), more than {CURVE_WARN:.0%}, which no held-out validation image does: "
                f"many nuclei score near the threshold; look at the crops near it before trusting the count")
    return None


def estimate_record(calibration: KeyCalibration | None, note: str, count: int, expected_true: float,
                    area_px: float, tissue_px: float, threshold: float) -> dict:
    """summary.json's "count_estimate" (or a region's): the estimate with its interval, or the count alone and why
    there is no estimate."""
    if calibration is None:
        return {"count": int(count), "estimated_true_count": None, "note": note}
    if count == 0 and tissue_px <= 0:
        # nothing was looked at: 0 is no measurement, and an interval of 0 to a few would read as one
        return {"count": 0, "estimated_true_count": None, "note": NO_TISSUE_NOTE, "calibration": note}
    density = float(area_px / tissue_px) if tissue_px > 0 else 0.0
    record = estimate_count(calibration, count, expected_true, density, threshold).to_dict()
    record["calibration"] = note
    if abs(threshold - calibration.threshold) > 1e-6:
        record["note"] = (f"{ESTIMATE_NOTE}; the interval's spread was measured at the bundle's threshold "
                          f"{calibration.threshold:.2f}, this count used {threshold:.2f}")
    return record


def region_estimates(table: list[dict], calibration: KeyCalibration | None, note: str, expected: np.ndarray,
                     area_px: np.ndarray, threshold: float) -> None:
    """regions.csv's and summary.json's regions gain ESTIMATE_COLUMNS (empty without a calibration), in place."""
    for row, e, a in zip(table, expected, area_px):
        record = estimate_record(calibration, note, row["cells"], float(e), float(a), float(row["tissue_area_px"]),
                                 threshold)
        for column in ESTIMATE_COLUMNS:
            source = {"interval_low": "interval_low", "estimate_note": "note"}.get(column, column)
            row[column] = record.get(source)
