"""Cells by expansion through the real pipeline (cells/expansion_rows.py driven by pipeline.NucleusEmitter), with a detector
that reads known nuclei back: the cells are those of the slide expanded in one piece whatever the tiling, the nuclei
and their ids are untouched, and the result folder gains cell_labels.ome.tif, the cell columns and cyan outlines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from skimage.color import hed2rgb

from cellseg.cells import FinalNuclei, expand_nuclei, expanded_columns, nucleus_columns, tissue_in
from cellseg.geometry import Box
from cellseg.planning import Protocol
from cellseg.results import CELL_OUTLINE, NUCLEUS_OUTLINE, result_files
from cellseg.tissue.finder import TissueMask

from ..helpers import LabelReadingDetector, count_with, random_cells, same_partition

D = 7.0


class KnownTissue:
    """A tissue finder that finds a given TissueMask: cells must stay on exactly this tissue."""

    method = "known"

    def __init__(self, mask: TissueMask):
        self.mask = mask

    def find(self, slide, modality: str) -> TissueMask:
        return self.mask

    def describe(self) -> dict:
        return {"method": self.method}


def count(tmp_path: Path, name: str, nuclei: np.ndarray, tile: int, halo: int, image: np.ndarray | None = None,
          tissue: TissueMask | None = None, **protocol) -> tuple[dict, Path]:
    """Count a slide whose nuclei are `nuclei` (pixels: `image`, default a plain rendering) into tmp_path/name."""
    slide = tmp_path / f"{name}.tif"
    if image is None:
        image = ((nuclei > 0) * 200 + 20).astype(np.uint8)
    tifffile.imwrite(slide, image, photometric="rgb" if image.ndim == 3 else "minisblack")
    out = tmp_path / name
    p = Protocol(name="test", tile_size=tile, halo_px=halo, batch_size=3, min_area_px=1, min_tissue_fraction=0.0,
                 **{"tissue_method": "none", **protocol})
    summary = count_with(LabelReadingDetector(nuclei), slide, out, p,
                         tissue=KnownTissue(tissue) if tissue is not None else None)
    return summary, out


def labels_of(out: Path, name: str = "labels.ome.tif") -> np.ndarray:
    return tifffile.imread(out / name)


def by_position(table: pd.DataFrame) -> pd.DataFrame:
    """The cells.csv rows in slide order, without what depends on the tiling (ids, owning tile)."""
    return (table.sort_values(["centroid_row_px", "centroid_col_px"]).drop(columns=["cell_id", "tile_index"])
            .reset_index(drop=True))


@pytest.mark.slow
def test_expanded_cells_are_the_same_at_two_tile_sizes_and_untiled(tmp_path):
    nuclei = random_cells(300, 260, max_diameter=18, n=450, seed=7)
    mask = np.random.default_rng(2).random((30, 26)) < 0.75            # coarse tissue: 10 x 10 px per mask pixel
    tissue = TissueMask(mask, 10.0, 10.0, "known")
    whole_tissue = tissue_in(tissue, Box(0, 0, 300, 260))
    tables, cells = [], []
    for tile, halo in ((48, 12), (80, 20), (512, 20)):                 # 512: one tile holds the slide
        summary, out = count(tmp_path, f"t{tile}", nuclei, tile, halo, tissue=tissue, cell_expansion_px=D)
        found, grown = labels_of(out), labels_of(out, "cell_labels.ome.tif")
        assert same_partition(nuclei, found) and summary["cell_count"] == len(np.unique(nuclei)) - 1
        # the slide's own nuclei expanded in one piece, on the tissue, with the nuclei's ids
        np.testing.assert_array_equal(grown, expand_nuclei(found, D, whole_tissue))
        assert ((grown > 0) & (found == 0) & ~whole_tissue).sum() == 0 and ((grown > 0) & ~whole_tissue).any()
        tables.append(by_position(pd.read_csv(out / "cells.csv")))
        cells.append(grown)
    for table, grown in zip(tables[:2], cells[:2]):
        assert same_partition(cells[2], grown)
        pd.testing.assert_frame_equal(table, tables[2])
    table = tables[2]
    assert (table["cell_area_px"] >= table["area_px"]).all() and (table["cell_area_px"] > table["area_px"]).mean() > 0.9
    np.testing.assert_allclose(table["nucleus_cell_area_ratio"], table["area_px"] / table["cell_area_px"], rtol=1e-5)


@pytest.mark.slow
def test_a_tile_row_waits_for_the_nuclei_rows_further_down(tmp_path):
    """Tiles of 32 px with an 8 px halo and D = 30 px: a nucleus of row 0 (at row 28) and one of row 2 (at row 70)
    share the gap between them, with nothing in row 1; row 0's cells can only be drawn once row 2's nuclei are
    final, three rows on (expansion.context_rows). Drawn too early, cell 1 would reach down to row 58."""
    nuclei = np.zeros((160, 40), np.int32)
    rows, cols = np.indices(nuclei.shape)
    nuclei[(rows - 28) ** 2 + (cols - 20) ** 2 <= 9] = 1
    nuclei[(rows - 70) ** 2 + (cols - 20) ** 2 <= 9] = 2
    _, out = count(tmp_path, "gap", nuclei, 32, 8, cell_expansion_px=30.0)
    grown = labels_of(out, "cell_labels.ome.tif")
    np.testing.assert_array_equal(grown, expand_nuclei(labels_of(out), 30.0))
    assert grown[49, 20] == 1 and grown[50, 20] == 2            # the midline between rows 28 and 70


@pytest.mark.slow
def test_only_the_nuclei_rows_still_needed_are_held(tmp_path, monkeypatch):
    """Memory stays flat in the slide's height: 2k + 1 tile rows of nuclei at most (k = 1 here), not the slide's 12."""
    held = []
    add = FinalNuclei.add

    def add_and_record(self, grid_row, ids, nuclei):
        add(self, grid_row, ids, nuclei)
        held.append(len(self.rows))

    monkeypatch.setattr(FinalNuclei, "add", add_and_record)
    nuclei = random_cells(384, 64, max_diameter=10, n=400, seed=5)
    _, out = count(tmp_path, "tall", nuclei, 32, 8, cell_expansion_px=5.0)
    np.testing.assert_array_equal(labels_of(out, "cell_labels.ome.tif"), expand_nuclei(labels_of(out), 5.0))
    assert len(held) > 12 and max(held) == 3


@pytest.mark.slow
def test_expansion_leaves_the_nuclei_and_their_ids_as_they_were(tmp_path):
    nuclei = random_cells(200, 180, max_diameter=16, n=250, seed=9)
    _, plain = count(tmp_path, "plain", nuclei, 64, 16)
    _, grown = count(tmp_path, "grown", nuclei, 64, 16, cell_expansion_px=D)
    before, after = pd.read_csv(plain / "cells.csv"), pd.read_csv(grown / "cells.csv")
    assert list(before.columns) == list(nucleus_columns(["c0"]))
    assert list(after.columns) == list(nucleus_columns(["c0"])) + list(expanded_columns(["c0"], stains=False))
    pd.testing.assert_frame_equal(after[before.columns], before)       # same ids, same rows, same order
    np.testing.assert_array_equal(labels_of(plain), labels_of(grown))
    annotations = [json.loads((out / "predictions.coco.json").read_text())["annotations"] for out in (plain, grown)]
    assert annotations[0] == annotations[1]
    assert sorted(p.name for p in plain.iterdir() if not p.name.startswith(".")) == sorted(result_files(False))
    assert sorted(p.name for p in grown.iterdir() if not p.name.startswith(".")) == sorted(result_files(True))


@pytest.mark.slow
def test_cell_labels_share_the_nuclei_geometry_and_the_overlay_outlines_both(tmp_path):
    patch = random_cells(150, 140, max_diameter=16, n=150, seed=4)       # 4 x 5 patches, ids kept distinct
    nuclei = np.block([[np.where(patch > 0, patch + 1000 * (5 * i + j), 0) for j in range(5)] for i in range(4)])
    summary, out = count(tmp_path, "big", nuclei, 256, 32, cell_expansion_px=D)
    with tifffile.TiffFile(out / "labels.ome.tif") as a, tifffile.TiffFile(out / "cell_labels.ome.tif") as b:
        assert [lv.shape for lv in b.series[0].levels] == [lv.shape for lv in a.series[0].levels] == [
            (600, 700), (300, 350)]
        assert b.series[0].dtype == np.uint32 and b.pages[0].tile == a.pages[0].tile
        grown = b.series[0].asarray()
    assert set(np.unique(grown)) == set(np.unique(labels_of(out)))      # one cell per nucleus, the same ids
    overlay = np.asarray(Image.open(out / "overlay.png"))[..., :3].reshape(-1, 3)
    assert (overlay == CELL_OUTLINE).all(1).sum() > 1000 and (overlay == NUCLEUS_OUTLINE).all(1).sum() > 1000
    assert summary["cell_expansion_px"] == D and summary["cell_expansion_um"] is None     # no pixel size
    areas = pd.read_csv(out / "cells.csv")["cell_area_px"]
    assert summary["cell_area_px"]["median"] == pytest.approx(areas.median())
    assert summary["cell_area_px"]["median"] > summary["area_px"]["median"] and summary["cell_area_um2"] is None
    assert json.loads((out / "run.json").read_text())["cell_expansion_px"] == D
    assert "expand" in summary["seconds"]


@pytest.mark.slow
def test_nuclei_only_counts_draw_no_cells(tmp_path):
    nuclei = random_cells(100, 120, max_diameter=16, n=60, seed=1)
    summary, out = count(tmp_path, "plain", nuclei, 64, 16)
    assert not (out / "cell_labels.ome.tif").exists()
    overlay = np.asarray(Image.open(out / "overlay.png"))[..., :3].reshape(-1, 3)
    assert not (overlay == CELL_OUTLINE).all(1).any() and (overlay == NUCLEUS_OUTLINE).all(1).any()
    assert summary["cell_expansion_px"] == 0 and summary["cell_area_px"] is None and "expand" not in summary["seconds"]


@pytest.mark.slow
@pytest.mark.parametrize("modality, channels", [("fluorescence", 1), ("brightfield", 3)])
def test_zero_cells_give_the_same_columns(tmp_path, modality, channels):
    empty = np.zeros((96, 80), np.int32)
    image = np.full((96, 80, 3), 230, np.uint8) if channels == 3 else None
    summary, out = count(tmp_path, "empty", empty, 64, 16, image=image, modality=modality, cell_expansion_px=5.0)
    names = ["red", "green", "blue"] if channels == 3 else ["c0"]
    expected = list(nucleus_columns(names)) + list(expanded_columns(names, stains=channels == 3))
    assert (out / "cells.csv").read_text().splitlines() == [",".join(expected)]
    assert summary["cell_count"] == 0 and summary["cell_area_px"] is None
    assert not labels_of(out, "cell_labels.ome.tif").any()
    if channels == 3:
        assert {"cytoplasm_dab_od_mean", "nucleus_hematoxylin_od_mean"} <= set(expected)


@pytest.mark.slow
def test_dab_rings_are_measured_in_the_cytoplasm_across_tiles(tmp_path):
    """An IHC-like brightfield slide: hematoxylin nuclei (OD 0.5) on a grid crossing the tile seams, every other one
    inside a DAB ring (OD 0.4) wider than the expansion; the pipeline's cytoplasm DAB tells them apart."""
    shape = (192, 224)
    rows, cols = np.indices(shape)
    nuclei = np.zeros(shape, np.int32)
    dab = np.zeros(shape)
    ring = {}
    for k, (r, c) in enumerate((r, c) for r in range(16, 192, 32) for c in range(16, 224, 32)):
        d2 = (rows - r) ** 2 + (cols - c) ** 2
        nuclei[d2 <= 25] = k + 1
        ring[(r, c)] = 0.4 * (k % 2)
        dab[(d2 > 25) & (d2 <= 13 ** 2)] = ring[(r, c)]
    hed = np.stack([np.where(nuclei > 0, 0.5, 0.0), np.zeros(shape), dab], -1) / 6   # hed2rgb's units: OD / 6
    image = np.round(hed2rgb(hed) * 255).astype(np.uint8)
    _, out = count(tmp_path, "ihc", nuclei, 64, 16, image=image, modality="brightfield", cell_expansion_px=6.0)
    table = pd.read_csv(out / "cells.csv")
    assert len(table) == len(ring)
    expected = [ring[(round(r), round(c))] for r, c in zip(table["centroid_row_px"], table["centroid_col_px"])]
    np.testing.assert_allclose(table["cytoplasm_dab_od_mean"], expected, atol=0.02)
    np.testing.assert_allclose(table["nucleus_hematoxylin_od_mean"], 0.5, atol=0.02)
    np.testing.assert_allclose(table["nucleus_dab_od_mean"], 0.0, atol=0.02)
    grown = labels_of(out, "cell_labels.ome.tif")
    cytoplasm = (grown > 0) & (labels_of(out) == 0)
    np.testing.assert_array_equal(table.sort_values("cell_id")["cell_area_px"] - table.sort_values("cell_id")["area_px"],
                                  np.bincount(grown[cytoplasm], minlength=len(table) + 1)[1:])
