"""Training steps per hour of the nuclei recipe on this machine, for each variant, measured alternately in one run.

Every variant starts from the same bundle's weights and trains on the same batches (crops drawn once, with the
recipe's augmentation, from the first training images of the bundle's split), so only the arithmetic differs:

    shipped     fp32, NCHW, torchvision's RoIAlign (the recipe before bf16, channels_last and RoIAlign as matrices)
    cl          fp32, channels_last
    bf16_cl_tv  bf16 autocast + channels_last, torchvision's RoIAlign kernel (only where bf16 is native, or
                --force-bf16; like bf16_cl)
    bf16_cl     bf16 autocast + channels_last      (the recipe: RoIAlign as matrix products, detection/roi_align.py)
    bf16_cl_rpn ... and RPN training proposals 2000/1000 instead of 4000/2000 (with --rpn-trim)
    recipe_B    the recipe (bf16_cl where native, else cl) on a fresh network with backbone B, random weights
                (with --backbone B, e.g. resnet34): what a step of a larger network costs here

Rounds alternate the variants (a few steps each), so a machine that slows down slows all of them alike; the table
gives the median seconds per step, steps per hour and the ratio to `shipped`.

    python benchmarks/train_speed.py [--bundle cellseg/models/nuclei] [--rounds 4] [--steps 5] [--batch-size 2]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cellseg.bundles import load_bundle  # noqa: E402
from cellseg.detection import (  # noqa: E402
    build_model,  # noqa: E402
    cpu_flags,
    cpu_has_native_bf16,
    cpu_model,
)
from cellseg.training import (  # noqa: E402
    Augmentation,  # noqa: E402
    prepare_for_training,
    sample_crop,  # noqa: E402
    train_image_from_labels,  # noqa: E402
    training_step,
)
from references.nuclei.datasets import Split, read_pixels  # noqa: E402
from references.nuclei.recipe import training_images  # noqa: E402


def batches(bundle_dir: Path, data_root: Path, n_images: int, n_batches: int, batch_size: int, crop: int) -> list:
    split = Split.from_json(json.loads((bundle_dir / "split.json").read_text()))
    images = training_images(data_root, split)
    rng = np.random.default_rng(0)
    chosen = [images[i] for i in rng.choice(len(images), size=min(n_images, len(images)), replace=False)]
    items = [train_image_from_labels(*read_pixels(im)) for im in chosen]
    aug = Augmentation()
    return [[sample_crop(items[int(rng.integers(len(items)))], crop, rng, aug) for _ in range(batch_size)]
            for _ in range(n_batches)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=ROOT / "cellseg" / "models" / "nuclei")
    p.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="steps of each variant per round")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--force-bf16", action="store_true", help="time bf16 where it is emulated too")
    p.add_argument("--rpn-trim", action="store_true", help="also time RPN training proposals 2000/1000")
    p.add_argument("--backbone", default=None, help="also time the recipe on a fresh network with this backbone")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    native = cpu_has_native_bf16()
    # name: (precision, channels_last, matrix RoIAlign, network config)
    variants = {"shipped": ("fp32", False, False, bundle.model), "cl": ("fp32", True, True, bundle.model)}
    if native or args.force_bf16:
        variants["bf16_cl_tv"] = ("bf16", True, False, bundle.model)
        variants["bf16_cl"] = ("bf16", True, True, bundle.model)
        if args.rpn_trim:
            variants["bf16_cl_rpn"] = ("bf16", True, True, dataclasses.replace(
                bundle.model, rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=1000))
    if args.backbone:
        variants[f"recipe_{args.backbone}"] = ("bf16" if native or args.force_bf16 else "fp32", True, True,
                                               dataclasses.replace(bundle.model, backbone=args.backbone))
    total = args.rounds * args.steps + 2
    data = batches(args.bundle, args.data_root, 24, total, args.batch_size, args.crop)
    dev = torch.device("cpu")
    state = bundle.state_dict()
    runs = {}
    for name, (precision, channels_last, matrix_roi_align, cfg) in variants.items():
        torch.manual_seed(0)
        model = build_model(cfg)
        if not name.startswith("recipe_"):     # recipe_B: a fresh network, its own random weights
            model.load_state_dict(state)
        model, chosen, _ = prepare_for_training(model, dev, precision, channels_last=channels_last,
                                                matrix_roi_align=matrix_roi_align)
        optim = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
        runs[name] = {"model": model, "optim": optim, "precision": chosen, "times": [], "losses": []}

    def step(run, batch):
        images = [copy.deepcopy(img) for img, _ in batch]
        targets = [dict(t) for _, t in batch]
        t0 = time.perf_counter()
        loss, _ = training_step(run["model"], run["optim"], images, targets, run["precision"])
        run["losses"].append(float(loss.detach()))
        return time.perf_counter() - t0

    for run in runs.values():            # warm-up: first-call allocations and kernel selection stay untimed
        for b in data[:2]:
            step(run, b)
    for r in range(args.rounds):
        for name, run in runs.items():
            for k in range(args.steps):
                run["times"].append(step(run, data[2 + r * args.steps + k]))
    flags = cpu_flags()
    print(f"CPU {cpu_model()}; {torch.get_num_threads()} threads; native bf16: {native} "
          f"({', '.join(f for f in ('avx512f', 'avx512_bf16', 'amx_bf16', 'avx512_vnni') if f in flags) or 'none'}); "
          f"torch {torch.__version__}; bundle {bundle.name} ({bundle.model.backbone}); batch {args.batch_size}, "
          f"{args.crop}-px crops; {args.rounds} rounds x {args.steps} steps per variant, alternated")
    base = statistics.median(runs["shipped"]["times"])
    print(f"{'variant':<14}{'s/step':>8}{'steps/h':>9}{'ratio':>7}{'mean loss':>11}")
    result = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "native_bf16": native, "variants": {}}
    for name, run in runs.items():
        med = statistics.median(run["times"])
        print(f"{name:<14}{med:>8.3f}{3600 / med:>9.0f}{base / med:>6.2f}x{np.mean(run['losses']):>11.3f}")
        result["variants"][name] = {"s_per_step": med, "steps_per_hour": 3600 / med, "ratio": base / med,
                                    "mean_loss": float(np.mean(run["losses"]))}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
