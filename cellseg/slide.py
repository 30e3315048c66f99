"""Open any supported image lazily and read regions and thumbnails from it.

TIFF family (plain, BigTIFF, tiled or stripped, OME-TIFF and ImageJ hyperstacks, SVS, NDPI) is read
through tifffile's zarr store: only the tiles/strips a region touches are decoded, so a 100k x 100k
slide opens in milliseconds and a region read costs what the region costs. Uncompressed contiguous
TIFFs (ImageJ writes them as one strip) are memory-mapped instead, since one strip would otherwise be
one chunk the size of the image. PNG and JPEG cannot be read partially; they are decoded whole,
up to MAX_PIL_PIXELS.

Contract: coordinates are (row, col) in the pixel grid of the requested level, boxes half-open.
`read_region` and `read_thumbnail` return (h, w, C) arrays in the file's dtype, channel-last even
for one channel. Every failure a user can cause is a SlideError (bad file) or a ParameterError
(impossible request), with one line saying what was expected and what was found.
"""

from __future__ import annotations

import dataclasses
import logging
import logging.handlers
import math
import re
import struct
import warnings
import xml.etree.ElementTree as ET
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import zarr
from PIL import Image

from .errors import ParameterError, SlideError
from .tiling import Box

log = logging.getLogger(__name__)

MAX_PIL_PIXELS = 1_000_000_000  # PNG/JPEG are decoded whole: 1 Gpx RGB is 3 GB of RAM
SCREEN_MPP_UM = 50.0  # coarser than this is a screen dpi default (72/96/300 dpi), not a microscope
PIECE_PX = 1 << 20  # thumbnail reads go in pieces of about this many pixels (whole storage chunks)

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".svs", ".ndpi")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
# What tifffile, zarr and imagecodecs raise for damaged files. imagecodecs' codec errors
# (DeflateError, JpegError, ...) derive from RuntimeError; corrupt IFDs can give struct.error.
_TIFF_ERRORS = (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError, RuntimeError,
                struct.error)
# PIL raises SyntaxError for a broken PNG; imagecodecs (16-bit colour PNG) RuntimeError subclasses.
_PIL_ERRORS = (OSError, ValueError, SyntaxError, RuntimeError, Image.DecompressionBombError)
_UM_PER_UNIT = {"µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0,
                "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "å": 1e-4, "pm": 1e-6,
                "in": 25400.0, "inch": 25400.0}


@dataclass(frozen=True)
class SlideInfo:
    path: Path
    format: str  # "ome-tiff", "imagej-tiff", "tiff", "svs", "ndpi", "png", "jpeg"
    height: int  # level 0, pixels
    width: int
    n_channels: int  # 1 grayscale, 3 RGB, C multichannel fluorescence
    dtype: np.dtype
    channel_names: tuple[str, ...] | None
    mpp: float | None  # µm per pixel at level 0 (mean of x and y)
    mpp_source: str  # "ome", "imagej", "tiff-resolution", "svs", "image-dpi", "override", "none: <why>"
    levels: tuple[tuple[int, int], ...]  # (height, width) of each pyramid level, level 0 first


