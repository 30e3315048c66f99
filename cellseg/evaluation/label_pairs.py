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

In a GeoJSON file (QuPath's "Export objects as GeoJSON", or cellseg's own cells.geojson, corrected) the nuclei are its
polygons: detections, annotations, a cell's nucleusGeometry. A rectangle annotation around some of them makes a
field: the nuclei are taken as annotated in full there and nowhere else, so a slide can be trained on where someone
checked it. Without a rectangle the whole image is the field (an image of at most WHOLE_IMAGE_PX). Polygons are
rasterised by their pixel centres (pixel (row, col) is the square [col, col + 1] x [row, row + 1]), so cellseg's own
cells.geojson gives back exactly the masks it was written from.
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
WHOLE_IMAGE_PX = 25_000_000   # an image with a GeoJSON but no field rectangle is taken as annotated in full up to this
RECTANGLE_FILL = 0.99         # a field's polygon covers this share of its bounding box (QuPath's rectangles: all)
OUTSIZED = 25                 # a polygon holding no nucleus this many times the median nucleus' area is a region
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
        row0, col0 = self.window[:2] if self.window else (0, 0)
        return rasterise(self.nuclei, row0, col0, shape)

    def count(self) -> int:
        """Its annotated nuclei, without reading its image."""
        if self.from_geojson:
            return len(self.nuclei)
        return int((np.unique(read_label_image(self.annotations)) != 0).sum())


def annotated_fields(folder: Path) -> list[AnnotatedField]:
    """The annotated images of a folder of label pairs (find_label_pairs): one field per label image, one per field
    rectangle of a GeoJSON file (or its whole image)."""
    fields = []
    for pair in find_label_pairs(folder):
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
    label_dirs = [folder / d for d in LABEL_FOLDERS if (folder / d).is_dir()]
    if (folder / "images").is_dir() and label_dirs:
        if len(label_dirs) > 1:
            raise EvaluationError(f"expected one folder of label images beside {folder / 'images'}, found both "
                                  f"labels/ and masks/ in {folder}: keep the one to train on")
        pairs, unlabelled = _pairs_in_two_folders(folder / "images", label_dirs[0], folder)
    else:
        pairs, unlabelled = _pairs_in_one_folder(folder)
    if not pairs:
        images = len(_files(folder, IMAGE_SUFFIXES)) + len(_files(folder / "images", IMAGE_SUFFIXES))
        raise EvaluationError(f"expected {LAYOUT_TEXT}, found no image with a label image in {folder} "
                              f"({images} image file(s))")
    if unlabelled:
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


def geojson_fields(pair: LabelPair) -> list[AnnotatedField]:
    """The fields of an image with a GeoJSON file: one per rectangle annotation around nuclei (clipped to the image),
    else the whole image (at most WHOLE_IMAGE_PX), each with the nucleus polygons that meet it."""
    import shapely

    from ..slides import open_slide
    with open_slide(pair.image) as slide:
        height, width = slide.info.height, slide.info.width
    shapes, annotation = _geojson_polygons(pair.annotations)
    points = shapely.point_on_surface(shapes)
    tree = shapely.STRtree(points)
    field = np.zeros(len(shapes), bool)
    for k in np.flatnonzero(annotation):
        inside = int((tree.query(shapes[k], predicate="contains") != k).sum())
        x0, y0, x1, y1 = shapes[k].bounds
        rectangle = shapes[k].area >= RECTANGLE_FILL * (x1 - x0) * (y1 - y0)
        if inside >= 2 and not rectangle:
            raise EvaluationError(f"expected a rectangle around the annotated nuclei of {pair.image.name}, found a "
                                  f"polygon holding {inside} at x {x0:.0f}, y {y0:.0f} in {pair.annotations.name} (every "
                                  f"nucleus of a field is taken as drawn): draw fields with the rectangle tool")
        field[k] = inside >= 1 and rectangle    # a nucleus drawn over another (a correction) is no field
    nuclei = shapes[~field]
    if len(nuclei) >= 5:        # a counting region left in the export (no nucleus inside it) is no nucleus
        areas = shapely.area(nuclei)
        outsized = areas > OUTSIZED * np.median(areas)
        if outsized.any():
            log.warning("%s: %d polygon(s) of more than %d times the median nucleus' area and holding none left out "
                        "(regions, not nuclei)", pair.annotations.name, int(outsized.sum()), OUTSIZED)
            nuclei = nuclei[~outsized]
    nucleus_tree = shapely.STRtree(nuclei)
    windows = []
    for k in np.flatnonzero(field):
        x0, y0, x1, y1 = shapes[k].bounds
        window = (max(0, int(np.floor(y0))), max(0, int(np.floor(x0))), min(height, int(np.ceil(y1))),
                  min(width, int(np.ceil(x1))))
        if window[0] >= window[2] or window[1] >= window[3]:
            raise EvaluationError(f"expected the field at x {x0:.0f}, y {y0:.0f} of {pair.annotations.name} on its image "
                                  f"{pair.image.name} ({width} x {height} px), found it outside")
        windows.append(window)
    for a in range(len(windows)):
        for b in range(a):
            (r0, c0, r1, c1), (s0, d0, s1, d1) = windows[a], windows[b]
            if max(r0, s0) < min(r1, s1) and max(c0, d0) < min(c1, d1):
                raise EvaluationError(f"expected the field rectangles of {pair.annotations.name} apart, found two that "
                                      f"overlap (at x {max(c0, d0)}, y {max(r0, s0)}): their nuclei would be "
                                      f"trained on twice, or trained on and judged on")
    if not windows:
        if height * width > WHOLE_IMAGE_PX:
            raise EvaluationError(f"expected rectangle annotations around the annotated nuclei of {pair.image.name} "
                                  f"({width} x {height} px, too large to be annotated in full) in "
                                  f"{pair.annotations.name}, found none")
        return [AnnotatedField(pair.name, pair.image, pair.annotations, None, tuple(nuclei))]
    fields = []
    for r0, c0, r1, c1 in windows:
        meeting = nuclei[nucleus_tree.query(shapely.box(c0, r0, c1, r1), predicate="intersects")]
        fields.append(AnnotatedField(f"{pair.name} (x {c0}, y {r0}, {c1 - c0} x {r1 - r0} px)", pair.image,
                                     pair.annotations, (r0, c0, r1, c1), tuple(meeting)))
    return fields


