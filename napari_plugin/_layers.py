"""napari layer data from a cellseg result folder or a slide file, as plain tuples (no napari import).

A layer data tuple is `(data, kwargs, layer_type)`, what npe2 readers and sample-data commands return.
Coordinates are level-0 slide pixels (row, col), napari's (y, x); `translate` shifts a whole result when
it was counted on a region of a bigger image (see `region.json`, written by the widget).

Layers of a result folder (each optional part only when present):
- the slide: multiscale image from its pyramid levels, lazily (`_lazy.slide_pyramid`); one layer per
  channel for multichannel fluorescence, one RGB layer for brightfield;
- `labels.ome.tif`: multiscale Labels (uint32, lazily, same levels): the nuclei;
- `cell_labels.ome.tif` (when the count grew nuclei into cells): multiscale Labels of the cells, the same ids,
  beneath the nuclei;
- `cells.csv`: Points at the centroids, the whole per-cell table as the layer's `features`;
- `tissue_mask.png`: a translucent image scaled onto the slide.
Every layer's metadata["cellseg"] says what it is (kind), which result folder it came from and where, and which
opening of it (result_id: the layers of a result counted again into the same folder are another result).
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellseg.errors import CellsegError, SlideError
from cellseg.results import RESULT_MARKER
from cellseg.slides import Slide, looks_like_slide, open_slide

from ._lazy import display_range, slide_pyramid

log = logging.getLogger(__name__)

LayerData = tuple  # (data, kwargs, layer_type)
REGION_FILE = "region.json"       # written by the widget when it counted a region of a bigger image
CHANNEL_COLORMAPS = ("blue", "green", "red", "magenta", "cyan", "yellow", "gray")
DEFAULT_POINT_SIZE = 8.0


def find_result_folder(path: str | Path) -> Path | None:
    """The result folder that `path` (the folder itself or its run.json) names, or None."""
    p = Path(path)
    if p.name == "run.json" and p.is_file():
        p = p.parent
    if not p.is_dir():
        return None
    if (p / RESULT_MARKER).is_file() or ((p / "run.json").is_file() and (p / "cells.csv").is_file()):
        return p
    return None


def is_slide_path(path: str | Path) -> bool:
    """A slide file of any format cellseg reads, an OME-Zarr folder or a DICOM slide's folder."""
    return looks_like_slide(path)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", ".cellseg"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


# --------------------------------------------------------------------------- slides

def slide_layers_from(slide: Slide, name: str | None = None, translate=(0.0, 0.0),
                      meta: dict | None = None) -> list[LayerData]:
    """Image layer(s) of an open slide: multiscale when it has several levels (or is big), else one array.

    RGB(A) slides without channel names give one RGB layer; otherwise one layer per channel (additive,
    coloured), or one grayscale layer.
    """
    info = slide.info
    name = name or _stem(info.path)
    rgb = info.n_channels in (3, 4) and not info.channel_names and info.dtype == np.uint8
    base = {"path": str(info.path), "mpp": info.mpp, "levels": [list(s) for s in info.levels], **(meta or {})}
    per_channel: list[int | None] = [None] if rgb or info.n_channels == 1 else list(range(info.n_channels))
    layers = []
    for k, channel in enumerate(per_channel):
        levels = slide_pyramid(slide, channel)
        data = levels if len(levels) > 1 else np.asarray(levels[0])
        label = name if channel is None else f"{name} [{_channel_name(info, channel)}]"
        kwargs = {"name": label, "multiscale": len(levels) > 1, "translate": tuple(translate),
                  "metadata": {"cellseg": {**base, "kind": "slide", "channel": channel}}}
        if rgb:
            kwargs["rgb"] = True
        else:
            kwargs["contrast_limits"] = display_range(levels[-1])
            if len(per_channel) > 1:
                kwargs.update(colormap=CHANNEL_COLORMAPS[k % len(CHANNEL_COLORMAPS)], blending="additive")
        layers.append((data, kwargs, "image"))
    return layers


def _channel_name(info, channel: int) -> str:
    if info.channel_names and len(info.channel_names) == info.n_channels:
        return info.channel_names[channel]
    return f"c{channel}"


