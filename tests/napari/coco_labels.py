"""What the napari tests share: a COCO file decoded back into label images, by pycocotools alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils


def decoded_labels(annotations: Path) -> dict[str, np.ndarray]:
    """{file_name: label image} of a COCO instance file: its k-th annotation of an image is label k there.
    AssertionError when two annotations of an image overlap (a label image cannot hold them)."""
    coco = json.loads(Path(annotations).read_text())
    out = {}
    for image in coco["images"]:
        labels = np.zeros((image["height"], image["width"]), np.int64)
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        for k, ann in enumerate(anns, start=1):
            mask = mask_utils.decode(ann["segmentation"]).astype(bool)
            assert not (labels[mask] > 0).any(), f"annotation {ann['id']} overlaps another"
            labels[mask] = k
        out[image["file_name"]] = labels
    return out
