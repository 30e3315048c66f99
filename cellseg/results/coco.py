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

from .tile_batch import TileBatch


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

    COCO RLE runs column-major over the whole image, starting with a run of zeros. Never builds the full image:
    each crop's set pixels get their column-major index in the full image (column * height + row), and the runs
    of ones are the stretches of consecutive indices (a run may go on from one column's last row into the next
    column's first), the runs of zeros the gaps between them; for all crops at once.
    """
    H, W = int(height), int(width)
    if not crops:
        return []
    crops = [np.asarray(c, dtype=bool) for c in crops]
    if any(c.ndim != 2 for c in crops):
        bad = next(c for c in crops if c.ndim != 2)
        raise ValueError(f"expected a 2-D mask crop, got shape {bad.shape}")
    shapes = np.array([c.shape for c in crops], np.int64).reshape(-1, 2)
    row0s, col0s = np.asarray(row0s, np.int64).reshape(-1), np.asarray(col0s, np.int64).reshape(-1)
    outside = (row0s < 0) | (col0s < 0) | (row0s + shapes[:, 0] > H) | (col0s + shapes[:, 1] > W)
    if H <= 0 or W <= 0 or outside.any():
        k = int(np.flatnonzero(outside)[0]) if outside.any() else 0
        raise ValueError(f"expected a crop of shape {tuple(shapes[k])} at ({row0s[k]}, {col0s[k]}) inside a "
                         f"{H} x {W} image")
    n = len(crops)
    flat = np.concatenate([c.ravel(order="F") for c in crops])       # column-major, crop after crop
    where = np.flatnonzero(flat)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = np.cumsum(sizes) - sizes
    k = np.searchsorted(starts, where, side="right") - 1              # the crop of each set pixel
    local = where - starts[k]
    h = shapes[k, 0]
    index = (col0s[k] + local // h) * H + row0s[k] + local % h        # column-major index in the full image
    # Runs of ones: consecutive indices of one crop.
    new_run = np.r_[True, (k[1:] != k[:-1]) | (index[1:] != index[:-1] + 1)] if len(index) else np.zeros(0, bool)
    first = np.flatnonzero(new_run)
    last = np.r_[first[1:], len(index)] - 1 if len(first) else first
    run_crop, run_start, run_end = k[first], index[first], index[last] + 1
    # Each crop's counts: zeros before its first run, then (ones, zeros up to the next run) per run, the last zeros
    # up to H * W (none when a run ends the image); a crop without set pixels is H * W zeros.
    first_of_crop = np.r_[True, run_crop[1:] != run_crop[:-1]] if len(first) else np.zeros(0, bool)
    previous_end = np.r_[0, run_end[:-1]]
    previous_end[first_of_crop] = 0
    zeros = run_start - previous_end
    ones = run_end - run_start
    has = np.zeros(n, bool)
    has[run_crop] = True
    last_of_crop = np.r_[run_crop[1:] != run_crop[:-1], True] if len(first) else np.zeros(0, bool)
    tail = H * W - run_end[last_of_crop]
    # Interleave: per run [zeros, ones], then the crop's tail zeros; empty crops: [H * W].
    counts = np.empty(2 * len(first) + n, np.int64)
    mask_of = np.empty(len(counts), np.int64)
    runs_before = np.cumsum(np.bincount(run_crop, minlength=n)) - np.bincount(run_crop, minlength=n)
    crop_begin = 2 * runs_before + np.arange(n)          # each crop's first count
    rank = np.arange(len(first)) - runs_before[run_crop]
    at = crop_begin[run_crop] + 2 * rank
    counts[at], counts[at + 1] = zeros, ones
    mask_of[at] = mask_of[at + 1] = run_crop
    tail_at = crop_begin + 2 * np.bincount(run_crop, minlength=n)
    counts[tail_at] = H * W
    counts[tail_at[has]] = tail
    mask_of[tail_at] = np.arange(n)
    keep = np.ones(len(counts), bool)
    keep[tail_at] = counts[tail_at] > 0          # no trailing empty run of zeros (pycocotools writes none)
    return [{"size": [H, W], "counts": text} for text in _rle_strings(counts[keep], mask_of[keep], n)]


def crop_rle(mask_crop: np.ndarray, row0: int, col0: int, height: int, width: int) -> dict:
    """crop_rles of one crop."""
    return crop_rles([mask_crop], [row0], [col0], height, width)[0]


_json_text = json.encoder.encode_basestring_ascii     # a str as json.dumps writes it


def _json_float(value: float) -> str:
    """A float as json.dumps writes it (repr; NaN and inf as json.dumps spells them)."""
    return repr(value) if value == value and abs(value) != float("inf") else json.dumps(value)


class CocoWriter:
    """Streams predictions as a COCO instance JSON for one image (id 1).

    Masks are compressed RLE in full-image coordinates. The annotations array is written a few tiles at a
    time, so memory is independent of slide size and nucleus count. Annotations carry
    "iscrowd": 0 so the file also serves as ground truth for COCOeval.
    """

    def __init__(self, path: Path, file_name: str, height: int, width: int, categories: list[dict],
                 batch_nuclei: int = 256):
        for cat in categories:
            if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
                raise ValueError(f"expected categories as dicts with 'id' and 'name', got {cat!r}")
        self.path = Path(path)
        self.height, self.width = int(height), int(width)
        self.count = 0
        # tiles are encoded a few at a time (`batch_nuclei` nuclei or more): a tile's ~36 masks a call spent a third
        # of the RLE's time on numpy's per-call costs
        self._batch = TileBatch(batch_nuclei)
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
        shapes = np.array([m.shape for m in masks], np.int64).reshape(-1, 2)
        wrong = np.flatnonzero((shapes != boxes[:, 2:] - boxes[:, :2]).any(1))
        if len(wrong):
            i = int(wrong[0])
            raise ValueError(f"expected mask {i} of its box's shape {tuple(boxes[i, 2:] - boxes[i, :2])}, "
                             f"got {masks[i].shape}")
        self._write(self._batch.add((np.asarray(ids), boxes, masks, np.asarray(scores), np.asarray(class_ids)), n))

    def _write(self, pending: list[tuple]) -> None:
        """Tiles (append's, held by TileBatch) as annotations, in their order, their masks encoded all at once."""
        if not pending:
            return
        ids, boxes, scores, class_ids = (np.concatenate([p[k] for p in pending]) for k in (0, 1, 3, 4))
        masks = [m for p in pending for m in p[2]]
        rles = crop_rles(masks, boxes[:, 0], boxes[:, 1], self.height, self.width)
        areas = [int(np.count_nonzero(m)) for m in masks]
        # Each annotation as json.dumps writes {"id", "image_id", "category_id", "bbox", "area", "score", "iscrowd",
        # "segmentation"}, by one format per annotation rather than one json.dumps of a dict.
        size = f'{{"size": [{self.height}, {self.width}], "counts": '
        lines = []
        for i, (r0, c0, r1, c1) in enumerate(boxes.tolist()):
            score = float(f"{float(scores[i]):.6g}")
            lines.append(f'{"" if self.count == 0 else ","}\n{{"id": {int(ids[i])}, "image_id": 1, '
                         f'"category_id": {int(class_ids[i])}, "bbox": [{c0}, {r0}, {c1 - c0}, {r1 - r0}], '
                         f'"area": {areas[i]}, "score": {_json_float(score)}, "iscrowd": 0, "segmentation": '
                         f'{size}{_json_text(rles[i]["counts"])}}}}}')   # COCO's bbox: [x, y, w, h]
            self.count += 1
        self._fh.write("".join(lines))

    def close(self) -> None:
        """Finish the JSON document. Idempotent."""
        if self._fh is not None:
            fh = self._fh
            try:
                self._write(self._batch.take())
                fh.write("\n]}\n")
            finally:       # closed even when the writing fails (a full disk)
                self._fh = None
                fh.close()

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
            self._batch.take()
