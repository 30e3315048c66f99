"""A result folder: every file `cellseg count` writes for one slide, with memory flat in the slide's size.

`ResultWriter` takes the measured nuclei (and the cells grown from them) tile by tile (cells.csv, cells.geojson,
predictions.coco.json, the label canvases) and, at the end, writes the pictures and label images and the two JSON records. The files themselves are written by:

- results/cells_csv.py: cells.csv (the columns: measure.nucleus_columns, cells.expanded_columns);
- results/cells_geojson.py: cells.geojson, the nuclei or cells as QuPath objects (gzipped above a protocol's size);
- results/coco.py: predictions.coco.json (COCO RLE masks in full-slide coordinates);
- results/labelstore.py: the disk-backed label canvases, painted tile by tile;
- results/ome_pyramid.py: labels.ome.tif and panoptic.ome.tif, pyramids written from the canvas (and cell_labels.ome.tif
  from a second canvas when nuclei are grown into cells: cells/expansion_rows.py);
- results/pictures.py: overlay.png; results/report_plots.py: area_histogram.png; tissue/finder.py: tissue_mask.png.

The folder is a staging folder (results.staged_output): a failed run's files are discarded, never half-kept.
Conventions: coordinates are (row, col) in level-0 pixels, boxes half-open `Box(row0, col0, row1, col1)`.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..cells import nucleus_columns
from ..geometry import Box, Instances
from ..tissue import TissueMask, write_tissue_png
from .cells_csv import CellsTableWriter
from .cells_geojson import CellsGeoJsonWriter
from .coco import CocoWriter
from .labelstore import LabelStore
from .ome_pyramid import Panoptic, write_label_images
from .pictures import write_overlay_png
from .report_plots import histogram_png

RESULT_FILES = ("cells.csv", "cells.geojson", "summary.json", "labels.ome.tif", "panoptic.ome.tif", "overlay.png",
                "tissue_mask.png", "area_histogram.png", "predictions.coco.json", "run.json", "report.html")
CELL_FILES = ("cell_labels.ome.tif",)     # written besides when nuclei are grown into cells
REGION_FILES = ("regions.csv",)           # written besides when the count was restricted to regions (planning/regions.py)


def result_files(cells_expanded: bool, regions: bool = False) -> tuple[str, ...]:
    """The files of a result folder: RESULT_FILES, CELL_FILES when nuclei were grown into cells, REGION_FILES when
    counted in regions. cells.geojson is cells.geojson.gz when larger than the protocol's geojson_gzip_above_mb."""
    return RESULT_FILES + (CELL_FILES if cells_expanded else ()) + (REGION_FILES if regions else ())


