"""Tissue prefilter: how many tiles it skips, and how many cells it loses, against analysing every tile.

Counts a slide (default: the example with large empty regions) with the shipped models once with
`--tissue none` and once per prefilter method, then prints per method: tiles skipped, the share of the
`none` run's cells still found (matched one-to-one at mask IoU >= 0.5), detection time, and, when
NAME_labels.tif lies beside the slide, recall against the ground truth and the share of the `none` run's
TRUE cells (those matching a ground-truth nucleus) still found: the prefilter may rightly drop false
detections on empty background, so this is the figure that counts real cells lost. Lost true cells are
listed by their box centre (row, col).
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
    from cellseg.evaluate import load_instances, match, pair_iou
    from cellseg.pipeline import count_slide, load_detector
    from cellseg.protocol import load_protocol
    from cellseg.tissue import TissueFinder

    protocol = load_protocol(args.protocol).replace(tile_size=args.tile_size)
    detector, bundle = load_detector(protocol, args.device)
    gt_path = args.slide.parent / f"{result_stem(args.slide)}_labels.tif"
    gt = next(iter(load_instances(gt_path).values())) if gt_path.is_file() else None
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ["none", *args.methods]:
            out = Path(tmp) / method
            out.mkdir()
            start = time.perf_counter()
            summary = count_slide(args.slide, out, protocol, detector, tissue=TissueFinder(method),
                                  model_diameter_px=bundle.nucleus_diameter_px)
            cells = next(iter(load_instances(out).values()))
            runs[method] = {"summary": summary, "cells": cells, "seconds": time.perf_counter() - start}

    reference = runs["none"]["cells"]
    true_ref = None
    if gt is not None:     # the `none` run's cells that are real (match a ground-truth nucleus)
        true_ref = np.sort(match(reference, gt, 0.5, ious=pair_iou(reference, gt)).pairs[:, 0])
    report = {"slide": str(args.slide), "protocol": protocol.name, "tile_px": runs["none"]["summary"]["scale"]["tile_px"],
              "min_tissue_fraction": protocol.min_tissue_fraction, "methods": {}}
    print(f"slide {args.slide.name}: {runs['none']['summary']['tiles_total']} tiles of "
          f"{report['tile_px']} px, min tissue fraction {protocol.min_tissue_fraction}")
    print(f"{'method':>7} {'skipped':>12} {'cells':>6} {'kept vs none':>13} {'true kept':>10} {'GT recall':>10} "
          f"{'detect s':>9} {'total s':>8} {'tissue mm²':>11}")
    for method, run in runs.items():
        s = run["summary"]
        m = match(run["cells"], reference, 0.5, ious=pair_iou(run["cells"], reference))
        kept = m.tp / max(len(reference.rles), 1)
        true_kept, lost = None, []
        if true_ref is not None:
            found = np.isin(true_ref, m.pairs[:, 1])
            true_kept = float(found.mean()) if found.size else 1.0
            lost = [((reference.boxes[i, 0] + reference.boxes[i, 2]) // 2, (reference.boxes[i, 1] + reference.boxes[i, 3]) // 2)
                    for i in true_ref[~found]]
        recall = (match(run["cells"], gt, 0.5, ious=pair_iou(run["cells"], gt)).tp / max(len(gt.rles), 1)
                  if gt is not None else None)
        row = {"tiles_total": s["tiles_total"], "tiles_skipped": s["tiles_skipped"],
               "skipped_fraction": s["tiles_skipped"] / s["tiles_total"], "cells": s["cell_count"],
               "kept_vs_none": kept, "true_cells_kept": true_kept, "lost_true_cells_rc": [list(map(int, rc)) for rc in lost],
               "gt_recall": recall, "detect_s": s["seconds"].get("detect", 0.0),
               "tissue_s": s["seconds"].get("tissue", 0.0), "total_s": run["seconds"],
               "tissue_area_mm2": s["tissue_area_mm2"], "note": s["tissue_note"]}
        report["methods"][method] = row
        area = f"{row['tissue_area_mm2']:.3f}" if row["tissue_area_mm2"] is not None else "-"
        print(f"{method:>7} {row['tiles_skipped']:>4} ({100 * row['skipped_fraction']:4.1f}%) {row['cells']:>6} "
              f"{100 * kept:>12.2f}% {'-' if true_kept is None else f'{100 * true_kept:.2f}%':>10} "
              f"{'-' if recall is None else f'{100 * recall:.1f}%':>10} "
              f"{row['detect_s']:>9.1f} {row['total_s']:>8.1f} {area:>11}")
        if lost:
            print(f"        {method}: true cells lost at (row, col): {', '.join(f'({r}, {c})' for r, c in lost[:20])}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
