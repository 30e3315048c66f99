"""summary.json and run.json: what a count found and how it was made, assembled from the plan and the stages.

summary.json: cell count, tiles, tissue area and density, area statistics (of the nuclei, and of the cells grown
from them when they are), pixel size, seam diagnostics, scale, the panoptic encoding and seconds per stage. run.json:
cellseg's version, the slide, the fully resolved protocol, the model channel and intensity range, the tissue method
and model, the normalisation windows, the cell expansion in px and µm, and what the caller records (`RunInfo`:
command line, device, model bundle, fingerprint).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import numpy as np

from .. import __version__
from ..planning import Protocol, modality_warning

if TYPE_CHECKING:
    from ..cells import SeamStats
    from ..planning import SlidePlan
    from ..slides import SlideInfo
    from ..util import StageTimer


@dataclass(frozen=True)
class RunInfo:
    """What run.json records of a count besides the slide, the protocol and the plan: what started it, on which
    device and precision, with which model; for a journaled count its fingerprint, and how it was distributed.
    None: not recorded."""

    command: str | None = None           # the command line, or the widget that started the count
    extra: dict = field(default_factory=dict)   # a caller's own entries (the napari widget's interface, request)
    device: str | None = None
    precision: str | None = None         # detect.Detector.precision_note
    environment: dict | None = None      # detection.runtime_environment: versions, processor, threads or GPU
    model: dict | None = None            # counter.model_record: the bundle and its score thresholds
    fingerprint: dict | None = None      # journal.fingerprint: what a later --resume recognises the result by
    distributed: dict | None = None      # the Dask cluster and the band split (run/distributed.py)

    def to_dict(self) -> dict:
        """run.json's entries, in field order (the caller's entries after the command)."""
        record = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra":
                record.update(value)
            elif value is not None:
                record[f.name] = value
        return record


def _stats(values: np.ndarray) -> dict | None:
    if values.size == 0:
        return None
    p5, p50, p95 = np.percentile(values, [5, 50, 95])
    return {"mean": float(values.mean()), "median": float(p50), "p5": float(p5), "p95": float(p95),
            "min": float(values.min()), "max": float(values.max())}


def area_stats(values: np.ndarray) -> dict | None:
    """mean, median, p5, p95, min, max of `values` (None when there are none), as summary.json gives them."""
    return _stats(np.asarray(values, float))


def regions_record(summary: dict, table: list[dict], tissue_in_regions_px: float, mpp: float | None) -> None:
    """Add a count's regions (regions.RegionTally.table) to `summary`: the density is then that of the tissue
    inside the regions, the only tissue analysed."""
    tissue_mm2 = tissue_in_regions_px * mpp ** 2 / 1e6 if mpp else None
    summary["regions"] = table
    summary["tissue_area_in_regions_px"] = round(tissue_in_regions_px)
    summary["tissue_area_in_regions_mm2"] = tissue_mm2
    summary["cells_per_mm2"] = summary["cell_count"] / tissue_mm2 if tissue_mm2 else None
    if tissue_mm2:
        summary["cells_per_mm2_note"] = "cells per mm² of tissue inside the regions (--regions)"


def expansion_record(plan: SlidePlan, mpp: float | None) -> dict:
    """How far nuclei were grown into cells (D; 0: nuclei only), in px and, with a pixel size, µm."""
    distance = float(plan.cell_expansion_px)
    return {"cell_expansion_px": distance, "cell_expansion_um": distance * mpp if mpp else None}


def scale_record(plan: SlidePlan) -> dict:
    """How a count chose its scale (planning.Scale; its `source` says why): what decided it, the nuclei measured on
    the slide, the size the pixel size implies, and the warning when the two disagree."""
    scale = plan.network.scale
    return {"method": scale.method, "measured_diameter_px": scale.measured_diameter_px,
            "measured_nuclei": scale.measured_nuclei, "pixel_size_diameter_px": scale.pixel_size_diameter_px,
            "warning": scale.warning}


def no_tissue_warning(tissue_method: str) -> str:
    """What a count says whose tissue prefilter found no tissue: its 0 cells are no finding (a dim slide, the wrong
    channel, a stain the prefilter does not know; or truly bare glass)."""
    return (f"no tissue found by the {tissue_method} prefilter: every tile was skipped, so the count of 0 says nothing "
            f"of the nuclei the slide may hold; if it holds some, --tissue none analyses every tile")


def build_summary(info: SlideInfo, protocol: Protocol, plan: SlidePlan, cell_count: int, areas: np.ndarray,
                  seams: SeamStats, panoptic: dict, timer: StageTimer, started: float,
                  cell_areas: np.ndarray | None = None) -> dict:
    """summary.json's content. areas: every nucleus's area in px; cell_areas: with a cell expansion,
    every cell's grown area in px; started: time.time() when the count began."""
    mpp = info.mpp
    tissue = plan.tissue
    tissue_px = tissue.area_px()
    tissue_mm2 = tissue_px * mpp ** 2 / 1e6 if mpp else None
    if not tissue_px:
        density_note = "no tissue found: every tile was skipped, so there are no cells and no density"
    elif not mpp:
        density_note = "no pixel size: density per mm² unknown (pass --mpp)"
    else:
        density_note = "cells per mm² of tissue"
    seconds = timer.to_dict()
    seconds["total"] = round(time.time() - started, 3)
    scale = plan.network.scale
    return {
        "slide": info.path.name, "format": info.format, "height_px": info.height, "width_px": info.width,
        "channels": info.n_channels, "dtype": str(info.dtype), "model_channel": plan.network.channel,
        # a Z-stack's planes, and what of them was counted: a plane from 1, "max" or "mean" (None: a 2-D image)
        "z_planes": info.z_planes, "z": info.z,
        "series": info.series,    # which image of a multi-image file was counted (--series), None: the first
        "t_points": info.t_points, "t": info.t,   # a time series' points, and the one counted (from 1; None: none)
        "file_warnings": list(info.warnings),   # what of the file was not counted (slides.SlideInfo.warnings)
        # the light level a colour slide's stain optical densities are taken against (report, appearance, cells.csv)
        "stain_white": plan.stain_white(info) if info.n_channels == 3 else None,
        "mpp": mpp, "mpp_source": info.mpp_source,
        "units": "µm columns filled" if mpp else f"µm columns empty: no pixel size ({info.mpp_source})",
        "protocol": protocol.name,
        "cell_count": int(cell_count),
        "tiles_total": len(plan.tiles), "tiles_skipped": len(plan.tiles) - sum(plan.keep),
        "tile_size_px": protocol.tile_size,
        "halo_px": protocol.halo_px,   # network px; see "scale" for slide px
        "tissue_method": tissue.method, "tissue_note": tissue.note,
        "min_tissue_fraction": protocol.min_tissue_fraction if tissue.method != "none" else None,
        "tissue_fraction": round(tissue_px / (info.height * info.width), 6),
        "tissue_area_px": round(tissue_px), "tissue_area_mm2": tissue_mm2,
        "cells_per_mm2": cell_count / tissue_mm2 if tissue_mm2 else None,
        "cells_per_mm2_note": density_note,
        "area_px": _stats(areas.astype(float)),
        "area_um2": _stats(areas * mpp ** 2) if mpp else None,
        **expansion_record(plan, mpp),
        "cell_area_px": _stats(cell_areas.astype(float)) if cell_areas is not None else None,
        "cell_area_um2": _stats(cell_areas * mpp ** 2) if cell_areas is not None and mpp else None,
        "seams": seams.to_dict(),
        "seconds": seconds,
        "panoptic": panoptic,
        "scale": {"factor": scale.factor, "source": scale.source, "tile_px": plan.tile_px, "halo_px": plan.halo_px,
                  "model_diameter_px": scale.model_diameter_px, "image_diameter_px": scale.image_diameter_px,
                  **scale_record(plan)},
        "looks_like": look_record(plan, info, protocol),
    }