@dataclass
class _Level:
    """One pyramid level: an array indexed in its file's own axis order."""

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
    """An open image. Use as a context manager, or call close()."""

    def __init__(self, info: SlideInfo, levels: list[_Level], stack: ExitStack | None = None):
        self.info = info
        self._levels = levels
        self._stack = stack
        self._closed = False

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        i = self.info
        return f"<Slide {i.path.name} {i.format} {i.height}x{i.width}x{i.n_channels} {i.dtype}>"

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
        except _TIFF_ERRORS as e:
            raise SlideError(f"expected readable pixel data, rows {r0}:{r1} cols {c0}:{c1} (level "
                             f"{level}) of {self.info.path} are corrupt: {_why(e)}") from e

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
        return _cast(small, self.info.dtype), max(h0, w0) / max_side

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


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open an image file lazily. `mpp` (µm per pixel) overrides the file's pixel size."""
    if mpp is not None:
        if isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or not math.isfinite(mpp) or mpp <= 0:
            raise ParameterError(f"expected --mpp > 0 (µm per pixel), got {mpp!r}")
    path = Path(path)
    kind = _sniff(path)
    slide = _open_tiff(path) if kind == "tiff" else _open_pil(path)
    if mpp is not None:
        if slide.info.mpp is not None and abs(slide.info.mpp - mpp) > 1e-6 * mpp:
            log.info("%s: overriding the file's pixel size %.4g µm with %.4g µm", path.name,
                     slide.info.mpp, mpp)
        slide.info = dataclasses.replace(slide.info, mpp=float(mpp), mpp_source="override")
    i = slide.info
    log.info("opened %s: %s %dx%d px, %d channel(s) %s, mpp %s (%s), %d level(s)", path.name,
             i.format, i.height, i.width, i.n_channels, i.dtype, i.mpp, i.mpp_source, len(i.levels))
    return slide


def _sniff(path: Path) -> str:
    """'tiff', 'png' or 'jpeg' from the file's first bytes; the content decides, not the name."""
    if not path.exists():
        raise SlideError(f"no such file: {path}")
    if path.is_dir():
        raise SlideError(f"expected an image file, {path} is a directory")
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as e:
        raise SlideError(f"expected a readable image file, cannot read {path}: {_why(e)}") from e
    if head[:4] in _TIFF_MAGIC:
        return "tiff"
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    if not head:
        raise SlideError(f"expected a TIFF/PNG/JPEG image, {path} is empty (0 bytes)")
    if path.suffix.lower() not in TIFF_SUFFIXES + PIL_SUFFIXES:
        raise SlideError(f"unsupported file type '{path.suffix or '(no extension)'}' ({path}): expected "
                         "a TIFF (.tif .tiff .ome.tif .svs .ndpi), PNG or JPEG image; convert other "
                         "formats to OME-TIFF (e.g. with bfconvert)")
    raise SlideError(f"expected a TIFF/PNG/JPEG image, {path} is not one (starts with bytes {head[:8]!r})")


def _open_tiff(path: Path) -> Slide:
    with ExitStack() as stack:  # closes the file if anything below fails
        collect = logging.handlers.BufferingHandler(10_000)  # what tifffile logs instead of raising
        collect.setLevel(logging.ERROR)
        tiff_log = logging.getLogger("tifffile")
        tiff_log.addHandler(collect)
        try:
            tf = stack.enter_context(tifffile.TiffFile(path))
            series = tf.series[0]  # SVS: the baseline; OME: the first image
            levels = list(series.levels)
        except _TIFF_ERRORS as e:
            raise SlideError(f"expected a readable TIFF, {path} is corrupt: {_why(e)}") from e
        finally:
            tiff_log.removeHandler(collect)
        # tifffile skips damaged tags and IFDs with a logged error. One pointing outside the file
        # means truncation (a lost OME-XML or pyramid level would silently change the result);
        # other logged problems (odd vendor tags) are passed on as warnings.
        for msg in (record.getMessage() for record in collect.buffer):
            if "offset" in msg:
                raise SlideError(f"expected a complete TIFF, {path} is truncated or corrupt: {msg}")
            log.warning("%s: tifffile: %s", path.name, msg)
        if len(tf.series) > 1:
            log.info("%s holds %d image series; reading the first (%s)", path.name, len(tf.series),
                     series.name or series.kind)
        if 0 in series.shape:
            raise SlideError(f"expected an image of positive size, {path} has shape {series.shape} "
                             f"(axes {series.axes})")
        channel_axis = _channel_axis(series.axes, series.shape)
        sizes = dict(zip(series.axes, series.shape))
        if np.dtype(series.dtype).kind not in "biuf":
            raise SlideError(f"expected integer or float pixels, {path} has {series.dtype}")
        kept = []
        for i, lv in enumerate(levels):
            other = [(ax, n) for ax, n in zip(lv.axes, lv.shape) if ax not in "YX"]
            if lv.axes != series.axes or other != [(ax, n) for ax, n in sizes.items() if ax not in "YX"]:
                log.warning("%s: pyramid level %d has axes %s %s unlike level 0 (%s %s); ignoring "
                            "it and smaller levels", path.name, i, lv.axes, lv.shape, series.axes,
                            series.shape)
                break
            kept.append(_tiff_level(tf, series, i, lv, channel_axis, stack))
        _check_complete(path, levels[:len(kept)])
        n_channels = sizes[channel_axis] if channel_axis else 1
        mpp, source, names = _tiff_metadata(tf, n_channels)
        fmt = ("ome-tiff" if tf.is_ome else "imagej-tiff" if tf.is_imagej else "svs" if tf.is_svs
               else "ndpi" if tf.is_ndpi else "tiff")
        info = SlideInfo(path, fmt, sizes["Y"], sizes["X"], n_channels,
                         np.dtype(series.dtype).newbyteorder("="), names, mpp, source,
                         tuple((dict(zip(lv.axes, lv.shape))["Y"], dict(zip(lv.axes, lv.shape))["X"])
                               for lv in levels[:len(kept)]))
        return Slide(info, kept, stack.pop_all())


