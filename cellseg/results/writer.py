"""A result folder: every file `cellseg count` writes for one slide, with memory flat in the slide's size.

`ResultWriter` takes the measured nuclei (and the cells grown from them) tile by tile (cells.csv, cells.geojson,
predictions.coco.json, the label canvases) and, at the end, writes the pictures and label images and the two JSON
records; `outputs` (the protocol's, --outputs) picks the files. It hands each tile to the files' writers, which run
beside the count: a child process (results/writer_process.py) for the tables and, in a thread of it, the label
canvases (LabelFiles); from 4 cores one process per heavy output (cells.geojson; cells.csv with the COCO file; the
label canvases), as a process's Python runs on one core at a time; threads of the count where it has one core (or
no POSIX pipes). A file that cannot be written is a WriteError:
one line naming it, the folder and the space left there. `expected_size` says how big a result folder will be. The
files themselves are written by:

- results/cells_csv.py: cells.csv (the columns: measure.nucleus_columns, cells.expanded_columns);
- results/cells_geojson.py: cells.geojson, the nuclei or cells as QuPath objects (gzipped above a protocol's size;
  their polygons: results/polygons.py);
- results/coco.py: predictions.coco.json (COCO RLE masks in full-slide coordinates);
- results/labelstore.py: the disk-backed label canvases, painted tile by tile;
- results/ome_pyramid.py: labels.ome.tif and panoptic.ome.tif, pyramids written from the canvas (and
  cell_labels.ome.tif from a second canvas when nuclei are grown into cells: cells/expansion_rows.py);
- results/pictures.py: overlay.png; results/report_plots.py: area_histogram.png; tissue/finder.py: tissue_mask.png.

The folder is a staging folder (results.staged_output): a failed run's files are discarded, never half-kept.
Conventions: coordinates are (row, col) in level-0 pixels, boxes half-open `Box(row0, col0, row1, col1)`.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..cells import nucleus_columns
from ..errors import WriteError
from ..geometry import Box, Instances
from ..planning import OUTPUT_FILES
from ..tissue import TissueMask, write_tissue_png
from ..util import usable_cores
from ..util.threads import put_while
from .cells_csv import CellsTableWriter
from .cells_geojson import CellsGeoJsonWriter
from .coco import CocoWriter
from .folder import WRITING_ERRNOS, write_error
from .labelstore import LabelStore
from .ome_pyramid import LabelPyramid, Panoptic
from .pictures import write_overlay_png
from .report_plots import histogram_png
from .writer_process import TablesProcess, TableWriteError, append_to_table, start_spares

log = logging.getLogger(__name__)

RESULT_FILES = ("cells.csv", "cells.geojson", "summary.json", "labels.ome.tif", "panoptic.ome.tif", "overlay.png",
                "tissue_mask.png", "area_histogram.png", "predictions.coco.json", "run.json", "report.html",
                "below_threshold.csv")    # uncertainty.BELOW_FILE: the detections scoring under the threshold
CELL_FILES = ("cell_labels.ome.tif",)     # written besides when nuclei are grown into cells
REGION_FILES = ("regions.csv",)           # written besides when the count was restricted to regions (planning/regions.py)
ALWAYS = ("summary.json", "run.json", "below_threshold.csv")     # whatever `outputs` picks (the last: small)
# What report.html is drawn from (results/report.py): asking for the report writes these too.
REPORT_NEEDS = ("cells.csv", "overlay.png", "tissue_mask.png", "labels.ome.tif")
_LABEL_FILES = ("labels.ome.tif", "panoptic.ome.tif", "overlay.png", "cell_labels.ome.tif")   # from the canvases


def result_files(cells_expanded: bool, regions: bool = False, outputs: str | frozenset[str] = "all") -> tuple[str, ...]:
    """The files of a result folder: RESULT_FILES, CELL_FILES when nuclei were grown into cells, REGION_FILES when
    counted in regions, less those `outputs` (the protocol's setting, or chosen_outputs' set) leaves out.
    cells.geojson is cells.geojson.gz when larger than the protocol's geojson_gzip_above_mb."""
    chosen = chosen_outputs(outputs) if isinstance(outputs, str) else outputs
    files = RESULT_FILES + (CELL_FILES if cells_expanded else ()) + (REGION_FILES if regions else ())
    return tuple(f for f in files if f in chosen)


