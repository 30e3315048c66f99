"""Throughput of the per-cell stages (merge + measure) on synthetic detections (not part of the test suite).

Goal (performance issue): merge and measurement scale with the number of cells, not the slide's area,
at >= 1 million cells per minute on CPU. The network is left out entirely: each tile's detections are
made up here, with the TileDetections contract of Mask R-CNN output:

- nuclei are ellipses 8-30 px across, 500-1500 per 512 px tile (density varies by tile), packed on a
  jittered lattice so that neighbours often touch or overlap by a few pixels;
- every tile reports every nucleus its read box (core + halo) sees, clipped at the read edge, shifted
  by a per-tile jitter of up to 1 px and, near seams, sometimes with a slightly different shape: two
  neighbouring tiles see a seam nucleus as two slightly different masks;
- ~2 % of detections get a near-duplicate (Mask R-CNN's double hits); scores are random.

The stages then run exactly as pipeline.count_slide drives them: owned_instances per tile
(pipeline.SlideRun.detect_owned), SeamMerger.add_tile per tile and pop_final per completed grid row
(pipeline.merge_tiles; both "merge"), and
pipeline.NucleusEmitter per owning tile: label_tile + measure_tile ("measure"), cells.csv through
results.CellsTableWriter ("write", optional).
With --expansion-px D the emitter also grows every nucleus into a cell by up to D px and measures it
(cells.expand_tile: "expand"; with --stains, RGB hematoxylin and DAB optical densities too), a tile row later,
as `cellseg count --cell-expansion-px D` does. Detection generation is not timed.

    nice -n 5 python benchmarks/merge_measure.py [--grid 16 16] [--channels 3] [--csv] [--expansion-px 10 [--stains]]
        [--profile out.prof]

Prints wall-clock and CPU seconds per stage: on a shared machine the CPU time is what the code costs.
"""

from __future__ import annotations

import argparse
import cProfile
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np

TILE, HALO = 512, 64          # the shipped protocols' tiling


def ellipse_bank(rng: np.random.Generator, n: int = 3000) -> list[np.ndarray]:
    """Tight boolean ellipse masks: major axis 8-30 px (log-normal around 14), minor 0.6-1x, any angle."""
    bank = []
    while len(bank) < n:
        major = float(np.clip(rng.lognormal(np.log(14), 0.35), 8, 30))
        minor = major * rng.uniform(0.6, 1.0)
        theta = rng.uniform(0, np.pi)
        half = int(np.ceil(major / 2)) + 1
        rr, cc = np.mgrid[-half:half + 1, -half:half + 1] + rng.uniform(-0.5, 0.5, size=(2, 1, 1))
        u = rr * np.cos(theta) + cc * np.sin(theta)
        v = -rr * np.sin(theta) + cc * np.cos(theta)
        m = (u / (major / 2)) ** 2 + (v / (minor / 2)) ** 2 <= 1
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        bank.append(np.ascontiguousarray(m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]))
    return bank


