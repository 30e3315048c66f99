"""The zarr backend: OME-Zarr (NGFF 0.4 on zarr v2, 0.5 on zarr v3) image folders, read through zarr itself.

The NGFF `multiscales` metadata lists the pyramid (one zarr array per level, largest first), names the axes
(t, c, z, y, x) and gives each level's scale; the first level's y/x scale with the axes' units is the pixel
size. `omero.channels[].label` names the channels. A bioformats2raw folder (series 0, 1, ...) is read at
series 0. Missing chunks are the array's fill value, as zarr defines them; damaged ones are errors.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import zarr

from ..errors import SlideError
from .base import (
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

BACKEND = "zarr"
# zarr and its codecs (numcodecs, zstd, blosc) raise these for damaged chunks and metadata.
READ_ERRORS = (ValueError, RuntimeError, OSError, KeyError, TypeError, IndexError)
_DEFAULT_AXES = "tczyx"   # NGFF 0.1/0.2 had no axes metadata: always 5-D in this order


def open_ome_zarr(path: Path, folder: Path, z: int | str | None = None, series: int | None = None,
                  t: int | None = None) -> Slide:
    """The OME-Zarr image in `folder` (`path`: what the user named); `z` (base.z_choice): what of a Z-stack to read;
    `series` (base.series_choice): which series of a bioformats2raw folder, the first (0) if None; `t`
    (base.t_choice): which time point of a time series."""
    try:
        group = zarr.open_group(str(folder), mode="r")
        attrs = group.attrs.asdict()
    except READ_ERRORS as e:   # zarr's GroupNotFoundError and json's JSONDecodeError are ValueErrors
        raise SlideError(f"expected an OME-Zarr folder with readable metadata, {path} is corrupt ({BACKEND}: "
                         f"{error_text(e)})") from e
    ome = attrs.get("ome", attrs)   # 0.5 nests the metadata under "ome"
    details = [f"zarr v{group.metadata.zarr_format}"]
    warnings: tuple[str, ...] = ()
    positions: tuple[int, ...] = ()
    if "multiscales" not in ome and "bioformats2raw.layout" in ome and "0" in group:
        count = 1
        while str(count) in group:      # the series are the folders 0, 1, ... in order
            count += 1
        check_series(series, count)
        index = series or 0
        log.info("%s is a bioformats2raw folder of %d series; reading series %d", path.name, count, index)
        details.append(f"bioformats2raw layout: series {index} of 0-{count - 1}")
        root, group = group, group[str(index)]
        attrs = group.attrs.asdict()
        ome = attrs.get("ome", attrs)
        alike = _series_alike(root, _level0(group, ome))
        if len(alike) > 1:
            positions = tuple(alike)
            if series is None:
                warnings = (other_images_warning(path, [f"series {k}" for k in alike], "bioformats2raw series",
                                                 alike[0], alike[-1]),)
    else:
        check_series(series, 1)
    if "multiscales" not in ome:
        kind = "an HCS plate" if "plate" in ome else "a well" if "well" in ome else "no multiscale image"
        raise SlideError(f"expected OME-Zarr multiscales metadata (an NGFF image), {path} holds {kind}; "
                         f"name the image's own folder (e.g. plate/A/1/0)")
    try:
        return _open(path, group, ome, details, (z, t), warnings, series, positions)
    except (*READ_ERRORS, AttributeError) as e:
        raise SlideError(f"expected valid OME-Zarr multiscales metadata in {path} ({BACKEND}: "
                         f"{error_text(e)})") from e


def _open(path: Path, group, ome: dict, details: list[str], plane: tuple[int | str | None, int | None],
          warnings: tuple[str, ...], series: int | None, positions: tuple[int, ...]) -> Slide:
    z, t = plane     # what of a Z-stack and which time point are read (base.z_choice, base.t_choice)
    ms = ome["multiscales"][0]
    version = ome.get("version") or ms.get("version", "?")
    details.insert(0, f"NGFF {version}, {len(ms['datasets'])} level(s): " + ", ".join(d["path"] for d in ms["datasets"]))
    axes_meta = ms.get("axes") or list(_DEFAULT_AXES)
    names = [(a["name"] if isinstance(a, dict) else str(a)).lower() for a in axes_meta]
    if set(names) - set(_DEFAULT_AXES) or "x" not in names or "y" not in names:
        raise SlideError(f"expected OME-Zarr axes among t, c, z, y, x with y and x, {path} has {names}")
    axes = "".join(n.upper() for n in names)
    arrays = [group[d["path"]] for d in ms["datasets"]]
    first = arrays[0]
    if 0 in first.shape or len(first.shape) != len(axes):
        raise SlideError(f"expected a non-empty array with one dimension per axis ({axes}), {path} level 0 has "
                         f"shape {first.shape}")
    if np.dtype(first.dtype).kind not in "biuf":
        raise SlideError(f"expected integer or float pixels, {path} has {first.dtype}")
    channel_axis = find_channel_axis(axes, first.shape, z, t)
    levels, sizes = [], []
    for k, arr in enumerate(arrays):
        other = [(ax, n) for ax, n in zip(axes, arr.shape) if ax not in "YX"]
        if other != [(ax, n) for ax, n in zip(axes, first.shape) if ax not in "YX"] or arr.dtype != first.dtype:
            log.warning("%s: level %d has shape %s unlike level 0 (%s); ignoring it and smaller levels",
                        path.name, k, arr.shape, first.shape)
            break
        shape, chunks = dict(zip(axes, arr.shape)), dict(zip(axes, arr.chunks))
        levels.append(ArrayLevel(arr, axes, channel_axis, (chunks["Y"], chunks["X"]), z, t))
        sizes.append((shape["Y"], shape["X"]))
    n_channels = dict(zip(axes, first.shape))[channel_axis] if channel_axis else 1
    planes = dict(zip(axes, first.shape)).get("Z", 1)
    points = dict(zip(axes, first.shape)).get("T", 1)
    mpp, source = _mpp(ms, axes_meta, names)
    info = SlideInfo(path, "ome-zarr", BACKEND, sizes[0][0], sizes[0][1], n_channels,
                     np.dtype(first.dtype).newbyteorder("="), _channel_names(ome, n_channels), mpp, source,
                     tuple(sizes), tuple(details), z_planes=planes, z=z if planes > 1 else None, warnings=warnings,
                     series=series, positions=positions, t_points=points, t=t if points > 1 else None)
    return Slide(info, levels, None, READ_ERRORS)


def _level0(group, ome: dict):
    """A multiscale image group's first level (array), or None where its metadata or array cannot be read."""
    try:
        return group[ome["multiscales"][0]["datasets"][0]["path"]]
    except (*READ_ERRORS, AttributeError):
        return None