# What each result file costs, measured on cellseg's own results: bytes a nucleus (its row, outline, COCO mask, label
# pixels) and, when nuclei are grown into cells, a cell's more; the overlay and the report a thumbnail pixel (its
# longer side at most 2048 px: a 2048² gray overlay ~3 MB), the report's crops besides, and the small files. A colour
# slide's overlay and crops compress less: on the H&E example at 0.25, 0.5 and 0.167 µm/px its overlay took 1.7-2.1 B
# a pixel against 0.5-0.6 for the fluorescence one, and its report 1.8-6.3 MB, which the gray figures put at half;
# its report is then the overlay in base64, a colour crop pixel's 1.2 B (up to 12 crops of 256² px) and 0.2 MB.
BYTES_PER_NUCLEUS = {"cells.csv": 210, "cells.geojson": 1450, "predictions.coco.json": 220, "labels.ome.tif": 115,
                     "panoptic.ome.tif": 260}
BYTES_PER_CELL = {"cells.csv": 250, "cells.geojson": 3000, "cell_labels.ome.tif": 400}
BYTES_PER_THUMBNAIL_PX = {"overlay.png": 0.75, "report.html": 1.1}
BYTES_PER_THUMBNAIL_PX_COLOUR = {"overlay.png": 1.9, "report.html": 2.5}    # the report holds the overlay in base64
BYTES_FIXED = {"report.html": 5e5, "tissue_mask.png": 5e3, "area_histogram.png": 2e4, "summary.json": 5e3,
               "run.json": 5e3}
BYTES_FIXED_COLOUR = {**BYTES_FIXED, "report.html": 2e5}
BYTES_PER_COLOUR_CROP_PX = 1.2
REPORT_CROP_PX = 12 * 256 * 256     # report.choose_crops' 12 crops of 256² px at most
THUMBNAIL_SIDE = 2048       # planning.plan's: the overlay's longer side at most


def expected_size(nuclei: float, cells_expanded: bool = False, outputs: str | frozenset[str] = "all",
                  height: int = THUMBNAIL_SIDE, width: int = THUMBNAIL_SIDE, colour: bool = False) -> float:
    """About how many bytes the result folder of a height x width px slide (a colour one: RGB) with `nuclei` nuclei
    (grown into cells or not) takes, for the files `outputs` asks for. While counting, the scratch label canvas and
    the journal beside it take less than its label images and tables."""
    chosen = chosen_outputs(outputs) if isinstance(outputs, str) else outputs
    scale = min(1.0, THUMBNAIL_SIDE / max(height, width, 1))
    thumbnail_px = max(1, round(height * scale)) * max(1, round(width * scale))
    fixed, per_px = (BYTES_FIXED_COLOUR, BYTES_PER_THUMBNAIL_PX_COLOUR) if colour else (BYTES_FIXED,
                                                                                         BYTES_PER_THUMBNAIL_PX)
    size = sum(b for f, b in fixed.items() if f in chosen)
    size += thumbnail_px * sum(b for f, b in per_px.items() if f in chosen)
    if colour and "report.html" in chosen:
        size += min(REPORT_CROP_PX, height * width) * BYTES_PER_COLOUR_CROP_PX
    size += nuclei * sum(b for f, b in BYTES_PER_NUCLEUS.items() if f in chosen)
    if cells_expanded:
        size += nuclei * sum(b for f, b in BYTES_PER_CELL.items() if f in chosen)
    return float(size)