class SyntheticSlide:
    """Ground-truth nuclei of a grid of tiles, generated per tile core on demand (deterministic)."""

    def __init__(self, grid_rows: int, grid_cols: int, seed: int = 0):
        from cellseg.geometry import plan_tiles
        self.seed = seed
        self.shape = (grid_rows * TILE, grid_cols * TILE)
        self.tiles = plan_tiles(*self.shape, TILE, HALO)
        self.grid = (grid_rows, grid_cols)
        self.bank = ellipse_bank(np.random.default_rng(seed))
        self.sizes = np.array([max(m.shape) for m in self.bank])
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def core_cells(self, tile_index: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, 2) top-left corners in slide px and (n,) bank indices of the nuclei centred in a tile core."""
        if tile_index not in self._cache:
            core = self.tiles[tile_index].core
            rng = np.random.default_rng((self.seed, tile_index))
            n_target = rng.integers(500, 1501)
            step = TILE / np.sqrt(n_target)
            g = np.arange(step / 2, TILE, step)
            centres = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
            centres = centres + rng.uniform(-0.3, 0.3, centres.shape) * step + (core.row0, core.col0)
            # Nuclei no wider than ~1.3 lattice steps: dense, often touching, rarely hiding each other.
            allowed = np.flatnonzero(self.sizes <= max(9.0, 1.3 * step))
            kinds = rng.choice(allowed, len(centres))
            shapes = np.array([self.bank[k].shape for k in kinds])
            corners = np.round(centres - shapes / 2).astype(np.int64)
            self._cache[tile_index] = (corners, kinds)
            if len(self._cache) > 4 * self.grid[1]:           # keep only a few rows of tiles around
                self._cache.pop(next(iter(self._cache)))
        return self._cache[tile_index]

    def detections(self, tile_index: int):
        """What a detector would report for one tile, in its read-box frame (TileDetections)."""
        from cellseg.geometry import TileDetections
        tile = self.tiles[tile_index]
        rng = np.random.default_rng((self.seed, tile_index, 1))
        shift = rng.integers(-1, 2, size=2)               # this tile's view is off by up to 1 px
        gr, gc = tile.grid_row, tile.grid_col
        corners, kinds = [], []
        for r in range(max(gr - 1, 0), min(gr + 2, self.grid[0])):
            for c in range(max(gc - 1, 0), min(gc + 2, self.grid[1])):
                k, kk = self.core_cells(r * self.grid[1] + c)
                corners.append(k)
                kinds.append(kk)
        corners, kinds = np.concatenate(corners), np.concatenate(kinds)
        read, core = tile.read, tile.core
        corners = corners + shift
        # Near seams, neighbouring tiles disagree on the shape too: swap in a similar ellipse now and then.
        centre = corners + np.array([self.bank[k].shape for k in kinds]) / 2
        seam = ((centre[:, 0] < core.row0 + HALO // 2) | (centre[:, 0] >= core.row1 - HALO // 2)
                | (centre[:, 1] < core.col0 + HALO // 2) | (centre[:, 1] >= core.col1 - HALO // 2))
        swap = seam & (rng.random(len(kinds)) < 0.3)
        kinds[swap] = np.clip(kinds[swap] + rng.integers(-3, 4, swap.sum()), 0, len(self.bank) - 1)
        # Mask R-CNN double hits: ~2 % of nuclei are reported twice, 1-2 px apart.
        dup = np.flatnonzero(rng.random(len(kinds)) < 0.02)
        corners = np.concatenate([corners, corners[dup] + rng.integers(-2, 3, (len(dup), 2))])
        kinds = np.concatenate([kinds, kinds[dup]])
        boxes, masks = [], []
        for (r0, c0), k in zip(corners, kinds):
            m = self.bank[k]
            r1, c1 = r0 + m.shape[0], c0 + m.shape[1]
            cr0, cc0, cr1, cc1 = max(r0, read.row0), max(c0, read.col0), min(r1, read.row1), min(c1, read.col1)
            if cr0 >= cr1 or cc0 >= cc1:
                continue
            m = m[cr0 - r0:cr1 - r0, cc0 - c0:cc1 - c0]
            rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            if rows.size == 0:
                continue
            m = m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
            boxes.append((cr0 + rows[0] - read.row0, cc0 + cols[0] - read.col0,
                          cr0 + rows[-1] + 1 - read.row0, cc0 + cols[-1] + 1 - read.col0))
            masks.append(m)
        n = len(masks)
        return TileDetections(np.asarray(boxes, np.int64).reshape(-1, 4), masks,
                              rng.uniform(0.3, 1.0, n).astype(np.float32), np.ones(n, np.int64))


class _FakeSlide:
    """read_region + info.mpp, all NucleusEmitter needs of a slide (through slides.CachedSlide): noise pixels of
    the box's size (C channels; 8-bit for RGB stains, else 16-bit)."""

    def __init__(self, channels: int, seed: int = 0, rgb: bool = False):
        rng = np.random.default_rng(seed)
        side = 2 * (TILE + 2 * HALO)          # a read box, or a cells' box reaching beyond it
        self._pixels = (rng.integers(0, 256, (side, side, channels), dtype=np.uint8) if rgb
                        else rng.integers(0, 4096, (side, side, channels), dtype=np.uint16))
        self.info = SimpleNamespace(mpp=0.5)

    def read_region(self, box):
        return self._pixels[:box.row1 - box.row0, :box.col1 - box.col0]


