"""The pipeline: one slide in, its result files out, streaming tile by tile. A `SlideRun` holds one slide's steps;
`count_slide` runs them in one process:

    SlideRun.plan: planning.plan_slide (channel, tissue, intensity range, scale, tiles, normalisation windows)
    -> SlideRun.owned_tiles, band after band of tile rows (tiling.Band, SlideRun.detect_band): the detector is
       calibrated on the plan's windows (once, when there is something to detect), detect_tiles reads the analysed
       tiles in reader threads and detects them in batches, and each tile keeps the nuclei it owns
       (merge.owned_instances); with a journal (run/journal.py) each finished band is kept there, and a resumed run
       reads it back instead
    -> SlideRun.finish: merge_tiles dedupes the seams (merge.SeamMerger); each finished row of nuclei goes to the
       NucleusEmitter: ids, measurements (cells/nucleus_measure.py), written (export.ResultWriter); with a cell expansion, each
       nucleus is grown into a cell and measured too (cells/expansion_rows.py), a tile row later; then label pyramids,
       overlay, tissue mask, histogram, summary.json, run.json

Detection runs in a thread of its own (threads.in_background), a batch ahead of merging, measuring and writing.
Memory holds three batches of tiles at most (being read, in the network, waiting to be merged) and three tile rows
of cells; labels go to a disk-backed store. Callers count through counter.CellCounter, which loads the models once.
A distributed run (run/distributed.py) runs the same SlideRun steps as Dask tasks: the plan, the bands on any workers
(each journaled), then the final step fed from the journal, in grid order: the same cells as one process.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..cells import (
    CellExpansion,
    FinalNuclei,
    SeamMerger,
    centroids_and_areas,
    expand_tile,
    label_tile,
    measure_tile,
    owned_instances,
    painted_tile,
)
from ..geometry import Band, Instances, TileDetections, TileDetector, TileSpec, seam_band_px
from ..planning import Calibration, Protocol, RegionFile, SlidePlan, plan_slide, tiles_per_pass
from ..results import (
    BELOW_FILE,
    RegionTally,
    ResultWriter,
    RunInfo,
    ScoreTally,
    build_summary,
    chosen_outputs,
    count_calibration,
    estimate_record,
    look_record,
    no_tissue_warning,
    region_estimates,
    regions_record,
    run_record,
    slide_threshold,
    start_writer_imports,
    write_errors,
    write_regions_csv,
)
from ..slides import KEPT_BYTES, CachedSlide, Slide, open_slide
from ..tissue import TissueFinder
from ..util import StageTimer, in_background, quick_handoff, usable_cores
from .journal import done_bands, load_band, load_plan, load_unreadable, save_band, save_plan, save_unreadable
from .measuring import TileMeasurer, measure_processes_for

if TYPE_CHECKING:
    from ..bundles import MicronScale

log = logging.getLogger(__name__)

REGION_COLUMNS = {"region": "str"}    # cells.csv's column when counted in regions: names joined by ";"

Progress = Callable[[int, int], None]
"""progress(tiles analysed, tiles to analyse): called once the tiles are planned, then after each analysed tile, in
the thread that called count_slide. An exception it raises (a cancel) stops the count: nothing is committed."""


def count_slide(slide_path: Path, out_dir: Path, protocol: Protocol, detector: TileDetector, tissue: TissueFinder,
                *, mpp: float | None = None, progress: Progress | None = None, run_info: RunInfo | None = None,
                model_diameter_px: float | None = None, diameter_px: float | str | None = None,
                journal: Path | None = None, band_rows: int | None = None,
                regions: RegionFile | None = None, skip_unreadable: bool = False,
                micron_scale: MicronScale | None = None, z: int | str | None = None,
                series: int | None = None, t: int | None = None) -> dict:
    """Count and measure the cells of one slide, writing every result file into `out_dir`. Returns the summary.

    `out_dir` is a staging folder owned by the caller (results.staged_output; CellCounter.count does this).
    tissue: a loaded TissueFinder; mpp: the pixel size in µm/px, overriding the file's; model_diameter_px: the
    bundle's training nucleus size, micron_scale its scale in µm for the protocol's modality; diameter_px: this
    image's (--diameter), "auto" to measure it first, planning.DEFAULT_SCALE for the scale a count chooses itself, or
    "native" (planning.plan_slide).
    journal: a journal folder (run/journal.py) where the plan and each finished band of tile rows are kept; what it
    holds already (a resumed run) is read back, not computed again. band_rows: tile rows per band (tiling.plan_bands).
    regions: count only the nuclei inside these (planning/regions.py); tiles far from them are never read.
    skip_unreadable: damaged pixel data (slide.Slide) does not stop the count: see `drop_unreadable` and
    SlideRun.finish. z, series, t: what of a Z-stack, which image of a multi-image file and which time point of a time
    series is counted (slides.open_slide).
    """
    started = time.time()
    # a full disk (the journal's files too): one line, and the journal kept for --resume
    with write_errors(out_dir), open_slide(slide_path, mpp=mpp, skip_unreadable=skip_unreadable, z=z,
                                           series=series, t=t) as opened:
        run = SlideRun(opened, protocol, detector, journal=journal, band_rows=band_rows, started=started)
        plan = run.plan(tissue, model_diameter_px=model_diameter_px, diameter_px=diameter_px, regions=regions,
                        micron_scale=micron_scale)
        # After the plan, not before: on the way to the first tile they competed with it for the interpreter (~1 s
        # more before the first tile on 2 cores); beside the network, whose threads leave the GIL, they cost little.
        start_writer_imports()
        # The network runs in its own thread, a batch ahead of merging, measuring and writing: a GPU is not idle
        # while the host handles the cells of the previous batch, and on a CPU its threads fill the gaps. Each
        # thread gets the interpreter back soon after a wait (on the device, a decoder): threads.quick_handoff.
        with quick_handoff(), in_background(run.owned_tiles(), max_waiting=max(1, run.protocol.batch_size),
                                            name="cellseg-detect") as owned:
            return run.finish(reported(owned, plan, progress), out_dir, list(detector.class_names), tissue.describe(),
                              run_info or RunInfo())


class SlideRun:
    """One slide's count, step by step; the serial pipeline (count_slide), a resumed count and the Dask tasks
    (run/distributed.py) all go through it:

        plan()             the journal's plan, or planning.plan_slide (then journaled)
        owned_tiles()      detect_band(band) for each band: every tile of the band with the cells it owns
                           (merge.owned_instances), read back from the journal or detected (the detector calibrated
                           first, once, only when there is something to detect) and then journaled
        finish(owned, ...) seam merge, ids, measurements, every result file; returns the summary

    slide: the open slide; detector: None where nothing is detected (a final step fed from the journal); journal:
    the journal folder (run/journal.py), or None; band_rows: tile rows per band; plan: a plan made already (a Dask task
    gets the plan task's); keep_pixels: keep the pixels read for detection until their cells are measured (False
    where this run measures nothing: a Dask band task, --estimate); calibration: the detector calibrated for the
    last slide (a Dask worker's, shared by its tasks); started: time.time() when the count began.
    Stage seconds add up in `timer`.
    """

    def __init__(self, slide: Slide, protocol: Protocol, detector: TileDetector | None = None, *,
                 journal: Path | None = None, band_rows: int | None = None, plan: SlidePlan | None = None,
                 keep_pixels: bool = True, calibration: Calibration | None = None, started: float | None = None):
        self.slide = CachedSlide(slide, KEPT_BYTES if keep_pixels else 0)
        if protocol.batch_size is None and detector is not None:   # the device's; run.json records it
            protocol = protocol.replace(batch_size=tiles_per_pass(detector.device))
        self.protocol, self.detector = protocol, detector
        self.journal, self.band_rows = journal, band_rows
        self.calibration = calibration or Calibration()
        self.timer = StageTimer()
        self.started = time.time() if started is None else started
        self._plan = plan
        if journal is not None and slide.skip_unreadable:
            slide.add_unreadable(load_unreadable(journal))     # met by the interrupted run, in bands read back

    def plan(self, tissue: TissueFinder | None = None, *, model_diameter_px: float | None = None,
             diameter_px: float | str | None = None, regions: RegionFile | None = None,
             micron_scale: MicronScale | None = None) -> SlidePlan:
        """The slide's plan: the one given or journaled, else made by planning.plan_slide with `tissue` and the
        other arguments (its parameters) and journaled. The tiles it detected to measure the nuclei are kept in
        the calibration, for detect_tiles."""
        if self._plan is None and self.journal is not None:
            self._plan = load_plan(self.journal)
        if self._plan is None:
            if tissue is None:
                raise ValueError("expected a tissue finder to plan the slide with, got None")
            self._plan = plan_slide(self.slide.slide, self.protocol, self.detector, tissue, self.timer,
                                    model_diameter_px, diameter_px, regions, micron_scale, self.calibration)
            if self.journal is not None:
                save_plan(self.journal, self._plan, self.slide.info)
            for warning in self.slide.info.warnings:    # what of the file is not counted (other positions)
                log.warning("%s", warning)
            looks = look_record(self._plan, self.slide.info, self.protocol)
            if looks["warning"]:    # now, not after hours of counting with the wrong protocol
                log.warning("%s: %s", self.slide.info.path.name, looks["warning"])
            if not self._plan.tissue.area_px():      # else a bare "0 cells" would read as a finding
                log.warning("%s: %s", self.slide.info.path.name, no_tissue_warning(self.protocol.tissue_method))
        return self._plan

    def bands(self) -> list[Band]:
        return self.plan().bands(self.band_rows)

    def calibrate(self) -> TileDetector:
        """The detector calibrated on the plan's windows (made once per slide); the detector as given when the plan
        has no windows (per-tile statistics)."""
        plan = self.plan()
        if not plan.windows:
            return self.detector
        with self.timer("detect"):
            return self.calibration.calibrated(self.detector, self.slide.slide, plan.windows, plan.network)

    def owned_tiles(self) -> Iterator[tuple[TileSpec, Instances]]:
        """Every tile of the slide, in grid order, with the nuclei it owns (none for a skipped tile)."""
        for band in self.bands():
            yield from self.detect_band(band)

    def detect_band(self, band: Band) -> Iterator[tuple[TileSpec, Instances]]:
        """Every tile of `band`, in grid order, with the nuclei it owns (none for a skipped tile): read back when the
        journal holds the band, else detected (detect_owned) and, once the band is complete, journaled."""
        plan = self.plan()
        tiles = band.tiles(plan.tiles, plan.tiles_per_row)
        if self.journal is not None and band.index in done_bands(self.journal):
            kept = load_band(self.journal, band)
            for tile in tiles:
                yield tile, kept.get(tile.index, _NO_NUCLEI)
            return
        analysed = [t for t in tiles if plan.keep[t.index]]
        kept = {}
        with closing(self.detect_owned(analysed)) as detected:
            for tile in tiles:
                nuclei = next(detected)[1] if plan.keep[tile.index] else _NO_NUCLEI
                if self.journal is not None and plan.keep[tile.index]:
                    kept[tile.index] = nuclei
                yield tile, nuclei
        if self.journal is not None:
            if self.slide.skip_unreadable:    # first: a band on file must not lack the regions met while reading it
                save_unreadable(self.journal, self.slide.unreadable)
            save_band(self.journal, band, kept)

    def detect_owned(self, tiles: list[TileSpec]) -> Iterator[tuple[TileSpec, Instances]]:
        """(tile, the nuclei it owns: merge.owned_instances) for each of `tiles` (analysed ones, in grid order), with
        the detector calibrated for the slide (calibrate)."""
        slide = self.slide
        shape = (slide.info.height, slide.info.width)
        band_px = seam_band_px(self.plan().halo_px)
        for tile, det in self.detect_tiles(tiles):
            with self.timer("merge"):
                nuclei = owned_instances(det, tile, shape, self.protocol.min_area_px, band_px)
                if slide.skip_unreadable:
                    nuclei = drop_unreadable(nuclei, slide.unreadable)
            yield tile, nuclei

    def detect_tiles(self, tiles: list[TileSpec]) -> Iterator[tuple[TileSpec, TileDetections]]:
        """(tile, detections) of `tiles`, in their order: those detected while planning, to measure the nuclei, with
        the detector calibrated as now (planning.Calibration.take), as they are; the others read and detected."""
        detector = self.calibrate() if tiles else None      # calibrated only when there is something to detect
        known = self.calibration.take(tiles) if detector is not None and self.plan().windows else {}
        with closing(self.read_and_detect([t for t in tiles if t not in known], detector)) as fresh:
            for tile in tiles:
                yield (tile, known[tile]) if tile in known else next(fresh)

    def read_and_detect(self, tiles: list[TileSpec], detector: TileDetector | None
                        ) -> Iterator[tuple[TileSpec, TileDetections]]:
        """(tile, detections) of `tiles`, in their order, the protocol's batch size at a time, with `detector`.

        Reader threads decode the next batch while the detector works on this one (tifffile/imagecodecs release the
        GIL); at most one batch waits in memory. The raw pixels read stay with the slide, to be measured later.
        """
        plan, timer, batch_size = self.plan(), self.timer, self.protocol.batch_size
        batches = [tiles[i:i + batch_size] for i in range(0, len(tiles), batch_size)]

        def read_tile(t: TileSpec) -> object:
            # the raw pixels are measured later; the detector gets them made ready for it (TileDetector.prepare)
            return detector.prepare(self.slide.read_tile(t), t.read, plan.network)

        # Reading + normalising a 640² tile costs ~10 ms of CPU: one thread keeps up with a CPU network, but a GPU
        # analyses a tile in a few ms, so big machines read with more threads (decoders release the GIL; on a GPU
        # a reader only decodes and copies the pixels into page-locked memory, the normalising is the GPU's).
        from concurrent.futures import ThreadPoolExecutor
        readers = max(1, min(4, usable_cores() // 4))
        with ThreadPoolExecutor(max_workers=readers, thread_name_prefix="cellseg-read") as reader:
            pending = [reader.submit(read_tile, t) for t in batches[0]] if batches else []
            for k, batch in enumerate(batches):
                with timer("read"):      # time the pipeline waited for pixels, not the readers' busy time
                    images = [f.result() for f in pending]
                if k + 1 < len(batches):
                    pending = [reader.submit(read_tile, t) for t in batches[k + 1]]
                with timer("detect"):
                    detections = detector.detect(images, batch, plan.network.scale.factor)
                yield from zip(batch, detections)

    def finish(self, owned: Iterable[tuple[TileSpec, Instances]], out_dir: Path, class_names: list[str],
               tissue_info: dict, run_info: RunInfo) -> dict:
        """The final step: every tile's owned nuclei in grid order (owned_tiles) -> seam merge -> ids, measurements
        and result files in `out_dir`, then summary.json and run.json. Returns the summary.
        class_names: the detector's; tissue_info: TissueFinder.describe(); run_info: what run.json records besides.
        """
        slide, plan, protocol, timer = self.slide, self.plan(), self.protocol, self.timer
        info = slide.info
        merger = SeamMerger(protocol.dedupe_overlap, protocol.min_area_px)
        expansion = plan.cell_expansion(info, protocol.modality)    # None: nuclei only
        tally = RegionTally(plan.regions) if plan.regions is not None else None
        # p_nucleus and the count's interval (results/uncertainty.py), from the bundle's calibration when it has one
        calibration, calibration_note = count_calibration(run_info.model, protocol.modality, plan.network.gray)
        threshold = slide_threshold(run_info.model, plan.network.gray)
        scores = ScoreTally(None if calibration is None else calibration.score_map, threshold)
        outputs = chosen_outputs(protocol.outputs)      # the result files asked for (--outputs)
        with ResultWriter(out_dir, info.path.name, info.height, info.width, info.mpp, plan.channel_names,
                          class_names, chunk_px=min(512, protocol.tile_size),
                          expansion_columns=None if expansion is None else expansion.columns,
                          geojson_gzip_above_mb=protocol.geojson_gzip_above_mb,
                          extra_columns=REGION_COLUMNS if tally is not None else None,
                          outputs=outputs) as result:
            # Measuring in processes of their own where there are the cores for it; cells grown from the nuclei
            # need the tiles' label images and pixels here, so they are measured in this thread.
            processes = measure_processes_for(usable_cores()) if expansion is None else 0
            measurer = TileMeasurer(processes, info.path, slide.skip_unreadable, info.mpp, plan.channel_names,
                                    class_names, z=info.z, series=info.series, t=info.t) \
                if processes else None
            with measurer or nullcontext():
                emitter = NucleusEmitter(slide, plan.tiles, result, plan.channel_names, class_names, timer,
                                         expansion=expansion, tally=tally, scores=scores, measurer=measurer)
                merge_tiles(gathered_below(owned, scores, plan.regions), plan.tiles_per_row, merger, emitter, timer)
            unreadable = slide.unreadable
            if unreadable:
                # Unreadable regions are no tissue: out of the tissue area, the density, the tissue mask, the overlay.
                plan = dataclasses.replace(plan, tissue=plan.tissue.without([r.box for r in unreadable]))
            inside = None      # with regions: the tissue mask's pixels inside any region
            analysed_tissue = plan.tissue
            if plan.regions is not None:
                inside = plan.regions.covers_grid(plan.tissue.mask.shape, plan.tissue.row_factor,
                                                  plan.tissue.col_factor)
                # tissue_mask.png shows the tissue analysed: the report's densities and crops stay in the regions
                analysed_tissue = dataclasses.replace(plan.tissue, mask=plan.tissue.mask & inside)
            with timer("write"):
                panoptic = result.finish(plan.thumbnail, plan.thumb_factor, analysed_tissue)
            summary = build_summary(info, protocol, plan, result.cell_count, result.all_areas(), merger.stats,
                                    panoptic.describe(), timer, self.started, result.all_cell_areas())
            if slide.skip_unreadable:
                summary["unreadable"] = [r.to_dict() for r in unreadable]
                summary["unreadable_area_px"] = int(sum(r.box.height * r.box.width for r in unreadable))
            tissue_px = float(plan.tissue.area_px())
            if tally is not None:
                table = tally.table(plan.tissue, info.mpp)
                tissue_px = plan.regions.tissue_area(plan.tissue)
                regions_record(summary, table, tissue_px, info.mpp)
                region_estimates(table, calibration, calibration_note, *tally.sums(), threshold)
                if "regions.csv" in outputs:
                    result.write_file("regions.csv", write_regions_csv, out_dir / "regions.csv", table)
            summary["count_estimate"] = estimate_record(calibration, calibration_note, result.cell_count,
                                                        scores.expected_true, float(result.all_areas().sum()),
                                                        tissue_px, threshold)
            summary["score_curve"] = scores.curve(available=not (run_info.model or {}).get("test_time_augmentation"))
            result.write_file(BELOW_FILE, scores.write_below, out_dir / BELOW_FILE)
            result.write_json("summary.json", summary)
            result.write_json("run.json", run_record(info, protocol, plan, tissue_info, run_info))
            if "report.html" in outputs:
                # The report reads the files just written (and the open slide for its crops) while overlay.png and
                # the label images are still being written; it waits for overlay.png only for the density map and
                # for labels.ome.tif only for its crops. Its warnings go to summary.json.
                from ..results import write_error, write_report
                report_started = time.perf_counter()
                try:
                    # its own stage in summary.json's final times; the page shows the times as they stood when it
                    # began (it cannot time itself) and says so
                    with timer("report"):
                        write_report(out_dir, slide.slide, record=summary, pictures=result.wait_pictures,
                                     label_images=result.wait_label_images, times_final=False)
                except OSError as e:     # no space left, no permission: one line, as for the other result files
                    raise write_error("report.html", out_dir, e) from e
                log.info("%s: report.html in %.2f s", info.path.name, time.perf_counter() - report_started)
            with timer("write"):
                result.wait_label_images()
            summary["seconds"] = {**timer.to_dict(), "total": round(time.time() - self.started, 3)}
            result.write_json("summary.json", summary)      # with the label images' time
        return summary


_NO_NUCLEI = Instances.empty()


def drop_unreadable(nuclei: Instances, regions) -> Instances:
    """`nuclei` less those whose mask centroid lies in an unreadable region (slide.UnreadableRegion): nothing was
    seen there. The owning tile's read met every region its nuclei's centroids can lie in (a nucleus lies in its
    tile's read box), so the regions are known by the time its nuclei are."""
    if not regions:
        return nuclei
    below = nuclei.below
    if len(below):
        centre_row, centre_col = (below[:, 0] + below[:, 2]) / 2, (below[:, 1] + below[:, 3]) / 2
        seen = np.ones(len(below), bool)
        for r in regions:
            b = r.box
            seen &= ~((centre_row >= b.row0) & (centre_row < b.row1) & (centre_col >= b.col0) & (centre_col < b.col1))
        below = below[seen]
    if not len(nuclei):
        return dataclasses.replace(nuclei, below=below)
    keep = np.ones(len(nuclei), bool)
    for k, (box, mask) in enumerate(zip(nuclei.boxes, nuclei.masks)):
        near = [r.box for r in regions if r.box.row0 < box[2] and box[0] < r.box.row1
                and r.box.col0 < box[3] and box[1] < r.box.col1]
        if near:
            rows, cols = np.nonzero(mask)
            row, col = box[0] + rows.mean(), box[1] + cols.mean()
            keep[k] = not any(b.row0 <= row < b.row1 and b.col0 <= col < b.col1 for b in near)
    return dataclasses.replace(nuclei if keep.all() else nuclei.take(np.flatnonzero(keep)), below=below)


def gathered_below(owned: Iterable[tuple[TileSpec, Instances]], scores: ScoreTally,
                   regions=None) -> Iterator[tuple[TileSpec, Instances]]:
    """The same tiles, their below-threshold candidates (Instances.below) handed to `scores` on the way (with
    regions, those whose box centre lies in one)."""
    for tile, nuclei in owned:
        below = nuclei.below
        if len(below) and regions is not None:
            below = below[regions.membership((below[:, 0] + below[:, 2]) / 2, (below[:, 1] + below[:, 3]) / 2).any(1)]
        scores.add_below(below)
        yield tile, nuclei


def reported(owned: Iterable[tuple[TileSpec, Instances]], plan: SlidePlan,
             progress: Progress | None = None) -> Iterator[tuple[TileSpec, Instances]]:
    """The same tiles, calling progress(analysed tiles done, to analyse) after each analysed one."""
    total = sum(plan.keep)
    if progress is not None:
        progress(0, total)
    done = 0
    for tile, nuclei in owned:
        if plan.keep[tile.index]:
            done += 1
            if progress is not None:
                progress(done, total)
        yield tile, nuclei


def merge_tiles(owned: Iterable[tuple[TileSpec, Instances]], tiles_per_row: int, merger: SeamMerger,
                emitter: NucleusEmitter, timer: StageTimer) -> None:
    """Seam dedupe of every tile's owned nuclei, in grid order; each finished row of nuclei goes to `emitter`."""
    for tile, nuclei in owned:
        with timer("merge"):
            merger.add_tile(tile, nuclei)
            # Grid row r is complete: row r - 1 can no longer change.
            done = (merger.pop_final(tile.grid_row - 1)
                    if tile.grid_col == tiles_per_row - 1 and tile.grid_row > 0 else None)
        if done is not None:
            emitter.emit(done, through_row=tile.grid_row - 1)
    with timer("merge"):
        done = merger.pop_final(None)
    emitter.emit(done)


@dataclass
class NucleusEmitter:
    """Gives final nuclei their ids (1, 2, ... in emission order), measures them per owning tile and hands them
    to the result writer.

    With an expansion (cells/expansion_rows.py) each tile's nuclei are also grown into cells, which needs the final nuclei of
    the rows around them: a row's tiles are then measured and written `expansion.rows` tile rows later (they wait,
    already numbered, so the ids are those of a count without expansion) and the nuclei of those rows are kept.
    """

    slide: CachedSlide          # the pixels of the tiles read for detection are measured again
    tiles: list[TileSpec]
    result: ResultWriter
    channel_names: list[str]
    class_names: list[str]
    timer: StageTimer
    next_id: int = 1
    expansion: CellExpansion | None = None
    tally: RegionTally | None = None     # counting in regions: only nuclei whose centroid lies in one are kept
    scores: ScoreTally | None = None     # p_nucleus (cells.csv) and what the count's uncertainty needs
    measurer: TileMeasurer | None = None     # measuring processes (run/measuring.py); None: in this thread
    _waiting: list[tuple[TileSpec, np.ndarray, Instances]] = field(default_factory=list, init=False, repr=False)
    _nuclei: FinalNuclei = field(default_factory=FinalNuclei, init=False, repr=False)

    def emit(self, nuclei: Instances, through_row: int | None = None) -> None:
        """Measure and write `nuclei`, the final nuclei of the tile rows <= through_row (None: all rows, the last
        call: every tile still being measured is written too)."""
        if self.tally is not None and len(nuclei):
            # The seam rule has decided which tile keeps each nucleus; the regions only filter the final ones.
            centroids, _ = centroids_and_areas(nuclei.boxes, nuclei.masks)
            inside = self.tally.regions.membership(centroids[:, 0], centroids[:, 1]).any(1)
            nuclei = nuclei.take(np.flatnonzero(inside))
        parts = self._number(nuclei)
        if self.expansion is None:
            ready, done_through = parts, through_row
        else:
            # A row's cells are drawn once the nuclei of the `rows` rows below it are final too.
            for tile, ids, part in parts:
                self._nuclei.add(tile.grid_row, ids, part)
            self._waiting += parts
            done_through = None if through_row is None else through_row - self.expansion.rows
            due = [done_through is None or tile.grid_row <= done_through for tile, _, _ in self._waiting]
            ready = [p for p, d in zip(self._waiting, due) if d]
            self._waiting = [p for p, d in zip(self._waiting, due) if not d]
        for tile, ids, part in ready:
            self._write_tile(tile, ids, part)
        if through_row is None:
            self._flush()
        if self.expansion is not None and done_through is not None:
            self._nuclei.forget(done_through - self.expansion.rows)    # no cell still to draw can reach them
        self.slide.release(done_through)

    def _number(self, nuclei: Instances) -> list[tuple[TileSpec, np.ndarray, Instances]]:
        """`nuclei` split by owning tile, each part with its ids (cells.csv's cell_id: the next ones, in tile order)."""
        if not len(nuclei):
            return []
        # Cells come grouped by tile (pop_final sorts them so); a stable sort keeps any order safe and
        # splits the groups in one pass instead of one scan of all nuclei per tile.
        order = np.argsort(nuclei.tile_index, kind="stable")
        tile_of = nuclei.tile_index[order]
        starts = np.flatnonzero(np.r_[True, tile_of[1:] != tile_of[:-1]])
        parts = []
        for start, stop in zip(starts, np.r_[starts[1:], len(order)]):
            part = nuclei.take(order[start:stop])
            ids = np.arange(self.next_id, self.next_id + len(part), dtype=np.int64)
            self.next_id += len(part)
            parts.append((self.tiles[int(tile_of[start])], ids, part))
        return parts

    def _write_tile(self, tile: TileSpec, ids: np.ndarray, part: Instances) -> None:
        if self.measurer is not None and self.expansion is None:
            # measured in a process of its own (run/measuring.py): the rows come back later, in tile order
            with self.timer("measure"):
                measured = self.measurer.measure((tile, ids, part), part, ids, tile.read)
            for (done_tile, done_ids, done_part), rows in measured:
                self._write_rows(done_tile, done_ids, done_part, rows)
            return
        with self.timer("measure"):
            labels, painted = painted_tile(part, ids, tile.read)
            pixels = self.slide.read_region(tile.read)
            rows = measure_tile(part, ids, labels, pixels, tile.read, self.slide.info.mpp,
                                self.channel_names, self.class_names, painted)
        self._write_rows(tile, ids, part, rows, labels, pixels)

    def _flush(self) -> None:
        """Write the tiles still being measured in the measuring processes."""
        if self.measurer is None:
            return
        with self.timer("measure"):
            measured = self.measurer.flush()
        for (tile, ids, part), rows in measured:
            self._write_rows(tile, ids, part, rows)

    def _write_rows(self, tile: TileSpec, ids: np.ndarray, part: Instances, rows: dict[str, np.ndarray],
                    labels: np.ndarray | None = None, pixels: np.ndarray | None = None) -> None:
        """One tile's measured nuclei to the result files, with p_nucleus, their regions and (labels and pixels
        given: measured in this thread) the cells grown from them."""
        p_nucleus = None
        if self.scores is not None:
            rows["p_nucleus"] = p_nucleus = self.scores.p_nucleus(rows["score"])
            self.scores.add_nuclei(rows["score"], p_nucleus)
        if self.tally is not None:
            member = self.tally.regions.membership(rows["centroid_row_px"], rows["centroid_col_px"])
            rows["region"] = self.tally.regions.labels(member)
            self.tally.add(member, rows["area_px"], p_nucleus)
        expanded = None
        if self.expansion is not None:
            with self.timer("expand"):
                cells, cells_box, columns = expand_tile(self.expansion, self._nuclei, ids, part, labels, tile.read,
                                                        pixels, self.slide.read_region)
            rows.update(columns)
            expanded = (cells_box, cells)
        if labels is None and self.result.takes_label_tiles:
            with self.timer("measure"):
                labels = label_tile(part, ids, tile.read)
        with self.timer("write"):
            self.result.add_nuclei(tile.read, ids, part, labels, rows, expanded)
