"""Score predicted nucleus masks against ground truth: COCO mask AP, TP/FP/FN at one IoU, count error,
and a score-threshold sweep; write the report (metrics.json, per_image.csv, threshold_sweep.png).

The parts live beside this module, which keeps the matching, the report, the sweep and the outputs:
- `cellseg.evaluation.image_masks`: loading PRED and GT (COCO JSON, label image, cellseg result folder or folders of
  them or of label pairs) as `ImageMasks` and pairing their images (by file_name, then base name, then stem, then id).
- `cellseg.evaluation.geojson_fields`: GT as a GeoJSON file (QuPath's, or a corrected cells.geojson): PRED and GT
  cut to its field rectangles, each one image.
- `cellseg.evaluation.overlap`: the sparse IoU table of box-intersecting (prediction, GT) pairs.
- `cellseg.evaluation.cocoeval_sparse`: COCO mask AP, pycocotools' COCOeval fed that table.
This module's `load_image_masks` reads label images in tiles of its LABEL_TILE; `pair_iou` and `EvaluationError`
are importable from here too.

Evaluation is class-agnostic (cellseg counts nuclei): categories are ignored.

Definitions (`evaluate`, all at the IoU threshold `iou`, default 0.5, on all predictions as given):
- Matching: one-to-one, Hungarian (scipy.optimize.linear_sum_assignment) on each connected group of
  overlapping masks, maximising the number of pairs with IoU >= `iou` and then their total IoU (as
  StarDist's `matching`). Only pairs whose boxes intersect get an IoU (pycocotools.mask.iou on RLEs).
- TP, FP, FN; precision TP/(TP+FP), recall TP/(TP+FN), F1 2TP/(2TP+FP+FN), and "AP" as in DSB2018 /
  StarDist: ap_tp = TP/(TP+FP+FN) (not COCO's interpolated AP).
- Convention for 0/0: a ratio is 1.0 when the image has nothing to find and nothing was found
  (TP = FP = FN = 0), else a zero denominator gives 0.0. So an empty image predicted empty scores 1
  everywhere and enters the means over images; GT nuclei with no predictions score 0.
- Crowd GT regions (iscrowd=1) are not nuclei to find; a prediction covering one (intersection over
  the prediction's area >= `iou`) and matching no nucleus is neither TP nor FP.
- DSB2018 score per image: the mean over IoU thresholds 0.50, 0.55, ..., 0.95 of TP/(TP+FP+FN), each matched
  as above (the Kaggle 2018 Data Science Bowl metric); reported per image and as the mean over images.
- Count error per image: pred count - true count; relative |error| / true count (0 when both are 0,
  undefined (None) when only the true count is 0; undefined values are left out of the median). Both counts leave
  crowd regions out: the pred count is TP + FP, the detections on crowd regions are the `ignored` column.
- COCO mask AP: pycocotools COCOeval, iouType "segm", useCats=0, maxDets = [1, 100, max(1000, the
  most predictions in one image)] so no prediction is dropped; ap = AP@[.5:.95], ap50, ap75, ar read
  from eval["precision"] / eval["recall"] at area "all" and the last maxDets, not from summarize()
  (which looks up maxDets=100). None when there is no GT nucleus at all. Details: cellseg.evaluation.cocoeval_sparse.
- Sweep: for score thresholds 0.3..0.95 (step 0.05), predictions with score >= threshold are kept and
  pooled counts, TP/FP/FN, F1 and ap_tp recomputed. best_threshold maximises pooled F1 (ties: the lower
  threshold) among the eligible thresholds: predictions are usually already cut at the pipeline's
  threshold, so thresholds below the highest one <= the lowest score all look the same and say nothing
  about the detections a lower cut would add; they are marked "eligible": false. None when the
  predictions carry no scores (label images), since then it means nothing.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EvaluationError
from . import image_masks
from .cocoeval_sparse import coco_ap
from .image_masks import ImageMasks, pair_images
from .overlap import PairIoU, pair_iou

log = logging.getLogger(__name__)

# 0.30, 0.35, ..., 0.95: up to 0.95 since a grayscale smear's best threshold lies there (its own threshold key)
DEFAULT_THRESHOLDS = tuple(round(0.3 + 0.05 * k, 2) for k in range(14))
DSB_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))   # 0.50, 0.55, ..., 0.95
LABEL_TILE = image_masks.LABEL_TILE  # label images are read in tiles of this many px a side (load_image_masks)
DEFINITIONS = {
    "ap_tp": "TP/(TP+FP+FN) at iou_threshold (DSB2018 / StarDist 'AP'), not COCO's interpolated AP",
    "f1": "2TP/(2TP+FP+FN); precision TP/(TP+FP); recall TP/(TP+FN)",
    "empty": "a ratio is 1.0 when TP=FP=FN=0 (nothing to find, nothing found), else 0.0 when its denominator is 0",
    "dsb_score": "per image, the mean of TP/(TP+FP+FN) over IoU 0.50:0.05:0.95 (DSB2018); mean over images",
    "rel_count_error": "|pred - true| / true; 0 when both are 0, null when only true is 0 (left out of the median)",
    "pred_count": "TP + FP: detections on crowd regions (ignored) are left out, as the true count leaves them out",
    "coco": "pycocotools COCOeval segm, class-agnostic, area all, at maxDets=max_dets (>= 1000): ap = AP@[.5:.95]",
    "best_threshold": "score threshold with the highest pooled F1 (ties: the lower) among eligible thresholds: "
                      "those not below the highest threshold <= min_score (lower ones were never measured)",
}
MATCHING = ("hungarian: scipy.optimize.linear_sum_assignment per group of overlapping masks, maximising "
            "the number of pairs with IoU >= threshold, then their total IoU")


@dataclass
class MatchResult:
    tp: int
    fp: int
    fn: int
    ignored: int  # predictions on crowd regions, neither TP nor FP
    pairs: np.ndarray  # (TP, 2) int: matched (pred index, gt index)
    pair_iou: np.ndarray  # (TP,) float

    @property
    def pred_count(self) -> int:
        # the detections the true count is compared with: those on crowd regions (ignored) are left out of both
        return self.tp + self.fp

    @property
    def true_count(self) -> int:
        return self.tp + self.fn

    def _ratio(self, num: int, den: int) -> float:
        if self.tp == self.fp == self.fn == 0:
            return 1.0
        return num / den if den else 0.0

    @property
    def precision(self) -> float:
        return self._ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return self._ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        return self._ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def ap_tp(self) -> float:
        return self._ratio(self.tp, self.tp + self.fp + self.fn)

    def summary(self) -> dict:
        pred, true = self.pred_count, self.true_count
        return {"true_count": true, "pred_count": pred, "tp": self.tp, "fp": self.fp, "fn": self.fn,
                "ignored": self.ignored, "precision": self.precision, "recall": self.recall, "f1": self.f1,
                "ap_tp": self.ap_tp,
                "mean_matched_iou": float(self.pair_iou.mean()) if len(self.pair_iou) else None,
                "count_error": pred - true, "rel_count_error": rel_count_error(pred, true)}


@dataclass
class EvaluationReport:
    pred_source: str
    gt_source: str
    iou_threshold: float
    images: list[dict]  # per image: name, height, width and MatchResult.summary()
    pooled: dict
    mean_over_images: dict
    median_rel_count_error: float | None
    coco: dict
    sweep: list[dict]
    best_threshold: float | None
    best_f1: float | None
    scores_available: bool
    min_score: float | None  # the lowest prediction score (None without scores)
    images_unmatched_pred: list[str] = field(default_factory=list)
    images_unmatched_gt: list[str] = field(default_factory=list)
    matching: str = MATCHING
    definitions: dict = field(default_factory=lambda: dict(DEFINITIONS))

    def to_dict(self) -> dict:
        return _json_safe(asdict(self))


def rel_count_error(pred: int, true: int) -> float | None:
    if true == 0:
        return 0.0 if pred == 0 else None
    return abs(pred - true) / true


# --------------------------------------------------------------------------- loading

def load_image_masks(path: str | Path) -> dict[str, ImageMasks]:
    """Images with their masks from a COCO JSON, a label image or a cellseg result folder, keyed by name:
    `cellseg.evaluation.image_masks.load_image_masks` with label images read in tiles of this module's LABEL_TILE, so
    setting `cellseg.evaluation.scoring.LABEL_TILE` still changes the tile size."""
    return image_masks.load_image_masks(path, label_tile=LABEL_TILE)


# --------------------------------------------------------------------------- matching

def match(pred: ImageMasks, gt: ImageMasks, iou: float = 0.5, score_threshold: float | None = None,
          ious: PairIoU | None = None) -> MatchResult:
    """One-to-one matching at IoU >= `iou` of the predictions with score >= `score_threshold` (all if None)."""
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ious = pair_iou(pred, gt) if ious is None else ious
    kept = np.ones(len(pred), bool) if score_threshold is None else pred.scores >= score_threshold
    ok = kept[ious.pred] & (ious.iou >= iou)
    crowd = gt.iscrowd[ious.gt]
    ep, eg, ev = ious.pred[ok & ~crowd], ious.gt[ok & ~crowd], ious.iou[ok & ~crowd]
    n_p, n_g = len(pred), len(gt)
    pairs: list[tuple[int, int, float]] = []
    if len(ep):
        graph = coo_matrix((np.ones(len(ep)), (ep, n_p + eg)), shape=(n_p + n_g,) * 2)
        _, comp = connected_components(graph, directed=False)
        ec = comp[ep]
        single = np.bincount(ec)[ec] == 1
        pairs += zip(ep[single].tolist(), eg[single].tolist(), ev[single].tolist())
        multi = np.flatnonzero(~single)
        for c in np.unique(ec[multi]):
            sel = multi[ec[multi] == c]
            rows, r_idx = np.unique(ep[sel], return_inverse=True)
            cols, c_idx = np.unique(eg[sel], return_inverse=True)
            value, weight = np.zeros((len(rows), len(cols))), np.zeros((len(rows), len(cols)))
            value[r_idx, c_idx] = ev[sel]
            # 1 per pair first, total IoU only to break ties: the IoU bonus sums to < 1
            weight[r_idx, c_idx] = 1 + ev[sel] / (2 * min(weight.shape))
            for a, b in zip(*linear_sum_assignment(weight, maximize=True)):
                if weight[a, b] > 0:
                    pairs.append((int(rows[a]), int(cols[b]), float(value[a, b])))
    matched = np.zeros(n_p, bool)
    matched[[p for p, _, _ in pairs]] = True
    on_crowd = np.zeros(n_p, bool)
    on_crowd[ious.pred[ok & crowd]] = True
    ignored = int((kept & ~matched & on_crowd).sum())
    tp = len(pairs)
    return MatchResult(tp=tp, fp=int(kept.sum()) - tp - ignored, fn=int((~gt.iscrowd).sum()) - tp, ignored=ignored,
                       pairs=np.array([(p, g) for p, g, _ in pairs], np.int64).reshape(-1, 2),
                       pair_iou=np.array([v for _, _, v in pairs], np.float64))


# --------------------------------------------------------------------------- the whole evaluation

def evaluate(pred, gt, iou: float = 0.5, thresholds=DEFAULT_THRESHOLDS) -> EvaluationReport:
    """Evaluate `pred` against `gt` (each a path for `load_image_masks` or its result); see the module docstring."""
    if not (isinstance(iou, (int, float)) and 0 < iou <= 1):
        raise EvaluationError(f"expected an IoU threshold in (0, 1], got {iou!r}")
    pred_source, gt_source = (str(x) if isinstance(x, (str, Path)) else "(in memory)" for x in (pred, gt))
    if isinstance(gt, (str, Path)) and Path(gt).suffix.lower() == ".geojson" and isinstance(pred, (str, Path)):
        from .geojson_fields import field_masks
        pred, gt = field_masks(pred, Path(gt))   # scored on GT's field rectangles, where someone checked the slide
    pred = load_image_masks(pred) if isinstance(pred, (str, Path)) else pred
    gt = load_image_masks(gt) if isinstance(gt, (str, Path)) else gt
    pairs = pair_images(pred, gt)
    used_p, used_g = {id(p) for _, p, _ in pairs}, {id(g) for _, _, g in pairs}
    unmatched_p = [im.name for im in pred.values() if id(im) not in used_p]
    unmatched_g = [im.name for im in gt.values() if id(im) not in used_g]
    if unmatched_p or unmatched_g:
        log.warning("evaluating %d common images; %d PRED and %d GT images have no partner and are left out",
                    len(pairs), len(unmatched_p), len(unmatched_g))
    ious = [pair_iou(p, g) for _, p, g in pairs]
    results = [match(p, g, iou, ious=x) for (_, p, g), x in zip(pairs, ious)]
    dsb = [dsb_score(p, g, x) for (_, p, g), x in zip(pairs, ious)]
    images = [{"image": name, "height": g.height, "width": g.width, **r.summary(), "dsb_score": d}
              for (name, _, g), r, d in zip(pairs, results, dsb)]
    pooled = _pool(results)
    rel = [im["rel_count_error"] for im in images if im["rel_count_error"] is not None]
    # an image without predictions has no score to lack: it leaves the sweep to the images that have them
    scored = any(p.has_scores for _, p, _ in pairs) and all(p.has_scores or not len(p) for _, p, _ in pairs)
    sweep = []
    for t in thresholds:
        swept = [match(p, g, iou, score_threshold=t, ious=x) for (_, p, g), x in zip(pairs, ious)]
        s = _pool(swept).summary()
        sweep.append({"threshold": float(t), **{k: s[k] for k in ("pred_count", "true_count", "tp", "fp", "fn",
                                                                 "precision", "recall", "f1", "ap_tp")}})
    # Thresholds at or below the lowest score all keep every prediction: the predictions were already cut
    # there (the pipeline's own threshold), so what a lower threshold would add was never measured.
    min_score = min((float(p.scores.min()) for _, p, _ in pairs if len(p)), default=None)
    floor = max((t for t in thresholds if min_score is not None and t <= min_score), default=-math.inf)
    for s in sweep:
        s["eligible"] = s["threshold"] >= floor
    best = (max((s for s in sweep if s["eligible"]), key=lambda s: (s["f1"], -s["threshold"]))
            if sweep and scored else None)
    if not scored:
        log.info("the predictions carry no scores: no best score threshold")
    return EvaluationReport(
        pred_source=pred_source, gt_source=gt_source, iou_threshold=float(iou), images=images,
        pooled=pooled.summary(),
        mean_over_images={**{k: float(np.mean([getattr(r, k) for r in results]))
                             for k in ("precision", "recall", "f1", "ap_tp")},
                          "dsb_score": float(np.mean(dsb)) if dsb else 0.0},
        median_rel_count_error=float(np.median(rel)) if rel else None,
        coco=coco_ap(pairs, ious), sweep=sweep,
        best_threshold=best["threshold"] if best else None, best_f1=best["f1"] if best else None,
        scores_available=scored, min_score=min_score if scored else None,
        images_unmatched_pred=unmatched_p, images_unmatched_gt=unmatched_g)


def dsb_score(pred: ImageMasks, gt: ImageMasks, ious: PairIoU | None = None) -> float:
    """The DSB2018 score of one image: mean over IoU 0.50:0.05:0.95 of TP/(TP+FP+FN) (module docstring)."""
    ious = pair_iou(pred, gt) if ious is None else ious
    return float(np.mean([match(pred, gt, t, ious=ious).ap_tp for t in DSB_IOU_THRESHOLDS]))


def _pool(results: list[MatchResult]) -> MatchResult:
    return MatchResult(tp=sum(r.tp for r in results), fp=sum(r.fp for r in results), fn=sum(r.fn for r in results),
                       ignored=sum(r.ignored for r in results),
                       pairs=np.zeros((0, 2), np.int64), pair_iou=np.concatenate([r.pair_iou for r in results]))


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# --------------------------------------------------------------------------- outputs

def summary_lines(report: EvaluationReport) -> list[str]:
    """A few human-readable lines."""
    p, c, n = report.pooled, report.coco, len(report.images)

    def f(x, fmt=".3f"):
        return "n/a" if x is None else format(x, fmt)

    lines = [f"{n} image{'s' * (n != 1)}: {p['true_count']} true cells, {p['pred_count']} predicted",
             (f"COCO mask AP (maxDets={c['max_dets']}): AP@[.5:.95] {f(c['ap'])}  AP50 {f(c['ap50'])}  "
              f"AP75 {f(c['ap75'])}"),
             (f"IoU>={report.iou_threshold:g} (Hungarian): TP {p['tp']} FP {p['fp']} FN {p['fn']}  precision "
              f"{f(p['precision'])} recall {f(p['recall'])} F1 {f(p['f1'])}  TP/(TP+FP+FN) {f(p['ap_tp'])}"),
             (f"count error: {p['count_error']:+d} pooled ({f(p['rel_count_error'], '.1%')}), median |error|/true "
              f"over images {f(report.median_rel_count_error, '.1%')}")]
    if report.best_threshold is not None:
        lines.append(f"best score threshold (max F1): {report.best_threshold:.2f} (F1 {report.best_f1:.3f})")
    else:
        lines.append("best score threshold: n/a (the predictions carry no scores)")
    return lines


PER_IMAGE_COLUMNS = ["image", "height", "width", "true_count", "pred_count", "count_error", "rel_count_error",
                     "tp", "fp", "fn", "ignored", "precision", "recall", "f1", "ap_tp", "mean_matched_iou", "dsb_score"]


def per_image_csv(report: EvaluationReport) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=PER_IMAGE_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in _json_safe(report.images):
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else "" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


def plot_sweep(report: EvaluationReport, path: str | Path) -> None:
    """Two-panel PNG: nucleus count vs score threshold (true count dashed), F1 and TP/(TP+FP+FN) below.
    Written to a temporary name, then renamed into place."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    t = [s["threshold"] for s in report.sweep]
    fig = Figure(figsize=(6, 6), dpi=100)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(t, [s["pred_count"] for s in report.sweep], "o-", color="#4878a8", label="predicted")
    top.axhline(report.pooled["true_count"], color="#404040", linestyle="--", label="true")
    top.set_ylim(bottom=0)
    top.set_ylabel("cells")
    top.legend()
    bottom.plot(t, [s["f1"] for s in report.sweep], "o-", color="#c03030", label="F1")
    bottom.plot(t, [s["ap_tp"] for s in report.sweep], "s-", color="#40a040", label="TP/(TP+FP+FN)")
    unmeasured = [s["threshold"] for s in report.sweep if not s.get("eligible", True)]
    if unmeasured:
        for ax in (top, bottom):
            ax.axvspan(min(t), max(unmeasured), color="#d0d0d0", alpha=0.5, lw=0)
        top.set_title("grey: below the predictions' lowest score (not measured)", fontsize=9)
    if report.best_threshold is not None:
        for ax in (top, bottom):
            ax.axvline(report.best_threshold, color="#c03030", linestyle=":")
        bottom.set_title(f"best threshold {report.best_threshold:.2f} (F1 {report.best_f1:.3f})", fontsize=9)
    bottom.set_ylim(0, 1.02)
    bottom.set_xlabel("score threshold")
    bottom.set_ylabel(f"at IoU >= {report.iou_threshold:g}")
    bottom.legend()
    fig.tight_layout()
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


REPORT_FILES = ("metrics.json", "per_image.csv", "threshold_sweep.png")


def check_report_folder(out_dir: Path) -> None:
    """Refuse to write a report into a file, or over files of those names that an earlier cellseg evaluation did
    not write (`cellseg evaluate` checks before it scores, write_report again before it writes)."""
    from ..errors import OutputError
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"expected a folder at {out_dir} for the evaluation's files, found a file; choose another "
                          f"--out folder")
    clash = [name for name in REPORT_FILES if (out_dir / name).exists()]
    if not clash:
        return
    try:
        ours = {"pred_source", "gt_source", "sweep"} <= set(json.loads((out_dir / "metrics.json").read_text()))
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        raise OutputError(f"expected {out_dir} to hold no {', '.join(clash)} or an earlier cellseg evaluation, "
                          f"found {'files' if len(clash) > 1 else 'a file'} that cellseg did not write; choose another "
                          f"--out folder")


def write_report(report: EvaluationReport, out_dir: str | Path) -> None:
    """metrics.json, per_image.csv and threshold_sweep.png in `out_dir` (created), each written atomically."""
    from ..errors import OutputError
    from ..results import atomic_write_text

    out_dir = Path(out_dir)
    check_report_folder(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"expected a writable output folder, cannot create {out_dir}: {e.strerror or e}") from e
    atomic_write_text(out_dir / "metrics.json", json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    atomic_write_text(out_dir / "per_image.csv", per_image_csv(report))
    plot_sweep(report, out_dir / "threshold_sweep.png")
