"""Cost of cells.geojson (results.CellsGeoJsonWriter) for a slide of ~250k nuclei (not part of the test suite).

The nuclei are merge_measure.py's: ellipses 8-30 px across (log-normal around 14 px), here ~1000 per 512 px tile
on a 16 x 16 grid (~254k cells). Each tile's cells go to the writer as pipeline.NucleusEmitter hands them to
export.ResultWriter: ids, boxes, cropped masks, class ids and the cells.csv rows (measure.nucleus_columns for 3
channels, values made up: the writer only formats them). Prints seconds, cells/s, the file's size, and how the
polygons' areas agree with area_px (median and worst relative difference, %).

    nice -n 5 python benchmarks/geojson_write.py [--grid 16 16] [--per-tile 1000] [--gzip]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from merge_measure import ellipse_bank  # noqa: E402

from cellseg.cells import nucleus_columns  # noqa: E402
from cellseg.results import CellsGeoJsonWriter  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=int, nargs=2, default=(16, 16))
    ap.add_argument("--per-tile", type=int, default=1000)
    ap.add_argument("--gzip", action="store_true", help="gzip the file at the end (geojson_gzip_above_mb = 0)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    bank = ellipse_bank(rng)
    columns = nucleus_columns(["red", "green", "blue"])
    tiles = args.grid[0] * args.grid[1]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cells.geojson"
        writer = CellsGeoJsonWriter(path, columns, ["nucleus"], gzip_above_bytes=0 if args.gzip else None)
        seconds, cells, next_id, sampled = 0.0, 0, 1, []
        for t in range(tiles):
            tr, tc = divmod(t, args.grid[1])
            pick = rng.integers(0, len(bank), args.per_tile)
            masks = [bank[k] for k in pick]
            r0 = tr * 512 + rng.integers(0, 480, args.per_tile)
            c0 = tc * 512 + rng.integers(0, 480, args.per_tile)
            boxes = np.stack([r0, c0, r0 + [m.shape[0] for m in masks], c0 + [m.shape[1] for m in masks]], 1)
            ids = np.arange(next_id, next_id + args.per_tile)
            next_id += args.per_tile
            rows = {}
            for name, dt in columns.items():
                kind = np.dtype(dt).kind
                rows[name] = (np.full(args.per_tile, "nucleus") if kind == "U" else
                              rng.random(args.per_tile) > 0.9 if kind == "b" else
                              rng.integers(0, 10000, args.per_tile) if kind == "i" else
                              rng.random(args.per_tile) * 100)
            rows["area_px"] = np.array([m.sum() for m in masks])
            start = time.perf_counter()
            writer.append(ids, boxes, masks, np.ones(args.per_tile, np.int64), rows)
            seconds += time.perf_counter() - start
            cells += args.per_tile
            if t % max(1, tiles // 8) == 0:
                sampled.append(ids[:200])
        start = time.perf_counter()
        written = writer.close()
        seconds += time.perf_counter() - start
        size = written.stat().st_size
        print(f"{cells} cells in {tiles} tiles: {seconds:.1f} s writing {written.name} "
              f"({cells / seconds:.0f} cells/s), {size / 1e6:.1f} MB")
        if not args.gzip:
            import shapely
            want = {int(i) for part in sampled for i in part}
            diffs = []
            with open(written, encoding="utf-8") as fh:
                next(fh)
                for line in fh:
                    line = line.rstrip().rstrip(",")
                    if not line.startswith("{"):
                        continue
                    f = json.loads(line)
                    if f["id"] in want:
                        area = shapely.from_geojson(json.dumps(f["geometry"])).area
                        diffs.append(abs(area - f["properties"]["measurements"]["area_px"]) / area * 100)
            print(f"polygon area vs area_px on {len(diffs)} sampled cells: median {np.median(diffs):.3f} %, "
                  f"worst {np.max(diffs):.3f} %")


if __name__ == "__main__":
    main()
