"""What a slide looks like to the model, as a few numbers a result folder already holds (issue 48 item 4): compared
with the bundle's validation images (bundles.appearance), a slide unlike all of them gets a warning.

`appearance_features(summary, run, cells)` from summary.json, run.json and cells.csv at the count's threshold:

- nucleus_size: log of the median nucleus area as the network saw it (times the scale factor²) over the model's
  training nucleus area;
- nucleus_brightness: the median nucleus's mean intensity in the model channel, on the slide's intensity range as
  the network input has it (0: the range's low end, 1: its high end);
- nucleus_texture: the median of a nucleus's standard deviation over its mean intensity (model channel);
- stain_h, stain_dab (colour slides): hematoxylin and DAB optical density of the median nucleus colour (rgb2hed,
  in the slide's pixel range; bundles before 2026-11-29 call the second stain_e);
- median_score: the median detection score of the nuclei kept;
- kept_share: the nuclei kept over the detections scoring 0.3 or more (summary.json's score_curve);
- nuclear_area_fraction: the detected nuclei's area over the tissue analysed.

Stain colour, nucleus size and how sure the model is of what it found: a slide of a kind the model was validated
on lies among the validation images; one it cannot see (nuclei too faint, too small, another stain) does not.
"""

from __future__ import annotations

import math

import numpy as np

GRAY_FEATURES = ("nucleus_size", "nucleus_brightness", "nucleus_texture", "median_score", "kept_share",
                 "nuclear_area_fraction")
COLOUR_FEATURES = GRAY_FEATURES + ("stain_h", "stain_dab")
MIN_NUCLEI = 5            # fewer nuclei: the features are the empty slide's (no nucleus to measure)


def feature_names(colour: bool) -> tuple[str, ...]:
    return COLOUR_FEATURES if colour else GRAY_FEATURES


def appearance_features(summary: dict, run: dict, cells, kept_share: float | None = None) -> dict[str, float]:
    """The slide's features (module docstring) from its result files: `cells` holds cells.csv's score, area_px and
    intensity columns of the nuclei kept. kept_share: given (a validation folder kept every detection from 0.3 up),
    else from summary.json's score_curve. A slide with fewer than MIN_NUCLEI nuclei gets the features of one whose
    nuclei the model cannot see: no size, no contrast, no confidence (size -3, brightness and scores 0)."""
    colour = _colour(summary, cells)
    if kept_share is None:
        kept_share = _kept_share(summary)
    tissue_px = float(summary.get("tissue_area_in_regions_px") or summary.get("tissue_area_px") or 0.0)
    if len(cells) < MIN_NUCLEI:
        out = {"nucleus_size": -3.0, "nucleus_brightness": 0.0, "nucleus_texture": 0.0, "median_score": 0.0,
               "kept_share": float(kept_share if kept_share is not None else 0.0), "nuclear_area_fraction": 0.0}
        if colour:
            out.update(stain_h=0.0, stain_dab=0.0)
        return out
    scale = summary.get("scale") or {}
    factor = float(scale.get("factor") or 1.0)
    model_d = float(scale.get("model_diameter_px") or 0.0)
    area = cells["area_px"].to_numpy(float)
    size = (math.log(float(np.median(area)) * factor ** 2 / (math.pi / 4 * model_d ** 2))
            if model_d > 0 else 0.0)
    channel = _model_channel(summary, run, cells)
    low, high = (run.get("intensity_range") or [0.0, 1.0])[:2]
    mean = cells[f"mean_intensity_{channel}"].to_numpy(float) if channel else np.zeros(len(cells))
    std = cells[f"std_intensity_{channel}"].to_numpy(float) if channel else np.zeros(len(cells))
    span = float(high) - float(low) or 1.0
    out = {"nucleus_size": size,
           "nucleus_brightness": float((np.median(mean) - float(low)) / span),
           "nucleus_texture": float(np.median(std / np.maximum(mean, 1e-6))),
           "median_score": float(np.median(cells["score"].to_numpy(float))),
           "kept_share": float(kept_share if kept_share is not None else 1.0),
           "nuclear_area_fraction": float(area.sum() / tissue_px) if tissue_px > 0 else 0.0}
    if colour:
        from ..cells import mean_colour_stains
        from .report import colour_columns
        rgb = np.array([np.median(cells[c].to_numpy(float)) for c in colour_columns(cells)])
        hematoxylin, dab = mean_colour_stains(rgb, summary.get("dtype") or "uint8", summary.get("stain_white"))[0]
        out.update(stain_h=float(hematoxylin), stain_dab=float(dab))
    return out


