"""Train a cell Mask R-CNN on annotated images and write a model bundle (`cellseg train`).

The pieces: train_data (annotated images), train_crops (training crops and batches), train_init (starting weights),
train_loop (the loop: schedule, precision, checkpoints, resume, snapshots) with train_checkpoint and train_log. This
module puts them together for the Mask R-CNN: its settings, its preparation for training, its forward pass and its
bundle and model card.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..bundles import ModelConfig, save_bundle
from ..detection import build_model, matrix_roi_pools, resolve_precision
from ..errors import CellsegError
from .checkpoint import TrainingState, check_output_folder
from .crops import CropBatches, CropSettings, draw_probabilities, targets_to_device
from .data import TrainImage, median_diameter_px
from .loop import LoopSettings, hardware_description, optimiser_step, run_training
from .warm_start import (
    deepen_as_identity,
    initial_weights,
    load_matching,
    resumed_model,
    run_lineage,
    widen_anchor_ratios,
)

log = logging.getLogger(__name__)

# RPN objectness floor written into new bundles: on the example slides 0.7 sends 31-40 % fewer proposals through
# the box head than 0.5 with the same F1 (docs/performance.md); 0 would keep all rpn_post_nms_top_n of them.
PROPOSAL_THRESHOLD = 0.7


@dataclass
class TrainSettings(LoopSettings, CropSettings):
    """A Mask R-CNN training's settings: the loop's (steps, schedule, checkpoints), the crops' (batch, size,
    workers, seed, augmentation), and the arithmetic."""

    precision: str = "auto"           # auto | fp32 | bf16 (cellseg.detection.precision: bf16 where the processor has it)
    # The ResNet body's share of the learning rate (0: frozen, its gradients never computed): a fine-tune on a few
    # images keeps what the bundle's features learnt on many (cellseg.training.finetune).
    backbone_lr_scale: float = 1.0


@dataclass
class _MaskRCNNTraining:
    """The Mask R-CNN's part of a training (training.loop.TrainingTask): crops of `items`, the network's own losses,
    and its bundle with the model card."""

    model: torch.nn.Module
    cfg: ModelConfig
    items: list[TrainImage]
    draw_p: np.ndarray | None
    settings: TrainSettings
    device: torch.device
    name: str
    init_note: str                    # where the weights started (training.warm_start)
    precision_note: str               # the arithmetic and why (cellseg.detection.precision.resolve_precision)
    card: dict                        # the caller's model-card tables ("training" merged into the training's own)
    files: dict[str, str]
    kept_settings: dict | None = None   # the [inference] and [scale] tables the bundles written keep (run_kept_settings)

    def batches(self, first_step: int) -> Iterator:
        return CropBatches(self.items, self.draw_p, self.settings, first_step).batches()

    def losses(self, batch) -> dict[str, torch.Tensor]:
        images = [b[0].to(self.device, non_blocking=True) for b in batch]
        targets = [targets_to_device(b[1], self.device) for b in batch]
        return self.model(images, targets)

    def write_bundle(self, folder: Path, state: TrainingState, finished: bool) -> None:
        s = self.settings
        meta = {"training": {"init": self.init_note, "steps": state.step, "wall_seconds": round(state.wall_s, 1),
                             "device": str(self.device), "hardware": hardware_description(self.device),
                             "precision": self.precision_note, "batch_size": s.batch_size, "crop_px": s.crop,
                             "lr": s.lr, "finished": finished, "augmentation": s.augmentation.describe()}}
        if s.backbone_lr_scale != 1.0:
            meta["training"]["backbone_lr_scale"] = s.backbone_lr_scale
        if s.weight_average_decay is not None:   # training.loop: these weights are the run's moving average
            meta["training"]["weight_average_decay"] = s.weight_average_decay
        for k, v in self.card.items():
            if isinstance(v, dict) and isinstance(meta.get(k), dict):
                meta[k].update(v)
            else:
                meta[k] = v
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in self.files.items():
            if not (folder / name).exists():
                (folder / name).write_text(text, encoding="utf-8")
        median_px = median_diameter_px(self.items, self.draw_p)
        save_bundle(folder, self.cfg, {k: v.contiguous() for k, v in self.model.state_dict().items()},
                    name=self.name, nucleus_diameter_px=median_px, card=meta, proposal_threshold=PROPOSAL_THRESHOLD)
        if self.kept_settings is not None:
            keep_bundle_settings(folder, self.kept_settings,
                                 count_size_why=f"the size of the bundle it started from, kept by the training, not "
                                                f"the {median_px:.1f} px median of this training's images")


KEPT_SETTINGS_FILE = "kept_settings.toml"   # in a training's folder: the settings its bundles keep (run_kept_settings)
KEPT_TABLES = ("inference", "scale")


def bundle_settings(bundle: Path) -> dict:
    """A bundle's [inference] and [scale] tables: its score thresholds (per modality, with and without TTA), mask and
    proposal thresholds, and the nucleus size (and any pixel size) its weights expect."""
    from ..bundles import BUNDLE_FORMAT, read_bundle_folder
    meta, _ = read_bundle_folder(Path(bundle), BUNDLE_FORMAT)
    return {table: meta[table] for table in KEPT_TABLES if table in meta}


def run_kept_settings(out: Path, start: Path | None, resume: bool) -> dict | None:
    """The settings (bundle_settings) the bundles a training in `out` writes keep: those of the bundle `start` it was
    started from, copied into OUT/kept_settings.toml when it starts, so that a resume keeps them even after `start`
    changed (a new bundle shipped in its place, a lab's bundle refitted). A resumed training reads them back from
    there; one that started without them (`start` None) keeps none."""
    import tomllib

    from ..bundles import write_toml
    stored = out / KEPT_SETTINGS_FILE
    if resume and stored.is_file():
        return tomllib.loads(stored.read_text(encoding="utf-8"))
    if start is None:
        return None
    settings = bundle_settings(start)
    write_toml(stored, settings)
    return settings


def keep_bundle_settings(folder: Path, settings: dict, count_size_why: str | None = None) -> None:
    """Give the bundle in `folder` the [inference] and [scale] tables in `settings` (bundle_settings of the bundle it
    was fine-tuned from, which a fine-tune at that scale keeps). Where that changes its nucleus size, `count_size_why`
    goes into its card as [training] count_size (unless one is there), so the card says why it counts at that size
    rather than its own (model_card)."""
    from ..bundles import BUNDLE_FORMAT, read_bundle_folder, write_toml
    meta, _ = read_bundle_folder(folder, BUNDLE_FORMAT)
    own_px = meta.get("scale", {}).get("nucleus_diameter_px")
    kept_px = settings.get("scale", {}).get("nucleus_diameter_px")
    meta.update({table: settings[table] for table in KEPT_TABLES if table in settings})
    if count_size_why and None not in (own_px, kept_px) and abs(kept_px - own_px) > 0.05:
        meta.setdefault("training", {}).setdefault("count_size", count_size_why)
    write_toml(folder / "model.toml", meta)


def train(items: list[TrainImage], classes: list[str], out: Path, settings: TrainSettings,
          model_cfg: ModelConfig | None = None, resume: bool = False, device: str = "cpu",
          card: dict | None = None, progress: bool = True, init: str = "none",
          sample_weights: Sequence[float] | None = None, files: dict[str, str] | None = None,
          on_snapshot: Callable[[Path, int], bool | None] | None = None, keep_settings_of: Path | None = None,
          folder_checked: bool = False) -> Path:
    """Train (or resume) and write a bundle to `out`. Returns the bundle folder.

    on_snapshot(bundle_dir, step): with settings.snapshot_every, called every that many steps with a bundle of the
    weights as they stand in out/snapshots/ (e.g. to score it on held-out images; a long run keeps the best).

    sample_weights: one per item, how often its crops are drawn (e.g. to balance modalities); uniform if None.
    files: name -> text, written into `out` beside the bundle when the run starts (e.g. the data split).

    init: "none" (random), "coco" / "coco:FILE" (torchvision's COCO weights, ResNet-50-FPN), or a bundle
    to fine-tune (its architecture; class heads re-initialised when the classes differ). The card names it and
    keeps the bundle's own training stages (earlier_stages), also after --resume (training.warm_start.run_lineage).
    keep_settings_of: a bundle (usually the one fine-tuned) whose thresholds and scale the written bundles keep
    (keep_bundle_settings), as it was when the training started (run_kept_settings: a resume keeps what the start
    kept); without it they get the defaults and the training images' median nucleus size.
    folder_checked: the caller checked `out` (training.check_output_folder) before writing into it itself.
    """
    if not items:
        raise CellsegError("expected at least one annotated image to train on, found none")
    if not folder_checked:
        check_output_folder(out, resume)
    init_cfg, init_state, init_note = initial_weights(init, classes)
    cfg = model_cfg or init_cfg
    if init_state is not None and cfg.backbone != init_cfg.backbone:
        init_note += f", deepened to {cfg.backbone} (its new residual blocks starting as the identity)"
    if init_state is not None and tuple(cfg.aspect_ratios) != tuple(init_cfg.aspect_ratios):
        init_note += (f", RPN anchor ratios {'/'.join(f'{r:g}' for r in init_cfg.aspect_ratios)} -> "
                      f"{'/'.join(f'{r:g}' for r in cfg.aspect_ratios)} (each new one from the nearest)")
        if not resume:
            init_state = widen_anchor_ratios(init_state, init_cfg.aspect_ratios, cfg.aspect_ratios)
    out.mkdir(parents=True, exist_ok=True)
    lineage = run_lineage(out, resume, init, init_note, cfg.to_dict())
    if resume and (started := resumed_model(out, lineage)) is not None:
        # the checkpoint's network is the one the run started with (e.g. a candidate's ResNet-34), whatever the
        # resuming command says or leaves out
        if model_cfg is not None and model_cfg != started:
            log.warning("resuming %s with the network it started with (%s), not the one given (%s)", out,
                        started.backbone, model_cfg.backbone)
        cfg = started
    card = {**(card or {}), **({"earlier_stages": lineage["earlier_stages"]} if lineage["earlier_stages"] else {})}
    for name, text in (files or {}).items():
        (out / name).write_text(text, encoding="utf-8")
    dev = torch.device(device)
    torch.manual_seed(settings.seed)
    model = build_model(cfg)
    if init_state is not None and not resume:
        fresh = load_matching(model, init_state)
        log.info("started from %s; %d tensors left at random init: %s", init_note, len(fresh), ", ".join(fresh[:6]))
        if cfg.backbone != init_cfg.backbone:     # a deeper backbone than the bundle's: its new blocks start as identity
            log.info("%d new residual blocks start as the identity: %s", len(deepened := deepen_as_identity(
                model, fresh)), ", ".join(deepened))
    model, precision, precision_note = prepare_for_training(model, dev, settings.precision)
    log.info("training in %s", precision_note)
    optim = adamw(parameter_groups(model, settings.backbone_lr_scale), lr=settings.lr, weight_decay=1e-4)
    draw_p = draw_probabilities(sample_weights, len(items))
    task = _MaskRCNNTraining(model, cfg, items, draw_p, settings, dev, out.name, lineage["init"], precision_note,
                             card, dict(files or {}), run_kept_settings(out, keep_settings_of, resume))
    run_training(task, model, optim, settings, out, precision=precision, resume=resume, device=dev,
                 on_snapshot=on_snapshot, progress=progress)
    return out


def adamw(groups: list[dict], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, fused where this torch has the kernel for the parameters' device (one pass over all parameters: on 2 Zen
    4 cores 9 ms a step for the 16 M parameters of the nuclei network instead of 33 ms, ~3 % of a training step);
    the same update rule and state, so checkpoints load either way."""
    try:
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):     # no fused kernel for this device or dtype
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, foreach=True)


