"""Annotated images given as a folder of images with their annotations, the way Cellpose, StarDist, QuPath's and
napari's exports leave them, instead of a COCO file (`cellseg train --data/--val FOLDER`).

Two layouts, decided by the folder:
- `images/` beside `labels/` or `masks/`: each image pairs with the label image of the same stem (or the stem with a
  label tag, below), as StarDist's training folders and its QuPath export script write them;
- one folder: each label image is named after its image with a tag, `NAME_masks.png` (Cellpose), `NAME_cp_masks.png`,
  `NAME-labels.png` (QuPath), `NAME_labels.tif`, `NAME_label(l)ed.tif`, ...; or an image (a field or a whole slide)
  has QuPath's exported objects beside it, `NAME.geojson` or `NAME.svs.geojson`. Images without either are left
  out, and said.

A label image holds one channel of whole numbers: 0 background, each other value one nucleus (a palette PNG's
indices are its values). A binary or class mask (one value over many separate nuclei) is refused, as are labels in
JPEG (its compression changes values) and labels of another size than their image.

A GeoJSON file's nuclei and field rectangles: geojson_fields.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EvaluationError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
LABEL_SUFFIXES = (".tif", ".tiff", ".png")
GEOJSON_SUFFIX = ".geojson"
LABEL_FOLDERS = ("labels", "masks")
# NAME + separator + tag: Cellpose's _masks and _cp_masks, QuPath's -labels, napari's and others' _labels, _label...
_LABEL_TAG = re.compile(r"^(?P<stem>.+?)[_-](?:cp_)?(?:masks?|labels?|labell?ed)$", re.IGNORECASE)
LAYOUT_TEXT = ("a COCO instance JSON, or a folder of images with their label images (NAME.tif with NAME_masks.tif "
               "or NAME-labels.png beside it, or images/ with labels/ or masks/) or QuPath GeoJSON (NAME.geojson)")
MIN_PIECE_PX = 5    # separate pieces smaller than this are specks, not nuclei, when telling a binary mask apart


@dataclass(frozen=True)
class LabelPair:
    """One annotated image: `name` (its path in the folder, the key scores and messages use), the image and its
    annotations (a label image or a GeoJSON file)."""

    name: str
    image: Path
    annotations: Path


@dataclass(frozen=True)
class AnnotatedField:
    """An annotated image, or a window of one (a field of a slide): its pixels, and its nuclei as labels."""

    name: str
    image: Path
    annotations: Path           # its label image, or the GeoJSON file its nuclei come from
    window: tuple[int, int, int, int] | None = None    # (row0, col0, row1, col1) of the image; None: all of it
    nuclei: tuple = ()          # a GeoJSON's nucleus polygons meeting the field (shapely, image px)

    @property
    def from_geojson(self) -> bool:
        return self.annotations.suffix.lower() == GEOJSON_SUFFIX

    def labels(self, shape: tuple[int, int]) -> np.ndarray:
        """The field's instance labels, (rows, columns) = `shape`, the size of its pixels."""
        if not self.from_geojson:
            return read_label_image(self.annotations, shape)
        from .geojson_fields import rasterise
        row0, col0 = self.window[:2] if self.window else (0, 0)
        return rasterise(self.nuclei, row0, col0, shape)

    def count(self) -> int:
        """Its annotated nuclei, without reading its image."""
        if self.from_geojson:
            return len(self.nuclei)
        return int((np.unique(read_label_image(self.annotations)) != 0).sum())


def annotated_fields(folder: Path, pairs: list[LabelPair] | None = None) -> list[AnnotatedField]:
    """The annotated images of a folder of label pairs (`pairs`, find_label_pairs' when None): one field per label
    image, one per field rectangle of a GeoJSON file (or its whole image)."""
    from .geojson_fields import geojson_fields
    fields = []
    for pair in find_label_pairs(folder) if pairs is None else pairs:
        if pair.annotations.suffix.lower() == GEOJSON_SUFFIX:
            fields.extend(geojson_fields(pair))
        else:
            fields.append(AnnotatedField(pair.name, pair.image, pair.annotations))
    return fields


def is_label_folder(path: Path) -> bool:
    """A folder of images with label images (not a cellseg result folder, which holds predictions.coco.json)."""
    path = Path(path)
    return path.is_dir() and not (path / "predictions.coco.json").is_file()


def find_label_pairs(folder: Path) -> list[LabelPair]:
    """The images of `folder` that have a label image or a GeoJSON file, by the layouts above; a one-line error when
    there are none, when annotations have no image or two images share a name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"expected {LAYOUT_TEXT}, found no folder {folder}")
    pairs = label_pairs_in(folder)
    if not pairs:
        images = len(_files(folder, IMAGE_SUFFIXES)) + len(_files(folder / "images", IMAGE_SUFFIXES))
        raise EvaluationError(f"expected {LAYOUT_TEXT}, found no image with a label image in {folder} "
                              f"({images} image file(s))")
    return pairs


def label_pairs_in(folder: Path) -> list[LabelPair]:
    """find_label_pairs' pairs, [] when there are none."""
    label_dirs = [folder / d for d in LABEL_FOLDERS if (folder / d).is_dir()]
    if (folder / "images").is_dir() and label_dirs:
        if len(label_dirs) > 1:
            raise EvaluationError(f"expected one folder of label images beside {folder / 'images'}, found both "
                                  f"labels/ and masks/ in {folder}: keep the one to train on")
        pairs, unlabelled = _pairs_in_two_folders(folder / "images", label_dirs[0], folder)
    else:
        pairs, unlabelled = _pairs_in_one_folder(folder)
    if pairs and unlabelled:
        log.warning("%s: %d image(s) without annotations left out (e.g. %s); %d annotated", folder,
                    len(unlabelled), unlabelled[0], len(pairs))
    return pairs


