"""Training crops of annotated images: a random window with zoom, flips, 90° rotations and cellseg.training.augment's
photometric changes, its masks and boxes kept consistent; batches of them drawn by image weights, made in the
training process or by DataLoader worker processes (a GPU run's --workers), masks bit-packed between processes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CellsegError
from .augment import Augmentation, augment_pixels
from .copy_paste import paste_nuclei
from .data import TrainImage


@dataclass
class CropSettings:
    """How training batches are made."""

    batch_size: int = 2
    crop: int = 256                   # px, at most (an image smaller than that after zooming gives a smaller crop)
    workers: int = 0                  # processes making crops (0: in the training process)
    seed: int = 0
    augmentation: Augmentation = field(default_factory=Augmentation)


def sample_crop(item: TrainImage, size: int, rng: np.random.Generator,
                aug: Augmentation = Augmentation()) -> tuple[torch.Tensor, dict]:
    """A random training crop of at most size x size: zoom (anisotropic with aug.aspect_p), copy-paste of nuclei
    (aug.paste_p, training.copy_paste), flips, 90° rotations, then the photometric augmentations of
    cellseg.training.augment. A crop never reaches beyond its image (no padding that the network would
    learn to see as an edge): an image smaller than `size` after zooming gives a smaller crop.

    Masks are resampled one instance at a time, at their own box (nearest pixel centre, as the bilinear image
    resampling's half-pixel grid): never N full-size float canvases, which cost more than the training step's
    data on dense crops."""
    _, H, W = item.image.shape
    scale = float(np.exp(rng.uniform(np.log(aug.scale[0]), np.log(aug.scale[1]))))
    # rows and columns zoomed alike, or (aspect_p) by factors whose ratio is up to `aspect`: elongated nuclei
    ratio = float(np.exp(rng.uniform(-1, 1) * np.log(aug.aspect) / 2)) if aug.aspect_p and rng.random() < aug.aspect_p \
        else 1.0
    scale_r, scale_c = scale * ratio, scale / ratio
    out_h, out_w = min(size, max(8, round(H * scale_r))), min(size, max(8, round(W * scale_c)))
    src_h, src_w = min(H, max(4, round(out_h / scale_r))), min(W, max(4, round(out_w / scale_c)))
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
                            antialias=min(scale_r, scale_c) < 1)[0]
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
    if aug.paste_p and rng.random() < aug.paste_p:
        # the crop's zoom as the output/source size ratio actually used (rounding), so pasted nuclei match
        pasted, masks, classes = paste_nuclei(img.numpy(), masks, classes, item, (out_h / src_h, out_w / src_w),
                                              rng, aug)
        img = torch.from_numpy(pasted)
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



def draw_probabilities(sample_weights: Sequence[float] | None, n_items: int) -> np.ndarray | None:
    """How often each of `n_items` images is drawn, from one weight per image (None: uniform)."""
    if sample_weights is None:
        return None
    draw_p = np.asarray(sample_weights, np.float64)
    if draw_p.shape != (n_items,) or (draw_p < 0).any() or draw_p.sum() <= 0:
        raise CellsegError(f"expected {n_items} non-negative sample weights with a positive sum, "
                           f"found {draw_p.shape[0]} summing to {draw_p.sum():g}")
    return draw_p / draw_p.sum()


class CropBatches:
    """Training batches drawn from `items` (by `draw_p`), made in the training process or, with workers, by a
    torch DataLoader whose worker processes each draw with a generator of their own (seed, first step, worker)."""

    def __init__(self, items: list[TrainImage], draw_p: np.ndarray | None, settings: CropSettings,
                 first_step: int):
        self.items, self.draw_p, self.settings = items, draw_p, settings
        self.first_step = first_step

    def batches(self) -> Iterator[list]:
        """Endless batches of (image, target) crops; closing the generator stops the workers."""
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

    def __init__(self, crops: CropBatches):
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


def targets_to_device(target: dict, device: torch.device) -> dict:
    """A crop's target on `device`, its masks unpacked where they came bit-packed from a worker."""
    out = {k: v.to(device, non_blocking=True) for k, v in target.items() if k != "masks"}
    masks = target["masks"]
    out["masks"] = unpack_masks(masks, device) if isinstance(masks, dict) else masks.to(device, non_blocking=True)
    return out


