"""Train the small tissue U-Net on synthetic slide views built from DSB2018 training images; write the bundle.

From the repository's root:

    OMP_WAIT_POLICY=PASSIVE python -m references.tissue.train_tissue_unet --out runs/tissue --minutes 22
    python -m references.tissue.train_tissue_unet --out runs/tissue --resume    # continue a stopped run
    python -m references.tissue.train_tissue_unet --out runs/tissue --eval-only # re-measure, rewrite the card

--out is the training's folder (checkpoint.pt, training_log.csv) and the bundle's: copy its model.toml,
weights.safetensors, README.md, training_loss.png and example.png to cellseg/models/tissue to ship it.

Only `stratified_split(manifest, 0.1, seed=0)["train"]` images are used (the "val" images are held out for the
first nuclei model and fill example_slides/). Views: tissue_synth.py. A pool of views is synthesised once (cached
under runs/, git-ignored), then random 160² crops with flips / 90° rotations are drawn from it. Training goes
through cellseg's training loop (cellseg.training.loop: schedule, checkpoints, --resume, the loss log). Evaluation: a
held-out synthetic set (another seed), the example slides in example_slides/ (never trained on) and tissue-free
synthetic slides; the figures go into model.toml [metrics] and README.md.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi
from torch.nn import functional as F

from cellseg.detection import cpu_model
from cellseg.errors import CellsegError
from cellseg.tissue.unet import (
    TissueUNetConfig,
    build_tissue_unet,
    load_tissue_bundle,
    predict_tissue,
    save_tissue_bundle,
    tissue_input,
)
from cellseg.training import LoopSettings, TrainingState, check_output_folder, run_training

from . import tissue_synth as ts

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "dsb2018-train"
EXAMPLES = ROOT / "example_slides"
VIEW_UM_PER_PX = 8.0
WARMUP_STEPS = 50
log = logging.getLogger("train_tissue_unet")


def stratified_split(manifest: Path, val_fraction: float = 0.1, seed: int = 0) -> dict[str, list[str]]:
    """The first nuclei model's DSB2018 split: a seeded random `val_fraction` of each modality_guess held out. The
    example slides (example_slides/) were cut from its "val" images, so the U-Net trains on its "train" side only."""
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    rng = np.random.default_rng(seed)
    split = {"train": [], "val": []}
    for modality in sorted({r["modality_guess"] for r in rows}):
        ids = sorted(r["image_id"] for r in rows if r["modality_guess"] == modality)
        rng.shuffle(ids)
        n_val = max(1, round(len(ids) * val_fraction))
        split["val"] += ids[:n_val]
        split["train"] += ids[n_val:]
    return split


def make_pool(src, n: int, seed: int, cache: Path | None):
    """n views as (float16 inputs (n, 3, S, S), uint8 labels (n, S, S), infos), cached in an .npz."""
    if cache is not None and cache.is_file():
        z = np.load(cache, allow_pickle=False)
        log.info("pool %s loaded from %s", z["x"].shape, cache)
        return z["x"], z["y"], [{"modality": m, "shape": s} for m, s in zip(z["modality"], z["shape"])]
    rng = np.random.default_rng(seed)
    xs, ys, infos = [], [], []
    t0 = time.time()
    for _ in range(n):
        view, label, info = ts.make_view(rng, src)
        xs.append(tissue_input(view).astype(np.float16))
        ys.append(label)
        infos.append(info)
    x, y = np.stack(xs), np.stack(ys)
    log.info("synthesised %d views in %.0f s", n, time.time() - t0)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, x=x, y=y, modality=[i["modality"] for i in infos], shape=[i["shape"] for i in infos])
    return x, y, infos


def crop_batch(rng, x, y, size: int, crop: int):
    """`size` random crop x crop windows of the pool with flips and 90° rotations: (inputs, targets) tensors."""
    idx = rng.integers(len(x), size=size)
    S = x.shape[-1]
    xb, yb = [], []
    for i in idx:
        r, c = rng.integers(S - crop + 1, size=2)
        a, b = x[i, :, r:r + crop, c:c + crop].astype(np.float32), y[i, r:r + crop, c:c + crop]
        k = int(rng.integers(4))
        a, b = np.rot90(a, k, axes=(1, 2)), np.rot90(b, k)
        if rng.random() < 0.5:
            a, b = a[:, :, ::-1], b[:, ::-1]
        xb.append(np.ascontiguousarray(a))
        yb.append(np.ascontiguousarray(b))
    return torch.from_numpy(np.stack(xb)), torch.from_numpy(np.stack(yb)[:, None].astype(np.float32))


def tissue_losses(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """BCE + 0.5 Dice, as the loop's loss parts (loss_dice is the weighted term)."""
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return {"loss_bce": F.binary_cross_entropy_with_logits(logits, target), "loss_dice": 0.5 * dice}