def _files(folder: Path, suffixes) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in suffixes)


def image_stem(path: Path) -> str:
    """A file's name without its extension, OME-TIFF's two included (slide.ome.tif: slide)."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _by_stem(paths: list[Path], what: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in paths:
        stem = image_stem(p)
        if stem in out:
            raise EvaluationError(f"expected one {what} named {stem}, found {out[stem].name} and {p.name} in "
                                  f"{p.parent}: which one the labels belong to is unclear")
        out[stem] = p
    return out


def _label_stem(path: Path) -> str | None:
    found = _LABEL_TAG.match(path.stem)
    return found["stem"] if found else None


def _pairs_in_two_folders(image_dir: Path, label_dir: Path, root: Path) -> tuple[list[LabelPair], list[str]]:
    images = _by_stem(_files(image_dir, IMAGE_SUFFIXES), "image")
    labels: dict[str, Path] = {}
    for p in _files(label_dir, LABEL_SUFFIXES):
        stem = image_stem(p) if image_stem(p) in images else (_label_stem(p) or image_stem(p))
        if stem in labels:
            raise EvaluationError(f"expected one label image for image {stem}, found {labels[stem].name} and "
                                  f"{p.name} in {label_dir}")
        labels[stem] = p
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise EvaluationError(f"expected an image in {image_dir} for each label image in {label_dir}, found "
                              f"{len(orphans)} without one (e.g. {labels[orphans[0]].name})")
    pairs = [LabelPair(p.relative_to(root).as_posix(), p, labels[s]) for s, p in images.items() if s in labels]
    return pairs, [images[s].name for s in images if s not in labels]


def _pairs_in_one_folder(folder: Path) -> tuple[list[LabelPair], list[str]]:
    from ..slides.opening import SLIDE_SUFFIXES
    files = _files(folder, IMAGE_SUFFIXES)
    labels: dict[str, Path] = {}

    def add(stem: str, p: Path) -> None:
        if stem in labels:
            raise EvaluationError(f"expected one label image or GeoJSON file for image {stem}, found "
                                  f"{labels[stem].name} and {p.name} in {folder}")
        labels[stem] = p

    for p in files:
        stem = _label_stem(p)
        if stem is None:
            continue
        if p.suffix.lower() not in LABEL_SUFFIXES:
            raise EvaluationError(f"expected label images as PNG or TIFF, found {p.name} in {folder}: JPEG's "
                                  f"compression changes label values; save them losslessly")
        add(stem, p)
    label_files = set(labels.values())
    images = _by_stem([p for p in _files(folder, SLIDE_SUFFIXES) if p not in label_files], "image")
    for p in _files(folder, (GEOJSON_SUFFIX,)):
        # QuPath names its export after the image, with or without the image's extension
        named = folder / p.stem
        add(image_stem(named) if named.suffix.lower() in SLIDE_SUFFIXES and named.is_file() else p.stem, p)
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise EvaluationError(f"expected an image named {orphans[0]} (.tif, .png, .jpg, a slide) beside "
                              f"{labels[orphans[0]].name} in {folder}, found none")
    pairs = [LabelPair(p.name, p, labels[s]) for s, p in images.items() if s in labels]
    return pairs, [images[s].name for s in images if s not in labels]


def read_label_image(path: Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A label image as (H, W) whole numbers (0 background), checked: one channel, whole non-negative values, the
    image's `shape` (rows, columns) when given, and one value per nucleus, not a binary or class mask."""
    path = Path(path)
    labels = read_label_pixels(path)
    if shape is not None and labels.shape != tuple(shape):
        raise EvaluationError(f"expected label image {path} to be {shape[0]} x {shape[1]} px like its image, found "
                              f"{labels.shape[0]} x {labels.shape[1]} px")
    if labels.size and labels.min() < 0:
        raise EvaluationError(f"expected label values of 0 (background) and above in {path}, found {labels.min()}")
    check_instance_labels(labels, path)
    return labels


