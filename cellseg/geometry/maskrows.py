"""Box-cropped masks as rows of set pixels: per-mask arithmetic for thousands of masks at once.

Nuclei travel as masks cropped to their boxes (docs/architecture.md). At ~1000 nuclei per tile a numpy call per
mask costs more than the arithmetic itself, so cells/merge.py and cells/nucleus_measure.py concatenate the masks once and
derive everything per mask from per-row quantities (about 20 rows per nucleus), spreading them over the
set pixels only where a per-pixel answer is needed.
"""

from __future__ import annotations

import numpy as np


class MaskRows:
    """N masks as the rows of them that hold set pixels, in the boxes' frame (slide or tile px).

    boxes: (N, 4) int64 half-open (row0, col0, row1, col1); flat: the N masks (each of its box's shape)
    raveled and concatenated. Row k of the result belongs to mask `mask[k]` (0 .. N - 1), lies on row `y[k]` and
    holds `count[k]` set pixels: nz[first[k]:first[k] + count[k]], where nz are the positions of all
    set pixels in `flat`, and a set pixel at position p lies in column p + x0[k].
    """

    def __init__(self, boxes: np.ndarray, flat: np.ndarray):
        boxes = np.asarray(boxes, np.int64).reshape(-1, 4)
        heights, widths = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        sizes = heights * widths
        if flat.size != sizes.sum():
            raise ValueError(f"expected masks of their boxes' sizes ({sizes.sum()} px in all), got {flat.size} px")
        self.boxes, self.n = boxes, len(boxes)
        masks = np.flatnonzero(sizes > 0)          # zero-width boxes have rows of no pixels: leave them out
        h, w = heights[masks], widths[masks]
        mask = np.repeat(masks, h)
        in_mask = np.arange(len(mask)) - np.repeat(np.cumsum(h) - h, h)
        start = np.repeat((np.cumsum(sizes) - sizes)[masks], h) + in_mask * np.repeat(w, h)
        count = (np.add.reduceat(flat.view(np.uint8) if flat.dtype == bool else flat != 0, start, dtype=np.int64)
                 if len(start) else np.zeros(0, np.int64))
        used = count > 0
        self.mask, self.count = mask[used], count[used]
        self.y = boxes[self.mask, 0] + in_mask[used]
        self.x0 = boxes[self.mask, 1] - start[used]
        self.nz = np.flatnonzero(flat)
        self.first = np.cumsum(self.count) - self.count       # each row's first entry in nz

    @classmethod
    def of(cls, boxes: np.ndarray, masks: list[np.ndarray]) -> MaskRows:
        """From a list of box-cropped masks (one concatenation; the masks are not modified)."""
        flat = np.concatenate([m.reshape(-1) for m in masks]) if len(masks) else np.zeros(0, bool)
        return cls(boxes, flat)

    def areas(self) -> np.ndarray:
        """(N,) int64 set pixels per mask."""
        return np.bincount(self.mask, weights=self.count, minlength=self.n).astype(np.int64)

    def pixel_masks(self) -> np.ndarray:
        """The mask of every set pixel (mask by mask, row-major within a mask)."""
        return np.repeat(self.mask, self.count)

    def canvas_index(self, row0: int, col0: int, width: int) -> np.ndarray:
        """Each set pixel's flat index in a canvas of `width` columns whose [0, 0] is at (row0, col0)."""
        return self.nz + np.repeat((self.y - row0) * width + self.x0 - col0, self.count)

    def ends(self) -> tuple[np.ndarray, np.ndarray]:
        """Per row: the columns of its first and last set pixel."""
        return self.nz[self.first] + self.x0, self.nz[self.first + self.count - 1] + self.x0

    def sums(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per mask: pixel count and the sums of row and column offsets from the box's corner (exact)."""
        row_sum = (self.y - self.boxes[self.mask, 0]) * self.count
        col_sum = (np.add.reduceat(self.nz, self.first) if len(self.nz) else self.nz[:0]) \
            + self.count * (self.x0 - self.boxes[self.mask, 1])
        return (np.bincount(self.mask, weights=self.count, minlength=self.n),
                np.bincount(self.mask, weights=row_sum, minlength=self.n),
                np.bincount(self.mask, weights=col_sum, minlength=self.n))

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(N, 4) bounding box of each mask's set pixels (zeros for an empty mask), and which are non-empty."""
        out = np.zeros((self.n, 4), np.int64)
        has = np.zeros(self.n, bool)
        if len(self.mask):
            starts = np.flatnonzero(np.concatenate([[True], self.mask[1:] != self.mask[:-1]]))
            masks = self.mask[starts]
            left, right = self.ends()
            out[masks] = np.stack([np.minimum.reduceat(self.y, starts), np.minimum.reduceat(left, starts),
                                   np.maximum.reduceat(self.y, starts) + 1,
                                   np.maximum.reduceat(right, starts) + 1], axis=1)
            has[masks] = True
        return out, has
