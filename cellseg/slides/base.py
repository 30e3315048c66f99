"""The Slide interface every backend builds, and what the backends share.

`SlideInfo` says what an opened file is; a backend hands `Slide` one `Level` per pyramid level (an `ArrayLevel`
when the level is an array); `Slide` does the reads on top: regions, thumbnails, and reading around damaged
storage chunks (skip_unreadable). The backends (slide_tiff, slide_openslide, slide_czi, slide_zarr, slide_pil)
import this module and `slide.open_slide` imports the backends, so imports go one way.

Contract: coordinates are (row, col) in the pixel grid of the requested level, boxes half-open.
`read_region` and `read_thumbnail` return (h, w, C) arrays in the file's dtype, channel-last even
for one channel. Every failure a user can cause is a SlideError (bad file; the message names the file
and the backend) or a ParameterError (impossible request), one line saying what was expected and found.
"""

from __future__ import annotations

import logging
import math
import weakref
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol as TypingProtocol

import numpy as np
from PIL import Image

from ..errors import ParameterError, SlideError, TimeSeriesError, UnreadableRegionError, ZStackError
from ..geometry import Box
from .unreadable import UnreadableRegion, UnreadableRegions, chunk_parts

log = logging.getLogger(__name__)

SCREEN_MPP_UM = 50.0  # coarser than this is a screen dpi default (72/96/300 dpi), not a microscope
PIECE_PX = 1 << 20  # thumbnail reads go in pieces of about this many pixels (whole storage chunks)
# a count is of one 2-D image: a Z-stack is counted as one of its planes or as a projection of them (`z`), which
# is the user's to choose (a projection merges nuclei that overlap in depth, a plane misses those out of it)
Z_PROJECTIONS = ("max", "mean")
STACK_HINT = (" (a Z-stack: pass --z max or --z mean to count a projection of its planes, or --z N to count "
              "plane N, counted from 1 as Fiji does)")
TIME_HINT = (" (a time series: pass --t N to count time point N, counted from 1 as Fiji does, or --t all to count "
             "each)")
UM_PER_UNIT = {"µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0,
               "nm": 1e-3, "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4,
               "m": 1e6, "meter": 1e6, "å": 1e-4, "angstrom": 1e-4, "pm": 1e-6, "picometer": 1e-6,
               "in": 25400.0, "inch": 25400.0}


def _count_from(value, first: int, expected: str) -> int | None:
    """None, or a whole number >= `first` (text such as "3" too); else the one-line ParameterError `expected`."""
    if value is None:
        return None
    if isinstance(value, str):
        value = int(value.strip()) if value.strip().isdigit() else value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= first:
        return int(value)
    raise ParameterError(f"expected {expected}, got {value!r}")


def z_choice(value) -> int | str | None:
    """`z` as open_slide takes it, checked: None (a 2-D image), "max" or "mean" (a projection of a Z-stack's
    planes), or the plane's number counted from 1 (as Fiji counts; napari's slider counts from 0). Text as the
    command line gives it ("max", "3") is read too."""
    if isinstance(value, str) and value.strip().lower() in Z_PROJECTIONS:
        return value.strip().lower()
    return _count_from(value, 1, "--z max, mean or a plane number from 1")


def series_choice(value) -> int | None:
    """`series` as open_slide takes it, checked: None (the file's first image), or the number of one of the images
    of a multi-image file (the positions of an OME-TIFF, a bioformats2raw folder's series), counted from 0 as the
    OME-XML (Image:0), bioformats2raw's folders and `bfconvert -series` count them. Text ("3") is read too."""
    return _count_from(value, 0, "--series N, an image of the file counted from 0")


def check_series(series: int | None, images: int) -> None:
    """An image number beyond the file's images is the user's mistake: one line saying how many there are."""
    if series is not None and not 0 <= series < images:
        what = f"0-{images - 1} (the file's {images} images)" if images > 1 else "0 (the file holds one image)"
        raise ParameterError(f"expected --series {what}, got --series {series}")


def t_choice(value) -> int | None:
    """`t` as open_slide takes it, checked: None (an image without time points), or the time point counted from 1
    (as Fiji counts frames; napari's slider counts from 0). Text ("3") is read too."""
    return _count_from(value, 1, "--t N, a time point counted from 1")


