"""Counting inside annotated regions (`--regions FILE`): QuPath's exported annotations, or any GIS tool's GeoJSON.

    load_regions(path, units)  -> RegionFile: the named polygons as the file gives them (checked, repaired)
    RegionFile.in_pixels(...)  -> Regions: level-0 px (x = column, y = row, pixel (r, c) = [c, c+1] x [r, r+1]),
                                  clipped to the slide; what the plan (which tiles are near a region) and the count use

A tile is analysed only when its core comes within 2 halos and the seam band of a region (plan.region_tiles); a
tile farther from every region is never read. The seam rule decides, as always, which tile keeps a nucleus; the
regions then filter the final nuclei by centroid (pipeline.NucleusEmitter): a nucleus belongs to every region whose
polygon contains its centroid (the centre of its pixels, shapely.contains_xy). cells.csv's "region" column names them,
joined by ";" when regions overlap; regions.csv and summary.json's "regions" give per region its area, the tissue
inside it, the cells and densities (results/region_table.py: the figures are the result's, the regions the plan's).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CellsegError

log = logging.getLogger(__name__)

SEPARATOR = ";"


class RegionsError(CellsegError):
    """A regions file that cannot be used: not GeoJSON, no polygon, or no region on the slide."""


@dataclass(frozen=True)
class RegionFile:
    """The regions of a file: names and shapely (Multi)Polygons in the file's units ("px" or "um")."""

    path: str
    names: tuple[str, ...]
    geometries: tuple
    units: str = "px"

    def in_pixels(self, mpp: float | None, height: int, width: int, note: bool = True) -> Regions:
        """The regions in level-0 px, clipped to the slide (height x width). µm need the pixel size; a region
        wholly outside the slide is left out with a logged note (note=False: a check before the count, which
        notes it itself); none left is an error."""
        import shapely
        from shapely import affinity

        if self.units == "um":
            if not mpp:
                raise RegionsError(f"expected a pixel size for regions in µm ({self.path}), found none (give --mpp)")
            geoms = [affinity.scale(g, 1 / mpp, 1 / mpp, origin=(0, 0)) for g in self.geometries]
        else:
            geoms = list(self.geometries)
        slide = shapely.box(0, 0, width, height)
        names, kept = [], []
        for name, g in zip(self.names, geoms):
            inside = shapely.intersection(g, slide)
            if inside.is_empty or inside.area <= 0:
                if note:
                    log.warning("region %r (%s) lies outside the slide (%d x %d px): left out", name, self.path,
                                width, height)
                continue
            names.append(name)
            kept.append(inside)
        if not kept:
            raise RegionsError(f"expected regions on the slide ({width} x {height} px, {self.units}), found "
                               f"{len(self.names)} region(s) in {self.path} all outside it")
        return Regions(tuple(names), tuple(kept))

    def digest(self) -> dict:
        """What a count's cells depend on (journal fingerprints): the regions as WKB hex, their names, units."""
        import shapely
        return {"names": list(self.names), "units": self.units,
                "wkb": [shapely.to_wkb(g, hex=True) for g in self.geometries]}


