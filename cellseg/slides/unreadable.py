"""Damaged pixel data in a slide (`cellseg count --skip-unreadable`): the storage chunks a read meets, and the
registry of the level-0 chunks found unreadable. slides.Slide reads around them; docs/report.md gives the rule."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from ..geometry import Box

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnreadableRegion:
    """A storage chunk of level 0 whose pixel data cannot be decoded (`box` in level-0 px), and why."""

    box: Box
    error: str

    def to_dict(self) -> dict:
        return {"box": [int(v) for v in self.box], "level": 0, "error": self.error}


def chunk_parts(level_shape: tuple[int, int], chunk: tuple[int, int], box: Box) -> Iterator[tuple[Box, Box]]:
    """(the storage chunk clipped to the level, the part of it inside `box`) for every chunk `box` meets, row-major.
    level_shape: (height, width) of the level; chunk: (rows, cols) of one storage chunk."""
    (lh, lw), (ch, cw) = level_shape, chunk
    for r0 in range(box.row0 // ch * ch, box.row1, ch):
        for c0 in range(box.col0 // cw * cw, box.col1, cw):
            yield (Box(r0, c0, min(r0 + ch, lh), min(c0 + cw, lw)),
                   Box(max(r0, box.row0), max(c0, box.col0), min(r0 + ch, box.row1), min(c0 + cw, box.col1)))


class UnreadableRegions:
    """The unreadable chunks of one slide, each once (neighbouring tiles' reads meet the same chunk). Thread-safe:
    reader threads note them concurrently."""

    def __init__(self, slide_name: str):
        self.slide_name = slide_name
        self._found: dict[Box, UnreadableRegion] = {}
        self._lock = threading.Lock()

    def note(self, chunk: Box, error: str) -> None:
        with self._lock:
            if chunk in self._found:
                return
            self._found[chunk] = UnreadableRegion(chunk, error)
        log.warning("%s: rows %d:%d cols %d:%d are unreadable (%s): left out (--skip-unreadable)",
                    self.slide_name, chunk.row0, chunk.row1, chunk.col0, chunk.col1, error)

    def add(self, regions: list[UnreadableRegion]) -> None:
        with self._lock:
            for region in regions:
                self._found.setdefault(region.box, region)

    def regions(self) -> list[UnreadableRegion]:
        with self._lock:
            return sorted(self._found.values(), key=lambda r: tuple(r.box))
