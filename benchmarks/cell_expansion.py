"""Cost of cells by expansion per cell (cells/min): expansion.expand_owned + cell_measure.measure_expanded, tile by
tile on a dense synthetic slide (not part of the test suite; to be folded into merge_measure.py once the pipeline
expands cells).

The nuclei are merge_measure.py's synthetic ones (ellipses 8-30 px across, 500-1500 per 512 px tile on a jittered
lattice, often touching), painted once into a slide label image (untimed). Each tile then does what the pipeline
will do for its final nuclei:
- "expand": expand_owned of the nuclei the tile owns (centred in its core), over their bounding box (`--box
  tight`, the default) or the tile's read box (`--box read`), with the final nuclei 2 * D around it as context;
- "measure": measure_expanded of those cells on RGB pixels (with `--stains`, hematoxylin and DAB optical
  densities too).

    nice -n 5 python benchmarks/cell_expansion.py [--grid 6 6] [--expansion-px 10] [--stains] [--box tight|read]

Prints wall-clock and CPU seconds per stage (on a shared machine the CPU time is what the code costs).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_measure import HALO, SyntheticSlide, _Timer  # noqa: E402  (a sibling script)


def paint_slide(synth: SyntheticSlide) -> tuple[np.ndarray, np.ndarray]:
    """(slide labels uint32, owning tile of each id): every tile's core nuclei painted in tile order (a later
    nucleus covers an earlier one where they overlap; ids whose nucleus is covered whole are simply absent)."""
    labels = np.zeros(synth.shape, np.uint32)
    owner = [0]
    for tile in synth.tiles:
        corners, kinds = synth.core_cells(tile.index)
        for (r0, c0), k in zip(corners, kinds):
            mask = synth.bank[k]
            r0, c0 = max(r0, 0), max(c0, 0)
            view = labels[r0:r0 + mask.shape[0], c0:c0 + mask.shape[1]]
            view[mask[:view.shape[0], :view.shape[1]]] = len(owner)
            owner.append(tile.index)
    return labels, np.asarray(owner)


def run(grid: tuple[int, int], distance_px: float, stains: bool, box_kind: str, seed: int) -> dict:
    from cellseg.cell_measure import measure_expanded
    from cellseg.expansion import check_tiling_fits, context_margin_px, expand_owned, grow_box
    from cellseg.tiling import Box
    import skimage.color, skimage.segmentation  # noqa: F401,E401  (imported here, not on the first timed tile)

    synth = SyntheticSlide(*grid, seed=seed)
    check_tiling_fits(distance_px, synth.tiles[0].core.height, HALO)
    start = time.perf_counter()
    labels, owner = paint_slide(synth)
    paint_s = time.perf_counter() - start
    margin = context_margin_px(distance_px)
    names = ["red", "green", "blue"]
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (synth.tiles[0].read.height + 2 * margin + 2 * HALO,) * 2 + (3,), np.uint8)
    timer = _Timer()
    cells_total = 0
    for tile in synth.tiles:
        with timer("expand"):
            window = labels[tile.read.slices()]
            mine = np.isin(window, np.flatnonzero(owner == tile.index), kind="table")
            rows, cols = np.nonzero(mine.any(1))[0], np.nonzero(mine.any(0))[0]
            if not len(rows):
                continue
            box = tile.read if box_kind == "read" else Box(tile.read.row0 + rows[0], tile.read.col0 + cols[0],
                                                           tile.read.row0 + rows[-1] + 1, tile.read.col0 + cols[-1] + 1)
            owned = np.where(mine, window, 0)[box.slices(tile.read[:2])]
            context_box = grow_box(box, 2 * margin, synth.shape)
            cells, cells_box = expand_owned(owned, box, labels[context_box.slices()], context_box, distance_px,
                                            synth.shape)
        with timer("measure"):
            ids = np.unique(owned[owned > 0])
            nuclei = labels[cells_box.slices()]
            measure_expanded(ids, cells, nuclei, pixels[:cells_box.height, :cells_box.width], 0.5, names, stains)
        cells_total += len(ids)
    return {"tiles": len(synth.tiles), "cells": cells_total, "paint_s": paint_s, "wall": timer.wall,
            "cpu": timer.cpu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", type=int, nargs=2, default=[6, 6], metavar=("ROWS", "COLS"),
                   help="tiles of 512 px (6 x 6: ~35k cells)")
    p.add_argument("--expansion-px", type=float, default=10.0, help="D in px (default: 5 µm at 0.5 µm/px)")
    p.add_argument("--stains", action="store_true", help="also hematoxylin and DAB optical densities (RGB)")
    p.add_argument("--box", choices=["tight", "read"], default="tight",
                   help="expand over the owned nuclei's bounding box or the tile's read box")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    r = run(tuple(args.grid), args.expansion_px, args.stains, args.box, args.seed)
    cells = r["cells"]
    print(f"grid {args.grid[0]}x{args.grid[1]} tiles of 512 px, D = {args.expansion_px:g} px, box {args.box}, "
          f"stains {'on' if args.stains else 'off'}: {cells:,} cells (painting {r['paint_s']:.1f} s, untimed)")
    print(f"  {'stage':18s} {'wall s':>8s} {'cells/min':>12s} {'CPU s':>8s} {'cells/min':>12s}")
    for label, keys in (("expand", ("expand",)), ("measure", ("measure",)), ("expand + measure", ("expand", "measure"))):
        wall = sum(r["wall"].get(k, 0.0) for k in keys)
        cpu = sum(r["cpu"].get(k, 0.0) for k in keys)
        print(f"  {label:18s} {wall:8.2f} {cells / wall * 60:12,.0f} {cpu:8.2f} {cells / cpu * 60:12,.0f}")


if __name__ == "__main__":
    main()
