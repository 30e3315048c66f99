"""What a bundle's held-out validation says a detection and a count are worth (issue 48): p_nucleus per detection,
and a slide's (or a region's) estimated true count with an interval.

Not the slide normalisation (detection.Detector.calibrated): this is score calibration. A bundle's model.toml
[calibration] table holds, per threshold key (Bundle.threshold_for's keys: fluorescence, brightfield,
brightfield_gray), what cellseg.evaluation.calibration fitted on the bundle's held-out images counted by the real
pipeline (references/nuclei/calibrate_bundle.py for the shipped bundle, refitted whenever its weights change):

- `ScoreMap`: detection score -> p_nucleus, the probability that a detection is an annotated nucleus (matched at
  IoU >= 0.5), an isotonic (non-decreasing) fit stored as knots, linear between them;
- `RecallTable`: held-out recall per score threshold and per bin of nuclear area fraction (the share of the analysed
  tissue covered by detected nuclei: crowded fields lose more nuclei);
- `CountSpread`: how far the estimate strayed from the true count on held-out images it was not fitted on
  (cross-validated by group), as quantiles of standardised log errors.

The estimate (`estimate_count`): of the n detections kept, E = sum of p_nucleus are expected to be true nuclei; with
r the held-out recall at that threshold and density, the true count is estimated as E / r (so E (1 - r) / r nuclei
missed), and its interval is est x exp(z_low s) .. est x exp(z_high s), s = sqrt(sigma2 + tau2 / max(E, 1)): a
spread shared by every slide of the key (sigma2) plus one that shrinks with the number of nuclei (tau2 / E).

Everything is plain numbers in TOML (never unpickled), checked when read: maps must be non-decreasing within [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import BundleError

CALIBRATION_FORMAT = "cellseg-calibration/1"
ESTIMATE_NOTE = ("an estimate from validation data: the bundle's held-out images of this kind, not this slide's own "
                 "annotations")
NO_CALIBRATION = "no calibration in this bundle"


def _floats(value, where: str, what: str) -> np.ndarray:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                       for v in value):
        raise BundleError(f"expected {what} as a list of numbers in {where}, found {value!r:.80}")
    out = np.asarray(value, np.float64)
    if not np.all(np.isfinite(out)):
        raise BundleError(f"expected finite numbers for {what} in {where}, found {value!r:.80}")
    return out


@dataclass(frozen=True)
class ScoreMap:
    """Detection score -> probability of a true nucleus: knots (scores strictly increasing, p non-decreasing in
    [0, 1]), linear between knots, flat beyond the ends."""

    scores: tuple[float, ...]
    p: tuple[float, ...]

    def __post_init__(self):
        s, p = np.asarray(self.scores, float), np.asarray(self.p, float)
        if s.ndim != 1 or s.shape != p.shape or len(s) < 1:
            raise BundleError(f"expected as many knot scores as probabilities (at least one), found {len(s)} and "
                              f"{len(p)}")
        if np.any(np.diff(s) <= 0):
            raise BundleError("expected a score map's knot scores strictly increasing, found them not")
        if np.any(np.diff(p) < 0) or p.min() < 0 or p.max() > 1:
            raise BundleError("expected a score map's probabilities non-decreasing within [0, 1], found them not")

    def __call__(self, scores) -> np.ndarray:
        """p_nucleus of each score (float32)."""
        return np.interp(np.asarray(scores, np.float64), self.scores, self.p).astype(np.float32)

    def to_dict(self) -> dict:
        return {"scores": [round(float(v), 6) for v in self.scores], "p_nucleus": [round(float(v), 6) for v in self.p]}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> ScoreMap:
        return cls(tuple(_floats(d.get("scores"), where, "scores")), tuple(_floats(d.get("p_nucleus"), where,
                                                                                 "p_nucleus")))


@dataclass(frozen=True)
class RecallTable:
    """Held-out recall (matched annotated nuclei / annotated nuclei, pooled over images) per score threshold (rows)
    and nuclear area fraction bin (columns; `density_edges` are the inner bin edges, increasing)."""

    thresholds: tuple[float, ...]
    density_edges: tuple[float, ...]
    recall: tuple[tuple[float, ...], ...]

    def __post_init__(self):
        t, e = np.asarray(self.thresholds, float), np.asarray(self.density_edges, float)
        r = np.asarray(self.recall, float)
        if len(t) < 1 or np.any(np.diff(t) <= 0) or np.any(np.diff(e) <= 0):
            raise BundleError("expected a recall table's thresholds and density edges increasing, found them not")
        if r.shape != (len(t), len(e) + 1):
            raise BundleError(f"expected a recall table of {len(t)} thresholds x {len(e) + 1} density bins, found "
                              f"shape {r.shape}")
        if not np.all((r > 0) & (r <= 1)):
            raise BundleError("expected recalls in (0, 1] in a recall table, found others")

    def density_bin(self, density: float) -> int:
        return int(np.searchsorted(self.density_edges, density, side="right"))

    def __call__(self, threshold: float, density: float) -> float:
        """The recall at `threshold` (linear between the table's thresholds, flat beyond them) in the density bin of
        `density` (a nuclear area fraction)."""
        column = np.asarray(self.recall, float)[:, self.density_bin(density)]
        return float(np.interp(threshold, self.thresholds, column))

    def to_dict(self) -> dict:
        return {"thresholds": [round(float(v), 4) for v in self.thresholds],
                "density_edges": [round(float(v), 6) for v in self.density_edges],
                "recall": [[round(float(v), 6) for v in row] for row in self.recall]}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> RecallTable:
        rows = d.get("recall")
        if not isinstance(rows, list):
            raise BundleError(f"expected recall as a list of rows in {where}, found {rows!r:.80}")
        return cls(tuple(_floats(d.get("thresholds"), where, "thresholds")),
                   tuple(_floats(d.get("density_edges"), where, "density_edges")),
                   tuple(tuple(_floats(row, where, "a recall row")) for row in rows))


@dataclass(frozen=True)
class CountSpread:
    """How far log(true count / estimate) strays: its scale s(E) = sqrt(sigma2 + tau2 / max(E, 1)) for E expected
    true detections, and the `level` interval's quantiles (z_low, z_high) of log(true / est) / s over held-out images
    (out of fold)."""

    sigma2: float
    tau2: float
    z_low: float
    z_high: float
    level: float = 0.9

    def __post_init__(self):
        if not (self.sigma2 >= 0 and self.tau2 >= 0 and self.z_low <= self.z_high and 0 < self.level < 1):
            raise BundleError(f"expected sigma2, tau2 >= 0, z_low <= z_high and a level in (0, 1), found {self}")

    def scale(self, expected: float) -> float:
        return math.sqrt(self.sigma2 + self.tau2 / max(float(expected), 1.0))

    def to_dict(self) -> dict:
        return {k: round(float(getattr(self, k)), 6) for k in ("sigma2", "tau2", "z_low", "z_high", "level")}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> CountSpread:
        values = _floats([d.get(k) for k in ("sigma2", "tau2", "z_low", "z_high", "level")], where,
                         "sigma2, tau2, z_low, z_high, level")
        return cls(*map(float, values))


@dataclass(frozen=True)
class KeyCalibration:
    """One threshold key's calibration: the score map, the recall table, the spread, the threshold it was fitted at
    (the bundle's for the key) and what it was fitted on (free text and figures, for people)."""

    key: str
    score_map: ScoreMap
    recall: RecallTable
    spread: CountSpread
    threshold: float
    fitted_on: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"threshold": float(self.threshold), "score_map": self.score_map.to_dict(),
                "recall": self.recall.to_dict(), "spread": self.spread.to_dict(), "fitted_on": self.fitted_on}

    @classmethod
    def from_dict(cls, key: str, d: dict, where: str) -> KeyCalibration:
        where = f"[calibration.{key}] of {where}"
        try:
            fitted_on = d.get("fitted_on", {})
            if not isinstance(fitted_on, dict):
                raise BundleError(f"expected fitted_on as a table in {where}, found {fitted_on!r:.60}")
            return cls(key, ScoreMap.from_dict(d["score_map"], where), RecallTable.from_dict(d["recall"], where),
                       CountSpread.from_dict(d["spread"], where), float(d["threshold"]), fitted_on)
        except KeyError as e:
            raise BundleError(f"expected {e.args[0]} in {where}, found none") from e
        except (TypeError, AttributeError) as e:
            raise BundleError(f"expected score_map, recall and spread tables in {where}, found others ({e})") from e


@dataclass(frozen=True)
class BundleCalibration:
    """model.toml's [calibration]: the weights it was fitted for (a calibration of other weights is not used), how,
    and one KeyCalibration per threshold key."""

    weights_sha256: str
    keys: dict[str, KeyCalibration]
    method: str = ""
    report: dict = field(default_factory=dict)    # figures for the model card (calibration error, coverage)

    def for_slide(self, modality: str | None, gray: bool = False,
                  gray_is_own_kind: bool = False) -> KeyCalibration | None:
        """The calibration of a slide's threshold key: `modality`, or for a slide whose network input is gray
        `modality` + "_gray" when there is one, else `modality`'s unless the bundle tunes gray slides of that
        modality as a kind of their own (`gray_is_own_kind`: it has a `modality`_gray score threshold, as for
        brightfield's smears): the scores of a smear and of stained tissue mean different things. Fluorescence, where
        every slide is gray, keeps its calibration at any threshold (the recall table is per threshold). None when
        the bundle has none for the slide."""
        from .bundle import GRAY_SUFFIX
        if gray and f"{modality}{GRAY_SUFFIX}" in self.keys:
            return self.keys[f"{modality}{GRAY_SUFFIX}"]
        if gray and gray_is_own_kind:
            return None
        return self.keys.get(str(modality))

    def to_dict(self) -> dict:
        return {"format": CALIBRATION_FORMAT, "weights_sha256": self.weights_sha256, "method": self.method,
                "report": self.report, **{k: v.to_dict() for k, v in sorted(self.keys.items())}}

    @classmethod
    def from_dict(cls, d, where: str) -> BundleCalibration:
        if not isinstance(d, dict):
            raise BundleError(f"expected [calibration] in {where} to be a table, found {type(d).__name__}")
        if d.get("format") != CALIBRATION_FORMAT:
            raise BundleError(f"expected format = {CALIBRATION_FORMAT!r} in [calibration] of {where}, found "
                              f"{d.get('format')!r}")
        reserved = {"format", "weights_sha256", "method", "report"}
        keys = {}
        for key, table in d.items():
            if key in reserved:
                continue
            if not isinstance(table, dict):
                raise BundleError(f"expected [calibration.{key}] in {where} to be a table, found {table!r:.60}")
            keys[key] = KeyCalibration.from_dict(key, table, where)
        report = d.get("report", {})
        return cls(str(d.get("weights_sha256", "")), keys, str(d.get("method", "")),
                   report if isinstance(report, dict) else {})


@dataclass(frozen=True)
class CountEstimate:
    """A count with its uncertainty (estimate_count): `count` detections kept at `threshold`, of which
    `expected_true` are expected to be true nuclei (sum of p_nucleus), `estimated_missed` nuclei estimated missed
    (held-out recall `recall` at nuclear area fraction `density`), `estimated_true_count` = expected_true / recall and
    its `level` interval [low, high]."""

    count: int
    expected_true: float
    estimated_missed: float
    estimated_true_count: float
    low: float
    high: float
    level: float
    recall: float
    density: float
    threshold: float
    key: str

    def to_dict(self) -> dict:
        return {"count": self.count, "expected_true_positives": round(self.expected_true, 2),
                "estimated_missed": round(self.estimated_missed, 2),
                "estimated_true_count": round(self.estimated_true_count, 2),
                "interval_low": round(self.low, 2), "interval_high": round(self.high, 2),
                "interval_level": self.level, "held_out_recall": round(self.recall, 4),
                "nuclear_area_fraction": round(self.density, 6), "threshold": self.threshold,
                "calibration_key": self.key, "note": ESTIMATE_NOTE}


def estimate_count(calibration: KeyCalibration, count: int, expected_true: float, density: float,
                   threshold: float) -> CountEstimate:
    """The estimated true count of a slide or region: `count` detections kept at `threshold` whose p_nucleus sum to
    `expected_true`, covering the `density` share of the tissue analysed (module docstring)."""
    recall = calibration.recall(threshold, density)
    estimate = expected_true / recall
    s = calibration.spread.scale(expected_true)
    if expected_true > 0:
        low, high = estimate * math.exp(calibration.spread.z_low * s), estimate * math.exp(calibration.spread.z_high * s)
    else:   # nothing found: no scale to stretch; the upper end is that of a field with one expected nucleus
        low, high = 0.0, math.exp(calibration.spread.z_high * s) / recall
    return CountEstimate(int(count), float(expected_true), float(estimate - expected_true), float(estimate),
                         float(low), float(high), calibration.spread.level, recall, float(density), float(threshold),
                         calibration.key)
