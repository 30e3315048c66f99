"""Annotated images to train on: a user's COCO instance file (`cellseg train --data`) or an image with its instance
label image (the reference recipes' datasets), read into TrainImages.

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

    def __post_init__(self) -> None:
        if self.colour is None:
            self.colour = is_colour(self.image)


def train_image_from_labels(pixels: np.ndarray, labels: np.ndarray) -> TrainImage:
    """A TrainImage from native pixels (H, W, 1 or 3) and an instance label image (H, W; 0 = background), every
    nucleus of class 1; normalised as slides are (preprocess.measure_range on the image)."""
    from scipy import ndimage
    boxes, masks = [], []
    for k, found in enumerate(ndimage.find_objects(labels), start=1):
        if found is None:
            continue
        m = labels[found] == k
        boxes.append((found[0].start, found[1].start, found[0].stop, found[1].stop))
        masks.append(np.ascontiguousarray(m))
    return TrainImage(to_network_input(pixels, measure_range(pixels)), np.asarray(boxes, np.int64).reshape(-1, 4),
                      masks, np.ones(len(masks), np.int64))


def read_image(path: Path) -> np.ndarray:
    """(H, W, C) array for a training image (PNG/JPEG/TIFF), alpha dropped."""
    from ..geometry import Box
    from ..slides import open_slide
    with open_slide(path) as slide:
        info = slide.info
        image = slide.read_region(Box(0, 0, info.height, info.width))
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
                                np.asarray(boxes, np.int64).reshape(-1, 4), masks, np.asarray(cls, np.int64)))
    if items and not any(len(it.masks) for it in items):
        raise CellsegError(f"expected annotated cells (masks) in {ann_path}, found {len(items)} image(s) with none: "
                           f"a model trained on them would find nothing")
    return items, classes


def median_diameter_px(items: list[TrainImage]) -> float:
    """The median equivalent-circle diameter of all instances (px): the bundle's nucleus_diameter_px."""
    areas = [m.sum() for it in items for m in it.masks]
    return float(np.median(2 * np.sqrt(np.asarray(areas) / np.pi))) if areas else 0.0
