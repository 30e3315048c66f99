"""cells.geojson: QuPath-style cell objects. Round trip (our file -> shapely: the same ids, areas and measurement
values as cells.csv), pixel-edge polygons whose areas are the pixel counts (small nuclei included), holes, cells
with their nucleusGeometry when nuclei are grown, and the gzip threshold."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest
import shapely
import tifffile

from cellseg.planning import Protocol
from cellseg.results import mask_polygon, read_cells

from ..helpers import LabelReadingDetector, count_with, random_cells


def count(tmp_path, labels, name="r", mpp=None, **protocol):
    slide = tmp_path / f"{name}.tif"
    tifffile.imwrite(slide, ((labels > 0) * 200 + 20).astype(np.uint8))
    p = Protocol(name="test", tile_size=64, halo_px=16, batch_size=3, min_area_px=1, min_tissue_fraction=0.0,
                 tissue_method="none", **protocol)
    out = tmp_path / name
    count_with(LabelReadingDetector(labels), slide, out, p, mpp=mpp)
    return out


@pytest.mark.slow
def test_random_masks_become_valid_polygons_of_their_pixels():
    rng = np.random.default_rng(0)
    for _ in range(500):
        mask = rng.random((rng.integers(1, 14), rng.integers(1, 14))) < rng.uniform(0.3, 0.9)
        if not mask.any():
            continue
        poly = mask_polygon(mask, 5, 7)
        assert poly.is_valid and poly.area == mask.sum()
        rows, cols = np.indices(mask.shape)
        # pixel (r, c) is the square [c, c+1] x [r, r+1]: its centre is inside exactly when the pixel is set
        assert (shapely.contains_xy(poly, cols.ravel() + 7.5, rows.ravel() + 5.5) == mask.ravel()).all()


def test_a_ring_keeps_its_hole():
    mask = np.ones((7, 7), bool)
    mask[2:5, 2:5] = False
    poly = mask_polygon(mask, 10, 20)
    assert len(poly.interiors) == 1 and poly.area == 40
    assert poly.bounds == (20, 10, 27, 17)          # x = column, y = row, pixel edges


@pytest.mark.slow
def test_round_trip_same_ids_areas_and_measurements(tmp_path):
    labels = random_cells(160, 192, 12, 90, seed=4)
    out = count(tmp_path, labels, mpp=0.25)
    cells = pd.read_csv(out / "cells.csv")
    collection = read_cells(out / "cells.geojson")
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert [f["id"] for f in features] == cells["cell_id"].tolist()
    props = [f["properties"] for f in features]
    assert {p["objectType"] for p in props} == {"detection"}
    assert props[0]["classification"] == {"name": "Nucleus", "color": [255, 200, 0]}
    geoms = shapely.from_geojson([json.dumps(f["geometry"]) for f in features])
    assert shapely.is_valid(geoms).all()
    areas = shapely.area(geoms)
    np.testing.assert_array_equal(areas, cells["area_px"])   # pixel edges traced: exact, small nuclei too
    for column in ("area_um2", "perimeter_px", "centroid_row_px", "eccentricity", "score", "cut_at_seam"):
        got = np.array([p["measurements"][column] for p in props], float)
        np.testing.assert_allclose(got, cells[column].astype(float), rtol=1e-5)
    # the polygon lies where the cell is: its centroid is the cell's (pixel centres at +0.5)
    c = shapely.centroid(geoms)
    np.testing.assert_allclose(shapely.get_x(c) - 0.5, cells["centroid_col_px"], rtol=1e-5)
    np.testing.assert_allclose(shapely.get_y(c) - 0.5, cells["centroid_row_px"], rtol=1e-5)


@pytest.mark.slow
def test_um_columns_are_left_out_without_a_pixel_size(tmp_path):
    labels = random_cells(96, 96, 10, 20, seed=1)
    out = count(tmp_path, labels)
    props = read_cells(out / "cells.geojson")["features"][0]["properties"]["measurements"]
    assert "area_px" in props and "area_um2" not in props        # NaN is not JSON: left out


@pytest.mark.slow
def test_grown_cells_are_qupath_cells_with_their_nucleus(tmp_path):
    labels = random_cells(128, 128, 10, 40, seed=2)
    out = count(tmp_path, labels, cell_expansion_px=4.0)
    cells = pd.read_csv(out / "cells.csv")
    features = read_cells(out / "cells.geojson")["features"]
    assert {f["properties"]["objectType"] for f in features} == {"cell"}
    nuclei = shapely.from_geojson([json.dumps(f["nucleusGeometry"]) for f in features])
    grown = shapely.from_geojson([json.dumps(f["geometry"]) for f in features])
    np.testing.assert_array_equal(shapely.area(nuclei), cells["area_px"])
    np.testing.assert_array_equal(shapely.area(grown), cells["cell_area_px"])
    assert shapely.covers(grown, nuclei).all()


@pytest.mark.slow
def test_gzipped_above_the_protocol_size(tmp_path):
    labels = random_cells(96, 96, 10, 20, seed=1)
    out = count(tmp_path, labels, geojson_gzip_above_mb=0.0)
    assert not (out / "cells.geojson").exists()
    with gzip.open(out / "cells.geojson.gz", "rt") as fh:
        assert len(json.load(fh)["features"]) == len(pd.read_csv(out / "cells.csv"))


@pytest.mark.parametrize("radius", [3, 5, 8])
def test_small_disc_nuclei_areas_agree(radius):
    from skimage.draw import disk
    mask = np.zeros((2 * radius + 3,) * 2, bool)
    mask[disk((radius + 1, radius + 1), radius + 0.5)] = True
    assert mask_polygon(mask, 0, 0).area == mask.sum()


def test_no_cells_is_an_empty_feature_collection(tmp_path):
    from cellseg.cells import nucleus_columns
    from cellseg.results import CellsGeoJsonWriter
    with CellsGeoJsonWriter(tmp_path / "cells.geojson", nucleus_columns(["gray"]), ["nucleus"]) as writer:
        writer.append(np.zeros(0, np.int64), np.zeros((0, 4), np.int64), [], np.zeros(0, np.int64),
                      {n: np.zeros(0) for n in nucleus_columns(["gray"])})
    assert read_cells(tmp_path / "cells.geojson") == {"type": "FeatureCollection", "features": []}


def _pixel_union(mask: np.ndarray, row0: int, col0: int):
    """The reference: the union of the set pixels' squares, pixel (r, c) = [c, c + 1] x [r, r + 1]."""
    rows, cols = np.nonzero(mask)
    return shapely.union_all(shapely.box(col0 + cols, row0 + rows, col0 + cols + 1, row0 + rows + 1))