def slide_layer_data(path: str | Path, name: str | None = None) -> list[LayerData]:
    """Lazy image layer(s) of a slide in any format cellseg reads (cellseg.slides.opening: TIFF family, DICOM, MRXS, CZI,
    OME-Zarr, PNG, ...), through the same backends as `cellseg count`.

    The slide stays open as long as its layers hold its levels (closed when they are garbage collected). A file of
    several positions (SlideInfo.positions) gives each position's layers, named "NAME #N" after its --series number
    and counted as that image by Count cells; the one the file is opened at shown (the first; a file of a
    multi-file OME-TIFF, its own position), the others hidden, as they lie on one another.
    """
    slide = open_slide(path)
    positions = slide.info.positions
    if not positions:
        return slide_layers_from(slide, name)
    name = name or _stem(Path(path))
    shown = slide.info.series or 0
    layers = []
    for k in positions:
        opened = slide if k == shown else open_slide(path, series=k)
        for data, kwargs, kind in slide_layers_from(opened, f"{name} #{k}", meta={"series": k}):
            layers.append((data, {**kwargs, "visible": k == shown}, kind))
    return layers


# --------------------------------------------------------------------------- result folders

@dataclass
class Result:
    """What a result folder holds, read cheaply (cells.csv whole; images lazily, later)."""

    folder: Path
    run: dict
    summary: dict
    cells: object               # pandas.DataFrame, one row per cell, cells.csv's columns
    slide_path: Path | None       # the counted slide (or the original of a region), when it still exists
    offset: tuple[int, int] = (0, 0)   # level-0 (row, col) of the counted region in slide_path
    series: int | None = None          # the image of a multi-image slide_path counted (--series), None: the first
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return _stem(self.folder)


def load_result(path: str | Path) -> Result:
    """Read a result folder (or its run.json). CellsegError when it is not one."""
    import pandas as pd

    folder = find_result_folder(path)
    if folder is None:
        raise CellsegError(f"expected a cellseg result folder (with run.json and cells.csv) or its run.json, "
                           f"got {path}")
    try:
        run = json.loads((folder / "run.json").read_text(encoding="utf-8"))
        summary_file = folder / "summary.json"
        summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else {}
        cells = pd.read_csv(folder / "cells.csv")
    except (OSError, ValueError) as e:
        raise CellsegError(f"expected a readable result in {folder}: {type(e).__name__}: {e}") from e
    notes: list[str] = []
    offset = (0, 0)
    slide_path = None
    series = run.get("series")
    region_file = folder / REGION_FILE
    if region_file.is_file():
        region = json.loads(region_file.read_text(encoding="utf-8"))
        offset = (int(region["box_px"][0]), int(region["box_px"][1]))
        series = region.get("series")      # the image of the original the region was copied from
        if region.get("slide"):
            slide_path = Path(region["slide"])
        else:
            notes.append("counted on an image layer that has no file; the image is not shown")
    else:
        candidates = [Path(run["slide"])] if run.get("slide") else []
        if summary.get("slide"):       # the result beside its slide, both moved together
            candidates.append(folder.parent / summary["slide"])
        slide_path = next((c for c in candidates if c.is_file()), None)
        if slide_path is None and candidates:
            notes.append(f"the slide {candidates[0]} is missing; showing the results without it")
    if slide_path is not None and not slide_path.is_file():
        notes.append(f"the slide {slide_path} is missing; showing the results without it")
        slide_path = None
    return Result(folder, run, summary, cells, slide_path, offset, series, notes)


def points_layer_data(result: Result, translate=(0.0, 0.0)) -> LayerData:
    """Centroids as Points, the cells.csv table as features (row i = point i)."""
    cells = result.cells
    coords = cells[["centroid_row_px", "centroid_col_px"]].to_numpy(np.float64).reshape(-1, 2)
    diameters = cells["equivalent_diameter_px"].to_numpy(np.float64) if len(cells) else np.zeros(0)
    size = np.clip(np.nan_to_num(diameters * 0.4, nan=DEFAULT_POINT_SIZE), 3.0, None) if len(cells) \
        else DEFAULT_POINT_SIZE
    kwargs = {"name": f"{result.name} cells", "features": cells.reset_index(drop=True), "size": size,
              "face_color": "yellow", "border_width": 0.0, "opacity": 0.8, "translate": tuple(translate),
              "metadata": {"cellseg": {"kind": "cells", "result": str(result.folder),
                                       "mpp": result.summary.get("mpp"), "offset": list(result.offset)}}}
    return coords, kwargs, "points"


