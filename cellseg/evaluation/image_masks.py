"""Load the predicted and the annotated nuclei masks for `cellseg evaluate`, image by image, and pair the images.

Inputs (`load_image_masks`): a COCO instance JSON (our predictions.coco.json or any COCO file with mask
segmentations: RLE or polygons; or a COCO results list), a label image (TIFF/PNG, 0 = background,
each other value one nucleus; read tile by tile; a palette PNG by its indices), a cellseg result folder (its
predictions.coco.json), a folder of result folders (a batch count's), or a folder of images with their label images
(label_pairs).
Each image becomes an `ImageMasks`: its masks as full-image COCO compressed RLEs, their boxes,
scores and crowd flags. (Not the pipeline's instances.Instances, which hold box-cropped masks of one slide.)

Images of PRED and GT are paired (`pair_images`) by file_name, then base name, then stem, then id;
a single label image is paired with a single image on the other side whatever their names.

Categories are ignored: evaluation is class-agnostic (cellseg counts nuclei).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pycocotools.mask as mask_utils

from ..errors import EvaluationError
from ..geometry import Box
from ..results import crop_rle

log = logging.getLogger(__name__)

LABEL_TILE = 2048  # label images are read in tiles of this many px a side
SHARED_LABEL_PX = 30   # a label in separate pieces this large may be nuclei sharing one label (a warning says so)


@dataclass
class ImageMasks:
    """The nuclei masks of one image (predicted or annotated). Masks are COCO compressed RLEs of the full image; boxes (N, 4) int are
    (row0, col0, row1, col1) half-open in px; scores (N,) float (1.0 when the source has none)."""

    file_name: str | None
    image_id: int | None  # None for a label image
    height: int
    width: int
    rles: list[dict]
    boxes: np.ndarray
    scores: np.ndarray
    iscrowd: np.ndarray  # (N,) bool
    has_scores: bool

    @property
    def name(self) -> str:
        return self.file_name if self.file_name is not None else f"id {self.image_id}"

    def __len__(self) -> int:
        return len(self.rles)


def load_image_masks(path: str | Path, label_tile: int | None = None) -> dict[str, ImageMasks]:
    """Images with their masks from a COCO JSON, a label image, a cellseg result folder, a folder of result folders
    or a folder of images with their label images (label_pairs), keyed by name.

    A label image is read in squares of `label_tile` px a side (None: LABEL_TILE)."""
    path = Path(path)
    if not path.exists():
        raise EvaluationError(f"expected a COCO JSON, a label image or a cellseg result folder, {path} "
                              "does not exist")
    if path.is_dir():
        coco = path / "predictions.coco.json"
        if not coco.is_file():
            return _load_folder(path)
        path = coco
    with open(path, "rb") as fh:
        head = fh.read(64).lstrip()
    if path.suffix.lower() == ".json" or head[:1] in (b"{", b"["):
        images = _load_coco(path)
    elif _palette_png(path):    # its values are its indices, which reading it as a slide would turn into colours
        from .label_pairs import read_label_pixels
        images = [label_array_masks(read_label_pixels(path), path, path.name)]
    else:
        images = [_load_label_image(path, LABEL_TILE if label_tile is None else label_tile)]
    out: dict[str, ImageMasks] = {}
    for im in images:
        key = im.name if im.name not in out else f"{im.name} (id {im.image_id})"
        out[key] = im
    return out


def _load_folder(path: Path) -> dict[str, ImageMasks]:
    """A folder that is no result folder: the result folders in it (a batch count's `--output`), keyed by their
    images' names, or else images with their label images (label_pairs: Cellpose's, StarDist's, QuPath's layouts)."""
    if any((path / name).exists() for name in ("run.json", "summary.json")):    # a count's, unfinished or filtered
        raise EvaluationError(f"expected a cellseg result folder holding predictions.coco.json, {path} has none")
    results = sorted(p for p in path.iterdir() if (p / "predictions.coco.json").is_file())
    if results:
        out: dict[str, ImageMasks] = {}
        for folder in results:
            for name, image in load_image_masks(folder).items():
                if name in out:
                    raise EvaluationError(f"expected one result folder per image in {path}, found two for {name} "
                                          f"(e.g. {folder.name})")
                out[name] = image
        return out
    from .label_pairs import annotated_fields, label_pairs_in
    pairs = label_pairs_in(path)
    if not pairs:
        raise EvaluationError(f"expected a cellseg result folder holding predictions.coco.json, a folder of them, or "
                              f"images with their label images (NAME.tif + NAME_masks.tif, images/ + labels/) in "
                              f"{path}, found none of these")
    return field_image_masks(annotated_fields(path, pairs), path)


def field_image_masks(fields, source: Path) -> dict[str, ImageMasks]:
    """The masks of annotated images (label_pairs.AnnotatedField), keyed by their names; a field of a larger image
    is refused (counted whole, that image's unannotated nuclei would count as false)."""
    from ..slides import open_slide
    out = {}
    for field in fields:
        if field.window is not None:
            raise EvaluationError(f"expected images annotated in full, found the field {field.name} of a larger image "
                                  f"in {source}: give its GeoJSON file itself as --gt (scored on its field "
                                  f"rectangles), or write the fields as images (label_pairs.write_fields)")
        with open_slide(field.image) as slide:
            shape = (slide.info.height, slide.info.width)
        out[field.name] = label_array_masks(field.labels(shape), field.annotations, field.name)
    return out


def _palette_png(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.mode == "P"
    except (OSError, UnidentifiedImageError):
        return False


def read_coco_json(path: Path) -> dict | list:
    """A JSON file's content, or a one-line error saying it is not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvaluationError(f"expected a COCO instance JSON, {path} is not valid JSON: {e}") from e


def coco_images(path: Path, data) -> dict[int, dict]:
    """The images of a COCO instance dataset `data` (read from `path`), each {file_name, height, width, anns}
    with its annotations, checked: one-line errors for a file that is not a COCO instance dataset."""
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)):
        found = (f"an object with keys {sorted(data)[:8]}" if isinstance(data, dict)
                 else f"a JSON {type(data).__name__}")
        raise EvaluationError(f"expected a COCO instance JSON (an object with 'images' and 'annotations' lists, "
                              f"or a list of results), {path} holds {found}")
    images: dict[int, dict] = {}
    for k, im in enumerate(data["images"]):
        try:
            images[im["id"]] = {"file_name": im.get("file_name"), "height": int(im["height"]),
                                "width": int(im["width"]), "anns": []}
        except (TypeError, KeyError, ValueError) as e:
            raise EvaluationError(f"expected COCO images with 'id', 'height' and 'width', image {k} of {path} "
                                  f"is {str(im)[:80]}") from e
    for k, ann in enumerate(data["annotations"]):
        image = images.get(ann.get("image_id") if isinstance(ann, dict) else None)
        if image is None:
            raise EvaluationError(f"expected annotation {k} of {path} to refer to a listed image, found "
                                  f"image_id {ann.get('image_id') if isinstance(ann, dict) else ann!r}")
        image["anns"].append(ann)
    return images


def coco_image_paths(path: Path, file_names) -> dict[str, Path]:
    """Where the images a COCO file names lie (file_name is relative to the file's folder); every one must exist."""
    paths = {str(name): Path(path).parent / str(name) for name in file_names}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise EvaluationError(f"expected the images named in {path} next to it, found {len(missing)} of "
                              f"{len(paths)} missing, e.g. {missing[0]}")
    return paths


def _load_coco(path: Path) -> list[ImageMasks]:
    data = read_coco_json(path)
    if isinstance(data, list) and all(isinstance(a, dict) and "image_id" in a for a in data):
        return _coco_results(path, data)  # a COCO results file: [{"image_id", "segmentation", "score"}]
    images = coco_images(path, data)
    return [_image_masks(path, im["file_name"], iid, im["height"], im["width"], im["anns"])
            for iid, im in images.items()]


def _coco_results(path: Path, anns: list[dict]) -> list[ImageMasks]:
    by_image: dict = {}
    for k, ann in enumerate(anns):
        seg = ann.get("segmentation")
        if not (isinstance(seg, dict) and isinstance(seg.get("size"), list) and len(seg["size"]) == 2):
            raise EvaluationError(f"expected RLE masks with a 'size' in the COCO results list {path}, result {k} "
                                  f"has segmentation {str(seg)[:60]}")
        by_image.setdefault(ann["image_id"], []).append(ann)
    return [_image_masks(path, None, iid, *group[0]["segmentation"]["size"], group)
            for iid, group in by_image.items()]


def _image_masks(path: Path, file_name, image_id, height: int, width: int, anns: list[dict]) -> ImageMasks:
    rles = [annotation_rle(path, a, height, width) for a in anns]
    # a mask with no pixel in its image (polygons outside it, an empty RLE) is no nucleus that could be found or
    # matched: left out, as training leaves it out, and said, as it changes the counts
    areas = [int(mask_utils.area(rle)) for rle in rles]
    for a, area in zip(anns, areas):
        if area > height * width:    # counts that are not an RLE (a careless str(bytes), a typo) decode to nonsense
            raise EvaluationError(f"expected a valid RLE mask in annotation {a.get('id', '?')} of image "
                                  f"{file_name or image_id} of {path}, found counts covering {area:,} px of its "
                                  f"{height} x {width}")
    kept = [k for k, area in enumerate(areas) if area > 0]
    if len(kept) < len(rles):
        kept_set = set(kept)
        empty = [str(a.get("id", k)) for k, a in enumerate(anns) if k not in kept_set]
        log.warning("%s: %d mask(s) of image %s with no pixel inside its %d x %d px left out (annotation ids %s)",
                    path, len(empty), file_name or image_id, height, width, ", ".join(empty[:5])
                    + (", ..." if len(empty) > 5 else ""))
        rles, anns = [rles[k] for k in kept], [anns[k] for k in kept]
    with_score = sum("score" in a for a in anns)
    if with_score not in (0, len(anns)):
        raise EvaluationError(f"expected a score on every prediction or on none, image {file_name or image_id} "
                              f"of {path} has {with_score} of {len(anns)}")
    if rles:
        xywh = np.asarray(mask_utils.toBbox(rles), dtype=np.float64).round().astype(np.int64)
        boxes = np.stack([xywh[:, 1], xywh[:, 0], xywh[:, 1] + xywh[:, 3], xywh[:, 0] + xywh[:, 2]], axis=1)
    else:
        boxes = np.zeros((0, 4), np.int64)
    scores = np.array([_score(a, path) for a in anns] if with_score else np.ones(len(anns)), np.float64)
    crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], bool)
    return ImageMasks(None if file_name is None else str(file_name), image_id, int(height), int(width),
                      rles, boxes, scores, crowd, bool(with_score))


def _score(ann: dict, path: Path) -> float:
    try:
        score = float(ann["score"])
    except (TypeError, ValueError):
        score = math.nan
    if not math.isfinite(score):
        raise EvaluationError(f"expected a number as the score of annotation {ann.get('id', '?')} (image "
                              f"{ann.get('image_id', '?')}) of {path}, found {ann['score']!r}")
    return score


def annotation_rle(path: Path, ann: dict, h: int, w: int) -> dict:
    """A COCO annotation's mask (RLE, compressed or not, or polygons) as a compressed RLE of its h x w image."""
    seg = ann.get("segmentation")
    where = f"annotation {ann.get('id', '?')} of {path}"
    if isinstance(seg, dict) and "counts" in seg:
        if list(seg.get("size", [])) != [h, w]:
            raise EvaluationError(f"expected the mask size of {where} to be its image's {h} x {w} px, found "
                                  f"{seg.get('size')}")
        if isinstance(seg["counts"], list):  # uncompressed RLE
            return mask_utils.frPyObjects(seg, h, w)
        return {"size": [h, w], "counts": seg["counts"]}
    if isinstance(seg, list):
        polys = [p for p in seg if isinstance(p, list) and len(p) >= 6]
        if not polys:
            return crop_rle(np.zeros((1, 1), bool), 0, 0, h, w)
        try:
            return mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
        except (TypeError, ValueError) as e:
            raise EvaluationError(f"expected polygons of numbers in {where}, found {str(seg)[:60]}") from e
    raise EvaluationError(f"expected a mask ('segmentation' as RLE or polygons) in {where}, found "
                          f"{str(seg)[:60]} (box-only COCO files cannot be scored for masks)")


def _load_label_image(path: Path, tile_size: int) -> ImageMasks:
    """The masks of a label image, read `tile_size` squares at a time: memory is one tile plus the RLEs."""
    from ..slides import open_slide

    with open_slide(path) as slide:
        info = slide.info
        if info.n_channels != 1 or np.dtype(info.dtype).kind not in "biu":
            raise EvaluationError(f"expected a label image (one channel of integers, 0 = background), {path} has "
                                  f"{info.n_channels} channel(s) of {info.dtype}")
        H, W = info.height, info.width
        pieces = _LabelPieces(H, W)
        for r0 in range(0, H, tile_size):
            for c0 in range(0, W, tile_size):
                pieces.add(slide.read_region(Box(r0, c0, min(r0 + tile_size, H), min(c0 + tile_size, W)))[..., 0],
                           r0, c0)
    return pieces.image_masks(path, path.name)


def label_array_masks(labels: np.ndarray, path: Path, name: str) -> ImageMasks:
    """The masks of a label image already read whole (label_pairs.read_label_image), as the image `name`."""
    pieces = _LabelPieces(*labels.shape)
    pieces.add(labels, 0, 0)
    return pieces.image_masks(path, name)


class _LabelPieces:
    """A label image's masks gathered tile by tile: each label's pieces as RLEs of the whole image, and the labels
    seen as separate pieces of SHARED_LABEL_PX or more (nuclei sharing a label?)."""

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width
        self.parts: dict[int, list[dict]] = {}
        self.apart: set[int] = set()

    def add(self, tile: np.ndarray, r0: int, c0: int) -> None:
        from scipy import ndimage
        values, inverse = np.unique(tile, return_inverse=True)
        offset = 0 if values[0] == 0 else 1
        dense = inverse.reshape(tile.shape) + offset  # 0 = background
        for k, sl in enumerate(ndimage.find_objects(dense)):
            if sl is None:
                continue
            label = int(values[k + 1 - offset])
            crop = dense[sl] == k + 1
            if len(label_pieces(crop)[1]) > 1:
                self.apart.add(label)
            self.parts.setdefault(label, []).append(
                crop_rle(crop, r0 + sl[0].start, c0 + sl[1].start, self.height, self.width))

    def image_masks(self, path: Path, name: str) -> ImageMasks:
        labels = sorted(self.parts)
        rles = [p[0] if len(p) == 1 else mask_utils.merge(p) for p in (self.parts[v] for v in labels)]
        image = _image_masks(path, name, None, self.height, self.width, [{"segmentation": r} for r in rles])
        log.info("%s: %d labelled cells", path.name, len(image))
        if self.apart:
            log.warning("%s: %d of its %d labels are each made of separate pieces of %d px or more (e.g. label %d): "
                        "each is scored as one cell; if they are nuclei sharing a label, give each its own "
                        "(skimage.measure.label) or every one found counts as false", path.name, len(self.apart),
                        len(labels), SHARED_LABEL_PX, min(self.apart))
        return image


def label_pieces(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A label's mask in separate pieces: (their labels, 4-connected: 1, 2, ...; the piece numbers of those of
    SHARED_LABEL_PX px or more, as indices from 0). One piece, or one of that size: nothing to say of it."""
    from scipy import ndimage
    if mask.sum() < 2 * SHARED_LABEL_PX:
        return mask.astype(np.int32), np.zeros(1, np.int64)
    pieces, n = ndimage.label(mask)
    if n < 2:
        return pieces, np.zeros(1, np.int64)
    return pieces, np.flatnonzero(np.bincount(pieces.ravel())[1:] >= SHARED_LABEL_PX)


def pair_images(pred: dict[str, ImageMasks], gt: dict[str, ImageMasks]
                ) -> list[tuple[str, ImageMasks, ImageMasks]]:
    """(GT name, pred image, gt image) for the images both sides share, sizes checked."""
    P, G = list(pred.values()), list(gt.values())
    if all(p.file_name is None and p.image_id is not None for p in P) and all(g.image_id is not None for g in G):
        # a COCO results list (pycocotools', detectron2's) names only the images with detections: the ground
        # truth's others had none, and their nuclei count as missed, as COCOeval counts them
        named = {p.image_id for p in P}
        P = P + [ImageMasks(None, g.image_id, g.height, g.width, [], np.zeros((0, 4), np.int64), np.zeros(0),
                            np.zeros(0, bool), True) for g in G if g.image_id not in named]
    pairs = None
    if len(P) == 1 and len(G) == 1 and (P[0].image_id is None or G[0].image_id is None):
        pairs = [(P[0], G[0])]  # a label image has no name to match: one image against one
    else:
        keys = (lambda im: im.file_name, lambda im: _base(im.file_name), lambda im: _stem(im.file_name),
                lambda im: im.image_id)
        # the key that pairs the most images (the first on a tie): one image named alike on both sides must not
        # keep the others, named apart by folder or extension, from pairing by their stems
        for key in keys:
            pk, gk = _index(P, key), _index(G, key)
            if pk is not None and gk is not None:
                found = [(pk[k], gk[k]) for k in gk if k in pk]
                if len(found) > len(pairs or []):
                    pairs = found
    if not pairs:
        raise EvaluationError(f"expected PRED and GT to share images (by file_name or id), found none: PRED has "
                              f"{_names(P)}, GT has {_names(G)}")
    for p, g in pairs:
        if (p.height, p.width) != (g.height, g.width):
            raise EvaluationError(f"expected PRED and GT images of the same size, {g.name} is {g.height} x "
                                  f"{g.width} px in GT but {p.name} is {p.height} x {p.width} px in PRED")
    return [(g.name, p, g) for p, g in pairs]


def _base(name):
    return None if name is None else PurePosixPath(name.replace("\\", "/")).name


def _stem(name):
    base = _base(name)
    if base is None:
        return None
    for suffix in (".ome.tiff", ".ome.tif"):
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return PurePosixPath(base).stem


def _index(images, key) -> dict | None:
    out = {}
    for im in images:
        k = key(im)
        if k is None or k in out:
            return None  # a key missing or ambiguous on one side cannot pair images
        out[k] = im
    return out


def _names(images) -> str:
    names = [im.name for im in images]
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