def test_a_tiles_masks_at_once_are_the_union_of_their_pixels():
    """mask_geometries (all masks of a tile at once, from their pixels' cracks): each polygon is valid and is the
    union of its pixel squares, for blobs, holes, pieces, pinches and empty masks alike."""
    from skimage.draw import ellipse

    from cellseg.results.polygons import mask_geometries
    rng = np.random.default_rng(1)
    masks, boxes = [], []
    for i in range(400):
        if i % 4 == 0:
            mask = rng.random((rng.integers(0, 12), rng.integers(1, 12))) < rng.uniform(0.2, 0.9)
        else:
            mask = np.zeros((24, 24), bool)
            rr, cc = ellipse(12, 12, rng.uniform(1, 10), rng.uniform(1, 10), rotation=rng.uniform(0, np.pi))
            mask[rr, cc] = True
            mask = mask[np.ix_(mask.any(1), mask.any(0))]
        r0, c0 = rng.integers(0, 1000, 2)
        masks.append(mask)
        boxes.append((r0, c0, r0 + mask.shape[0], c0 + mask.shape[1]))
    geometries = mask_geometries(np.array(boxes), masks)
    shapes = {"Polygon": 0, "MultiPolygon": 0}
    for geometry, mask, box in zip(geometries, masks, boxes):
        if not mask.any():
            assert geometry is None
            continue
        shapes[geometry["type"]] += 1
        got = shapely.geometry.shape(geometry)
        assert got.is_valid and got.area == mask.sum()
        assert shapely.equals(got, _pixel_union(mask, int(box[0]), int(box[1])))
    assert shapes["Polygon"] > 300 and shapes["MultiPolygon"] > 10


