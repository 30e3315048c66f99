"""The pipeline: slide in, per-cell table and result files out, streaming tile by tile.

    open slide -> intensity range from the thumbnail -> tissue mask on a ~8 µm/px view (tissue.py)
    -> tiles (core + halo); tiles with too little tissue are skipped -> detector in batches
    -> ownership + seam dedupe (merge.py) -> final rows: resolve overlaps, measure, write labels/CSV/COCO
    -> labels.ome.tif + panoptic.ome.tif pyramids, overlay, tissue mask, histogram, summary.json, run.json

Detection runs in a thread of its own, a batch ahead of merging, measuring and writing. Memory holds three
batches of tiles at most (being read, in the network, waiting to be merged) and three tile rows of cells;
labels go to a disk-backed store.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Protocol as TypingProtocol, Sequence

import numpy as np

from . import __version__
from .detect import TileDetections
from .export import (CellsTableWriter, CocoWriter, LabelStore, Panoptic, start_writer_imports,
                     write_area_histogram, write_label_images, write_overlay_png)
from .measure import cell_columns, label_tile, measure_tile
from .merge import Instances, SeamMerger, owned_instances, seam_band_px
from .preprocess import IntensityRange, measure_range, select_channels, to_network_input
from .protocol import Protocol, check_pixel_size
from .scale import Scale, choose_scale, tile_geometry
from .slide import Slide, open_slide
from .tiling import Box, TileSpec, plan_tiles
from .tissue import TissueFinder, TissueMask, write_tissue_png

log = logging.getLogger(__name__)

THUMBNAIL_SIDE = 2048
RESULT_FILES = ("cells.csv", "summary.json", "labels.ome.tif", "panoptic.ome.tif", "overlay.png", "tissue_mask.png",
                "area_histogram.png", "predictions.coco.json", "run.json")


class TileDetector(TypingProtocol):
    """Anything that turns normalised tiles into per-tile detections (the Mask R-CNN, or a test double)."""

    class_names: Sequence[str]

    def detect(self, images: Sequence[np.ndarray], tiles: Sequence[TileSpec],
               scale: float = 1.0) -> list[TileDetections]:
        """Detections in each tile's read-box pixel frame (slide resolution), for tiles resampled by `scale`."""