class ResultWriter:
    """The result files of one slide (height x width level-0 px, pixel size `mpp`) in `out_dir`.

    Use as a context manager: nuclei go in with `add_nuclei` as they are measured, then `finish` writes the rest;
    leaving the block early (an error) closes what is open and leaves the folder to be discarded.
    expansion_columns: the columns cells.csv gains when nuclei are grown into cells (cells.CellExpansion);
    the cells' labels then go into cell_labels.ome.tif and their outlines onto the overlay too.
    geojson_gzip_above_mb: cells.geojson is gzipped when larger (None: never). extra_columns: more cells.csv columns
    (the regions' "region" column), given in each tile's rows.
    """

    def __init__(self, out_dir: Path, slide_name: str, height: int, width: int, mpp: float | None,
                 channel_names: list[str], class_names: list[str], chunk_px: int = 512,
                 expansion_columns: dict[str, str] | None = None, geojson_gzip_above_mb: float | None = None,
                 extra_columns: dict[str, str] | None = None):
        self.out_dir, self.mpp, self.class_names = Path(out_dir), mpp, list(class_names)
        self._work = self.out_dir / ".work"
        self.nucleus_store = LabelStore(self._work / "labels", height, width, chunk=chunk_px)
        self.cell_store = (LabelStore(self._work / "cell_labels", height, width, chunk=chunk_px)
                           if expansion_columns is not None else None)
        columns = {**nucleus_columns(channel_names), **(expansion_columns or {}), **(extra_columns or {})}
        self.table = CellsTableWriter(self.out_dir / "cells.csv", columns)
        self.geojson = CellsGeoJsonWriter(
            self.out_dir / "cells.geojson", columns, self.class_names, cells_expanded=expansion_columns is not None,
            gzip_above_bytes=None if geojson_gzip_above_mb is None else int(geojson_gzip_above_mb * 1e6))
        categories = [{"id": k + 1, "name": n} for k, n in enumerate(self.class_names)]
        self.coco = CocoWriter(self.out_dir / "predictions.coco.json", slide_name, height, width, categories)
        self.areas: list[np.ndarray] = []        # area_px of every nucleus, per added part
        self.cell_areas: list[np.ndarray] = []   # cell_area_px of every cell (grown from its nucleus), per part
        self.class_ids: list[np.ndarray] = []    # per added part, in id order

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.table.__exit__(exc_type, exc, tb)
        self.geojson.__exit__(exc_type, exc, tb)
        self.coco.__exit__(exc_type, exc, tb)
        shutil.rmtree(self._work, ignore_errors=True)

    @property
    def cell_count(self) -> int:
        """The rows of cells.csv so far (summary.json's cell_count): one per nucleus."""
        return self.table.rows

    @property
    def cells_expanded(self) -> bool:
        return self.cell_store is not None

    def all_areas(self) -> np.ndarray:
        """area_px of every nucleus so far, in id order."""
        return np.concatenate(self.areas) if self.areas else np.zeros(0)

    def all_cell_areas(self) -> np.ndarray | None:
        """cell_area_px (the nucleus grown into a cell) of every cell so far, in id order; None when nuclei are
        not grown into cells."""
        if not self.cells_expanded:
            return None
        return np.concatenate(self.cell_areas) if self.cell_areas else np.zeros(0, np.int64)

    def add_nuclei(self, read: Box, ids: np.ndarray, nuclei: Instances, labels: np.ndarray,
                   rows: dict[str, np.ndarray], expanded: tuple[Box, np.ndarray] | None = None) -> None:
        """One tile's final nuclei: their ids, their label image over the tile's read box, their measured rows;
        with an expansion, (box, labels) of the cells grown from these nuclei."""
        if (expanded is not None) != self.cells_expanded:
            raise ValueError("expected grown cells exactly when the writer was made with expansion_columns")
        self.table.append(rows)
        cell_image = None if expanded is None else ((expanded[0].row0, expanded[0].col0), expanded[1])
        self.geojson.append(ids, nuclei.boxes, nuclei.masks, nuclei.class_ids, rows, cell_image)
        self.coco.append(ids, nuclei.boxes, nuclei.masks, nuclei.scores, nuclei.class_ids)
        self.nucleus_store.paint(read, labels)
        self.areas.append(rows["area_px"])
        self.class_ids.append(np.asarray(nuclei.class_ids))
        if expanded is not None:
            self.cell_store.paint(*expanded)
            self.cell_areas.append(rows["cell_area_px"])

    def finish(self, thumbnail: np.ndarray, thumb_factor: float, tissue: TissueMask) -> Panoptic:
        """Close the tables, then write the label images, the overlay, the tissue mask and the histogram.
        Returns the panoptic encoding used (summary.json describes it)."""
        self.table.close()
        self.geojson.close()
        self.coco.close()
        panoptic = Panoptic(tissue, np.concatenate([[0], *self.class_ids]).astype(np.uint32) + 1, self.class_names)
        factor = max(1, int(round(thumb_factor)))
        nucleus_thumbnail = self.nucleus_store.thumbnail(factor)
        cell_thumbnail = self.cell_store.thumbnail(factor) if self.cell_store is not None else None
        # The overlay (boundaries + PNG encoding, which release the GIL) is drawn while the label pyramids are
        # written: ~0.5 s of a small slide's write time.
        with ThreadPoolExecutor(1, thread_name_prefix="cellseg-overlay") as background:
            overlay = background.submit(write_overlay_png, thumbnail, nucleus_thumbnail, self.out_dir / "overlay.png",
                                        cell_thumbnail)
            write_label_images(self.nucleus_store, {self.out_dir / "labels.ome.tif": None,
                                            self.out_dir / "panoptic.ome.tif": panoptic}, self.mpp)
            if self.cell_store is not None:
                write_label_images(self.cell_store, {self.out_dir / "cell_labels.ome.tif": None}, self.mpp)
            write_tissue_png(tissue, self.out_dir / "tissue_mask.png")
            area_unit = "µm²" if self.mpp else "px"
            # the report shows this file as its nucleus area plot rather than drawing it again
            (self.out_dir / "area_histogram.png").write_bytes(histogram_png(
                self.all_areas() * (self.mpp ** 2 if self.mpp else 1), f"nucleus area ({area_unit})", "Nucleus area"))
            overlay.result()
        self.nucleus_store.remove()
        if self.cell_store is not None:
            self.cell_store.remove()
        return panoptic

    def write_json(self, name: str, record: dict) -> None:
        """summary.json or run.json (values json cannot write, such as paths, as their text)."""
        (self.out_dir / name).write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")


def start_writer_imports() -> None:
    """Import matplotlib (~0.5 s) and pandas (~0.3 s, cells.csv) in a background thread while the slide is
    analysed, not on the write path.

    Python's import lock makes this safe: the writers' own imports wait for it or find it done.
    """
    import importlib
    import threading
    threading.Thread(target=lambda: [importlib.import_module(m) for m in
                                     ("matplotlib.figure", "matplotlib.backends.backend_agg", "pandas")],
                     name="cellseg-import-writers", daemon=True).start()
