"""How fast can `cellseg count` go when the network costs nothing? (not a test)

Runs a slide through `counter.CellCounter` twice with memory_flat's threshold detector (connected components of bright
pixels, the same TileDetections contract) in the network's place: the first run records every tile's detections,
the second, timed, gets them back at no cost (detection runs in a thread of its own, alongside merging and
writing, so a stand-in's time could not simply be subtracted). What the timed run spends (reading, tissue,
merging, measuring, every result file written) is the part of an end-to-end run that no GPU makes faster: its
megapixels of tissue per second are the ceiling of the GPU path on this machine, and its stage split says which
stage to work on. Run on a dense slide built by make_big_slide.py:

    python benchmarks/make_big_slide.py --size 8192 --out /tmp/big8k.ome.tif
    python benchmarks/pipeline_ceiling.py --slide /tmp/big8k.ome.tif [--json out.json]

Each run is a fresh subprocess (imports and the tissue U-Net's loading are not timed; its use is).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(slide: Path, out: Path, tissue: str) -> dict:
    from collections import Counter

    from memory_flat import ThresholdDetector

    import cellseg.results as results
    from cellseg.planning import load_protocol
    from cellseg.results import cells_csv, cells_geojson, coco, labelstore
    from cellseg.results import writer as export
    from cellseg.run import CellCounter

    parts: Counter = Counter()

    def timed(owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                parts[label] += time.perf_counter() - start
        setattr(owner, name, wrapper)

    # The write stage's parts (results/writer.py looks these names up in its own namespace at call time).
    timed(cells_csv.CellsTableWriter, "append", "cells.csv")
    timed(cells_csv.CellsTableWriter, "close", "cells.csv")
    timed(coco.CocoWriter, "append", "predictions.coco.json")
    timed(labelstore.LabelStore, "paint", "label canvas")
    timed(export, "write_label_images", "labels + panoptic TIFF")
    timed(export, "write_overlay_png", "overlay.png")
    timed(cells_geojson.CellsGeoJsonWriter, "append", "cells.geojson")
    timed(cells_geojson.CellsGeoJsonWriter, "close", "cells.geojson")
    timed(export, "histogram_png", "area_histogram.png")
    timed(results, "write_report", "report.html")     # after summary.json: not in its stages, in the wall time

    class Replay(ThresholdDetector):
        """The stand-in's detections, recorded on a first run and handed back instantly on the timed one."""

        def __init__(self):
            self.recorded, self.replaying = {}, False

        def detect(self, images, tiles, scale=1.0):
            if self.replaying:
                return [self.recorded[t.read] for t in tiles]
            found = super().detect(images, tiles, scale)
            self.recorded.update((t.read, d) for t, d in zip(tiles, found))
            return found

    detector = Replay()
    counter = CellCounter(load_protocol("fluorescence-nuclei").replace(tissue_method=tissue), detector)
    counter.count(slide, out.with_name("record"))
    detector.replaying = True
    parts.clear()
    start = time.perf_counter()
    summary = counter.count(slide, out)
    wall = pipeline_s = time.perf_counter() - start
    tissue_mp = summary["tissue_area_px"] / 1e6
    return {"slide": slide.name, "slide_mp": summary["height_px"] * summary["width_px"] / 1e6,
            "tissue_mp": round(tissue_mp, 2), "tiles_analysed": summary["tiles_total"] - summary["tiles_skipped"],
            "cells": summary["cell_count"], "wall_s": round(wall, 2),
            "pipeline_s": round(pipeline_s, 2),
            "ceiling_mp_per_s": round(tissue_mp / pipeline_s, 2), "cells_per_s": round(summary["cell_count"] / pipeline_s),
            "stages_s": summary["seconds"], "write_parts_s": {k: round(v, 2) for k, v in parts.items()},
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "cpu_cores": os.cpu_count()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slide", type=Path, required=True)
    p.add_argument("--tissue", choices=["unet", "otsu", "none"], default="unet")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]), args.child[2])))
        return
    if not args.slide.is_file():
        sys.exit(f"expected a slide file, found no {args.slide}")
    with tempfile.TemporaryDirectory(prefix="cellseg-ceiling-") as tmp:
        res = subprocess.run([sys.executable, __file__, "--slide", str(args.slide), "--child", str(args.slide),
                              str(Path(tmp) / "out"), args.tissue], capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"the pipeline run failed:\n{res.stderr[-3000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"{r['slide']}: {r['slide_mp']:.0f} MP, {r['tissue_mp']:.0f} MP of tissue, {r['tiles_analysed']} tiles analysed, "
          f"{r['cells']} cells (threshold stand-in), {r['cpu_cores']} CPU cores")
    print(f"pipeline without the network: {r['pipeline_s']} s -> {r['ceiling_mp_per_s']} MP of tissue/s, "
          f"{r['cells_per_s']} cells/s (detections replayed at no cost)")
    print("stages (s):", ", ".join(f"{k} {v}" for k, v in r["stages_s"].items()), "(detect: handing back the replayed detections)")
    print("write parts (s):", ", ".join(f"{k} {v}" for k, v in r["write_parts_s"].items()))
    print(f"peak RSS {r['peak_rss_mb']} MB")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
