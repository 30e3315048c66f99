"""Running the cell Mask R-CNN on tiles: `Detector` (a loaded network on a device) turns normalised tiles into
TileDetections. It provides what the pipeline needs of a detector (instances.TileDetector).

This is the only module (with the training adapter) that sees torchvision's conventions: xyxy float boxes and
28x28 soft masks. Everything it returns is in (row, col) tile pixels. The network is built in network.py.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import MaskRCNN

from .errors import ParameterError
from .instances import TileDetections
from .precision import resolve_precision
from .rcnn_parts import thread_roi_pools
from .slide_norm import fold_slide_norms, measure_slide_norms, reset_slide_norms
from .tiling import TileSpec, owned_box, seam_band_px

log = logging.getLogger(__name__)


def paste_masks_at_box_size(boxes_xyxy: torch.Tensor, mask_probs: torch.Tensor, height: int, width: int,
                            threshold: float = 0.5) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Turn torchvision's (N, 1, M, M) soft masks into tight boolean crops inside a height x width tile.

    Same geometry as torchvision's paste_masks_in_image (1 px padding, box expanded to match) but each mask
    is only as large as its box. Returns (boxes (K, 4) int row0,col0,row1,col1, masks, kept indices).
    """
    boxes_xyxy = boxes_xyxy.float().cpu()
    mask_probs = mask_probs.float().cpu()  # one device->host copy for the whole tile
    n = boxes_xyxy.shape[0]
    if n == 0:
        return np.zeros((0, 4), np.int64), [], np.zeros(0, np.int64)
    m = mask_probs.shape[-1]
    scale = (m + 2) / m
    padded = F.pad(mask_probs[:, 0], (1, 1, 1, 1))
    centre = (boxes_xyxy[:, :2] + boxes_xyxy[:, 2:]) / 2
    half = (boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]) / 2 * scale
    # truncation toward zero, exactly like torchvision's paste_masks_in_image
    exp = torch.cat([centre - half, centre + half], dim=1).to(torch.int64).numpy()
    out_boxes, out_masks, kept = [], [], []
    for i in range(n):
        x0, y0, x1, y1 = exp[i]
        w, h = max(int(x1 - x0 + 1), 1), max(int(y1 - y0 + 1), 1)
        prob = F.interpolate(padded[i][None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        r0, c0 = max(int(y0), 0), max(int(x0), 0)
        r1, c1 = min(int(y0) + h, height), min(int(x0) + w, width)
        if r1 <= r0 or c1 <= c0:
            continue
        crop = (prob[r0 - y0:r1 - y0, c0 - x0:c1 - x0] > threshold).numpy()
        rows, cols = np.flatnonzero(crop.any(1)), np.flatnonzero(crop.any(0))
        if rows.size == 0:
            continue
        tr0, tr1, tc0, tc1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        out_masks.append(np.ascontiguousarray(crop[tr0:tr1, tc0:tc1]))
        out_boxes.append((r0 + tr0, c0 + tc0, r0 + tr1, c0 + tc1))
        kept.append(i)
    boxes = np.asarray(out_boxes, np.int64).reshape(-1, 4)
    return boxes, out_masks, np.asarray(kept, np.int64)


def owned_region_xyxy(tile: TileSpec, scale: float = 1.0) -> tuple[float, float, float, float]:
    """tiling.owned_box of `tile` as torchvision sees it: (x0, y0, x1, y1) in the tile's network px.

    A mask lies inside its (expanded) box, so a box that does not reach this region cannot hold an owned cell, and
    its mask need not be computed. 2 px to spare: centroids are means of pixel indices.
    """
    own, read = owned_box(tile, seam_band_px(tile.halo_px), margin_px=2), tile.read
    return ((own.col0 - read.col0) * scale, (own.row0 - read.row0) * scale,
            (own.col1 - read.col0) * scale, (own.row1 - read.row0) * scale)


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error, not a silent fallback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ParameterError("expected a CUDA GPU for --device cuda, found none (use --device cpu or auto)")
    if device not in ("cpu", "cuda"):
        raise ParameterError(f"expected --device auto, cpu or cuda, got {device!r}")
    return torch.device(device)


@dataclass
class Detector:
    """A loaded network on a device. Feed it normalised tiles, get TileDetections back (an instances.TileDetector).

    The model comes from network.build_model (bundle.Bundle.build): its RoI heads are rcnn_parts.TileRoIHeads.
    """

    model: MaskRCNN
    device: torch.device
    class_names: tuple[str, ...] = ("nucleus",)
    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    batch_size: int = 4
    proposal_threshold: float = 0.0   # RPN objectness below this never reaches the box head
    skip_unowned: bool = True         # boxes wholly outside what their tile can own skip the mask branch
    precision: str = "fp32"           # auto | fp32 | bf16 on a CPU (cellseg.precision); a GPU runs fp16 unless fp32
    _per_tile_body: nn.Module | None = field(default=None, init=False, repr=False)   # the body before folding

    def __post_init__(self) -> None:
        self.model.eval().to(self.device)
        if self.device.type == "cuda":
            self.autocast_dtype = None if self.precision == "fp32" else torch.float16
            self.precision_note = "fp32 as asked" if self.precision == "fp32" else "fp16 autocast on the GPU"
        else:
            chosen, self.precision_note = resolve_precision(self.precision, "cpu")
            # bf16 convolutions and linear layers; RoIAlign pools in fp32 and the predictors hand on fp32 logits
            # and box deltas (rcnn_parts); the slide's GroupNorm statistics are measured in fp32 (calibrate).
            self.autocast_dtype = torch.bfloat16 if chosen == "bf16" else None
        if self.device.type == "cpu":
            # oneDNN convolutions run ~20 % faster on NHWC than NCHW here (measured on the backbone).
            self.model.to(memory_format=torch.channels_last)
            self.model.roi_heads.contiguous_features = True
            thread_roi_pools(self.model)
        # Filter inside torchvision, before the mask head: otherwise every box scoring > 0.05 (4x the kept
        # cells on the example mosaic) goes through the mask branch only to be thrown away here.
        self.model.roi_heads.score_thresh = self.score_threshold
        # Proposals: a cell-free tile needs few, a dense one many; an objectness floor scales the box head's
        # work with the cells present instead of always running it on rpn_post_nms_top_n proposals.
        self.model.rpn.score_thresh = self.proposal_threshold

    @classmethod
    def from_bundle(cls, bundle, device: str, *, score_threshold: float, mask_threshold: float,
                    batch_size: int = 4, precision: str = "fp32") -> Detector:
        """A bundle's network (bundle.Bundle) on `device` (auto|cpu|cuda), with its classes and proposal floor."""
        return cls(bundle.build(), resolve_device(device), class_names=tuple(bundle.model.classes),
                   score_threshold=score_threshold, mask_threshold=mask_threshold, batch_size=batch_size,
                   proposal_threshold=bundle.proposal_threshold, precision=precision)

    @torch.no_grad()
    def calibrate(self, windows: Sequence[np.ndarray]) -> None:
        """Fix the backbone's GroupNorm statistics for one slide from `windows` (normalised like tiles, all the
        same shape), pooled over all of them. Until `reset_calibration`, every tile uses these statistics,
        folded into the convolutions (slide_norm.fold_slide_norms). A network without SlideGroupNorm is left as is."""
        self.reset_calibration()
        if not windows:
            return
        body = self.model.backbone.body
        batch = [torch.from_numpy(np.ascontiguousarray(w)).to(self.device) for w in windows]
        with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
            measured = measure_slide_norms(body, self.model.transform(batch)[0].tensors)
        if not measured:
            return
        folded = fold_slide_norms(body)
        if self.device.type == "cpu":
            folded.to(memory_format=torch.channels_last)
        self._per_tile_body, self.model.backbone.body = body, folded

    def reset_calibration(self) -> None:
        """Back to per-tile GroupNorm statistics (as in training)."""
        if self._per_tile_body is not None:
            self.model.backbone.body, self._per_tile_body = self._per_tile_body, None
        reset_slide_norms(self.model.backbone.body)

    @torch.inference_mode()
    def detect(self, images: Sequence[np.ndarray], tiles: Sequence[TileSpec] | None = None,
               scale: float = 1.0) -> list[TileDetections]:
        """images: float32 (3, h, w) arrays, already normalised (see preprocess.py); any sizes.

        When the pipeline resampled the tiles by `scale` (network px per slide px), pass their TileSpecs:
        masks are then pasted straight at slide resolution inside each tile's read box, so a cell is
        never blocky from a nearest-neighbour upsampling of a thresholded mask.
        """
        results: list[TileDetections | None] = [None] * len(images)
        # Only same-size tiles share a forward pass: torchvision zero-pads a batch to its largest image, and
        # with GroupNorm the padding shifts every feature of the smaller tile, so a cell's mask would depend
        # on which tiles happened to share its batch (and so on the tissue filter and the tile size).
        by_shape: dict[tuple, list[int]] = {}
        for i, im in enumerate(images):
            by_shape.setdefault(tuple(im.shape), []).append(i)
        for indices in by_shape.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                for i, det in zip(chunk, self._detect_batch([images[i] for i in chunk],
                                                            None if tiles is None else [tiles[i] for i in chunk],
                                                            scale)):
                    results[i] = det
        return results

    def _detect_batch(self, images: Sequence[np.ndarray], tiles: Sequence[TileSpec] | None,
                      scale: float) -> list[TileDetections]:
        """One forward pass over same-size images."""
        batch = [torch.from_numpy(np.ascontiguousarray(im)).to(self.device, non_blocking=True) for im in images]
        # Boxes that lie wholly outside what their tile can own skip the mask branch (rcnn_parts.TileRoIHeads).
        self.model.roi_heads.owned_regions = (
            [owned_region_xyxy(t, scale) for t in tiles] if tiles is not None and self.skip_unowned else None)
        try:
            with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype or torch.float32,
                                enabled=self.autocast_dtype is not None):
                outputs = self.model(batch)
        finally:
            self.model.roi_heads.owned_regions = None
        results = []
        for k, (image, out) in enumerate(zip(batch, outputs)):
            if scale != 1.0 and tiles is not None:
                read = tiles[k].read
                out = dict(out, boxes=out["boxes"] / scale)
                results.append(self._to_tile_detections(out, read.height, read.width))
            else:
                results.append(self._to_tile_detections(out, image.shape[-2], image.shape[-1]))
        return results

    def _to_tile_detections(self, out: dict, height: int, width: int) -> TileDetections:
        keep = out["scores"] >= self.score_threshold
        boxes, masks, kept = paste_masks_at_box_size(out["boxes"][keep], out["masks"][keep], height, width,
                                                     self.mask_threshold)
        scores = out["scores"][keep].float().cpu().numpy()[kept].astype(np.float32)
        labels = out["labels"][keep].cpu().numpy()[kept].astype(np.int64)
        return TileDetections(boxes, masks, scores, labels)