def test_outlines_from_row_runs_are_the_traced_rings():
    """Masks that are one run per row take the row-run shortcut; their rings (and the order of every ring, the
    traced masks' among them) are exactly those of tracing every mask crack by crack."""
    from cellseg.results import polygons
    rng = np.random.default_rng(7)
    masks, boxes = [], []
    for i in range(600):
        h, w = rng.integers(0, 9, 2)
        mask = rng.random((h, w)) < rng.uniform(0.3, 1.0)
        if i % 2:       # runs per row, sometimes apart or touching only at a corner
            mask = np.zeros((h, w), bool)
            for r in range(h):
                a = rng.integers(0, max(w, 1))
                mask[r, a:rng.integers(a, w + 1)] = True
        masks.append(mask)
        boxes.append((3 * i, 7, 3 * i + h, 7 + w))
    boxes = np.array(boxes, np.int64)
    fast = polygons._rings(boxes, masks)
    with_pixels = [k for k, m in enumerate(masks) if m.any()]
    traced = polygons._traced_rings(boxes[with_pixels], [masks[k] for k in with_pixels])
    rest, _ = polygons._run_outlines(boxes, boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1],
                                     np.concatenate([m.ravel() for m in masks]),
                                     np.flatnonzero(np.concatenate([m.ravel() for m in masks])))
    assert 100 < len(with_pixels) - len(rest) < len(with_pixels)      # both ways were taken
    assert fast[0].tolist() == np.array(with_pixels)[traced[0]].tolist()
    assert fast[1] == traced[1] and fast[2].tolist() == traced[2].tolist()


def test_a_blob_ring_starts_top_left_and_runs_down_its_left_side():
    """Corners only, from the top-left corner down the left side (anticlockwise on screen, y down); a hole runs the
    other way, after its outline."""
    from cellseg.results.polygons import mask_geometry
    mask = np.array([[0, 1, 1, 0],
                     [1, 1, 1, 1],
                     [1, 0, 1, 1],
                     [1, 1, 1, 0]], bool)
    geometry = mask_geometry(mask, 10, 20)
    outline, hole = geometry["coordinates"]
    assert outline == [[21, 10], [21, 11], [20, 11], [20, 14], [23, 14], [23, 13], [24, 13], [24, 11], [23, 11],
                       [23, 10], [21, 10]]
    assert hole == [[21, 12], [22, 12], [22, 13], [21, 13], [21, 12]]


@pytest.mark.parametrize("rows, kind, parts, holes", [
    # a hole whose only way out is a diagonal: a polygon whose hole touches its outline at one corner
    (["111", "101", "110"], "Polygon", 1, 1),
    # two pixels meeting at a corner: two polygons touching there
    (["10", "01"], "MultiPolygon", 2, 0),
    # a piece inside another's hole: the hole goes with the outer piece
    (["11111", "10001", "10101", "10001", "11111"], "MultiPolygon", 2, 1),
    # two holes meeting at a corner
    (["1111", "1011", "1101", "1111"], "Polygon", 1, 2),
])
def test_pinches_and_nesting_give_valid_polygons(rows, kind, parts, holes):
    from cellseg.results.polygons import mask_geometry
    mask = np.array([[c == "1" for c in row] for row in rows])
    geometry = mask_geometry(mask, 3, 4)
    got = shapely.geometry.shape(geometry)
    assert geometry["type"] == kind and got.is_valid and got.area == mask.sum()
    assert shapely.equals(got, _pixel_union(mask, 3, 4))
    polygons = list(got.geoms) if kind == "MultiPolygon" else [got]
    assert len(polygons) == parts and sum(len(p.interiors) for p in polygons) == holes


def test_measurements_are_written_as_json_dumps_writes_them(tmp_path):
    """Rows are formatted a whole row at a time (their values' repr); rows with NaN (left out) or infinities
    (Infinity) value by value: either way each row is json.dumps's text of its finite members."""
    from cellseg.results import CellsGeoJsonWriter
    columns = {"id": "int64", "area_px": "int64", "odd%name": "float64", "edge": "bool", "mean": "float32",
               "label": "object", "area_um2": "float64", "tiny": "float64"}
    rng = np.random.default_rng(0)
    n = 120
    wide = rng.normal(size=n) * 1e6
    wide[::7], wide[::11], wide[::13] = np.nan, np.inf, -np.inf
    narrow = rng.normal(size=n).astype(np.float32)
    narrow[::5] = np.nan
    tiny = rng.normal(size=n)       # values json.dumps writes with an exponent (1e-05, 1e+16), orjson not alike
    tiny[::3], tiny[1::9], tiny[2::9] = 1e-05, 2.5e16, -3e-7
    rows = {"id": np.arange(n), "area_px": rng.integers(0, 10**6, n), "odd%name": wide, "edge": rng.random(n) > 0.5,
            "mean": narrow, "label": np.array(["x"] * n, object), "area_um2": np.full(n, np.nan), "tiny": tiny}
    numeric = ("id", "area_px", "odd%name", "edge", "mean", "area_um2", "tiny")
    for extra in ({}, {"mean_intensity_µ-DAPI": "float64"}):     # a name json.dumps escapes
        with CellsGeoJsonWriter(tmp_path / "c.geojson", {**columns, **extra}, ["nucleus"]) as writer:
            written = writer._measurements({**rows, **{name: narrow * 2 for name in extra}}, n)
        for k in range(n):
            members = {name: rows[name][k].item() for name in numeric} | {name: (narrow[k] * 2).item() for name in extra}
            members["edge"] = int(members["edge"])
            expected = json.dumps({a: v for a, v in members.items() if v == v}, separators=(",", ":"))[1:-1]
            assert written[k] == expected