# kind -> (file, layer name suffix, opacity): the nuclei, and the cells grown from them (drawn fainter, beneath)
LABEL_IMAGES = {"labels": ("labels.ome.tif", "labels", 0.5), "cell_labels": ("cell_labels.ome.tif", "cell labels", 0.3)}


def labels_layer_data(result: Result, translate=(0.0, 0.0), kind: str = "labels") -> LayerData | None:
    """labels.ome.tif (kind "labels") or cell_labels.ome.tif ("cell_labels") as (multiscale) Labels, read lazily
    level by level; None when the result has no such file."""
    file, suffix, opacity = LABEL_IMAGES[kind]
    path = result.folder / file
    if not path.is_file():
        return None
    labels = open_slide(path)
    levels = slide_pyramid(labels, 0)
    data = levels if len(levels) > 1 else np.asarray(levels[0])
    kwargs = {"name": f"{result.name} {suffix}", "multiscale": len(levels) > 1, "opacity": opacity,
              "translate": tuple(translate),
              "metadata": {"cellseg": {"kind": kind, "result": str(result.folder), "path": str(path)}}}
    return data, kwargs, "labels"


def tissue_layer_data(result: Result, translate=(0.0, 0.0)) -> LayerData | None:
    """tissue_mask.png (a low-resolution mask of the counted image) scaled onto it, when there is one."""
    path = result.folder / "tissue_mask.png"
    if not path.is_file():
        return None
    from PIL import Image
    with Image.open(path) as im:
        mask = np.asarray(im.convert("L")) > 0
    summary = result.summary
    shape = (int(summary.get("height_px") or mask.shape[0]), int(summary.get("width_px") or mask.shape[1]))
    scale = (shape[0] / mask.shape[0], shape[1] / mask.shape[1])
    # mask pixel j covers slide pixels [j*s, (j+1)*s): its centre is at j*s + (s-1)/2
    shift = tuple(t + (s - 1) / 2 for t, s in zip(translate, scale))
    kwargs = {"name": f"{result.name} tissue", "scale": scale, "translate": shift, "opacity": 0.25,
              "colormap": "green", "blending": "additive", "contrast_limits": (0, 1),
              "metadata": {"cellseg": {"kind": "tissue", "result": str(result.folder), "path": str(path)}}}
    return mask.astype(np.uint8), kwargs, "image"


def result_layer_data(path: str | Path, with_slide: bool = True, translate=None) -> list[LayerData]:
    """All layers of a result folder: slide (lazy multiscale), tissue mask, cell labels when there are (lazy
    multiscale), labels (lazy multiscale), cells (points).

    translate: where the result's (0, 0) lies in the viewer; default: its region offset (0, 0 for a whole
    slide). with_slide=False leaves the slide out (it is already in the viewer).
    """
    result = load_result(path)
    for note in result.notes if with_slide else ():
        log.warning("%s: %s", result.folder, note)
    offset = tuple(float(v) for v in (translate if translate is not None else result.offset))
    layers: list[LayerData] = []
    if with_slide and result.slide_path is not None:
        try:
            slide = open_slide(result.slide_path, z=result.run.get("z"),     # a Z-stack as it was counted
                               series=result.series, t=result.run.get("t"))
        except SlideError as e:
            log.warning("%s: cannot show the slide: %s", result.folder, e)
        else:   # a region's result sits at its offset on the whole slide
            slide_translate = tuple(o - r for o, r in zip(offset, result.offset))
            layers += slide_layers_from(slide, translate=slide_translate, meta={"result": str(result.folder)})
    labels = [labels_layer_data(result, offset, kind) for kind in ("cell_labels", "labels")]
    tissue = tissue_layer_data(result, offset)
    layers += [layer for layer in (tissue, *labels) if layer is not None]
    layers.append(points_layer_data(result, offset))
    result_id = uuid.uuid4().hex
    for _, kwargs, _ in layers:
        kwargs["metadata"]["cellseg"]["result_id"] = result_id
    return layers
