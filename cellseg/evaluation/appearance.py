"""Fitting a bundle's appearance reference (bundles.appearance) on its held-out images, and checking it: is a
modality held out whole scored as unlike the rest, and how often does an image of a validated kind warn?

Per threshold key: the held-out images' features (results.appearance); the threshold is the QUANTILE of the images'
own scores, each against the other groups' images only (a slide is never of a validated group). The check, per
modality of the key: its images scored against the other modalities' images only (as if it had never been
validated), against the other modalities' images scored leave-one-group-out without it; ROC AUC of the two, and the
share of each over the threshold fitted without the modality.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..bundles.appearance import AppearanceReference

K = 3
QUANTILE = 0.95
MIN_SPREAD = 1e-3


def reference_of(x: np.ndarray, features: Sequence[str], k: int = K, threshold: float = np.inf) -> AppearanceReference:
    center = np.median(x, 0)
    spread = np.maximum(1.4826 * np.median(np.abs(x - center), 0), MIN_SPREAD)
    return AppearanceReference(tuple(features), np.asarray(x, float), center, spread, k, float(threshold))


def group_out_scores(x: np.ndarray, groups: Sequence[str], features: Sequence[str], k: int = K) -> np.ndarray:
    """Each image's score against the images of the other groups (their own median and spread)."""
    groups = np.asarray(groups)
    out = np.zeros(len(x))
    for g in np.unique(groups):
        mine = groups == g
        ref = reference_of(x[~mine], features, k)
        out[mine] = [ref.score(dict(zip(features, row))) for row in x[mine]]
    return out


def roc_auc(positive: Sequence[float], negative: Sequence[float]) -> float | None:
    """P(a positive scores above a negative), ties halved (Mann-Whitney)."""
    p, n = np.asarray(positive, float), np.asarray(negative, float)
    if not len(p) or not len(n):
        return None
    return float(((p[:, None] > n[None]).sum() + 0.5 * (p[:, None] == n[None]).sum()) / (len(p) * len(n)))


def fit_appearance(x: np.ndarray, groups: Sequence[str], modalities: Sequence[str], features: Sequence[str],
                   k: int = K, quantile: float = QUANTILE) -> tuple[AppearanceReference, dict]:
    """The key's reference (all its images; threshold: `quantile` of their group-out scores) and the check of
    each modality held out whole (module docstring)."""
    x, groups, modalities = np.asarray(x, float), np.asarray(groups), np.asarray(modalities)
    own = group_out_scores(x, groups, features, k)
    reference = reference_of(x, features, k, float(np.quantile(own, quantile)))
    report = {"images": len(x), "k": k, "quantile": quantile, "threshold": round(reference.threshold, 4),
              "in_distribution_warned": round(float(np.mean(own > reference.threshold)), 4), "held_out_whole": {}}
    for m in np.unique(modalities):
        out = modalities == m
        if out.all() or len(np.unique(groups[~out])) < 2:
            continue
        others = reference_of(x[~out], features, k)
        positive = [others.score(dict(zip(features, row))) for row in x[out]]
        negative = group_out_scores(x[~out], groups[~out], features, k)
        threshold = float(np.quantile(negative, quantile))
        report["held_out_whole"][str(m)] = {
            "images": int(out.sum()), "roc_auc": _r(roc_auc(positive, negative)),
            "warned": _r(float(np.mean(np.asarray(positive) > threshold))),
            "others_warned": _r(float(np.mean(negative > threshold)))}
    return reference, report


def _r(x):
    return None if x is None else round(float(x), 4)
