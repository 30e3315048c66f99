"""The cell Mask R-CNN's architecture: `build_model` from a bundle's `ModelConfig`, and `load_network` (a bundle's
network with its weights).

torchvision's defaults silently break dense microscopy (docs/architecture.md, "Detection"), so the network is built
with: no resize (tiles run at the scale they are given), thousands of detections per tile, anchors of 8-128 px,
masks left at box size (detection/rcnn_parts.py), and GroupNorm that can take a slide's statistics (detection/slide_norm.py). Running
the network on tiles is detection/detector.py's job.
"""

from __future__ import annotations

from torchvision.models import resnet
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..bundles import Bundle, ModelConfig
from ..errors import BundleError
from .rcnn_parts import (
    Fp32FeaturePyramidNetwork,
    TileMaskPredictor,
    TileRoIHeads,
    TileRPN,
    TileTransform,
    WeightFormatMaskHead,
    keep_head_outputs_fp32,
)
from .slide_norm import SlideGroupNorm


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
    # its 3x3 output convolutions in fp32 under bf16 autocast: tile-size invariance (rcnn_parts)
    backbone.fpn = Fp32FeaturePyramidNetwork(stage_channels, cfg.fpn_channels, extra_blocks=LastLevelMaxPool())
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
        mask_head=WeightFormatMaskHead(c, (c, c, c, c), 1),
        mask_predictor=TileMaskPredictor(c, c, cfg.num_classes),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        box_detections_per_img=cfg.detections_per_tile,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_nms_thresh=cfg.box_nms_thresh,
        box_score_thresh=0.05,
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 7, cfg.roi_sampling_ratio),
        mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 14, cfg.roi_sampling_ratio),
    )
    model.transform = TileTransform(min_size=1, max_size=1 << 30, image_mean=list(cfg.image_mean),
                                    image_std=list(cfg.image_std), size_divisible=32)
    model.rpn = TileRPN.replacing(model.rpn)
    model.roi_heads = TileRoIHeads.replacing(model.roi_heads)
    keep_head_outputs_fp32(model)
    return model


def load_network(bundle: Bundle) -> MaskRCNN:
    """The bundle's network with its weights (on CPU, eval mode)."""
    try:
        net = build_model(bundle.model)
    except (TypeError, ValueError, RuntimeError) as e:  # e.g. fpn_channels = "big" or -4 in model.toml
        raise BundleError(f"expected a buildable network in {bundle.path / 'model.toml'} [model], got "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    try:
        net.load_state_dict(bundle.state_dict())
    except RuntimeError as e:
        raise BundleError(f"weights in {bundle.weights_path} do not match the architecture in model.toml: "
                          f"{str(e).splitlines()[0]}") from e
    return net.eval()
