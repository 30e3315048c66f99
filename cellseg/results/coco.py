"""COCO instance JSON for predictions: a streaming writer and the compressed RLE it stores masks in.

Conventions (docs/architecture.md): coordinates are (row, col) in level-0 pixels, boxes half-open
`Box(row0, col0, row1, col1)`. `x, y` appear only where COCO demands them (its bbox).

- `crop_rle`, `crop_rles`: COCO compressed RLE of full-image masks built from their crops alone (also used by
  `cellseg.evaluation.image_masks` to read label images).
- `CocoWriter`: streams predictions.coco.json one annotation at a time, memory flat in the slide size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

import numpy as np


def _rle_strings(counts: np.ndarray, mask_of: np.ndarray, n_masks: int) -> list[str]:
    """COCO's compressed RLE strings (pycocotools maskApi.c rleToString) of the uncompressed counts of `n_masks`
    masks at once: `counts` holds each mask's counts one after another, `mask_of` the mask of each.

    Reimplemented with int64 because pycocotools stores counts as uint32: a slide over 2**32 pixels
    (65536²) has runs that overflow it. Each value (a delta to the count two back in its mask, from index 3 on —
    the C code's quirk) is written as 5-bit groups, least significant first, 0x20 = "more follows",
    plus 48 to land in printable ASCII. All groups of all values of all masks are made at once (a loop over
    groups cost ~100 µs a mask, one call per mask ~50 µs).
    """
    x = np.asarray(counts, dtype=np.int64).copy()
    if x.size == 0:
        return [""] * n_masks
    first = np.r_[True, mask_of[1:] != mask_of[:-1]]
    index_in_mask = np.arange(x.size) - np.maximum.accumulate(np.where(first, np.arange(x.size), 0))
    later = np.flatnonzero(index_in_mask >= 3)
    x[later] -= np.asarray(counts, dtype=np.int64)[later - 2]
    # enough groups for the largest magnitude plus its sign bit, plus one spare; groups after a value's last are
    # masked out
    n_groups = (int(np.abs(x).max()).bit_length() + 1) // 5 + 2
    shifts = 5 * np.arange(n_groups, dtype=np.int64)
    c = (x[:, None] >> shifts) & 0x1F
    rest = x[:, None] >> (shifts + 5)   # arithmetic shift, as the C code on a signed long
    more = np.where(c & 0x10, rest != -1, rest != 0)
    valid = np.ones(more.shape, bool)
    valid[:, 1:] = np.logical_and.accumulate(more, axis=1)[:, :-1]
    text = (np.where(more, c | 0x20, c) + 48)[valid].astype(np.uint8).tobytes().decode("ascii")  # value-major
    ends = np.cumsum(np.bincount(mask_of, weights=valid.sum(1), minlength=n_masks).astype(np.int64))
    return [text[a:b] for a, b in zip(np.r_[0, ends[:-1]], ends)]


def crop_rles(crops: list[np.ndarray], row0s, col0s, height: int, width: int) -> list[dict]:
    """COCO compressed RLE {"size": [height, width], "counts": str} of each of several full images, each zero
    except for its `crops[k]` (bool (h, w)) placed with its top-left pixel at (row0s[k], col0s[k]).

    COCO RLE runs column-major over the whole image, starting with a run of zeros. Never builds the
    full image: each crop is padded with one sentinel row whose run weight stands for the gap of
    (height - h) zeros down to the next column's crop; a leading pixel carries col0*height + row0
    zeros, and the last sentinel the trailing zeros. Runs are weighted sums over equal values, for all crops
    in one pass (a run never spans two crops).
    """
    H, W = int(height), int(width)
    vals, weights, mask_of = [], [], []
    for k, (mask_crop, row0, col0) in enumerate(zip(crops, row0s, col0s)):
        crop = np.asarray(mask_crop, dtype=bool)
        row0, col0 = int(row0), int(col0)
        if crop.ndim != 2:
            raise ValueError(f"expected a 2-D mask crop, got shape {crop.shape}")
        h, w = crop.shape
        if H <= 0 or W <= 0 or not (0 <= row0 and row0 + h <= H and 0 <= col0 and col0 + w <= W):
            raise ValueError(f"expected a crop of shape {crop.shape} at ({row0}, {col0}) inside a "
                             f"{H} x {W} image")
        if not crop.any():   # one run of H * W zeros
            v, wt = np.zeros(1, bool), np.array([H * W], np.int64)
        else:
            padded = np.zeros((h + 1, w), bool)
            padded[:h] = crop
            wts = np.ones((h + 1, w), np.int64)
            wts[h, :] = H - h
            wts[h, -1] = (H - row0 - h) + (W - col0 - w) * H
            v = np.concatenate([[False], padded.ravel(order="F")])
            wt = np.concatenate([[col0 * H + row0], wts.ravel(order="F")])
            keep = wt > 0  # a zero-weight gap (full-height crop, or a crop at the origin) must not split a run
            v, wt = v[keep], wt[keep]
            if v[0]:   # COCO counts start with a run of zeros: here an empty one
                v, wt = np.r_[False, v], np.r_[0, wt]
        vals.append(v)
        weights.append(wt)
        mask_of.append(np.full(v.size, k, np.int64))
    if not crops:
        return []
    vals, weights, mask_of = np.concatenate(vals), np.concatenate(weights), np.concatenate(mask_of)
    starts = np.flatnonzero(np.r_[True, (vals[1:] != vals[:-1]) | (mask_of[1:] != mask_of[:-1])])
    counts = np.add.reduceat(weights, starts)
    return [{"size": [H, W], "counts": text} for text in _rle_strings(counts, mask_of[starts], len(crops))]


def crop_rle(mask_crop: np.ndarray, row0: int, col0: int, height: int, width: int) -> dict:
    """crop_rles of one crop."""
    return crop_rles([mask_crop], [row0], [col0], height, width)[0]


class CocoWriter:
    """Streams predictions as a COCO instance JSON for one image (id 1).

    Masks are compressed RLE in full-image coordinates. The annotations array is written one
    object at a time, so memory is independent of slide size and nucleus count. Annotations carry
    "iscrowd": 0 so the file also serves as ground truth for COCOeval.
    """

    def __init__(self, path: Path, file_name: str, height: int, width: int, categories: list[dict]):
        for cat in categories:
            if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
                raise ValueError(f"expected categories as dicts with 'id' and 'name', got {cat!r}")
        self.path = Path(path)
        self.height, self.width = int(height), int(width)
        self.count = 0
        self._fh: IO[str] | None = open(self.path, "w", encoding="utf-8")
        head = {"info": {"description": "cellseg predictions"},
                "images": [{"id": 1, "file_name": str(file_name), "height": self.height,
                            "width": self.width}],
                "categories": categories}
        # Everything but the annotations, with the closing brace replaced by an open array.
        self._fh.write(json.dumps(head)[:-1] + ', "annotations": [')

    def append(self, ids: np.ndarray, boxes: np.ndarray, masks: list[np.ndarray],
               scores: np.ndarray, class_ids: np.ndarray) -> None:
        """Append N nuclei: ids (N,) int; boxes (N, 4) int (row0, col0, row1, col1) in slide px;
        masks[i] bool (row1-row0, col1-col0); scores (N,) float; class_ids (N,) int category ids."""
        if self._fh is None:
            raise ValueError(f"{self.path} is already closed")
        boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
        n = len(boxes)
        if not (len(ids) == len(masks) == len(scores) == len(class_ids) == n):
            raise ValueError(f"expected N ids, boxes, masks, scores and class ids, got {len(ids)}, "
                             f"{n}, {len(masks)}, {len(scores)}, {len(class_ids)}")
        masks = [np.asarray(m, dtype=bool) for m in masks]
        for i, mask in enumerate(masks):
            r0, c0, r1, c1 = (int(v) for v in boxes[i])
            if mask.shape != (r1 - r0, c1 - c0):
                raise ValueError(f"expected mask {i} of its box's shape {(r1 - r0, c1 - c0)}, "
                                 f"got {mask.shape}")
        rles = crop_rles(masks, boxes[:, 0], boxes[:, 1], self.height, self.width)
        for i, (mask, rle) in enumerate(zip(masks, rles)):
            r0, c0, r1, c1 = (int(v) for v in boxes[i])
            ann = {"id": int(ids[i]), "image_id": 1, "category_id": int(class_ids[i]),
                   "bbox": [c0, r0, c1 - c0, r1 - r0],  # COCO: [x, y, w, h]
                   "area": int(mask.sum()), "score": float(f"{float(scores[i]):.6g}"),
                   "iscrowd": 0, "segmentation": rle}
            self._fh.write(("\n" if self.count == 0 else ",\n") + json.dumps(ann))
            self.count += 1

    def close(self) -> None:
        """Finish the JSON document. Idempotent."""
        if self._fh is not None:
            self._fh.write("\n]}\n")
            self._fh.close()
            self._fh = None

    def __enter__(self) -> CocoWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        elif self._fh is not None:
            # A failed run: leave the file visibly unfinished rather than a valid-looking partial
            # result; the staging folder holding it is discarded anyway.
            self._fh.close()
            self._fh = None