@dataclass
class StageTimer:
    """Seconds spent per stage. Detection runs in its own thread alongside merging, measuring and writing, so the
    stages overlap and their sum can exceed the wall time."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.seconds[stage] += time.perf_counter() - start

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}


def channel_names(slide: Slide) -> list[str]:
    info = slide.info
    if info.channel_names and len(info.channel_names) == info.n_channels:
        names = [re.sub(r"[^0-9A-Za-z]+", "_", n).strip("_").lower() or f"c{i}"
                 for i, n in enumerate(info.channel_names)]
        if len(set(names)) == len(names):
            return names
    if info.n_channels == 3:
        return ["red", "green", "blue"]
    return [f"c{i}" for i in range(info.n_channels)]


_NUCLEAR_STAINS = re.compile(r"dapi|hoechst|nuc|draq|sytox|hematox", re.IGNORECASE)


def model_channel(protocol: Protocol, slide: Slide) -> int | None:
    """Which slide channel the detector sees (None: grayscale or RGB as is).

    The protocol's or --channel's choice wins; otherwise a channel named like a nuclear stain (DAPI,
    Hoechst, ...), else an RGB image as is, else channel 0.
    """
    info = slide.info
    if info.n_channels == 1:
        return 0
    if protocol.channel is not None:
        return protocol.channel
    for k, name in enumerate(info.channel_names or ()):
        if name and _NUCLEAR_STAINS.search(name):
            return k
    return None if info.n_channels == 3 else 0


def load_detector(protocol: Protocol, device: str):
    """The protocol's model bundle on `device` (auto|cpu|cuda) as a Detector: (detector, bundle).

    Thresholds: the protocol's score threshold when it sets one, else the bundle's, tuned for the protocol's
    modality (fluorescence | brightfield) when the bundle has one for it.
    """
    from .bundle import load_bundle
    from .detect import Detector, resolve_device
    torch_device = resolve_device(device)
    bundle = load_bundle(protocol.model)
    detector = Detector(bundle.build(), torch_device, class_names=tuple(bundle.model.classes),
                        score_threshold=protocol.score_threshold if protocol.score_threshold is not None
                        else bundle.threshold_for(protocol.modality),
                        mask_threshold=protocol.mask_threshold, batch_size=protocol.batch_size,
                        proposal_threshold=bundle.proposal_threshold)
    return detector, bundle


def measure_diameter(slide: Slide, detector: TileDetector, channel: int | None, intensity: IntensityRange,
                     protocol: Protocol, thumbnail: np.ndarray, thumb_factor: float,
                     tissue: TissueMask | None = None, n_tiles: int = 6) -> tuple[float, int] | None:
    """Median equivalent diameter (px) of the nuclei found at native scale on the slide's busiest tiles.

    Tiles are ranked by pixel contrast on the thumbnail, so glass and empty background are not sampled.
    Returns (diameter, number of nuclei) or None when fewer than 10 nuclei were found.
    """
    tiles = plan_tiles(slide.info.height, slide.info.width, protocol.tile_size, protocol.halo_px)
    gray = select_channels(thumbnail, channel).astype(np.float32).mean(-1)
    chosen = sorted(tiles, key=lambda t: thumbnail_contrast(gray, t.core, thumb_factor), reverse=True)[:n_tiles]
    calibrate_detector(detector, slide, channel, intensity, 1.0, gray, thumb_factor, tissue)
    images = [network_pixels(slide, t.read, channel, intensity) for t in chosen]
    areas = np.array([m.sum() for det in detector.detect(images, chosen) for m in det.masks], np.float64)
    if areas.size < 10:
        return None
    return float(np.median(2 * np.sqrt(areas / np.pi))), int(areas.size)


CALIBRATION_WINDOW_PX = 512   # network px; the side of each window the slide's normalisation is measured on
CALIBRATION_WINDOWS = 4


def thumbnail_contrast(gray_thumbnail: np.ndarray, box: Box, thumb_factor: float) -> float:
    """Standard deviation of the thumbnail over `box` (level-0 px): high where cells are, ~0 on glass."""
    r0, c0 = int(box.row0 / thumb_factor), int(box.col0 / thumb_factor)
    r1, c1 = max(int(box.row1 / thumb_factor), r0 + 1), max(int(box.col1 / thumb_factor), c0 + 1)
    return float(gray_thumbnail[r0:r1, c0:c1].std())


def calibration_windows(height: int, width: int, window_px: int, gray_thumbnail: np.ndarray, thumb_factor: float,
                        tissue: TissueMask | None, n: int = CALIBRATION_WINDOWS) -> list[Box]:
    """Up to `n` windows of window_px x window_px (slide px) on a fixed grid, where the cells are.

    They depend on the slide only (not on the tile size): the normalisation measured on them is the same
    whatever tiles the slide is cut into. Ranked by thumbnail contrast times tissue share, so glass and empty
    dark field are not chosen. A slide smaller than a window gives one window: the whole slide.
    """
    wh, ww = min(window_px, height), min(window_px, width)
    candidates = [Box(r, c, r + wh, c + ww)
                  for r in range(0, height - wh + 1, wh) for c in range(0, width - ww + 1, ww)]

    def score(box: Box) -> float:
        share = tissue.box_fraction(box) if tissue is not None else 1.0
        return thumbnail_contrast(gray_thumbnail, box, thumb_factor) * share

    ranked = sorted(candidates, key=lambda b: (-score(b), b.row0, b.col0))
    return ranked[:n]


def network_pixels(slide: Slide, box: Box, channel: int | None, intensity: IntensityRange,
                   scale: float = 1.0) -> np.ndarray:
    """The slide's pixels in `box` as the network sees them: model channel, resampled by `scale`, normalised."""
    return as_network_input(slide.read_region(box), box, channel, intensity, scale)