@dataclass
class TissueTraining:
    """The U-Net's part of a training in cellseg's loop (cellseg.training.loop.TrainingTask): crops of the view pool,
    its loss, its bundle. `card`: the training's facts for model.toml (steps and wall time added at each write)."""

    net: torch.nn.Module
    cfg: TissueUNetConfig
    x: np.ndarray
    y: np.ndarray
    batch_size: int
    crop: int
    seed: int
    threshold: float
    card: dict

    def batches(self, first_step: int) -> Iterator:
        rng = np.random.default_rng(self.seed + 7 + first_step)
        while True:
            yield crop_batch(rng, self.x, self.y, self.batch_size, self.crop)

    def losses(self, batch) -> dict[str, torch.Tensor]:
        xb, yb = batch
        return tissue_losses(self.net(xb), yb)

    def write_bundle(self, folder: Path, state: TrainingState, finished: bool) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        training = {**self.card, "steps": state.step, "train_wall_s": round(state.wall_s, 1), "finished": finished}
        if state.history:
            training["final_loss_mean_last_50"] = round(float(np.mean([row[1] for row in state.history[-50:]])), 4)
        save_tissue_bundle(folder, self.cfg, self.net.state_dict(), name="tissue", view_um_per_px=VIEW_UM_PER_PX,
                           threshold=self.threshold, card={"training": training})


# --- evaluation ---------------------------------------------------------------------------------------------

@torch.inference_mode()
def eval_synthetic(net, x, y, infos, threshold: float) -> dict:
    inter, union, false_tissue = {}, {}, []
    for i in range(len(x)):
        prob = torch.sigmoid(net(torch.from_numpy(x[i:i + 1].astype(np.float32))))[0, 0].numpy()
        pred, gt = prob >= threshold, y[i] > 0
        m = infos[i]["modality"]
        if not gt.any():
            false_tissue.append(pred.mean())
        inter[m] = inter.get(m, 0) + (pred & gt).sum()
        union[m] = union.get(m, 0) + (pred | gt).sum()
    out = {f"iou_{m}": round(float(inter[m] / max(union[m], 1)), 4) for m in sorted(inter)}
    out["no_tissue_views"] = len(false_tissue)
    out["false_tissue_fraction_no_tissue_views"] = round(float(np.mean(false_tissue)), 4)
    out["no_tissue_views_with_over_1pct_tissue"] = int(sum(f > 0.01 for f in false_tissue))
    return out


def _read_view(path: Path, um_per_px: float):
    from cellseg.slides import open_slide
    with open_slide(path) as s:
        max_side = max(1, round(max(s.info.height, s.info.width) * s.info.mpp / um_per_px))
        view, factor = s.read_thumbnail(max_side)
        return view, factor, s.info


def _upsample(mask: np.ndarray, factor: float, shape) -> np.ndarray:
    rows = np.minimum((np.arange(shape[0]) / factor).astype(int), mask.shape[0] - 1)
    cols = np.minimum((np.arange(shape[1]) / factor).astype(int), mask.shape[1] - 1)
    return mask[np.ix_(rows, cols)]


