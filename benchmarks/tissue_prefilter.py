"""Tissue prefilter: how many tiles it skips, and how many cells it loses, against analysing every tile.

Counts a slide (default: the example with large empty regions) with the shipped models. For each prefilter
method two runs that differ ONLY in skipping: with the protocol's min_tissue_fraction, and with 0 (every
tile analysed, the same tissue mask and the same intensity range, which cellseg measures on tissue
pixels). Printed per method: tiles skipped, the share of the all-tiles run's cells still found ("kept",
matched one-to-one at mask IoU >= 0.5), and, when NAME_labels.tif lies beside the slide, the share of its
TRUE cells (those matching a ground-truth nucleus) still found, with the lost ones listed by box centre
(row, col), and recall against the ground truth. A `--tissue none` run (whole image, intensity range of the
whole thumbnail) is shown for reference.
Goal (issue 4): >= 50 % of tiles skipped with >= 99.5 % of cells kept.

    python benchmarks/tissue_prefilter.py [--slide example_slides/empty_regions.ome.tif] [--methods unet otsu]
        [--protocol fluorescence-nuclei] [--tile-size 512] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slide", type=Path, default=ROOT / "example_slides" / "empty_regions.ome.tif")
    p.add_argument("--methods", nargs="+", default=["unet", "otsu"], choices=["unet", "otsu"])
    p.add_argument("--protocol", default="fluorescence-nuclei")
    p.add_argument("--tile-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    from cellseg.cli import result_stem
    from cellseg.evaluation import load_image_masks, match, pair_iou
    from cellseg.planning import load_protocol
    from cellseg.run import CellCounter

    protocol = load_protocol(args.protocol).replace(tile_size=args.tile_size)
    loaded = CellCounter.load(protocol, args.device)
    gt_path = args.slide.parent / f"{result_stem(args.slide)}_labels.tif"
    gt = next(iter(load_image_masks(gt_path).values())) if gt_path.is_file() else None
    def run(name: str, method: str, min_fraction: float) -> dict:
        out = Path(tmp) / name
        start = time.perf_counter()
        counter = CellCounter(protocol.replace(min_tissue_fraction=min_fraction, tissue_method=method),
                              loaded.detector, model_diameter_px=loaded.model_diameter_px)
        summary = counter.count(args.slide, out)
        return {"summary": summary, "cells": next(iter(load_image_masks(out).values())),
                "seconds": time.perf_counter() - start}

    def compare(got: dict, ref: dict) -> tuple[float, float | None, list]:
        m = match(got["cells"], ref["cells"], 0.5, ious=pair_iou(got["cells"], ref["cells"]))
        kept = m.tp / max(len(ref["cells"].rles), 1)
        if gt is None:
            return kept, None, []
        true_ref = np.sort(match(ref["cells"], gt, 0.5, ious=pair_iou(ref["cells"], gt)).pairs[:, 0])
        found = np.isin(true_ref, m.pairs[:, 1])
        boxes = ref["cells"].boxes
        lost = [[int((boxes[i, 0] + boxes[i, 2]) // 2), int((boxes[i, 1] + boxes[i, 3]) // 2)] for i in true_ref[~found]]
        return kept, float(found.mean()) if found.size else 1.0, lost

    def recall(r: dict) -> float | None:
        return None if gt is None else match(r["cells"], gt, 0.5, ious=pair_iou(r["cells"], gt)).recall

    report = {"slide": str(args.slide), "protocol": protocol.name, "min_tissue_fraction": protocol.min_tissue_fraction,
              "methods": {}}
    with tempfile.TemporaryDirectory() as tmp:
        none = run("none", "none", 0.0)
        report["none"] = {"cells": none["summary"]["cell_count"], "gt_recall": recall(none),
                          "total_s": none["seconds"]}
        print(f"slide {args.slide.name}: {none['summary']['tiles_total']} tiles of {none['summary']['scale']['tile_px']} "
              f"px, min tissue fraction {protocol.min_tissue_fraction}")
        print(f"  --tissue none: {none['summary']['cell_count']} cells"
              + ("" if gt is None else f", GT recall {100 * recall(none):.1f}%") + f", {none['seconds']:.1f} s")
        print(f"{'method':>7} {'skipped':>12} {'cells':>6} {'all tiles':>10} {'kept':>8} {'true kept':>10} "
              f"{'GT recall':>10} {'detect s':>9} {'vs all':>7} {'tissue mm²':>11}")
        for method in args.methods:
            every, skip = run(f"{method}-all", method, 0.0), run(method, method, protocol.min_tissue_fraction)
            kept, true_kept, lost = compare(skip, every)
            s, se = skip["summary"], every["summary"]
            row = {"tiles_total": s["tiles_total"], "tiles_skipped": s["tiles_skipped"],
                   "skipped_fraction": s["tiles_skipped"] / s["tiles_total"], "cells": s["cell_count"],
                   "cells_all_tiles": se["cell_count"], "kept": kept, "true_cells_kept": true_kept,
                   "lost_true_cells_rc": lost, "gt_recall": recall(skip), "gt_recall_all_tiles": recall(every),
                   "detect_s": s["seconds"].get("detect", 0.0), "detect_s_all_tiles": se["seconds"].get("detect", 0.0),
                   "tissue_s": s["seconds"].get("tissue", 0.0), "tissue_area_mm2": s["tissue_area_mm2"],
                   "note": s["tissue_note"]}
            report["methods"][method] = row
            area = f"{row['tissue_area_mm2']:.3f}" if row["tissue_area_mm2"] is not None else "-"
            gt_recall = "-" if row["gt_recall"] is None else f"{100 * row['gt_recall']:.1f}%"
            print(f"{method:>7} {row['tiles_skipped']:>4} ({100 * row['skipped_fraction']:4.1f}%) {row['cells']:>6} "
                  f"{row['cells_all_tiles']:>10} {100 * kept:>7.2f}% "
                  f"{'-' if true_kept is None else f'{100 * true_kept:.2f}%':>10} "
                  f"{gt_recall:>10} "
                  f"{row['detect_s']:>9.1f} {row['detect_s_all_tiles']:>7.1f} {area:>11}")
            if lost:
                print(f"        {method}: true cells lost at (row, col): {', '.join(map(str, map(tuple, lost[:20])))}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
