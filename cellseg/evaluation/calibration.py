"""Fitting a bundle's score calibration and count interval (cellseg.bundles.calibration) on held-out images, and
checking them by cross-validation by group.

Input: per held-out image, its detections down to a score floor as the real pipeline made them (validation's
predictions), each matched or not to an annotated nucleus at IoU >= MATCH_IOU (greedy_match), their areas, the
image's area and its true count (`ImageOutcomes`, from `image_outcomes`). Per threshold key (fluorescence, brightfield, ...):

    fit_key      score map (isotonic regression of matched-or-not on the score: scipy.optimize.isotonic_regression),
                 recall table (pooled held-out recall per threshold and nuclear-area-fraction bin), and the spread of
                 log(true / estimate) over the images, out of fold (each group's images estimated by maps fitted on
                 the other groups)
    cross_validate   the same, leaving each group out in turn: p_nucleus of its detections and the interval of
                 each of its images come from a fit that never saw the group (the spread's own residuals coming from a
                 cross-validation inside the remaining groups): expected calibration error and interval coverage
                 per modality, as a user on a new experiment would meet them

A group is an acquisition group, a patient, a preparation or an organ (the split's "groups"): images of one group
are alike, so leaving single images out would flatter every figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..bundles.calibration import (
    BundleCalibration,
    CountSpread,
    KeyCalibration,
    RecallTable,
    ScoreMap,
    estimate_count,
)
from ..errors import EvaluationError
from .image_masks import ImageMasks

CURVE_THRESHOLDS = tuple(round(0.3 + 0.05 * k, 2) for k in range(13))   # 0.30 ... 0.90: the recall table's rows
DENSITY_BINS = 3          # nuclear area fraction: terciles of the held-out images at the key's threshold
ECE_BINS = 10
SCORE_STEP = 0.005        # the score map's resolution
MIN_GROUPS = 3            # a key needs this many held-out groups to be fitted and cross-validated by group
LEVEL = 0.9
MIN_RECALL = 0.05
# A detection is a true nucleus when it overlaps an annotated one at IoU >= MATCH_IOU. 0.3, not segmentation's 0.5:
# a count asks whether a nucleus was found, not how closely it was outlined (held-out groups disagree most on the
# outline: NuInsSeg's confident detections match at 0.5 from 56 % to 95 % of the time by organ, at 0.3 from 78 % to
# 99 %). calibrate_bundle reports the calibration error at 0.5 too.
MATCH_IOU = 0.3


@dataclass(frozen=True)
class ImageOutcomes:
    """One held-out image's detections (down to the floor): scores, matched to an annotated nucleus or not, areas
    (px); the image's area (px) and annotated nucleus count; its modality, threshold key and group."""

    name: str
    modality: str
    key: str
    group: str
    scores: np.ndarray
    matched: np.ndarray
    areas: np.ndarray
    image_area_px: float
    true_count: int

    def kept(self, threshold: float) -> np.ndarray:
        return self.scores >= threshold

    def density(self, threshold: float) -> float:
        """Nuclear area fraction: the detected nuclei's area (those kept at `threshold`) over the image's."""
        return float(self.areas[self.kept(threshold)].sum() / self.image_area_px)


def image_outcomes(pred: ImageMasks, gt: ImageMasks, *, modality: str, key: str, group: str,
                   iou: float = MATCH_IOU) -> ImageOutcomes:
    """`pred`'s detections matched to `gt`'s annotated nuclei at IoU >= `iou` (greedy_match: highest scores first,
    so whether a detection matched does not depend on the detections scoring lower, as at any threshold)."""
    import pycocotools.mask as mask_utils

    from .overlap import pair_iou
    matched = greedy_match(pred.scores, pair_iou(pred, gt), gt.iscrowd, iou)
    # one RLE at a time: pycocotools' area of a list of more than 255 fails under numpy 2 (uint8 overflow)
    areas = np.array([float(mask_utils.area(r)) for r in pred.rles], np.float64)
    return ImageOutcomes(pred.name, modality, key, group, np.asarray(pred.scores, np.float64), matched, areas,
                         float(gt.height * gt.width), int((~gt.iscrowd).sum()))