def as_network_input(raw: np.ndarray, box: Box, channel: int | None, intensity: IntensityRange,
                     scale: float = 1.0) -> np.ndarray:
    """network_pixels of pixels already read from `box`."""
    pixels = select_channels(raw, channel)
    if scale != 1.0:
        from skimage.transform import resize
        shape = (max(1, round(box.height * scale)), max(1, round(box.width * scale)))
        pixels = resize(pixels.astype(np.float32), shape, order=1, anti_aliasing=scale < 1, preserve_range=True)
    return to_network_input(pixels, intensity)


def calibrate_detector(detector: TileDetector, slide: Slide, channel: int | None, intensity: IntensityRange,
                       scale: float, gray_thumbnail: np.ndarray, thumb_factor: float,
                       tissue: TissueMask | None) -> list[Box]:
    """Fix the detector's normalisation statistics for this slide (detect.SlideGroupNorm); returns the windows.

    Detectors without slide-level normalisation (test doubles, other models) are left as they are.
    """
    if not hasattr(detector, "calibrate"):
        return []
    window = max(16, round(CALIBRATION_WINDOW_PX / scale))
    boxes = calibration_windows(slide.info.height, slide.info.width, window, gray_thumbnail, thumb_factor, tissue)
    detector.calibrate([network_pixels(slide, b, channel, intensity, scale) for b in boxes])
    return boxes


