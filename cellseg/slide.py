"""Open any supported slide lazily and read regions and thumbnails from it, whatever its format.

One `Slide` interface over several backends, each a well-kept library, chosen by what the file is (its
first bytes, or a folder's layout), not by its name:

| backend | module | formats |
|---|---|---|
| tifffile | slide_tiff | TIFF, BigTIFF, OME-TIFF, ImageJ, SVS, NDPI, SCN, QPTIFF, Philips TIFF |
| OpenSlide | slide_openslide | DICOM WSI (a file of the series or its folder), MIRAX .mrxs, Hamamatsu .vms/.vmu, Ventana .bif, Sakura .svslide, Trestle |
| pylibCZIrw | slide_czi | Zeiss .czi (brightfield and fluorescence, every scene) |
| zarr | slide_zarr | OME-Zarr (NGFF) folders |
| Pillow | here | PNG, JPEG (decoded whole, up to MAX_PIL_PIXELS) |

tifffile stays first for the TIFFs it reads; a TIFF that OpenSlide knows to need stitching (Ventana BIF,
Trestle: overlapping tiles) goes to OpenSlide. Backends are imported only when a slide needs them.

Contract: coordinates are (row, col) in the pixel grid of the requested level, boxes half-open.
`read_region` and `read_thumbnail` return (h, w, C) arrays in the file's dtype, channel-last even
for one channel. Every failure a user can cause is a SlideError (bad file; the message names the file
and the backend) or a ParameterError (impossible request), one line saying what was expected and found.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol as TypingProtocol

import numpy as np
from PIL import Image

from .errors import ParameterError, SlideError, UnreadableRegionError
from .slide_unreadable import UnreadableRegion, UnreadableRegions, chunk_parts
from .tiling import Box

log = logging.getLogger(__name__)

MAX_PIL_PIXELS = 1_000_000_000  # PNG/JPEG are decoded whole: 1 Gpx RGB is 3 GB of RAM
SCREEN_MPP_UM = 50.0  # coarser than this is a screen dpi default (72/96/300 dpi), not a microscope
PIECE_PX = 1 << 20  # thumbnail reads go in pieces of about this many pixels (whole storage chunks)

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".svs", ".ndpi", ".scn", ".qptiff")
OPENSLIDE_SUFFIXES = (".dcm", ".mrxs", ".vms", ".vmu", ".bif", ".svslide")
CZI_SUFFIXES = (".czi",)
ZARR_SUFFIXES = (".zarr",)
PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
SLIDE_SUFFIXES = TIFF_SUFFIXES + OPENSLIDE_SUFFIXES + CZI_SUFFIXES + ZARR_SUFFIXES + PIL_SUFFIXES
FORMATS_TEXT = ("TIFF/OME-TIFF/SVS/NDPI, DICOM, MRXS, VMS, BIF, CZI, OME-Zarr, PNG or JPEG")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_CZI_MAGIC = b"ZISRAWFILE"
_DICOM_MAGIC = b"DICM"  # at byte 128, after the preamble
ZARR_METADATA = ("zarr.json", ".zattrs", ".zgroup")
# TIFFs whose tiles overlap and must be stitched: tifffile would hand out the raw tile grid.
_OPENSLIDE_TIFF_VENDORS = ("ventana", "trestle")
# PIL raises SyntaxError for a broken PNG; imagecodecs (16-bit colour PNG) RuntimeError subclasses.
_PIL_ERRORS = (OSError, ValueError, SyntaxError, RuntimeError, Image.DecompressionBombError)
UM_PER_UNIT = {"µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0,
               "nm": 1e-3, "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4,
               "m": 1e6, "meter": 1e6, "å": 1e-4, "angstrom": 1e-4, "pm": 1e-6, "picometer": 1e-6,
               "in": 25400.0, "inch": 25400.0}


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
    mpp_source: str  # "ome", "imagej", "tiff-resolution", "svs", "openslide", "czi", "ome-zarr",
    #                  "image-dpi", "override", "none: <why>"
    levels: tuple[tuple[int, int], ...]  # (height, width) of each pyramid level, level 0 first
    details: tuple[str, ...] = ()  # what else the backend says, for `cellseg info` (scenes, vendor, ...)


class Level(TypingProtocol):
    """What a backend gives per pyramid level: pixels of a box as (h, w, C), and its storage chunk."""

    chunk: tuple[int, int]  # (rows, cols) of one storage chunk: thumbnails read whole chunks

    def read(self, r0: int, c0: int, r1: int, c1: int) -> np.ndarray: ...


@dataclass
class ArrayLevel:
    """One pyramid level held as an array (zarr, memory map or numpy) indexed in its own axis order."""

    array: object  # zarr.Array, np.memmap or np.ndarray
    axes: str  # e.g. "CYX", "YXS", "TCZYX"; axes other than Y, X, channel have size 1
    channel_axis: str | None  # "C" or "S", or None for one channel
    chunk: tuple[int, int]  # (rows, cols) of one storage chunk: thumbnails read whole chunks

    def read(self, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        index = tuple(slice(r0, r1) if ax == "Y" else slice(c0, c1) if ax == "X"
                      else slice(None) if ax == self.channel_axis else 0 for ax in self.axes)
        data = np.asarray(self.array[index])
        kept = [ax for ax in self.axes if ax in ("Y", "X", self.channel_axis)]
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
            if self._stack is not None:
                self._stack.close()

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


def open_slide(path: str | Path, mpp: float | None = None, skip_unreadable: bool = False) -> Slide:
    """Open a slide lazily: a file, or a folder (OME-Zarr, a DICOM series). `mpp` (µm per pixel) overrides
    the file's pixel size; skip_unreadable: damaged pixel data reads as zeros and is listed (Slide)."""
    if mpp is not None:
        if isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or not math.isfinite(mpp) or mpp <= 0:
            raise ParameterError(f"expected --mpp > 0 (µm per pixel), got {mpp!r}")
    path = Path(path)
    kind, target = sniff(path)
    if kind == "tiff":
        from .slide_tiff import open_tiff
        slide = open_tiff(path)
    elif kind in ("openslide", "dicom-folder"):
        from .slide_openslide import open_openslide
        slide = open_openslide(path, target)
    elif kind == "czi":
        from .slide_czi import open_czi
        slide = open_czi(path)
    elif kind == "zarr":
        from .slide_zarr import open_ome_zarr
        slide = open_ome_zarr(path, target)
    else:
        slide = _open_pil(path)
    if mpp is not None:
        if slide.info.mpp is not None and abs(slide.info.mpp - mpp) > 1e-6 * mpp:
            log.info("%s: overriding the file's pixel size %.4g µm with %.4g µm", path.name,
                     slide.info.mpp, mpp)
        slide.info = dataclasses.replace(slide.info, mpp=float(mpp), mpp_source="override")
    slide.skip_unreadable = bool(skip_unreadable)
    i = slide.info
    log.info("opened %s: %s (%s) %dx%d px, %d channel(s) %s, mpp %s (%s), %d level(s)", path.name, i.format,
             i.backend, i.height, i.width, i.n_channels, i.dtype, i.mpp, i.mpp_source, len(i.levels))
    return slide


