"""Pyramid levels of an open slide as lazy array-likes that napari can show without loading the slide.

napari shows a multiscale image from a list of arrays, largest first; for each screen update it indexes
one level with slices covering the visible region (`level[r0:r1, c0:c1]`). `LazyLevel` answers that with
`Slide.read_region`, so only the storage tiles under the view are decoded (tifffile's zarr store for TIFF
pyramids, a memory map for uncompressed strips). It provides what napari's `LayerDataProtocol` asks for:
`shape`, `dtype`, `ndim`, `size`, `__getitem__` (and `__array__` for small levels).

Contract: index (row, col[, channel]) in the level's own pixel grid, like a numpy array of shape
(h, w) or (h, w, C); integers and slices (any step) per axis, Ellipsis allowed. Returns numpy arrays in
the slide's native dtype.
"""

from __future__ import annotations

import logging

import numpy as np

from cellseg.geometry import Box
from cellseg.slides import Slide

log = logging.getLogger(__name__)

OVERVIEW_SIDE = 2048     # a pyramid whose smallest level is larger than this gets an in-memory overview level
OVERVIEW_TARGET = 1024   # longer side of that overview
SMALL_PIXELS = 1 << 24   # levels up to 16 Mpx may be materialised whole (np.asarray)


class LazyLevel:
    """One pyramid level of `slide`, all channels (h, w, C), or one channel / a 1-channel slide as (h, w)."""

    def __init__(self, slide: Slide, level: int, channel: int | None = None):
        info = slide.info
        if not 0 <= level < len(info.levels):
            raise IndexError(f"expected a pyramid level 0..{len(info.levels) - 1}, got {level}")
        if channel is not None and not 0 <= channel < info.n_channels:
            raise IndexError(f"expected a channel 0..{info.n_channels - 1}, got {channel}")
        self._slide = slide
        self.level = level
        self.channel = channel
        h, w = info.levels[level]
        self._squeeze = channel is not None or info.n_channels == 1
        self.shape: tuple[int, ...] = (h, w) if self._squeeze else (h, w, info.n_channels)
        self.dtype = np.dtype(info.dtype)
        self.pixels_read = 0     # level pixels decoded so far (tests check that views stay small)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def slide(self) -> Slide:
        return self._slide

    def __repr__(self) -> str:
        return (f"<LazyLevel {self._slide.info.path.name} level {self.level} "
                f"{'x'.join(map(str, self.shape))} {self.dtype}>")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        try:
            key = _normalise_key(key, self.ndim)
        except TypeError:    # fancy or boolean indexing: only for small levels
            if self.shape[0] * self.shape[1] > SMALL_PIXELS:
                raise IndexError(f"expected integer or slice indices on {self!r}, got {type(key).__name__}") from None
            return self._whole()[key]
        spatial = [_axis_plan(k, n) for k, n in zip(key[:2], self.shape[:2])]
        if any(p is None for p in spatial):
            out_shape = [len(range(*k.indices(n))) for k, n in zip(key, self.shape) if isinstance(k, slice)]
            return np.zeros(out_shape, self.dtype)
        (r0, r1, rows), (c0, c1, cols) = spatial
        region = self._slide.read_region(Box(r0, c0, r1, c1), self.level)   # (h, w, C)
        self.pixels_read += (r1 - r0) * (c1 - c0)
        region = region[:, cols][rows]     # columns first: an integer row index drops axis 0
        if self.channel is not None:
            return region[..., self.channel]
        if self._squeeze:
            return region[..., 0]
        return region[(Ellipsis, key[2])]

    def _whole(self) -> np.ndarray:
        if self.size > SMALL_PIXELS * (1 if self._squeeze else self.shape[2]):
            log.warning("reading all %s px of %r at once", f"{self.shape[0] * self.shape[1]:,}", self)
        return self[:, :]

    def __array__(self, dtype=None, copy=None):
        data = self._whole()
        return data if dtype is None else data.astype(dtype, copy=False)


def _normalise_key(key, ndim: int):
    """A tuple of exactly `ndim` ints/slices; TypeError for fancy indices (arrays, masks, None)."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        i = next(j for j, k in enumerate(key) if k is Ellipsis)
        key = key[:i] + (slice(None),) * (ndim - len(key) + 1) + key[i + 1:]
    if len(key) > ndim:
        raise IndexError(f"too many indices for a {ndim}-d level: {key!r}")
    key = key + (slice(None),) * (ndim - len(key))
    for k in key:
        if not isinstance(k, (slice, int, np.integer)) or isinstance(k, bool):
            raise TypeError(f"expected integer or slice indices, got {type(k).__name__}")
    return key


def _axis_plan(k, n: int):
    """(lo, hi, local index) to read [lo, hi) and then pick `local` from it; None when the slice is empty."""
    if isinstance(k, (int, np.integer)):
        i = int(k) + n if k < 0 else int(k)
        if not 0 <= i < n:
            raise IndexError(f"index {int(k)} is out of bounds for an axis of size {n}")
        return i, i + 1, 0
    idx = range(*k.indices(n))
    if len(idx) == 0:
        return None
    lo, hi = min(idx), max(idx) + 1
    local = slice(None) if idx.step == 1 else np.asarray(idx) - lo
    return lo, hi, local


def slide_pyramid(slide: Slide, channel: int | None = None) -> list:
    """Levels of `slide` for napari, largest first: a LazyLevel per pyramid level, plus an in-memory overview
    (block mean, read piece by piece) when even the smallest level is larger than OVERVIEW_SIDE, so that a
    zoomed-out view never decodes a whole big level."""
    levels: list = [LazyLevel(slide, k, channel) for k in range(len(slide.info.levels))]
    if max(slide.info.levels[-1]) > OVERVIEW_SIDE:
        thumb, _ = slide.read_thumbnail(OVERVIEW_TARGET)
        levels.append(np.ascontiguousarray(thumb[..., channel] if channel is not None
                                           else thumb[..., 0] if slide.info.n_channels == 1 else thumb))
    return levels


def display_range(level, channel: int | None = None) -> tuple[float, float]:
    """Contrast limits from a (small) level: its 0.5th..99.8th percentile, never an empty range."""
    data = np.asarray(level, dtype=np.float64)
    if channel is not None:
        data = data[..., channel]
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, [0.5, 99.8]))
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi
