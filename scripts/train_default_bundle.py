"""Train the default nuclei bundle on DSB2018 (../shared/data/dsb2018-train), resumable across runs.

Holds out a validation split by image, stratified by modality (manifest.csv `modality_guess`), and writes
it to OUT/split.json so evaluation uses exactly the held-out images.

    python scripts/train_default_bundle.py --out runs/nuclei --minutes 60 [--resume] [--device cuda]

Fine-tune the shipped bundle with stained images drawn a third of the time (they are 18 % of the images):

    python scripts/train_default_bundle.py --out runs/ft --init cellseg/models/nuclei --stained-share 0.33 \
        --steps 2000 --lr 1e-4
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch

from cellseg.train import TrainSettings, check_output_folder, load_coco, train

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dsb2018-train"


def stratified_split(manifest: Path, val_fraction: float, seed: int) -> dict[str, list[str]]:
    rows = list(csv.DictReader(open(manifest)))
    rng = np.random.default_rng(seed)
    split = {"train": [], "val": []}
    for modality in sorted({r["modality_guess"] for r in rows}):
        ids = sorted(r["image_id"] for r in rows if r["modality_guess"] == modality)
        rng.shuffle(ids)
        n_val = max(1, round(len(ids) * val_fraction))
        split["val"] += ids[:n_val]
        split["train"] += ids[n_val:]
    return split


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=None)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--init", default="none", help="none | coco | coco:FILE | BUNDLE to fine-tune")
    p.add_argument("--stained-share", type=float, default=None,
                   help="draw stained (non-fluorescence) images with this probability; default: every image alike")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    check_output_folder(args.out, args.resume)   # before an hour of loading and training, not after
    split = stratified_split(args.data / "manifest.csv", args.val_fraction, seed=0)
    coco = json.loads((args.data / "annotations.json").read_text())
    stem_to_id = {Path(im["file_name"]).stem: im["id"] for im in coco["images"]}
    train_ids = {stem_to_id[s] for s in split["train"]}
    items, classes = load_coco(args.data / "annotations.json", image_ids=train_ids)
    weights, sampling = None, "every training image equally likely"
    if args.stained_share is not None:
        if not 0 < args.stained_share < 1:
            p.error(f"expected --stained-share between 0 and 1, got {args.stained_share}")
        modality = {r["image_id"]: r["modality_guess"] for r in csv.DictReader(open(args.data / "manifest.csv"))}
        id_to_stem = {v: k for k, v in stem_to_id.items()}
        stained = np.array([modality[id_to_stem[i]] != "fluorescence" for i in sorted(train_ids)])  # load_coco order
        weights = np.where(stained, args.stained_share / stained.sum(), (1 - args.stained_share) / (~stained).sum())
        sampling = f"stained images ({stained.sum()} of {len(stained)}) drawn with probability {args.stained_share}"
    logging.info("loaded %d training images, %d instances", len(items), sum(len(i.masks) for i in items))
    card = {"data": {"name": "DSB2018 stage1_train (BBBC038) with community mask fixes",
                     "licence": "CC0 1.0", "source": "Caicedo et al., Nature Methods 16, 1247-1253 (2019)",
                     "train_images": len(split["train"]), "val_images": len(split["val"]),
                     "split": "by image, stratified by modality_guess, seed 0, see split.json",
                     "sampling": sampling}}
    if args.init not in ("none", "coco") and not args.init.startswith("coco:"):
        from cellseg.bundle import load_bundle   # fine-tuning: the card keeps the first stage's recipe and compute
        base = load_bundle(args.init)
        # Every earlier stage, oldest first, so a bundle fine-tuned twice still adds up its compute and recipe.
        stages = list(base.card.get("earlier_stages") or ([base.card["base_training"]] if "base_training" in base.card else []))
        stages.append({"bundle": base.name, "weights_sha256": base.weights_sha256, **base.card.get("training", {})})
        card["earlier_stages"] = stages
    if args.stained_share is not None:
        card["training"] = {"stained_share": args.stained_share}
    train(items, classes, args.out, TrainSettings(steps=args.steps, batch_size=args.batch_size, crop=args.crop,
                                                  lr=args.lr, minutes=args.minutes),
          resume=args.resume, device=args.device, card=card, init=args.init, sample_weights=weights)
    (args.out / "split.json").write_text(json.dumps(split, indent=1))   # the bundle's held-out images


if __name__ == "__main__":
    main()