def release_freed_memory() -> None:
    """Hand memory that Python and numpy have freed back to the OS (glibc's malloc_trim; elsewhere nothing).

    glibc keeps freed heap blocks for reuse, fragmented: the few hundred MB a stage frees (the tissue view,
    whose size follows the slide's) would otherwise stay in the process and sit under the detector's peak,
    which then grows with the slide. Dask does the same for its workers' "unmanaged memory".
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def tissue_pixels(thumbnail: np.ndarray, tissue: TissueMask, height: int, width: int,
                  min_pixels: int = 1000) -> np.ndarray:
    """The thumbnail's pixels (n, C) that lie on tissue, or all of them when tissue is scarcer than `min_pixels`.

    The intensity range is measured on these: on a slide that is 99 % glass, percentiles of the whole
    thumbnail describe the glass, and the cells would be squashed into saturation.
    """
    th, tw = thumbnail.shape[:2]
    rows = ((np.arange(th) + 0.5) * height / th).astype(np.int64)
    cols = ((np.arange(tw) + 0.5) * width / tw).astype(np.int64)
    on = tissue.at(rows, cols)
    if on.sum() < min(min_pixels, on.size):
        return thumbnail.reshape(-1, thumbnail.shape[-1])
    return thumbnail[on]


def count_slide(slide_path: Path, out_dir: Path, protocol: Protocol, detector: TileDetector, *,
                mpp: float | None = None, progress: bool = False, run_info: dict | None = None,
                model_diameter_px: float | None = None, diameter_px: float | str | None = None,
                tissue: TissueFinder | None = None) -> dict:
    """Count and measure the cells of one slide, writing every result file into `out_dir`.

    `out_dir` is a staging folder owned by the caller (see resultdir.staged_output). Returns the summary.
    model_diameter_px: the bundle's training nucleus size; diameter_px: this image's (--diameter), or "auto"
    to measure it on a few tiles first (measure_diameter). tissue: a loaded TissueFinder (the CLI loads
    one for many slides); None loads the protocol's tissue_method.
    """
    tissue = tissue or TissueFinder(protocol.tissue_method, device=str(getattr(detector, "device", "cpu")))
    start_writer_imports()
    timer = StageTimer()
    started = time.time()
    with open_slide(slide_path, mpp=mpp) as slide:
        info = slide.info
        check_pixel_size(protocol, info)
        channel = model_channel(protocol, slide)
        with timer("read"):
            thumbnail, thumb_factor = slide.read_thumbnail(THUMBNAIL_SIDE)
        with timer("tissue"):
            tissue_mask = tissue.find(slide, protocol.modality)
            release_freed_memory()   # the view grows with the slide; detection must not start on top of it
        with timer("read"):
            intensity = measure_range(tissue_pixels(select_channels(thumbnail, channel), tissue_mask,
                                                    info.height, info.width))
        gray = select_channels(thumbnail, channel).astype(np.float32).mean(-1)
        if diameter_px == "auto":
            with timer("detect"):
                measured = measure_diameter(slide, detector, channel, intensity, protocol, thumbnail, thumb_factor,
                                            tissue_mask)
            scale = (choose_scale(model_diameter_px, measured[0], protocol, info.mpp,
                                  source=f"measured on {measured[1]} nuclei of the slide (--diameter auto)")
                     if measured else Scale(1.0, "native: too few nuclei found to measure their size",
                                            model_diameter_px or None))
        else:
            scale = choose_scale(model_diameter_px, diameter_px, protocol, info.mpp)
        tile_px, halo_px = tile_geometry(protocol, scale)
        tiles = plan_tiles(info.height, info.width, tile_px, halo_px)
        # A tile is skipped when its core holds too little tissue: none of its cells could be real.
        keep = [tissue.method == "none" or tissue_mask.box_fraction(t.core) >= protocol.min_tissue_fraction
                for t in tiles]
        windows = []
        if any(keep):
            with timer("detect"):
                # One normalisation for the whole slide, measured where the cells are: a cell then looks the same
                # to the network whatever tile it falls in (see detect.SlideGroupNorm).
                windows = calibrate_detector(detector, slide, channel, intensity, scale.factor, gray, thumb_factor,
                                             tissue_mask)
        names = channel_names(slide)
        work = out_dir / ".work"
        store = LabelStore(work / "labels", info.height, info.width, chunk=min(512, protocol.tile_size))
        merger = SeamMerger(protocol.dedupe_overlap, protocol.min_area_px)
        categories = [{"id": k + 1, "name": n} for k, n in enumerate(detector.class_names)]
        areas: list[np.ndarray] = []
        with CellsTableWriter(out_dir / "cells.csv", cell_columns(names)) as table, \
                CocoWriter(out_dir / "predictions.coco.json", info.path.name, info.height, info.width,
                           categories) as coco:
            emitter = _Emitter(slide, tiles, store, table, coco, names, list(detector.class_names), timer, areas)
            _run_tiles(slide, tiles, keep, detector, merger, emitter, channel, intensity, protocol, timer, progress,
                       scale.factor, halo_px)
        with timer("write"):
            from concurrent.futures import ThreadPoolExecutor
            panoptic = Panoptic(tissue_mask, np.concatenate([[0], *emitter.class_ids]).astype(np.uint32) + 1,
                                list(detector.class_names))
            label_thumbnail = store.thumbnail(max(1, int(round(thumb_factor))))
            # The overlay (boundaries + PNG encoding, which release the GIL) is drawn while the label pyramids
            # are written: ~0.5 s of a small slide's write time.
            with ThreadPoolExecutor(1, thread_name_prefix="cellseg-overlay") as background:
                overlay = background.submit(write_overlay_png, thumbnail, label_thumbnail, out_dir / "overlay.png")
                write_label_images(store, {out_dir / "labels.ome.tif": None,
                                           out_dir / "panoptic.ome.tif": panoptic}, info.mpp)
                write_tissue_png(tissue_mask, out_dir / "tissue_mask.png")
                all_areas = np.concatenate(areas) if areas else np.zeros(0)
                area_unit = "µm²" if info.mpp else "px"
                write_area_histogram(all_areas * (info.mpp ** 2 if info.mpp else 1), area_unit,
                                     out_dir / "area_histogram.png")
                overlay.result()
            store.remove()
            shutil.rmtree(work, ignore_errors=True)
        summary = _summary(info, protocol, tiles, keep, tissue_mask, emitter.next_id - 1, all_areas, merger, timer,
                           started, channel)
        summary["panoptic"] = panoptic.describe()
        summary["scale"] = {"factor": scale.factor, "source": scale.source, "tile_px": tile_px, "halo_px": halo_px,
                            "model_diameter_px": scale.model_diameter_px,
                            "image_diameter_px": scale.image_diameter_px}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        run = {"tool": "cellseg", "cellseg_version": __version__, "slide": str(info.path.resolve()),
               "protocol": protocol.to_dict(), "protocol_source": protocol.source, "model_channel": channel,
               "intensity_range": [intensity.low, intensity.high], "tissue": tissue.describe(),
               "normalisation_windows": [list(map(int, b)) for b in windows], **(run_info or {})}
        (out_dir / "run.json").write_text(json.dumps(run, indent=2, default=str), encoding="utf-8")
    return summary


class RecentRegions:
    """Raw pixels of tiles read for detection, kept (up to `max_bytes`) until their cells are measured.

    A tile's cells are measured a tile row after it was read (when seams are settled); reading and decoding the
    slide a second time for that cost ~8 ms a tile. A region is handed out once. When full, new regions are not
    kept (the oldest are the next to be measured), and `take` reads the slide instead. Thread-safe: the reader
    thread keeps, the pipeline takes.
    """

    def __init__(self, slide: Slide, max_bytes: int = 64 << 20):
        import threading
        self.slide, self.max_bytes = slide, max_bytes
        self._regions: dict[Box, tuple[int, np.ndarray]] = {}   # box -> (tile grid row, pixels)
        self._bytes = 0
        self._lock = threading.Lock()

    def keep(self, box: Box, grid_row: int, pixels: np.ndarray) -> None:
        with self._lock:
            if box not in self._regions and self._bytes + pixels.nbytes <= self.max_bytes:
                self._regions[box] = (grid_row, pixels)
                self._bytes += pixels.nbytes

    def take(self, box: Box) -> np.ndarray:
        with self._lock:
            kept = self._regions.pop(box, None)
            if kept is not None:
                self._bytes -= kept[1].nbytes
                return kept[1]
        return self.slide.read_region(box)

    def release(self, through_row: int | None) -> None:
        """Forget the regions of grid rows <= through_row (None: all): their cells are all measured, and a tile
        without cells is never taken."""
        with self._lock:
            for box in [b for b, (row, _) in self._regions.items() if through_row is None or row <= through_row]:
                self._bytes -= self._regions.pop(box)[1].nbytes


def _run_tiles(slide: Slide, tiles: list[TileSpec], keep: list[bool], detector: TileDetector, merger: SeamMerger,
               emitter: "_Emitter", channel: int | None, intensity: IntensityRange, protocol: Protocol,
               timer: StageTimer, progress: bool, scale: float, halo_px: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm
    tiles_per_row = sum(1 for t in tiles if t.grid_row == 0)
    work = [t for t, k in zip(tiles, keep) if k]
    batches = [work[i:i + protocol.batch_size] for i in range(0, len(work), protocol.batch_size)]
    no_cells = TileDetections.empty()

    def read_tile(t: TileSpec) -> np.ndarray:
        raw = slide.read_region(t.read)
        emitter.regions.keep(t.read, t.grid_row, raw)     # measured later on these same pixels
        return as_network_input(raw, t.read, channel, intensity, scale)

    # Reading + normalising a 640² tile costs ~10 ms of CPU: one thread keeps up with a CPU network, but a GPU
    # analyses a tile in a few ms, so big machines read with more threads (decoders release the GIL).
    readers = max(1, min(4, (os.cpu_count() or 1) // 4))

    def detected() -> Iterator[tuple[TileSpec, TileDetections]]:
        """(tile, detections) of the kept tiles in order. Reader threads decode the next batch while the
        detector works on this one (tifffile/imagecodecs release the GIL); at most one batch waits in memory."""
        with ThreadPoolExecutor(max_workers=readers, thread_name_prefix="cellseg-read") as reader:
            pending = [reader.submit(read_tile, t) for t in batches[0]] if batches else []
            for k, batch in enumerate(batches):
                with timer("read"):      # time the pipeline waited for pixels, not the readers' busy time
                    images = [f.result() for f in pending]
                if k + 1 < len(batches):
                    pending = [reader.submit(read_tile, t) for t in batches[k + 1]]
                with timer("detect"):
                    detections = detector.detect(images, batch, scale)
                yield from zip(batch, detections)

    def every_tile(stream: Iterator[tuple[TileSpec, TileDetections]]) -> Iterator[tuple[TileSpec, TileDetections]]:
        """All tiles in grid order, skipped ones with no cells: the merger's row bookkeeping stays simple."""
        with tqdm(total=len(work), desc=slide.info.path.name, unit="tile", disable=not progress) as bar:
            for tile, kept in zip(tiles, keep):
                if kept:
                    _, det = next(stream)      # the stream yields the kept tiles in this same grid order
                    bar.update(1)
                    yield tile, det
                else:
                    yield tile, no_cells

    # The network runs in its own thread, a batch ahead of merging, measuring and writing: a GPU is not idle
    # while the host handles the cells of the previous batch, and on a CPU the network's threads fill the gaps.
    with in_background(detected(), max_waiting=max(1, protocol.batch_size), name="cellseg-detect") as stream:
        merge_tiles(every_tile(stream), tiles_per_row, merger, emitter, timer, (slide.info.height, slide.info.width),
                    protocol.min_area_px, seam_band_px(halo_px))