def check_time(t: int | None, points: int) -> None:
    """A time point beyond the series' is the user's mistake: one line saying how many there are."""
    if t is not None and not 1 <= t <= points:
        what = f"1-{points} (the time series' points)" if points > 1 else "1 on an image without time points"
        raise ParameterError(f"expected --t {what}, got --t {t}")


def z_text(z: int | str | None, planes: int) -> str:
    """What of an image is read, in words: 'plane 5 of a 12-plane Z-stack', 'max projection of a 12-plane
    Z-stack', 'a 2-D image'."""
    if z is None or planes <= 1:
        return "a 2-D image"
    return (f"plane {z} of a {planes}-plane Z-stack" if isinstance(z, int)
            else f"{z} projection of a {planes}-plane Z-stack")


@dataclass(frozen=True)
class SlideInfo:
    path: Path  # what the user named: a file, or a folder (OME-Zarr, a DICOM series)
    format: str  # "ome-tiff", "svs", "ndpi", "tiff", "dicom", "mrxs", "czi", "ome-zarr", "png", ...
    backend: str  # the library that reads it: "tifffile", "openslide", "pylibCZIrw", "zarr", "pillow"
    height: int  # level 0, pixels
    width: int
    n_channels: int  # 1 grayscale, 3 RGB, C multichannel fluorescence
    dtype: np.dtype
    channel_names: tuple[str, ...] | None
    mpp: float | None  # µm per pixel at level 0 (mean of x and y)
    mpp_source: str  # "ome", "imagej", "tiff-resolution", "svs", "micromanager", "openslide", "czi", "ome-zarr",
    #                  "image-dpi", "override", "none: <why>"
    levels: tuple[tuple[int, int], ...]  # (height, width) of each pyramid level, level 0 first
    details: tuple[str, ...] = ()  # what else the backend says, for `cellseg info` (scenes, vendor, ...)
    z_planes: int = 1  # planes of a Z-stack (1: a 2-D image)
    z: int | str | None = None  # what of a Z-stack is read (z_choice): a plane from 1, "max" or "mean"; None if 2-D
    # what of the file is not read that a user must know of (other positions of a multi-image file), each a sentence
    warnings: tuple[str, ...] = ()
    series: int | None = None  # the image read of a file holding several (series_choice, from 0); None: the first
    #                            (a file of a multi-file OME-TIFF or Micro-Manager acquisition: its own image or
    #                            position, given here where it is not the first)
    # the --series numbers of the file's images like the one read (the positions of one acquisition, it among them),
    # when there are several: what `--series all` counts; () for a file of one such image
    positions: tuple[int, ...] = ()
    t_points: int = 1  # time points of a time series (1: none)
    t: int | None = None  # the time point read (t_choice, from 1); None without time points
    # the files of a multi-file OME-TIFF or Micro-Manager acquisition the one read belongs to (absolute paths,
    # sorted; () for any other slide): a batch naming several of them counts each image once (cli.images_to_count)
    file_set: tuple[str, ...] = ()


class Level(TypingProtocol):
    """What a backend gives per pyramid level: pixels of a box as (h, w, C), and its storage chunk."""

    chunk: tuple[int, int]  # (rows, cols) of one storage chunk: thumbnails read whole chunks

    def read(self, r0: int, c0: int, r1: int, c1: int) -> np.ndarray: ...