def sniff(path: Path) -> tuple[str, Path]:
    """(kind, what to open) from the file's first bytes or the folder's layout; the content decides, not the name.

    kinds: 'tiff', 'png', 'jpeg', 'czi', 'openslide' (any format OpenSlide detects), 'zarr' (the OME-Zarr
    folder), 'dicom-folder' (the DICOM file of the folder's whole-slide series to hand OpenSlide).
    """
    if not path.exists():
        raise SlideError(f"no such file: {path}")
    if path.is_dir():
        return _sniff_folder(path)
    if path.name in ZARR_METADATA and path.parent.is_dir():   # x.ome.zarr/zarr.json: the folder is meant
        return "zarr", path.parent
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as e:
        raise SlideError(f"expected a readable image file, cannot read {path}: {error_text(e)}") from e
    if head[:4] in _TIFF_MAGIC:
        return ("openslide" if openslide_vendor(path) in _OPENSLIDE_TIFF_VENDORS else "tiff"), path
    if head.startswith(_PNG_MAGIC):
        return "png", path
    if head.startswith(_JPEG_MAGIC):
        return "jpeg", path
    if head.startswith(_CZI_MAGIC):
        return "czi", path
    if head[128:132] == _DICOM_MAGIC or openslide_vendor(path):   # DICOM, MRXS, VMS, ... (text index files)
        return "openslide", path
    if not head:
        raise SlideError(f"expected a slide image ({FORMATS_TEXT}), {path} is empty (0 bytes)")
    if not path.name.lower().endswith(SLIDE_SUFFIXES):
        raise SlideError(f"unsupported file type '{path.suffix or '(no extension)'}' ({path}): expected a slide "
                         f"image: {FORMATS_TEXT}; convert other formats to OME-TIFF (e.g. with bfconvert)")
    raise SlideError(f"expected a slide image ({FORMATS_TEXT}), {path} is not one (starts with bytes "
                     f"{head[:8]!r}, and OpenSlide does not recognise it either)")