@contextmanager
def in_background(items: Iterator, max_waiting: int, name: str) -> Iterator[Iterator]:
    """Run the iterator `items` in a thread of its own, at most `max_waiting` items ahead of the consumer.

    Yields an iterator over the same items in the same order. An exception in `items` is raised in the consumer;
    when the consumer stops early (an exception, or not reading to the end), the thread is told to stop and joined
    before this returns, so nothing runs on after the pipeline has failed.
    """
    import queue
    waiting: queue.Queue = queue.Queue(maxsize=max_waiting)
    stop = threading.Event()
    done = object()

    def offer(entry) -> bool:
        while not stop.is_set():
            try:
                waiting.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((item, None)):
                    return
            offer((done, None))
        except BaseException as e:   # handed to the consumer, which raises it
            offer((done, e))
        finally:
            if hasattr(items, "close"):
                items.close()     # a generator's own cleanup (its reader threads) runs in this thread

    def consume() -> Iterator:
        while True:
            item, error = waiting.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item

    worker = threading.Thread(target=produce, name=name, daemon=True)
    worker.start()
    try:
        yield consume()
    finally:
        stop.set()
        worker.join()


def merge_tiles(stream: Iterable[tuple[TileSpec, TileDetections]], tiles_per_row: int, merger: SeamMerger,
                emitter: "_Emitter", timer: StageTimer, slide_shape: tuple[int, int], min_area_px: int,
                band_px: int) -> None:
    """Ownership and seam dedupe for every tile, in grid order; each finished row of cells goes to `emitter`."""
    for tile, det in stream:
        with timer("merge"):
            merger.add_tile(tile, owned_instances(det, tile, slide_shape, min_area_px, band_px))
            # Grid row r is complete: row r - 1 can no longer change.
            done = (merger.pop_final(tile.grid_row - 1)
                    if tile.grid_col == tiles_per_row - 1 and tile.grid_row > 0 else None)
        if done is not None:
            emitter.emit(done, through_row=tile.grid_row - 1)
    with timer("merge"):
        done = merger.pop_final(None)
    emitter.emit(done)


