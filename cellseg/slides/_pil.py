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


def _flattened(pixels: np.ndarray, path: Path) -> np.ndarray:
    """An image with alpha (h, w, C + 1) as (h, w, C): transparent pixels take the colour of the image's own ground,
    white when its opaque pixels are mostly light (brightfield: glass), black when mostly dark (fluorescence), as
    OpenSlide's unscanned areas become the slide's background (_openslide.flatten_rgba). Measured as black, a
    transparent margin read as dark tissue and its stain."""
    from ._openslide import flatten_rgba
    alpha = pixels[..., -1]
    if alpha.min() == 255:
        return np.ascontiguousarray(pixels[..., :-1])
    opaque = pixels[..., :-1][alpha == 255]
    ground = 255 if opaque.size and float(np.median(opaque)) > 127 else 0
    log.info("%s: %.1f %% of it is (partly) transparent: laid on %s", path.name, 100 * float(np.mean(alpha < 255)),
             "white" if ground else "black")
    return flatten_rgba(pixels, ground)


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
        return _flattened(np.asarray(im.convert("LA" if im.mode == "LA" else "RGBA")), path)
    convert = {"1": "L", "P": "RGB", "LA": "L", "CMYK": "RGB",
               "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}
    if im.mode in convert:
        im = im.convert(convert[im.mode])
    return np.asarray(im)
