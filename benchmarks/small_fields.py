"""Seconds per field when `cellseg count` runs over many small images, as a screen or a DSB-style image set does
(not a test).

Cuts FIELDS fields of SIZE x SIZE px (each one tile) from the example mosaic, with their ground truth, then counts
them all in one process per variant, the way `cellseg count a.tif b.tif ...` does: the model is loaded once, every
field gets its own result folder with every file and its report. The first field is a warm-up (the first forward
pass at a new tile shape builds its kernels) and is not counted. Per variant (fp32, and bf16 where the CPU has it
natively) it prints the median seconds per field, end to end and by stage, fields per minute, and the cells found
and F1 against the ground truth over all counted fields. Variants run interleaved, each round a fresh subprocess.

On a field this small the per-image costs (calibration, tissue, writing, the report) weigh as much as the
network; `benchmarks/run.py` measures a large slide, where they do not.

    python benchmarks/small_fields.py [--fields 8] [--size 512] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MOSAIC = ROOT / "example_slides" / "fluo_mosaic.ome.tif"
LABELS = ROOT / "example_slides" / "fluo_mosaic_labels.tif"


def cut_fields(folder: Path, n: int, size: int) -> list[Path]:
    """n fields of size² px on a regular grid over the mosaic (OME-TIFF with its pixel size), each with NAME_labels.tif."""
    import tifffile

    from cellseg.geometry import Box
    from cellseg.slides import open_slide
    labels = tifffile.imread(LABELS)
    with open_slide(MOSAIC) as slide:
        info = slide.info
        corners = [(r, c) for r in range(0, info.height - size + 1, size) for c in range(0, info.width - size + 1, size)]
        if len(corners) < n:
            raise SystemExit(f"expected at most {len(corners)} fields of {size} px from the mosaic, got --fields {n}")
        step = len(corners) / n
        paths = []
        for k in range(n):
            r, c = corners[int(k * step)]
            pixels = slide.read_region(Box(r, c, r + size, c + size))[..., 0]
            path = folder / f"field{k:02d}.ome.tif"
            tifffile.imwrite(path, pixels, ome=True, metadata={"axes": "YX", "PhysicalSizeX": info.mpp,
                                                                "PhysicalSizeY": info.mpp})
            tifffile.imwrite(folder / f"field{k:02d}_labels.tif", labels[r:r + size, c:c + size])
            paths.append(path)
    return paths


def count_fields(fields: list[Path], precision: str, out: Path) -> dict:
    """In this process: load the counter once, count every field; the first one is the warm-up."""
    from cellseg.evaluation import load_image_masks, match, pair_iou
    from cellseg.planning import load_protocol
    from cellseg.run import CellCounter
    counter = CellCounter.load(load_protocol("fluorescence-nuclei").replace(precision=precision), "cpu")
    walls, stages, results = [], [], []
    for k, field in enumerate(fields):
        started = time.perf_counter()
        summary = counter.count(field, out / f"{field.name}.cellseg")
        wall = time.perf_counter() - started
        if k == 0:
            continue
        walls.append(wall)
        stages.append(summary["seconds"])
        pred = next(iter(load_image_masks(out / f"{field.name}.cellseg" / "labels.ome.tif").values()))
        gt = next(iter(load_image_masks(field.with_name(field.name.replace(".ome.tif", "_labels.tif"))).values()))
        results.append(match(pred, gt, 0.5, ious=pair_iou(pred, gt)))
    tp, fp, fn = (sum(getattr(m, a) for m in results) for a in ("tp", "fp", "fn"))
    return {"precision": counter.detector.precision_note, "wall_s": walls,
            "stages_s": {key: statistics.median(s[key] for s in stages) for key in stages[0]},
            "cells": tp + fp, "f1": 2 * tp / max(2 * tp + fp + fn, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fields", type=int, default=8, help="fields counted, besides the warm-up one")
    parser.add_argument("--size", type=int, default=512, help="field side in px (the protocol's tile is 512)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "PRECISION", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        folder, precision, json_out = args.child
        fields = sorted(Path(folder).glob("field*.ome.tif"))
        with tempfile.TemporaryDirectory() as out:
            Path(json_out).write_text(json.dumps(count_fields(fields, precision, Path(out))))
        return

    from cellseg.detection.precision import cpu_has_native_bf16, cpu_model
    variants = ["fp32"] + (["bf16"] if cpu_has_native_bf16() else [])
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cut_fields(folder, args.fields + 1, args.size)
        for _ in range(args.rounds):
            for variant in variants:
                json_out = folder / f"{variant}.json"
                subprocess.run([sys.executable, __file__, "--child", str(folder), variant, str(json_out)], check=True,
                               env={**os.environ, "PYTHONWARNINGS": "ignore"})
                runs[variant].append(json.loads(json_out.read_text()))
    print(f"{args.fields} fields of {args.size}² px (after one warm-up field), {args.rounds} round(s) per variant, "
          f"interleaved; CPU {cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end")
    print(f"{'variant':8} {'s/field':>8} {'fields/min':>10}  {'per round':18} {'cells':>6} {'F1':>6}  median stages (s)")
    for variant, rounds in runs.items():
        per_round = [statistics.median(r["wall_s"]) for r in rounds]
        per_field = statistics.median(np.concatenate([r["wall_s"] for r in rounds]))
        stages = ", ".join(f"{k} {v:.3f}" for k, v in rounds[-1]["stages_s"].items())
        print(f"{variant:8} {per_field:8.3f} {60 / per_field:10.1f}  {' / '.join(f'{s:.3f}' for s in per_round):18} "
              f"{rounds[-1]['cells']:6d} {rounds[-1]['f1']:6.3f}  {stages}")
    print("s/field: wall time of one field's count, result folder and report included; the stages' total is the "
          "pipeline's own timer, without the report")


if __name__ == "__main__":
    main()
