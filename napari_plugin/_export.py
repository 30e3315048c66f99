"""Corrected fields as training data: COCO instance JSON + the image crops, what `cellseg train --data` reads.

A field is a box of an image whose nuclei the user corrected in napari: its pixels and its label image (0 =
background), the same (h, w). `export_coco` writes, into a folder:

    annotations.json     COCO instances: one image per field, one annotation per nucleus (compressed RLE, the
                         masks cut at the field's border), category "nucleus"; file_name relative to the JSON
    images/NAME.png      the field's pixels: gray 8 or 16 bit, or RGB 8 bit

Each field's nuclei are numbered 1..n in the order of their label ids, and annotations follow that order, so
decoding them gives back the painted labels relabelled consecutively (the round trip the tests check).
No Qt, no napari: the widget gathers the fields from its layers.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellseg.errors import CellsegError, ParameterError
from cellseg.geometry import Box

log = logging.getLogger(__name__)

ANNOTATIONS = "annotations.json"
IMAGES = "images"
MAX_FIELD_PX = 4096 * 4096     # a field is a copy in memory (uint32 labels): 64 MB at most
CATEGORY = "nucleus"


@dataclass
class Field:
    """One corrected field: its pixels (h, w) or (h, w, 3), its labels (h, w) and where it came from."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    source: str = ""                       # the image layer (or slide file) it was cut from
    box_px: tuple[int, int, int, int] | None = None   # (row0, col0, row1, col1) in that image's level-0 px
    mpp: float | None = None


@dataclass
class Exported:
    """What export_coco wrote."""

    annotations: Path
    fields: int
    nuclei: int
    pieces: list[str] = field(default_factory=list)   # "field: label k in n pieces": one id, several blobs
    mpp: float | None = None                          # the fields' pixel size, when they share one


def crop(data, box: Box) -> np.ndarray:
    """`data[box]` of a 2-D (or (h, w, C)) array-like (numpy, dask, LazyLevel), as numpy; the parts of `box`
    outside the array are zeros (a field drawn over the edge of a result's labels)."""
    h, w = data.shape[:2]
    out = np.zeros((box.height, box.width, *data.shape[2:]), np.dtype(data.dtype))
    r0, c0, r1, c1 = max(box.row0, 0), max(box.col0, 0), min(box.row1, h), min(box.col1, w)
    if r0 < r1 and c0 < c1:
        out[r0 - box.row0:r1 - box.row0, c0 - box.col0:c1 - box.col0] = np.asarray(data[r0:r1, c0:c1])
    return out


def check_field_size(box: Box) -> None:
    if box.height * box.width > MAX_FIELD_PX:
        raise ParameterError(f"expected a field of at most {MAX_FIELD_PX:,} px to correct, got {box.height} x "
                             f"{box.width} px: draw smaller rectangles")


def png_pixels(image: np.ndarray) -> np.ndarray:
    """A field's pixels as a PNG holds them: gray uint8/uint16 and RGB uint8 kept; any other gray image
    (float, int32, bool) rescaled over its range to uint16, RGB to uint8. (cellseg normalises each training
    image over its own intensity range, so the rescaling changes nothing it learns from.)"""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ParameterError(f"expected a gray (h, w) or RGB (h, w, 3) field, got pixels of shape {image.shape}")
    keep = (np.uint8, np.uint16) if image.ndim == 2 else (np.uint8,)
    if image.dtype in keep:
        return image
    target = np.uint16 if image.ndim == 2 else np.uint8
    values = image.astype(np.float64)
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    scaled = np.clip((np.nan_to_num(values, nan=lo) - lo) / ((hi - lo) or 1.0), 0, 1)
    return np.round(scaled * np.iinfo(target).max).astype(target)


def safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "field"


