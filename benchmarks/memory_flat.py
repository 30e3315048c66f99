"""Peak memory of the streaming pipeline against slide size (not part of the test suite).

Builds synthetic whole-slide-like pyramidal TIFFs of N x N px: a dark fluorescence field with a few round
"tissue" islands of bright nuclei-like discs (the same islands, in the same place, whatever N, so every
slide holds the same cells and the run time stays bounded), written tile by tile, level by level. Each
slide is counted in a fresh subprocess through `counter.CellCounter` (every result file written) and its
peak RSS (ru_maxrss, the whole run: reading, tissue view, detection, merging, measuring, writing) printed, with the
result files' own process's (results/writer_process.py) added: the sum bounds the two together.

--detector model: the shipped Mask R-CNN with the tissue prefilter (--tissue, default unet), as
`cellseg count` runs; background tiles are skipped, so a 40k x 40k slide finishes in minutes on a CPU.
--detector threshold: a threshold + connected-components stand-in with the same TileDetections contract
(isolates the pipeline's own memory from the network's; use --tissue none with it to visit every tile).
--cell-expansion-um D: nuclei grown into cells by up to D µm (cell_labels.ome.tif and the cell columns too).

    python benchmarks/memory_flat.py --sizes 10000 20000 40000 [--detector model] [--tissue unet]
        [--cell-expansion-um 5] [--workdir /tmp/cellseg-mem]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cellseg.geometry import HostInput

TILE = 256
ISLANDS = [(0.25, 0.3, 700), (0.6, 0.7, 500), (0.8, 0.2, 350)]   # (row, col) as slide fractions, radius px
ALIGN = 1024


def _islands(size: int) -> list[tuple[int, int, int]]:
    """Island centres near fixed fractions of the slide, on multiples of ALIGN px and at least 800 px from an edge.

    On multiples of ALIGN (a multiple of the analysis tile and of TILE), every slide size puts the same pixels in
    the same place relative to the tile grid, so the analysed tiles hold identical cells and any growth of
    memory with size is the pipeline's own."""
    def place(fraction: float) -> int:
        return int(min(max(round(fraction * size / ALIGN) * ALIGN, ALIGN), (size - 800) // ALIGN * ALIGN))
    return [(place(fr), place(fc), rad) for fr, fc, rad in ISLANDS]


def _tile_seed(r: int, c: int, islands) -> int:
    """Seed of tile (r, c) from its offset to the nearest island: identical around an island on every slide."""
    def distance(e):
        return abs(e[1][0] - (r + 0.5) * TILE) + abs(e[1][1] - (c + 0.5) * TILE)
    k, (ir, ic, _) = min(enumerate(islands), key=distance)
    return (k * 1009 + (r - ir // TILE) + 500) * 100003 + (c - ic // TILE) + 500


def _level0_tile(r: int, c: int, islands) -> np.ndarray:
    """The TILE x TILE level-0 pixels at tile (r, c): a field of 10 with sparse noise (2 % of pixels off by up to
    +-3: dense noise would make a 40k slide a gigabyte), bright discs (180) inside islands."""
    rng = np.random.default_rng(_tile_seed(r, c, islands))
    img = np.full((TILE, TILE), 10, np.uint8)
    flat = img.reshape(-1)
    idx = rng.integers(0, flat.size, flat.size // 50)
    flat[idx] = (10 + rng.integers(-3, 4, idx.size)).astype(np.uint8)
    if not any(abs((r + 0.5) * TILE - ir) < rad + TILE and abs((c + 0.5) * TILE - ic) < rad + TILE
               for ir, ic, rad in islands):
        return img
    yy, xx = np.mgrid[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE]
    inside = np.zeros((TILE, TILE), bool)
    for ir, ic, rad in islands:
        inside |= (yy - ir) ** 2 + (xx - ic) ** 2 <= rad ** 2
    if inside.any():
        for cy, cx, rd in zip(rng.uniform(0, TILE, 90), rng.uniform(0, TILE, 90), rng.uniform(4, 8, 90)):
            disc = ((yy - r * TILE - cy) ** 2 + (xx - c * TILE - cx) ** 2 <= rd ** 2) & inside
            img[disc] = 180
    return img


def write_synthetic_slide(path: Path, size: int) -> None:
    """Pyramidal tiled TIFF (SubIFDs, each level half the previous, down to <= 1024 px), 0.5 µm/px."""
    import tifffile
    islands = _islands(size)

    def touches_island(row0, col0, row1, col1) -> bool:
        return any(max(row0, ir - rad) < min(row1, ir + rad) and max(col0, ic - rad) < min(col1, ic + rad)
                   for ir, ic, rad in islands)

    def level_tiles(k: int):
        f = 2 ** k
        h = -(-size // f)
        background = np.full((TILE, TILE), 10, np.uint8)
        for r in range(0, h, TILE):
            for c in range(0, h, TILE):
                box = (r * f, c * f, min((r + TILE) * f, size), min((c + TILE) * f, size))
                if not touches_island(*box) and k > 0:
                    yield background       # block means of the noise are ~10
                    continue
                if k == 0:
                    yield _level0_tile(r // TILE, c // TILE, islands)
                    continue
                span = TILE * f
                full = np.zeros((span, span), np.float32)
                for rr in range(0, span, TILE):
                    for cc in range(0, span, TILE):
                        gr, gc = (r * f + rr) // TILE, (c * f + cc) // TILE
                        if gr * TILE < size and gc * TILE < size:
                            full[rr:rr + TILE, cc:cc + TILE] = _level0_tile(gr, gc, islands)
                yield full.reshape(TILE, f, TILE, f).mean(axis=(1, 3)).astype(np.uint8)

    levels = [size]
    while levels[-1] > 1024:
        levels.append(-(-levels[-1] // 2))
    opts = dict(dtype=np.uint8, tile=(TILE, TILE), compression="zlib", photometric="minisblack")
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for k, side in enumerate(levels):
            res = (1e4 / (0.5 * 2 ** k),) * 2
            extra = dict(subifds=len(levels) - 1) if k == 0 else dict(subfiletype=1)
            tif.write(level_tiles(k), shape=(side, side), resolution=res, resolutionunit="CENTIMETER", **extra, **opts)


class ThresholdDetector(HostInput):
    """Connected components of pixels above a threshold: a cheap stand-in for the network (a TileDetector without
    slide-level statistics)."""

    device = "cpu"
    class_names = ("nucleus",)

    def calibrated(self, windows, gray=False):
        return self

    def detect(self, images, tiles, scale=1.0):
        from scipy import ndimage

        from cellseg.geometry import TileDetections
        out = []
        for image in images:
            labels, n = ndimage.label(image[0] > 0.5)
            boxes, masks = [], []
            for k, sl in enumerate(ndimage.find_objects(labels), start=1):
                boxes.append((sl[0].start, sl[1].start, sl[0].stop, sl[1].stop))
                masks.append(labels[sl] == k)
            out.append(TileDetections(np.asarray(boxes, np.int64).reshape(-1, 4), masks,
                                      np.full(len(masks), 0.9, np.float32), np.ones(len(masks), np.int64)))
        return out


def keep_result_writers() -> list:
    """The list every result writer the pipeline makes from now on is appended to (to read its process's peak memory
    and its threads' seconds afterwards)."""
    import cellseg.run.pipeline as pipeline
    writers = []

    class KeptWriter(pipeline.ResultWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            writers.append(self)

    pipeline.ResultWriter = KeptWriter
    return writers


def child(slide: Path, out: Path, detector_kind: str, tissue: str, cell_expansion_um: float) -> None:
    from cellseg.planning import load_protocol
    from cellseg.run import CellCounter

    writers = keep_result_writers()
    protocol = load_protocol("fluorescence-nuclei").replace(tissue_method=tissue, cell_expansion_um=cell_expansion_um)
    if detector_kind == "model":
        counter = CellCounter.load(protocol, "cpu")
    else:
        counter = CellCounter(protocol, ThresholdDetector())
    start = time.perf_counter()
    summary = counter.count(slide, out)
    # the result files' process (results/writer_process.py), its own peak (not RUSAGE_CHILDREN's: that counts the
    # parent's pages it shared between fork and exec)
    writers = writers[-1].writer_process_rss_mb() or 0.0
    count = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"cells": summary["cell_count"], "seconds": round(time.perf_counter() - start, 1),
                      "tiles": summary["tiles_total"], "skipped": summary["tiles_skipped"],
                      "peak_rss_mb": count + writers, "count_rss_mb": count, "writers_rss_mb": writers,
                      "stages": summary["seconds"]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 20000, 40000])
    p.add_argument("--detector", choices=["model", "threshold"], default="model")
    p.add_argument("--tissue", choices=["unet", "otsu", "none"], default="unet")
    p.add_argument("--cell-expansion-um", type=float, default=0.0, help="grow nuclei into cells by D µm")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cellseg-mem"))
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        slide, out, kind, tissue, expansion = args.child
        child(Path(slide), Path(out), kind, tissue, float(expansion))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"detector {args.detector}, tissue {args.tissue}, cell expansion {args.cell_expansion_um:g} µm")
    print(f"{'slide':>12} {'tiles':>7} {'skipped':>8} {'cells':>7} {'seconds':>8} {'peak RSS MB':>12}   (count process "
          f"+ result files' process, each at its peak)")
    for size in args.sizes:
        slide = args.workdir / f"islands_{size}.tif"
        if not slide.exists():
            t = time.perf_counter()
            write_synthetic_slide(slide, size)
            print(f"  (wrote {slide.name}: {slide.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - t:.0f} s)")
        out = args.workdir / f"out_{size}_{args.detector}_{args.tissue}_{args.cell_expansion_um:g}"
        res = subprocess.run([sys.executable, __file__, "--child", str(slide), str(out), args.detector, args.tissue,
                              str(args.cell_expansion_um)], check=True, capture_output=True, text=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{size:>6}x{size:<5} {r['tiles']:>7} {r['skipped']:>8} {r['cells']:>7} {r['seconds']:>8} "
              f"{r['peak_rss_mb']:>12.0f}   ({r['count_rss_mb']:.0f} + {r['writers_rss_mb']:.0f}) {r['stages']}",
              flush=True)


if __name__ == "__main__":
    main()
