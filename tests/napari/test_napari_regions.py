"""Regions in the napari plugin, without Qt: a QuPath annotations file opens as Shapes on the slide's pixels,
shapes drawn in napari go back to GeoJSON regions (the same polygons), and the widget's count path
(_run.run_count) counts inside them like `cellseg count --regions`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely

from cellseg.errors import CellsegError
from cellseg.planning import load_regions
from cellseg_napari import _regions, _run
from cellseg_napari._reader import get_reader

from ..helpers import DATA

QUPATH = DATA / "qupath_annotations.geojson"


def test_a_qupath_annotations_file_opens_as_shapes_on_the_pixels():
    read = get_reader(str(QUPATH))
    assert read is not None
    [(data, kwargs, kind)] = read(str(QUPATH))
    assert kind == "shapes"
    assert kwargs["features"]["name"] == ["Tumor core", "Stroma", "hole of Stroma"]   # the detection left out
    # GeoJSON x = 8 (pixel edge) is napari column 7.5 (pixel centres at integers)
    np.testing.assert_allclose(data[0].min(0), [7.5, 7.5])
    np.testing.assert_allclose(data[0].max(0), [247.5, 119.5])


def test_drawn_shapes_round_trip_to_the_same_regions(tmp_path):
    [(data, kwargs, _)] = get_reader(str(QUPATH))(str(QUPATH))
    names = kwargs["features"]["name"][:1]
    path = _regions.save_shapes(tmp_path / "drawn.geojson", data[:1], ["polygon"], names)
    again = load_regions(path)
    original = load_regions(QUPATH)
    assert again.names == ("Tumor core",)
    assert shapely.equals(again.geometries[0], original.geometries[0])
    # an ellipse is a region too; a line is refused
    ellipse = _regions.shapes_to_geojson([np.array([[0, 0], [0, 20], [10, 20], [10, 0]])], ["ellipse"])
    g = shapely.from_geojson(json.dumps(ellipse["features"][0]["geometry"]))
    assert g.area == pytest.approx(np.pi * 5 * 10, rel=0.01)
    with pytest.raises(CellsegError, match="closed shapes"):
        _regions.shapes_to_geojson([np.array([[0, 0], [5, 5]])], ["line"])


def test_a_files_regions_with_holes_and_parts_come_back_whole_from_the_layer(tmp_path):
    # what the widget counts in: the layer's every shape (holes and parts drawn as shapes of their own) to GeoJSON
    square = [[0, 0], [320, 0], [320, 320], [0, 320], [0, 0]]
    hole = [[100, 100], [200, 100], [200, 200], [100, 200], [100, 100]]
    path = tmp_path / "regions.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"objectType": "annotation", "name": "Tumor"},
         "geometry": {"type": "Polygon", "coordinates": [square, hole]}},
        {"type": "Feature", "properties": {"objectType": "annotation", "name": "Stroma"},
         "geometry": {"type": "MultiPolygon", "coordinates": [[[[400, 0], [560, 0], [560, 160], [400, 160], [400, 0]]],
                                                              [[[400, 200], [500, 200], [500, 410], [400, 410],
                                                                [400, 200]]]]}}]}))
    data, kwargs, _ = _regions.regions_layer_data(path)
    assert kwargs["features"]["name"] == ["Tumor", "hole of Tumor", "Stroma", "Stroma"]
    back = tmp_path / "back.geojson"
    back.write_text(json.dumps(_regions.shapes_to_geojson(data, ["polygon"] * len(data), kwargs["features"]["name"])))
    again, original = load_regions(back), load_regions(path)
    assert again.names == original.names == ("Tumor", "Stroma")
    assert [g.area for g in again.geometries] == [320 * 320 - 100 * 100, 160 * 160 + 100 * 210]
    assert all(shapely.equals(a, b) for a, b in zip(again.geometries, original.geometries))


def test_regions_of_a_counted_box_are_shifted_onto_it(tmp_path):
    from cellseg.geometry import Box
    geojson = _regions.shapes_to_geojson([np.array([[100, 200], [100, 260], [150, 260], [150, 200]])],
                                         ["rectangle"], ["r"])
    regions = _run.request_regions(geojson, tmp_path, Box(90, 180, 190, 300))
    assert regions.geometries[0].bounds == pytest.approx((20.5, 10.5, 80.5, 60.5))


@pytest.mark.slow
def test_run_count_counts_inside_drawn_regions(tmp_path, tiny_bundle):
    image = DATA / "dsb_fluo.png"
    geojson = _regions.shapes_to_geojson([np.array([[0, 0], [0, 127], [255, 127], [255, 0]])], ["rectangle"],
                                         ["left"])
    out = _run.run_count(_run.CountRequest(slide=Path(image), model=str(tiny_bundle), device="cpu",
                                           output=tmp_path / "r", score_threshold=0.0, regions=geojson))
    cells = pd.read_csv(out / "cells.csv", keep_default_na=False)
    assert (out / "regions.csv").is_file()
    assert len(cells) > 0 and set(cells["region"]) == {"left"}
    assert (cells["centroid_col_px"] < 128).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["regions"][0]["cells"] == len(cells)
