"""Pure tiling geometry: boxes in level-0 pixel coordinates, tiles with a core and a halo.

Coordinates are (row, col); boxes are half-open: rows row0..row1-1, cols col0..col1-1.
The cores of all tiles partition the slide; a tile's `read` box is its core grown by the
halo on every side and clipped to the slide. See DESIGN.md §4 for the seam rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .errors import ParameterError


class Box(NamedTuple):
    row0: int
    col0: int
    row1: int
    col1: int

    @property
    def height(self) -> int:
        return self.row1 - self.row0

    @property
    def width(self) -> int:
        return self.col1 - self.col0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    def slices(self, origin: tuple[int, int] = (0, 0)) -> tuple[slice, slice]:
        """Index slices of this box inside an array whose [0, 0] is at `origin`."""
        r, c = origin
        return slice(self.row0 - r, self.row1 - r), slice(self.col0 - c, self.col1 - c)

    def intersect(self, other: "Box") -> "Box | None":
        b = Box(max(self.row0, other.row0), max(self.col0, other.col0),
                min(self.row1, other.row1), min(self.col1, other.col1))
        return b if b.row0 < b.row1 and b.col0 < b.col1 else None


@dataclass(frozen=True)
class TileSpec:
    """One tile: `read` is what the detector sees (core + halo, clipped), `core` what it owns."""

    index: int
    grid_row: int
    grid_col: int
    read: Box
    core: Box


def plan_tiles(height: int, width: int, tile_size: int, halo: int) -> list[TileSpec]:
    """Tiles in row-major order whose cores partition a height x width slide."""
    if height <= 0 or width <= 0:
        raise ParameterError(f"expected a slide of positive size, got {height} x {width} px")
    if tile_size < 16:
        raise ParameterError(f"expected --tile-size >= 16 px, got {tile_size}")
    if halo < 0 or 2 * halo > tile_size:
        # A kept cell extends at most `halo` beyond its core; with 2*halo <= tile the
        # streaming merge only ever needs the previous tile row to resolve seams.
        raise ParameterError(
            f"expected a halo between 0 and tile_size/2 = {tile_size // 2} px, got {halo} px")
    tiles = []
    n_rows = -(-height // tile_size)
    n_cols = -(-width // tile_size)
    for gr in range(n_rows):
        for gc in range(n_cols):
            core = Box(gr * tile_size, gc * tile_size,
                       min((gr + 1) * tile_size, height), min((gc + 1) * tile_size, width))
            read = Box(max(core.row0 - halo, 0), max(core.col0 - halo, 0),
                       min(core.row1 + halo, height), min(core.col1 + halo, width))
            tiles.append(TileSpec(len(tiles), gr, gc, read, core))
    return tiles


def grid_shape(height: int, width: int, tile_size: int) -> tuple[int, int]:
    """Number of tile rows and columns."""
    return -(-height // tile_size), -(-width // tile_size)
