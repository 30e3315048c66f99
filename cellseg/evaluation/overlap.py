"""Which predicted nuclei overlap which true nuclei, and by how much: a sparse IoU table.

Only pairs whose boxes intersect get an IoU (`box_pairs` finds them without comparing every pair),
computed by pycocotools.mask.iou on the RLEs; pairs with IoU 0 are dropped. Against crowd GT the value
is intersection / prediction area, as in COCO. Both the one-to-one matching (`cellseg.evaluation.scoring.match`)
and COCO mask AP (`cellseg.evaluation.cocoeval_sparse.coco_ap`) are computed from this table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pycocotools.mask as mask_utils

from .image_masks import ImageMasks


@dataclass
class PairIoU:
    """Sparse IoU of a prediction set against a GT set: pred[i] vs gt[j] = iou, for box-intersecting
    pairs with IoU > 0. Against crowd GT the value is intersection / prediction area (as COCO)."""

    pred: np.ndarray
    gt: np.ndarray
    iou: np.ndarray


def box_pairs(a: np.ndarray, b: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Indexes (i, j) of boxes a[i], b[j] ((N, 4) half-open row0, col0, row1, col1) that overlap.

    Both sorted by row0; each chunk of `a` is compared only with the `b` rows that can reach it, so the
    work grows with the masks per band of rows, not with N x M."""
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


def pair_iou(pred: ImageMasks, gt: ImageMasks) -> PairIoU:
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