def _sniff_folder(path: Path) -> tuple[str, Path]:
    if any((path / name).is_file() for name in ZARR_METADATA):
        return "zarr", path
    dicoms = dicom_files(path)
    if dicoms:
        return "dicom-folder", _dicom_series_file(path, dicoms)
    raise SlideError(f"expected an image file, an OME-Zarr folder or a folder of DICOM files, {path} is a "
                     f"directory holding none of these")


def looks_like_slide(path: str | Path) -> bool:
    """Cheap guess for file pickers (napari): a file with a slide suffix, an OME-Zarr folder or a DICOM folder."""
    p = Path(path)
    if p.is_file():
        return p.name.lower().endswith(SLIDE_SUFFIXES)
    if p.is_dir():
        return any((p / name).is_file() for name in ZARR_METADATA) or bool(dicom_files(p))
    return False


def dicom_files(folder: Path) -> list[Path]:
    """The files of `folder` (not below it) that start like DICOM (DICM after the 128-byte preamble)."""
    found = []
    for p in sorted(folder.iterdir()):
        try:
            if p.is_file():
                with open(p, "rb") as fh:
                    if fh.read(132)[128:132] == _DICOM_MAGIC:
                        found.append(p)
        except OSError:
            continue
    return found


def _dicom_series_file(folder: Path, files: list[Path]) -> Path:
    """One file of the folder's whole-slide series (OpenSlide finds the rest of the series beside it)."""
    import pydicom
    series: dict[str, list[Path]] = {}
    for p in files:
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "ImageType"])
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as e:
            raise SlideError(f"expected readable DICOM files in {folder}, {p.name} is corrupt (pydicom: "
                             f"{error_text(e)})") from e
        if "VOLUME" in [str(t).upper() for t in ds.get("ImageType", [])]:   # not a label or an overview
            series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(p)
    if not series:
        raise SlideError(f"expected a DICOM whole-slide image (VOLUME images) in {folder}, found {len(files)} "
                         f"DICOM file(s) without one (labels, overviews or other modalities)")
    if len(series) > 1:
        examples = ", ".join(members[0].name for members in series.values())
        raise SlideError(f"expected one slide's DICOM series in {folder}, found {len(series)} series; pass one "
                         f"file of the slide to count ({examples})")
    return next(iter(series.values()))[0]


def openslide_vendor(path: Path) -> str | None:
    """OpenSlide's name for the file's format ('dicom', 'mirax', 'ventana', ...), or None."""
    try:
        import openslide
    except (ImportError, OSError) as e:   # OpenSlide is a dependency; a broken install must not stop TIFFs
        log.debug("OpenSlide unavailable: %s", e)
        return None
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except (openslide.OpenSlideError, OSError, ValueError) as e:
        log.debug("%s: OpenSlide cannot tell its format: %s", path.name, e)
        return None


