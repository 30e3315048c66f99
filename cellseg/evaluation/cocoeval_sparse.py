"""COCO mask AP with pycocotools' COCOeval, fed the sparse IoU table of `cellseg.evaluation.overlap`.

- COCO mask AP (`coco_ap`): pycocotools COCOeval, iouType "segm", useCats=0, maxDets = [1, 100,
  max(1000, the most predictions in one image)] so no prediction is dropped. COCOeval.summarize() is not
  used: its AP@[.5:.95] line looks up maxDets=100 whatever params.maxDets says (0.111 instead of 0.207 on
  one 180-prediction image; its AP50/AP75 lines use maxDets[2]). Instead ap = mean of
  eval["precision"][:, :, 0, 0, -1] over entries > -1 (IoU .50:.05:.95, area "all", the last maxDets),
  ap50 / ap75 the same at IoU .50 / .75, ar the mean of eval["recall"][:, 0, 0, -1]. None when there
  is no GT nucleus at all.
- COCOeval is fed our IoU table and visits only overlapping pairs (`_SparseCOCOeval`), with the same
  results as the stock class.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pycocotools.mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .image_masks import ImageMasks
from .overlap import PairIoU, pair_iou

MIN_MAX_DETS = 1000


class _SparseCOCOeval(COCOeval):
    """COCOeval fed our box-pruned IoU table, with per-image matching that visits only overlapping GT.

    computeIoU returns a scipy CSR matrix (dets sorted by score x GT) instead of a dense one, and
    evaluateImg is pycocotools' own (BSD licence) loop restricted to each detection's nonzero IoUs. That
    restriction changes nothing: a zero IoU never makes a match and cannot trigger the loop's `break`
    sooner (GT are sorted ignored-last). The stock loop is O(T x dets x GT) in Python: 50 s for one
    image of 1,600 nuclei; this one is O(T x (dets + overlapping pairs))."""

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


def coco_ap(pairs: list[tuple[str, ImageMasks, ImageMasks]], ious: list[PairIoU] | None = None) -> dict:
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
