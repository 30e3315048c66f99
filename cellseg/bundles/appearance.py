"""A bundle's validation images as a reference of what slides it was validated on (issue 48 item 4), so that a slide
unlike all of them is said to be so.

`appearance.json` in the bundle folder (plain JSON, never unpickled; written by references/nuclei/calibrate_bundle.py
with the calibration, for the weights it records): per threshold key the features of every held-out image
(results.appearance: nucleus size, brightness, texture and stain, how sure the model is of what it found, nuclear
area fraction), their median and robust spread, and a threshold on the score. A slide's score is the mean distance,
in robust standard units (x - median) / (1.4826 MAD), from its features to those of its `k` nearest validation
images; the threshold is the 95th percentile of the held-out images' own scores, each scored against the images of
the other groups only. Above it the slide is "unlike anything validated".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BundleError

APPEARANCE_FILE = "appearance.json"
APPEARANCE_FORMAT = "cellseg-appearance/1"


_RENAMED = {"stain_e": "stain_dab"}


@dataclass(frozen=True)
class AppearanceReference:
    """One threshold key's validation images: feature names, their rows, median, spread, k, threshold."""

    features: tuple[str, ...]
    reference: np.ndarray        # (n images, n features)
    center: np.ndarray
    spread: np.ndarray
    k: int
    threshold: float

    def score(self, features: dict[str, float]) -> float:
        """Mean robust distance from `features` to the k nearest validation images."""
        x = np.array([float(features[f]) for f in self.features])
        z = (x - self.center) / self.spread
        zr = (self.reference - self.center) / self.spread
        d = np.sqrt(((zr - z) ** 2).sum(1))
        return float(np.sort(d)[:min(self.k, len(d))].mean())

    def to_dict(self) -> dict:
        return {"features": list(self.features), "k": self.k, "threshold": round(self.threshold, 4),
                "center": [round(float(v), 6) for v in self.center],
                "spread": [round(float(v), 6) for v in self.spread],
                "reference": [[round(float(v), 5) for v in row] for row in self.reference]}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> AppearanceReference:
        try:
            # "stain_e", as bundles before 2026-11-29 name it, always held the DAB density (stain_densities' second
            # column): the same feature, its true name
            features = tuple(_RENAMED.get(str(f), str(f)) for f in d["features"])
            reference = np.asarray(d["reference"], np.float64).reshape(-1, len(features))
            center, spread = np.asarray(d["center"], np.float64), np.asarray(d["spread"], np.float64)
            k, threshold = int(d["k"]), float(d["threshold"])
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"expected features, reference, center, spread, k and threshold in {where}, found "
                              f"others ({e})") from e
        if center.shape != (len(features),) or spread.shape != (len(features),) or np.any(spread <= 0) \
                or len(reference) == 0 or k < 1 or not np.all(np.isfinite(reference)):
            raise BundleError(f"expected a consistent appearance reference in {where} (one center and positive "
                              f"spread per feature, at least one image, k >= 1), found another")
        return cls(features, reference, center, spread, k, threshold)


@dataclass(frozen=True)
class BundleAppearance:
    """appearance.json: the weights it was made for, one AppearanceReference per threshold key, figures."""

    weights_sha256: str
    keys: dict[str, AppearanceReference]
    report: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"format": APPEARANCE_FORMAT, "weights_sha256": self.weights_sha256,
                           "keys": {k: v.to_dict() for k, v in sorted(self.keys.items())}, "report": self.report},
                          indent=1)

    @classmethod
    def read(cls, folder: Path) -> BundleAppearance | None:
        """The bundle folder's appearance.json, or None when it has none."""
        path = Path(folder) / APPEARANCE_FILE
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise BundleError(f"expected readable JSON in {path}, found {e}") from e
        if not isinstance(d, dict) or d.get("format") != APPEARANCE_FORMAT or not isinstance(d.get("keys"), dict):
            raise BundleError(f"expected format = {APPEARANCE_FORMAT!r} and keys in {path}, found another file")
        return cls(str(d.get("weights_sha256", "")),
                   {k: AppearanceReference.from_dict(v, f"{path} ({k})") for k, v in d["keys"].items()},
                   d.get("report") if isinstance(d.get("report"), dict) else {})

    def write(self, folder: Path) -> Path:
        from .bundle import _file_mode
        path = Path(folder) / APPEARANCE_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        tmp.chmod(_file_mode())
        tmp.replace(path)
        return path
