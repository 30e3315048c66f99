"""Tiles held by a streaming result writer until enough nuclei wait to be written together (cells.geojson,
predictions.coco.json): their polygons and RLE are numpy passes over all of a batch's masks at once, where a tile's
~36 nuclei a call spent most of the time on numpy's per-call costs (docs/performance.md)."""

from __future__ import annotations


class TileBatch:
    """Tiles (any tuples) held until `nuclei` or more of their nuclei wait, then handed out together, in order."""

    def __init__(self, nuclei: int = 256):
        self.nuclei = int(nuclei)
        self._tiles: list[tuple] = []
        self._waiting = 0

    def add(self, tile: tuple, n: int) -> list[tuple]:
        """Hold `tile` (n nuclei). Returns the tiles held, let go, once `nuclei` or more wait; else []."""
        self._tiles.append(tile)
        self._waiting += n
        return self.take() if self._waiting >= self.nuclei else []

    def take(self) -> list[tuple]:
        """Every tile held, let go (the last batch at a writer's close; dropped when a run fails)."""
        tiles, self._tiles, self._waiting = self._tiles, [], 0
        return tiles
