"""The tifffile backend: TIFF, BigTIFF, OME-TIFF, ImageJ hyperstacks, SVS, NDPI, SCN, QPTIFF, Philips TIFF.

Only the tiles/strips a region touches are decoded, so a 100k x 100k slide opens in milliseconds and a region read
costs what the region costs. Tiled levels (pyramidal OME-TIFF, SVS, most scanners' TIFFs) are read tile by tile
with tifffile's own decoder (`TiledLevel`); other layouts through tifffile's zarr store. Uncompressed contiguous
TIFFs (ImageJ writes them as one strip) are memory-mapped instead, since one strip would otherwise be one chunk the
size of the image.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import struct
import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import tifffile
import zarr

from ..errors import SlideError
from ._tiff_multifile import FileSet, MicroManagerStack
from .base import (
    SCREEN_MPP_UM,
    UM_PER_UNIT,
    ArrayLevel,
    Slide,
    SlideInfo,
    check_series,
    error_text,
    find_channel_axis,
    mean_mpp,
    other_images_warning,
)

log = logging.getLogger(__name__)

BACKEND = "tifffile"
# What tifffile, zarr and imagecodecs raise for damaged files. imagecodecs' codec errors
# (DeflateError, JpegError, ...) derive from RuntimeError; corrupt IFDs can give struct.error.
READ_ERRORS = (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError, RuntimeError, struct.error)


def open_tiff(path: Path, z: int | str | None = None, series: int | None = None, t: int | None = None) -> Slide:
    """The TIFF at `path`; `z` (base.z_choice): what of a Z-stack to read; `series` (base.series_choice): which of
    its images (tifffile's series: an OME-TIFF's Image elements in order), the first if None; `t` (base.t_choice):
    which time point of a time series."""
    with ExitStack() as stack:  # closes the file if anything below fails
        # what tifffile logs instead of raising, kept from the console (propagate off) and judged below: the user
        # gets one line for a damaged file, not tifffile's records before it
        collect = logging.handlers.BufferingHandler(10_000)
        collect.setLevel(logging.WARNING)
        tiff_log = logging.getLogger("tifffile")
        tiff_log.addHandler(collect)
        propagate, tiff_log.propagate = tiff_log.propagate, False
        try:
            tf = stack.enter_context(tifffile.TiffFile(path))
            file_set, stage = FileSet.of(tf, path), MicroManagerStack.of(tf, path)
            # a file of a multi-file set is read as the image it holds (Micro-Manager: its position), not the first
            index = (series if series is not None else stage.own if stage else file_set.own_image if file_set
                     else 0)
            check_series(series, stage.count if stage else len(file_set.files) if file_set else len(tf.series))
            # SVS: the baseline first; OME: the Image elements in order (of a set, those tifffile found files for);
            # a Micro-Manager stack: one image, its positions an axis
            image = tf.series[0 if stage else file_set.series_of(index, tf) if file_set else index]
            levels = list(image.levels)
        except READ_ERRORS as e:
            raise SlideError(f"expected a readable TIFF, {path} is corrupt ({BACKEND}: {error_text(e)})") from e
        finally:
            tiff_log.removeHandler(collect)
            tiff_log.propagate = propagate
        # tifffile skips damaged tags and IFDs with a logged error. One pointing outside the file
        # means truncation (a lost OME-XML or pyramid level would silently change the result);
        # other logged problems (odd vendor tags) are passed on as warnings.
        missing = file_set.missing if file_set else {}
        said_below = missing or (stage and stage.absent.any())       # missing files: said once, below
        messages = [record.getMessage() for record in collect.buffer if not (said_below and any(
            words in record.getMessage() for words in ("failed to read", "MMStack is missing", "missing files")))]
        for msg in messages:
            if "offset" in msg:
                raise SlideError(f"expected a complete TIFF, {path} is truncated or corrupt ({BACKEND}: {msg})")
        for msg in messages:
            log.warning("%s: tifffile: %s", path.name, msg)
        if len(tf.series) > 1:
            log.info("%s holds %d image series; reading series %d (%s)", path.name, len(tf.series), index,
                     image.name or image.kind)
        if 0 in image.shape:
            raise SlideError(f"expected an image of positive size, {path} has shape {image.shape} "
                             f"(axes {image.axes})")
        sizes = dict(zip(image.axes, image.shape))
        if stage:
            stage.check(index, z, t)
        plane = {ax: n for ax, n in sizes.items() if ax != "R" or not stage}     # a position is read, as --series
        channel_axis = find_channel_axis("".join(plane), tuple(plane.values()), z, t)
        if np.dtype(image.dtype).kind not in "biuf":
            raise SlideError(f"expected integer or float pixels, {path} has {image.dtype}")
        kept = []
        for i, lv in enumerate(levels):
            other = [(ax, n) for ax, n in zip(lv.axes, lv.shape) if ax not in "YX"]
            if lv.axes != image.axes or other != [(ax, n) for ax, n in sizes.items() if ax not in "YX"]:
                log.warning("%s: pyramid level %d has axes %s %s unlike level 0 (%s %s); ignoring "
                            "it and smaller levels", path.name, i, lv.axes, lv.shape, image.axes,
                            image.shape)
                break
            kept.append(_tiff_level(tf, image, i, lv, channel_axis, stack, z, t, index if stage else 0))
        _check_complete(levels[:len(kept)])
        n_channels = sizes[channel_axis] if channel_axis else 1
        mpp, source, names = _tiff_metadata(tf, image, index, n_channels)
        # Micro-Manager 2 writes OME-XML into its files too; they are read (and named) as Micro-Manager's
        fmt = ("micromanager-tiff" if stage else "ome-tiff" if tf.is_ome else "imagej-tiff" if tf.is_imagej
               else "svs" if tf.is_svs else "ndpi" if tf.is_ndpi else "scn" if tf.is_scn else "qptiff" if tf.is_qpi
               else "philips-tiff" if tf.is_philips else "tiff")
        alike = [k for k, s in enumerate(tf.series) if _alike(s, image)] if tf.is_ome and not stage else []
        position_names = [tf.series[k].name or f"series {k}" for k in alike]
        if file_set:    # --series numbers are the OME-XML's
            alike = [file_set.image_of(k) for k in alike]
        # the other positions of a multi-file set are in files of their own: said in the details, not warned of
        warnings = (other_images_warning(path, position_names, "OME images", alike[0], alike[-1]),) \
            if len(alike) > 1 and series is None and not file_set else ()
        images = len(file_set.files) if file_set else len(tf.series)
        details = ((f"image {index} of 0-{images - 1}{' (--series)' if series is not None else ''}: "
                    f"{image.name or image.kind}",) if images > 1 and (tf.is_ome or series is not None) else ())
        if file_set:
            details += (file_set.describe(index),)
            warnings += file_set.warnings(index, series is not None)
        if stage:
            alike = list(range(stage.count))
            details += (stage.describe(index, series is not None),) if stage.count > 1 else ()
            warnings += stage.warnings(index, series is not None)
        info = SlideInfo(path, fmt, BACKEND, sizes["Y"], sizes["X"], n_channels,
                         np.dtype(image.dtype).newbyteorder("="), names, mpp, source,
                         tuple((dict(zip(lv.axes, lv.shape))["Y"], dict(zip(lv.axes, lv.shape))["X"])
                               for lv in levels[:len(kept)]),
                         details=details, z_planes=sizes.get("Z", 1), z=z if sizes.get("Z", 1) > 1 else None,
                         warnings=warnings, series=series if series is not None else index or None,
                         positions=tuple(alike) if len(alike) > 1 else (), t_points=sizes.get("T", 1),
                         t=t if sizes.get("T", 1) > 1 else None,
                         file_set=file_set.paths if file_set else stage.files if stage and stage.files[1:] else ())
        return Slide(info, kept, stack.pop_all(), READ_ERRORS)


def _own_file(pages) -> str | None:
    """The one file a level's pages are in, or None where they span files: a multi-file OME-TIFF's image can be in
    another file of the set than the one opened, or in several."""
    files = {page.parent.filehandle.path for page in pages if page is not None}
    return files.pop() if len(files) == 1 else None


def _alike(other, series) -> bool:
    """An image of the file like the one read (a position of one acquisition), not its label or overview: the same
    axes, channels and pixel type, and within 4x of its size each way."""
    a, b = dict(zip(other.axes, other.shape)), dict(zip(series.axes, series.shape))
    return (other.axes == series.axes and other.dtype == series.dtype and "Y" in b and "X" in b
            and all(a[ax] == b[ax] for ax in b if ax not in "YX")
            and all(b[ax] / 4 <= a[ax] <= 4 * b[ax] for ax in "YX"))


def _tiff_level(tf, series, i, lv, channel_axis, stack, z, t, position: int) -> ArrayLevel | TiledLevel:
    try:
        own_file = _own_file(lv.pages)
        if lv.dataoffset is not None and lv.keyframe.is_memmappable and own_file is not None:
            # Uncompressed and contiguous: a memory map reads only the rows a region touches.
            dtype = np.dtype(lv.dtype).newbyteorder(lv.keyframe.parent.byteorder)     # its own file's
            arr = np.memmap(own_file, dtype=dtype, mode="r", offset=lv.dataoffset, shape=lv.shape)
            return ArrayLevel(arr, lv.axes, channel_axis, (1024, 1024), z, t, position)
        tiled = TiledLevel.of(lv, channel_axis, stack)
        if tiled is not None:
            return tiled
        store = stack.enter_context(series.aszarr(level=i))
        arr = zarr.open(store, mode="r")
    except READ_ERRORS as e:
        raise SlideError(f"expected a readable TIFF, level {i} of {tf.filehandle.path} is corrupt "
                         f"({BACKEND}: {error_text(e)})") from e
    chunks = dict(zip(lv.axes, arr.chunks))
    return ArrayLevel(arr, lv.axes, channel_axis, (chunks["Y"], chunks["X"]), z, t, position)


class TiledLevel:
    """A tiled pyramid level read tile by tile: each tile's bytes with os.pread (no shared file position, so reader
    threads need no lock), decoded by tifffile's own decoder (compression, predictor, byte order, JPEG tables: the
    pixels its zarr store gives, tests/slides/test_tiled_level.py). Why not the zarr store: zarr 3 reads through an
    asyncio loop in a thread of its own, pure Python that takes turns with the pipeline's for the interpreter; on the
    8192² benchmark slide the pipeline waited 2.0 s for 256 tiles of pixels its reader thread had spent 0.07 s of CPU
    on (benchmarks/pipeline_ceiling.py)."""

    # Decoded tiles kept, least recently used out first: a count's read box with its halo (576² for a 512² core)
    # spans 3 x 3 of a slide's 512² tiles, so without them every tile was decoded up to 9 times. Reads come row by
    # row: 12 MB holds three rows of tiles across an 8192 px wide 8-bit slide (each tile decoded once); on a wider
    # slide the tiles still shared along a row are kept (3 decodes instead of 9). A bound, not a share of the slide:
    # memory stays flat (a thumbnail of a level without a pyramid passes through it once).
    CACHE_BYTES = 12 << 20

    def __init__(self, fd: int, keyframe, pages: list, width: int, samples: int):
        self._fd, self._keyframe = fd, keyframe
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()
        self._offsets = [np.asarray(page.dataoffsets, np.int64) for page in pages]   # one page a channel
        self._counts = [np.asarray(page.databytecounts, np.int64) for page in pages]
        self._samples = samples
        self._tile = (keyframe.tilelength, keyframe.tilewidth)
        self._across = -(-width // keyframe.tilewidth)
        self._fill = keyframe.nodata or 0
        self.chunk = self._tile
        self.dtype = np.dtype(keyframe.dtype).newbyteorder("=")

    @classmethod
    def of(cls, lv, channel_axis: str | None, stack: ExitStack) -> TiledLevel | None:
        """The level as a TiledLevel where its layout allows (tiled, chunky samples or one page a channel, no
        depth, all in one file), else None (the zarr store reads it)."""
        key = lv.keyframe
        pages = list(lv.pages)
        own_file = _own_file(pages)
        sizes = dict(zip(lv.axes, lv.shape))
        one_page = lv.axes in ("YX", "YXS") and len(pages) == 1
        page_a_channel = lv.axes == "CYX" and channel_axis == "C" and len(pages) == sizes["C"] \
            and key.samplesperpixel == 1
        if not (key.is_tiled and key.imagedepth == 1 and (one_page or page_a_channel)
                and (key.planarconfig == 1 or key.samplesperpixel == 1)
                and own_file is not None and os.path.isfile(own_file)     # a file, not bytes in memory
                and all(p is not None and len(p.dataoffsets) == len(key.dataoffsets) for p in pages)):
            return None
        fd = os.open(own_file, os.O_RDONLY)
        stack.callback(os.close, fd)
        samples = sizes["C"] if page_a_channel else sizes.get("S", 1)
        return cls(fd, key, pages, sizes["X"], samples)

    def read(self, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        out = np.empty((r1 - r0, c1 - c0, self._samples), self.dtype)
        th, tw = self._tile
        for ty in range(r0 // th, (r1 - 1) // th + 1):
            for tx in range(c0 // tw, (c1 - 1) // tw + 1):
                rows = slice(max(r0, ty * th), min(r1, (ty + 1) * th))
                cols = slice(max(c0, tx * tw), min(c1, (tx + 1) * tw))
                index = ty * self._across + tx
                region = out[rows.start - r0:rows.stop - r0, cols.start - c0:cols.stop - c0]
                for page in range(len(self._offsets)):
                    target = region[..., page:page + 1] if len(self._offsets) > 1 else region   # one page a channel
                    tile = self._cached_tile(page, index)
                    if tile is None:
                        target[...] = self._fill
                    else:
                        target[...] = tile[rows.start - ty * th:rows.stop - ty * th,
                                           cols.start - tx * tw:cols.stop - tx * tw]
        return out

    def _cached_tile(self, page: int, index: int) -> np.ndarray | None:
        key = (page, index)
        with self._lock:
            tile = self._cache.get(key)
            if tile is not None:
                self._cache.move_to_end(key)
                return tile
        # decoded outside the lock: reader threads decode side by side (imagecodecs releases the GIL); two that
        # want the same tile at once both decode it, harmlessly
        tile = self._tile_pixels(page, index)
        if tile is None:
            return None
        with self._lock:
            if key not in self._cache:
                self._cache[key] = tile
                self._cache_bytes += tile.nbytes
                while self._cache_bytes > self.CACHE_BYTES and len(self._cache) > 1:
                    self._cache_bytes -= self._cache.popitem(last=False)[1].nbytes
        return tile

    def _tile_pixels(self, page: int, index: int) -> np.ndarray | None:
        """The decoded tile `index` of `page` as (rows, cols, samples), None where the file stores none (sparse)."""
        count, offset = int(self._counts[page][index]), int(self._offsets[page][index])
        if count == 0 or offset == 0:
            return None
        data = os.pread(self._fd, count, offset)
        if len(data) < count:
            raise OSError(f"expected {count} bytes of tile {index}, the file ends after {len(data)}")
        segment = self._keyframe.decode(data, index, jpegtables=self._keyframe.jpegtables)[0]
        return segment[0]


def _check_complete(levels) -> None:
    """Fail at open, not hours into a run, when a file is shorter than its tiles say (each page against its own
    file: a multi-file OME-TIFF's image can be in the set's other files)."""
    for lv in levels:
        for page in lv.pages:
            if page is None or not len(page.dataoffsets):
                continue
            end = int(np.max(np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts, np.int64)))
            file = Path(page.parent.filehandle.path)
            size = file.stat().st_size
            if end > size:
                raise SlideError(f"expected a complete TIFF, {file} is truncated: its image data ends at "
                                 f"byte {end:,} but the file has {size:,} bytes ({BACKEND})")


def _tiff_metadata(tf, image, index: int, n_channels: int) -> tuple[float | None, str, tuple[str, ...] | None]:
    """Pixel size (µm), where it came from, and channel names, in order of trust, of tifffile's series `index`
    (`image`)."""
    page = image.keyframe
    why = []
    names = None
    if tf.is_ome:
        mpp, names, reason = _ome(tf.ome_metadata, n_channels, index)
        if mpp:
            return mpp, "ome", names
        why.append(reason)
    if image.kind == "mmstack":     # Micro-Manager's own figure (any ImageJ or TIFF resolution rounds it)
        mpp = _micromanager_mpp(tf, page)
        if mpp:
            return mpp, "micromanager", names
        why.append("the Micro-Manager metadata has no pixel size")
    if tf.is_imagej:
        ij = tf.imagej_metadata or {}
        labels = ij.get("Labels")
        if names is None and isinstance(labels, list) and len(labels) == n_channels:
            names = tuple(str(x) for x in labels)
        unit = str(ij.get("unit", "")).replace("\\u00B5", "µ").strip().lower()
        res = page.resolution if 282 in page.tags else None
        if unit in UM_PER_UNIT and res and min(res) > 0:
            return mean_mpp(UM_PER_UNIT[unit] / res[0], UM_PER_UNIT[unit] / res[1]), "imagej", names
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


def _micromanager_mpp(tf, page) -> float | None:
    """The pixel size (µm) Micro-Manager recorded: its summary's (PixelSize_um in 1.4), else the plane's own
    metadata's (PixelSizeUm, Micro-Manager 2 records it a plane)."""
    summary = (tf.micromanager_metadata or {}).get("Summary") or {}
    plane = page.tags[51123].value if 51123 in page.tags else {}
    for value in (summary.get("PixelSize_um"), summary.get("PixelSizeUm"),
                  plane.get("PixelSizeUm") if isinstance(plane, dict) else None):
        try:
            if value is not None and float(value) > 0:
                return float(value)
        except (TypeError, ValueError):
            continue
    return None


