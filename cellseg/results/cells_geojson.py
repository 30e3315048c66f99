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
Holes are kept; the polygons of a tile's masks are made all at once from their pixels' edges (results/polygons.py), and
the features' text is formatted column by column. The file is written as cells.csv is, a few tiles at a time: memory
holds a few hundred nuclei's features at a time.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path
from typing import IO

import numpy as np
import orjson

from .polygons import mask_geometries, mask_geometry
from .tile_batch import TileBatch

log = logging.getLogger(__name__)

NUCLEUS_COLOR = (255, 200, 0)     # the overlay's yellow outline
CELL_COLOR = (0, 200, 255)        # the overlay's cyan outline


def mask_polygon(mask: np.ndarray, row0: int, col0: int):
    """A shapely Polygon (or MultiPolygon) whose area is the pixel count of the bool `mask` placed at (row0, col0):
    pixel edges traced, holes kept, valid. x = column, y = row in level-0 px. None for an empty mask."""
    import shapely

    geometry = mask_geometry(mask, row0, col0)
    return None if geometry is None else shapely.geometry.shape(geometry)


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
                 gzip_above_bytes: int | None = None, batch_nuclei: int = 256):
        self.path = Path(path)
        # Tiles are turned into features a few at a time, `batch_nuclei` nuclei or more at once: the polygons of a
        # dense 8192² slide's 9136 nuclei took 0.75 s a tile at a time (~36 nuclei a call, most of it numpy's
        # per-call cost) and 0.31 s eight tiles at a time (Zen 3).
        self._batch = TileBatch(batch_nuclei)
        self.gzip_above_bytes = gzip_above_bytes
        self.cells_expanded = cells_expanded
        self.numeric = [n for n, dt in columns.items() if np.dtype(dt).kind in "iufb"]
        color = CELL_COLOR if cells_expanded else NUCLEUS_COLOR
        self.classes = [{"name": _qupath_class(n), "color": list(color)} for n in class_names]
        object_type = "cell" if cells_expanded else "detection"
        # each class's "properties" up to its measurements' members
        self._properties = [f'"properties":{{"objectType":"{object_type}","classification":'
                            f'{json.dumps(c, separators=(",", ":"))},"measurements":{{' for c in self.classes]
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
        boxes = np.asarray(boxes, np.int64).reshape(-1, 4)
        if not (len(boxes) == len(masks) == len(ids) == len(class_ids)):
            raise ValueError(f"expected as many boxes, masks and class ids as ids ({len(ids)}), got {len(boxes)}, "
                             f"{len(masks)} and {len(class_ids)}")
        cell_boxes, cell_masks, has_cell = np.zeros((0, 4), np.int64), [], np.zeros(len(ids), bool)
        if expanded is not None:     # the cells' masks cut from the tile's cell label image now, not kept
            (row0, col0), image = expanded
            found = [(k, m) for k, m in enumerate(label_masks(image, ids)) if m is not None]
            cell_boxes = np.array([(row0 + r, col0 + c, row0 + r + m.shape[0], col0 + c + m.shape[1])
                                   for _, (m, r, c) in found], np.int64).reshape(-1, 4)
            cell_masks = [m for _, (m, _, _) in found]
            has_cell[[k for k, _ in found]] = True
        numeric = {name: np.asarray(rows[name]) for name in self.numeric}   # text made for the whole batch
        self._write(self._batch.add((ids, boxes, list(masks), np.asarray(class_ids), numeric, cell_boxes,
                                     cell_masks, has_cell), len(ids)))

    def _write(self, pending: list[tuple]) -> None:
        """Tiles (append's, held by TileBatch) as features, in their order: their polygons made all at once."""
        if not pending:
            return
        ids = np.concatenate([p[0] for p in pending])
        nuclei = mask_geometries(np.concatenate([p[1] for p in pending]), [m for p in pending for m in p[2]])
        class_ids = np.concatenate([p[3] for p in pending])
        has_cell = np.concatenate([p[7] for p in pending])
        cells: list[dict | None] = [None] * len(ids)
        for k, geometry in zip(np.flatnonzero(has_cell).tolist(),
                               mask_geometries(np.concatenate([p[5] for p in pending]),
                                               [m for p in pending for m in p[6]])):
            cells[k] = geometry
        # the batch's rows at once: a 36-row tile's call spent ~40 % of its time on its own checks; the text is
        # the same as a tile at a time (json.dumps's, NaN left out)
        measurements = self._measurements({name: np.concatenate([p[4][name] for p in pending])
                                           for name in self.numeric}, len(ids))
        dumps = _compact_json
        separator = ",\n"
        lines = []
        for k, nid in enumerate(ids.tolist()):
            nucleus = nuclei[k]
            if nucleus is None:
                continue
            # Written as json.dumps writes {"type", "id", "geometry", ["nucleusGeometry"], "properties"}.
            if cells[k] is not None:
                shapes = f'"geometry":{dumps(cells[k])},"nucleusGeometry":{dumps(nucleus)}'
            else:
                shapes = f'"geometry":{dumps(nucleus)}'
            lines.append(f'{separator if self.features else ""}{{"type":"Feature","id":{nid},{shapes},'
                         f'{self._properties[int(class_ids[k]) - 1]}{measurements[k]}}}}}}}')
            self.features += 1
        self._fh.write("".join(lines))

    def _measurements(self, rows: dict[str, np.ndarray], n: int) -> list[str]:
        """Each row's "measurements" members as json.dumps writes them ("name":value,...; NaN left out).

        A row at a time by orjson (half the time of formatting each value by repr), where its text is json.dumps's:
        columns with no finite value (a µm column without a pixel size) left out of every row, and the rows with a
        NaN or an infinity (json.dumps writes Infinity, orjson null) or a float json.dumps writes with an exponent
        (|v| < 1e-4 or >= 1e16; orjson writes 1e-05 as 0.00001) formatted value by value, as json.dumps does."""
        names, columns = [], []
        for name in self.numeric:
            values = np.asarray(rows[name])
            if values.dtype.kind == "b":
                values = values.astype(np.int64)
            if values.dtype.kind == "f" and n and np.isnan(values).all():
                continue
            names.append(name)
            columns.append(values)
        if not names:
            return [""] * n
        # names orjson would write otherwise than json.dumps (non-ASCII, escapes): every row value by value
        by_value = np.full(n, any(json.dumps(name) != orjson.dumps(name).decode() for name in names))
        for values in columns:
            if values.dtype.kind == "f":
                size = np.abs(values)
                by_value |= ~np.isfinite(values) | ((size < 1e-4) & (size > 0)) | (size >= 1e16)
        keys = [json.dumps(name) + ":" for name in names]
        out = []
        for k, row in enumerate(zip(*(values.tolist() for values in columns))):
            if by_value[k]:
                out.append(",".join(key + (_json_float(v) if isinstance(v, float) else repr(v))
                                    for key, v in zip(keys, row) if v == v))
            else:
                out.append(orjson.dumps(dict(zip(names, row))).decode()[1:-1])
        return out

    def close(self) -> Path:
        """End the collection; gzip it above the size threshold. Returns the file written."""
        if self._fh is not None:
            fh = self._fh
            try:
                self._write(self._batch.take())
                fh.write("\n]}\n")
            finally:       # closed even when the writing fails (a full disk)
                self._fh = None
                fh.close()
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
            self._batch.take()
        self.close()


def _compact_json(geometry: dict) -> str:
    """A geometry (lists of ints) as json.dumps(separators=(",", ":")) writes it, at 6x its speed."""
    return orjson.dumps(geometry).decode()


def _json_float(value: float) -> str:
    """A float as json.dumps writes it (inf as Infinity)."""
    return json.dumps(value)


def _qupath_class(name: str) -> str:
    """QuPath's own class for nuclei is "Nucleus"; other classes keep their name, capitalised as QuPath's are."""
    return "Nucleus" if name.lower() in ("nucleus", "nuclei") else name[:1].upper() + name[1:]


def read_cells(path: Path) -> dict:
    """A cells.geojson (or .geojson.gz) as a dict (for tests and small results: it holds every feature)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)
