"""Open any supported slide lazily, whatever its format: `open_slide` picks the backend and returns a `Slide`.

One `Slide` interface (slide_base) over several backends, each a well-kept library, chosen by what the file is
(its first bytes, or a folder's layout), not by its name:

| backend | module | formats |
|---|---|---|
| tifffile | slide_tiff | TIFF, BigTIFF, OME-TIFF, ImageJ, SVS, NDPI, SCN, QPTIFF, Philips TIFF |
| OpenSlide | slide_openslide | DICOM WSI (a file of the series or its folder), MIRAX .mrxs, Hamamatsu .vms/.vmu, Ventana .bif, Sakura .svslide, Trestle |
| pylibCZIrw | slide_czi | Zeiss .czi (brightfield and fluorescence, every scene) |
| zarr | slide_zarr | OME-Zarr (NGFF) folders |
| Pillow | slide_pil | PNG, JPEG (decoded whole, up to MAX_PIL_PIXELS) |

tifffile stays first for the TIFFs it reads; a TIFF that OpenSlide knows to need stitching (Ventana BIF,
Trestle: overlapping tiles) goes to OpenSlide. Backends are imported only when a slide needs them. Imports go one
way: this module imports the backends, the backends import slide_base, never this module.

The reading contract (coordinates, dtypes, errors) is slide_base's. `Slide` and `SlideInfo` are named here too:
they are what callers of open_slide hold.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

from ..errors import ParameterError, SlideError
from .base import (
    Slide,
    SlideInfo,
    check_plane,
    check_series,
    check_time,
    error_text,
    series_choice,
    t_choice,
    z_choice,
    z_text,
)

__all__ = ["Slide", "SlideInfo", "looks_like_slide", "open_slide", "sniff"]   # what callers use; the rest is sniffing

log = logging.getLogger(__name__)

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


def open_slide(path: str | Path, mpp: float | None = None, skip_unreadable: bool = False,
               z: int | str | None = None, series: int | None = None, t: int | None = None) -> Slide:
    """Open a slide lazily: a file, or a folder (OME-Zarr, a DICOM series). `mpp` (µm per pixel) overrides
    the file's pixel size; skip_unreadable: damaged pixel data reads as zeros and is listed (Slide); `z`: what of
    a Z-stack is read, one plane counted from 1 or a projection of them all, "max" or "mean" (a 2-D image reads as
    it is; a stack without `z` is refused, saying so); `series`: which image of a file holding several (an
    OME-TIFF's positions, a bioformats2raw folder's series), counted from 0; the first if None, with a warning in
    SlideInfo.warnings naming the others; `t`: which time point of a time series, counted from 1 (a time series
    without it is refused, saying so)."""
    z, series, t = z_choice(z), series_choice(series), t_choice(t)
    if mpp is not None:
        if isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or not math.isfinite(mpp) or mpp <= 0:
            raise ParameterError(f"expected --mpp > 0 (µm per pixel), got {mpp!r}")
    path = Path(path)
    kind, target = sniff(path)
    if kind == "tiff":
        from ._tiff import open_tiff
        slide = open_tiff(path, z, series, t)
    elif kind == "zarr":
        from ._zarr import open_ome_zarr
        slide = open_ome_zarr(path, target, z, series, t)
    else:
        check_series(series, 1)     # these formats hold one image (a CZI's scenes are all read, in place)
        if kind in ("openslide", "dicom-folder"):
            from ._openslide import open_openslide
            slide = open_openslide(path, target)
        elif kind == "czi":
            from ._czi import open_czi
            slide = open_czi(path, z, t)
        else:
            from ._pil import open_pil
            slide = open_pil(path)
        slide.info = dataclasses.replace(slide.info, series=series)
    try:    # for every backend: a 2-D image has plane 1 only, one without time points point 1 (--z 2, --t 2 on it)
        check_plane(z, slide.info.z_planes)
        check_time(t, slide.info.t_points)
    except ParameterError:
        slide.close()
        raise
    if mpp is not None:
        if slide.info.mpp is not None and abs(slide.info.mpp - mpp) > 1e-6 * mpp:
            log.info("%s: overriding the file's pixel size %.4g µm with %.4g µm", path.name,
                     slide.info.mpp, mpp)
        slide.info = dataclasses.replace(slide.info, mpp=float(mpp), mpp_source="override")
    slide.skip_unreadable = bool(skip_unreadable)
    i = slide.info
    log.info("opened %s: %s (%s) %dx%d px, %d channel(s) %s, mpp %s (%s), %d level(s)%s%s%s", path.name, i.format,
             i.backend, i.height, i.width, i.n_channels, i.dtype, i.mpp, i.mpp_source, len(i.levels),
             f", {z_text(i.z, i.z_planes)}" if i.z_planes > 1 else "",
             f", image {i.series} of the file" if i.series is not None else "",
             f", time point {i.t} of {i.t_points}" if i.t is not None else "")
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