@dataclass
class _Emitter:
    """Gives final cells their ids, measures them per owning tile and writes them out."""

    slide: Slide
    tiles: list[TileSpec]
    store: LabelStore
    table: CellsTableWriter
    coco: CocoWriter
    channel_names: list[str]
    class_names: list[str]
    timer: StageTimer
    areas: list[np.ndarray]
    class_ids: list[np.ndarray] = field(default_factory=list)   # per emitted part, in cell id order
    next_id: int = 1
    regions: RecentRegions | None = None   # raw pixels of tiles read for detection (default: none kept yet)

    def __post_init__(self) -> None:
        if self.regions is None:
            self.regions = RecentRegions(self.slide)

    def emit(self, cells: Instances, through_row: int | None = None) -> None:
        """Measure and write `cells`, the final cells of the tile rows <= through_row (None: all rows)."""
        self._emit(cells)
        self.regions.release(through_row)

    def _emit(self, cells: Instances) -> None:
        if not len(cells):
            return
        # Cells come grouped by tile (pop_final sorts them so); a stable sort keeps any order safe and
        # splits the groups in one pass instead of one scan of all cells per tile.
        order = np.argsort(cells.tile_index, kind="stable")
        tile_of = cells.tile_index[order]
        starts = np.flatnonzero(np.r_[True, tile_of[1:] != tile_of[:-1]])
        for start, stop in zip(starts, np.r_[starts[1:], len(order)]):
            part = cells.take(order[start:stop])
            tile = self.tiles[int(tile_of[start])]
            ids = np.arange(self.next_id, self.next_id + len(part), dtype=np.int64)
            self.next_id += len(part)
            with self.timer("measure"):
                labels = label_tile(part, ids, tile.read)
                pixels = self.regions.take(tile.read)
                rows = measure_tile(part, ids, labels, pixels, tile.read, self.slide.info.mpp,
                                    self.channel_names, self.class_names)
            with self.timer("write"):
                self.table.append(rows)
                self.coco.append(ids, part.boxes, part.masks, part.scores, part.class_ids)
                self.store.paint(tile.read, labels)
            self.areas.append(rows["area_px"])
            self.class_ids.append(np.asarray(part.class_ids))


