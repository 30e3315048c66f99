"""How long a count of a slide will take on this machine, from a few timed tiles (`cellseg count --estimate`).

A 40x whole slide can take hours on a laptop CPU: a user should know before starting. The estimate runs the real
first steps (plan_slide: thumbnail, tissue, intensity range, tiles; the detector's calibration), then detects a
sample of the analysed tiles spread evenly over the grid (dense and sparse tissue alike) and extrapolates:

    planning + calibration + analysed tiles x median seconds per sample tile

Merging, measuring and writing overlap with detection in a count (run/pipeline.py) and add little on a CPU; on a GPU,
where they can dominate, the estimate says it is a lower bound.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..detection import cpu_model
from ..geometry import TileDetector
from ..planning import Protocol
from ..results import describe_size, expected_size
from ..slides import open_slide
from ..tissue import TissueFinder
from .pipeline import SlideRun


@dataclass(frozen=True)
class Estimate:
    slide: str
    tiles_total: int
    tiles_analysed: int
    tiles_timed: int
    seconds_per_tile: float
    seconds_planning: float      # thumbnail, tissue, intensity range, calibration
    seconds_total: float
    hardware: str
    nuclei: float = 0.0          # expected: the sample tiles' nuclei per tile x the tiles to analyse
    result_bytes: float = 0.0    # the result folder's expected size (results.expected_size)

    def describe(self) -> str:
        size = f"; its result folder about {describe_size(self.result_bytes)}"
        if self.tiles_analysed == 0:
            return (f"{self.slide}: no tile holds tissue; a count would take about {_duration(self.seconds_total)} "
                    f"(planning only){size}")
        return (f"{self.slide}: {self.tiles_analysed} of {self.tiles_total} tiles to analyse; {self.tiles_timed} "
                f"sample tiles took {self.seconds_per_tile:.2f} s each ({self.hardware}): a count would take about "
                f"{_duration(self.seconds_total)} (planning {self.seconds_planning:.0f} s included){size} "
                f"(~{self.nuclei:,.0f} nuclei at the sample tiles' density)")


def estimate_count(slide_path: Path, protocol: Protocol, detector: TileDetector, tissue: TissueFinder, *,
                   mpp: float | None = None, model_diameter_px: float | None = None,
                   diameter_px: float | str | None = None, regions=None, sample_tiles: int = 8,
                   micron_scale=None, z: int | str | None = None, series: int | None = None,
                   t: int | None = None) -> Estimate:
    """Plan `slide_path` and time `sample_tiles` of its analysed tiles (after one untimed warm-up tile); regions:
    counted only inside these (regions.RegionFile), as the count would be. micron_scale, model_diameter_px and
    diameter_px: the scale, and z, series and t, what of the file is counted, as count_slide takes them."""
    started = time.perf_counter()
    with open_slide(slide_path, mpp=mpp, z=z, series=series, t=t) as slide:
        run = SlideRun(slide, protocol, detector, keep_pixels=False)      # nothing is measured: no pixels kept
        plan = run.plan(tissue, model_diameter_px=model_diameter_px, diameter_px=diameter_px, regions=regions,
                        micron_scale=micron_scale)
        analysed = plan.analysed
        run.calibrate()
        run.calibration.take(analysed)   # the tiles detected to measure the nuclei: timed like any other
        planning = time.perf_counter() - started
        picks = [analysed[i] for i in np.unique(np.linspace(0, len(analysed) - 1, min(sample_tiles + 1,
                                                                                       len(analysed))).round()
                                                          .astype(int))] if analysed else []
        seconds, found = [], 0
        for k, tile in enumerate(picks):
            t = time.perf_counter()
            for _, nuclei in run.detect_owned([tile]):
                found += len(nuclei)
            if k > 0 or len(picks) == 1:     # the first tile warms the network up (allocations, kernel choice)
                seconds.append(time.perf_counter() - t)
        cells_expanded = plan.cell_expansion(slide.info, protocol.modality) is not None
    per_tile = statistics.median(seconds) if seconds else 0.0
    # detection's torch module, imported here: the run layer imports without torch
    from ..detection import cpu_threads

    on_cpu = str(getattr(detector, "device", "cpu")).startswith("cpu")
    hardware = (f"CPU {cpu_model()}, {cpu_threads()} threads" if on_cpu else
                f"GPU ({detector.device}); merging and writing not included: a lower bound")
    hardware += f", {detector.precision_note}" if hasattr(detector, "precision_note") else ""
    nuclei = found / len(picks) * len(analysed) if picks else 0.0
    return Estimate(slide=str(slide_path), tiles_total=len(plan.tiles), tiles_analysed=len(analysed),
                    tiles_timed=len(seconds), seconds_per_tile=per_tile, seconds_planning=planning,
                    seconds_total=planning + per_tile * len(analysed), hardware=hardware, nuclei=nuclei,
                    result_bytes=expected_size(nuclei, cells_expanded, protocol.outputs,
                                                 slide.info.height, slide.info.width, slide.info.n_channels == 3))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