def greedy_match(scores: np.ndarray, ious, iscrowd: np.ndarray, iou: float) -> np.ndarray:
    """Which detections match an annotated nucleus: in descending score, each takes the unmatched (non-crowd)
    annotated nucleus it overlaps most, at IoU >= `iou` (COCO's matching). ious: overlap.PairIoU."""
    matched = np.zeros(len(scores), bool)
    ok = (ious.iou >= iou) & ~np.asarray(iscrowd, bool)[ious.gt]
    pred, gt, value = ious.pred[ok], ious.gt[ok], ious.iou[ok]
    rank = np.empty(len(scores), np.int64)
    rank[np.argsort(-np.asarray(scores), kind="stable")] = np.arange(len(scores))
    taken = set()
    for k in np.lexsort((-value, rank[pred])):      # detections by rank; each one's candidates by IoU
        p, g = int(pred[k]), int(gt[k])
        if not matched[p] and g not in taken:
            matched[p] = True
            taken.add(g)
    return matched


# --------------------------------------------------------------------------- the pieces

def fit_score_map(scores: np.ndarray, matched: np.ndarray, weights: np.ndarray | None = None) -> ScoreMap:
    """Weighted isotonic regression of matched (0/1) on the score (pool adjacent violators, scipy), kept as the ends
    of each constant block: linear between blocks, as scikit-learn's IsotonicRegression interpolates."""
    from scipy.optimize import isotonic_regression
    if len(scores) == 0:
        raise EvaluationError("expected detections to fit a score map on, found none")
    order = np.argsort(scores, kind="stable")
    # scores pooled on a grid of SCORE_STEP first: a few dozen knots in model.toml, not one per detection
    s = np.round(np.asarray(scores, float)[order] / SCORE_STEP) * SCORE_STEP
    y = np.asarray(matched, float)[order]
    w = np.ones(len(s)) if weights is None else np.asarray(weights, float)[order]
    unique, start = np.unique(s, return_index=True)
    count = np.add.reduceat(w, start)
    mean_y = np.add.reduceat(y * w, start) / count      # ties pooled first: one point per distinct score
    fitted = isotonic_regression(mean_y, weights=count, increasing=True).x
    change = np.flatnonzero(np.diff(fitted) != 0)
    ends = np.unique(np.r_[0, change, change + 1, len(unique) - 1])    # each block's first and last score
    return ScoreMap(tuple(unique[ends]), tuple(np.clip(fitted[ends], 0.0, 1.0)))


def expected_calibration_error(p: np.ndarray, matched: np.ndarray, bins: int = ECE_BINS) -> float | None:
    """Σ_b (n_b / N) |mean p - share matched| over `bins` equal-width bins of p (None without detections)."""
    p, y = np.asarray(p, float), np.asarray(matched, float)
    if len(p) == 0:
        return None
    which = np.minimum((p * bins).astype(int), bins - 1)
    n = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, p, bins) - np.bincount(which, y, bins))
    return float(gap.sum() / n.sum())


