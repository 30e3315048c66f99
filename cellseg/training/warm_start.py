"""A training's starting weights (`--init none | coco | coco:FILE | BUNDLE`): the architecture they fit and the
tensors to load, and loading them into a network whose class heads may differ."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..bundles import ModelConfig
from ..errors import CellsegError

# torchvision's COCO Mask R-CNN (ResNet-50-FPN v1): the file name its weights enum downloads to.
COCO_WEIGHTS_FILE = "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"
COCO_ARCHITECTURE = ModelConfig(backbone="resnet50", norm="frozen_bn", fpn_channels=256, box_head_size=1024)
log = logging.getLogger(__name__)

# Where a run's weights started, kept in its folder: --resume needs no --init, and the card must still name the bundle
# the run continued and that bundle's own training stages.
LINEAGE_FILE = "lineage.json"


def coco_weights_path() -> Path:
    """Where torchvision keeps the COCO weights once downloaded (the torch hub cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / COCO_WEIGHTS_FILE


def starts_from_bundle(init: str) -> bool:
    """Whether `--init` names a bundle (a folder or a shipped name) rather than random or COCO weights."""
    return init != "none" and init != "coco" and not init.startswith("coco:")


def initial_weights(init: str, classes: list[str]) -> tuple[ModelConfig, dict | None, str]:
    """Architecture and starting weights for `--init none | coco | coco:FILE | BUNDLE`.

    Returns (model config sized to `classes`, state dict or None for random, description for the card).
    """
    import dataclasses

    from ..bundles import load_bundle
    if init == "none":
        return ModelConfig(classes=tuple(classes)), None, "random initialisation"
    if not starts_from_bundle(init):   # COCO
        path = Path(init[5:]) if init.startswith("coco:") else coco_weights_path()
        if not path.is_file():
            raise CellsegError(
                f"expected torchvision's COCO Mask R-CNN weights at {path}, found none; nothing is downloaded "
                f"here: on a machine with internet run `python -c \"import torchvision; torchvision.models."
                f"detection.maskrcnn_resnet50_fpn(weights='DEFAULT')\"`, copy {COCO_WEIGHTS_FILE} from its torch "
                f"hub cache, and pass --init coco:PATH")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)   # tensors only, never pickled code
        except (RuntimeError, OSError, ValueError) as e:
            raise CellsegError(f"expected a torch state dict of COCO Mask R-CNN weights at {path}: {e}") from e
        return dataclasses.replace(COCO_ARCHITECTURE, classes=tuple(classes)), state, f"torchvision COCO ({path.name})"
    bundle = load_bundle(init)
    return (dataclasses.replace(bundle.model, classes=tuple(classes)), bundle.state_dict(),
            f"bundle {bundle.name} ({bundle.weights_sha256[:12]})")


def init_lineage(init: str, init_note: str) -> dict:
    """What the card says about a run's start: {"init": init_note, "earlier_stages": [...]}, the latter every
    training stage of the bundle it starts from (none for random or COCO weights)."""
    from ..bundles import load_bundle
    return {"init": init_note,
            "earlier_stages": load_bundle(init).training_stages() if starts_from_bundle(init) else []}


def run_lineage(out: Path, resume: bool, init: str, init_note: str, model: dict | None = None) -> dict:
    """The lineage (init_lineage) of the run in `out`: a new run writes it there (LINEAGE_FILE), with `model`, its
    architecture (ModelConfig.to_dict); a resumed one reads it back, or, for a run begun before the file existed,
    takes `init`'s (pass the run's first --init once)."""
    path = out / LINEAGE_FILE
    if resume and path.is_file():
        try:
            lineage = json.loads(path.read_text(encoding="utf-8"))
            kept = {"init": str(lineage["init"]), "earlier_stages": list(lineage["earlier_stages"])}
            if "model" in lineage:
                kept["model"] = dict(lineage["model"])
            return kept
        except (ValueError, KeyError, TypeError) as e:
            raise CellsegError(f"expected {path} to hold the run's starting weights (init, earlier_stages), "
                               f"found unreadable JSON: {e}") from e
    if resume:
        log.warning("%s has no %s (a run begun before it existed): its card says it started from %s (--init)",
                    out, LINEAGE_FILE, init_note)
    lineage = init_lineage(init, init_note)
    if model is not None and not resume:
        lineage["model"] = model
    path.write_text(json.dumps(lineage, indent=1), encoding="utf-8")
    return lineage