@dataclass(frozen=True)
class Regions:
    """Named regions in level-0 px (x = column, y = row), on the slide."""

    names: tuple[str, ...]
    geometries: tuple

    def __len__(self) -> int:
        return len(self.names)

    @functools.cached_property
    def union(self):
        """Every region as one geometry, overlaps once (prepared for repeated tests): made once, not per call (a
        slide's tiles ask meets() batch after batch, with thousands of regions)."""
        import shapely

        union = shapely.union_all(list(self.geometries))
        shapely.prepare(union)
        return union

    def meets(self, boxes: np.ndarray) -> np.ndarray:
        """(N,) bool: box (row0, col0, row1, col1) shares area with some region."""
        import shapely

        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        rects = shapely.box(boxes[:, 1], boxes[:, 0], boxes[:, 3], boxes[:, 2])
        union = self.union
        hit = shapely.intersects(union, rects)
        # Touching along an edge only is no area: such a tile holds no centroid of the region.
        touch = hit & shapely.touches(union, rects)
        return hit & ~touch

    def membership(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(N, R) bool: the pixel centre (row, col) + 0.5 lies inside region r (centroids are pixel indices)."""
        import shapely

        x, y = np.asarray(cols, np.float64) + 0.5, np.asarray(rows, np.float64) + 0.5
        out = np.zeros((len(x), len(self)), bool)
        for r, g in enumerate(self.geometries):
            shapely.prepare(g)
            out[:, r] = shapely.contains_xy(g, x, y)
        return out

    def labels(self, member: np.ndarray) -> np.ndarray:
        """cells.csv's "region" column: each row's region names joined by ";" (object array of str)."""
        names = np.array(self.names, dtype=object)
        return np.array([SEPARATOR.join(names[m]) for m in member], dtype=object)

    def covers_grid(self, shape: tuple[int, int], row_factor: float, col_factor: float) -> np.ndarray:
        """(h, w) bool: pixel (i, j) of a grid over the slide (row_factor, col_factor slide px per pixel) has its
        centre inside some region (tissue_mask.png's tissue analysed). One pass over the grid for all the regions:
        a mask per region would hold regions x grid pixels (thousands of tiny regions on a slide's 4096² grid)."""
        import shapely

        i, j = np.indices(shape)
        return shapely.contains_xy(self.union, (j.ravel() + 0.5) * col_factor,
                                   (i.ravel() + 0.5) * row_factor).reshape(shape)

    def tissue_areas(self, tissue) -> np.ndarray:
        """(R,) float: the tissue inside each region (level-0 px), tissue: a tissue.TissueMask."""
        return np.array([tissue_in(g, tissue) for g in self.geometries], np.float64)

    def tissue_area(self, tissue) -> float:
        """The tissue inside any region (level-0 px), overlaps once."""
        return tissue_in(self.union, tissue)

    def to_json(self) -> str:
        """A GeoJSON FeatureCollection in level-0 px (journaled with the plan, read back by from_json)."""
        import shapely
        features = [{"type": "Feature", "geometry": json.loads(shapely.to_geojson(g)),
                     "properties": {"objectType": "annotation", "name": n}}
                    for n, g in zip(self.names, self.geometries)]
        return json.dumps({"type": "FeatureCollection", "features": features})

    @classmethod
    def from_json(cls, text: str) -> Regions:
        import shapely
        features = json.loads(text)["features"]
        return cls(tuple(f["properties"]["name"] for f in features),
                   tuple(shapely.from_geojson(json.dumps(f["geometry"])) for f in features))


def tissue_in(geometry, tissue) -> float:
    """The area (level-0 px) `geometry` shares with the tissue of `tissue` (a tissue.TissueMask: a grid of pixels
    row_factor x col_factor slide px, ~8 µm): mask pixels the outline crosses count by the share inside it, the
    others wholly or not at all. Counting a mask pixel by its centre alone gave a region of a few mask pixels more
    tissue than its own area, or none under its nuclei."""
    import shapely

    mask, rf, cf = tissue.mask, tissue.row_factor, tissue.col_factor
    if geometry.is_empty:
        return 0.0
    x0, y0, x1, y1 = geometry.bounds
    i0, j0 = max(int(y0 // rf), 0), max(int(x0 // cf), 0)
    i1, j1 = min(math.ceil(y1 / rf), mask.shape[0]), min(math.ceil(x1 / cf), mask.shape[1])
    sub = mask[i0:i1, j0:j1]
    if not sub.any():
        return 0.0
    # The mask pixels the outline passes through: points along it at most half a mask pixel apart, each marking its
    # pixel and the 8 around (the outline between two points stays within them).
    xy = shapely.get_coordinates(shapely.segmentize(geometry, min(rf, cf) / 2))
    crossed = np.zeros((sub.shape[0] + 2, sub.shape[1] + 2), bool)
    crossed[np.clip((xy[:, 1] // rf).astype(np.int64) - i0, -1, sub.shape[0]) + 1,
            np.clip((xy[:, 0] // cf).astype(np.int64) - j0, -1, sub.shape[1]) + 1] = True
    near = np.zeros_like(crossed)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            near[1:-1, 1:-1] |= crossed[1 + di:crossed.shape[0] - 1 + di, 1 + dj:crossed.shape[1] - 1 + dj]
    near = near[1:-1, 1:-1]
    ci, cj = np.nonzero(sub & ~near)          # wholly inside or wholly outside: the centre says which
    whole = np.count_nonzero(shapely.contains_xy(geometry, (j0 + cj + 0.5) * cf, (i0 + ci + 0.5) * rf))
    ei, ej = np.nonzero(sub & near)
    boxes = shapely.box((j0 + ej) * cf, (i0 + ei) * rf, (j0 + ej + 1) * cf, (i0 + ei + 1) * rf)
    return float(whole * rf * cf + shapely.area(shapely.intersection(boxes, geometry)).sum())


# --------------------------------------------------------------------------- reading a file

def load_regions(path: str | Path, units: str = "px") -> RegionFile:
    """The polygons of a GeoJSON file (a FeatureCollection, a Feature, a list of Features as QuPath's older
    exports, or a bare geometry), named by properties.name, else properties.classification.name, else the feature's
    index. QuPath objects other than annotations (detections, cells, tiles) are left out with a logged note;
    self-intersecting polygons are repaired (shapely.make_valid) with a note naming the feature."""
    import shapely

    path = Path(path)
    if units not in ("px", "um"):
        raise RegionsError(f"expected regions units px or um, found {units!r}")
    try:
        # utf-8-sig: Windows Notepad (before 1903) and PowerShell 5 save UTF-8 with a byte order mark
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise RegionsError(f"expected a regions GeoJSON file, found no file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RegionsError(f"expected GeoJSON in {path}, found text that is not JSON ({e})") from None
    features = geojson_features(data, path)
    names, geoms, skipped = [], [], {}
    for index, feature in enumerate(features):
        props = feature.get("properties") or {}
        if not isinstance(props, dict):
            raise RegionsError(f"expected the properties of feature {index} of {path} to be an object, found "
                               f"{type(props).__name__} {str(props)[:40]}")
        kind = object_type(feature, props)
        if kind not in ("annotation", "PathAnnotationObject"):
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        geometry = feature.get("geometry")
        if not isinstance(geometry, dict) or geometry.get("type") not in ("Polygon", "MultiPolygon"):
            kind = geometry.get("type") if isinstance(geometry, dict) else type(geometry).__name__
            skipped[f"{kind} geometry"] = skipped.get(f"{kind} geometry", 0) + 1
            continue
        name = _name(props, index)
        try:
            g = shapely.from_geojson(json.dumps(geometry))
        except Exception as e:          # GEOS's own message says what is wrong with the coordinates
            raise RegionsError(f"expected a polygon in feature {name!r} of {path}, found {e}") from None
        if not g.is_valid:
            reason = shapely.is_valid_reason(g)
            g = shapely.make_valid(g)
            g = shapely.union_all(shapely.get_parts(g)[shapely.get_dimensions(shapely.get_parts(g)) == 2])
            log.warning("region %r of %s was not a valid polygon (%s): repaired with shapely.make_valid",
                        name, path, reason)
        if g.is_empty or g.area <= 0:
            log.warning("region %r of %s has no area: left out", name, path)
            continue
        names.append(name)
        geoms.append(g)
    for kind, n in skipped.items():
        log.info("regions: %d %s object(s) in %s left out (only annotations' polygons are regions)", n, kind, path)
    if not geoms:
        raise RegionsError(f"expected Polygon or MultiPolygon annotations in {path}, found none "
                           f"({len(features)} feature(s))")
    return RegionFile(str(path), tuple(_unique(names)), tuple(geoms), units)


def object_type(feature: dict, props: dict) -> str:
    """The QuPath object type of a feature, read as QuPath reads it: properties.objectType, its older spelling
    object_type, or (QuPath 0.2's exports) the feature's id, e.g. PathDetectionObject; an annotation when none."""
    kind = props.get("objectType", props.get("object_type"))
    legacy = feature.get("id")
    if kind is None and isinstance(legacy, str) and legacy.startswith("Path") and legacy.endswith("Object"):
        kind = legacy
    return kind or "annotation"


def geojson_features(data, path: Path) -> list[dict]:
    if isinstance(data, list):           # QuPath before 0.4 exported a bare list of features
        return [f for f in data if isinstance(f, dict)]
    if not isinstance(data, dict):
        raise RegionsError(f"expected a GeoJSON object in {path}, found {type(data).__name__}")
    kind = data.get("type")
    if kind == "FeatureCollection":
        return [f for f in data.get("features") or [] if isinstance(f, dict)]
    if kind == "Feature":
        return [data]
    if kind in ("Polygon", "MultiPolygon"):
        return [{"type": "Feature", "geometry": data, "properties": {}}]
    raise RegionsError(f"expected a GeoJSON FeatureCollection, Feature or polygon in {path}, found type {kind!r}")


def _name(props: dict, index: int) -> str:
    """properties.name, else the classification's name (QuPath's {"name": ...}, or a plain string as other tools
    write it), else the feature's index; a name of 0 is a name."""
    def given(value) -> str | None:
        return str(value).strip() or None if value is not None and not isinstance(value, (dict, list)) else None
    classification = props.get("classification")
    return (given(props.get("name"))
            or given(classification.get("name") if isinstance(classification, dict) else classification)
            or str(index))


def _unique(names: list[str]) -> list[str]:
    """Two regions of one name (two "Tumor" annotations) stay apart: "Tumor", "Tumor (2)"; ";" is the column's
    separator, so it cannot be in a name."""
    names = [n.replace(SEPARATOR, ",") for n in names]
    taken, seen = set(names), {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        if seen[n] == 1:
            out.append(n)
            continue
        k = seen[n]
        while f"{n} ({k})" in taken:     # a region of the file may be called "Tumor (2)" already
            k += 1
        seen[n] = k
        taken.add(f"{n} ({k})")
        out.append(f"{n} ({k})")
    return out
