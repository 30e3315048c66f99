"""Mask R-CNN for dense cells: building the network and running it on tiles.

This is the only module (with the training adapter) that sees torchvision's conventions:
xyxy float boxes and 28x28 soft masks. Everything it returns is in (row, col) tile pixels.

torchvision's defaults silently break dense microscopy (DESIGN.md §5), so the network is built with:
no resize (tiles run at the scale they are given), thousands of detections per tile, anchors of
8-128 px, and masks pasted at box size rather than onto N full-tile canvases.
"""

from __future__ import annotations

import copy
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .errors import ParameterError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a cell Mask R-CNN; stored in a bundle's model.toml [model] table."""

    backbone: str = "resnet18"          # resnet18 | resnet34 | resnet50
    norm: str = "groupnorm"             # groupnorm (trains from scratch with small batches) | frozen_bn (COCO init)
    fpn_channels: int = 128
    box_head_size: int = 512
    classes: tuple[str, ...] = ("nucleus",)   # foreground classes; class id k >= 1 is classes[k-1]
    anchor_sizes: tuple[int, ...] = (8, 16, 32, 64, 128)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    detections_per_tile: int = 3000
    rpn_pre_nms_top_n_test: int = 6000
    rpn_post_nms_top_n_test: int = 3000
    rpn_pre_nms_top_n_train: int = 4000
    rpn_post_nms_top_n_train: int = 2000
    box_batch_size_per_image: int = 256
    box_nms_thresh: float = 0.4

    @property
    def num_classes(self) -> int:
        return len(self.classes) + 1

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model keys {sorted(unknown)}; expected some of {sorted(known)}")
        tupled = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**tupled)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in self.__dict__.items()}


class _TileTransform(GeneralizedRCNNTransform):
    """Normalise and batch only: no resize in, no full-image mask pasting out."""

    def resize(self, image, target=None):
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        return result  # boxes in input pixels (no resize happened), masks left at 28x28


class SlideGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics can be fixed for a whole slide (same parameters and state dict keys).

    Plain GroupNorm normalises each tile by that tile's own mean and variance, so a cell's features depend on
    what else its tile holds: on the tile size, and on whether the tile is busy or sparse. After `calibrate`
    (Detector.calibrate) the statistics measured once on a few windows of the slide are used for every tile,
    and the backbone becomes a plain convolution of the slide: a cell is seen the same in any tile.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__(num_groups, num_channels, eps, affine)
        self.calibrating = False
        self.slide_stats: tuple[torch.Tensor, torch.Tensor] | None = None   # per-group (mean, var)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:   # one set of statistics for the whole batch of calibration windows
            grouped = x.float().reshape(x.shape[0], self.num_groups, -1)
            var, mean = torch.var_mean(grouped, dim=(0, 2), unbiased=False)
            self.slide_stats = (mean, var)
        if self.slide_stats is None:
            return super().forward(x)
        scale, shift = (t.to(x.dtype) for t in self.affine_terms())
        return x * scale[None, :, None, None] + shift[None, :, None, None]

    def affine_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """With the slide's statistics the layer is y = x * scale + shift per channel: (scale, shift)."""
        mean, var = self.slide_stats
        per_group = self.num_channels // self.num_groups
        scale = (var + self.eps).rsqrt().repeat_interleave(per_group) * self.weight
        return scale, self.bias - mean.repeat_interleave(per_group) * scale


def fold_slide_norms(body: nn.Module) -> nn.Module:
    """A copy of `body` in which each calibrated SlideGroupNorm that directly follows a convolution (torchvision's
    ResNet layout: conv1/bn1, conv2/bn2, downsample 0/1) is folded into that convolution's weights and bias.

    Same output (to float rounding), one pass over each feature map less: ~13 % of the backbone's CPU time.
    """
    folded = copy.deepcopy(body)
    for parent in folded.modules():
        previous = None
        for name, child in list(parent.named_children()):
            if isinstance(child, SlideGroupNorm) and child.slide_stats is not None and isinstance(previous, nn.Conv2d):
                scale, shift = child.affine_terms()
                bias = shift if previous.bias is None else previous.bias * scale + shift
                previous.weight = nn.Parameter(previous.weight * scale[:, None, None, None], requires_grad=False)
                previous.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
                setattr(parent, name, nn.Identity())
            previous = child
    return folded


def _norm_layer(kind: str):
    if kind == "groupnorm":
        return lambda channels: SlideGroupNorm(32, channels)
    if kind == "frozen_bn":
        from torchvision.ops import FrozenBatchNorm2d
        return FrozenBatchNorm2d
    raise ValueError(f"unknown norm {kind!r}; expected groupnorm or frozen_bn")