def _series_alike(root, first) -> list[int]:
    """The bioformats2raw series (0, 1, ...) like series 0 (`first`, its level 0): the same shape but for y and x,
    the same pixel type, within 4x of its size each way; not its label or overview images."""
    if first is None:
        return []
    alike = []
    for k in range(10_000):
        if str(k) not in root:
            break
        try:
            attrs = root[str(k)].attrs.asdict()
        except (*READ_ERRORS, AttributeError):
            continue
        level0 = _level0(root[str(k)], attrs.get("ome", attrs))
        if level0 is not None and level0.dtype == first.dtype and len(level0.shape) == len(first.shape) \
                and level0.shape[:-2] == first.shape[:-2] \
                and all(b / 4 <= a <= 4 * b for a, b in zip(level0.shape[-2:], first.shape[-2:])):
            alike.append(k)
    return alike


def _mpp(ms: dict, axes_meta: list, names: list[str]) -> tuple[float | None, str]:
    """y/x scale of level 0 (times any multiscale-wide scale) in the axes' units, as µm per pixel."""
    scale = np.ones(len(names))
    for transforms in (ms["datasets"][0].get("coordinateTransformations", []), ms.get("coordinateTransformations", [])):
        for t in transforms or []:
            if t.get("type") == "scale" and "scale" in t:
                scale = scale * np.asarray(t["scale"], float)
    sizes = []
    for ax in "yx":
        i = names.index(ax)
        unit = str(axes_meta[i].get("unit", "")).lower() if isinstance(axes_meta[i], dict) else ""
        if unit not in UM_PER_UNIT:
            why = f"the OME-Zarr {ax} axis unit is {unit!r}, not a length" if unit else f"the OME-Zarr {ax} axis has no unit"
            return None, f"none: {why}; pass --mpp"
        sizes.append(float(scale[i]) * UM_PER_UNIT[unit])
    if min(sizes) <= 0:
        return None, f"none: the OME-Zarr scale {sizes} is not positive; pass --mpp"
    return mean_mpp(sizes[1], sizes[0]), "ome-zarr"


def _channel_names(ome: dict, n: int) -> tuple[str, ...] | None:
    channels = (ome.get("omero") or {}).get("channels") or []
    names = [c.get("label") for c in channels if isinstance(c, dict)]
    return tuple(str(x) for x in names) if len(names) == n and all(names) else None