def resumed_model(out: Path, lineage: dict):
    """The architecture (bundles.ModelConfig) a run resumed in `out` was started with: its lineage's, else (a run
    begun before lineages recorded it) the bundle its last stop wrote there; None when neither says."""
    from ..bundles import ModelConfig, load_bundle
    if "model" in lineage:
        return ModelConfig.from_dict(lineage["model"])
    if (out / "model.toml").is_file():
        return load_bundle(out).model
    return None


def load_matching(model: torch.nn.Module, state: dict) -> list[str]:
    """Load every tensor whose name and shape fit; return the names left at random init (e.g. class heads)."""
    # torchvision's v1 checkpoints name the mask head convs mask_fcn1..4; the module now calls them 0..3.
    renamed = {}
    for key, value in state.items():
        for i in range(1, 5):
            key = key.replace(f"roi_heads.mask_head.mask_fcn{i}.", f"roi_heads.mask_head.{i - 1}.0.")
        renamed[key] = value
    own = model.state_dict()
    matched = {k: v for k, v in renamed.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise CellsegError("expected starting weights for this architecture, found no tensor that fits")
    model.load_state_dict(matched, strict=False)
    return sorted(set(own) - set(matched))


def deepen_as_identity(model: torch.nn.Module, fresh: list[str]) -> list[str]:
    """Make the residual blocks a deeper backbone has beyond its starting weights' (e.g. a ResNet-34 started from a
    ResNet-18 bundle: blocks 3-6 of each stage) compute the identity, so the deeper network starts as exactly the
    function it was given and training grows into the new blocks (net2net's idea; torchvision's
    zero_init_residual). Each new block's last normalisation scale is zeroed: its residual branch then adds 0, and
    the block passes on its input, already >= 0 after the previous block's ReLU. Returns the blocks so set."""
    body = model.backbone.body
    new_blocks = sorted({".".join(name.split(".")[2:4]) for name in fresh
                         if name.startswith("backbone.body.layer")})
    for block_name in new_blocks:
        block = body.get_submodule(block_name)
        last_norm = getattr(block, "bn3", None) or block.bn2     # Bottleneck's bn3, BasicBlock's bn2
        if getattr(block, "downsample", None) is not None:
            raise CellsegError(f"expected the deeper backbone's new block {block_name} to keep its input's shape "
                               f"(no downsampling), found one that changes it: it cannot start as the identity")
        with torch.no_grad():
            last_norm.weight.zero_()
            last_norm.bias.zero_()
    return new_blocks


RPN_HEAD_OUTPUTS = {"rpn.head.cls_logits": 1, "rpn.head.bbox_pred": 4}   # channels per anchor


def widen_anchor_ratios(state: dict, old_ratios: tuple[float, ...], new_ratios: tuple[float, ...]) -> dict:
    """`state` (a bundle's weights for RPN anchors of `old_ratios`) with the RPN head's outputs laid out for
    `new_ratios`: each new ratio's objectness and box deltas are those of the nearest old ratio (in log scale), so the
    network starts proposing as before (a 3:1 anchor as the 2:1 one did) and training specialises the copies.
    torchvision orders a location's anchors by ratio (one size per FPN level here), and the head's channels so."""
    import math
    if tuple(old_ratios) == tuple(new_ratios):
        return state
    nearest = [min(range(len(old_ratios)), key=lambda i: abs(math.log(r / old_ratios[i]))) for r in new_ratios]
    widened = dict(state)
    for layer, per_anchor in RPN_HEAD_OUTPUTS.items():
        for part in ("weight", "bias"):
            key = f"{layer}.{part}"
            if key not in state:
                raise CellsegError(f"expected the starting weights to hold the RPN head's {key}, found none")
            tensor = state[key]
            if tensor.shape[0] != per_anchor * len(old_ratios):
                raise CellsegError(f"expected {key} to have {per_anchor * len(old_ratios)} outputs for the anchor "
                                   f"ratios {old_ratios}, found {tensor.shape[0]}")
            blocks = tensor.reshape(len(old_ratios), per_anchor, *tensor.shape[1:])
            widened[key] = blocks[nearest].reshape(len(new_ratios) * per_anchor, *tensor.shape[1:]).clone()
    return widened
