"""Pure tiling geometry: boxes in level-0 pixel coordinates, tiles with a core and a halo, the seam band.

Coordinates are (row, col); boxes are half-open: rows row0..row1-1, cols col0..col1-1.
The cores of all tiles partition the slide; a tile's `read` box is its core grown by the
halo on every side and clipped to the slide. A tile keeps the cells whose centroid lies in its core grown by
the seam band (`owned_box`); cells/merge.py removes the doubles this makes. docs/architecture.md states the seam rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..errors import ParameterError


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

    def contains(self, other: Box) -> bool:
        """`other` lies wholly inside this box."""
        return (self.row0 <= other.row0 and self.col0 <= other.col0
                and other.row1 <= self.row1 and other.col1 <= self.col1)

    def grown(self, px: int) -> Box:
        """This box with `px` more on every side (not clipped)."""
        return Box(self.row0 - px, self.col0 - px, self.row1 + px, self.col1 + px)


@dataclass(frozen=True)
class TileSpec:
    """One tile: `read` is what the detector sees (core + halo, clipped), `core` what it owns."""

    index: int
    grid_row: int
    grid_col: int
    read: Box
    core: Box

    @property
    def halo_px(self) -> int:
        """The widest margin of the read box around the core: the planned halo, unless the slide is smaller."""
        read, core = self.read, self.core
        return max(core.row0 - read.row0, read.row1 - core.row1, core.col0 - read.col0, read.col1 - core.col1)


def check_halo(tile_size: int, halo_px: int) -> None:
    """The one rule tiles and halos obey: 0 <= halo <= tile_size / 2.

    A kept cell extends at most a halo beyond its core; with 2 * halo <= tile the streaming merge only ever
    needs the previous tile row to resolve seams.
    """
    if halo_px < 0 or 2 * halo_px > tile_size:
        raise ParameterError(f"expected a halo of at least 0 and at most tile size / 2 = {tile_size // 2} px, "
                             f"got {halo_px} px")


def seam_band_px(halo_px: int) -> int:
    """How far beyond its core a tile still keeps cells (the doubles there are deduped)."""
    return halo_px // 4


def owned_box(tile: TileSpec, band_px: int, margin_px: int = 0) -> Box:
    """The part of the slide whose cells `tile` keeps: its core grown by the seam band (+ `margin_px`), not clipped.

    A cell belongs to the tile when its centroid lies inside (merge.owned_instances); a detector may skip the
    masks of boxes that cannot reach it (with a margin: a centroid is a mean of pixel indices).
    """
    return tile.core.grown(band_px + margin_px)


def plan_tiles(height: int, width: int, tile_size: int, halo: int) -> list[TileSpec]:
    """Tiles in row-major order whose cores partition a height x width slide."""
    if height <= 0 or width <= 0:
        raise ParameterError(f"expected a slide of positive size, got {height} x {width} px")
    if tile_size < 16:
        raise ParameterError(f"expected --tile-size >= 16 px, got {tile_size}")
    check_halo(tile_size, halo)
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


BAND_TILES = 64   # a band is the fewest whole tile rows holding at least this many tiles


@dataclass(frozen=True)
class Band:
    """Grid rows row0 .. row1 - 1 of a slide's tiles: the unit of distributed work and of resuming. Band borders
    are tile borders, so the seam rule resolves them exactly as it resolves the seams between tiles."""

    index: int
    row0: int
    row1: int

    def tiles(self, tiles: list[TileSpec], tiles_per_row: int) -> list[TileSpec]:
        """This band's tiles out of a row-major grid."""
        return tiles[self.row0 * tiles_per_row:self.row1 * tiles_per_row]


def plan_bands(n_rows: int, tiles_per_row: int, band_rows: int | None = None) -> list[Band]:
    """The grid's rows cut into bands of `band_rows` rows (the last may be shorter); default: the fewest rows
    holding BAND_TILES tiles (one band for a small slide)."""
    if band_rows is None:
        band_rows = max(1, -(-BAND_TILES // max(tiles_per_row, 1)))
    if band_rows < 1:
        raise ParameterError(f"expected at least 1 tile row per band, got {band_rows}")
    return [Band(k, r, min(r + band_rows, n_rows)) for k, r in enumerate(range(0, n_rows, band_rows))]