def _tiff_level(tf, series, i, lv, channel_axis, stack) -> _Level:
    try:
        if lv.dataoffset is not None and lv.keyframe.is_memmappable:
            # Uncompressed and contiguous: a memory map reads only the rows a region touches.
            dtype = np.dtype(lv.dtype).newbyteorder(tf.byteorder)
            arr = np.memmap(tf.filehandle.path, dtype=dtype, mode="r", offset=lv.dataoffset, shape=lv.shape)
            return _Level(arr, lv.axes, channel_axis, (1024, 1024))
        store = stack.enter_context(series.aszarr(level=i))
        arr = zarr.open(store, mode="r")
    except _TIFF_ERRORS as e:
        raise SlideError(f"expected a readable TIFF, level {i} of {tf.filehandle.path} is corrupt: "
                         f"{_why(e)}") from e
    chunks = dict(zip(lv.axes, arr.chunks))
    return _Level(arr, lv.axes, channel_axis, (chunks["Y"], chunks["X"]))


def _channel_axis(axes: str, shape: tuple[int, ...]) -> str | None:
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


def _check_complete(path: Path, levels) -> None:
    """Fail at open, not hours into a run, when the file is shorter than its tiles say."""
    size = path.stat().st_size
    for lv in levels:
        for page in lv.pages:
            if page is None or not len(page.dataoffsets):
                continue
            end = int(np.max(np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts, np.int64)))
            if end > size:
                raise SlideError(f"expected a complete TIFF, {path} is truncated: its image data ends at "
                                 f"byte {end:,} but the file has {size:,} bytes")


def _tiff_metadata(tf, n_channels: int) -> tuple[float | None, str, tuple[str, ...] | None]:
    """Pixel size (µm), where it came from, and channel names, in order of trust."""
    page = tf.pages.first
    why = []
    names = None
    if tf.is_ome:
        mpp, names, reason = _ome(tf.ome_metadata, n_channels)
        if mpp:
            return mpp, "ome", names
        why.append(reason)
    if tf.is_imagej:
        ij = tf.imagej_metadata or {}
        labels = ij.get("Labels")
        if names is None and isinstance(labels, list) and len(labels) == n_channels:
            names = tuple(str(x) for x in labels)
        unit = str(ij.get("unit", "")).replace("\\u00B5", "µ").strip().lower()
        res = page.resolution if 282 in page.tags else None
        if unit in _UM_PER_UNIT and res and min(res) > 0:
            return _mean_mpp(_UM_PER_UNIT[unit] / res[0], _UM_PER_UNIT[unit] / res[1]), "imagej", names
        why.append(f"the ImageJ calibration unit is {unit or 'missing'!r}")
    if tf.is_svs:
        m = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", page.description)
        try:
            if m and float(m.group(1)) > 0:
                return float(m.group(1)), "svs", names
        except ValueError:
            pass  # a garbled MPP field: fall through to the resolution tags
        why.append("the SVS description has no MPP")
    mpp, reason = _resolution_mpp(page)
    if mpp:
        return mpp, "tiff-resolution", names
    why.append(reason)
    return None, "none: " + "; ".join(why) + "; pass --mpp", names


