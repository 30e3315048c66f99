"""Peak memory of the streaming pipeline against slide size (not part of the test suite).

Builds synthetic tiled TIFFs of N x N px (bright nuclei-like discs on a dark background, written tile by
tile), counts each in a fresh subprocess and prints peak RSS. To isolate the pipeline's own memory
(reading, merging, measuring, writing) from the network's, which is constant per tile, the detector is a
classical threshold + connected-components detector — the same TileDetections contract as Mask R-CNN.

    python benchmarks/memory_flat.py --sizes 4096 8192 16384 [--workdir /tmp/cellseg-mem]
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


def write_synthetic_slide(path: Path, size: int, tile: int = 256) -> None:
    import tifffile

    def tiles():
        yy, xx = np.mgrid[:tile, :tile]
        for r in range(0, size, tile):
            for c in range(0, size, tile):
                rng = np.random.default_rng(r * 7919 + c)
                img = rng.integers(5, 15, (tile, tile), dtype=np.uint8)
                for cy, cx, rad in zip(rng.uniform(8, tile - 8, 40), rng.uniform(8, tile - 8, 40), rng.uniform(4, 8, 40)):
                    img[(yy - cy) ** 2 + (xx - cx) ** 2 <= rad ** 2] = 180
                yield img

    tifffile.imwrite(path, tiles(), shape=(size, size), dtype=np.uint8, tile=(tile, tile), compression="zlib",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")


class ThresholdDetector:
    """Connected components of pixels above a threshold: a cheap stand-in for the network."""

    class_names = ("nucleus",)

    def detect(self, images, tiles, scale=1.0):
        from scipy import ndimage
        from cellseg.detect import TileDetections
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


def child(slide: Path, out: Path) -> None:
    from cellseg.pipeline import count_slide
    from cellseg.protocol import load_protocol
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summary = count_slide(slide, out, load_protocol("fluorescence-nuclei"), ThresholdDetector())
    print(json.dumps({"cells": summary["cell_count"], "seconds": round(time.perf_counter() - start, 1),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "stages": summary["seconds"]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cellseg-mem"))
    p.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"{'slide':>12} {'cells':>9} {'seconds':>8} {'peak RSS MB':>12}")
    for size in args.sizes:
        slide = args.workdir / f"synthetic_{size}.tif"
        if not slide.exists():
            write_synthetic_slide(slide, size)
        res = subprocess.run([sys.executable, __file__, "--child", str(slide), str(args.workdir / f"out_{size}")],
                             check=True, capture_output=True, text=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{size:>6}x{size:<5} {r['cells']:>9} {r['seconds']:>8} {r['peak_rss_mb']:>12.0f}   {r['stages']}")


if __name__ == "__main__":
    main()
