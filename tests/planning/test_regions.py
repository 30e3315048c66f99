"""Counting inside annotated regions (planning/regions.py through the real pipeline, with a detector that reads known nuclei
back): cells outside every region are left out, tiles far from every region are never read, the densities are those
of the known cells, the seam rule is unchanged at region borders, and bad regions files fail in one line."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from cellseg.planning import Protocol, RegionsError, load_regions
from cellseg.results import result_files
from cellseg.run import pipeline
from cellseg.slides import open_slide

from ..helpers import DATA, LabelReadingDetector, assert_user_error, count_with, invoke, random_cells

QUPATH = DATA / "qupath_annotations.geojson"


class RecordingSlide:
    """An open slide that records every box read from it."""

    def __init__(self, slide, reads: list):
        self._slide, self.reads = slide, reads

    def __getattr__(self, name):
        return getattr(self._slide, name)

    def read_region(self, box):
        self.reads.append(box)
        return self._slide.read_region(box)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._slide.__exit__(*exc)


def make_slide(tmp_path: Path, shape=(256, 256), n=120, seed=3) -> tuple[Path, np.ndarray]:
    labels = random_cells(shape[0], shape[1], 12, n, seed)
    slide = tmp_path / "slide.tif"
    tifffile.imwrite(slide, ((labels > 0) * 200 + 20).astype(np.uint8))
    return slide, labels


def protocol(tile: int = 64, halo: int = 16) -> Protocol:
    return Protocol(name="test", tile_size=tile, halo_px=halo, batch_size=3, min_area_px=1, min_tissue_fraction=0.0,
                    tissue_method="none")


def count(tmp_path, slide, labels, name, tile=64, halo=16, regions_path=QUPATH, units="px", mpp=None, reads=None,
          monkeypatch=None):
    if reads is not None:
        monkeypatch.setattr(pipeline, "open_slide", lambda p, mpp=None, **kw: RecordingSlide(open_slide(p, mpp=mpp, **kw),
                                                                                    reads))
    regions = load_regions(regions_path, units) if regions_path is not None else None
    out = tmp_path / name
    summary = count_with(LabelReadingDetector(labels), slide, out, protocol(tile, halo), regions=regions, mpp=mpp)
    return summary, out


def known_centroids(labels: np.ndarray) -> pd.DataFrame:
    from scipy import ndimage
    ids = np.unique(labels)[1:]
    c = np.array(ndimage.center_of_mass(np.ones_like(labels), labels, ids))
    return pd.DataFrame({"row": c[:, 0], "col": c[:, 1],
                         "area": ndimage.sum(np.ones_like(labels), labels, ids)})


def test_qupath_annotations_are_read_with_names_and_holes(caplog):
    with caplog.at_level(logging.INFO):
        regions = load_regions(QUPATH)
    assert regions.names == ("Tumor core", "Stroma")    # name, else the classification's name
    assert len(regions.geometries[1].interiors) == 1
    assert regions.geometries[1].area == 150 * 110 - 50 * 50
    assert "1 detection object(s)" in caplog.text      # not a region, and said so


def test_a_region_named_0_or_by_a_plain_classification_keeps_that_name(tmp_path):
    square = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}
    path = tmp_path / "r.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": square, "properties": props}
        for props in ({"classification": "Tumor"}, {"name": 0}, {"name": " ", "classification": {"name": "Stroma"}},
                      {"name": {"odd": 1}})]}))
    assert load_regions(path).names == ("Tumor", "0", "Stroma", "3")     # the second feature's name, not its index


@pytest.mark.slow
def test_cells_outside_every_region_are_left_out_and_densities_are_right(tmp_path):
    slide, labels = make_slide(tmp_path)
    summary, out = count(tmp_path, slide, labels, "r", mpp=0.5)
    cells = pd.read_csv(out / "cells.csv", keep_default_na=False)
    regions = load_regions(QUPATH).in_pixels(0.5, 256, 256)
    known = known_centroids(labels)
    member = regions.membership(known["row"].to_numpy(), known["col"].to_numpy())
    assert len(cells) == int(member.any(1).sum()) > 0
    assert len(cells) < len(known)                                # some cells lie outside every region
    expected = {name: int(member[:, r].sum()) for r, name in enumerate(regions.names)}
    got = {name: int(sum(name in v.split(";") for v in cells["region"])) for name in regions.names}
    assert got == expected
    both = member.all(1).sum()
    assert both > 0 and (cells["region"] == "Tumor core;Stroma").sum() == both   # overlapping regions: both named
    table = pd.read_csv(out / "regions.csv")
    assert table["region"].tolist() == ["Tumor core", "Stroma"]
    assert table["cells"].tolist() == [expected["Tumor core"], expected["Stroma"]]
    area_mm2 = np.array([g.area for g in regions.geometries]) * 0.25 / 1e6
    np.testing.assert_allclose(table["area_mm2"], area_mm2, rtol=1e-5)
    np.testing.assert_allclose(table["cells_per_mm2_region"], table["cells"] / area_mm2, rtol=1e-5)
    assert [r["cells"] for r in summary["regions"]] == table["cells"].tolist()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(result_files(False, True))


@pytest.mark.slow
def test_tiles_far_from_every_region_are_never_read(tmp_path, monkeypatch):
    slide, labels = make_slide(tmp_path)
    small = tmp_path / "small.geojson"
    small.write_text(json.dumps({"type": "Feature", "properties": {"name": "corner"},
                                 "geometry": {"type": "Polygon",
                                              "coordinates": [[[10, 10], [60, 10], [60, 50], [10, 50], [10, 10]]]}}))
    reads = []
    summary, out = count(tmp_path, slide, labels, "s", regions_path=small, reads=reads, monkeypatch=monkeypatch)
    windows = {tuple(b) for b in json.loads((out / "run.json").read_text())["normalisation_windows"]}
    tiles = [b for b in reads if tuple(b) not in windows]
    assert tiles
    # Only the top-left 2 x 2 tiles' cores (0..128 x 0..128) come within 2 halos and the seam band (36 px) of the
    # region: every read but the normalisation windows (the whole slide's) lies within their read boxes.
    assert all(b.row1 <= 128 + 16 and b.col1 <= 128 + 16 for b in tiles), tiles
    assert summary["tiles_total"] - summary["tiles_skipped"] == 4
    cells = pd.read_csv(out / "cells.csv", keep_default_na=False)
    assert set(cells["region"]) == {"corner"}
    inside = (cells["centroid_col_px"] + 0.5 > 10) & (cells["centroid_col_px"] + 0.5 < 60)
    assert inside.all() and len(cells) > 0


@pytest.mark.slow
def test_seam_rule_unchanged_at_region_borders(tmp_path):
    slide, labels = make_slide(tmp_path, n=160, seed=5)
    _, a = count(tmp_path, slide, labels, "a", tile=64, halo=16)
    _, b = count(tmp_path, slide, labels, "b", tile=96, halo=24)
    ca, cb = pd.read_csv(a / "cells.csv", keep_default_na=False), pd.read_csv(b / "cells.csv", keep_default_na=False)
    key = ["centroid_row_px", "centroid_col_px", "area_px", "region"]
    pd.testing.assert_frame_equal(ca[key].sort_values(key).reset_index(drop=True),
                                  cb[key].sort_values(key).reset_index(drop=True))
    # and they are the whole-slide count's cells whose centroid lies in a region
    _, whole = count(tmp_path, slide, labels, "w", regions_path=None)
    cw = pd.read_csv(whole / "cells.csv")
    regions = load_regions(QUPATH).in_pixels(None, 256, 256)
    inside = regions.membership(cw["centroid_row_px"].to_numpy(), cw["centroid_col_px"].to_numpy()).any(1)
    assert inside.sum() == len(ca)


def test_regions_in_um_need_the_pixel_size_and_are_scaled(tmp_path):
    slide, labels = make_slide(tmp_path)
    um = load_regions(QUPATH, "um")
    with pytest.raises(RegionsError, match="pixel size"):
        um.in_pixels(None, 256, 256)
    px = um.in_pixels(0.5, 512, 512)
    assert px.geometries[0].bounds == (16.0, 16.0, 240.0, 496.0)


def test_qupath_object_types_of_older_exports_are_read_as_qupath_reads_them(tmp_path, caplog):
    square = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}
    features = [  # QuPath 0.2: the type as the feature's id; object_type, the older spelling of objectType
        {"type": "Feature", "id": "PathAnnotationObject", "geometry": square,
         "properties": {"classification": {"name": "Tumor"}}},
        {"type": "Feature", "id": "PathDetectionObject", "geometry": square, "properties": {}},
        {"type": "Feature", "geometry": square, "properties": {"object_type": "cell"}},
        {"type": "Feature", "geometry": square, "properties": {"object_type": "annotation", "name": "Stroma"}}]
    path = tmp_path / "older.geojson"
    path.write_text(json.dumps(features))
    with caplog.at_level(logging.INFO):
        regions = load_regions(path)
    assert regions.names == ("Tumor", "Stroma")
    assert "1 PathDetectionObject object(s)" in caplog.text and "1 cell object(s)" in caplog.text


def test_a_region_off_the_slide_is_noted_once(tmp_path, tiny_bundle, caplog):
    slide, _ = make_slide(tmp_path)
    path = tmp_path / "regions.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"name": name}, "geometry": {"type": "Polygon", "coordinates": [
            [[x, 0], [x + 50, 0], [x + 50, 50], [x, 50], [x, 0]]]}} for name, x in (("on", 10), ("off", 1000))]}))
    with caplog.at_level(logging.WARNING):
        result = invoke(["count", str(slide), "-o", str(tmp_path / "out"), "--regions", str(path),
                         "--model", str(tiny_bundle), "--tissue", "none", "-q"])
    assert result.exit_code == 0, result.output
    assert sum("'off'" in r.getMessage() and "outside the slide" in r.getMessage() for r in caplog.records) == 1


def test_a_batch_in_regions_lists_the_tissue_its_density_is_per(tmp_path, tiny_bundle):
    slide, _ = make_slide(tmp_path)
    shutil.copy(slide, tmp_path / "other.tif")
    result = invoke(["count", str(slide), str(tmp_path / "other.tif"), "-o", str(tmp_path / "out"), "--regions",
                     str(QUPATH), "--mpp", "0.5", "--model", str(tiny_bundle), "--tissue", "none", "-q"])
    assert result.exit_code == 0, result.output
    row = next(csv.DictReader((tmp_path / "out" / "summary.csv").read_text(encoding="utf-8").splitlines()))
    summary = json.loads(next((tmp_path / "out").glob("*/summary.json")).read_text())
    # cells_per_mm2 is per mm² of the tissue in the regions: summary.csv gave only the slide's beside it
    assert float(row["tissue_area_in_regions_mm2"]) == pytest.approx(summary["tissue_area_in_regions_mm2"])
    assert float(row["cells_per_mm2"]) * float(row["tissue_area_in_regions_mm2"]) == pytest.approx(
        int(row["cell_count"]))


def test_properties_that_are_not_an_object_fail_in_one_line(tmp_path):
    path = tmp_path / "odd.geojson"
    path.write_text(json.dumps({"type": "Feature", "properties": ["Tumor"], "geometry": {
        "type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 0]]]}}))
    with pytest.raises(RegionsError, match=r"expected the properties of feature 0 .* to be an object, found list"):
        load_regions(path)


def test_bad_regions_files_fail_in_one_line_or_are_repaired(tmp_path, caplog):
    slide, _ = make_slide(tmp_path)
    cases = {"text.geojson": "not json {", "points.geojson": json.dumps(
        {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {},
                                                    "geometry": {"type": "Point", "coordinates": [1, 2]}}]}),
             "outside.geojson": json.dumps({"type": "Polygon",
                                            "coordinates": [[[1000, 1000], [1100, 1000], [1100, 1100], [1000, 1000]]]})}
    words = {"text.geojson": "not JSON", "points.geojson": "found none", "outside.geojson": "outside"}
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        result = invoke(["count", str(slide), "-o", str(tmp_path / f"out-{name}"), "--regions", str(path),
                         "--tissue", "none", "-q"])
        assert_user_error(result, 1, words[name])
        assert not (tmp_path / f"out-{name}").exists()
    bowtie = tmp_path / "bowtie.geojson"
    bowtie.write_text(json.dumps({"type": "Feature", "properties": {"name": "bow"}, "geometry": {
        "type": "Polygon", "coordinates": [[[0, 0], [100, 100], [100, 0], [0, 100], [0, 0]]]}}))
    with caplog.at_level(logging.WARNING):
        regions = load_regions(bowtie)
    assert "'bow'" in caplog.text and "make_valid" in caplog.text
    assert regions.geometries[0].is_valid and regions.geometries[0].area == pytest.approx(5000)


@pytest.mark.slow
def test_dask_counts_the_same_cells_in_regions(tmp_path):
    pytest.importorskip("distributed")
    from cellseg.run import count_on_dask

    from ..helpers import LabelCounterSpec
    slide, labels = make_slide(tmp_path)
    _, serial = count(tmp_path, slide, labels, "serial")
    labels_path = tmp_path / "labels.tif"
    tifffile.imwrite(labels_path, labels)
    spec = LabelCounterSpec(protocol(), labels_path, regions=load_regions(QUPATH))
    [outcome] = count_on_dask(spec, [(slide, tmp_path / "dask")], workers=1)
    assert outcome.error is None
    a = pd.read_csv(serial / "cells.csv", keep_default_na=False)
    b = pd.read_csv(tmp_path / "dask" / "cells.csv", keep_default_na=False)
    key = ["centroid_row_px", "centroid_col_px", "area_px", "region"]
    pd.testing.assert_frame_equal(a[key].sort_values(key).reset_index(drop=True),
                                  b[key].sort_values(key).reset_index(drop=True))
    assert (tmp_path / "dask" / "regions.csv").read_text() == (serial / "regions.csv").read_text()


def test_gis_polygons_without_names_are_named_by_index_and_names_stay_apart(tmp_path):
    square = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}
    path = tmp_path / "gis.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": square, "properties": None},
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [square["coordinates"]]},
         "properties": {"name": "a;b"}},
        {"type": "Feature", "geometry": square, "properties": {"name": "a,b"}}]}))
    assert load_regions(path).names == ("0", "a,b", "a,b (2)")


def test_the_tissue_in_a_region_is_its_share_of_the_tissue_mask_never_more_than_its_area():
    import shapely

    from cellseg.planning.regions import RegionFile
    from cellseg.results import RegionTally
    from cellseg.tissue import TissueMask

    # 16 slide px per mask pixel, the left half tissue: regions of a few mask pixels, or smaller than one
    mask = np.zeros((16, 16), bool)
    mask[:, :8] = True
    tissue = TissueMask(mask, 16.0, 16.0, "otsu")
    squares = {"on a nucleus": (40, 40, 42, 42), "small": (4, 4, 34, 34), "across the edge": (100, 20, 156, 60),
               "glass": (200, 200, 230, 230)}
    regions = RegionFile("squares", tuple(squares), tuple(shapely.box(*b) for b in squares.values())).in_pixels(
        None, 256, 256)
    table = RegionTally(regions).table(tissue, None)
    # before, a mask pixel counted whole when its centre lay in the region: 0, 1024 (of 900), 1536 (of 1120)
    assert [r["tissue_area_px"] for r in table] == [4.0, 900.0, 28 * 40, 0.0]
    assert all(r["tissue_area_px"] <= r["area_px"] for r in table)
    assert regions.tissue_area(tissue) == 4.0 + 900.0 + 28 * 40


def test_a_region_named_as_a_renamed_duplicate_keeps_its_name_and_the_duplicate_gets_another(tmp_path):
    square = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}
    path = tmp_path / "three.geojson"
    path.write_text(json.dumps([{"type": "Feature", "geometry": square, "properties": {"name": n}}
                                for n in ("Tumor", "Tumor", "Tumor (2)")]))
    # the second "Tumor" was "Tumor (2)" as well: two regions of one name in cells.csv's region column
    assert load_regions(path).names == ("Tumor", "Tumor (3)", "Tumor (2)")


def test_a_regions_file_saved_with_a_byte_order_mark_is_read(tmp_path):
    square = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}
    path = tmp_path / "notepad.geojson"
    path.write_text(json.dumps({"type": "Feature", "geometry": square, "properties": {"name": "Tumör"}},
                               ensure_ascii=False), encoding="utf-8-sig")
    assert load_regions(path).names == ("Tumör",)     # was: expected GeoJSON, found text that is not JSON