class _Timer:
    """timing.StageTimer's interface, recording wall-clock and CPU seconds (this machine is shared: CPU
    time shows what the code costs, wall time what a user waited)."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[stage] = self.wall.get(stage, 0.0) + time.perf_counter() - wall
            self.cpu[stage] = self.cpu.get(stage, 0.0) + time.process_time() - cpu


class _TableOnly:
    """Stands in for export.ResultWriter: only cells.csv (with --csv) is written; the COCO file and the label
    canvas cost the write stage, not merge or measure."""

    def __init__(self, table):
        self.table = table

    def add_nuclei(self, read, ids, nuclei, labels, rows, expanded=None):
        if self.table is not None:
            self.table.append(rows)


def run(grid: tuple[int, int], channels: int, write_csv: bool, seed: int, expansion_px: float = 0.0,
        stains: bool = False) -> dict:
    from skimage.color import rgb2hed  # noqa: F401  (imported here, not in the first timed tile)
    from skimage.segmentation import expand_labels  # noqa: F401

    from cellseg.cells import CellExpansion, SeamMerger, context_rows, nucleus_columns, owned_instances
    from cellseg.geometry import seam_band_px
    from cellseg.results import CellsTableWriter
    from cellseg.run import NucleusEmitter, merge_tiles
    from cellseg.slides import CachedSlide

    synth = SyntheticSlide(*grid, seed=seed)
    tiles = synth.tiles
    names = ["red", "green", "blue"] if stains else [f"c{k}" for k in range(channels)]
    timer = _Timer()
    merger = SeamMerger(dedupe_overlap=0.5, min_area_px=10)
    tiles_per_row = grid[1]
    band = seam_band_px(HALO)
    generate = 0.0
    expansion = (CellExpansion(expansion_px, context_rows(expansion_px, TILE, HALO), synth.shape, None, 0.5, names,
                               stains) if expansion_px else None)
    with tempfile.TemporaryDirectory() as tmp:
        columns = {**nucleus_columns(names), **(expansion.columns if expansion else {})}
        table = CellsTableWriter(Path(tmp) / "cells.csv", columns) if write_csv else None
        emitter = NucleusEmitter(CachedSlide(_FakeSlide(len(names), seed, rgb=stains)), tiles, _TableOnly(table), names,
                              ["nucleus"], timer, expansion=expansion)

        def owned():                                # pipeline.SlideRun.detect_owned minus the network
            nonlocal generate
            for tile in tiles:
                start = time.perf_counter()
                det = synth.detections(tile.index)
                generate += time.perf_counter() - start
                with timer("merge"):
                    cells = owned_instances(det, tile, synth.shape, 10, band)
                yield tile, cells

        merge_tiles(owned(), tiles_per_row, merger, emitter, timer)
        if table is not None:
            table.close()
    return {"tiles": len(tiles), "cells": emitter.next_id - 1, "generate_s": generate, "wall": timer.wall,
            "cpu": timer.cpu, "seams": merger.stats.to_dict()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", type=int, nargs=2, default=[16, 16], metavar=("ROWS", "COLS"),
                   help="tiles of 512 px (16 x 16: ~260k cells)")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--csv", action="store_true", help="also write cells.csv (CellsTableWriter) and time it")
    p.add_argument("--expansion-px", type=float, default=0.0,
                   help="grow nuclei into cells by up to D px and measure them (10: 5 µm at 0.5 µm/px)")
    p.add_argument("--stains", action="store_true",
                   help="with --expansion-px: RGB pixels and the hematoxylin / DAB optical density columns")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", type=Path, help="write cProfile stats here")
    args = p.parse_args()
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    r = run(tuple(args.grid), args.channels, args.csv, args.seed, args.expansion_px, args.stains)
    if profiler:
        profiler.disable()
        profiler.dump_stats(args.profile)
    cells = r["cells"]
    channels = 3 if args.stains else args.channels
    expansion = (f", cells grown by {args.expansion_px:g} px{' with stains' if args.stains else ''}"
                 if args.expansion_px else "")
    print(f"grid {args.grid[0]}x{args.grid[1]} tiles of {TILE} px, {channels} channel(s){expansion}: "
          f"{cells:,} cells (generation {r['generate_s']:.1f} s, untimed)")
    print(f"  {'stage':22s} {'wall s':>8s} {'cells/min':>12s} {'CPU s':>8s} {'cells/min':>12s}")
    stages = [("merge", ("merge",)), ("measure", ("measure",)), ("merge + measure", ("merge", "measure"))]
    if args.expansion_px:
        stages += [("expand", ("expand",)), ("merge + measure + expand", ("merge", "measure", "expand"))]
    if args.csv:
        stages.append(("write cells.csv", ("write",)))
    for label, keys in stages:
        wall = sum(r["wall"].get(k, 0.0) for k in keys)
        cpu = sum(r["cpu"].get(k, 0.0) for k in keys)
        print(f"  {label:22s} {wall:8.2f} {cells / wall * 60:12,.0f} {cpu:8.2f} {cells / cpu * 60:12,.0f}")
    print(f"  seams: {r['seams']}")


if __name__ == "__main__":
    main()
