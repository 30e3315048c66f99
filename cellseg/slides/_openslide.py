"""The OpenSlide backend: DICOM WSI, MIRAX .mrxs, Hamamatsu .vms/.vmu, Ventana .bif, Sakura .svslide, Trestle.

OpenSlide (the `openslide-bin` wheel: no system library needed) reads any region of any pyramid level,
decoding only the tiles it touches, and stitches formats whose tiles overlap (BIF, MIRAX). It hands out
RGBA with alpha 0 where the scanner recorded nothing (outside the scanned area of a MIRAX slide); those
pixels are flattened onto the slide's background colour (white unless the slide says otherwise), which is
what a brightfield slide looks like there, and what the tissue finder treats as glass.

A DICOM slide is a series of files (one per pyramid level, plus label and overview); OpenSlide is given one
of them and finds the rest in the same folder. `slide.sniff` picks that file when the user names the folder.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from ..errors import SlideError
from .base import Slide, SlideInfo, error_text, mean_mpp

log = logging.getLogger(__name__)

BACKEND = "openslide"
# OpenSlide's vendor names -> cellseg's format names (what `cellseg info` and summary.json say)
FORMATS = {"dicom": "dicom", "mirax": "mrxs", "hamamatsu": "hamamatsu-vms", "ventana": "bif", "aperio": "svs",
           "leica": "scn", "philips": "philips-tiff", "sakura": "svslide", "trestle": "trestle-tiff",
           "generic-tiff": "tiff", "synthetic": "synthetic"}
DEFAULT_TILE = 256


class OpenSlideLevel:
    """One OpenSlide pyramid level: regions in its own pixel grid, RGB flattened onto the background."""

    def __init__(self, osr, level: int, downsample: float, background: tuple[int, int, int], chunk: tuple[int, int]):
        self._osr = osr
        self._level = level
        self._downsample = downsample
        self._background = np.asarray(background, np.uint16)
        self.chunk = chunk

    def read(self, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        # OpenSlide places a region by its top-left corner in level-0 pixels, sized in this level's pixels.
        origin = (int(round(c0 * self._downsample)), int(round(r0 * self._downsample)))
        rgba = np.asarray(self._osr.read_region(origin, self._level, (c1 - c0, r1 - r0)))
        return flatten_rgba(rgba, self._background)


def flatten_rgba(rgba: np.ndarray, background) -> np.ndarray:
    """(h, w, C + 1) un-premultiplied colour (or gray) and alpha, uint8 -> (h, w, C) composited onto `background`
    (C values, or one for all)."""
    alpha = rgba[..., -1:]
    if alpha.min() == 255:   # the usual case: scanned everywhere
        return np.ascontiguousarray(rgba[..., :-1])
    a = alpha.astype(np.uint16)
    rgb = (rgba[..., :-1].astype(np.uint16) * a + np.asarray(background, np.uint16) * (255 - a) + 127) // 255
    return rgb.astype(np.uint8)


def open_openslide(path: Path, target: Path) -> Slide:
    """Open `target` (the file OpenSlide reads) for the slide the user named `path` (a file or a DICOM folder)."""
    try:
        import openslide
    except (ImportError, OSError) as e:
        raise SlideError(f"expected OpenSlide to read {path}, but it cannot be loaded ({error_text(e)}); "
                         f"install it with `pip install openslide-python openslide-bin`") from e
    vendor = openslide.OpenSlide.detect_format(str(target))
    if vendor is None:   # e.g. a DICOM file of another modality (CT, a plain photo), not a whole-slide image
        raise SlideError(f"expected a whole-slide image that OpenSlide reads, {path} is not one ({BACKEND} does not "
                         f"recognise {target.name}; a DICOM file must be a VL Whole Slide Microscopy image)")
    what = FORMATS.get(vendor, vendor)
    try:
        osr = openslide.OpenSlide(str(target))
    except (openslide.OpenSlideError, OSError, ValueError) as e:
        raise SlideError(f"expected a readable {what.upper()} slide, {path} is corrupt or incomplete "
                         f"({BACKEND}: {error_text(e)})") from e
    try:
        return _slide(path, target, osr, vendor, openslide.OpenSlideError)
    except BaseException:
        osr.close()
        raise


def _slide(path: Path, target: Path, osr, vendor: str, errors) -> Slide:
    what = FORMATS.get(vendor, vendor)
    props = osr.properties
    background = _background(props.get("openslide.background-color"))
    levels = []
    for k, ((w, h), ds) in enumerate(zip(osr.level_dimensions, osr.level_downsamples)):
        tile = (int(props.get(f"openslide.level[{k}].tile-height", DEFAULT_TILE)),
                int(props.get(f"openslide.level[{k}].tile-width", DEFAULT_TILE)))
        levels.append(OpenSlideLevel(osr, k, float(ds), background, tile))
    sizes = tuple((h, w) for w, h in osr.level_dimensions)
    if not sizes or min(sizes[0]) <= 0:
        raise SlideError(f"expected an image of positive size, {path} has {sizes[:1]} ({BACKEND})")
    # Fail now, not hours into a run: a truncated file often opens (its index is at the start) but its last
    # tiles are gone. Reading the last pixel of every level decodes one tile each.
    for k, (h, w) in enumerate(sizes):
        try:
            levels[k].read(h - 1, w - 1, h, w)
        except (errors, OSError, ValueError) as e:
            raise SlideError(f"expected a complete {what.upper()} slide, {path} is truncated or corrupt: level {k} "
                             f"cannot be read ({BACKEND}: {error_text(e)})") from e
    mpp, source = _mpp(props, what)
    details = [f"OpenSlide vendor {vendor!r}, background {background}"]
    if target != path:
        details.append(f"read through {target.name} (OpenSlide finds the series' other files beside it)")
    if osr.associated_images:
        details.append("associated images: " + ", ".join(sorted(osr.associated_images)))
    info = SlideInfo(path, what, BACKEND, sizes[0][0], sizes[0][1], 3, np.dtype(np.uint8), None, mpp, source,
                     sizes, tuple(details))
    stack = ExitStack()
    stack.callback(osr.close)
    return Slide(info, levels, stack, (errors, OSError, ValueError))


def _background(hex_colour: str | None) -> tuple[int, int, int]:
    try:
        value = int(hex_colour, 16) if hex_colour else 0xFFFFFF
    except ValueError:
        log.warning("ignoring the slide's background colour %r (not RRGGBB)", hex_colour)
        value = 0xFFFFFF
    return (value >> 16) & 255, (value >> 8) & 255, value & 255


def _mpp(props, what: str) -> tuple[float | None, str]:
    try:
        x, y = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
    except (KeyError, ValueError):
        return None, f"none: the {what.upper()} slide has no pixel size (no openslide.mpp-x/-y); pass --mpp"
    if not (x > 0 and y > 0):
        return None, f"none: the {what.upper()} slide's pixel size {x:g} x {y:g} µm is not positive; pass --mpp"
    return mean_mpp(x, y), "openslide"