def build_model(cfg: ModelConfig) -> MaskRCNN:
    """A randomly initialised Mask R-CNN for cells. Never downloads anything."""
    constructors = {"resnet18": resnet.resnet18, "resnet34": resnet.resnet34, "resnet50": resnet.resnet50}
    if cfg.backbone not in constructors:
        raise ValueError(f"unknown backbone {cfg.backbone!r}; expected one of {sorted(constructors)}")
    body = constructors[cfg.backbone](weights=None, norm_layer=_norm_layer(cfg.norm))
    stage_channels = [body.inplanes // 8, body.inplanes // 4, body.inplanes // 2, body.inplanes]
    backbone = BackboneWithFPN(
        body, return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=stage_channels, out_channels=cfg.fpn_channels, extra_blocks=LastLevelMaxPool())
    if len(cfg.anchor_sizes) != 5:
        raise ValueError(f"expected 5 anchor sizes (one per FPN level), got {cfg.anchor_sizes}")
    anchors = AnchorGenerator(sizes=tuple((s,) for s in cfg.anchor_sizes),
                              aspect_ratios=(tuple(cfg.aspect_ratios),) * 5)
    c = cfg.fpn_channels
    model = MaskRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchors,
        box_head=TwoMLPHead(c * 7 * 7, cfg.box_head_size),
        box_predictor=FastRCNNPredictor(cfg.box_head_size, cfg.num_classes),
        mask_head=MaskRCNNHeads(c, (c, c, c, c), 1),
        mask_predictor=MaskRCNNPredictor(c, c, cfg.num_classes),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        box_detections_per_img=cfg.detections_per_tile,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_nms_thresh=cfg.box_nms_thresh,
        box_score_thresh=0.05,
    )
    model.transform = _TileTransform(min_size=1, max_size=1 << 30, image_mean=list(cfg.image_mean),
                                     image_std=list(cfg.image_std), size_divisible=32)
    return model


@dataclass
class TileDetections:
    """Cells found in one tile, in that tile's pixel frame (row, col), masks cropped to their boxes.

    boxes: (N, 4) int64 half-open (row0, col0, row1, col1), tight around each mask.
    masks: N bool arrays, masks[i].shape == (row1 - row0, col1 - col0).
    scores: (N,) float32 in [0, 1]; class_ids: (N,) int64, >= 1.
    """

    boxes: np.ndarray
    masks: list[np.ndarray]
    scores: np.ndarray
    class_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.masks)

    @classmethod
    def empty(cls) -> "TileDetections":
        return cls(np.zeros((0, 4), np.int64), [], np.zeros(0, np.float32), np.zeros(0, np.int64))


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