def _rect_truth(name: str, shape) -> np.ndarray:
    truth = np.zeros(shape, bool)
    for r in csv.DictReader(open(EXAMPLES / "sources.csv", newline="")):
        if r["slide"] == name:
            r0, c0 = int(r["row0"]), int(r["col0"])
            truth[r0:r0 + int(r["height"]), c0:c0 + int(r["width"])] = True
    return truth


def eval_examples(net, threshold: float) -> dict:
    import tifffile
    out = {}
    for name, ums in [("fluo_mosaic", (8.0, 4.0)), ("he_mosaic", (8.0, 4.0, 2.0)), ("empty_regions", (8.0, 16.0))]:
        labels = tifffile.imread(EXAMPLES / f"{name}_labels.tif")
        rects = _rect_truth(f"{name}.ome.tif", labels.shape)
        for um in ums:
            view, factor, info = _read_view(EXAMPLES / f"{name}.ome.tif", um)
            prob = predict_tissue(net, view)
            key = f"{name}_{um:g}um"
            for dil in (0, 1, 2):
                mask = prob >= threshold
                if dil:
                    mask = ndi.binary_dilation(mask, iterations=dil)
                full = _upsample(mask, factor, labels.shape)
                res = {"view_px": f"{view.shape[0]}x{view.shape[1]}",
                       "nuclei_px_in_tissue": round(float(full[labels > 0].mean()), 4),
                       "tissue_iou_vs_pasted_fields": round(float((full & rects).sum() / (full | rects).sum()), 4),
                       "background_called_tissue": round(float(full[~rects].mean()), 4)}
                if name == "empty_regions":
                    tile = 512
                    n = labels.shape[0] // tile
                    frac = full.reshape(n, tile, n, tile).mean(axis=(1, 3))
                    kept = frac >= 0.01
                    ids = np.arange(1, labels.max() + 1)
                    cents = np.array(ndi.center_of_mass(labels > 0, labels, ids))
                    nuc_kept = kept[(cents[:, 0] // tile).astype(int), (cents[:, 1] // tile).astype(int)]
                    truth_tiles = (labels > 0).reshape(n, tile, n, tile).any(axis=(1, 3))
                    res.update({"tiles_kept": f"{int(kept.sum())}/{kept.size}",
                                "tiles_skipped_fraction": round(1 - float(kept.mean()), 4),
                                "tiles_with_nuclei_kept": f"{int((kept & truth_tiles).sum())}/{int(truth_tiles.sum())}",
                                "nuclei_kept": f"{int(nuc_kept.sum())}/{len(ids)}"})
                out[f"{key}_dilate{dil}"] = res
    return out


def no_tissue_slides(net, threshold: float, seed: int = 123) -> dict:
    """Plain glass and plain dark field (512², uint8 / uint16, illumination + noise): tissue fraction."""
    rng = np.random.default_rng(seed)
    res = {}
    for kind in ("glass", "dark"):
        fr = []
        for k in range(6):
            S = 512
            light = ts.illumination(rng, S, rng.uniform(0, 0.12 if kind == "glass" else 0.04))
            if kind == "glass":
                img = rng.uniform(0.8, 0.97) * (1 + rng.normal(0, 0.015, 3))[None, None] * (1 + light[..., None])
                img = img + rng.normal(0, rng.uniform(0.002, 0.01), img.shape)
            else:
                img = rng.uniform(0, 0.08) + light + rng.normal(0, rng.uniform(0, 0.01), (S, S))
                img = np.clip(img, 0, None)[..., None]
            native = (np.clip(img * 255, 0, 255).round().astype(np.uint8) if k % 2 == 0
                      else np.clip(img * 4095, 0, 65535).round().astype(np.uint16))
            fr.append(float((predict_tissue(net, native) >= threshold).mean()))
        res[f"{kind}_tissue_fraction_max"] = round(max(fr), 5)
        res[f"{kind}_tissue_fraction_mean"] = round(float(np.mean(fr)), 5)
    return res


def example_figure(net, threshold: float, path: Path) -> None:
    """The example slides' views (as the net sees them) with the predicted tissue outlined in red."""
    from PIL import Image
    panels = []
    for name, um in [("empty_regions", 8.0), ("fluo_mosaic", 8.0), ("he_mosaic", 2.0)]:
        view, _, _ = _read_view(EXAMPLES / f"{name}.ome.tif", um)
        mask = predict_tissue(net, view) >= threshold
        rgb = tissue_input(view).transpose(1, 2, 0).copy()
        outline = mask & ~ndi.binary_erosion(mask, border_value=0)
        rgb[outline] = (1.0, 0.1, 0.1)
        im = Image.fromarray((rgb * 255).astype(np.uint8))
        h = 256
        panels.append(im.resize((round(im.width * h / im.height), h), Image.Resampling.NEAREST))
    canvas = Image.new("RGB", (sum(p.width for p in panels) + 8 * (len(panels) - 1), panels[0].height), "white")
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width + 8
    canvas.save(path, optimize=True)


# --- card -------------------------------------------------------------------------------------------------------

def readme(bundle, card: dict) -> str:
    t, m = card["training"], card["metrics"]
    syn, ex, nt = m["synthetic_heldout"], m["example_slides"], m["no_tissue_slides"]
    er = ex["empty_regions_8um_dilate1"]
    rows = "\n".join(
        f"| {k.replace('_dilate', ' dilate ')} | {v['view_px']} | {v['nuclei_px_in_tissue']:.4f} | "
        f"{v['tissue_iou_vs_pasted_fields']:.3f} | {v['background_called_tissue']:.4f} | "
        f"{v.get('tiles_kept', '')} {v.get('nuclei_kept', '')} |"
        for k, v in ex.items())
    return f"""# tissue: cellseg's tissue / background U-Net

A small U-Net (depth {bundle.config.depth}, {bundle.config.base_channels} base channels, BatchNorm, {t['parameters']:,}
parameters, float16 weights {t['weights_mb']:.2f} MB) that labels each pixel of a low-resolution slide view
(meant for {VIEW_UM_PER_PX:g} µm/px; trained on about 1.5-17 µm/px, evaluated at 2-16 µm/px below) as tissue (stained tissue in brightfield, cell-covered
area in fluorescence) or background (glass, dark field, dust, pen marks, bubbles, haze, label edge). The
pipeline uses it to skip background tiles before the cell detector. Input normalisation:
`cellseg.tissue.unet.tissue_input` (the same in training and inference). Probability threshold {bundle.threshold}.

## Data: synthetic views from real nuclei images

No slide-level tissue annotations are available offline, and nothing can be downloaded here, so the
training views are synthesised (`references/tissue/tissue_synth.py`) from real images: the **DSB2018 stage1_train**
set (BBBC038, Broad Institute; licence **CC0 1.0**; Caicedo et al., "Nucleus segmentation across imaging
experiments: the 2018 Data Science Bowl", Nature Methods 16, 1247-1253 (2019)), **training split only**
(`stratified_split(manifest.csv, val_fraction=0.1, seed=0)["train"]`, {t['train_images']} images; the 67
"val" images are held out and fill `example_slides/`).

Each {t['view_px']}² view: brightfield glass (tint, vignetting, gradients, noise) or fluorescence dark field
(offset, haze, gradients, noise); tissue as smooth blobs, whole sections, needle cores, round cores,
small fragments or mosaics of rectangular microscope fields (about 12 % of views: no tissue), filled with
DSB images of the matching modality downsampled 4-45x with area averaging (about 1.5-17 µm/px at a
nominal 0.375 µm/px), with stain-strength and brightness variation, autofluorescence lift, folds (tissue)
and tears (background); in 40 % of the H&E sections part of the tissue is procedural stroma (eosin of
varying density, sparse nuclei, sometimes fat: empty cells with thin walls), because DSB crops are all
nucleus-dense. Artefacts labelled background: dust, debris, fibres, pen strokes, air bubbles,
out-of-focus haze, the slide-label edge. Outputs uint8, uint16 (12-16 bit, offsets) or float, as grey,
RGB or 2-4 channel fluorescence. Balanced brightfield / fluorescence.

## Limits

- The synthesis is the model's main limitation: no real whole-slide image was seen in training; textures
  such as necrosis, mucin, blood, IHC (DAB brown) or unusual stains are not represented.
- Resolution: best at 2-8 µm/px. At 16 µm/px sparse fluorescence fields lose a few nuclei (see
  `empty_regions_16um` below); below ~1.5 µm/px single nuclei are several pixels wide, unlike training.
- Thin gaps (< 1-2 view px) between tissue pieces are called tissue; ink-like uniform dark strokes and
  a lilac slide label can be called tissue in rare cases (held-out no-tissue views below).
- Grow the mask by 1-2 view px before deciding which tiles to skip (the nuclei on a tissue border).

## Recipe

{t['pool_views']} views synthesised once (seed {t['seed']}, {t['synthesis_s']:.0f} s), then random {t['crop_px']}² crops with
flips and 90° rotations; BCE + 0.5 Dice; AdamW lr {t['lr']}, {WARMUP_STEPS} warm-up steps then cosine decay to
3 % over the time budget; batch {t['batch_size']}; {t['steps']} steps in {t['train_wall_s'] / 60:.1f} min on
{t['hardware']}.
Reproduce, from the repository's root: `OMP_WAIT_POLICY=PASSIVE python -m references.tissue.train_tissue_unet
--out runs/tissue --minutes {t['minutes_budget']:g} --seed {t['seed']}`, then copy the bundle to
`cellseg/models/tissue` (`--eval-only` re-measures a bundle and rewrites this card).

![training loss](training_loss.png)

![example slides](example.png)

`example.png`: the held-out example slides `empty_regions` (8 µm/px), `fluo_mosaic` (8 µm/px) and
`he_mosaic` (2 µm/px) as the net sees them (after `tissue_input`), predicted tissue outlined in red.

## Evaluation

Held-out synthetic views ({syn['views']}, another seed): pixel IoU of tissue brightfield
**{syn['iou_bf']:.3f}**, fluorescence **{syn['iou_fluo']:.3f}**; on the {syn['no_tissue_views']} views without tissue,
{syn['false_tissue_fraction_no_tissue_views'] * 100:.2f} % of pixels called tissue
({syn['no_tissue_views_with_over_1pct_tissue']} views above 1 %).

Tissue-free synthetic slides (512², uint8 and uint16, 6 each): glass at most
{nt['glass_tissue_fraction_max'] * 100:.2f} % tissue, dark field at most {nt['dark_tissue_fraction_max'] * 100:.2f} %.

Example slides (held out; views read with `read_thumbnail` at the given µm/px; mask = probability >=
{bundle.threshold}, then dilated by 0-2 view px; "pasted fields" = the union of the pasted DSB images):
`empty_regions` at 8 µm/px, dilation 1, 512-px tiles: {er['tiles_kept']} kept
({er['tiles_skipped_fraction'] * 100:.0f} % skipped), tiles holding nuclei kept {er['tiles_with_nuclei_kept']},
nuclei in kept tiles {er['nuclei_kept']}.

| slide, view, dilation | view px | nuclei px in tissue | IoU vs pasted fields | background called tissue | empty_regions tiles kept, nuclei kept |
|---|---|---|---|---|---|
{rows}
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the training's and the bundle's folder")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--minutes", type=float, default=22.0,
                   help="training time over all runs: the learning-rate schedule's length")
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool", type=int, default=3000)
    p.add_argument("--heldout", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=160)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--resume", action="store_true", help="continue the training saved in --out")
    p.add_argument("--eval-only", action="store_true", help="re-evaluate the bundle in --out, rewrite its card")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    if not args.eval_only:
        try:
            check_output_folder(args.out, args.resume)    # before minutes of synthesis, not after
        except CellsegError as e:
            raise SystemExit(f"train_tissue_unet: error: {e}") from None
    version = hashlib.sha256(Path(ts.__file__).read_bytes()
                             + (ROOT / "cellseg" / "tissue/unet.py").read_bytes()).hexdigest()[:10]
    ids = stratified_split(args.data / "manifest.csv", val_fraction=0.1, seed=0)["train"]
    t0 = time.time()
    src = ts.Sources(args.data, ids)
    cache = ROOT / "runs" / "tissue_pool"
    if not args.eval_only:
        x, y, infos = make_pool(src, args.pool, args.seed, cache / f"train_s{args.seed}_n{args.pool}_{version}.npz")
    hx, hy, hinfos = make_pool(src, args.heldout, args.seed + 1000, cache / f"heldout_s{args.seed + 1000}_n{args.heldout}_{version}.npz")
    synthesis_s = time.time() - t0

    if args.eval_only:
        bundle = load_tissue_bundle(args.out)
        net, cfg, card = bundle.build(), bundle.config, dict(bundle.card)
    else:
        cfg = TissueUNetConfig(base_channels=args.base_channels, depth=args.depth)
        net = build_tissue_unet(cfg).train()
        n_params = sum(p.numel() for p in net.parameters())
        facts = {
            "data": "DSB2018 stage1_train (BBBC038) training split, synthetic slide views "
                    "(references/tissue/tissue_synth.py)",
            "licence": "CC0 1.0", "citation": "Caicedo et al., Nature Methods 16, 1247-1253 (2019)",
            "train_images": len(ids), "pool_views": args.pool, "view_px": int(x.shape[-1]), "seed": args.seed,
            "synthesis_s": round(synthesis_s, 1), "crop_px": args.crop, "batch_size": args.batch_size, "lr": args.lr,
            "loss": "BCE + 0.5 Dice", "minutes_budget": args.minutes,
            "hardware": f"{cpu_model()}, 1 thread (no GPU)",
            "parameters": n_params, "weights_mb": round(n_params * 2 / 1e6, 2)}
        task = TissueTraining(net, cfg, x, y, args.batch_size, args.crop, args.seed, args.threshold, facts)
        # The schedule runs over the time budget (or --steps, whichever ends first), ends at 3 % of the peak rate,
        # and leaves the gradients unclipped: the recipe as it was before it trained in cellseg's loop.
        settings = LoopSettings(steps=args.steps, lr=args.lr, warmup=WARMUP_STEPS, final_lr_fraction=0.03,
                                schedule_minutes=args.minutes, checkpoint_every=1000,
                                checkpoint_minutes=args.checkpoint_minutes, clip_grad_norm=None)
        optim = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
        run_training(task, net, optim, settings, args.out, resume=args.resume)
        net.eval()
        card = dict(load_tissue_bundle(args.out).card)
    metrics = {"synthetic_heldout": {"views": len(hx), **eval_synthetic(net, hx, hy, hinfos, args.threshold)},
               "no_tissue_slides": no_tissue_slides(net, args.threshold),
               "example_slides": eval_examples(net, args.threshold)}
    log.info("metrics: %s", metrics)
    card["metrics"] = metrics
    bundle = save_tissue_bundle(args.out, cfg, net.state_dict(), name="tissue", view_um_per_px=VIEW_UM_PER_PX,
                                threshold=args.threshold, card=card)
    example_figure(net, args.threshold, args.out / "example.png")
    (args.out / "README.md").write_text(readme(bundle, card), encoding="utf-8")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