def describe_size(size: float) -> str:
    """A size in bytes for people: 812 kB, 31 MB, 2.4 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.{2 if size < 10 * scale else 0}f} {unit}".replace(".00 ", " ")
    return f"{size:.0f} B"


def chosen_outputs(outputs: str) -> frozenset[str]:
    """The files a protocol's `outputs` setting asks for ("all", or names separated by commas; planning.protocol
    checks them): with summary.json and run.json always, and what report.html is drawn from when it is asked for."""
    if outputs.strip() == "all":
        names = set(OUTPUT_FILES)
    else:
        names = {n.strip() for n in outputs.split(",") if n.strip()}
    if "report.html" in names:
        names.update(REPORT_NEEDS)
    return frozenset(names | set(ALWAYS))


class _Worker:
    """One output's writer in a thread of its own, fed tile by tile through a bounded queue (memory: a few tiles),
    so the result files are written side by side and beside the count.

    handle(*item) writes one item; done(*args) ends the file (args: those given to `end`); abort() closes it after
    a failure elsewhere. A failure in the thread is kept and raised in the caller by the next put, end or join.
    `seconds`: the time the thread spent working (not waiting for items).
    """

    def __init__(self, name: str, handle: Callable, done: Callable, abort: Callable[[], None], max_waiting: int = 4,
                 what: str | None = None):
        self.name, self.what = name, what or name
        self.error: BaseException | None = None
        self.seconds = 0.0
        self._handle, self._done, self._abort = handle, done, abort
        self._queue: queue.Queue = queue.Queue(maxsize=max_waiting)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"cellseg-write-{name}", daemon=True)
        self._thread.start()

    _END = object()

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if self._stopped.is_set():
                    break
                start = time.perf_counter()
                if item[0] is self._END:
                    self._done(*item[1:])
                    self.seconds += time.perf_counter() - start
                    return
                self._handle(*item)
                self.seconds += time.perf_counter() - start
        except BaseException as e:      # raised in the caller's thread (put, end, join)
            self.error = e
        try:
            self._abort()
        except BaseException as e:      # the first failure is the one reported
            self.error = self.error or e

    def _offer(self, item: tuple) -> None:
        if self.error is None:
            put_while(self._queue, item, lambda: self._thread.is_alive() and self.error is None)
        if self.error is not None:
            raise self.error

    def put(self, *item) -> None:
        self._offer(item)

    def end(self, *args) -> None:
        """No more items: the thread writes what is queued, then done(*args)."""
        self._offer((self._END, *args))

    def join(self) -> BaseException | None:
        self._thread.join()
        return self.error

    def wait_for(self, event: threading.Event) -> None:
        """Wait until `event` is set by the thread's work, or the thread has ended; raise the thread's failure."""
        while not event.wait(0.05) and self._thread.is_alive():
            pass
        if self.error is not None:
            raise self.error
        if not event.is_set():      # ended without setting it: stopped
            raise RuntimeError(f"{self.what} stopped before it was written")

    def stop(self) -> None:
        """Leave what is queued unwritten, close the file (abort) and wait for the thread."""
        self._stopped.set()
        while True:
            try:
                self._queue.get_nowait()        # make room, so the thread's next get sees the stop
            except queue.Empty:
                break
        put_while(self._queue, (self._END,), self._thread.is_alive)
        self._thread.join()


class LabelFiles:
    """The label canvases of one slide (results/labelstore.py) and the files drawn from them: labels.ome.tif,
    panoptic.ome.tif, cell_labels.ome.tif when nuclei are grown into cells, overlay.png (those `outputs` asks for),
    in `out_dir`. Painted tile by tile (`paint` a tile's label image, or `paint_masks` its nuclei's masks, as the
    tables' process does), then written by `close`; `remove` drops the canvases (a failed run)."""

    def __init__(self, out_dir: Path, height: int, width: int, mpp: float | None, chunk_px: int,
                 cells_expanded: bool, outputs: frozenset[str]):
        self.out_dir, self.mpp, self.outputs = Path(out_dir), mpp, frozenset(outputs)
        work = self.out_dir / ".work"
        self.nucleus_store = LabelStore(work / "labels", height, width, chunk=chunk_px)
        self.cell_store = LabelStore(work / "cell_labels", height, width, chunk=chunk_px) if cells_expanded else None

    def paint(self, read: Box, labels: np.ndarray, expanded: tuple[Box, np.ndarray] | None) -> None:
        """A tile's nuclei as their label image over its read box; with cells, (box, labels) of the cells."""
        self.nucleus_store.paint(read, labels)
        if expanded is not None and self.cell_store is not None:
            self.cell_store.paint(*expanded)

    def paint_masks(self, read: tuple, ids: np.ndarray, boxes: np.ndarray, masks: list[np.ndarray],
                    cell_image: tuple[tuple[int, int], np.ndarray] | None) -> None:
        """paint, the tile's label image drawn from its nuclei's masks as the count draws it (cells.label_tile):
        their pixels straight into the canvas where no two masks overlap."""
        from types import SimpleNamespace

        from ..cells import label_tile
        from ..geometry.maskrows import MaskRows
        read = Box(*read)
        rows = MaskRows.of(boxes, masks)
        y = np.repeat(rows.y, rows.count)
        x = rows.nz + np.repeat(rows.x0, rows.count)
        if len(y) and (y.min() < read.row0 or y.max() >= read.row1 or x.min() < read.col0 or x.max() >= read.col1):
            raise ValueError(f"expected nuclei inside {read}")
        if not self.nucleus_store.paint_pixels(y, x, np.repeat(np.asarray(ids, np.uint32)[rows.mask], rows.count)):
            self.nucleus_store.paint(read, label_tile(SimpleNamespace(boxes=boxes, masks=masks), ids, read))
        if cell_image is not None and self.cell_store is not None:
            (row0, col0), image = cell_image
            self.cell_store.paint(Box(row0, col0, row0 + image.shape[0], col0 + image.shape[1]), image)

    def close(self, panoptic: Panoptic, thumbnail: np.ndarray, thumb_factor: float, tissue: TissueMask,
              pictures_done: Callable[[], None] | None = None) -> None:
        """The files: each canvas's pyramid built once (LabelPyramid), then the label images written from it while
        the overlay is drawn (boundaries + PNG encoding, which release the GIL) beside them, its label thumbnails
        taken from the pyramid's levels; then the canvases go. pictures_done() is called once overlay.png is
        written (at once when it is not asked for): what reads it (report.html) need not wait for the pyramids."""
        want = self.outputs.__contains__
        targets = {self.out_dir / name: encode for name, encode in
                   (("labels.ome.tif", None), ("panoptic.ome.tif", panoptic)) if want(name)}
        cell_target = self.cell_store is not None and want("cell_labels.ome.tif")
        names = ", ".join(p.name for p in targets)
        # a canvas's pyramid where its label image is written, else the canvas itself: both give the thumbnail
        nuclei = _named(names, LabelPyramid, self.nucleus_store) if targets else self.nucleus_store
        cells = _named("cell_labels.ome.tif", LabelPyramid, self.cell_store) if cell_target else self.cell_store
        with ThreadPoolExecutor(1, thread_name_prefix="cellseg-overlay") as background:
            overlay = None
            if want("overlay.png"):
                factor = max(1, int(round(thumb_factor)))
                nucleus_thumbnail = nuclei.thumbnail(factor)
                cell_thumbnail = cells.thumbnail(factor) if cells is not None else None
                overlay = background.submit(_named, "overlay.png", write_overlay_png, thumbnail, nucleus_thumbnail,
                                            self.out_dir / "overlay.png", cell_thumbnail)
            if pictures_done is not None:
                if overlay is None:
                    pictures_done()
                else:       # only once written: a failure is raised below, after the pyramids
                    overlay.add_done_callback(lambda done: done.exception() is None and pictures_done())
            if targets:
                _named(names, nuclei.write, targets, self.mpp)
            if cell_target:
                _named("cell_labels.ome.tif", cells.write, {self.out_dir / "cell_labels.ome.tif": None}, self.mpp)
            if overlay is not None:
                overlay.result()
        self.remove()

    def remove(self) -> None:
        self.nucleus_store.remove()
        if self.cell_store is not None:
            self.cell_store.remove()

    def __exit__(self, *exc) -> None:      # as the tables' writers: a failed run
        self.remove()


class ResultWriter:
    """The result files of one slide (height x width level-0 px, pixel size `mpp`) in `out_dir`.

    Use as a context manager: nuclei go in with `add_nuclei` as they are measured, then `finish` writes the rest;
    leaving the block early (an error) closes what is open and leaves the folder to be discarded.
    expansion_columns: the columns cells.csv gains when nuclei are grown into cells (cells.CellExpansion);
    the cells' labels then go into cell_labels.ome.tif and their outlines onto the overlay too.
    geojson_gzip_above_mb: cells.geojson is gzipped when larger (None: never). extra_columns: more cells.csv columns
    (the regions' "region" column), given in each tile's rows. outputs: the files to write (chosen_outputs; None:
    all of them).

    Each file is written by a thread of its own (cells.csv, cells.geojson, predictions.coco.json, and the label
    canvases, which at the end become the label pyramids and the overlay), in the child processes described above or
    in this one, fed through bounded queues: the files are written side by side, beside the count, with memory a few
    tiles per file. `finish` returns once the tables are written; overlay.png and the label images are waited for
    by `wait_pictures` and `wait_label_images` (or on leaving the block), so the report is drawn meanwhile. The arrays handed to add_nuclei
    are kept until written: callers do not change them afterwards. A file that cannot be written (no space left,
    no permission) stops the count with a WriteError naming it, the folder and the space left there.
    """

    def __init__(self, out_dir: Path, slide_name: str, height: int, width: int, mpp: float | None,
                 channel_names: list[str], class_names: list[str], chunk_px: int = 512,
                 expansion_columns: dict[str, str] | None = None, geojson_gzip_above_mb: float | None = None,
                 extra_columns: dict[str, str] | None = None, outputs: frozenset[str] | None = None):
        self.out_dir, self.mpp, self.class_names = Path(out_dir), mpp, list(class_names)
        self.outputs = frozenset(OUTPUT_FILES) | frozenset(ALWAYS) if outputs is None else frozenset(outputs)
        self.cells_expanded = expansion_columns is not None
        self._work = self.out_dir / ".work"
        self.areas: list[np.ndarray] = []        # area_px of every nucleus, per added part
        self.cell_areas: list[np.ndarray] = []   # cell_area_px of every cell (grown from its nucleus), per part
        self.class_ids: list[np.ndarray] = []    # per added part, in id order
        self.rows = 0
        self.workers: dict[str, _Worker] = {}
        self._processes: dict[str, TablesProcess] = {}     # worker name -> the child process it feeds
        self._label_images_pending = False     # finish has left them being written
        want = self.outputs.__contains__
        columns = {**nucleus_columns(channel_names), **(expansion_columns or {}), **(extra_columns or {})}
        categories = [{"id": k + 1, "name": n} for k, n in enumerate(self.class_names)]
        tables = {name: spec for name, spec in (
            ("cells.csv", (self.table_writer, (self.out_dir / "cells.csv", columns), {})),
            ("cells.geojson", (self.geojson_writer, (self.out_dir / "cells.geojson", columns, self.class_names), {
                "cells_expanded": self.cells_expanded,
                "gzip_above_bytes": None if geojson_gzip_above_mb is None else int(geojson_gzip_above_mb * 1e6)})),
            ("predictions.coco.json", (self.coco_writer, (self.out_dir / "predictions.coco.json", slide_name, height,
                                                          width, categories), {}))) if want(name)}
        labels = (self.label_files, (self.out_dir, height, width, mpp, chunk_px, self.cells_expanded, self.outputs),
                  {}) if any(want(f) for f in _LABEL_FILES) else None
        try:
            if (tables or labels) and self._tables_in_a_process():
                # The tables and the label canvases in processes of their own (threads of them), fed the tiles'
                # masks: one for all where there are few cores, else one per heavy output, since each process's
                # Python runs on one core at a time.
                files = {**tables, **({"labels": labels} if labels else {})}
                for group in self._process_groups(files):
                    process = TablesProcess({name: files[name] for name in group})
                    key = "process: " + ", ".join(group)
                    self._processes[key] = process
                    what = ", ".join("labels.ome.tif (its label canvas)" if n == "labels" else n for n in group)
                    self.workers[key] = _Worker(key, process.tile, process.end, process.stop, what=what)
            else:
                for name, (make, args, kwargs) in tables.items():
                    writer = self._opened(name, make, *args, **kwargs)
                    self._start(name, writer)
                if labels is not None:
                    files = self._opened("the label canvas", self.label_files, *labels[1])
                    self.workers["labels"] = _Worker("labels", files.paint, files.close, files.remove,
                                                     what="labels.ome.tif (its label canvas)")
        except BaseException:
            self.__exit__(*(True, None, None))
            raise

    # The writers (a test may put failing ones here); where they run: in processes of their own when there are cores
    # for it (None), or always (True) or never (False: a thread each); with processes, one per heavy output from
    # PROCESS_PER_OUTPUT_CORES cores on (None), or always (True) or never (False: one for all).
    table_writer, geojson_writer, coco_writer = CellsTableWriter, CellsGeoJsonWriter, CocoWriter
    label_files = LabelFiles
    tables_in_a_process: bool | None = None
    process_per_output: bool | None = None
    # Measured on 2 cores, a process per output cost 0.4-0.6 s more CPU on an 8192² slide (each tile pickled once
    # per process) and ran 5 % slower: the one process's work fits the second core. With more cores that process is what
    # limits the count (its Python runs on one core: on a 16384² slide 14 of the count's 22 s of CPU).
    PROCESS_PER_OUTPUT_CORES = 4
    OUTPUT_GROUPS = (("cells.geojson",), ("cells.csv", "predictions.coco.json"), ("labels",))

    @staticmethod
    def _cores() -> int:
        return usable_cores()

    @classmethod
    def start_spare_processes(cls) -> None:
        """Start, now, the child processes a count with every output would use (writer_process.start_spares), so
        that their start overlaps the caller's own (CellCounter.load: the network's loading)."""
        if cls._tables_in_a_process():
            start_spares(len(cls._process_groups({**dict.fromkeys(OUTPUT_FILES), "labels": None})))

    @classmethod
    def _tables_in_a_process(cls) -> bool:
        if cls.tables_in_a_process is not None:
            return cls.tables_in_a_process
        return cls._cores() > 1 and os.name == "posix" and bool(sys.executable)   # a child interpreter handed pipes

    @classmethod
    def _process_groups(cls, files: dict) -> list[tuple[str, ...]]:
        """The writers of `files` ("labels": the label canvases) grouped by the process that runs them."""
        apart = cls.process_per_output
        if apart is None:
            apart = cls._cores() >= cls.PROCESS_PER_OUTPUT_CORES
        if not apart:
            return [tuple(files)]
        groups = [tuple(n for n in group if n in files) for group in cls.OUTPUT_GROUPS]
        return [group for group in groups if group]

    def _opened(self, what: str, make, *args, **kwargs):
        try:
            return make(*args, **kwargs)
        except OSError as e:
            raise self._write_error(what, e) from e

    def _start(self, name: str, writer) -> None:
        """A thread writing the table `name` with `writer` (a CellsTableWriter, CellsGeoJsonWriter or CocoWriter)."""
        def write(ids, boxes, masks, class_ids, scores, rows, cell_image):
            append_to_table(name, writer, ids, boxes, masks, class_ids, scores, rows, cell_image)
        self.workers[name] = _Worker(name, write, writer.close, lambda: writer.__exit__(RuntimeError, None, None))

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait_label_images()
        finally:
            for worker in self.workers.values():
                worker.stop()   # nothing left to do after finish; else what is queued is dropped, the files closed
            for process in self._processes.values():
                process.stop()
            shutil.rmtree(self._work, ignore_errors=True)

    @property
    def cell_count(self) -> int:
        """The rows of cells.csv so far (summary.json's cell_count): one per nucleus."""
        return self.rows

    def all_areas(self) -> np.ndarray:
        """area_px of every nucleus so far, in id order."""
        return np.concatenate(self.areas) if self.areas else np.zeros(0)

    def all_cell_areas(self) -> np.ndarray | None:
        """cell_area_px (the nucleus grown into a cell) of every cell so far, in id order; None when nuclei are
        not grown into cells."""
        if not self.cells_expanded:
            return None
        return np.concatenate(self.cell_areas) if self.cell_areas else np.zeros(0, np.int64)

    def writer_process_rss_mb(self) -> float | None:
        """The peak memory of the result files' processes, summed (each at its own peak: the sum bounds them
        together); None: none, or not known."""
        peaks = [p.peak_rss_mb for p in self._processes.values()]
        return sum(peaks) if peaks and None not in peaks else None

    def seconds(self) -> dict[str, float]:
        """The time each file's thread has spent writing so far (the label canvases: "labels", their pyramids and
        the overlay included; with child processes, "process: <its files>" is the time spent handing them the tiles
        and each file's the process's own, known once it is closed)."""
        out = {name: worker.seconds for name, worker in self.workers.items()}
        for process in self._processes.values():
            out.update(process.seconds)
        return out

    @property
    def takes_label_tiles(self) -> bool:
        """Whether add_nuclei needs each tile's label image (the label canvas painted in this process); else its
        `labels` may be None (the label images' process paints the masks it is handed)."""
        return "labels" in self.workers     # in processes, its worker is named "process: ..."

    def add_nuclei(self, read: Box, ids: np.ndarray, nuclei: Instances, labels: np.ndarray | None,
                   rows: dict[str, np.ndarray], expanded: tuple[Box, np.ndarray] | None = None) -> None:
        """One tile's final nuclei: their ids, their label image over the tile's read box, their measured rows;
        with an expansion, (box, labels) of the cells grown from these nuclei."""
        if (expanded is not None) != self.cells_expanded:
            raise ValueError("expected grown cells exactly when the writer was made with expansion_columns")
        self.rows += len(ids)
        self.areas.append(rows["area_px"])
        self.class_ids.append(np.asarray(nuclei.class_ids))
        if expanded is not None:
            self.cell_areas.append(rows["cell_area_px"])
        cell_image = None if expanded is None else ((expanded[0].row0, expanded[0].col0), expanded[1])
        tile = (ids, nuclei.boxes, nuclei.masks, nuclei.class_ids, nuclei.scores, rows, cell_image)
        for name, worker in self.workers.items():
            items = ((tuple(read), *tile) if name in self._processes else
                     (read, labels, expanded) if name == "labels" else tile)
            self._checked(worker.what, worker.put, *items)

    def finish(self, thumbnail: np.ndarray, thumb_factor: float, tissue: TissueMask) -> Panoptic:
        """End every file: the tables close in their threads while the tissue mask and the histogram are written;
        returns once they are, overlay.png (wait_pictures) and the label pyramids (wait_label_images) still being
        written, so that the report draws its other figures meanwhile. Returns the panoptic encoding used
        (summary.json describes it)."""
        panoptic = Panoptic(tissue, np.concatenate([[0], *self.class_ids]).astype(np.uint32) + 1, self.class_names)
        self._pictures = threading.Event()      # overlay.png written by the labels' thread (the label images may not be)
        for name, worker in self.workers.items():
            labels = name == "labels" or (name in self._processes and "labels" in self._processes[name].writers)
            args = (panoptic, thumbnail, thumb_factor, tissue) if labels else ()
            self._checked(worker.what, worker.end, *args, *((self._pictures.set,) if name == "labels" else ()))
        if "tissue_mask.png" in self.outputs:
            self._checked("tissue_mask.png", write_tissue_png, tissue, self.out_dir / "tissue_mask.png")
        if "area_histogram.png" in self.outputs:
            area_unit = "µm²" if self.mpp else "px"
            # a file of its own for users who want the plot without the report (the report draws it as a chart)
            png = histogram_png(self.all_areas() * (self.mpp ** 2 if self.mpp else 1), f"nucleus area ({area_unit})",
                                "Nucleus area")
            self._checked("area_histogram.png", (self.out_dir / "area_histogram.png").write_bytes, png)
        for name, worker in self.workers.items():
            if name != "labels":
                self._checked(worker.what, lambda w=worker: _raise(w.join()))
        self._label_images_pending = True
        return panoptic

    def wait_pictures(self) -> None:
        """Wait for overlay.png, which `finish` leaves being written (at once when no labels are written)."""
        if not self._label_images_pending:
            return
        for name, process in self._processes.items():
            if "labels" in process.writers:
                self._checked(self.workers[name].what, process.wait_pictures)
        if "labels" in self.workers:
            worker = self.workers["labels"]
            self._checked(worker.what, worker.wait_for, self._pictures)

    def wait_label_images(self) -> None:
        """Wait for the label images (labels.ome.tif, panoptic.ome.tif, cell_labels.ome.tif), which `finish` leaves
        being written so that summary.json and report.html are drawn beside them; leaving the block calls it."""
        if not self._label_images_pending:
            return
        self._label_images_pending = False
        for name, process in self._processes.items():
            self._checked(self.workers[name].what, process.finish_labels)
        if "labels" in self.workers:
            worker = self.workers["labels"]
            self._checked(worker.what, lambda: _raise(worker.join()))

    def _checked(self, what: str, call, *args):
        """call(*args), an OSError (no space, no permission, a quota) made a WriteError naming `what`."""
        try:
            return call(*args)
        except (_NamedOSError, TableWriteError) as e:
            if not isinstance(e.error, OSError):
                raise e.error from None
            raise self._write_error(e.what, e.error) from e.error
        except OSError as e:
            raise self._write_error(what, e) from e

    def _write_error(self, what: str, error: OSError) -> WriteError:
        return write_error(what, self.out_dir, error)

    def write_json(self, name: str, record: dict) -> None:
        """summary.json or run.json (values json cannot write, such as paths, as their text)."""
        self._checked(name, (self.out_dir / name).write_text, json.dumps(record, indent=2, default=str), "utf-8")

    def write_file(self, name: str, write: Callable, *args) -> None:
        """write(*args), which writes the result file `name` (regions.csv): an OSError made a WriteError."""
        self._checked(name, write, *args)


class _NamedOSError(Exception):
    """An OSError met writing `what` in a writer thread (the label canvas's worker writes several files)."""

    def __init__(self, what: str, error: OSError):
        super().__init__(f"{what}: {error}")
        self.what, self.error = what, error


def _named(what: str, call, *args):
    try:
        return call(*args)
    except OSError as e:
        raise _NamedOSError(what, e) from e


def _raise(error: BaseException | None) -> None:
    if error is not None:
        raise error


@contextmanager
def write_errors(folder: Path) -> Iterator[None]:
    """Within: an OSError that only writing meets (no space left, a quota, ...) becomes a WriteError naming the file
    (or `folder`) and the space left (a count's journal and scratch files, written outside ResultWriter)."""
    try:
        yield
    except OSError as e:
        if e.errno not in WRITING_ERRNOS:
            raise
        where = Path(e.filename) if e.filename else None
        raise write_error(where.name if where else "the result files", where.parent if where else Path(folder),
                          e) from e


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
