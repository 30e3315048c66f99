"""torchvision's detection parts, subclassed for tiles of dense cells (the network is assembled in detection/network.py).

- `TileTransform`: normalise and batch only; no resize in (tiles run at the scale they are given), no pasting of
  masks onto full-image canvases out (detect.paste_masks_at_box_size pastes them at box size).
- `TileRPN`: in inference, each image's proposals filtered with fewer waits for a GPU.
- `TileRoIHeads`: given the part of each tile whose cells it keeps (`owned_regions`, an argument of its forward),
  boxes that cannot lie in it skip the mask branch.
- `TileNetwork`: the model's parts run for inference on tiles, `forward(images, owned_regions)`; its backbone body
  may be a calibrated copy (detection/slide_norm.py) while every other part is the model's own.
- `WeightFormatMaskHead`: in inference the mask head takes its RoI features in its weights' memory format.
- `TileMaskPredictor`: the mask predictor's inference on a CPU as chunked matrix products.

Subclasses, never patched instances: each part is a module with the same parameters and state dict keys as the one
it replaces, so a bundle's weights load into either.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.profiler import record_function
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

from ..errors import ParameterError

MASK_SIZE = 28      # torchvision's mask head: M x M cells a box


def mask_extent(boxes: torch.Tensor, mask_size: int = MASK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a box's mask lands, as (low, high) xy corners: its M x M cells and a 1-cell zero border laid out as the
    mask's training target was cut (detector.paste_masks_at_box_size pastes them so).

    torchvision cuts a target from the annotation with RoIAlign at aligned=False (roi_heads.project_masks_on_boxes):
    its samples lie half a pixel past the box's pixel centres, so for a box as tight as the regressed ones the
    target's first cell already lies inside the nucleus at the box's near edge, and its last cells fade out half a
    pixel before the far edge. Inverted: the first cell starts at the box's near edge and the cells are W / (W - 0.5)
    times wider than W / M. Pasted with torchvision's own extent (the box grown by (M + 2) / M, rounded to whole
    pixels) masks came out 0.44 px up and left of the truth and 3-5 % too large on the example mosaic.
    """
    size = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-6)
    cell = size / mask_size * size / (size - 0.5).clamp(min=0.5)
    low = boxes[:, :2] - cell
    return low, low + cell * (mask_size + 2)


class TileTransform(GeneralizedRCNNTransform):
    """Normalise and batch only: no resize in, no full-image mask pasting out. On a GPU the mean and spread are
    copied there once, not for every image (torchvision's copy from pageable memory made the host wait for the
    device twice a tile)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._stats_on_device: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def normalize(self, image):
        if image.device.type != "cuda" or not image.is_floating_point():
            return super().normalize(image)
        key = (image.device, image.dtype)
        if key not in self._stats_on_device:
            self._stats_on_device[key] = tuple(host_to_device(stat, image.device, image.dtype)[:, None, None]
                                               for stat in (self.image_mean, self.image_std))
        mean, std = self._stats_on_device[key]
        return (image - mean) / std

    def resize(self, image, target=None):
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        return result  # boxes in input pixels (no resize happened), masks left at 28x28


class TileRPN(RegionProposalNetwork):
    """torchvision's RegionProposalNetwork (as is in training) whose inference filters a pass's proposals with fewer
    waits for a GPU: the boxes large and likely enough selected for every image at once (one wait a pass;
    torchvision: two an image), and NMS by levels without a copy from the host (torchvision's batched_nms makes one;
    nms_apart). The same proposals, tested against torchvision's."""

    @classmethod
    def replacing(cls, rpn: RegionProposalNetwork) -> TileRPN:
        """The same RPN (the very same submodules and settings) as a TileRPN."""
        other = cls(rpn.anchor_generator, rpn.head, rpn.proposal_matcher.high_threshold,
                    rpn.proposal_matcher.low_threshold, rpn.fg_bg_sampler.batch_size_per_image,
                    rpn.fg_bg_sampler.positive_fraction, dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n),
                    rpn.nms_thresh, rpn.score_thresh)
        other.min_size = rpn.min_size
        return other

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        if self.training:
            return super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)
        num_images, device = proposals.shape[0], proposals.device
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat([torch.full((n,), idx, dtype=torch.int64, device=device)
                            for idx, n in enumerate(num_anchors_per_level)]).reshape(1, -1).expand_as(objectness)
        # each level's pre_nms_top_n best, as torchvision
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)
        batch_idx = torch.arange(num_images, device=device)[:, None]
        objectness, levels = objectness[batch_idx, top_n_idx], levels[batch_idx, top_n_idx]
        proposals = proposals[batch_idx, top_n_idx]
        probabilities = torch.sigmoid(objectness)
        # clipped to each image, then the boxes large and likely enough, for every image at once: each image's
        # first (stable order: torchvision's), and how many, in one wait
        proposals = clipped(proposals, image_limits(image_shapes, device, proposals.dtype)[:, None, :])
        wide, tall = proposals[..., 2] - proposals[..., 0], proposals[..., 3] - proposals[..., 1]
        selected = (wide >= self.min_size) & (tall >= self.min_size) & (probabilities >= self.score_thresh)
        first = torch.argsort((~selected).to(torch.uint8), dim=1, stable=True)
        counts = selected.sum(1).tolist()
        final_boxes, final_scores = [], []
        for boxes, scores, level, order, count in zip(proposals, probabilities, levels, first, counts):
            keep = order[:count]
            boxes, scores, level = boxes[keep], scores[keep], level[keep]
            keep = nms_apart(boxes, scores, level, self.nms_thresh)[:self.post_nms_top_n()]
            final_boxes.append(boxes[keep])
            final_scores.append(scores[keep])
        return final_boxes, final_scores