def _stats(values: np.ndarray) -> dict | None:
    if values.size == 0:
        return None
    p5, p50, p95 = np.percentile(values, [5, 50, 95])
    return {"mean": float(values.mean()), "median": float(p50), "p5": float(p5), "p95": float(p95),
            "min": float(values.min()), "max": float(values.max())}


def _summary(info, protocol: Protocol, tiles: list[TileSpec], keep: list[bool], tissue: TissueMask,
             cell_count: int, areas: np.ndarray, merger: SeamMerger, timer: StageTimer, started: float,
             channel: int | None) -> dict:
    mpp = info.mpp
    tissue_px = tissue.area_px()
    tissue_mm2 = tissue_px * mpp ** 2 / 1e6 if mpp else None
    if not tissue_px:
        density_note = "no tissue found: every tile was skipped, so there are no cells and no density"
    elif not mpp:
        density_note = "no pixel size: density per mm² unknown (pass --mpp)"
    else:
        density_note = "cells per mm² of tissue"
    seconds = timer.to_dict()
    seconds["total"] = round(time.time() - started, 3)
    return {
        "slide": info.path.name, "format": info.format, "height_px": info.height, "width_px": info.width,
        "channels": info.n_channels, "dtype": str(info.dtype), "model_channel": channel,
        "mpp": mpp, "mpp_source": info.mpp_source,
        "units": "µm columns filled" if mpp else f"µm columns empty: no pixel size ({info.mpp_source})",
        "protocol": protocol.name,
        "cell_count": int(cell_count),
        "tiles_total": len(tiles), "tiles_skipped": len(tiles) - sum(keep), "tile_size_px": protocol.tile_size,
        "halo_px": protocol.halo_px,   # network px; see "scale" for slide px
        "tissue_method": tissue.method, "tissue_note": tissue.note,
        "min_tissue_fraction": protocol.min_tissue_fraction if tissue.method != "none" else None,
        "tissue_fraction": round(tissue_px / (info.height * info.width), 6),
        "tissue_area_px": round(tissue_px), "tissue_area_mm2": tissue_mm2,
        "cells_per_mm2": cell_count / tissue_mm2 if tissue_mm2 else None,
        "cells_per_mm2_note": density_note,
        "area_px": _stats(areas.astype(float)),
        "area_um2": _stats(areas * mpp ** 2) if mpp else None,
        "seams": merger.stats.to_dict(),
        "seconds": seconds,
    }
