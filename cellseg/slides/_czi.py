"""The pylibCZIrw backend (Zeiss's own libCZI): Zeiss .czi slides, brightfield and multichannel fluorescence.

A CZI holds subblocks placed in one plane coordinate system (which may start at negative coordinates);
scenes are regions of that plane (e.g. the tissue sections of one slide). cellseg reads the bounding
rectangle of every scene in place, so results keep the slide's own geometry and the gaps between scenes
are background (white for brightfield, 0 for fluorescence) that the tissue finder skips.

Pyramid levels are the subblock pyramids the scanner wrote (factors found in the subblock directory);
libCZI composes a region at a level from them. A CZI without pyramid subblocks has one level.
Brightfield pixels are stored BGR and come back RGB; fluorescence channels are separate planes, stacked
channel-last, named from the metadata.
"""

from __future__ import annotations

import logging
import threading
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from ..errors import SlideError, TimeSeriesError, ZStackError
from .base import (
    STACK_HINT,
    TIME_HINT,
    Slide,
    SlideInfo,
    check_plane,
    check_time,
    error_text,
    mean_mpp,
    projected,
)

log = logging.getLogger(__name__)

BACKEND = "pylibCZIrw"
_DTYPES = {"Gray8": np.uint8, "Gray16": np.uint16, "Gray32Float": np.float32,
           "Bgr24": np.uint8, "Bgr48": np.uint16, "Bgr96Float": np.float32}
# libCZI raises RuntimeError (with its own message) for damaged subblocks and files; bad arguments ValueError.
READ_ERRORS = (RuntimeError, ValueError, OSError, KeyError, IndexError)


