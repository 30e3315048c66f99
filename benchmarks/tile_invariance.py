"""Tile-size invariance with a real model: the same slide counted at several tile sizes must give the same cells.

Counts a slide (default: the example fluorescence mosaic) with the shipped bundle at each --tile-size,
then compares every run with the first: cell counts (relative difference) and masks matched one-to-one
at IoU >= 0.5 (cellseg.evaluation.scoring), reporting the share of cells matched and their median / 5th-percentile IoU.

    python benchmarks/tile_invariance.py [--slide example_slides/fluo_mosaic.ome.tif] [--tiles 256 384 512] [--tissue none]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slide", type=Path, default=ROOT / "example_slides" / "fluo_mosaic.ome.tif")
    p.add_argument("--tiles", type=int, nargs="+", default=[256, 384, 512])
    p.add_argument("--protocol", default="fluorescence-nuclei")
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--tissue", choices=["unet", "otsu", "none"], default=None, help="tissue prefilter (protocol's)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None, help="network arithmetic (protocol's)")
    args = p.parse_args()

    from cellseg.bundles import load_bundle
    from cellseg.evaluation import load_image_masks, match, pair_iou
    from cellseg.planning import load_protocol
    from cellseg.run import CellCounter

    protocol = load_protocol(args.protocol).replace(tissue_method=args.tissue, model=args.model,
                                                    precision=args.precision)
    loaded = CellCounter.load(protocol, args.device)
    bundle = load_bundle(protocol.model)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tile in args.tiles:
            out = Path(tmp) / f"t{tile}"
            start = time.perf_counter()
            counter = CellCounter(protocol.replace(tile_size=tile), loaded.detector, tissue=loaded.tissue)
            summary = counter.count(args.slide, out)
            instances = next(iter(load_image_masks(out).values()))
            runs[tile] = (summary["cell_count"], instances, time.perf_counter() - start)
        ref_tile = args.tiles[0]
        ref_count, ref, _ = runs[ref_tile]
        print(f"slide {args.slide.name}, model {bundle.name} ({bundle.weights_sha256[:12]}), reference tile {ref_tile}")
        print(f"{'tile':>6} {'cells':>7} {'count diff':>11} {'matched':>8} {'median IoU':>11} {'p5 IoU':>7} {'seconds':>8}")
        for tile in args.tiles:
            count, inst, seconds = runs[tile]
            m = match(inst, ref, 0.5, ious=pair_iou(inst, ref))
            ious = np.asarray(m.pair_iou)
            matched = m.tp / max(ref_count, 1)
            print(f"{tile:>6} {count:>7} {100 * (count - ref_count) / max(ref_count, 1):>10.2f}% "
                  f"{100 * matched:>7.1f}% {np.median(ious) if ious.size else float('nan'):>11.3f} "
                  f"{np.percentile(ious, 5) if ious.size else float('nan'):>7.3f} {seconds:>8.1f}")


if __name__ == "__main__":
    main()