def _colour(summary: dict, cells) -> bool:
    from .report import colour_columns
    return summary.get("channels") == 3 and colour_columns(cells) is not None


def _model_channel(summary: dict, run: dict, cells) -> str | None:
    """cells.csv's name of the model channel (the first channel for a colour slide: its mean over R, G, B is not
    kept, the red one is the network's brightest)."""
    names = [c[len("mean_intensity_"):] for c in cells.columns if c.startswith("mean_intensity_")]
    if not names:
        return None
    channel = run.get("model_channel", summary.get("model_channel"))
    return names[channel] if isinstance(channel, int) and 0 <= channel < len(names) else names[0]


def _kept_share(summary: dict) -> float | None:
    curve = summary.get("score_curve") or {}
    counts = curve.get("counts")
    if not counts or not curve.get("below_threshold_kept"):
        return None
    return float(summary["cell_count"] / counts[0]) if counts[0] else 1.0


def appearance_check(summary: dict, run: dict, cells) -> dict | None:
    """summary.json's "appearance": the slide's features and score against the bundle's validation images
    (bundles.appearance, appearance.json of the bundle run.json names, for its weights), the threshold and whether it
    is above ("unlike": then appearance_warning); None without a calibrated count (no reference to compare with)."""
    from ..bundles.appearance import BundleAppearance
    model = run.get("model") or {}
    key = (summary.get("count_estimate") or {}).get("calibration_key")
    if not key or not model.get("path"):
        return None
    from pathlib import Path
    appearance = BundleAppearance.read(Path(model["path"]))
    if appearance is None or appearance.weights_sha256 != model.get("weights_sha256") or key not in appearance.keys:
        return {"note": "no appearance reference for these weights and this kind of slide in the bundle"}
    reference = appearance.keys[key]
    features = appearance_features(summary, run, cells)
    score = reference.score(features)
    return {"score": round(score, 3), "threshold": round(reference.threshold, 3), "unlike": bool(score > reference.threshold),
            "key": key, "features": {k: round(v, 4) for k, v in features.items()}, "nuclei": len(cells),
            "note": "mean robust distance to the 3 nearest validation images of this kind; the threshold: 95 % of "
                    "validation images, each against the other groups', stay under it"}


def appearance_warning(check: dict | None) -> str | None:
    if not check or not check.get("unlike"):
        return None
    if check.get("nuclei", MIN_NUCLEI) < MIN_NUCLEI:
        # no nuclei to compare: the score says only that the model found (almost) none, which a truly empty field
        # (glass, an empty well) also gives
        return (f"{check['nuclei']} nuclei found, which is unlike anything the model was validated on: if the slide "
                f"holds nuclei, the model does not see them (another stain, modality or magnification: check the "
                f"protocol, e.g. --protocol he-nuclei for H&E, and the pixel size, --mpp); if it holds none, ignore "
                f"this")
    # as many decimals as tell the score from the threshold: "3.7, above the 3.7" read as a contradiction
    digits = next((d for d in (1, 2) if round(check["score"], d) != round(check["threshold"], d)), 3)
    return (f"this slide is unlike anything the model was validated on (appearance score {check['score']:.{digits}f}, "
            f"above the {check['threshold']:.{digits}f} that 95 % of validation images stay under: its stain, "
            f"nucleus size or the model's confidence differ): the count and its interval may be off by more than they "
            f"say. Look at the crops; count a few fields by hand or annotate them and fine-tune the model on them "
            f"(cellseg train)")