class CziLevel:
    """One pyramid level (factor f): a region of it is the level-0 rectangle f times larger, zoomed by 1/f."""

    def __init__(self, reader, lock: threading.Lock, origin: tuple[int, int], factor: int, channels: int,
                 rgb: bool, chunk: tuple[int, int], planes: tuple[dict, ...] = ({},),
                 projection: str | None = None):
        self._reader = reader
        # the planes read (libCZI's Z and T indices, {} for a 2-D file), and how several become one ("max", "mean")
        self._planes, self._projection = planes, projection
        self._lock = lock
        self._x0, self._y0 = origin
        self._factor = factor
        self._channels = channels
        self._rgb = rgb
        self._background = (1.0, 1.0, 1.0) if rgb else (0.0, 0.0, 0.0)
        self.chunk = chunk

    def read(self, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        f = self._factor
        roi = (self._x0 + c0 * f, self._y0 + r0 * f, (c1 - c0) * f, (r1 - r0) * f)
        zoom = 1.0 / f if f > 1 else None
        with self._lock:   # one libCZI accessor per file: reads are serialised
            planes = [np.concatenate([self._reader.read(roi=roi, plane={"C": c, **plane}, zoom=zoom,
                                                        background_pixel=self._background)
                                      for c in range(self._channels)], axis=-1) for plane in self._planes]
        # one plane (a 2-D file, or --z N) as read; several (a projection) made one
        data = projected(np.stack(planes), 0, self._projection) if len(planes) > 1 else planes[0]
        if self._rgb:
            data = data[..., ::-1]    # BGR -> RGB
        return np.ascontiguousarray(_exact(data, r1 - r0, c1 - c0))


def _exact(data: np.ndarray, h: int, w: int) -> np.ndarray:
    """libCZI's zoomed size can be a pixel short (it floors); repeat the last row/column to the exact size."""
    if data.shape[:2] == (h, w):
        return data
    data = data[:h, :w]
    return np.pad(data, ((0, h - data.shape[0]), (0, w - data.shape[1]), (0, 0)), mode="edge")


def open_czi(path: Path, z: int | str | None = None, t: int | None = None) -> Slide:
    """The CZI at `path`; `z` (base.z_choice): what of a Z-stack to read; `t` (base.t_choice): which time point."""
    try:
        from pylibCZIrw import czi as pyczi
    except ImportError as e:
        raise SlideError(f"expected pylibCZIrw to read the CZI {path}, but it is not installed ({error_text(e)}); "
                         f"install it with `pip install pylibCZIrw`") from e
    with ExitStack() as stack:
        try:
            reader = pyczi.CziReader(str(path))
            stack.callback(reader.close)
            box = reader.total_bounding_rectangle_no_pyramid
            dims = reader.total_bounding_box_no_pyramid
            pixel_types = reader.pixel_types
            metadata = reader.metadata.get("ImageDocument", {}).get("Metadata", {}) or {}
            factors = pyramid_factors(reader)
            scenes = reader.scenes_bounding_rectangle_no_pyramid
        except READ_ERRORS + (AttributeError, TypeError) as e:
            raise SlideError(f"expected a readable CZI, {path} is corrupt or truncated ({BACKEND}: "
                             f"{error_text(e)})") from e
        extra = {ax: hi - lo for ax, (lo, hi) in dims.items() if ax not in "XYC" and hi - lo > 1
                 and not (ax == "Z" and z is not None) and not (ax == "T" and t is not None)}
        if extra:
            hint = TIME_HINT if "T" in extra else STACK_HINT if "Z" in extra else ""
            error = TimeSeriesError if "T" in extra else ZStackError if "Z" in extra else SlideError
            raise error(f"expected a 2-D CZI (Y, X) with optional channels, {path} has "
                             f"{', '.join(f'{ax}={n}' for ax, n in extra.items())}{hint}")
        if box.w <= 0 or box.h <= 0:
            raise SlideError(f"expected an image of positive size, {path} has {box.h} x {box.w} px ({BACKEND})")
        types = set(pixel_types.values())
        n_c = dims.get("C", (0, 1))[1] - dims.get("C", (0, 1))[0]
        if len(types) != 1 or next(iter(types)) not in _DTYPES:
            raise SlideError(f"expected one gray or BGR pixel type for every channel, {path} has {pixel_types}")
        pixel_type = next(iter(types))
        rgb = pixel_type.startswith("Bgr")
        if rgb and n_c > 1:
            raise SlideError(f"expected either one colour (BGR) channel or gray channels, {path} has {n_c} "
                             f"{pixel_type} channels")
        mpp, source = _mpp(metadata)
        names = None if rgb else _channel_names(metadata, n_c)
        lock = threading.Lock()
        chunk = (1024, 1024)
        z0, z1 = dims.get("Z", (0, 1))
        t0, t1 = dims.get("T", (0, 1))
        check_plane(z, z1 - z0)
        check_time(t, t1 - t0)
        at = {"T": t0 + (t or 1) - 1} if "T" in dims else {}
        planes = (({**at},) if "Z" not in dims else tuple({**at, "Z": k} for k in range(z0, z1)) if isinstance(z, str)
                  else ({**at, "Z": z0 + (z or 1) - 1},))
        projection = z if isinstance(z, str) and z1 - z0 > 1 else None
        levels = [CziLevel(reader, lock, (box.x, box.y), f, n_c, rgb, chunk, planes, projection) for f in factors]
        sizes = tuple((max(1, box.h // f), max(1, box.w // f)) for f in factors)
        details = [f"plane origin (x, y) = ({box.x}, {box.y}); pyramid factors {list(factors)}"]
        if len(scenes) > 1:
            details.append(f"{len(scenes)} scenes read in place: " + "; ".join(
                f"#{k} {r.h} x {r.w} px at row {r.y - box.y}, col {r.x - box.x}" for k, r in sorted(scenes.items())))
        info = SlideInfo(path, "czi", BACKEND, box.h, box.w, 3 if rgb else n_c,
                         np.dtype(_DTYPES[pixel_type]), names, mpp, source, sizes, tuple(details),
                         z_planes=z1 - z0, z=z if z1 - z0 > 1 else None, t_points=t1 - t0,
                         t=t if t1 - t0 > 1 else None)
        return Slide(info, levels, stack.pop_all(), READ_ERRORS)


def pyramid_factors(reader) -> tuple[int, ...]:
    """Downsampling factors of the subblock pyramid (1 first): each subblock's logical / physical width."""
    factors = {1}

    def visit(_index, info) -> bool:
        if info.physicalSize.w > 0:
            factors.add(max(1, round(info.logicalRect.w / info.physicalSize.w)))
        return True
    reader.enumerate_subblocks(visit)
    return tuple(sorted(factors))


def _as_list(value) -> list:
    return value if isinstance(value, list) else [] if value is None else [value]


def _mpp(metadata: dict) -> tuple[float | None, str]:
    """Scaling/Items/Distance X and Y, stored in metres per pixel."""
    distances = {d.get("@Id"): d.get("Value") for d in _as_list((metadata.get("Scaling") or {}).get("Items", {})
                                                                 .get("Distance")) if isinstance(d, dict)}
    try:
        x, y = float(distances["X"]) * 1e6, float(distances["Y"]) * 1e6
    except (KeyError, TypeError, ValueError):
        return None, "none: the CZI metadata has no Scaling/Items/Distance for X and Y; pass --mpp"
    if not (x > 0 and y > 0):
        return None, f"none: the CZI scaling {x:g} x {y:g} µm is not positive; pass --mpp"
    return mean_mpp(x, y), "czi"


def _channel_names(metadata: dict, n: int) -> tuple[str, ...] | None:
    image = (metadata.get("Information") or {}).get("Image") or {}
    channels = _as_list(((image.get("Dimensions") or {}).get("Channels") or {}).get("Channel"))
    names = [c.get("@Name") for c in channels if isinstance(c, dict)]
    return tuple(names) if len(names) == n and all(names) else None