def reliability(p: np.ndarray, matched: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per non-empty bin of p: its mean p, share matched and detections (a reliability diagram's points)."""
    p, y = np.asarray(p, float), np.asarray(matched, float)
    which = np.minimum((p * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        sel = which == b
        if sel.any():
            out.append({"mean_p": float(p[sel].mean()), "share_matched": float(y[sel].mean()),
                        "detections": int(sel.sum())})
    return out


def fit_recall_table(images: Sequence[ImageOutcomes], threshold: float,
                     thresholds: Sequence[float] = CURVE_THRESHOLDS, bins: int = DENSITY_BINS,
                     balance: bool = True) -> RecallTable:
    """Pooled recall (matched / annotated) per threshold and nuclear-area-fraction bin; the bins are quantiles of
    the images' densities at `threshold` (the key's). A bin without annotated nuclei at some threshold takes the
    pooled recall of all the images there. balance: each modality weighs the same (modality_weights)."""
    at_key = np.array([im.density(threshold) for im in images])
    edges = np.unique(np.quantile(at_key, np.arange(1, bins) / bins)) if len(images) >= bins else np.zeros(0)
    edges = edges[edges > 0] if len(edges) else edges
    weight = (modality_weights(images, [im.true_count for im in images]) if balance
              else np.ones(len(images)))
    rows = []
    for t in thresholds:
        found = np.array([im.matched[im.kept(t)].sum() for im in images], float) * weight
        true = np.array([im.true_count for im in images], float) * weight
        which = np.searchsorted(edges, [im.density(t) for im in images], side="right")
        pooled = found.sum() / true.sum() if true.sum() else 1.0
        row = []
        for b in range(len(edges) + 1):
            sel = which == b
            row.append(found[sel].sum() / true[sel].sum() if true[sel].sum() else pooled)
        rows.append(tuple(float(min(1.0, max(MIN_RECALL, r))) for r in row))
    return RecallTable(tuple(float(t) for t in thresholds), tuple(float(e) for e in edges), tuple(rows))


def image_estimate(image: ImageOutcomes, score_map: ScoreMap, recall: RecallTable, threshold: float,
                   spread: CountSpread | None = None):
    """The count estimate (bundles.calibration.estimate_count) of one held-out image."""
    kept = image.kept(threshold)
    p = score_map(image.scores[kept])
    placeholder = spread or CountSpread(0.0, 0.0, 0.0, 0.0)
    key = KeyCalibration(image.key, score_map, recall, placeholder, threshold)
    return estimate_count(key, int(kept.sum()), float(p.sum()), image.density(threshold), threshold)


def modality_weights(images: Sequence[ImageOutcomes], amounts: Sequence[float]) -> np.ndarray:
    """Per image, 1 / (the total `amounts` of its modality among `images`): every modality weighs the same in a
    key's fit, whatever its number of images or nuclei (a user's slide may be of any of them)."""
    total: dict[str, float] = {}
    for im, a in zip(images, amounts):
        total[im.modality] = total.get(im.modality, 0.0) + float(a)
    return np.array([1.0 / total[im.modality] if total[im.modality] else 0.0 for im in images])


def fit_spread(log_errors: np.ndarray, expected: np.ndarray, level: float = LEVEL,
               weights: np.ndarray | None = None, modalities: Sequence[str] | None = None,
               group_errors: np.ndarray | None = None, group_expected: np.ndarray | None = None,
               group_weights: np.ndarray | None = None) -> CountSpread:
    """The spread of log(true / estimate) over images: sigma2 + tau2 / max(E, 1) fitted to the squared errors
    (non-negative least squares), then the (1 -+ level) / 2 quantiles of the errors over that scale, with split
    conformal's finite-sample correction; with `modalities` (the images' own) the widest of each modality's
    quantiles and the pooled ones: a slide may be of any of them, and some (NuInsSeg) stray more than the rest.

    group_errors, group_expected: log(sum of true / sum of estimates) and sum of E over each held-out group's images.
    Small images say little about sigma2, the spread left when E is large (a whole slide): whole groups do, so sigma2
    is at least their weighted mean of e_g² - tau2 / E_g."""
    from scipy.optimize import nnls
    e, big_e = np.asarray(log_errors, float), np.maximum(np.asarray(expected, float), 1.0)
    if len(e) < 2:
        raise EvaluationError(f"expected at least 2 out-of-fold errors to fit a count spread, found {len(e)}")
    w = np.ones(len(e)) if weights is None else np.asarray(weights, float) / np.sum(weights) * len(e)
    root = np.sqrt(w)
    design = np.stack([np.ones_like(e), 1.0 / big_e], axis=1)
    (sigma2, tau2), _ = nnls(design * root[:, None], e ** 2 * root)
    if group_errors is not None and len(group_errors):
        ge, gbig = np.asarray(group_errors, float), np.maximum(np.asarray(group_expected, float), 1.0)
        gw = np.ones(len(ge)) if group_weights is None else np.asarray(group_weights, float)
        sigma2 = max(sigma2, float(np.sum(gw * np.maximum(ge ** 2 - tau2 / gbig, 0.0)) / np.sum(gw)))
    if sigma2 + tau2 <= 0:
        sigma2 = float(np.mean(e ** 2)) or 1e-6
    z = e / np.sqrt(sigma2 + tau2 / big_e)
    # each tail's quantile at ceil((n + 1)(1 + level) / 2) / n (split conformal): n errors' plain quantiles are
    # too narrow for the n + 1-th image
    tail = min(1.0, math.ceil((len(z) + 1) * (1 + level) / 2) / len(z))
    low, high = _weighted_quantile(z, w, 1 - tail), _weighted_quantile(z, w, tail)
    if modalities is not None:
        for m in set(modalities):
            sel = np.array([x == m for x in modalities])
            n = int(sel.sum())
            if n >= 2:
                tail_m = min(1.0, math.ceil((n + 1) * (1 + level) / 2) / n)
                low = min(low, _weighted_quantile(z[sel], w[sel], 1 - tail_m))
                high = max(high, _weighted_quantile(z[sel], w[sel], tail_m))
    return CountSpread(float(sigma2), float(tau2), float(min(low, 0.0)), float(max(high, 0.0)), level)


def _weighted_quantile(x: np.ndarray, w: np.ndarray, q: float) -> float:
    """The q quantile of x with weights w (the smallest x whose cumulative weight reaches q of the total)."""
    order = np.argsort(x, kind="stable")
    cum = np.cumsum(w[order]) / np.sum(w)
    return float(x[order][min(len(x) - 1, int(np.searchsorted(cum, q - 1e-12)))])


def _log_error(image: ImageOutcomes, estimate) -> float | None:
    if image.true_count == 0 or estimate.estimated_true_count <= 0:
        return None
    return math.log(image.true_count / estimate.estimated_true_count)


@dataclass
class OutOfFold:
    """Each image estimated by a score map and recall table fitted on the other groups' images (out_of_fold): its
    log(true / estimate) and E, and the same per group (sums over its images)."""

    images: list[ImageOutcomes]
    errors: np.ndarray
    expected: np.ndarray
    groups: list[tuple[str, str]]         # (group, modality)
    group_errors: np.ndarray
    group_expected: np.ndarray

    def spread(self, level: float, balance: bool, widest: bool = True) -> CountSpread:
        weights = modality_weights(self.images, [1] * len(self.images)) if balance else None
        group_weights = None
        if balance:
            per_modality: dict[str, int] = {}
            for _, m in self.groups:
                per_modality[m] = per_modality.get(m, 0) + 1
            group_weights = np.array([1.0 / per_modality[m] for _, m in self.groups])
        return fit_spread(self.errors, self.expected, level, weights,
                          [im.modality for im in self.images] if widest else None,
                          self.group_errors, self.group_expected, group_weights)


def out_of_fold(images: Sequence[ImageOutcomes], threshold: float, balance: bool = True) -> OutOfFold:
    """Every image estimated by maps fitted on the other groups (images with no annotated or no expected nucleus
    are left out of the errors)."""
    errors, expected, which = [], [], []
    groups, group_errors, group_expected = [], [], []
    for group in sorted({im.group for im in images}):
        train = [im for im in images if im.group != group]
        score_map = fit_score_map(*_pooled(train, balance))
        recall = fit_recall_table(train, threshold, balance=balance)
        true_sum = est_sum = e_sum = 0.0
        for im in images:
            if im.group == group:
                est = image_estimate(im, score_map, recall, threshold)
                true_sum += im.true_count
                est_sum += est.estimated_true_count
                e_sum += est.expected_true
                e = _log_error(im, est)
                if e is not None:
                    errors.append(e)
                    expected.append(est.expected_true)
                    which.append(im)
        if true_sum > 0 and est_sum > 0:
            groups.append((group, next(im.modality for im in images if im.group == group)))
            group_errors.append(math.log(true_sum / est_sum))
            group_expected.append(e_sum)
    return OutOfFold(which, np.array(errors), np.array(expected), groups, np.array(group_errors),
                     np.array(group_expected))


def _pooled(images: Sequence[ImageOutcomes], balance: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every detection's score and match, and its weight: with `balance` each modality weighs the same
    (modality_weights), else each detection."""
    if not images:
        return np.zeros(0), np.zeros(0, bool), np.zeros(0)
    per_image = (modality_weights(images, [len(im.scores) for im in images]) if balance
                 else np.ones(len(images)))
    return (np.concatenate([im.scores for im in images]), np.concatenate([im.matched for im in images]),
            np.concatenate([np.full(len(im.scores), w) for im, w in zip(images, per_image)]))


def fit_key(images: Sequence[ImageOutcomes], key: str, threshold: float, level: float = LEVEL,
            balance: bool = True, widest: bool = True) -> KeyCalibration:
    """A threshold key's calibration from its held-out images (at least MIN_GROUPS groups): score map and recall
    table on all of them, the spread from out-of-fold errors (out_of_fold)."""
    groups = sorted({im.group for im in images})
    if len(groups) < MIN_GROUPS:
        raise EvaluationError(f"expected held-out images of at least {MIN_GROUPS} groups to calibrate {key!r}, "
                              f"found {len(groups)} ({len(images)} images)")
    return KeyCalibration(key, fit_score_map(*_pooled(images, balance)),
                          fit_recall_table(images, threshold, balance=balance),
                          out_of_fold(images, threshold, balance).spread(level, balance, widest),
                          float(threshold),
                          {"images": len(images), "groups": len(groups),
                           "modalities": sorted({im.modality for im in images})})


# --------------------------------------------------------------------------- cross-validation by group

@dataclass
class CrossValidation:
    """Leave-one-group-out results of one key: per detection kept at the threshold its out-of-fold p_nucleus and
    whether it matched, per image its out-of-fold estimate (bundles.calibration.CountEstimate)."""

    key: str
    threshold: float
    p: dict[str, np.ndarray]            # modality -> out-of-fold p_nucleus of the detections kept
    matched: dict[str, np.ndarray]
    p_floor: dict[str, np.ndarray]      # the same for every detection down to the floor
    matched_floor: dict[str, np.ndarray]
    estimates: list[tuple[ImageOutcomes, object]]
    spreads: dict[str, CountSpread]     # group -> the spread of the fit that left it out

    def group_rows(self, modality: str) -> list[tuple[int, float, float, float]]:
        """Each held-out group of `modality` as if it were one slide: (true count, estimate, low, high), the
        estimate the sum of its images' and the interval that of its sum of E (CountSpread.scale)."""
        rows = []
        for group in sorted({im.group for im, _ in self.estimates if im.modality == modality}):
            mine = [(im, est) for im, est in self.estimates if im.group == group]
            true = sum(im.true_count for im, _ in mine)
            estimate = sum(est.estimated_true_count for _, est in mine)
            spread = self.spreads[group]
            s = spread.scale(sum(est.expected_true for _, est in mine))
            rows.append((true, estimate, estimate * math.exp(spread.z_low * s), estimate * math.exp(spread.z_high * s)))
        return rows

    def figures(self) -> dict:
        """Per modality: ECE (detections kept at the threshold, and down to the floor), the interval's coverage
        and median relative width, the estimate's and the raw count's median relative error."""
        out = {}
        for modality in sorted(self.p):
            rows = [(im, est) for im, est in self.estimates if im.modality == modality and im.true_count > 0]
            inside = [est.low <= im.true_count <= est.high for im, est in rows]
            width = [(est.high - est.low) / im.true_count for im, est in rows]
            err_est = [abs(est.estimated_true_count - im.true_count) / im.true_count for im, est in rows]
            err_raw = [abs(est.count - im.true_count) / im.true_count for im, est in rows]
            true, found = sum(im.true_count for im, _ in rows), sum(est.estimated_true_count for _, est in rows)
            out[modality] = {
                "images": len(rows), "groups": len({im.group for im, _ in rows}),
                "detections_kept": int(len(self.p[modality])),
                "ece": _r(expected_calibration_error(self.p[modality], self.matched[modality])),
                "ece_down_to_floor": _r(expected_calibration_error(self.p_floor[modality],
                                                                   self.matched_floor[modality])),
                "coverage": _r(float(np.mean(inside))) if rows else None,
                "median_relative_width": _r(float(np.median(width))) if rows else None,
                "median_rel_error_estimate": _r(float(np.median(err_est))) if rows else None,
                "median_rel_error_count": _r(float(np.median(err_raw))) if rows else None,
                "pooled_bias_estimate": _r((found - true) / true) if true else None,
                "groups_covered": sum(low <= t <= high for t, _, low, high in self.group_rows(modality)),
            }
        return out


def cross_validate(images: Sequence[ImageOutcomes], key: str, threshold: float,
                   level: float = LEVEL, balance: bool = True, widest: bool = True) -> CrossValidation:
    """Leave each group out in turn: fit_key on the others, then p_nucleus and estimates for the group's images."""
    p, matched, p_floor, matched_floor = {}, {}, {}, {}
    estimates, spreads = [], {}
    for group in sorted({im.group for im in images}):
        fit = fit_key([im for im in images if im.group != group], key, threshold, level, balance, widest)
        spreads[group] = fit.spread
        for im in images:
            if im.group != group:
                continue
            kept = im.kept(threshold)
            probability = fit.score_map(im.scores)
            for table, values in ((p, probability[kept]), (matched, im.matched[kept]), (p_floor, probability),
                                  (matched_floor, im.matched)):
                table.setdefault(im.modality, []).append(values)
            estimates.append((im, image_estimate(im, fit.score_map, fit.recall, threshold, fit.spread)))
    join = lambda table: {m: np.concatenate(v) for m, v in table.items()}    # noqa: E731
    return CrossValidation(key, threshold, join(p), join(matched), join(p_floor), join(matched_floor), estimates,
                           spreads)


def fit_bundle_calibration(images: Sequence[ImageOutcomes], thresholds: dict[str, float], weights_sha256: str,
                           method: str, level: float = LEVEL, balance: bool = True, widest: bool = True
                           ) -> tuple[BundleCalibration, dict, dict]:
    """Every threshold key with enough groups fitted (fit_key) and cross-validated (cross_validate): the bundle's
    [calibration], the figures per key and modality (with why a key was left out), and the cross-validations."""
    keys, report, validations = {}, {}, {}
    for key in sorted({im.key for im in images}):
        mine = [im for im in images if im.key == key]
        groups = {im.group for im in mine}
        threshold = thresholds[key]
        if len(groups) < MIN_GROUPS:
            report[key] = {"left_out": f"{len(mine)} held-out images in {len(groups)} group(s): at least "
                                       f"{MIN_GROUPS} groups are needed to fit and cross-validate by group"}
            continue
        keys[key] = fit_key(mine, key, threshold, level, balance, widest)
        validations[key] = cross_validate(mine, key, threshold, level, balance, widest)
        report[key] = {"threshold": threshold, "images": len(mine), "groups": len(groups),
                       "by_modality": validations[key].figures()}
    return BundleCalibration(weights_sha256, keys, method, {}), report, validations


def _r(x):
    return None if x is None else round(float(x), 4)
