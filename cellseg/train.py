"""Train a cell Mask R-CNN on COCO instance annotations and write a model bundle.

Reads COCO JSON through pycocotools (polygons and RLE), caches each instance as a mask cropped to its
box (never N full-image masks), samples random crops with microscopy augmentations, checkpoints so a
run can stop at a time budget and `--resume` later, and writes a bundle after every run.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .augment import Augmentation, augment_pixels, is_colour
from .bundle import save_bundle
from .errors import CellsegError, TrainingInterrupted
from .network import ModelConfig, build_model
from .precision import cpu_model, resolve_precision
from .preprocess import measure_range, to_network_input
from .rcnn_parts import thread_roi_pools

log = logging.getLogger(__name__)


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
    from .slide import open_slide
    from .tiling import Box
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

    from .image_masks import annotation_rle, coco_image_paths, coco_images, read_coco_json
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


# RPN objectness floor written into new bundles: on the example slides 0.7 sends 31-40 % fewer proposals through
# the box head than 0.5 with the same F1 (docs/performance.md); 0 would keep all rpn_post_nms_top_n of them.
PROPOSAL_THRESHOLD = 0.7


def median_diameter_px(items: list[TrainImage]) -> float:
    areas = [m.sum() for it in items for m in it.masks]
    return float(np.median(2 * np.sqrt(np.asarray(areas) / np.pi))) if areas else 0.0


def sample_crop(item: TrainImage, size: int, rng: np.random.Generator,
                aug: Augmentation = Augmentation()) -> tuple[torch.Tensor, dict]:
    """A random training crop of at most size x size: zoom, flips, 90° rotations, then the photometric
    augmentations of cellseg.augment. A crop never reaches beyond its image (no padding that the network would
    learn to see as an edge): an image smaller than `size` after zooming gives a smaller crop.

    Masks are resampled one instance at a time, at their own box (nearest pixel centre, as the bilinear image
    resampling's half-pixel grid): never N full-size float canvases, which cost more than the training step's
    data on dense crops."""
    _, H, W = item.image.shape
    scale = float(np.exp(rng.uniform(np.log(aug.scale[0]), np.log(aug.scale[1]))))
    out_h, out_w = min(size, max(8, round(H * scale))), min(size, max(8, round(W * scale)))
    src_h, src_w = min(H, max(4, round(out_h / scale))), min(W, max(4, round(out_w / scale)))
    if len(item.boxes) and rng.random() < aug.nucleus_centred_p:
        # centred on a random nucleus, up to a quarter of the window off centre
        b = item.boxes[int(rng.integers(len(item.boxes)))]
        r0 = int((b[0] + b[2]) // 2 - src_h // 2 + rng.integers(-(src_h // 4), src_h // 4 + 1))
        c0 = int((b[1] + b[3]) // 2 - src_w // 2 + rng.integers(-(src_w // 4), src_w // 4 + 1))
        r0, c0 = min(max(r0, 0), H - src_h), min(max(c0, 0), W - src_w)
    else:
        r0 = int(rng.integers(0, H - src_h + 1))
        c0 = int(rng.integers(0, W - src_w + 1))
    r1, c1 = r0 + src_h, c0 + src_w
    img = torch.from_numpy(np.ascontiguousarray(item.image[:, r0:r1, c0:c1]))
    if (src_h, src_w) != (out_h, out_w):
        img = F.interpolate(img[None], size=(out_h, out_w), mode="bilinear", align_corners=False,
                            antialias=scale < 1)[0]
    # Source row/column (in the window) of each output pixel; monotonic, so an instance's output rows are a range.
    src_row = np.minimum(((np.arange(out_h) + 0.5) * src_h / out_h).astype(np.int64), src_h - 1)
    src_col = np.minimum(((np.arange(out_w) + 0.5) * src_w / out_w).astype(np.int64), src_w - 1)
    hit = ((item.boxes[:, 0] < r1) & (item.boxes[:, 2] > r0) & (item.boxes[:, 1] < c1) & (item.boxes[:, 3] > c0)
           if len(item.boxes) else np.zeros(0, bool))
    chosen = np.flatnonzero(hit)
    masks = np.zeros((len(chosen), out_h, out_w), bool)
    for n, i in enumerate(chosen):
        br0, bc0, br1, bc1 = (int(v) for v in item.boxes[i])
        a0, a1 = np.searchsorted(src_row, [br0 - r0, br1 - r0])          # output rows whose source is in the box
        b0, b1 = np.searchsorted(src_col, [bc0 - c0, bc1 - c0])
        if a0 < a1 and b0 < b1:
            masks[n, a0:a1, b0:b1] = item.masks[i][np.ix_(src_row[a0:a1] + r0 - br0, src_col[b0:b1] + c0 - bc0)]
    classes = np.asarray(item.class_ids, np.int64)[chosen]
    k = int(rng.integers(4))
    img, masks = torch.rot90(img, k, (1, 2)), np.rot90(masks, k, (1, 2))
    if rng.random() < 0.5:
        img, masks = img.flip(2), masks[:, :, ::-1]
    masks = np.ascontiguousarray(masks)
    img = torch.from_numpy(augment_pixels(img.numpy(), masks, bool(item.colour), rng, aug))
    keep = masks.sum((1, 2)) >= 4
    masks, classes = masks[keep], classes[keep]
    rows, cols = masks.any(2), masks.any(1)      # (N, H), (N, W): tight boxes without a scan each
    boxes = np.stack([cols.argmax(1), rows.argmax(1), cols.shape[1] - cols[:, ::-1].argmax(1),
                      rows.shape[1] - rows[:, ::-1].argmax(1)], axis=1).astype(np.float32).reshape(-1, 4)
    return img.contiguous(), {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(classes),
                              "masks": torch.from_numpy(masks.view(np.uint8))}


# torchvision's COCO Mask R-CNN (ResNet-50-FPN v1): the file name its weights enum downloads to.
COCO_WEIGHTS_FILE = "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"
COCO_ARCHITECTURE = ModelConfig(backbone="resnet50", norm="frozen_bn", fpn_channels=256, box_head_size=1024)


def coco_weights_path() -> Path:
    """Where torchvision keeps the COCO weights once downloaded (the torch hub cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / COCO_WEIGHTS_FILE


def initial_weights(init: str, classes: list[str]) -> tuple[ModelConfig, dict | None, str]:
    """Architecture and starting weights for `--init none | coco | coco:FILE | BUNDLE`.

    Returns (model config sized to `classes`, state dict or None for random, description for the card).
    """
    import dataclasses

    from .bundle import load_bundle
    if init == "none":
        return ModelConfig(classes=tuple(classes)), None, "random initialisation"
    if init == "coco" or init.startswith("coco:"):
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


def check_output_folder(out: Path, resume: bool) -> None:
    """A training writes into a new or empty folder, or continues the one saved there (--resume): an existing
    bundle or anything else the user keeps there is never overwritten."""
    from .errors import OutputError
    if out.exists() and not out.is_dir():
        raise OutputError(f"expected --out to be a folder for the bundle, found a file at {out}")
    if resume:
        if not (out / "checkpoint.pt").is_file():
            raise OutputError(f"expected a training to resume in {out} (its checkpoint.pt), found none; "
                              f"drop --resume to start a new training in a new or empty folder")
    elif out.is_dir() and any(out.iterdir()):
        n = sum(1 for _ in out.iterdir())
        raise OutputError(f"expected --out to be a new or empty folder, found {out} holding {n} entries (a bundle or "
                          f"an earlier training?); choose another folder, or pass --resume to continue the "
                          f"training saved there")


@dataclass
class TrainSettings:
    steps: int = 2000
    batch_size: int = 2
    crop: int = 256
    lr: float = 3e-4
    warmup: int = 100
    minutes: float | None = None      # stop (with a checkpoint) after this much wall time in this run
    checkpoint_every: int = 50        # steps
    checkpoint_minutes: float | None = None   # and at least this often in wall time (a lease that can end)
    # The learning-rate schedule's length in wall time over all runs (resumes included): the cosine follows
    # whichever of steps and time is further along. For a GPU lease measured in minutes, not steps.
    schedule_minutes: float | None = None
    workers: int = 0                  # processes making crops (0: in the training process)
    precision: str = "auto"           # auto | fp32 | bf16 (cellseg.precision: bf16 where the processor has it)
    snapshot_every: int | None = None  # steps between snapshots handed to train()'s on_snapshot
    seed: int = 0
    augmentation: Augmentation = field(default_factory=Augmentation)


class _Crops:
    """Training batches drawn from `items` (by `draw_p`), made in the training process or, with workers, by a
    torch DataLoader whose worker processes each draw with a generator of their own (seed, first step, worker)."""

    def __init__(self, items: list[TrainImage], draw_p: np.ndarray | None, settings: TrainSettings, first_step: int):
        self.items, self.draw_p, self.settings = items, draw_p, settings
        self.first_step = first_step

    def batches(self):
        s = self.settings
        if s.workers <= 0:
            yield from self._stream(np.random.default_rng(s.seed + self.first_step))
            return
        loader = torch.utils.data.DataLoader(_CropStream(self), batch_size=None, num_workers=s.workers,
                                             prefetch_factor=4, persistent_workers=False)
        yield from loader

    def _stream(self, rng: np.random.Generator):
        s = self.settings
        n = len(self.items)
        while True:
            picks = [int(rng.choice(n, p=self.draw_p)) if self.draw_p is not None else int(rng.integers(n))
                     for _ in range(s.batch_size)]
            yield [sample_crop(self.items[i], s.crop, rng, s.augmentation) for i in picks]


class _CropStream(torch.utils.data.IterableDataset):
    """Crops made in DataLoader worker processes; masks travel bit-packed (8x less to copy between processes:
    a batch of dense 512-px crops holds hundreds of MB of one-byte masks) and are unpacked on the device."""

    def __init__(self, crops: _Crops):
        self.crops = crops

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        torch.set_num_threads(1)
        s = self.crops.settings
        for batch in self.crops._stream(np.random.default_rng([s.seed, self.crops.first_step, worker])):
            yield [(img, {**target, "masks": pack_masks(target["masks"])}) for img, target in batch]


def pack_masks(masks: torch.Tensor) -> dict:
    """(N, H, W) 0/1 masks -> bits along W (numpy.packbits) and the shape."""
    return {"bits": torch.from_numpy(np.packbits(masks.numpy().astype(bool), axis=-1)),
            "shape": torch.tensor(masks.shape)}


def unpack_masks(packed: dict, device: torch.device) -> torch.Tensor:
    """pack_masks' inverse, on `device`: uint8 (N, H, W)."""
    bits = packed["bits"].to(device, non_blocking=True)
    n, h, w = (int(v) for v in packed["shape"])
    shifts = torch.arange(7, -1, -1, device=device, dtype=torch.uint8)       # packbits is big-endian in a byte
    return ((bits[..., None] >> shifts) & 1).reshape(n, h, bits.shape[-1] * 8)[..., :w].contiguous()


def _to_device(target: dict, device: torch.device) -> dict:
    out = {k: v.to(device, non_blocking=True) for k, v in target.items() if k != "masks"}
    masks = target["masks"]
    out["masks"] = unpack_masks(masks, device) if isinstance(masks, dict) else masks.to(device, non_blocking=True)
    return out


def train(items: list[TrainImage], classes: list[str], out: Path, settings: TrainSettings,
          model_cfg: ModelConfig | None = None, resume: bool = False, device: str = "cpu",
          card: dict | None = None, progress: bool = True, init: str = "none",
          sample_weights: Sequence[float] | None = None, files: dict[str, str] | None = None,
          on_snapshot: Callable[[Path, int], None] | None = None) -> Path:
    """Train (or resume) and write a bundle to `out`. Returns the bundle folder.

    on_snapshot(bundle_dir, step): with settings.snapshot_every, called every that many steps with a bundle of the
    weights as they stand in out/snapshots/ (e.g. to score it on held-out images; a long run keeps the best).

    sample_weights: one per item, how often its crops are drawn (e.g. to balance modalities); uniform if None.
    files: name -> text, written into `out` beside the bundle when the run starts (e.g. the data split).

    init: "none" (random), "coco" / "coco:FILE" (torchvision's COCO weights, ResNet-50-FPN), or a bundle
    to fine-tune (its architecture; class heads re-initialised when the classes differ).
    """
    from tqdm import tqdm
    if not items:
        raise CellsegError("expected at least one annotated image to train on, found none")
    check_output_folder(out, resume)
    init_cfg, init_state, init_note = initial_weights(init, classes)
    cfg = model_cfg or init_cfg
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (files or {}).items():
        (out / name).write_text(text, encoding="utf-8")
    ckpt_path = out / "checkpoint.pt"
    dev = torch.device(device)
    torch.manual_seed(settings.seed)
    model = build_model(cfg)
    if init_state is not None and not resume:
        fresh = load_matching(model, init_state)
        log.info("started from %s; %d tensors left at random init: %s", init_note, len(fresh), ", ".join(fresh[:6]))
    model, precision, precision_note = prepare_for_training(model, dev, settings.precision)
    log.info("training in %s", precision_note)
    optim = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    step, history, wall, loss_names = 0, [], 0.0, []
    if resume:
        ckpt = torch.load(ckpt_path, map_location=dev, weights_only=True)   # never unpickle arbitrary objects
        model.load_state_dict(ckpt["model"])
        optim.load_state_dict(ckpt["optim"])
        step, history, wall = int(ckpt["step"]), list(ckpt["history"]), float(ckpt["wall_s"])
        loss_names = list(ckpt.get("loss_names", []))
        log.info("resumed from step %d", step)
    draw_p = None
    if sample_weights is not None:
        draw_p = np.asarray(sample_weights, np.float64)
        if draw_p.shape != (len(items),) or (draw_p < 0).any() or draw_p.sum() <= 0:
            raise CellsegError(f"expected {len(items)} non-negative sample weights with a positive sum, "
                               f"found {draw_p.shape[0]} summing to {draw_p.sum():g}")
        draw_p = draw_p / draw_p.sum()

    def lr_at(s: int, wall_s: float) -> float:
        if s < settings.warmup:
            return settings.lr * (s + 1) / settings.warmup
        t = (s - settings.warmup) / max(settings.steps - settings.warmup, 1)
        if settings.schedule_minutes:
            t = max(t, wall_s / (settings.schedule_minutes * 60))
        return settings.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))

    def save_checkpoint() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optim": optim.state_dict(), "step": step,
                    "history": history, "wall_s": wall, "loss_names": loss_names}, tmp)
        os.replace(tmp, ckpt_path)

    def write_bundle(folder: Path, finished: bool) -> None:
        meta = {"training": {"init": init_note, "steps": step, "wall_seconds": round(wall, 1), "device": str(dev),
                             "hardware": _hardware(dev), "precision": precision_note,
                             "batch_size": settings.batch_size, "crop_px": settings.crop, "lr": settings.lr,
                             "finished": finished, "augmentation": settings.augmentation.describe()}}
        for k, v in (card or {}).items():
            if isinstance(v, dict) and isinstance(meta.get(k), dict):
                meta[k].update(v)
            else:
                meta[k] = v
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in (files or {}).items():
            if not (folder / name).exists():
                (folder / name).write_text(text, encoding="utf-8")
        save_bundle(folder, cfg, {k: v.contiguous() for k, v in model.state_dict().items()}, name=out.name,
                    nucleus_diameter_px=median_diameter_px(items), card=meta, proposal_threshold=PROPOSAL_THRESHOLD)

    started = last_save = time.monotonic()
    wall0 = wall
    bar = tqdm(total=settings.steps, initial=step, disable=not progress, desc="train", unit="step")
    interrupted = False
    batches = _Crops(items, draw_p, settings, step).batches()
    try:
        while step < settings.steps:
            now = time.monotonic()
            if settings.minutes is not None and now - started > settings.minutes * 60:
                break
            if settings.schedule_minutes and step >= settings.warmup and wall >= settings.schedule_minutes * 60:
                break        # the time schedule has run its course
            batch = next(batches)
            images = [b[0].to(dev, non_blocking=True) for b in batch]
            targets = [_to_device(b[1], dev) for b in batch]
            for g in optim.param_groups:
                g["lr"] = lr_at(step, wall)
            loss, losses = training_step(model, optim, images, targets, precision, step)
            loss_names = list(losses)
            step += 1
            wall = wall0 + time.monotonic() - started
            history.append([step, float(loss.detach())] + [float(v.detach()) for v in losses.values()])
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1][1]:.3f}")
            if step % settings.checkpoint_every == 0 or (
                    settings.checkpoint_minutes and time.monotonic() - last_save > settings.checkpoint_minutes * 60):
                save_checkpoint()
                last_save = time.monotonic()
            if on_snapshot is not None and settings.snapshot_every and step % settings.snapshot_every == 0:
                snapshot = out / "snapshots" / f"step{step:07d}"
                write_bundle(snapshot, finished=False)
                save_checkpoint()              # the snapshot's step is never trained again after a resume
                last_save = time.monotonic()
                on_snapshot(snapshot, step)
    except KeyboardInterrupt:   # Ctrl-C: keep what was learnt (below), then say how to go on
        interrupted = True
    finally:
        if hasattr(batches, "close"):
            batches.close()     # stops crop workers
    bar.close()
    save_checkpoint()
    _write_log(out, history, loss_names)
    write_bundle(out, finished=step >= settings.steps
                 or bool(settings.schedule_minutes and wall >= settings.schedule_minutes * 60))
    if interrupted:
        raise TrainingInterrupted(f"training interrupted at step {step} of {settings.steps}; its checkpoint and a "
                                  f"bundle of it are saved in {out}: the same command with --resume continues it")
    return out


