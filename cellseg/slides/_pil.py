"""The Pillow backend: PNG and JPEG, decoded whole (up to MAX_PIL_PIXELS) and held as one array level."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import SlideError
from .base import SCREEN_MPP_UM, ArrayLevel, Slide, SlideInfo, error_text, mean_mpp

log = logging.getLogger(__name__)

BACKEND = "pillow"
MAX_PIL_PIXELS = 1_000_000_000  # PNG/JPEG are decoded whole: 1 Gpx RGB is 3 GB of RAM
# PIL raises SyntaxError for a broken PNG; imagecodecs (16-bit colour PNG) RuntimeError subclasses.
_PIL_ERRORS = (OSError, ValueError, SyntaxError, RuntimeError, Image.DecompressionBombError)


def open_pil(path: Path) -> Slide:
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
    info = SlideInfo(path, fmt, BACKEND, arr.shape[0], arr.shape[1], arr.shape[2], arr.dtype, None, mpp, source,
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
