"""Regions in napari, without Qt: a regions GeoJSON (QuPath's annotations, cellseg.planning.regions) as a Shapes layer, and
shapes drawn in napari back to a GeoJSON of annotations, to count in (`CountRequest.regions`) or to save.

GeoJSON coordinates are level-0 px with x = column, y = row and pixel (r, c) the square [c, c+1] x [r, r+1];
napari puts pixel (r, c)'s centre at data coordinate (r, c). So a GeoJSON point (x, y) is napari (y - 0.5,
x - 0.5), and back. napari shapes have no holes nor parts: a region's holes are drawn as shapes of their own
(grey, "hole of NAME") and each part of a MultiPolygon as a shape named NAME; back to GeoJSON, the shapes of one name
are one region again, less its holes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ._layers import LayerData

REGION_COLOR = "#ff8c00"


def regions_layer_data(path: str | Path, mpp: float | None = None, units: str = "px",
                       translate=(0.0, 0.0)) -> LayerData:
    """A regions file (cellseg.planning.regions.load_regions: named polygons, other QuPath objects left out) as Shapes.
    Regions in µm need `mpp`."""
    import shapely

    from cellseg.planning import load_regions

    regions = load_regions(path, units)
    scale = 1.0 / mpp if units == "um" and mpp else 1.0
    if units == "um" and not mpp:
        from cellseg.planning import RegionsError
        raise RegionsError(f"expected a pixel size to show regions in µm ({path}), found none")
    shapes, names, colors = [], [], []
    for name, g in zip(regions.names, regions.geometries):
        for part in shapely.get_parts(g):
            rings = [(np.asarray(part.exterior.coords), name, REGION_COLOR)]
            rings += [(np.asarray(h.coords), f"hole of {name}", "#808080") for h in part.interiors]
            for coords, label, color in rings:
                xy = coords[:-1] * scale
                shapes.append(np.stack([xy[:, 1] - 0.5, xy[:, 0] - 0.5], axis=1))
                names.append(label)
                colors.append(color)
    kwargs = {"name": f"{Path(path).stem} regions", "shape_type": "polygon", "edge_color": colors,
              "face_color": "transparent", "edge_width": 3, "translate": tuple(translate),
              "features": {"name": names}, "text": {"string": "{name}", "color": REGION_COLOR, "size": 10},
              "metadata": {"cellseg": {"kind": "regions", "path": str(path)}}}
    return shapes, kwargs, "shapes"


def shapes_to_geojson(data: list, shape_types: list[str], names: list[str] | None = None) -> dict:
    """napari shapes (vertex arrays (row, col) in the image's data coordinates, with their shape types) as a
    GeoJSON FeatureCollection of QuPath annotations, named `names` (default "region 1", ...). Shapes of one name
    are one region (a MultiPolygon when apart: a file's region drawn part by part), and shapes named "hole of NAME"
    are cut out of region NAME (regions_layer_data draws a file's holes so). Lines, paths and points enclose
    nothing and are refused; ellipses are polygons of their 4 corner vertices' ellipse."""
    import shapely

    from cellseg.errors import CellsegError

    parts: dict[str, list] = {}
    holes: dict[str, list] = {}
    for k, (vertices, kind) in enumerate(zip(data, shape_types)):
        v = np.asarray(vertices, np.float64)[:, -2:]
        if kind in ("line", "path"):
            raise CellsegError(f"expected closed shapes (rectangles, polygons, ellipses) as regions, found a {kind}")
        if kind == "ellipse":
            centre, half = v.mean(0), (v.max(0) - v.min(0)) / 2
            t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
            v = centre + np.stack([half[0] * np.sin(t), half[1] * np.cos(t)], axis=1)
        ring = shapely.Polygon(np.stack([v[:, 1] + 0.5, v[:, 0] + 0.5], axis=1))
        name = str(names[k]) if names is not None and k < len(names) and names[k] else f"region {k + 1}"
        if name.startswith("hole of "):
            holes.setdefault(name.removeprefix("hole of "), []).append(ring)
        else:
            parts.setdefault(name, []).append(ring)
    features = []
    for name, rings in parts.items():
        # one shape as drawn (load_regions repairs a self-crossing one and says so); with parts or holes, each
        # made valid first, as a union or difference of a self-crossing ring fails
        if len(rings) == 1 and name not in holes:
            region = rings[0]
        else:
            region = shapely.union_all([shapely.make_valid(r) for r in rings])
            if name in holes:
                region = region.difference(shapely.union_all([shapely.make_valid(h) for h in holes[name]]))
        features.append({"type": "Feature", "geometry": json.loads(shapely.to_geojson(region)),
                         "properties": {"objectType": "annotation", "name": name}})
    if not features:
        raise CellsegError("expected shapes to use as regions, found none")
    return {"type": "FeatureCollection", "features": features}


def save_shapes(path: str | Path, data: list, shape_types: list[str], names: list[str] | None = None) -> Path:
    """shapes_to_geojson written to `path` (what QuPath's File > Import objects reads)."""
    path = Path(path)
    path.write_text(json.dumps(shapes_to_geojson(data, shape_types, names), indent=1), encoding="utf-8")
    return path