@dataclass
class ArrayLevel:
    """One pyramid level held as an array (zarr, memory map or numpy) indexed in its own axis order."""

    array: object  # zarr.Array, np.memmap or np.ndarray
    axes: str  # e.g. "CYX", "YXS", "TCZYX"; axes other than Y, X, channel and a read Z have size 1
    channel_axis: str | None  # "C" or "S", or None for one channel
    chunk: tuple[int, int]  # (rows, cols) of one storage chunk: thumbnails read whole chunks
    z: int | str | None = None  # a Z-stack's plane (from 1) or projection ("max", "mean"): z_choice
    t: int | None = None  # a time series' point (from 1): t_choice
    position: int = 0  # a Micro-Manager stack's stage position (axis R, from 0): series_choice

    def read(self, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        project = self.z in Z_PROJECTIONS and "Z" in self.axes
        plane = self.z - 1 if isinstance(self.z, int) else 0
        index = tuple(slice(r0, r1) if ax == "Y" else slice(c0, c1) if ax == "X"
                      else slice(None) if ax == self.channel_axis or (ax == "Z" and project)
                      else plane if ax == "Z" else (self.t or 1) - 1 if ax == "T"
                      else self.position if ax == "R" else 0 for ax in self.axes)
        data = np.asarray(self.array[index])
        kept = [ax for ax in self.axes if ax in ("Y", "X", self.channel_axis) or (ax == "Z" and project)]
        if project:
            data = projected(data, kept.index("Z"), self.z)
            kept.remove("Z")
        data = data.transpose([kept.index(ax) for ax in ("Y", "X", self.channel_axis) if ax in kept])
        if self.channel_axis is None:
            data = data[..., None]
        # zarr returns a fresh array; a numpy or memory-mapped level must not hand out views of
        # itself (a caller writing into the region would change the slide, or hit a read-only map).
        dtype = data.dtype.newbyteorder("=")
        if isinstance(self.array, np.ndarray):
            return np.array(data, dtype=dtype, order="C")  # always a copy
        return np.ascontiguousarray(data, dtype=dtype)


class Slide:
    """An open image. Use as a context manager, or call close().

    skip_unreadable (open_slide's): a read that meets damaged pixel data does not fail; it is read again chunk by
    chunk, the damaged level-0 chunks come back as zeros and are listed in `unreadable` (a thumbnail piece of a
    damaged lower level is made from level 0 instead). Without it such a read raises UnreadableRegionError.
    """

    def __init__(self, info: SlideInfo, levels: list[Level], stack: ExitStack | None = None,
                 read_errors: tuple[type[BaseException], ...] = ()):
        self.info = info
        self._levels = levels
        self._stack = stack
        # A slide nobody closed (napari's lazy layers hold one as long as they live) closes its files when it is
        # garbage collected, instead of leaving them to the interpreter (a ResourceWarning, and open handles).
        self._release = weakref.finalize(self, stack.close) if stack is not None else None
        self._read_errors = read_errors  # what the backend raises for damaged pixel data
        self._closed = False
        self.skip_unreadable = False
        self._unreadable = UnreadableRegions(info.path.name)

    @property
    def unreadable(self) -> list[UnreadableRegion]:
        """The damaged level-0 chunks met so far (skip_unreadable), row-major."""
        return self._unreadable.regions()

    def add_unreadable(self, regions: list[UnreadableRegion]) -> None:
        """Regions met by an earlier run of the same count (a journal: --resume)."""
        self._unreadable.add(regions)

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        i = self.info
        return f"<Slide {i.path.name} {i.format} ({i.backend}) {i.height}x{i.width}x{i.n_channels} {i.dtype}>"

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._levels = []
            if self._release is not None:
                self._release()     # stack.close(), once

    def read_region(self, box: Box, level: int = 0) -> np.ndarray:
        """Pixels of `box` (in `level`'s pixel grid) as (h, w, C) in the native dtype."""
        if self._closed:
            raise SlideError(f"expected an open slide, {self.info.path} was closed")
        n = len(self.info.levels)
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 0 <= level < n:
            raise ParameterError(f"expected a pyramid level 0..{n - 1}, got {level!r}")
        r0, c0, r1, c1 = (int(v) for v in box)
        h, w = self.info.levels[level]
        if not (0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w):
            raise ParameterError(f"expected a non-empty box inside the {h} x {w} px image at level "
                                 f"{level}, got {Box(r0, c0, r1, c1)}")
        try:
            return self._levels[level].read(r0, c0, r1, c1)
        except self._read_errors as e:
            if not self.skip_unreadable:
                # Name the damaged storage chunk, not the whole request (a thumbnail reads the whole image).
                bad, error = self._first_damaged_chunk(level, r0, c0, r1, c1) or (Box(r0, c0, r1, c1), e)
                raise UnreadableRegionError(f"expected readable pixel data, rows {bad.row0}:{bad.row1} cols "
                                            f"{bad.col0}:{bad.col1} (level {level}) of {self.info.path} are corrupt "
                                            f"({self.info.backend}: {error_text(error)}); --skip-unreadable counts "
                                            f"the rest") from e
        return self._read_in_chunks(level, r0, c0, r1, c1)

    def _chunks(self, level: int, r0: int, c0: int, r1: int, c1: int):
        return chunk_parts(self.info.levels[level], self._levels[level].chunk, Box(r0, c0, r1, c1))

    def _first_damaged_chunk(self, level: int, r0: int, c0: int, r1: int, c1: int):
        for chunk, part in self._chunks(level, r0, c0, r1, c1):
            try:
                self._levels[level].read(*part)
            except self._read_errors as e:
                return chunk, e
        return None

    def _read_in_chunks(self, level: int, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        """The box read storage chunk by storage chunk (skip_unreadable): damaged chunks of level 0 are zeros and
        listed; a damaged chunk of a lower level is made from level 0 (block mean), which may be intact."""
        out = np.zeros((r1 - r0, c1 - c0, self.info.n_channels), self.info.dtype)
        for chunk, part in self._chunks(level, r0, c0, r1, c1):
            try:
                piece = self._levels[level].read(*part)
            except self._read_errors as e:
                if level == 0:
                    self._unreadable.note(chunk, error_text(e))
                    continue
                piece = self._from_level0(level, part)
            out[part.row0 - r0:part.row1 - r0, part.col0 - c0:part.col1 - c0] = piece
        return out

    def _from_level0(self, level: int, box: Box) -> np.ndarray:
        """`box` of a lower level as the block mean of level 0 (read tolerantly): for a damaged thumbnail level."""
        h0, w0 = self.info.levels[0]
        lh, lw = self.info.levels[level]
        fr, fc = h0 / lh, w0 / lw
        full = self.read_region(Box(int(box.row0 * fr), int(box.col0 * fc), min(h0, math.ceil(box.row1 * fr)),
                                    min(w0, math.ceil(box.col1 * fc))))
        small = [np.asarray(Image.fromarray(full[..., c].astype(np.float32)).resize(
                 (box.width, box.height), Image.Resampling.BOX)) for c in range(full.shape[2])]
        return cast_like(np.stack(small, axis=-1), self.info.dtype)

    def read_thumbnail(self, max_side: int) -> tuple[np.ndarray, float]:
        """(h, w, C) overview with longer side <= max_side, and level-0 px per thumbnail px."""
        if isinstance(max_side, bool) or not isinstance(max_side, (int, np.integer)) or max_side < 1:
            raise ParameterError(f"expected a thumbnail size >= 1 px, got {max_side!r}")
        h0, w0 = self.info.levels[0]
        if max(h0, w0) <= max_side:
            return self.read_region(Box(0, 0, h0, w0)), 1.0
        scale = max_side / max(h0, w0)
        th, tw = max(1, round(h0 * scale)), max(1, round(w0 * scale))
        # The smallest level still at least the thumbnail's size, then an integer block mean that
        # stays >= that size, then a < 2x box resize to the exact size.
        level = max(i for i, (h, w) in enumerate(self.info.levels) if h >= th and w >= tw)
        lh, lw = self.info.levels[level]
        f = max(1, min(lh // th, lw // tw))
        if f == 1 and (lh, lw) == (th, tw):     # a level of the thumbnail's size (a 2048² view of an 8192² slide)
            return self.read_region(Box(0, 0, lh, lw), level), max(h0, w0) / max_side
        small = self._block_mean(level, f)
        if small.shape[:2] != (th, tw):
            small = np.stack([np.asarray(Image.fromarray(small[..., c].astype(np.float32))
                                         .resize((tw, th), Image.Resampling.BOX))
                              for c in range(small.shape[2])], axis=-1)
        return cast_like(small, self.info.dtype), max(h0, w0) / max_side

    def _block_mean(self, level: int, f: int) -> np.ndarray:
        """Mean of each f x f block of a level, read piece by piece: memory ~ one piece + the result."""
        lh, lw = self.info.levels[level]
        ch, cw = self._levels[level].chunk
        pc = cw * max(1, 1024 // cw)  # whole chunks only, so no chunk is decoded twice
        pr = ch * max(1, PIECE_PX // (pc * ch))
        # float32: a mean for a picture is exact enough, and the accumulator is the largest array of a view
        acc = np.zeros((-(-lh // f), -(-lw // f), self.info.n_channels), np.float32)
        for r0 in range(0, lh, pr):
            rows = _block_starts(r0, min(r0 + pr, lh), f)
            for c0 in range(0, lw, pc):
                cols = _block_starts(c0, min(c0 + pc, lw), f)
                piece = self.read_region(Box(r0, c0, min(r0 + pr, lh), min(c0 + pc, lw)), level)
                s = np.add.reduceat(np.add.reduceat(piece, rows, axis=0, dtype=np.float32), cols, axis=1)
                acc[r0 // f:r0 // f + len(rows), c0 // f:c0 // f + len(cols)] += s
        n_r = np.minimum(f, lh - np.arange(acc.shape[0]) * f)  # edge blocks are partial
        n_c = np.minimum(f, lw - np.arange(acc.shape[1]) * f)
        acc /= (n_r[:, None] * n_c[None, :]).astype(np.float32)[..., None]
        return acc


def find_channel_axis(axes: str, shape: tuple[int, ...], z: int | str | None = None,
                      t: int | None = None) -> str | None:
    """The one axis holding channels (C or samples S), or None; refuses odd shapes, and time series and Z-stacks
    unless `t` (t_choice) and `z` (z_choice) say what of them to read."""
    sizes = dict(zip(axes, shape))
    extra = [ax for ax, n in sizes.items() if ax not in "YX" and n > 1
             and not (ax == "Z" and z is not None) and not (ax == "T" and t is not None)]
    channels = [ax for ax in extra if ax in "CS"]
    if "Y" in sizes and "X" in sizes and len(extra) == len(channels) <= 1:
        check_plane(z, sizes.get("Z", 1))
        check_time(t, sizes.get("T", 1))
        return channels[0] if channels else None
    hint, error = "", SlideError
    if "T" in extra:
        hint, error = TIME_HINT, TimeSeriesError
    elif "Z" in extra:
        hint, error = STACK_HINT, ZStackError
    elif any(ax in "IQ" for ax in extra):
        hint = " (a multi-page TIFF without OME/ImageJ metadata saying the pages are channels)"
    raise error(f"expected a 2-D image (Y, X) with optional channels, got axes {axes} with "
                f"shape {tuple(shape)}{hint}")


def other_images_warning(path: Path, names: list[str], how: str, first: int, last: int) -> str:
    """The sentence for a file holding several images like the one read (positions of one acquisition) when no
    --series chose one: only the first is counted. names: every such image's name, the one read first; how: how
    the file names its images; first, last: the --series numbers of the first and last of them."""
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return (f"{path.name} holds {len(names)} images like the one counted ({how}: {shown}): only the first, "
            f"{names[0]}, is counted; to count another, pass --series N ({first}-{last})")


def check_plane(z: int | str | None, planes: int) -> None:
    """A plane number beyond the stack's planes is the user's mistake: one line saying how many there are."""
    if isinstance(z, int) and not 1 <= z <= planes:
        what = f"1-{planes} (the Z-stack's planes)" if planes > 1 else "1, max or mean on a 2-D image (one plane)"
        raise ParameterError(f"expected --z {what}, got --z {z}")


def projected(data: np.ndarray, axis: int, how: str) -> np.ndarray:
    """A Z-stack's planes along `axis` made one: their maximum, or their mean in the planes' own dtype."""
    if how == "max":
        return data.max(axis=axis)
    return cast_like(data.mean(axis=axis, dtype=np.float32), data.dtype)


def _block_starts(a: int, b: int, f: int) -> np.ndarray:
    """Offsets in [a, b) where an f-block starts, with 0 first (a partial block at a)."""
    starts = np.arange(-(-a // f) * f, b, f) - a
    return starts if len(starts) and starts[0] == 0 else np.concatenate([[0], starts]).astype(np.intp)


def cast_like(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "b":
        return x >= 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(x), info.min, info.max).astype(dtype)
    return x.astype(dtype)


def mean_mpp(x: float, y: float) -> float:
    """One pixel size for pixels `x` µm wide and `y` µm high: their geometric mean, whose square is the pixel's
    area, so that areas, densities and the tissue area in µm² stay exact (the arithmetic mean overstated them: 12 %
    for 0.25 x 0.5 µm); lengths and the size the slide is brought to are off by the pixels' aspect."""
    mean = math.sqrt(x * y)
    if abs(x - y) > 0.01 * max(x, y):
        off = 100 * max(abs(mean / x - 1), abs(mean / y - 1))
        log.warning("pixels are not square (%.4g x %.4g µm): measuring with their geometric mean %.4g µm, so areas "
                    "in µm² are exact and lengths off by up to %.0f %% along one axis", x, y, mean, off)
    return mean


def error_text(e: BaseException) -> str:
    """First line of an exception, for one-line error messages."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