def owned_region(tile, scale: float = 1.0) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in the tile's network px: the part of the read box whose cells the tile may keep.

    That is the core grown by the seam band (merge.seam_band_px of the tile's halo). A cell whose centroid lies
    outside it is dropped by merge.owned_instances; a mask lies inside its (expanded) box, so a box that does not
    reach this region cannot hold an owned cell, and its mask need not be computed.
    """
    from .merge import seam_band_px   # merge imports this module: import here
    read, core = tile.read, tile.core
    halo = max(core.row0 - read.row0, read.row1 - core.row1, core.col0 - read.col0, read.col1 - core.col1)
    band = seam_band_px(halo) + 2      # + 2 px: centroids are means of pixel indices; stay on the safe side
    return ((core.col0 - band - read.col0) * scale, (core.row0 - band - read.row0) * scale,
            (core.col1 + band - read.col0) * scale, (core.row1 + band - read.row0) * scale)


def _drop_boxes_outside_regions(roi_heads) -> None:
    """Wrap torchvision's RoIHeads.postprocess_detections (which runs before the mask branch) so that, when
    `roi_heads.cellseg_regions` holds a region per image, boxes whose expanded mask extent misses it are dropped."""
    if getattr(roi_heads, "_cellseg_wrapped", False):
        return
    original = roi_heads.postprocess_detections

    def postprocess(class_logits, box_regression, proposals, image_shapes):
        boxes, scores, labels = original(class_logits, box_regression, proposals, image_shapes)
        regions = getattr(roi_heads, "cellseg_regions", None)
        if regions is None:
            return boxes, scores, labels
        for i, (x0, y0, x1, y1) in enumerate(regions):
            b = boxes[i]
            centre = (b[:, :2] + b[:, 2:]) / 2
            half = (b[:, 2:] - b[:, :2]) / 2 * _MASK_EXPANSION + 1   # the paste's padded extent, + 1 px
            keep = ((centre[:, 0] + half[:, 0] > x0) & (centre[:, 0] - half[:, 0] < x1)
                    & (centre[:, 1] + half[:, 1] > y0) & (centre[:, 1] - half[:, 1] < y1))
            boxes[i], scores[i], labels[i] = b[keep], scores[i][keep], labels[i][keep]
        return boxes, scores, labels

    roi_heads.postprocess_detections = postprocess
    roi_heads._cellseg_wrapped = True


def _contiguous_features_for_roi_align(roi_heads) -> None:
    """RoIAlign's CPU kernel works on NCHW: given channels_last features it copies a whole level per call, once
    for the box head and again for the mask head. Convert each level once instead."""
    if getattr(roi_heads, "_cellseg_contiguous", False):
        return
    original = roi_heads.forward

    def forward(features, proposals, image_shapes, targets=None):
        return original({k: v.contiguous() for k, v in features.items()}, proposals, image_shapes, targets)

    roi_heads.forward = forward
    roi_heads._cellseg_contiguous = True


class ThreadedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """MultiScaleRoIAlign that, on CPU, splits its RoIs across threads: torchvision's CPU RoIAlign kernels (forward
    and backward) run on one core: ~14 % of a tile's CPU time in inference, mostly the box head's ~1000 proposals,
    and ~21 % of a training step in the backward pass. The RoIs, in their image-major order, are cut into
    contiguous runs, each pooled by a thread (the kernels release the GIL); the outputs concatenated in order are
    exactly the single call's. In training the gradient of each run is computed in its thread too, and summed.
    """

    min_rois_per_thread = 32
    _pool: ThreadPoolExecutor | None = None

    @classmethod
    def replacing(cls, pooler: MultiScaleRoIAlign) -> "ThreadedMultiScaleRoIAlign":
        threaded = cls(pooler.featmap_names, pooler.output_size, pooler.sampling_ratio,
                       canonical_scale=pooler.canonical_scale, canonical_level=pooler.canonical_level)
        threaded.scales, threaded.map_levels = pooler.scales, pooler.map_levels
        return threaded

    def forward(self, x, boxes, image_shapes):
        n = [len(b) for b in boxes]
        threads = min(torch.get_num_threads(), sum(n) // self.min_rois_per_thread)
        first = next(iter(x.values()))
        if threads < 2 or first.device.type != "cpu" or self.scales is None:   # scales are set on the first call
            return super().forward(x, boxes, image_shapes)
        cuts = np.linspace(0, sum(n), threads + 1).round().astype(int)
        offsets = np.r_[0, np.cumsum(n)]
        runs = [[b[max(lo - o, 0):max(min(hi - o, len(b)), 0)] for b, o in zip(boxes, offsets)]
                for lo, hi in zip(cuts[:-1], cuts[1:])]
        if ThreadedMultiScaleRoIAlign._pool is None:
            ThreadedMultiScaleRoIAlign._pool = ThreadPoolExecutor(max(2, os.cpu_count() or 2),
                                                                  thread_name_prefix="cellseg-roialign")
        names = list(self.featmap_names)
        levels = [x[k] for k in names]
        if torch.is_grad_enabled() and any(t.requires_grad for t in levels):
            return _PoolRunsInThreads.apply(self, runs, image_shapes, names, *levels)
        inference = torch.is_inference_mode_enabled()   # thread-local: carried into the workers

        def pool(run):
            with torch.inference_mode(inference), torch.no_grad():
                return self._pool_one_run(dict(zip(names, levels)), run, image_shapes)
        return torch.cat(list(self._pool.map(pool, runs)))

    def _pool_one_run(self, x, run, image_shapes):
        return super().forward(x, run, image_shapes)


class _PoolRunsInThreads(torch.autograd.Function):
    """ThreadedMultiScaleRoIAlign with gradients: forward pools each run in a thread; backward re-pools each run
    in a thread with autograd on (the forward is ~1/8 of the backward's cost) and sums the runs' gradients."""

    @staticmethod
    def forward(ctx, pooler, runs, image_shapes, names, *levels):
        ctx.pooler, ctx.runs, ctx.image_shapes, ctx.names = pooler, runs, image_shapes, names
        ctx.save_for_backward(*levels)

        def pool(run):
            with torch.no_grad():
                return pooler._pool_one_run(dict(zip(names, levels)), run, image_shapes)
        outs = list(pooler._pool.map(pool, runs))
        ctx.sizes = [len(o) for o in outs]
        return torch.cat(outs)

    @staticmethod
    def backward(ctx, grad_out):
        levels = ctx.saved_tensors

        def grad_of(run, grad):
            leaves = [t.detach().requires_grad_() for t in levels]
            with torch.enable_grad():
                out = ctx.pooler._pool_one_run(dict(zip(ctx.names, leaves)), run, ctx.image_shapes)
            return torch.autograd.grad(out, leaves, grad, allow_unused=True)
        per_run = list(ctx.pooler._pool.map(grad_of, ctx.runs, grad_out.split(ctx.sizes)))
        totals = []
        for k in range(len(levels)):
            parts = [g[k] for g in per_run if g[k] is not None]
            total = parts[0] if parts else None
            for g in parts[1:]:
                total.add_(g)   # each run's gradient is a fresh full-size tensor: add in place, no stacked copy
            totals.append(total)
        return (None, None, None, None, *totals)


def thread_roi_pools(model: MaskRCNN) -> None:
    """Give the box and mask heads ThreadedMultiScaleRoIAlign poolers (CPU models; same results)."""
    heads = model.roi_heads
    for name in ("box_roi_pool", "mask_roi_pool"):
        pooler = getattr(heads, name)
        if type(pooler) is MultiScaleRoIAlign:
            setattr(heads, name, ThreadedMultiScaleRoIAlign.replacing(pooler))


_MASK_EXPANSION = 30 / 28   # paste_masks_at_box_size pads the 28 x 28 mask by 1 px: the box grows by (M + 2) / M


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
    """A loaded network on a device. Feed it normalised tiles, get TileDetections back."""

    model: MaskRCNN
    device: torch.device
    class_names: tuple[str, ...] = ("nucleus",)
    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    batch_size: int = 4
    proposal_threshold: float = 0.0   # RPN objectness below this never reaches the box head
    skip_unowned: bool = True         # boxes wholly outside what their tile can own skip the mask branch
    tiles_seen: int = field(default=0, init=False)
    calibrated: bool = field(default=False, init=False)   # slide-level normalisation statistics set
    _per_tile_body: nn.Module | None = field(default=None, init=False, repr=False)   # the body before folding

    def __post_init__(self) -> None:
        self.model.eval().to(self.device)
        if self.device.type == "cpu":
            # oneDNN convolutions run ~20 % faster on NHWC than NCHW here (measured on the backbone).
            self.model.to(memory_format=torch.channels_last)
            _contiguous_features_for_roi_align(self.model.roi_heads)
            thread_roi_pools(self.model)
        # Filter inside torchvision, before the mask head: otherwise every box scoring > 0.05 (4x the kept
        # cells on the example mosaic) goes through the mask branch only to be thrown away here.
        self.model.roi_heads.score_thresh = self.score_threshold
        # Proposals: a cell-free tile needs few, a dense one many; an objectness floor scales the box head's
        # work with the cells present instead of always running it on rpn_post_nms_top_n proposals.
        self.model.rpn.score_thresh = self.proposal_threshold
        _drop_boxes_outside_regions(self.model.roi_heads)

    @torch.no_grad()
    def calibrate(self, windows: Sequence[np.ndarray]) -> None:
        """Fix the backbone's GroupNorm statistics for one slide from `windows` (normalised like tiles, all the
        same shape), pooled over all of them. Until `reset_calibration`, every tile uses these statistics,
        folded into the convolutions (fold_slide_norms)."""
        self.reset_calibration()
        body = self.model.backbone.body
        norms = [m for m in body.modules() if isinstance(m, SlideGroupNorm)]
        if not norms or not windows:
            return
        for m in norms:
            m.calibrating = True
        try:
            batch = [torch.from_numpy(np.ascontiguousarray(w)).to(self.device) for w in windows]
            with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
                body(self.model.transform(batch)[0].tensors)
        finally:
            for m in norms:
                m.calibrating = False
        folded = fold_slide_norms(body)
        if self.device.type == "cpu":
            folded.to(memory_format=torch.channels_last)
        self._per_tile_body, self.model.backbone.body = body, folded
        self.calibrated = True

    def reset_calibration(self) -> None:
        """Back to per-tile GroupNorm statistics (as in training)."""
        if self._per_tile_body is not None:
            self.model.backbone.body, self._per_tile_body = self._per_tile_body, None
        for m in self.model.backbone.body.modules():
            if isinstance(m, SlideGroupNorm):
                m.slide_stats = None
        self.calibrated = False

    @torch.inference_mode()
    def detect(self, images: Sequence[np.ndarray], tiles: Sequence | None = None,
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
        self.tiles_seen += len(images)
        return results

    def _detect_batch(self, images: Sequence[np.ndarray], tiles: Sequence | None, scale: float) -> list[TileDetections]:
        """One forward pass over same-size images."""
        batch = [torch.from_numpy(np.ascontiguousarray(im)).to(self.device, non_blocking=True) for im in images]
        # Boxes that lie wholly outside what their tile can own skip the mask branch (see below).
        self.model.roi_heads.cellseg_regions = (
            [owned_region(t, scale) for t in tiles] if tiles is not None and self.skip_unowned else None)
        try:
            with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
                outputs = self.model(batch)
        finally:
            self.model.roi_heads.cellseg_regions = None
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