def field_annotations(labels: np.ndarray, image_id: int, first_id: int) -> list[dict]:
    """COCO annotations of one field's nuclei: numbered in the order of their label ids, compressed RLE."""
    from scipy import ndimage as ndi

    from cellseg.results import crop_rles
    labels = np.asarray(labels)
    h, w = labels.shape
    ids = np.unique(labels)
    ids = ids[ids > 0]
    slices = ndi.find_objects(labels.astype(np.int64)) if ids.size else []
    crops, rows, cols, boxes = [], [], [], []
    for k in ids:
        rs, cs = slices[int(k) - 1]
        crops.append(labels[rs, cs] == k)
        rows.append(rs.start)
        cols.append(cs.start)
        boxes.append((rs.start, cs.start, rs.stop, cs.stop))
    rles = crop_rles(crops, rows, cols, h, w) if crops else []
    anns = []
    for n, (rle, mask, (r0, c0, r1, c1)) in enumerate(zip(rles, crops, boxes)):
        anns.append({"id": first_id + n, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                     "segmentation": rle, "area": int(mask.sum()),
                     "bbox": [float(c0), float(r0), float(c1 - c0), float(r1 - r0)]})   # COCO: x, y, w, h
    return anns


def pieces_of(labels: np.ndarray) -> list[tuple[int, int]]:
    """(label, pieces) of each nucleus that is in more than one 8-connected piece (an erasure that cut it)."""
    from scipy import ndimage as ndi
    labels = np.asarray(labels)
    out = []
    for k, sl in enumerate(ndi.find_objects(labels.astype(np.int64)) or [], start=1):
        if sl is None:
            continue
        _, n = ndi.label(labels[sl] == k, structure=np.ones((3, 3)))
        if n > 1:
            out.append((k, n))
    return out


def export_coco(fields: list[Field], folder: str | Path) -> Exported:
    """Write `fields` as COCO + PNG crops into `folder` (new, empty, or a previous export, which is replaced).

    ParameterError for a field whose labels and pixels differ in size, or a folder holding other things.
    """
    from PIL import Image

    folder = Path(folder)
    if not fields:
        raise ParameterError("expected at least one corrected field to export, got none (press 'Edit fields' first)")
    names = [safe_name(f.name) for f in fields]
    if len(set(names)) != len(names):
        raise ParameterError(f"expected fields with distinct names, got {names}")
    for f in fields:
        if np.asarray(f.labels).ndim != 2 or f.labels.shape[:2] != f.image.shape[:2]:
            raise ParameterError(f"expected the labels of field {f.name!r} to be the size of its pixels, got "
                                 f"{f.labels.shape} and {f.image.shape}")
    if folder.exists() and any(folder.iterdir()) and not (folder / ANNOTATIONS).is_file():
        raise CellsegError(f"expected a new or empty folder (or a previous export) to write the corrections to, "
                           f"{folder} holds other files")
    shutil.rmtree(folder / IMAGES, ignore_errors=True)
    (folder / IMAGES).mkdir(parents=True, exist_ok=True)
    images, anns, pieces = [], [], []
    for image_id, (f, name) in enumerate(zip(fields, names), start=1):
        file_name = f"{IMAGES}/{name}.png"
        Image.fromarray(png_pixels(f.image)).save(folder / file_name)
        h, w = f.labels.shape
        entry = {"id": image_id, "file_name": file_name, "height": int(h), "width": int(w)}
        if f.source or f.box_px is not None:
            entry["cellseg_source"] = {"image": f.source, "box_px": [int(v) for v in f.box_px or ()], "mpp": f.mpp}
        images.append(entry)
        anns += field_annotations(f.labels, image_id, len(anns) + 1)
        pieces += [f"{f.name}: label {k} in {n} pieces" for k, n in pieces_of(f.labels)]
    coco = {"info": {"description": "nuclei corrected in napari (cellseg)"},
            "images": images, "annotations": anns, "categories": [{"id": 1, "name": CATEGORY}]}
    path = folder / ANNOTATIONS
    path.write_text(json.dumps(coco), encoding="utf-8")
    mpps = {f.mpp for f in fields}
    log.info("exported %d fields, %d nuclei to %s", len(fields), len(anns), path)
    return Exported(path, len(fields), len(anns), pieces, mpps.pop() if len(mpps) == 1 else None)