def find_channel_axis(axes: str, shape: tuple[int, ...]) -> str | None:
    """The one axis holding channels (C or samples S), or None; refuses stacks and odd shapes."""
    sizes = dict(zip(axes, shape))
    extra = [ax for ax, n in sizes.items() if ax not in "YX" and n > 1]
    channels = [ax for ax in extra if ax in "CS"]
    if "Y" in sizes and "X" in sizes and len(extra) == len(channels) <= 1:
        return channels[0] if channels else None
    hint = ""
    if any(ax in "ZT" for ax in extra):
        hint = " (a Z-stack or time series: save the plane to count as its own file)"
    elif any(ax in "IQ" for ax in extra):
        hint = " (a multi-page TIFF without OME/ImageJ metadata saying the pages are channels)"
    raise SlideError(f"expected a 2-D image (Y, X) with optional channels, got axes {axes} with "
                     f"shape {tuple(shape)}{hint}")



def _open_pil(path: Path) -> Slide:
    # PIL refuses images over 2 x MAX_IMAGE_PIXELS (~179 Mpx) before we can see their size; raise
    # its guard to our own limit, checked below before decoding (a process-wide PIL setting).
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_PIL_PIXELS:
        Image.MAX_IMAGE_PIXELS = MAX_PIL_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                fmt = (im.format or path.suffix.lstrip(".")).lower()
                n_px = im.width * im.height
                if n_px > MAX_PIL_PIXELS or n_px == 0:
                    raise SlideError(f"expected a {fmt.upper()} of 1 to {MAX_PIL_PIXELS:,} pixels "
                                     f"(PNG/JPEG are read whole), {path} has {im.width} x {im.height}; "
                                     "convert it to a tiled pyramidal TIFF (e.g. vips tiffsave --tile --pyramid)")
                arr, dpi = _pil_pixels(im, path), im.info.get("dpi")
    except _PIL_ERRORS as e:
        raise SlideError(f"expected a readable PNG/JPEG, {path} is corrupt (pillow: {error_text(e)})") from e
    if arr.ndim == 2:
        arr = arr[..., None]
    mpp, source = None, f"none: the {fmt.upper()} has no pixel size; pass --mpp"
    if dpi and min(dpi) > 0:
        mpp = mean_mpp(25400.0 / dpi[0], 25400.0 / dpi[1])
        if mpp > SCREEN_MPP_UM:
            mpp, source = None, f"none: the {fmt.upper()} says {dpi[0]:g} dpi, a screen default, not a pixel size; pass --mpp"
        else:
            source = "image-dpi"
    info = SlideInfo(path, fmt, "pillow", arr.shape[0], arr.shape[1], arr.shape[2], arr.dtype, None, mpp, source,
                     ((arr.shape[0], arr.shape[1]),))
    return Slide(info, [ArrayLevel(arr, "YXC", "C", (1024, 1024))])


def _pil_pixels(im: Image.Image, path: Path) -> np.ndarray:
    """Decode to a native numpy array: L, I;16, I, F, RGB; alpha and palettes resolved."""
    if im.format == "PNG" and im.mode in ("RGB", "RGBA"):
        with open(path, "rb") as fh:
            ihdr = fh.read(26)
        if ihdr[24] == 16:  # 16-bit colour: PIL would truncate it to 8 bits; imagecodecs keeps it
            import imagecodecs
            arr = imagecodecs.png_decode(path.read_bytes())
            return arr[..., :3]
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        log.info("%s: dropping the alpha channel", path.name)
    convert = {"1": "L", "P": "RGB", "PA": "RGB", "LA": "L", "RGBA": "RGB", "CMYK": "RGB",
               "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}
    if im.mode in convert:
        im = im.convert(convert[im.mode])
    return np.asarray(im)


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
    if abs(x - y) > 0.01 * max(x, y):
        log.warning("pixels are not square (%.4g x %.4g µm); using the mean", x, y)
    return (x + y) / 2


def error_text(e: BaseException) -> str:
    """First line of an exception, for one-line error messages."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