def _geojson_polygons(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every polygon of a GeoJSON file (a QuPath cell's nucleusGeometry in place of the cell), repaired where
    invalid, and whether each is an annotation (a field may be; detections and cells are nuclei)."""
    import orjson  # a slide's export holds hundreds of thousands of objects: 100,000 of cellseg's in 150 MB
    import shapely

    from ..planning.regions import RegionsError, geojson_features, object_type
    try:
        data = orjson.loads(path.read_bytes().removeprefix(b"\xef\xbb\xbf"))     # Windows tools' byte order mark
        features = geojson_features(data, path)
    except (orjson.JSONDecodeError, RegionsError) as e:
        raise EvaluationError(f"expected GeoJSON objects in {path}, found {e}") from None
    texts, annotation = [], []
    for feature in features:
        props = feature.get("properties") if isinstance(feature.get("properties"), dict) else {}
        geometry = feature.get("nucleusGeometry") or feature.get("geometry")
        if not isinstance(geometry, dict) or geometry.get("type") not in ("Polygon", "MultiPolygon"):
            continue    # points, lines: not outlines
        texts.append(orjson.dumps(geometry).decode())
        annotation.append(object_type(feature, props) in ("annotation", "PathAnnotationObject"))
    try:
        shapes = shapely.from_geojson(np.asarray(texts, dtype=object))
    except Exception as e:  # noqa: BLE001 (GEOS's own message says what is wrong with the coordinates)
        raise EvaluationError(f"expected polygons in {path}, found {e}") from None
    for k in np.flatnonzero(~shapely.is_valid(shapes)):
        parts = shapely.get_parts(shapely.make_valid(shapes[k]))
        shapes[k] = shapely.union_all(parts[shapely.get_dimensions(parts) == 2])
    kept = ~shapely.is_empty(shapes) & (shapely.area(shapes) > 0)
    shapes, annotation = shapes[kept], np.asarray(annotation, bool)[kept]
    if not len(shapes):
        raise EvaluationError(f"expected nucleus polygons in {path}, found none ({len(features)} feature(s))")
    return shapes, annotation


def rasterise(polygons, row0: int, col0: int, shape: tuple[int, int]) -> np.ndarray:
    """Instance labels (1, 2, ... in the order given) of polygons in image px on the window of `shape` at (row0,
    col0): a pixel is a polygon's when its centre is inside it (the first polygon's, where two overlap)."""
    import shapely
    labels = np.zeros(shape, np.int32)
    for k, g in enumerate(polygons, start=1):
        x0, y0, x1, y1 = g.bounds
        r0, r1 = max(row0, int(np.floor(y0))), min(row0 + shape[0], int(np.ceil(y1)))
        c0, c1 = max(col0, int(np.floor(x0))), min(col0 + shape[1], int(np.ceil(x1)))
        if r0 >= r1 or c0 >= c1:
            continue
        rows, cols = np.mgrid[r0:r1, c0:c1]
        inside = shapely.contains_xy(g, cols + 0.5, rows + 0.5)
        window = labels[r0 - row0:r1 - row0, c0 - col0:c1 - col0]
        window[inside & (window == 0)] = k
    return labels
