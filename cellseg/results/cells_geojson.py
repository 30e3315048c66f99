"""cells.geojson: every nucleus (or the cell grown from it) as a GeoJSON Feature the way QuPath (0.4+) writes its
own objects, streamed.

QuPath reads it with File > Import objects; shapely, geopandas and any GIS tool read it as plain GeoJSON.

    {"type": "Feature", "id": 17,                       # cell_id (QuPath keeps only UUIDs: it makes its own)
     "geometry": {"type": "Polygon", ...},              # the nucleus, or the cell when nuclei are grown into cells
     "nucleusGeometry": {"type": "Polygon", ...},       # only for cells: their nucleus (QuPath's cell objects)
     "properties": {"objectType": "detection" | "cell",
                    "classification": {"name": "Nucleus", "color": [r, g, b]},
                    "measurements": {"area_px": 80, "area_um2": 5.0, ...}}}   # cells.csv's numeric columns

Coordinates are level-0 pixels with x = column, y = row (QuPath's convention), and polygons trace pixel *edges*:
pixel (row, col) is the square [col, col + 1] x [row, row + 1], so a polygon's area is exactly the mask's pixel count
(a contour through pixel centres would lose about half a pixel along the whole outline: ~5 % of a 10 px nucleus).
Holes are kept. The file is written as cells.csv is, tile by tile: memory holds one tile's features at a time.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path
from typing import IO

import numpy as np

log = logging.getLogger(__name__)

NUCLEUS_COLOR = (255, 200, 0)     # the overlay's yellow outline
CELL_COLOR = (0, 200, 255)        # the overlay's cyan outline


def mask_polygon(mask: np.ndarray, row0: int, col0: int):
    """A shapely Polygon (or MultiPolygon) whose area is the pixel count of the bool `mask` placed at (row0, col0):
    pixel edges traced, holes kept, valid. x = column, y = row in level-0 px. None for an empty mask."""
    import shapely

    geometry = mask_geometry(mask, row0, col0)
    return None if geometry is None else shapely.geometry.shape(geometry)


def mask_geometry(mask: np.ndarray, row0: int, col0: int) -> dict | None:
    """mask_polygon's geometry as a GeoJSON dict (integer pixel-corner coordinates), built without shapely for the
    common mask (one outline, its holes, no ring touching itself)."""
    import shapely
    from skimage.measure import find_contours

    mask = np.asarray(mask, bool)
    ring = _run_ring(mask)
    if ring is not None:
        return {"type": "Polygon", "coordinates": [(ring + np.array([col0, row0])).tolist()]}
    padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), np.uint8)     # np.pad costs ~20x more
    padded[1:-1, 1:-1] = mask
    rings = [r for r in map(_edge_ring, find_contours(padded, 0.5)) if r is not None]
    if not rings:
        return None
    # find_contours sits its 0.5 level halfway between pixel centres: on pixel edges. Outer rings and holes wind
    # in opposite senses; the largest ring is an outer one.
    signed = np.array([_signed_area(r) for r in rings])
    outer_sign = np.sign(signed[np.argmax(np.abs(signed))])
    offset = np.array([col0 - 1, row0 - 1], np.int64)       # the padding, then the box's place on the slide
    outers = [r[:, ::-1] + offset for r, a in zip(rings, signed) if np.sign(a) == outer_sign]
    holes = [r[:, ::-1] + offset for r, a in zip(rings, signed) if np.sign(a) != outer_sign]
    if len(outers) == 1 and not any(_touches_itself(r) for r in outers + holes):
        return {"type": "Polygon", "coordinates": [r.tolist() for r in outers + holes]}
    if len(outers) == 1:
        geometry = shapely.Polygon(outers[0], holes)
    elif not holes:
        geometry = shapely.MultiPolygon([shapely.Polygon(o) for o in outers])
    else:
        # Parts, holes, islands in holes: the rings never cross, so the mask is their even-odd fill, and which
        # hole lies in which part is GEOS's job.
        geometry = shapely.Polygon(outers[0])
        for ring in outers[1:] + holes:
            geometry = shapely.symmetric_difference(geometry, shapely.Polygon(ring))
    if not geometry.is_valid:
        # A ring that touches itself at a pixel corner (a hole meeting the outline diagonally): same area, split.
        geometry = shapely.make_valid(geometry)
    return json.loads(shapely.to_geojson(geometry))


def _run_ring(mask: np.ndarray) -> np.ndarray | None:
    """The pixel-edge ring (x, y) of a mask whose every row is one run of pixels overlapping the next row's (most
    nuclei: convex-ish blobs), straight from the runs: down the left ends, up the right ends, ~20x quicker than
    tracing contours. None for any other mask (holes, several pieces, a row of two runs)."""
    h = mask.shape[0]
    if h == 0:
        return None
    step = np.diff(mask.view(np.int8), axis=1, prepend=0, append=0)
    starts, ends = step == 1, step == -1
    if not (np.count_nonzero(starts, axis=1) == 1).all():
        return None
    left, right = starts.argmax(1), ends.argmax(1)        # run [left, right) of each row
    if h > 1 and not ((left[1:] < right[:-1]) & (left[:-1] < right[1:])).all():
        return None                                       # rows meeting only at a corner: two pieces
    rows = np.arange(h)
    down = np.stack([np.repeat(left, 2), np.stack([rows, rows + 1], 1).ravel()], 1)
    up = np.stack([np.repeat(right[::-1], 2), np.stack([rows[::-1] + 1, rows[::-1]], 1).ravel()], 1)
    ring = np.vstack([down, up])
    # Keep the corners only: drop repeated points, then points in the middle of a straight edge.
    ring = ring[np.any(ring != np.roll(ring, 1, axis=0), axis=1)]
    before, after = np.roll(ring, 1, axis=0), np.roll(ring, -1, axis=0)
    straight = ((before[:, 0] == ring[:, 0]) & (after[:, 0] == ring[:, 0])) | (
        (before[:, 1] == ring[:, 1]) & (after[:, 1] == ring[:, 1]))
    ring = ring[~straight]
    return np.vstack([ring, ring[:1]])


def blob_geometries(boxes: np.ndarray, masks: list[np.ndarray]) -> list[dict | None]:
    """_run_ring for all of a tile's masks at once (whole-array numpy over their row runs, maskrows.MaskRows, as
    merge and measure do): each blob's GeoJSON Polygon in slide px, None for a mask that is not a blob (its
    outline is traced by mask_geometry). The same polygons as _run_ring, without ~15 numpy calls per mask."""
    from ..geometry import MaskRows

    out: list[dict | None] = [None] * len(masks)
    rows = MaskRows.of(boxes, masks)
    if not len(rows.mask):
        return out
    mask, y = rows.mask, rows.y
    left, last = rows.ends()
    right = last + 1                                       # run [left, right)
    first = np.r_[True, mask[1:] != mask[:-1]]             # a mask's first row
    bad = rows.count != right - left                       # a row of more than one run
    joined = ~first[1:]                                    # row k + 1 continues row k's mask
    gap = joined & ((y[1:] != y[:-1] + 1) | (left[1:] >= right[:-1]) | (left[:-1] >= right[1:]))
    bad[1:] |= gap
    starts = np.flatnonzero(first)
    blobs = np.bincount(mask, weights=bad, minlength=len(masks)) == 0
    blobs[np.setdiff1d(np.arange(len(masks)), mask[starts])] = False      # empty masks
    keep = blobs[mask]
    if not keep.any():
        return out
    mask, y, left, right = mask[keep], y[keep], left[keep], right[keep]
    first = np.r_[True, mask[1:] != mask[:-1]]
    starts = np.flatnonzero(first)
    h = np.diff(np.r_[starts, len(mask)])
    index_in = np.arange(len(mask)) - np.repeat(starts, h)          # row k's place in its mask
    hk = np.repeat(h, h)
    base = 4 * np.repeat(starts, h)                                # each mask's first point
    points = np.empty((4 * len(mask), 2), np.int64)
    down = base + 2 * index_in
    up = base + 2 * hk + 2 * (hk - 1 - index_in)
    points[down] = np.stack([left, y], 1)
    points[down + 1] = np.stack([left, y + 1], 1)
    points[up] = np.stack([right, y + 1], 1)
    points[up + 1] = np.stack([right, y], 1)
    group = np.repeat(np.arange(len(starts)), 4 * h)
    points, group = _drop_cyclic(points, group, straight=False)
    points, group = _drop_cyclic(points, group, straight=True)
    bounds = np.flatnonzero(np.r_[True, group[1:] != group[:-1], True])
    mask_of_ring = mask[starts]
    for g, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        ring = points[a:b].tolist()
        ring.append(ring[0])
        out[int(mask_of_ring[g])] = {"type": "Polygon", "coordinates": [ring]}
    return out


def _drop_cyclic(points: np.ndarray, group: np.ndarray, straight: bool) -> tuple[np.ndarray, np.ndarray]:
    """Drop, within each group's closed ring, points equal to the one before (straight=False) or lying midway on a
    straight edge (straight=True)."""
    n = len(points)
    first = np.r_[True, group[1:] != group[:-1]]
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], n] - 1
    prev = np.arange(n) - 1
    prev[starts] = ends
    if not straight:
        drop = np.all(points == points[prev], axis=1)
    else:
        nxt = np.arange(n) + 1
        nxt[ends] = starts
        before, after = points[prev], points[nxt]
        drop = (((before[:, 0] == points[:, 0]) & (after[:, 0] == points[:, 0]))
                | ((before[:, 1] == points[:, 1]) & (after[:, 1] == points[:, 1])))
    return points[~drop], group[~drop]


def _touches_itself(ring: np.ndarray) -> bool:
    """A ring through one pixel corner twice (diagonal pixels): not a valid GeoJSON/shapely ring."""
    return len(np.unique(ring[:-1], axis=0)) < len(ring) - 1


def _edge_ring(contour: np.ndarray) -> np.ndarray | None:
    """The pixel-corner ring of a closed find_contours contour (row, col at pixel-edge midpoints): each diagonal step
    of the contour cuts a pixel corner, which is the centre of the marching-squares cell it crosses; the ring is
    those corners (the midpoints between them are collinear and dropped). Coordinates: padded-array edge frame."""
    step = np.diff(contour, axis=0)
    diagonal = (np.abs(step[:, 0]) > 0.25) & (np.abs(step[:, 1]) > 0.25)
    if not diagonal.any():
        return None
    low = np.minimum(contour[:-1], contour[1:])[diagonal]
    # Cell centre in pixel-centre coordinates is floor(low) + 0.5; in edge coordinates (+0.5) an integer.
    corners = (np.floor(low + 1e-9) + 1.0).astype(np.int64)
    return np.vstack([corners, corners[:1]])


def _signed_area(ring: np.ndarray) -> float:
    y, x = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))   # exact: integer coordinates


def label_masks(labels: np.ndarray, ids: np.ndarray) -> list[tuple[np.ndarray, int, int] | None]:
    """Each id's mask in the label image `labels`, cropped to its box: (mask, row0, col0) in `labels`' frame, None
    for an id not painted. One pass over the image (scipy.ndimage.find_objects on ids renumbered 1..n)."""
    from scipy import ndimage

    ids = np.asarray(ids, np.int64)
    order = np.argsort(ids)
    flat = labels.reshape(-1).astype(np.int64)
    where = np.searchsorted(ids[order], flat)
    where = np.minimum(where, len(ids) - 1) if len(ids) else where
    hit = (flat > 0) & (ids[order][where] == flat) if len(ids) else np.zeros(flat.shape, bool)
    rank = np.zeros(flat.shape, np.int64)
    rank[hit] = order[where[hit]] + 1
    rank = rank.reshape(labels.shape)
    out: list[tuple[np.ndarray, int, int] | None] = [None] * len(ids)
    for k, sl in enumerate(ndimage.find_objects(rank, max_label=len(ids))):
        if sl is not None:
            out[k] = (rank[sl] == k + 1, sl[0].start, sl[1].start)
    return out


class CellsGeoJsonWriter:
    """Streams cells.geojson: one Feature per nucleus (or the cell grown from it), appended per tile (`append`);
    `close` ends the collection and, when the file grew beyond `gzip_above_bytes` (None: never), replaces it by
    cells.geojson.gz.

    columns: cells.csv's columns (name -> dtype); the numeric ones (bools as 0/1) become each Feature's
    measurements, NaN (a µm column without a pixel size) left out. cells_expanded: features are QuPath cells
    (geometry = the cell, nucleusGeometry = the nucleus) instead of detections.
    """

    def __init__(self, path: Path, columns: dict[str, str], class_names: list[str], cells_expanded: bool = False,
                 gzip_above_bytes: int | None = None):
        self.path = Path(path)
        self.gzip_above_bytes = gzip_above_bytes
        self.cells_expanded = cells_expanded
        self.numeric = [n for n, dt in columns.items() if np.dtype(dt).kind in "iufb"]
        color = CELL_COLOR if cells_expanded else NUCLEUS_COLOR
        self.classes = [{"name": _qupath_class(n), "color": list(color)} for n in class_names]
        self.features = 0
        self.written_path: Path | None = None
        self._fh: IO[str] | None = open(self.path, "w", encoding="utf-8")
        self._fh.write('{"type": "FeatureCollection", "features": [\n')

    def append(self, ids: np.ndarray, boxes: np.ndarray, masks: list[np.ndarray], class_ids: np.ndarray,
               rows: dict[str, np.ndarray], expanded: tuple[tuple[int, int], np.ndarray] | None = None) -> None:
        """One tile's nuclei: ids, boxes (row0, col0, row1, col1) and masks in slide px, class ids >= 1, their
        cells.csv rows; with grown cells, ((row0, col0) of the cell label image, the image)."""
        if self._fh is None:
            raise ValueError(f"{self.path} is already closed")
        if (expanded is not None) != self.cells_expanded:
            raise ValueError("expected grown cells exactly when the writer was made with cells_expanded")
        ids = np.asarray(ids, np.int64)
        cell_masks = label_masks(expanded[1], ids) if expanded is not None else None
        values = {n: np.asarray(rows[n]) for n in self.numeric}
        for name in [n for n, v in values.items() if v.dtype.kind == "b"]:
            values[name] = values[name].astype(np.int64)
        # Python scalars column by column (one tolist per column, not one conversion per value).
        columns = {n: v.tolist() for n, v in values.items()}
        lines = []
        blobs = blob_geometries(boxes, masks)
        for k, nid in enumerate(ids.tolist()):
            nucleus = blobs[k] or mask_geometry(masks[k], int(boxes[k][0]), int(boxes[k][1]))
            if nucleus is None:
                continue
            measurements = {n: col[k] for n, col in columns.items() if col[k] == col[k]}    # NaN left out
            properties = {"objectType": "cell" if self.cells_expanded else "detection",
                          "classification": self.classes[int(class_ids[k]) - 1], "measurements": measurements}
            feature = {"type": "Feature", "id": nid}
            if cell_masks is not None and cell_masks[k] is not None:
                mask, r0, c0 = cell_masks[k]
                feature["geometry"] = mask_geometry(mask, r0 + expanded[0][0], c0 + expanded[0][1])
                feature["nucleusGeometry"] = nucleus
            else:
                feature["geometry"] = nucleus
            feature["properties"] = properties
            lines.append(("" if self.features == 0 else ",\n") + json.dumps(feature, separators=(",", ":")))
            self.features += 1
        self._fh.write("".join(lines))

    def close(self) -> Path:
        """End the collection; gzip it above the size threshold. Returns the file written."""
        if self._fh is not None:
            self._fh.write("\n]}\n")
            self._fh.close()
            self._fh = None
            self.written_path = self.path
            size = self.path.stat().st_size
            if self.gzip_above_bytes is not None and size > self.gzip_above_bytes:
                gz = self.path.with_name(self.path.name + ".gz")
                with open(self.path, "rb") as src, gzip.open(gz, "wb", compresslevel=6) as dst:
                    while chunk := src.read(1 << 22):
                        dst.write(chunk)
                os.remove(self.path)
                self.written_path = gz
                log.info("cells.geojson is %.0f MB: written gzipped as %s", size / 1e6, gz.name)
        return self.written_path

    def __enter__(self) -> CellsGeoJsonWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._fh is not None and exc_type is not None:
            self._fh.close()          # a failed run: the staging folder is discarded
            self._fh = None
        self.close()


def _qupath_class(name: str) -> str:
    """QuPath's own class for nuclei is "Nucleus"; other classes keep their name, capitalised as QuPath's are."""
    return "Nucleus" if name.lower() in ("nucleus", "nuclei") else name[:1].upper() + name[1:]


def read_cells(path: Path) -> dict:
    """A cells.geojson (or .geojson.gz) as a dict (for tests and small results: it holds every feature)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)