class TileRoIHeads(RoIHeads):
    """torchvision's RoIHeads (as is in training) whose inference forward also takes `owned_regions`: per image,
    (x0, y0, x1, y1) in its network px, the region whose cells its tile may keep. Boxes whose mask extent misses it
    are dropped before the mask branch (which otherwise runs on every box, only for ownership to throw most of a
    tile's halo cells away)."""

    @classmethod
    def replacing(cls, heads: RoIHeads) -> TileRoIHeads:
        """The same heads (the very same submodules and settings) as a TileRoIHeads."""
        return cls(heads.box_roi_pool, heads.box_head, heads.box_predictor,
                   heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold,
                   heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction,
                   heads.box_coder.weights, heads.score_thresh, heads.nms_thresh, heads.detections_per_img,
                   mask_roi_pool=heads.mask_roi_pool, mask_head=heads.mask_head, mask_predictor=heads.mask_predictor)

    def forward(self, features, proposals, image_shapes, targets=None,
                owned_regions: list[tuple[float, float, float, float]] | None = None,
                mask_score: float | None = None):
        """mask_score (inference): boxes scoring below it (but at least score_thresh, the candidate floor) skip the
        mask branch and come back as "below_boxes" and "below_scores" (their count against the threshold costs no
        masks); None: every box kept gets its mask.

        Inference handles the batch's boxes together, not image by image as torchvision does: on a GPU each
        image's filtering waited for the device several times (boolean indexing, NMS, copies), ~10 waits a tile in
        all, each leaving the GPU idle while the host caught up (issue 50). Here the whole batch waits 5 times.
        The boxes, scores and order are torchvision's (tested), NMS being computed in float64 (each image and
        class apart), so a box's fate never depends on the other tiles of its batch."""
        if self.training:
            if owned_regions is not None:
                raise ParameterError("expected owned regions in inference (eval mode) only, found them in training")
            return super().forward(features, proposals, image_shapes, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        boxes, scores, labels, image = self.batch_detections(class_logits, box_regression, proposals, image_shapes)
        kept = torch.ones_like(scores, dtype=torch.bool)
        if owned_regions is not None:
            # the unowned boxes dropped between boxes and masks
            kept = may_reach(boxes, host_to_device(owned_regions, boxes.device, boxes.dtype)[image])
        masked = scores >= (mask_score if mask_score is not None else -1.0)
        with_mask, without = torch.nonzero(kept & masked).squeeze(1), torch.nonzero(kept & ~masked).squeeze(1)
        n = len(proposals)
        per_image = torch.stack([_count_by(image[with_mask], n), _count_by(image[without], n)]).tolist()
        boxes_by, scores_by, labels_by = (x[with_mask].split(per_image[0]) for x in (boxes, scores, labels))
        below_boxes, below_scores = (x[without].split(per_image[1]) for x in (boxes, scores))
        mask_features = self.mask_head(self.mask_roi_pool(features, list(boxes_by), image_shapes))
        masks = maskrcnn_inference(self.mask_predictor(mask_features), list(labels_by))
        return [{"boxes": b, "labels": lb, "scores": sc, "masks": m, "below_boxes": bb, "below_scores": bs}
                for b, lb, sc, m, bb, bs in zip(boxes_by, labels_by, scores_by, masks, below_boxes, below_scores)], {}

    def batch_detections(self, class_logits: torch.Tensor, box_regression: torch.Tensor,
                         proposals: list[torch.Tensor], image_shapes: list[tuple[int, int]]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """torchvision's RoIHeads.postprocess_detections for the whole batch at once: boxes decoded and clipped to
        their image, one candidate per box and foreground class, those scoring above score_thresh and not empty,
        NMS per image and class, each image's detections_per_img best. Returns boxes (K, 4), scores, labels and
        image (K,): grouped by image, each image's in decreasing score, as torchvision's lists concatenated."""
        device, classes = class_logits.device, class_logits.shape[-1]
        n = len(proposals)
        # (R, classes, 4); torchvision's decode leaves no proposals at all as (0, classes * 4)
        pred_boxes = self.box_coder.decode(box_regression, proposals).reshape(len(class_logits), classes, 4)
        pred_scores = torch.softmax(class_logits, -1)
        image_of = torch.cat([torch.full((len(p),), i, dtype=torch.int64, device=device)
                              for i, p in enumerate(proposals)])
        limits = image_limits(image_shapes, device, pred_boxes.dtype)[image_of][:, None, :]     # (R, 1, 4)
        boxes = clipped(pred_boxes, limits)[:, 1:].reshape(-1, 4)
        scores = pred_scores[:, 1:].reshape(-1)
        labels = torch.arange(1, classes, device=device).repeat(len(pred_scores))
        image = image_of.repeat_interleave(classes - 1)
        wide, tall = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        candidate = torch.nonzero((scores > self.score_thresh) & (wide >= 1e-2) & (tall >= 1e-2)).squeeze(1)
        boxes, scores, labels, image = boxes[candidate], scores[candidate], labels[candidate], image[candidate]
        keep = nms_apart(boxes, scores, image * classes + labels, self.nms_thresh)   # decreasing score
        keep = keep[torch.sort(image[keep], stable=True).indices]        # by image, each in decreasing score
        counts = _count_by(image[keep], n)
        rank = torch.arange(len(keep), device=device) - (counts.cumsum(0) - counts)[image[keep]]
        keep = keep[torch.nonzero(rank < self.detections_per_img).squeeze(1)]
        return boxes[keep], scores[keep], labels[keep], image[keep]


def image_limits(image_shapes: list[tuple[int, int]], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(N, 4): each image's (width, height, width, height), the largest xyxy a box in it may have (no wait for a
    GPU: host_to_device)."""
    return host_to_device([(w, h, w, h) for h, w in image_shapes], device, dtype)


def clipped(boxes: torch.Tensor, limits: torch.Tensor) -> torch.Tensor:
    """xyxy `boxes` clipped to [0, limits] (image_limits, broadcast against them): torchvision's
    clip_boxes_to_image for many images at once."""
    return torch.minimum(boxes.clamp(min=0), limits)


def _count_by(index: torch.Tensor, n: int) -> torch.Tensor:
    """How many of `index` are 0, 1, .. n - 1 (torch.bincount waits for a GPU to find the largest first)."""
    return torch.zeros(n, dtype=torch.int64, device=index.device).index_add_(0, index, torch.ones_like(index))


def nms_apart(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision's batched NMS (no box suppresses one of another group), kept indices in decreasing score, by one
    NMS call: the groups moved apart, in float64 so the move changes no overlap (torchvision's coordinate trick in
    float32 rounds coordinates more the more groups there are). Outside autocast, which would cast them to float32."""
    from torchvision.ops import nms
    if len(boxes) == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    with torch.autocast(boxes.device.type, enabled=False):
        wide = boxes.double()
        apart = wide + (groups.double() * (wide.max() + 1))[:, None]
        return nms(apart, scores.double(), iou_threshold)


def host_to_device(values, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small host array on `device` without waiting for the device: on a GPU through page-locked memory (a
    plain copy from pageable memory makes the host wait for every kernel queued before it)."""
    tensor = torch.tensor(np.asarray(values), dtype=dtype)      # a copy of its own
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def may_reach(boxes: torch.Tensor, region: tuple[float, float, float, float] | torch.Tensor) -> torch.Tensor:
    """Which xyxy `boxes` have a pasted mask extent (mask_extent, + 1 px) that overlaps `region` (x0, y0, x1, y1; or
    a (K, 4) tensor of them, one a box): a mask lies inside that extent, so the others cannot hold a cell centred
    there."""
    x0, y0, x1, y1 = region.unbind(-1) if isinstance(region, torch.Tensor) else region
    low, high = mask_extent(boxes)
    return (high[:, 0] + 1 > x0) & (low[:, 0] - 1 < x1) & (high[:, 1] + 1 > y0) & (low[:, 1] - 1 < y1)


class TileNetwork(nn.Module):
    """A cell Mask R-CNN's parts (network.build_model) run for inference on tiles: MaskRCNN.forward in eval mode, with
    two differences. The owned regions reach the RoI heads as an argument (TileRoIHeads). The backbone body
    can be another than the model's (`with_body`: a copy with a slide's statistics folded in, detection/slide_norm.py) while
    the transform, FPN, RPN and RoI heads stay the model's own, shared.
    """

    def __init__(self, model: MaskRCNN, body: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.body = model.backbone.body if body is None else body

    def with_body(self, body: nn.Module | None) -> TileNetwork:
        """The same network with `body` as its backbone body (None: the model's own)."""
        return TileNetwork(self.model, body)

    def forward(self, images: list[torch.Tensor],
                owned_regions: list[tuple[float, float, float, float]] | None = None,
                body_output: dict[str, torch.Tensor] | None = None,
                mask_score: float | None = None) -> list[dict[str, torch.Tensor]]:
        """One dict per image: boxes (xyxy, input px: no resize), labels, scores, masks (N, 1, 28, 28), and the
        boxes scoring under `mask_score` without masks (below_boxes, below_scores: TileRoIHeads.forward).
        body_output: the body's output on these images when it has been computed already (Detector.calibrated)."""
        model = self.model
        # named ranges for torch.profiler (benchmarks/detect_profile.py): where a pass's time goes, by part
        with record_function("cellseg.transform"):
            batch, _ = model.transform(images)
        with record_function("cellseg.backbone"):
            features = model.backbone.fpn(self.body(batch.tensors) if body_output is None else body_output)
        with record_function("cellseg.rpn"):
            proposals, _ = model.rpn(batch, features)
        with record_function("cellseg.roi_heads"):
            detections, _ = model.roi_heads(features, proposals, batch.image_sizes, owned_regions=owned_regions,
                                            mask_score=mask_score)
        return detections


class WeightFormatMaskHead(MaskRCNNHeads):
    """torchvision's MaskRCNNHeads (same parameters and state dict keys) that, in inference, takes its RoI features in
    the memory format of its weights. RoIAlign's CPU kernel gives NCHW, and oneDNN's 3x3 convolutions with
    channels_last weights (a CPU Detector's) ran 28 % slower on NCHW input: 211 RoIs of the example mosaic took
    0.41 s against 0.29 s. Training keeps torchvision's path: there a step was no faster (benchmarks/train_speed.py
    on a Zen 3, 4 rounds of 5 steps: 2.46 s against 2.37 s a step).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self[0][0].weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


class TileMaskPredictor(MaskRCNNPredictor):
    """torchvision's MaskRCNNPredictor (a 2x2 stride-2 transposed convolution, ReLU, 1x1 logits; same parameters and
    state dict keys) whose inference on a CPU runs as matrix products over chunks of RoI pixels.

    Each input pixel of a 2x2 stride-2 transposed convolution makes its own 2x2 output block: one product of the
    pixels (rows) with the weights laid out as (in, 2 * 2 * out). Chunks of rows keep the 4x wider intermediate in
    the cache instead of writing it out whole: 211 RoIs of the example mosaic took 0.052 s against 0.085 s (2 threads;
    0.10 against 0.14 s on one), logits within 1e-6 of the convolutions'. Training and GPUs keep torchvision's path.
    """

    rows_per_chunk = 4096

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or x.device.type != "cpu" or x.shape[0] == 0:
            return super().forward(x)
        up, to_logits = self.conv5_mask, self.mask_fcn_logits
        n, c, h, w = x.shape
        width, classes = up.out_channels, to_logits.out_channels
        up_weight = up.weight.permute(0, 2, 3, 1).reshape(c, 4 * width)        # (in, dy, dx, out)
        up_bias = up.bias.repeat(4)
        logit_weight = to_logits.weight.view(classes, width).t()
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)          # a view of channels_last input (the mask head's)
        logits = [torch.addmm(to_logits.bias, torch.addmm(up_bias, rows[s:s + self.rows_per_chunk], up_weight)
                              .relu_().view(-1, width), logit_weight)
                  for s in range(0, rows.shape[0], self.rows_per_chunk)]
        # rows were (n, y, x), each now 2 x 2 sub-pixels (dy, dx) of `classes` logits: (n, classes, 2y + dy, 2x + dx)
        return torch.cat(logits).view(n, h, w, 2, 2, classes).permute(0, 5, 1, 3, 2, 4).reshape(n, classes, 2 * h, 2 * w)


class Fp32FeaturePyramidNetwork(FeaturePyramidNetwork):
    """torchvision's FPN whose 3x3 output convolutions run in fp32 under bf16 autocast (its lateral 1x1
    convolutions and top-down sums, and the ResNet body before it, stay in bf16).

    Measured on the example mosaic (benchmarks/tile_invariance.py, 384 against 512 px tiles, bf16): with the whole FPN
    in bf16 the cells differed (1384 against 1381, 99.5 % matched, 5th-percentile IoU 0.86); with its output
    convolutions in fp32 they are the same, as in fp32 throughout (1379 and 1379, 100 %, 0.97), at the bf16 speed
    (10.2 s against 10.3 s for the 512-px count; the whole FPN in fp32 took 13.4 s, its laterals alone in fp32 did not
    help). The RPN head, the box head or the mask head in fp32 changed nothing. Same parameters and state dict keys
    as FeaturePyramidNetwork.

    in_fp32: False lets it run in bf16 like the rest: training does (tile-size invariance is an inference property).
    """

    in_fp32 = True

    def get_result_from_layer_blocks(self, x, idx):
        if not self.in_fp32 or x.dtype not in (torch.bfloat16, torch.float16):
            return super().get_result_from_layer_blocks(x, idx)
        with torch.autocast(x.device.type, enabled=False):
            return super().get_result_from_layer_blocks(x.float(), idx)


def _outputs_as_fp32(module, inputs, output):
    if isinstance(output, torch.Tensor):
        return output.float()
    if isinstance(output, (list, tuple)):
        return type(output)(_outputs_as_fp32(module, inputs, o) for o in output)
    return output


def keep_head_outputs_fp32(model: MaskRCNN) -> None:
    """Under bf16 (or fp16) autocast, hand the RPN's box deltas and objectness, the box predictor's and the mask
    predictor's logits on in fp32 (forward hooks: parameters and state dict keys unchanged; a no-op in fp32).
    torchvision decodes boxes in the deltas' dtype: in bf16 (8 bits of mantissa) a coordinate near 500 px is
    rounded to 2-4 px, which moves boxes, masks and seam ownership."""
    heads = model.roi_heads
    for module in (model.rpn.head, heads.box_predictor, heads.mask_predictor):
        module.register_forward_hook(_outputs_as_fp32)

