"""A slide that keeps the pixels of the tiles read for detection until their cells are measured.

A tile's cells are measured a tile row after it was read (when its seams are settled); reading and decoding the
slide a second time for that costs ~8 ms a tile. The pipeline reads and measures through one `CachedSlide`, so the
kept pixels travel with the slide instead of beside it.
"""

from __future__ import annotations

import threading

import numpy as np

from ..geometry import Box, TileSpec
from .base import Slide, SlideInfo
from .unreadable import UnreadableRegion

KEPT_BYTES = 64 << 20     # enough for the tile rows between a tile's detection and its measurement


class CachedSlide:
    """`slide`, with the pixels of the tiles read for detection (`read_tile`) kept, up to `max_bytes`, until
    `read_region` hands them out once or `release` forgets them (0: nothing is kept: nothing will be measured).

    When full, new tiles are not kept (the oldest are the next to be measured), and `read_region` reads the slide
    instead. Thread-safe: the reader threads keep, the pipeline takes.
    """

    def __init__(self, slide: Slide, max_bytes: int = KEPT_BYTES):
        self.slide, self.max_bytes = slide, max_bytes
        self._kept: dict[Box, tuple[int, np.ndarray]] = {}   # read box -> (tile grid row, pixels)
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def info(self) -> SlideInfo:
        return self.slide.info

    @property
    def skip_unreadable(self) -> bool:
        return self.slide.skip_unreadable

    @property
    def unreadable(self) -> list[UnreadableRegion]:
        return self.slide.unreadable

    def read_tile(self, tile: TileSpec) -> np.ndarray:
        """The native pixels of `tile`'s read box, read from the slide and kept for its measurement."""
        pixels = self.slide.read_region(tile.read)
        with self._lock:
            if tile.read not in self._kept and self._bytes + pixels.nbytes <= self.max_bytes:
                self._kept[tile.read] = (tile.grid_row, pixels)
                self._bytes += pixels.nbytes
        return pixels

    def read_region(self, box: Box) -> np.ndarray:
        """The native pixels of `box`: those kept of a tile read for detection (handed out once), else read."""
        with self._lock:
            kept = self._kept.pop(box, None)
            if kept is not None:
                self._bytes -= kept[1].nbytes
                return kept[1]
        return self.slide.read_region(box)

    def release(self, through_row: int | None) -> None:
        """Forget the pixels of tile grid rows <= through_row (None: all): their cells are all measured, and a tile
        without cells is never read again."""
        with self._lock:
            for box in [b for b, (row, _) in self._kept.items() if through_row is None or row <= through_row]:
                self._bytes -= self._kept.pop(box)[1].nbytes
