"""Score predicted cell masks against ground truth: COCO mask AP, TP/FP/FN at one IoU, count error,
and a score-threshold sweep.

Inputs (`load_instances`): a COCO instance JSON (our predictions.coco.json or any COCO file with mask
segmentations: RLE or polygons; or a COCO results list), a label image (TIFF/PNG, 0 = background,
each other value one cell; read tile by tile) or a cellseg result folder (its predictions.coco.json).
Images of PRED and GT are paired (`pair_images`) by file_name, then base name, then stem, then id;
a single label image is paired with a single image on the other side whatever their names.

Evaluation is class-agnostic (cellseg counts cells): categories are ignored.

Definitions (`evaluate`, all at the IoU threshold `iou`, default 0.5, on all predictions as given):
- Matching: one-to-one, Hungarian (scipy.optimize.linear_sum_assignment) on each connected group of
  overlapping masks, maximising the number of pairs with IoU >= `iou` and then their total IoU (as
  StarDist's `matching`). Only pairs whose boxes intersect get an IoU (pycocotools.mask.iou on RLEs).
- TP, FP, FN; precision TP/(TP+FP), recall TP/(TP+FN), F1 2TP/(2TP+FP+FN), and "AP" as in DSB2018 /
  StarDist: ap_tp = TP/(TP+FP+FN) (not COCO's interpolated AP).
- Convention for 0/0: a ratio is 1.0 when the image has nothing to find and nothing was found
  (TP = FP = FN = 0), else a zero denominator gives 0.0. So an empty image predicted empty scores 1
  everywhere and enters the means over images; GT cells with no predictions score 0.
- Crowd GT regions (iscrowd=1) are not cells to find; a prediction covering one (intersection over
  the prediction's area >= `iou`) and matching no cell is neither TP nor FP.
- Count error per image: pred count - true count; relative |error| / true count (0 when both are 0,
  undefined (None) when only the true count is 0; undefined values are left out of the median).
- COCO mask AP: pycocotools COCOeval, iouType "segm", useCats=0, maxDets = [1, 100, max(1000, the
  most predictions in one image)] so no prediction is dropped. COCOeval.summarize() is not used: its
  AP@[.5:.95] line looks up maxDets=100 whatever params.maxDets says (0.111 instead of 0.207 on one
  180-prediction image; its AP50/AP75 lines use maxDets[2]). Instead ap = mean of
  eval["precision"][:, :, 0, 0, -1] over entries > -1 (IoU .50:.05:.95, area "all", the last maxDets),
  ap50 / ap75 the same at IoU .50 / .75, ar the mean of eval["recall"][:, 0, 0, -1]. None when there
  is no GT cell at all. COCOeval is fed our IoU table and visits only overlapping pairs (_SparseCOCOeval).
- Sweep: for score thresholds 0.3..0.9 (step 0.05), predictions with score >= threshold are kept and
  pooled counts, TP/FP/FN, F1 and ap_tp recomputed. best_threshold maximises pooled F1 (ties: the lower
  threshold) among the eligible thresholds: predictions are usually already cut at the pipeline's
  threshold, so thresholds below the highest one <= the lowest score all look the same and say nothing
  about the detections a lower cut would add; they are marked "eligible": false. None when the
  predictions carry no scores (label images), since then it means nothing.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pycocotools.mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .errors import CellsegError
from .tiling import Box

log = logging.getLogger(__name__)

DEFAULT_THRESHOLDS = tuple(round(0.3 + 0.05 * k, 2) for k in range(13))  # 0.30, 0.35, ..., 0.90
MIN_MAX_DETS = 1000
LABEL_TILE = 2048  # label images are read in tiles of this many px a side
DEFINITIONS = {
    "ap_tp": "TP/(TP+FP+FN) at iou_threshold (DSB2018 / StarDist 'AP'), not COCO's interpolated AP",
    "f1": "2TP/(2TP+FP+FN); precision TP/(TP+FP); recall TP/(TP+FN)",
    "empty": "a ratio is 1.0 when TP=FP=FN=0 (nothing to find, nothing found), else 0.0 when its denominator is 0",
    "rel_count_error": "|pred - true| / true; 0 when both are 0, null when only true is 0 (left out of the median)",
    "coco": "pycocotools COCOeval segm, class-agnostic, area all, at maxDets=max_dets (>= 1000): ap = AP@[.5:.95]",
    "best_threshold": "score threshold with the highest pooled F1 (ties: the lower) among eligible thresholds: "
                      "those not below the highest threshold <= min_score (lower ones were never measured)",
}
MATCHING = ("hungarian: scipy.optimize.linear_sum_assignment per group of overlapping masks, maximising "
            "the number of pairs with IoU >= threshold, then their total IoU")


class EvaluationError(CellsegError):
    """Predictions or ground truth are missing, unreadable or do not fit together."""


@dataclass
class ImageInstances:
    """The cells of one image. Masks are COCO compressed RLEs of the full image; boxes (N, 4) int are
    (row0, col0, row1, col1) half-open in px; scores (N,) float (1.0 when the source has none)."""

    file_name: str | None
    image_id: int | None  # None for a label image
    height: int
    width: int
    rles: list[dict]
    boxes: np.ndarray
    scores: np.ndarray
    iscrowd: np.ndarray  # (N,) bool
    has_scores: bool

    @property
    def name(self) -> str:
        return self.file_name if self.file_name is not None else f"id {self.image_id}"

    def __len__(self) -> int:
        return len(self.rles)


@dataclass
class PairIoU:
    """Sparse IoU of a prediction set against a GT set: pred[i] vs gt[j] = iou, for box-intersecting
    pairs with IoU > 0. Against crowd GT the value is intersection / prediction area (as COCO)."""

    pred: np.ndarray
    gt: np.ndarray
    iou: np.ndarray


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
        return self.tp + self.fp + self.ignored

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

def load_instances(path: str | Path) -> dict[str, ImageInstances]:
    """Images with their cells from a COCO JSON, a label image or a cellseg result folder, keyed by name."""
    path = Path(path)
    if not path.exists():
        raise EvaluationError(f"expected a COCO JSON, a label image or a cellseg result folder, {path} "
                              "does not exist")
    if path.is_dir():
        coco = path / "predictions.coco.json"
        if not coco.is_file():
            raise EvaluationError(f"expected a cellseg result folder holding predictions.coco.json, {path} "
                                  "has none")
        path = coco
    with open(path, "rb") as fh:
        head = fh.read(64).lstrip()
    if path.suffix.lower() == ".json" or head[:1] in (b"{", b"["):
        images = _load_coco(path)
    else:
        images = [_load_label_image(path)]
    out: dict[str, ImageInstances] = {}
    for im in images:
        key = im.name if im.name not in out else f"{im.name} (id {im.image_id})"
        out[key] = im
    return out


def _load_coco(path: Path) -> list[ImageInstances]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvaluationError(f"expected a COCO instance JSON, {path} is not valid JSON: {e}") from e
    if isinstance(data, list) and all(isinstance(a, dict) and "image_id" in a for a in data):
        return _coco_results(path, data)  # a COCO results file: [{"image_id", "segmentation", "score"}]
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)):
        found = (f"an object with keys {sorted(data)[:8]}" if isinstance(data, dict)
                 else f"a JSON {type(data).__name__}")
        raise EvaluationError(f"expected a COCO instance JSON (an object with 'images' and 'annotations' lists, "
                              f"or a list of results), {path} holds {found}")
    images: dict[int, dict] = {}
    for k, im in enumerate(data["images"]):
        try:
            images[im["id"]] = {"file_name": im.get("file_name"), "height": int(im["height"]),
                                "width": int(im["width"]), "anns": []}
        except (TypeError, KeyError, ValueError) as e:
            raise EvaluationError(f"expected COCO images with 'id', 'height' and 'width', image {k} of {path} "
                                  f"is {str(im)[:80]}") from e
    for k, ann in enumerate(data["annotations"]):
        image = images.get(ann.get("image_id") if isinstance(ann, dict) else None)
        if image is None:
            raise EvaluationError(f"expected annotation {k} of {path} to refer to a listed image, found "
                                  f"image_id {ann.get('image_id') if isinstance(ann, dict) else ann!r}")
        image["anns"].append(ann)
    return [_instances(path, im["file_name"], iid, im["height"], im["width"], im["anns"])
            for iid, im in images.items()]


def _coco_results(path: Path, anns: list[dict]) -> list[ImageInstances]:
    by_image: dict = {}
    for k, ann in enumerate(anns):
        seg = ann.get("segmentation")
        if not (isinstance(seg, dict) and isinstance(seg.get("size"), list) and len(seg["size"]) == 2):
            raise EvaluationError(f"expected RLE masks with a 'size' in the COCO results list {path}, result {k} "
                                  f"has segmentation {str(seg)[:60]}")
        by_image.setdefault(ann["image_id"], []).append(ann)
    return [_instances(path, None, iid, *group[0]["segmentation"]["size"], group)
            for iid, group in by_image.items()]


def _instances(path: Path, file_name, image_id, height: int, width: int, anns: list[dict]) -> ImageInstances:
    rles = [_to_rle(path, a, height, width) for a in anns]
    with_score = sum("score" in a for a in anns)
    if with_score not in (0, len(anns)):
        raise EvaluationError(f"expected a score on every prediction or on none, image {file_name or image_id} "
                              f"of {path} has {with_score} of {len(anns)}")
    if rles:
        xywh = np.asarray(mask_utils.toBbox(rles), dtype=np.float64).round().astype(np.int64)
        boxes = np.stack([xywh[:, 1], xywh[:, 0], xywh[:, 1] + xywh[:, 3], xywh[:, 0] + xywh[:, 2]], axis=1)
    else:
        boxes = np.zeros((0, 4), np.int64)
    scores = np.array([float(a["score"]) for a in anns] if with_score else np.ones(len(anns)), np.float64)
    crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], bool)
    return ImageInstances(None if file_name is None else str(file_name), image_id, int(height), int(width),
                          rles, boxes, scores, crowd, bool(with_score))


def _to_rle(path: Path, ann: dict, h: int, w: int) -> dict:
    from .export import crop_rle

    seg = ann.get("segmentation")
    where = f"annotation {ann.get('id', '?')} of {path}"
    if isinstance(seg, dict) and "counts" in seg:
        if list(seg.get("size", [])) != [h, w]:
            raise EvaluationError(f"expected the mask size of {where} to be its image's {h} x {w} px, found "
                                  f"{seg.get('size')}")
        if isinstance(seg["counts"], list):  # uncompressed RLE
            return mask_utils.frPyObjects(seg, h, w)
        return {"size": [h, w], "counts": seg["counts"]}
    if isinstance(seg, list):
        polys = [p for p in seg if isinstance(p, list) and len(p) >= 6]
        if not polys:
            return crop_rle(np.zeros((1, 1), bool), 0, 0, h, w)
        try:
            return mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
        except (TypeError, ValueError) as e:
            raise EvaluationError(f"expected polygons of numbers in {where}, found {str(seg)[:60]}") from e
    raise EvaluationError(f"expected a mask ('segmentation' as RLE or polygons) in {where}, found "
                          f"{str(seg)[:60]} (box-only COCO files cannot be scored for masks)")


def _load_label_image(path: Path) -> ImageInstances:
    """Cells of a label image, read LABEL_TILE squares at a time: memory is one tile plus the RLEs."""
    from scipy import ndimage
    from .export import crop_rle
    from .slide import open_slide

    with open_slide(path) as slide:
        info = slide.info
        if info.n_channels != 1 or np.dtype(info.dtype).kind not in "biu":
            raise EvaluationError(f"expected a label image (one channel of integers, 0 = background), {path} has "
                                  f"{info.n_channels} channel(s) of {info.dtype}")
        H, W = info.height, info.width
        parts: dict[int, list[dict]] = {}
        for r0 in range(0, H, LABEL_TILE):
            for c0 in range(0, W, LABEL_TILE):
                tile = slide.read_region(Box(r0, c0, min(r0 + LABEL_TILE, H), min(c0 + LABEL_TILE, W)))[..., 0]
                values, inverse = np.unique(tile, return_inverse=True)
                dense = inverse.reshape(tile.shape) + (0 if values[0] == 0 else 1)  # 0 = background
                offset = 0 if values[0] == 0 else 1
                for k, sl in enumerate(ndimage.find_objects(dense)):
                    if sl is None:
                        continue
                    label = int(values[k + 1 - offset])
                    crop = dense[sl] == k + 1
                    parts.setdefault(label, []).append(crop_rle(crop, r0 + sl[0].start, c0 + sl[1].start, H, W))
    labels = sorted(parts)
    rles = [p[0] if len(p) == 1 else mask_utils.merge(p) for p in (parts[v] for v in labels)]
    image = _instances(path, path.name, None, H, W, [{"segmentation": r} for r in rles])
    log.info("%s: %d labelled cells", path.name, len(image))
    return image


def pair_images(pred: dict[str, ImageInstances], gt: dict[str, ImageInstances]
                ) -> list[tuple[str, ImageInstances, ImageInstances]]:
    """(GT name, pred image, gt image) for the images both sides share, sizes checked."""
    P, G = list(pred.values()), list(gt.values())
    pairs = None
    if len(P) == 1 and len(G) == 1 and (P[0].image_id is None or G[0].image_id is None):
        pairs = [(P[0], G[0])]  # a label image has no name to match: one image against one
    else:
        keys = (lambda im: im.file_name, lambda im: _base(im.file_name), lambda im: _stem(im.file_name),
                lambda im: im.image_id)
        for key in keys:
            pk, gk = _index(P, key), _index(G, key)
            if pk is not None and gk is not None and set(pk) & set(gk):
                pairs = [(pk[k], gk[k]) for k in gk if k in pk]
                break
    if not pairs:
        raise EvaluationError(f"expected PRED and GT to share images (by file_name or id), found none: PRED has "
                              f"{_names(P)}, GT has {_names(G)}")
    for p, g in pairs:
        if (p.height, p.width) != (g.height, g.width):
            raise EvaluationError(f"expected PRED and GT images of the same size, {g.name} is {g.height} x "
                                  f"{g.width} px in GT but {p.name} is {p.height} x {p.width} px in PRED")
    return [(g.name, p, g) for p, g in pairs]


def _base(name):
    return None if name is None else PurePosixPath(name.replace("\\", "/")).name


def _stem(name):
    base = _base(name)
    if base is None:
        return None
    for suffix in (".ome.tiff", ".ome.tif"):
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return PurePosixPath(base).stem


def _index(images, key) -> dict | None:
    out = {}
    for im in images:
        k = key(im)
        if k is None or k in out:
            return None  # a key missing or ambiguous on one side cannot pair images
        out[k] = im
    return out


def _names(images) -> str:
    names = [im.name for im in images]
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


# --------------------------------------------------------------------------- matching

def box_pairs(a: np.ndarray, b: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Indexes (i, j) of boxes a[i], b[j] ((N, 4) half-open row0, col0, row1, col1) that overlap.

    Both sorted by row0; each chunk of `a` is compared only with the `b` rows that can reach it, so the
    work grows with the cells per band of rows, not with N x M."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ob, oa = np.argsort(b[:, 0], kind="stable"), np.argsort(a[:, 0], kind="stable")
    bs = b[ob]
    max_h = int((b[:, 2] - b[:, 0]).max())
    out_i, out_j = [], []
    for s in range(0, len(a), chunk):
        ia = oa[s:s + chunk]
        ca = a[ia]
        lo = np.searchsorted(bs[:, 0], ca[:, 0].min() - max_h, side="right")
        hi = np.searchsorted(bs[:, 0], ca[:, 2].max(), side="left")
        cb = bs[lo:hi]
        hit = ((ca[:, None, 0] < cb[None, :, 2]) & (cb[None, :, 0] < ca[:, None, 2])
               & (ca[:, None, 1] < cb[None, :, 3]) & (cb[None, :, 1] < ca[:, None, 3]))
        ii, jj = np.nonzero(hit)
        out_i.append(ia[ii])
        out_j.append(ob[lo + jj])
    return np.concatenate(out_i), np.concatenate(out_j)


def pair_iou(pred: ImageInstances, gt: ImageInstances) -> PairIoU:
    """IoU (pycocotools.mask.iou on RLEs) of every box-intersecting (prediction, GT) pair."""
    pi, gi = box_pairs(pred.boxes, gt.boxes)
    vals = np.zeros(len(pi), np.float64)
    order = np.argsort(pi, kind="stable")
    pi, gi = pi[order], gi[order]
    starts = np.flatnonzero(np.r_[True, pi[1:] != pi[:-1]]) if len(pi) else np.zeros(0, np.int64)
    for s, e in zip(starts, np.r_[starts[1:], len(pi)].astype(np.int64)):
        js = gi[s:e]
        vals[s:e] = np.asarray(mask_utils.iou([pred.rles[pi[s]]], [gt.rles[j] for j in js],
                                      [int(gt.iscrowd[j]) for j in js]), np.float64).reshape(-1)
    keep = vals > 0
    return PairIoU(pi[keep], gi[keep], vals[keep])


def match(pred: ImageInstances, gt: ImageInstances, iou: float = 0.5, score_threshold: float | None = None,
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


# --------------------------------------------------------------------------- COCO AP

class _SparseCOCOeval(COCOeval):
    """COCOeval fed our box-pruned IoU table, with per-image matching that visits only overlapping GT.

    computeIoU returns a scipy CSR matrix (dets sorted by score x GT) instead of a dense one, and
    evaluateImg is pycocotools' own (BSD licence) loop restricted to each detection's nonzero IoUs. That
    restriction changes nothing: a zero IoU never makes a match and cannot trigger the loop's `break`
    sooner (GT are sorted ignored-last). The stock loop is O(T x dets x GT) in Python: 50 s for one
    image of 1,600 cells; this one is O(T x (dets + overlapping pairs))."""

    pair_ious: dict[int, PairIoU]

    def _anns(self, img_id):
        p = self.params
        return ([a for c in p.catIds for a in self._gts[img_id, c]],
                [a for c in p.catIds for a in self._dts[img_id, c]])

    def computeIoU(self, imgId, catId):  # noqa: N802, N803 (pycocotools' names)
        from scipy.sparse import csr_matrix
        gt, dt = self._anns(imgId)
        if not gt or not dt:
            return None
        dt = [dt[i] for i in np.argsort([-d["score"] for d in dt], kind="mergesort")][: self.params.maxDets[-1]]
        x = self.pair_ious[imgId]
        row = np.full(max(d["_k"] for d in dt) + 1, -1)
        col = np.full(max(g["_k"] for g in gt) + 1, -1)
        row[[d["_k"] for d in dt]], col[[g["_k"] for g in gt]] = np.arange(len(dt)), np.arange(len(gt))
        keep = (x.pred < len(row)) & (x.gt < len(col))
        r, c, v = row[x.pred[keep]], col[x.gt[keep]], x.iou[keep]
        keep = (r >= 0) & (c >= 0)
        return csr_matrix((v[keep], (r[keep], c[keep])), shape=(len(dt), len(gt)))

    def evaluateImg(self, imgId, catId, aRng, maxDet):  # noqa: N802, N803
        p = self.params
        gt, dt = self._anns(imgId)
        if not gt and not dt:
            return None
        for g in gt:
            g["_ignore"] = int(bool(g["ignore"] or g["area"] < aRng[0] or g["area"] > aRng[1]))
        gtind = np.argsort([g["_ignore"] for g in gt], kind="mergesort")
        gt = [gt[i] for i in gtind]
        dt = [dt[i] for i in np.argsort([-d["score"] for d in dt], kind="mergesort")[0:maxDet]]
        iscrowd = [int(o["iscrowd"]) for o in gt]
        T, G, D = len(p.iouThrs), len(gt), len(dt)
        gtm, dtm, dtIg = np.zeros((T, G)), np.zeros((T, D)), np.zeros((T, D))  # noqa: N806
        gtIg = np.array([g["_ignore"] for g in gt])  # noqa: N806
        ious = self.ious[imgId, catId]
        if ious is not None:
            ious = ious[:D][:, gtind].tocsr()
            ious.sort_indices()  # GT in ignored-last order, as the stock loop walks them
            rows = [(ious.indices[a:b].tolist(), ious.data[a:b].tolist())
                    for a, b in zip(ious.indptr[:-1], ious.indptr[1:])]
            for tind, t in enumerate(p.iouThrs):
                for dind, (cols, vals) in enumerate(rows):
                    best, m = min([t, 1 - 1e-10]), -1
                    for gind, v in zip(cols, vals):
                        if gtm[tind, gind] > 0 and not iscrowd[gind]:
                            continue
                        if m > -1 and gtIg[m] == 0 and gtIg[gind] == 1:
                            break
                        if v < best:
                            continue
                        best, m = v, gind
                    if m == -1:
                        continue
                    dtIg[tind, dind] = gtIg[m]
                    dtm[tind, dind] = gt[m]["id"]
                    gtm[tind, m] = dt[dind]["id"]
        a = np.array([d["area"] < aRng[0] or d["area"] > aRng[1] for d in dt]).reshape((1, D))
        dtIg = np.logical_or(dtIg, np.logical_and(dtm == 0, np.repeat(a, T, 0)))  # noqa: N806
        return {"image_id": imgId, "category_id": catId, "aRng": aRng, "maxDet": maxDet,
                "dtIds": [d["id"] for d in dt], "gtIds": [g["id"] for g in gt], "dtMatches": dtm, "gtMatches": gtm,
                "dtScores": [d["score"] for d in dt], "gtIgnore": gtIg, "dtIgnore": dtIg}


def coco_ap(pairs: list[tuple[str, ImageInstances, ImageInstances]], ious: list[PairIoU] | None = None) -> dict:
    """COCO mask AP (COCOeval, segm, class-agnostic, area "all", maxDets >= 1000); see the module docstring."""
    ious = [pair_iou(p, g) for _, p, g in pairs] if ious is None else ious
    max_dets = [1, 100, max(MIN_MAX_DETS, max((len(p) for _, p, _ in pairs), default=0))]
    images = [{"id": k + 1, "height": g.height, "width": g.width} for k, (_, _, g) in enumerate(pairs)]
    gt_anns, dt_anns = [], []
    for k, (_, p, g) in enumerate(pairs):
        for side, im, out in (("gt", g, gt_anns), ("dt", p, dt_anns)):
            areas = _areas(im.rles)
            for j in range(len(im)):
                r0, c0, r1, c1 = (int(v) for v in im.boxes[j])
                out.append({"id": len(out) + 1, "image_id": k + 1, "category_id": 1, "segmentation": im.rles[j],
                            "area": float(areas[j]), "bbox": [c0, r0, c1 - c0, r1 - r0], "score": float(im.scores[j]),
                            "iscrowd": int(im.iscrowd[j]) if side == "gt" else 0, "_k": j})
    categories = [{"id": 1, "name": "cell"}]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt, coco_dt = COCO(), COCO()
        coco_gt.dataset = {"images": images, "annotations": gt_anns, "categories": categories}
        coco_dt.dataset = {"images": images, "annotations": dt_anns, "categories": categories}
        coco_gt.createIndex()
        coco_dt.createIndex()
        ev = _SparseCOCOeval(coco_gt, coco_dt, iouType="segm")
        ev.pair_ious = {k + 1: x for k, x in enumerate(ious)}
        ev.params.useCats = 0
        ev.params.maxDets = max_dets
        ev.params.areaRng, ev.params.areaRngLbl = ev.params.areaRng[:1], ["all"]  # small/medium/large: unused
        ev.evaluate()
        ev.accumulate()
    precision, recall = ev.eval["precision"], ev.eval["recall"]  # [T, R, K, A, M], [T, K, A, M]
    thr = ev.params.iouThrs

    def mean(x):
        x = x[x > -1]
        return float(x.mean()) if x.size else None

    return {"iou_type": "segm", "class_agnostic": True, "max_dets": max_dets[-1],
            "ap": mean(precision[:, :, :, 0, -1]), "ap50": mean(precision[np.isclose(thr, 0.5), :, :, 0, -1]),
            "ap75": mean(precision[np.isclose(thr, 0.75), :, :, 0, -1]), "ar": mean(recall[:, :, 0, -1])}


def _areas(rles):
    # pycocotools' area() overflows (uint8 length) on lists of more than 255 masks: go in chunks
    return np.concatenate([np.zeros(0)] + [np.asarray(mask_utils.area(rles[k:k + 255]), np.float64).reshape(-1)
                                           for k in range(0, len(rles), 255)])


# --------------------------------------------------------------------------- the whole evaluation

def evaluate(pred, gt, iou: float = 0.5, thresholds=DEFAULT_THRESHOLDS) -> EvaluationReport:
    """Evaluate `pred` against `gt` (each a path for `load_instances` or its result); see the module docstring."""
    if not (isinstance(iou, (int, float)) and 0 < iou <= 1):
        raise EvaluationError(f"expected an IoU threshold in (0, 1], got {iou!r}")
    pred_source, gt_source = (str(x) if isinstance(x, (str, Path)) else "(in memory)" for x in (pred, gt))
    pred = load_instances(pred) if isinstance(pred, (str, Path)) else pred
    gt = load_instances(gt) if isinstance(gt, (str, Path)) else gt
    pairs = pair_images(pred, gt)
    used_p, used_g = {id(p) for _, p, _ in pairs}, {id(g) for _, _, g in pairs}
    unmatched_p = [im.name for im in pred.values() if id(im) not in used_p]
    unmatched_g = [im.name for im in gt.values() if id(im) not in used_g]
    if unmatched_p or unmatched_g:
        log.warning("evaluating %d common images; %d PRED and %d GT images have no partner and are left out",
                    len(pairs), len(unmatched_p), len(unmatched_g))
    ious = [pair_iou(p, g) for _, p, g in pairs]
    results = [match(p, g, iou, ious=x) for (_, p, g), x in zip(pairs, ious)]
    images = [{"image": name, "height": g.height, "width": g.width, **r.summary()}
              for (name, _, g), r in zip(pairs, results)]
    pooled = _pool(results)
    rel = [im["rel_count_error"] for im in images if im["rel_count_error"] is not None]
    scored = all(p.has_scores for _, p, _ in pairs)
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
        mean_over_images={k: float(np.mean([getattr(r, k) for r in results]))
                          for k in ("precision", "recall", "f1", "ap_tp")},
        median_rel_count_error=float(np.median(rel)) if rel else None,
        coco=coco_ap(pairs, ious), sweep=sweep,
        best_threshold=best["threshold"] if best else None, best_f1=best["f1"] if best else None,
        scores_available=scored, min_score=min_score if scored else None,
        images_unmatched_pred=unmatched_p, images_unmatched_gt=unmatched_g)


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
                     "tp", "fp", "fn", "ignored", "precision", "recall", "f1", "ap_tp", "mean_matched_iou"]


def per_image_csv(report: EvaluationReport) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=PER_IMAGE_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in _json_safe(report.images):
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else "" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


def plot_sweep(report: EvaluationReport, path: str | Path) -> None:
    """Two-panel PNG: cell count vs score threshold (true count dashed), F1 and TP/(TP+FP+FN) below.
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


def write_report(report: EvaluationReport, out_dir: str | Path) -> None:
    """metrics.json, per_image.csv and threshold_sweep.png in `out_dir` (created), each written atomically."""
    from .errors import OutputError
    from .resultdir import atomic_write_text

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"expected a writable output folder, cannot create {out_dir}: {e.strerror or e}") from e
    atomic_write_text(out_dir / "metrics.json", json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    atomic_write_text(out_dir / "per_image.csv", per_image_csv(report))
    plot_sweep(report, out_dir / "threshold_sweep.png")