def _ome(xml: str, n_channels: int) -> tuple[float | None, tuple[str, ...] | None, str]:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        log.warning("ignoring unreadable OME-XML: %s", e)
        return None, None, "the OME-XML is unreadable"
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None, None, "the OME-XML has no Pixels element"
    chans = [el.get("Name") for el in pixels if el.tag.rsplit("}", 1)[-1] == "Channel"]
    names = tuple(chans) if len(chans) == n_channels and all(chans) else None
    sizes = []
    for ax in "XY":
        value, unit = pixels.get(f"PhysicalSize{ax}"), pixels.get(f"PhysicalSize{ax}Unit", "µm")
        if value is None:
            return None, names, "the OME-XML has no PhysicalSizeX/Y"
        if unit.lower() not in _UM_PER_UNIT:
            return None, names, f"the OME PhysicalSize{ax}Unit {unit!r} is not a length unit"
        try:
            sizes.append(float(value) * _UM_PER_UNIT[unit.lower()])
        except ValueError:
            return None, names, f"the OME PhysicalSize{ax} {value!r} is not a number"
    if min(sizes) <= 0:
        return None, names, f"the OME PhysicalSizeX/Y {sizes} is not positive"
    return _mean_mpp(*sizes), names, ""


def _resolution_mpp(page) -> tuple[float | None, str]:
    """µm per pixel from XResolution/YResolution (pixels per ResolutionUnit), or why not."""
    if 282 not in page.tags or 283 not in page.tags:
        return None, "the TIFF has no pixel size (no OME/ImageJ metadata, no resolution tags)"
    unit = int(page.resolutionunit)
    # RESUNIT: 1 NONE, 2 INCH, 3 CENTIMETER; 4 MILLIMETER and 5 MICROMETER are tifffile extensions.
    um = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}.get(unit)
    if um is None:
        return None, "the TIFF ResolutionUnit is NONE (no physical unit)"
    xres, yres = page.resolution
    if xres <= 0 or yres <= 0:
        return None, f"the TIFF resolution {xres:g} x {yres:g} is not positive"
    mpp = _mean_mpp(um / xres, um / yres)
    if mpp > SCREEN_MPP_UM:
        what = f"{xres:g} dpi" if unit == 2 else f"{mpp:.4g} µm/px"
        return None, f"the TIFF resolution {what} is a screen default, not a microscope pixel size"
    return mpp, ""


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
        raise SlideError(f"expected a readable PNG/JPEG, {path} is corrupt: {_why(e)}") from e
    if arr.ndim == 2:
        arr = arr[..., None]
    mpp, source = None, f"none: the {fmt.upper()} has no pixel size; pass --mpp"
    if dpi and min(dpi) > 0:
        mpp = _mean_mpp(25400.0 / dpi[0], 25400.0 / dpi[1])
        if mpp > SCREEN_MPP_UM:
            mpp, source = None, f"none: the {fmt.upper()} says {dpi[0]:g} dpi, a screen default, not a pixel size; pass --mpp"
        else:
            source = "image-dpi"
    info = SlideInfo(path, fmt, arr.shape[0], arr.shape[1], arr.shape[2], arr.dtype, None, mpp, source,
                     ((arr.shape[0], arr.shape[1]),))
    return Slide(info, [_Level(arr, "YXC", "C", (1024, 1024))])


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


def _cast(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "b":
        return x >= 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(x), info.min, info.max).astype(dtype)
    return x.astype(dtype)


def _mean_mpp(x: float, y: float) -> float:
    if abs(x - y) > 0.01 * max(x, y):
        log.warning("pixels are not square (%.4g x %.4g µm); using the mean", x, y)
    return (x + y) / 2


def _why(e: BaseException) -> str:
    """First line of an exception, for one-line error messages."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