def read_label_pixels(path: Path) -> np.ndarray:
    """A PNG or TIFF label image's values as (H, W) whole numbers, unchecked beyond that."""
    if path.suffix.lower() in (".jpg", ".jpeg"):
        raise EvaluationError(f"expected a label image as PNG or TIFF, found JPEG {path}: its compression changes "
                              f"label values; save the labels losslessly")
    if path.suffix.lower() == ".png":
        from PIL import Image
        with Image.open(path) as im:
            array = np.asarray(im)   # a palette PNG's values are its indices (QuPath's coloured label exports)
    else:
        import tifffile
        try:
            array = tifffile.imread(path)
        except Exception as e:  # noqa: BLE001 (tifffile raises many kinds for a file that is not a TIFF)
            raise EvaluationError(f"expected a label image (PNG or TIFF), cannot read {path}: {e}") from e
    array = np.squeeze(array)
    if array.ndim != 2:
        raise EvaluationError(f"expected a label image of one channel (0 = background, each nucleus its own "
                              f"number), found {path} of shape {array.shape} (a coloured rendering or a stack?)")
    if array.dtype.kind == "b":
        array = array.astype(np.uint8)
    elif array.dtype.kind == "f":
        if not (np.isfinite(array).all() and np.array_equal(array, np.round(array))):
            raise EvaluationError(f"expected whole-number labels in {path}, found fractional values ({array.dtype}): "
                                  f"a probability map, not labels")
        array = array.astype(np.int64)
    elif array.dtype.kind not in "iu":
        raise EvaluationError(f"expected a label image of integers in {path}, found {array.dtype}")
    return array


def check_instance_labels(labels: np.ndarray, path: Path) -> None:
    """Refuse a binary or class mask: fewer label values than half its separate pieces (of MIN_PIECE_PX px or
    more), four pieces or more. Instance labels have a value for each nucleus, so touching nuclei make fewer pieces
    than values, never more."""
    from scipy import ndimage
    values = np.unique(labels)
    values = int((values != 0).sum())
    if values == 0:
        return
    pieces, n = ndimage.label(labels != 0)
    if n < 4:
        return
    sizes = np.bincount(pieces.ravel())[1:]
    n = int((sizes >= MIN_PIECE_PX).sum())
    if n >= 4 and values * 2 <= n:
        raise EvaluationError(f"expected an instance label image (each nucleus its own number) in {path}, found "
                              f"{values} value(s) over {n} separate objects: a binary or class mask; give each "
                              f"nucleus its own label (e.g. skimage.measure.label, or QuPath's instance labels)")


def write_annotated_images(images, folder: Path) -> Path:
    """Annotated images as a COCO set a count can be scored on: each (name, native pixels (H, W, C), boxes (N, 4)
    row0, col0, row1, col1, box-cropped bool masks) as images/NAME.tif and its nuclei as COCO RLEs in
    annotations.json; the COCO file's path is returned."""
    import json

    import tifffile

    from ..results import crop_rles
    (folder / "images").mkdir(parents=True, exist_ok=True)
    entries, anns = [], []
    for image_id, (name, pixels, boxes, masks) in enumerate(images, start=1):
        file_name = f"images/{name}.tif"
        pixels = np.ascontiguousarray(pixels)
        tifffile.imwrite(folder / file_name, pixels if pixels.shape[-1] == 3 else pixels[..., 0],
                         photometric="rgb" if pixels.shape[-1] == 3 else "minisblack")
        h, w = pixels.shape[:2]
        entries.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        boxes = np.asarray(boxes, np.int64).reshape(-1, 4)
        # all of an image's masks at once, never a full image per nucleus; class-agnostic, as the scoring is
        for (r0, c0, r1, c1), mask, rle in zip(boxes.tolist(), masks, crop_rles(list(masks), boxes[:, 0],
                                                                                 boxes[:, 1], h, w)):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                         "segmentation": rle, "area": int(mask.sum()), "bbox": [c0, r0, c1 - c0, r1 - r0]})
    path = folder / "annotations.json"
    path.write_text(json.dumps({"images": entries, "annotations": anns,
                                "categories": [{"id": 1, "name": "nucleus"}]}), encoding="utf-8")
    return path


def has_fields(source: Path) -> bool:
    """Whether `source` is a folder whose annotations are fields of larger images (GeoJSON rectangles)."""
    return is_label_folder(source) and any(field.window is not None for field in annotated_fields(source))


def write_fields(source: Path, folder: Path) -> Path:
    """The annotated fields of `source` (a folder of label pairs; a slide's GeoJSON rectangles) written as images a
    count can be scored on (write_annotated_images: each field's window of its image, its nuclei cut at the edge);
    the COCO file's path is returned. Held-out fields are counted as these images, not as their whole slides,
    whose unannotated nuclei would count as false."""
    from scipy import ndimage

    from ..geometry import Box
    from ..slides import open_slide
    images = []
    for k, field in enumerate(annotated_fields(source)):
        with open_slide(field.image) as slide:
            info = slide.info
            pixels = slide.read_region(Box(*field.window) if field.window else Box(0, 0, info.height, info.width))
        labels = field.labels(pixels.shape[:2])
        found = [(v, sl) for v, sl in enumerate(ndimage.find_objects(labels), start=1) if sl is not None]
        boxes = [(sl[0].start, sl[1].start, sl[0].stop, sl[1].stop) for _, sl in found]
        masks = [labels[sl] == v for v, sl in found]
        images.append((f"{k:04d}_{image_stem(field.image)}", pixels[..., :3] if pixels.shape[-1] == 4 else pixels,
                       boxes, masks))
    return write_annotated_images(images, folder)