def parameter_groups(model: torch.nn.Module, backbone_lr_scale: float = 1.0) -> list[dict]:
    """The optimiser's parameter groups: the ResNet body at `backbone_lr_scale` of the schedule's rate (its
    "lr_scale", training.loop), everything else (FPN, RPN, box and mask heads) at the full rate. At 0 the body is
    frozen: left out of the optimiser, its gradients never computed."""
    if not backbone_lr_scale >= 0:
        raise CellsegError(f"expected a backbone learning-rate scale >= 0, got {backbone_lr_scale}")
    body = [p for name, p in model.named_parameters() if name.startswith("backbone.body.")]
    rest = [p for name, p in model.named_parameters() if not name.startswith("backbone.body.")]
    if backbone_lr_scale == 1.0:
        return [{"params": body + rest}]
    if backbone_lr_scale == 0.0:
        for p in body:
            p.requires_grad_(False)
        return [{"params": rest}]
    return [{"params": rest}, {"params": body, "lr_scale": backbone_lr_scale}]


def prepare_for_training(model: torch.nn.Module, dev: torch.device, precision: str = "auto",
                         channels_last: bool = True, matrix_roi_align: bool = True) -> tuple[torch.nn.Module, str, str]:
    """The model on `dev` in training mode, set up for the CPU where it runs there; returns (model, precision,
    why): precision 'bf16' or 'fp32' (cellseg.detection.precision.resolve_precision). channels_last and
    matrix_roi_align (RoIAlign as matrix products, detection/roi_align.py) apply on a CPU; False keeps torchvision's
    layout or kernel (benchmarks/train_speed.py compares them)."""
    model = model.to(dev).train()
    chosen, why = resolve_precision(precision, dev.type,
                                    cuda_bf16=dev.type == "cuda" and torch.cuda.is_bf16_supported())
    model.backbone.fpn.in_fp32 = False   # detection.rcnn_parts.Fp32FeaturePyramidNetwork: fp32 only for inference
    if dev.type == "cpu":
        if matrix_roi_align:      # torchvision's one-core RoIAlign backward was a fifth of a CPU step
            matrix_roi_pools(model)
        if channels_last:         # NHWC convolutions: 0.87 -> 0.72 s a step in fp32 on a 2-core Zen 5
            model = model.to(memory_format=torch.channels_last)
    return model, chosen, why


def training_step(model: torch.nn.Module, optim: torch.optim.Optimizer, images: list, targets: list,
                  precision: str, step: int = 0) -> tuple[torch.Tensor, dict]:
    """One optimiser step of the Mask R-CNN on a batch (training.loop.optimiser_step: bf16 autocast when `precision`
    is 'bf16', gradients clipped to a norm of 10); returns the total loss and its parts."""
    return optimiser_step(model, optim, lambda: model(images, targets), precision, step, clip_grad_norm=10.0)
