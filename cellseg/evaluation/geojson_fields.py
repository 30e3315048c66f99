"""Nuclei drawn or corrected in QuPath, as annotated fields: training data beside a slide (`cellseg train --data
FOLDER`, label_pairs) and ground truth to score a count on a slide with (`cellseg evaluate RESULT --gt FILE.geojson`).

In a GeoJSON file (QuPath's "Export objects as GeoJSON", or cellseg's own cells.geojson, corrected) the nuclei are its
polygons: detections, annotations, a cell's nucleusGeometry. A rectangle annotation around some of them makes a
field: the nuclei are taken as annotated in full there and nowhere else, so a slide is trained on, or scored, where
someone checked it. Without a rectangle, the whole image is the field (for training, an image of at most
WHOLE_IMAGE_PX). Polygons are rasterised by their pixel centres (pixel (row, col) is the square [col, col + 1] x
[row, row + 1]), so cellseg's own cells.geojson gives back exactly the masks it was written from.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EvaluationError
from .label_pairs import AnnotatedField, LabelPair

log = logging.getLogger(__name__)

WHOLE_IMAGE_PX = 25_000_000   # an image with a GeoJSON but no field rectangle is taken as annotated in full up to this
RECTANGLE_FILL = 0.99         # a field's polygon covers this share of its bounding box (QuPath's rectangles: all)
OUTSIZED = 25                 # a polygon holding no nucleus this many times the median nucleus' area is a region


@dataclass(frozen=True)
class GeoJsonNuclei:
    """A GeoJSON file's nuclei (shapely polygons, image px), their scores where every one has one (cellseg's
    measurements.score), and its field rectangles (row0, col0, row1, col1), unclipped."""

    path: Path
    nuclei: np.ndarray
    scores: np.ndarray | None
    windows: list[tuple[int, int, int, int]]

    @functools.cached_property
    def _tree(self):
        import shapely
        return shapely.STRtree(self.nuclei)

    def meeting(self, window: tuple[int, int, int, int]) -> np.ndarray:
        """The indices of the nuclei that meet `window`."""
        import shapely
        r0, c0, r1, c1 = window
        return np.sort(self._tree.query(shapely.box(c0, r0, c1, r1), predicate="intersects"))


def read_geojson_nuclei(path: Path, image_name: str | None = None) -> GeoJsonNuclei:
    """The nuclei and fields of a GeoJSON file; a one-line error for a polygon annotation around nuclei (a field must
    be a rectangle) or fields that overlap. A polygon far larger than the nuclei that holds none (a counting region
    left in the export) is left out, and said. Read once per version of the file: `cellseg train` checks --val,
    counts its nuclei and writes its fields from one reading (a slide's export: ~10 s per 100,000 objects)."""
    path = Path(path).resolve()
    stat = path.stat() if path.is_file() else None
    return _read_geojson_nuclei(path, image_name, stat and (stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4)
def _read_geojson_nuclei(path: Path, image_name: str | None, version) -> GeoJsonNuclei:
    import shapely

    shapes, annotation, scores = _geojson_polygons(path)
    tree = shapely.STRtree(shapely.point_on_surface(shapes))
    field = np.zeros(len(shapes), bool)
    where = image_name or path.name
    for k in np.flatnonzero(annotation):
        inside = int((tree.query(shapes[k], predicate="contains") != k).sum())
        x0, y0, x1, y1 = shapes[k].bounds
        rectangle = shapes[k].area >= RECTANGLE_FILL * (x1 - x0) * (y1 - y0)
        if inside >= 2 and not rectangle:
            raise EvaluationError(f"expected a rectangle around the annotated nuclei of {where}, found a polygon "
                                  f"holding {inside} at x {x0:.0f}, y {y0:.0f} in {path.name} (every nucleus of a "
                                  f"field is taken as drawn): draw fields with the rectangle tool")
        field[k] = inside >= 1 and rectangle    # a nucleus drawn over another (a correction) is no field
    nuclei, scores = shapes[~field], scores[~field]
    if len(nuclei) >= 5:
        areas = shapely.area(nuclei)
        outsized = areas > OUTSIZED * np.median(areas)
        if outsized.any():
            log.warning("%s: %d polygon(s) of more than %d times the median nucleus' area and holding none left out "
                        "(regions, not nuclei)", path.name, int(outsized.sum()), OUTSIZED)
            nuclei, scores = nuclei[~outsized], scores[~outsized]
    windows = []
    for k in np.flatnonzero(field):
        x0, y0, x1, y1 = shapes[k].bounds
        windows.append((int(np.floor(y0)), int(np.floor(x0)), int(np.ceil(y1)), int(np.ceil(x1))))
    for a in range(len(windows)):
        for b in range(a):
            (r0, c0, r1, c1), (s0, d0, s1, d1) = windows[a], windows[b]
            if max(r0, s0) < min(r1, s1) and max(c0, d0) < min(c1, d1):
                raise EvaluationError(f"expected the field rectangles of {path.name} apart, found two that overlap "
                                      f"(at x {max(c0, d0)}, y {max(r0, s0)}): the nuclei they share would count "
                                      f"twice")
    return GeoJsonNuclei(path, nuclei, scores if np.isfinite(scores).all() else None, windows)


def geojson_fields(pair: LabelPair) -> list[AnnotatedField]:
    """The fields of an image with a GeoJSON file: one per field rectangle (clipped to the image), else the whole
    image (at most WHOLE_IMAGE_PX), each with the nucleus polygons that meet it."""
    from ..slides import open_slide
    with open_slide(pair.image) as slide:
        height, width = slide.info.height, slide.info.width
    found = read_geojson_nuclei(pair.annotations, pair.image.name)
    if not found.windows:
        if height * width > WHOLE_IMAGE_PX:
            raise EvaluationError(f"expected rectangle annotations around the annotated nuclei of {pair.image.name} "
                                  f"({width} x {height} px, too large to be annotated in full) in "
                                  f"{pair.annotations.name}, found none")
        return [AnnotatedField(pair.name, pair.image, pair.annotations, None, tuple(found.nuclei))]
    fields = []
    for r0, c0, r1, c1 in found.windows:
        window = (max(0, r0), max(0, c0), min(height, r1), min(width, c1))
        if window[0] >= window[2] or window[1] >= window[3]:
            raise EvaluationError(f"expected the field at x {c0}, y {r0} of {pair.annotations.name} on its image "
                                  f"{pair.image.name} ({width} x {height} px), found it outside")
        r0, c0, r1, c1 = window
        fields.append(AnnotatedField(f"{pair.name} (x {c0}, y {r0}, {c1 - c0} x {r1 - r0} px)",
                                     pair.image, pair.annotations, window,
                                     tuple(found.nuclei[found.meeting(window)])))
    return fields


def field_masks(pred, gt: Path) -> tuple[dict, dict]:
    """PRED and GT as ImageMasks of each field of the GeoJSON `gt` (or, without a field rectangle, of the window
    around all the nuclei of both), for `cellseg evaluate`: PRED a GeoJSON file or a cellseg result folder (its
    cells.geojson), its nuclei meeting a field rasterised there as GT's are, with their scores where each has one."""
    pred = Path(pred)
    if pred.is_dir():
        if not (pred / "cells.geojson").is_file():
            raise EvaluationError(f"expected a GeoJSON file or a cellseg result folder holding cells.geojson as PRED "
                                  f"for the GeoJSON ground truth {gt.name}, {pred} has none (counted with --outputs "
                                  f"leaving it out?)")
        pred = pred / "cells.geojson"
    truth, found = read_geojson_nuclei(gt), read_geojson_nuclei(pred)
    windows = truth.windows or [_around(truth.nuclei, found.nuclei)]
    pred_masks, gt_masks = {}, {}
    for window in windows:
        r0, c0, r1, c1 = window
        name = f"{gt.stem} (x {c0}, y {r0}, {c1 - c0} x {r1 - r0} px)" if truth.windows else gt.stem
        gt_masks[name] = _window_masks(truth, window, name)
        pred_masks[name] = _window_masks(found, window, name)
    return pred_masks, gt_masks


def _around(*polygon_sets) -> tuple[int, int, int, int]:
    import shapely
    x0, y0, x1, y1 = shapely.total_bounds(np.concatenate(polygon_sets))
    return int(np.floor(y0)), int(np.floor(x0)), int(np.ceil(y1)), int(np.ceil(x1))


def _window_masks(source: GeoJsonNuclei, window: tuple[int, int, int, int], name: str):
    """The nuclei of `source` meeting `window` as the ImageMasks of that window (scores kept)."""
    import dataclasses

    from .image_masks import label_array_masks
    r0, c0, r1, c1 = window
    meeting = source.meeting(window)
    labels = rasterise(source.nuclei[meeting], r0, c0, (r1 - r0, c1 - c0))
    masks = label_array_masks(labels, source.path, name)
    if source.scores is None:
        return masks
    present = np.unique(labels)
    present = present[present > 0] - 1             # rasterised labels count from 1 in `meeting`'s order
    return dataclasses.replace(masks, scores=source.scores[meeting][present].astype(np.float64), has_scores=True)


def _geojson_polygons(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every polygon of a GeoJSON file (a QuPath cell's nucleusGeometry in place of the cell), repaired where
    invalid; whether each is an annotation (a field may be; detections and cells are nuclei); each one's score
    (properties.measurements.score, as cellseg writes it; NaN where it has none)."""
    import orjson  # a slide's export holds hundreds of thousands of objects: 100,000 of cellseg's in 150 MB
    import shapely

    from ..planning.regions import RegionsError, geojson_features, object_type
    if not path.is_file():
        raise EvaluationError(f"expected a GeoJSON file, found no file {path}")
    try:
        data = orjson.loads(path.read_bytes().removeprefix(b"\xef\xbb\xbf"))     # Windows tools' byte order mark
        features = geojson_features(data, path)
    except (orjson.JSONDecodeError, RegionsError) as e:
        raise EvaluationError(f"expected GeoJSON objects in {path}, found {e}") from None
    texts, annotation, scores = [], [], []
    for feature in features:
        props = feature.get("properties") if isinstance(feature.get("properties"), dict) else {}
        geometry = feature.get("nucleusGeometry") or feature.get("geometry")
        if not isinstance(geometry, dict) or geometry.get("type") not in ("Polygon", "MultiPolygon"):
            continue    # points, lines: not outlines
        texts.append(orjson.dumps(geometry).decode())
        annotation.append(object_type(feature, props) in ("annotation", "PathAnnotationObject"))
        scores.append(_score(props.get("measurements")))
    try:
        shapes = shapely.from_geojson(np.asarray(texts, dtype=object))
    except Exception as e:  # noqa: BLE001 (GEOS's own message says what is wrong with the coordinates)
        raise EvaluationError(f"expected polygons in {path}, found {e}") from None
    for k in np.flatnonzero(~shapely.is_valid(shapes)):
        parts = shapely.get_parts(shapely.make_valid(shapes[k]))
        shapes[k] = shapely.union_all(parts[shapely.get_dimensions(parts) == 2])
    kept = ~shapely.is_empty(shapes) & (shapely.area(shapes) > 0)
    shapes, annotation, scores = shapes[kept], np.asarray(annotation, bool)[kept], np.asarray(scores)[kept]
    if not len(shapes):
        raise EvaluationError(f"expected nucleus polygons in {path}, found none ({len(features)} feature(s))")
    return shapes, annotation, scores


def _score(measurements) -> float:
    """A feature's "score" measurement: QuPath 0.4+ writes measurements as {name: value}, 0.3 as [{name, value}]."""
    if isinstance(measurements, list):
        measurements = {m.get("name"): m.get("value") for m in measurements if isinstance(m, dict)}
    score = measurements.get("score") if isinstance(measurements, dict) else None
    return float(score) if isinstance(score, (int, float)) and np.isfinite(score) else np.nan


def rasterise(polygons, row0: int, col0: int, shape: tuple[int, int]) -> np.ndarray:
    """Instance labels (1, 2, ... in the order given) of polygons in image px on the window of `shape` at (row0,
    col0): a pixel is a polygon's when its centre is inside it (the first polygon's, where two overlap)."""
    import shapely
    labels = np.zeros(shape, np.int32)
    for k, g in enumerate(polygons, start=1):
        x0, y0, x1, y1 = g.bounds
        r0, r1 = max(row0, int(np.floor(y0))), min(row0 + shape[0], int(np.ceil(y1)))
        c0, c1 = max(col0, int(np.floor(x0))), min(col0 + shape[1], int(np.ceil(x1)))
        if r0 >= r1 or c0 >= c1:
            continue
        rows, cols = np.mgrid[r0:r1, c0:c1]
        inside = shapely.contains_xy(g, cols + 0.5, rows + 0.5)
        window = labels[r0 - row0:r1 - row0, c0 - col0:c1 - col0]
        window[inside & (window == 0)] = k
    return labels