def _ome(xml: str, n_channels: int, index: int = 0) -> tuple[float | None, tuple[str, ...] | None, str]:
    """The pixel size and channel names of the OME-XML's Image `index` (tifffile makes one series of each, in
    order)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        log.warning("ignoring unreadable OME-XML: %s", e)
        return None, None, "the OME-XML is unreadable"
    images = [el for el in root if el.tag.rsplit("}", 1)[-1] == "Image"]
    image = images[index] if index < len(images) else root
    pixels = next((el for el in image.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None, None, "the OME-XML has no Pixels element"
    chans = [el.get("Name") for el in pixels if el.tag.rsplit("}", 1)[-1] == "Channel"]
    names = tuple(chans) if len(chans) == n_channels and all(chans) else None
    sizes = []
    for ax in "XY":
        value, unit = pixels.get(f"PhysicalSize{ax}"), pixels.get(f"PhysicalSize{ax}Unit", "µm")
        if value is None:
            return None, names, "the OME-XML has no PhysicalSizeX/Y"
        if unit.lower() not in UM_PER_UNIT:
            return None, names, f"the OME PhysicalSize{ax}Unit {unit!r} is not a length unit"
        try:
            sizes.append(float(value) * UM_PER_UNIT[unit.lower()])
        except ValueError:
            return None, names, f"the OME PhysicalSize{ax} {value!r} is not a number"
    if min(sizes) <= 0:
        return None, names, f"the OME PhysicalSizeX/Y {sizes} is not positive"
    return mean_mpp(*sizes), names, ""


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
    mpp = mean_mpp(um / xres, um / yres)
    if mpp > SCREEN_MPP_UM:
        what = f"{xres:g} dpi" if unit == 2 else f"{mpp:.4g} µm/px"
        return None, f"the TIFF resolution {what} is a screen default, not a microscope pixel size"
    return mpp, ""
