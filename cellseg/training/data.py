"""Annotated images to train on: a user's COCO instance file or folder of images with label images (`cellseg train
--data`), or an image with its instance label image (the reference recipes' datasets), read into TrainImages.

Each instance is kept as a mask cropped to its box (never N full-image masks); pixels are normalised as slides are
(preprocess.measure_range, to_network_input), so the network trains on what it will count.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CellsegError
from ..planning import measure_range, to_network_input
from .augment import is_colour


@dataclass
class TrainImage:
    """One annotated image: normalised pixels and its instances as (box, cropped mask) pairs."""

    image: np.ndarray          # float32 (3, H, W) in [0, 1]
    boxes: np.ndarray          # (N, 4) int row0, col0, row1, col1
    masks: list[np.ndarray]    # N bool crops
    class_ids: np.ndarray      # (N,) int64 >= 1
    colour: bool | None = None  # channels differ (None: found from the pixels); grayscale stays gray in training
    source: str | None = None   # the image file it came from (load_coco), for messages and held-out windows
    # the window (row0, col0, row1, col1) of `source` it is, where a slide's field; None: all of it (or an image
    # made from another by window_of or resample, which is neither)
    window: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.colour is None:
            self.colour = is_colour(self.image)


def train_image_from_labels(pixels: np.ndarray, labels: np.ndarray, source: str | None = None) -> TrainImage:
    """A TrainImage from native pixels (H, W, 1 or 3) and an instance label image (H, W; 0 = background), every
    nucleus of class 1; normalised as slides are (preprocess.measure_range on the image)."""
    from scipy import ndimage
    values, inverse = np.unique(labels, return_inverse=True)
    if values.size and values[-1] > values.size:    # sparse values (65535, 2**31): find_objects lists every one
        labels = (inverse.reshape(labels.shape) + (0 if values[0] == 0 else 1)).astype(np.int32)
    boxes, masks = [], []
    for k, found in enumerate(ndimage.find_objects(labels), start=1):
        if found is None:
            continue
        m = labels[found] == k
        boxes.append((found[0].start, found[1].start, found[0].stop, found[1].stop))
        masks.append(np.ascontiguousarray(m))
    return TrainImage(to_network_input(pixels, measure_range(pixels)), np.asarray(boxes, np.int64).reshape(-1, 4),
                      masks, np.ones(len(masks), np.int64), source=source)


def read_image(path: Path, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """(H, W, C) array for a training image (PNG/JPEG/TIFF, or the `window` (row0, col0, row1, col1) of any slide),
    alpha dropped."""
    from ..geometry import Box
    from ..slides import open_slide
    with open_slide(path) as slide:
        info = slide.info
        image = slide.read_region(Box(*window) if window else Box(0, 0, info.height, info.width))
    if image.shape[-1] == 4:
        image = image[..., :3]
    if image.shape[-1] not in (1, 3):
        image = image[..., :1]
    return image


def load_coco(ann_path: Path, image_ids: set[int] | None = None) -> tuple[list[TrainImage], list[str]]:
    """Images and instances of a COCO instance-segmentation file (polygons or RLE, decoded by pycocotools);
    file_name relative to the file's folder. Crowd regions are not trained on. Everything is checked before
    the first image is read: one-line errors for a file that is not COCO, missing images, unknown categories."""
    import pycocotools.mask as mask_utils

    from ..evaluation import annotation_rle, coco_image_paths, coco_images, read_coco_json
    ann_path = Path(ann_path)
    if not ann_path.is_file():
        raise CellsegError(f"expected a COCO annotation JSON file, found no {ann_path}")
    data = read_coco_json(ann_path)
    images = coco_images(ann_path, data)
    categories = data.get("categories") if isinstance(data, dict) else None
    if not (isinstance(categories, list) and categories and all(isinstance(c, dict) and "id" in c
                                                                for c in categories)):
        raise CellsegError(f"expected a 'categories' list (each with an 'id' and a 'name') in {ann_path}, found "
                           f"{str(categories)[:60]}")
    names = {c["id"]: str(c.get("name", c["id"])) for c in categories}
    cat_ids = sorted(names)
    classes = [names[i] for i in cat_ids]
    cat_to_class = {c: i + 1 for i, c in enumerate(cat_ids)}
    chosen = sorted(i for i in images if image_ids is None or i in image_ids)
    for i in chosen:
        for ann in images[i]["anns"]:
            if ann.get("category_id") not in cat_to_class:
                raise CellsegError(f"expected annotation {ann.get('id', '?')} of {ann_path} to have one of the "
                                   f"listed category ids {cat_ids}, found {ann.get('category_id')!r}")
    paths = coco_image_paths(ann_path, [images[i]["file_name"] for i in chosen])
    items = []
    for img_id in chosen:
        info = images[img_id]
        h, w = info["height"], info["width"]
        path = paths[str(info["file_name"])]
        image = read_image(path)
        if image.shape[:2] != (h, w):
            raise CellsegError(f"expected {path} to be {h} x {w} px as {ann_path} says, found "
                               f"{image.shape[0]} x {image.shape[1]} px: its masks would not fit it")
        boxes, masks, cls = [], [], []
        for ann in info["anns"]:
            if ann.get("iscrowd", 0):
                continue
            full = mask_utils.decode(annotation_rle(ann_path, ann, h, w)).astype(bool)
            rows, cols = np.flatnonzero(full.any(1)), np.flatnonzero(full.any(0))
            if rows.size == 0:
                continue
            r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
            boxes.append((r0, c0, r1, c1))
            masks.append(full[r0:r1, c0:c1].copy())
            cls.append(cat_to_class[ann["category_id"]])
        items.append(TrainImage(to_network_input(image, measure_range(image)),
                                np.asarray(boxes, np.int64).reshape(-1, 4), masks, np.asarray(cls, np.int64),
                                source=str(path)))
    if items and not any(len(it.masks) for it in items):
        raise CellsegError(f"expected annotated cells (masks) in {ann_path}, found {len(items)} image(s) with none: "
                           f"a model trained on them would find nothing")
    return items, classes


def load_annotations(source: Path) -> tuple[list[TrainImage], list[str]]:
    """The annotated images to train on: a COCO instance file (load_coco) or a folder of images with their label
    images or QuPath GeoJSON (evaluation.label_pairs: Cellpose's, StarDist's, QuPath's layouts; a slide's field
    rectangles), every nucleus of class "nucleus". Each label image is checked against its image before any is
    used."""
    from ..evaluation.label_pairs import LAYOUT_TEXT, annotated_fields, is_label_folder
    source = Path(source)
    if not source.exists():
        raise CellsegError(f"expected {LAYOUT_TEXT}, found no {source}")
    if not is_label_folder(source):
        return load_coco(source)
    items = []
    for field in annotated_fields(source):
        pixels = read_image(field.image, field.window)
        item = train_image_from_labels(pixels, field.labels(pixels.shape[:2]), source=str(field.image))
        item.window = field.window
        items.append(item)
    if not any(len(it.masks) for it in items):
        raise CellsegError(f"expected annotated cells in {source}, found {len(items)} image(s) with none: a model "
                           f"trained on them would find nothing")
    return items, ["nucleus"]


def median_diameter_px(items: list[TrainImage], draw_p: np.ndarray | None = None) -> float:
    """The median equivalent-circle diameter (px) of the nuclei the network is shown: the bundle's
    nucleus_diameter_px, the size a count resamples nuclei to. Each image's nuclei share the probability that a crop
    comes from it (draw_p; all images alike when None), so a dataset of many large nuclei that is seldom drawn does not
    set it: pooled over nuclei, the v4 data's median was 25.6 px (NuInsSeg's ~23,000 nuclei of ~33 px, 13 % of the
    draws) against v3's 20.8."""
    draw_p = np.full(len(items), 1 / max(len(items), 1)) if draw_p is None else np.asarray(draw_p, float)
    diameters, weights = [], []
    for item, p in zip(items, draw_p):
        if item.masks and p > 0:
            d = 2 * np.sqrt(np.array([m.sum() for m in item.masks], float) / np.pi)
            diameters.append(d)
            weights.append(np.full(len(d), p / len(d)))
    if not diameters:
        return 0.0
    d, w = np.concatenate(diameters), np.concatenate(weights)
    order = np.argsort(d, kind="stable")
    d, w = d[order], w[order]
    # each nucleus at the middle of its share of the weight: with equal weights this is np.median
    return float(np.interp(0.5, (np.cumsum(w) - w / 2) / w.sum(), d))


