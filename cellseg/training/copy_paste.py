"""Copy-paste augmentation (Ghiasi et al., "Simple Copy-Paste is a Strong Data Augmentation Method for Instance
Segmentation", CVPR 2021): real nuclei, cut out with their masks, pasted into a training crop, to build the
configurations the model misses on dense tissue (issue 47): nuclei touching their neighbours, clusters, and dim or
pale nuclei beside bright ones.

The donors are nuclei of the crop's own image, resampled by the crop's zoom: same modality, stain, focus and scale
as the crop, so a pasted nucleus looks like one that could be there. A pasted nucleus never covers a nucleus that
is there (so every annotation stays whole and no pixel gets two labels); "touching" ones are placed against a
nucleus of the crop, or against one pasted before them, which grows clusters. "Dim" ones are blended with what lies
under them (alpha < 1): a weakly stained or out-of-plane nucleus, bright or dark by the modality's polarity.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .augment import Augmentation
from .data import TrainImage


def donor_nucleus(item: TrainImage, index: int, scale: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Nucleus `index` of `item` cut out at the crop's zoom (row, column factors): pixels (C, h, w) float32, mask
    (h, w) bool. Pixels bilinear (antialiased when shrinking), mask by the nearest pixel centre, as sample_crop
    resamples a crop and its masks."""
    r0, c0, r1, c1 = (int(v) for v in item.boxes[index])
    mask = item.masks[index]
    patch = torch.from_numpy(np.ascontiguousarray(item.image[:, r0:r1, c0:c1]))
    h, w = mask.shape
    out_h, out_w = max(1, round(h * scale[0])), max(1, round(w * scale[1]))
    if (out_h, out_w) != (h, w):
        patch = F.interpolate(patch[None], size=(out_h, out_w), mode="bilinear", align_corners=False,
                              antialias=min(scale) < 1)[0]
        rows = np.minimum(((np.arange(out_h) + 0.5) * h / out_h).astype(np.int64), h - 1)
        cols = np.minimum(((np.arange(out_w) + 0.5) * w / out_w).astype(np.int64), w - 1)
        mask = mask[np.ix_(rows, cols)]
    return patch.numpy(), np.ascontiguousarray(mask)


def _touching_position(anchor: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner putting a patch of `shape` against the nucleus `anchor` (a full-crop mask): from the anchor's
    centre, along a random direction, a little under the sum of the two radii (paste_nuclei tries another direction
    while the nucleus would overlap one already there)."""
    rr, cc = np.nonzero(anchor)
    centre = np.array([rr.mean(), cc.mean()])
    radius = np.sqrt(len(rr) / np.pi)
    angle = rng.uniform(0, 2 * np.pi)
    direction = np.array([np.sin(angle), np.cos(angle)])
    own = np.sqrt(shape[0] * shape[1] / np.pi) * 0.9
    at = centre + direction * (radius + own) * rng.uniform(0.75, 0.95)
    return int(round(at[0] - shape[0] / 2)), int(round(at[1] - shape[1] / 2))


def paste_nuclei(image: np.ndarray, masks: np.ndarray, classes: np.ndarray, donor: TrainImage,
                 scale: tuple[float, float], rng: np.random.Generator,
                 aug: Augmentation) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paste up to U(paste_count) nuclei of `donor` into a crop (image (C, H, W) float32, masks (N, H, W) bool,
    classes (N,)); returns them with the pasted nuclei appended (masks and classes in the same order). Nuclei that
    would reach beyond the crop or cover a nucleus already there are tried elsewhere, then skipped."""
    if not len(donor.boxes):
        return image, masks, classes
    _, H, W = image.shape
    out = image.copy()
    occupied = masks.any(0) if len(masks) else np.zeros((H, W), bool)
    anchors = [m for m in masks if m.any()]     # a crop may keep a nucleus it cut to no pixels: no anchor
    added, added_classes = [], []
    for _ in range(int(rng.integers(aug.paste_count[0], aug.paste_count[1] + 1))):
        index = int(rng.integers(len(donor.boxes)))
        patch, mask = donor_nucleus(donor, index, scale)
        h, w = mask.shape
        if mask.sum() < 4 or h >= H or w >= W:
            continue
        touching = bool(anchors) and rng.random() < aug.paste_touch_p
        for _attempt in range(8):
            if touching:
                r, c = _touching_position(anchors[int(rng.integers(len(anchors)))], (h, w), rng)
            else:
                r, c = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            if 0 <= r <= H - h and 0 <= c <= W - w and not (occupied[r:r + h, c:c + w] & mask).any():
                break
        else:
            continue
        alpha = rng.uniform(*aug.paste_dim_alpha) if rng.random() < aug.paste_dim_p else 1.0
        region = out[:, r:r + h, c:c + w]
        region[:, mask] = alpha * patch[:, mask] + (1 - alpha) * region[:, mask]
        placed = np.zeros((H, W), bool)
        placed[r:r + h, c:c + w] = mask
        occupied |= placed
        anchors.append(placed)
        added.append(placed)
        added_classes.append(donor.class_ids[index])
    if not added:
        return image, masks, classes
    return (out, np.concatenate([masks.reshape(-1, H, W), np.stack(added)]),
            np.concatenate([classes, np.asarray(added_classes, classes.dtype)]))
