"""A result folder: every file `cellseg count` writes for one slide, with memory flat in the slide's size.

`ResultWriter` takes the measured cells tile by tile (cells.csv, predictions.coco.json, the label canvas) and, at
the end, writes the pictures and label images and the two JSON records. The files themselves are written by:

- cells_csv.py: cells.csv (the columns: measure.cell_columns);
- coco.py: predictions.coco.json (COCO RLE masks in full-slide coordinates);
- labelstore.py: the disk-backed label canvas, painted tile by tile;
- ome_pyramid.py: labels.ome.tif and panoptic.ome.tif, pyramids written from the canvas;
- pictures.py: overlay.png and area_histogram.png; tissue.py: tissue_mask.png.

The folder is a staging folder (resultdir.staged_output): a failed run's files are discarded, never half-kept.
Conventions: coordinates are (row, col) in level-0 pixels, boxes half-open `Box(row0, col0, row1, col1)`.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .cells_csv import CellsTableWriter
from .coco import CocoWriter
from .instances import Instances
from .labelstore import LabelStore
from .measure import cell_columns
from .ome_pyramid import Panoptic, write_label_images
from .pictures import write_area_histogram, write_overlay_png
from .tiling import Box
from .tissue import TissueMask, write_tissue_png

RESULT_FILES = ("cells.csv", "summary.json", "labels.ome.tif", "panoptic.ome.tif", "overlay.png", "tissue_mask.png",
                "area_histogram.png", "predictions.coco.json", "run.json")


class ResultWriter:
    """The result files of one slide (height x width level-0 px, pixel size `mpp`) in `out_dir`.

    Use as a context manager: cells go in with `add_cells` as they are measured, then `finish` writes the rest;
    leaving the block early (an error) closes what is open and leaves the folder to be discarded.
    """

    def __init__(self, out_dir: Path, slide_name: str, height: int, width: int, mpp: float | None,
                 channel_names: list[str], class_names: list[str], chunk_px: int = 512):
        self.out_dir, self.mpp, self.class_names = Path(out_dir), mpp, list(class_names)
        self._work = self.out_dir / ".work"
        self.store = LabelStore(self._work / "labels", height, width, chunk=chunk_px)
        self.table = CellsTableWriter(self.out_dir / "cells.csv", cell_columns(channel_names))
        categories = [{"id": k + 1, "name": n} for k, n in enumerate(self.class_names)]
        self.coco = CocoWriter(self.out_dir / "predictions.coco.json", slide_name, height, width, categories)
        self.areas: list[np.ndarray] = []        # area_px of every cell, per added part
        self.class_ids: list[np.ndarray] = []    # per added part, in cell id order

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.table.__exit__(exc_type, exc, tb)
        self.coco.__exit__(exc_type, exc, tb)
        shutil.rmtree(self._work, ignore_errors=True)

    @property
    def cell_count(self) -> int:
        return self.table.rows

    def all_areas(self) -> np.ndarray:
        """area_px of every cell so far, in cell id order."""
        return np.concatenate(self.areas) if self.areas else np.zeros(0)

    def add_cells(self, read: Box, ids: np.ndarray, cells: Instances, labels: np.ndarray,
                  rows: dict[str, np.ndarray]) -> None:
        """One tile's final cells: their ids, the label image over the tile's read box, their measured rows."""
        self.table.append(rows)
        self.coco.append(ids, cells.boxes, cells.masks, cells.scores, cells.class_ids)
        self.store.paint(read, labels)
        self.areas.append(rows["area_px"])
        self.class_ids.append(np.asarray(cells.class_ids))

    def finish(self, thumbnail: np.ndarray, thumb_factor: float, tissue: TissueMask) -> Panoptic:
        """Close the cell tables, then write the label images, the overlay, the tissue mask and the histogram.
        Returns the panoptic encoding used (summary.json describes it)."""
        self.table.close()
        self.coco.close()
        panoptic = Panoptic(tissue, np.concatenate([[0], *self.class_ids]).astype(np.uint32) + 1, self.class_names)
        label_thumbnail = self.store.thumbnail(max(1, int(round(thumb_factor))))
        # The overlay (boundaries + PNG encoding, which release the GIL) is drawn while the label pyramids are
        # written: ~0.5 s of a small slide's write time.
        with ThreadPoolExecutor(1, thread_name_prefix="cellseg-overlay") as background:
            overlay = background.submit(write_overlay_png, thumbnail, label_thumbnail, self.out_dir / "overlay.png")
            write_label_images(self.store, {self.out_dir / "labels.ome.tif": None,
                                            self.out_dir / "panoptic.ome.tif": panoptic}, self.mpp)
            write_tissue_png(tissue, self.out_dir / "tissue_mask.png")
            area_unit = "µm²" if self.mpp else "px"
            write_area_histogram(self.all_areas() * (self.mpp ** 2 if self.mpp else 1), area_unit,
                                 self.out_dir / "area_histogram.png")
            overlay.result()
        self.store.remove()
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