def window_of(item: TrainImage, row0: int, col0: int, row1: int, col1: int) -> TrainImage:
    """The part of `item` inside the half-open window: its pixels, and its instances clipped to it (those left
    without a pixel dropped)."""
    boxes, masks, keep = [], [], []
    for k, (box, mask) in enumerate(zip(item.boxes, item.masks)):
        r0, c0, r1, c1 = (int(v) for v in box)
        a0, b0, a1, b1 = max(r0, row0), max(c0, col0), min(r1, row1), min(c1, col1)
        if a0 >= a1 or b0 >= b1:
            continue
        clipped = mask[a0 - r0:a1 - r0, b0 - c0:b1 - c0]
        if clipped.any():
            t0, t1, u0, u1 = _tight(clipped)
            boxes.append((a0 - row0 + t0, b0 - col0 + u0, a0 - row0 + t1, b0 - col0 + u1))
            masks.append(np.ascontiguousarray(clipped[t0:t1, u0:u1]))
            keep.append(k)
    return TrainImage(np.ascontiguousarray(item.image[:, row0:row1, col0:col1]),
                      np.asarray(boxes, np.int64).reshape(-1, 4), masks, np.asarray(item.class_ids)[keep],
                      colour=item.colour, source=item.source)


def resample(item: TrainImage, factor: float) -> TrainImage:
    """`item` resampled by `factor` (2: twice as many px a side), as `cellseg count` resamples a slide for the
    network (bicubic when enlarging, bilinear smoothed before shrinking: planning.intensity.as_network_input); each
    mask is sampled at its own box at the output pixels' centres, and a nucleus left without a pixel is dropped."""
    if factor == 1:
        return item
    _, height, width = item.image.shape
    h, w = max(1, round(height * factor)), max(1, round(width * factor))
    pixels = np.moveaxis(item.image, 0, -1)
    if factor > 1:
        from ..planning.intensity import enlarged
        image = np.clip(enlarged(pixels, (h, w)), item.image.min(), item.image.max())   # bicubic overshoots
    else:
        from skimage.transform import resize
        image = resize(pixels, (h, w), order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)
    src_row = np.minimum(((np.arange(h) + 0.5) * height / h).astype(np.int64), height - 1)
    src_col = np.minimum(((np.arange(w) + 0.5) * width / w).astype(np.int64), width - 1)
    boxes, masks, keep = [], [], []
    for k, (box, mask) in enumerate(zip(item.boxes, item.masks)):
        r0, c0, r1, c1 = (int(v) for v in box)
        a0, a1 = np.searchsorted(src_row, [r0, r1])         # output rows whose source row is in the box
        b0, b1 = np.searchsorted(src_col, [c0, c1])
        if a0 >= a1 or b0 >= b1:
            continue
        m = mask[np.ix_(src_row[a0:a1] - r0, src_col[b0:b1] - c0)]
        if m.any():
            t0, t1, u0, u1 = _tight(m)
            boxes.append((a0 + t0, b0 + u0, a0 + t1, b0 + u1))
            masks.append(np.ascontiguousarray(m[t0:t1, u0:u1]))
            keep.append(k)
    return TrainImage(np.ascontiguousarray(np.moveaxis(image, -1, 0)), np.asarray(boxes, np.int64).reshape(-1, 4),
                      masks, np.asarray(item.class_ids)[keep], colour=item.colour, source=item.source)


def _tight(mask: np.ndarray) -> tuple[int, int, int, int]:
    """A non-empty mask's own bounding rows and columns (r0, r1, c0, c1), half-open."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