def look_record(plan: SlidePlan, info: SlideInfo, protocol: Protocol) -> dict:
    """What the slide looks like (planning/modality.py) and the warning when it is not the protocol's modality."""
    look = plan.look(info.height, info.width)
    return {**look.to_dict(), "protocol_modality": protocol.modality,
            "warning": modality_warning(look, protocol.name, protocol.modality, info.mpp)}


def run_record(info: SlideInfo, protocol: Protocol, plan: SlidePlan, tissue: dict, run_info: RunInfo) -> dict:
    """run.json's content. tissue: tissue.TissueFinder.describe(); run_info: what the caller records (its model,
    counter.model_record, gets the score threshold this slide was counted at: its gray or its colour one)."""
    record = {"tool": "cellseg", "cellseg_version": __version__, "slide": str(info.path.resolve()), "z": info.z,
              "series": info.series, "t": info.t,
              "protocol": protocol.to_dict(), "protocol_source": protocol.source,
              "model_channel": plan.network.channel, "gray_input": plan.network.gray,
              "intensity_range": [plan.network.intensity.low, plan.network.intensity.high], "tissue": tissue,
              "normalisation_windows": [list(map(int, b)) for b in plan.windows],
              **expansion_record(plan, info.mpp), "scale": {"factor": plan.network.scale.factor, "source": plan.network.scale.source,
                                                              **scale_record(plan)},
              **run_info.to_dict()}
    thresholds = (record.get("model") or {}).get("score_thresholds")
    if thresholds:
        slide_threshold = thresholds["gray" if plan.network.gray else "colour"]
        record["model"] = {**record["model"], "score_threshold": slide_threshold}
    return record