def test_outlines_are_written_as_json_dumps_writes_them():
    """The outlines go through orjson for speed: the same text as json.dumps with compact separators, for polygons,
    holes and pieces, at coordinates far beyond 32 bits."""
    from cellseg.results.cells_geojson import _compact_json
    from cellseg.results.polygons import mask_geometries
    rng = np.random.default_rng(3)
    masks = [rng.random((h, w)) > 0.35 for h, w in rng.integers(1, 12, (40, 2))]
    corner = rng.integers(0, 1 << 40, (40, 2))
    boxes = np.array([(r, c, r + m.shape[0], c + m.shape[1]) for (r, c), m in zip(corner, masks)])
    geometries = [g for g in mask_geometries(boxes, masks) if g is not None]
    assert {g["type"] for g in geometries} == {"Polygon", "MultiPolygon"}
    assert any(len(p) > 1 for g in geometries if g["type"] == "Polygon" for p in [g["coordinates"]])   # a hole
    for g in geometries:
        assert _compact_json(g) == json.dumps(g, separators=(",", ":"))


@pytest.mark.parametrize("cells_expanded", [False, True])
def test_tiles_written_a_few_at_a_time_give_the_same_file(tmp_path, cells_expanded):
    """Features are made several tiles at once (batch_nuclei): the file is byte for byte the one written a tile at
    a time, whatever the batch, with empty tiles, tiles without a cell and a NaN column between them."""
    from cellseg.cells import nucleus_columns
    from cellseg.results import CellsGeoJsonWriter
    columns = nucleus_columns(["gray"])
    rng = np.random.default_rng(5)
    tiles = []
    for t in range(9):
        n = [0, 3, 17, 1, 40, 0, 8, 25, 2][t]
        masks = [rng.random((rng.integers(1, 9), rng.integers(1, 9))) < 0.7 for _ in range(n)]
        r0, c0 = rng.integers(0, 500, (2, n))
        boxes = np.stack([r0, c0, r0 + [m.shape[0] for m in masks], c0 + [m.shape[1] for m in masks]], 1) if n \
            else np.zeros((0, 4), np.int64)
        rows = {name: rng.normal(size=n) * 100 if np.dtype(dt).kind == "f" else rng.integers(0, 9, n)
                for name, dt in columns.items()}
        rows["area_um2"] = np.full(n, np.nan) if t % 2 else rows["area_um2"]
        ids = np.arange(100 * t, 100 * t + n)
        expanded = None
        if cells_expanded:
            image = np.zeros((520, 520), np.uint32)
            for k in range(0, n, 2):       # every other nucleus has a cell
                image[r0[k] % 500:r0[k] % 500 + 6, c0[k] % 500:c0[k] % 500 + 7] = ids[k]
            expanded = ((3, 4), image)
        tiles.append((ids, boxes, masks, np.ones(n, np.int64), rows, expanded))
    texts = []
    for batch in (1, 30, 10_000):
        path = tmp_path / f"b{batch}.geojson"
        with CellsGeoJsonWriter(path, columns, ["nucleus"], cells_expanded=cells_expanded,
                                batch_nuclei=batch) as writer:
            for tile in tiles:
                writer.append(*tile)
        texts.append(path.read_bytes())
    assert texts[0] == texts[1] == texts[2]
    features = json.loads(texts[0])["features"]
    assert len(features) == sum(int(np.sum([m.any() for m in t[2]])) for t in tiles)
    assert any("nucleusGeometry" in f for f in features) == cells_expanded