def prepare_for_training(model: torch.nn.Module, dev: torch.device, precision: str = "auto",
                         channels_last: bool = True) -> tuple[torch.nn.Module, str, str]:
    """The model on `dev` in training mode, set up for the CPU where it runs there; returns (model, precision,
    why): precision 'bf16' or 'fp32' (cellseg.precision.resolve_precision)."""
    model = model.to(dev).train()
    chosen, why = resolve_precision(precision, dev.type,
                                    cuda_bf16=dev.type == "cuda" and torch.cuda.is_bf16_supported())
    model.backbone.fpn.in_fp32 = False   # rcnn_parts.Fp32FeaturePyramidNetwork: fp32 only for inference
    if dev.type == "cpu":
        thread_roi_pools(model)   # RoIAlign's backward was a fifth of a CPU step, on one core
        if channels_last:         # NHWC convolutions: 0.87 -> 0.72 s a step in fp32 on a 2-core Zen 5
            model = model.to(memory_format=torch.channels_last)
    return model, chosen, why


def training_step(model: torch.nn.Module, optim: torch.optim.Optimizer, images: list, targets: list,
                  precision: str, step: int = 0) -> tuple[torch.Tensor, dict]:
    """One optimiser step on a batch (forward under bf16 autocast when `precision` is 'bf16'); returns the total
    loss and its parts. A non-finite loss stops the training with a one-line error."""
    device_type = images[0].device.type
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        losses = model(images, targets)
    loss = sum(losses.values())
    if not torch.isfinite(loss):
        raise CellsegError(f"training diverged at step {step} (loss {loss.item()}); lower the learning rate")
    optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
    optim.step()
    return loss, losses


def _write_log(out: Path, history: list, loss_names: list[str]) -> None:
    if not history:
        return
    # A checkpoint from before loss names were stored: name the parts by position.
    names = loss_names or [f"loss_part{k}" for k in range(len(history[0]) - 2)]
    with open(out / "training_log.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss"] + names)
        w.writerows(history)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    h = np.asarray([row[:2] for row in history])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(h[:, 0], h[:, 1], alpha=0.3, label="loss")
    k = max(1, len(h) // 50)
    ax.plot(h[k - 1:, 0], np.convolve(h[:, 1], np.ones(k) / k, mode="valid"), label=f"mean of {k}")
    ax.set_xlabel("step"), ax.set_ylabel("total loss"), ax.legend()
    fig.tight_layout()
    fig.savefig(out / "training_loss.png", dpi=100)
    plt.close(fig)


def _hardware(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU {cpu_model()}, {torch.get_num_threads()} threads"

