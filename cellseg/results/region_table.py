"""Figures per annotated region (`--regions`), gathered as the tiles are written: regions.csv and summary.json's
"regions". The regions themselves (reading, pixels, membership) are planning/regions.py's, a planning concern; these figures
are the result's."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..planning import Regions
from .summary import area_stats


class RegionTally:
    """Cells per region as the tiles are written: counts and areas (px) per (cell, region) pair, so that the
    area statistics of each region are exact; ~12 bytes a cell, as summary.json's all-cells statistics keep."""

    def __init__(self, regions: Regions):
        self.regions = regions
        self._region: list[np.ndarray] = []
        self._area: list[np.ndarray] = []
        self._p: list[np.ndarray] = []

    def add(self, member: np.ndarray, area_px: np.ndarray, p_nucleus: np.ndarray | None = None) -> None:
        cell, region = np.nonzero(member)
        self._region.append(region.astype(np.int32))
        self._area.append(np.asarray(area_px, np.int64)[cell])
        if p_nucleus is not None:
            self._p.append(np.nan_to_num(np.asarray(p_nucleus, np.float64)[cell]))

    def sums(self) -> tuple[np.ndarray, np.ndarray]:
        """Per region: the sum of its nuclei's p_nucleus (0 where none was given) and of their areas (px)."""
        n = len(self.regions.names)
        region = np.concatenate(self._region) if self._region else np.zeros(0, np.int32)
        area = np.concatenate(self._area) if self._area else np.zeros(0, np.int64)
        p = np.concatenate(self._p) if self._p and len(self._p) == len(self._region) else np.zeros(len(region))
        return (np.bincount(region, weights=p, minlength=n)[:n],
                np.bincount(region, weights=area.astype(np.float64), minlength=n)[:n])

    def table(self, tissue, mpp: float | None) -> list[dict]:
        """One record per region: area, tissue inside it (tissue: tissue.TissueMask), cells, densities, area
        statistics (regions.csv's rows and summary.json's "regions")."""
        region = np.concatenate(self._region) if self._region else np.zeros(0, np.int32)
        area = np.concatenate(self._area) if self._area else np.zeros(0, np.int64)
        tissue_in = self.regions.tissue_areas(tissue)
        um2 = mpp ** 2 if mpp else None
        out = []
        for r, (name, g) in enumerate(zip(self.regions.names, self.regions.geometries)):
            cells = int(np.count_nonzero(region == r))
            tissue_px = float(tissue_in[r])
            area_mm2 = g.area * um2 / 1e6 if um2 else None
            tissue_mm2 = tissue_px * um2 / 1e6 if um2 else None
            areas = area[region == r]
            stats = area_stats(areas * um2 if um2 else areas.astype(float))
            out.append({"region": name, "area_px": float(g.area), "area_um2": g.area * um2 if um2 else None,
                        "area_mm2": area_mm2, "tissue_area_px": tissue_px,
                        "tissue_area_um2": tissue_px * um2 if um2 else None, "tissue_area_mm2": tissue_mm2,
                        "cells": cells,
                        "cells_per_mm2_region": cells / area_mm2 if area_mm2 else None,
                        "cells_per_mm2_tissue": cells / tissue_mm2 if tissue_mm2 else None,
                        "cell_area_unit": "µm²" if um2 else "px",
                        **{f"cell_area_{k}": (stats or {}).get(k) for k in ("mean", "median", "p5", "p95", "min",
                                                                              "max")}})
        return out


def write_regions_csv(path: Path, table: list[dict]) -> None:
    """regions.csv: one row per region (RegionTally.table), empty fields where a value needs the pixel size."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]), lineterminator="\n")
        writer.writeheader()
        for row in table:
            writer.writerow({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v)
                             for k, v in row.items()})
