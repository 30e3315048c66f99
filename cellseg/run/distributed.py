"""Counting on a Dask cluster (dask.distributed): `cellseg count SLIDES... --workers N` (a local cluster of N worker
processes) or `--scheduler tcp://HOST:PORT` (an existing one, however it was started: `dask scheduler` +
`dask worker`, dask-jobqueue on Slurm or LSF, Kubernetes).

Each slide becomes the steps of the single-process pipeline (pipeline.SlideRun) as tasks, its journal (run/journal.py)
holding what they hand on:

    plan     SlideRun.plan: planning.plan_slide (or the journal's plan, on resume),
             journaled                                                                     GPU resource
    band     SlideRun.detect_band: one band of tile rows (tiling.Band), its analysed
             tiles detected, each tile's owned cells journaled; returns counts             GPU resource
    finish   SlideRun.finish fed from the journaled bands in grid order: seam merge,
             ids, measurements, result files; returns the summary                          no resource

so a distributed count gives the cells of a single-process one, band borders being tile borders. The client
(this process) opens each slide's journal, submits its tasks, commits the finished result and counts progress;
slides are started a few at a time (memory stays flat whatever the cohort's size), earlier slides first.
Slides and result folders must lie on storage every worker sees at the same path, as a cluster's shared file
system does. The `GPU` resource is asked for only when some worker offers it (`dask worker --resources GPU=1`).

Each worker loads the counter once (CounterPlugin, at the first task that needs the network) and calibrates it
once per slide. A worker that dies costs its running tasks, which Dask runs again elsewhere: a band file is
written atomically and the final step starts from an empty folder, so a retry changes nothing. A task failing on
bad input (CellsegError) fails its slide only; any other failure keeps the slide's journal for --resume.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

from distributed import WorkerPlugin

from ..errors import CellsegError, JournalError, ParameterError
from ..geometry import Band
from ..planning import Protocol, SlidePlan
from ..results import RunInfo
from ..slides import open_slide
from ..util import usable_cores
from .cohort import JobProgress, SlideOutcome, begin, image_settings, job_outcome
from .counter import CounterSpec
from .journal import Journal, done_bands, fresh_result_folder
from .pipeline import Calibration, SlideRun

log = logging.getLogger(__name__)

SLIDES_PER_WORKER = 2   # slides in flight per worker: enough to keep it busy between one slide's steps
CONNECT_TIMEOUT = "20s"   # to reach an existing scheduler


# --------------------------------------------------------------------------- on the workers

class CounterPlugin(WorkerPlugin):
    """A worker's CellCounter, loaded from `spec` at the first task that needs it and kept for the whole job.

    `lock` serialises the tasks that calibrate and run the detector (a worker with several threads shares one
    network), and `calibration` keeps the detector calibrated for the last slide, with that slide's key."""

    def __init__(self, spec: CounterSpec):
        self.spec = spec

    def setup(self, worker) -> None:
        self.lock = threading.Lock()
        self._counter = None
        self.calibration = Calibration()
        self.loads = 0

    def counter(self):
        with self.lock:
            if self._counter is None:
                self._counter = self.spec.load()
                self.loads += 1
            return self._counter

    def teardown(self, worker) -> None:
        self._counter = None


@dataclass
class PlannedSlide:
    """A plan task's answer: the plan and what the final step needs of the worker's counter."""

    plan: SlidePlan
    class_names: list[str]
    tissue_info: dict
    run_info: RunInfo
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class BandDone:
    band: int
    tiles: int
    cells: int
    seconds: dict[str, float]
    worker: str


def _plugin(name: str) -> CounterPlugin:
    from distributed import get_worker
    return get_worker().plugins[name]


def plan_task(plugin_name: str, slide: str, journal: str, image: tuple[int | None, int | None]) -> PlannedSlide:
    """The slide's plan (image: the file's (series, t) counted: the job's, else the counter's --series and --t)."""
    plugin = _plugin(plugin_name)
    counter = plugin.counter()
    with plugin.lock, open_slide(slide, mpp=counter.mpp, z=counter.z, series=image[0], t=image[1]) as opened:
        run = SlideRun(opened, counter.protocol, counter.detector, journal=Path(journal),
                       calibration=plugin.calibration)
        plan = run.plan(counter.tissue, model_diameter_px=counter.model_diameter_px,
                        diameter_px=counter.diameter_px, regions=counter.regions, micron_scale=counter.micron_scale)
    return PlannedSlide(plan, list(counter.detector.class_names), counter.tissue.describe(), counter.run_info,
                        run.timer.to_dict())


def outline_task(planned: PlannedSlide, band_rows: int | None) -> list[tuple[Band, int]]:
    """The slide's bands and how many tiles each analyses (small: what the client needs to plan the bands)."""
    plan = planned.plan
    return [(band, sum(plan.keep[t.index] for t in band.tiles(plan.tiles, plan.tiles_per_row)))
            for band in plan.bands(band_rows)]


def band_task(plugin_name: str, slide: str, image: tuple[int | None, int | None], planned: PlannedSlide, band: Band,
              journal: str) -> BandDone:
    from distributed import get_worker
    plugin = _plugin(plugin_name)
    counter = plugin.counter()
    plan = planned.plan
    with plugin.lock, open_slide(slide, mpp=counter.mpp, z=counter.z, series=image[0], t=image[1]) as opened:
        # Nothing here measures the cells: the pixels read are not kept.
        run = SlideRun(opened, counter.protocol, counter.detector, journal=Path(journal), plan=plan,
                       keep_pixels=False, calibration=plugin.calibration)
        cells = sum(len(c) for _, c in run.detect_band(band))
    analysed = sum(plan.keep[t.index] for t in band.tiles(plan.tiles, plan.tiles_per_row))
    return BandDone(band.index, analysed, cells, run.timer.to_dict(), str(get_worker().name))


def finish_task(slide: str, planned: PlannedSlide, band_rows: int | None, journal: str, protocol: Protocol,
                mpp: float | None, z: int | str | None, image: tuple[int | None, int | None], fingerprint: dict,
                distributed: dict, started: float, done: list[BandDone]) -> dict:
    """SlideRun.finish on the journaled bands; stage seconds include the plan's and the bands'. run.json records
    the journal's fingerprint and `distributed`, how the count was spread over the cluster."""
    folder = Path(journal)
    with open_slide(slide, mpp=mpp, z=z, series=image[0], t=image[1]) as opened:
        run = SlideRun(opened, protocol, journal=folder, band_rows=band_rows, plan=planned.plan, started=started)
        missing = sorted({b.index for b in run.bands()} - done_bands(folder))
        if missing:
            raise JournalError(f"expected every band of {slide} in {folder} before the final step, found band "
                               f"{missing[0]} missing")
        for seconds in [planned.seconds, *(d.seconds for d in done)]:
            for stage, s in seconds.items():
                run.timer.seconds[stage] += s
        return run.finish(run.owned_tiles(), fresh_result_folder(folder), planned.class_names, planned.tissue_info,
                          replace(planned.run_info, fingerprint=fingerprint, distributed=distributed))


# --------------------------------------------------------------------------- the client

def count_on_dask(spec: CounterSpec, jobs: list[tuple], *, workers: int | None = None,
                  scheduler: str | None = None, resume: bool = False, band_rows: int | None = None,
                  progress: JobProgress | None = None) -> list[SlideOutcome]:
    """Count each (slide, result folder) of `jobs` on a Dask cluster: a local one of `workers` processes, or the
    one whose scheduler is at `scheduler`; a job (slide, result folder, series, t) counts that image and time point
    of the file (cohort.job_outcome). One SlideOutcome per job, in order (cohort.count_serially's)."""
    settings = spec.settings()
    job = None
    try:
        with connect(workers, scheduler) as client:
            name = f"cellseg-counter-{uuid.uuid4().hex[:8]}"
            client.register_plugin(CounterPlugin(spec), name=name)
            try:
                job = _Job(client, spec, name, settings, resume, band_rows, progress)
                return job.run(jobs)
            finally:
                with suppress(Exception):
                    client.unregister_worker_plugin(name)
    except BaseException as exc:    # Ctrl-C or a lost scheduler: the journals are kept for --resume
        # once a local cluster has stopped: its workers' bands under way are all in, or none of them, when the
        # journal is let go and its finished bands are told
        if job is not None:
            job.end_unfinished(exc)
        raise


@contextmanager
def connect(workers: int | None, scheduler: str | None) -> Iterator:
    """A Client of a new local cluster of `workers` processes (one thread each, the cores shared out among their
    numerical libraries), or of the existing scheduler at `scheduler` (waiting for a first worker to join)."""
    import dask
    from distributed import Client, LocalCluster
    if (workers is None) == (scheduler is None):
        raise ParameterError("expected either --workers N or --scheduler ADDRESS, got "
                             f"{'both' if workers is not None else 'neither'}")
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout=CONNECT_TIMEOUT, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise CellsegError(f"expected a Dask scheduler at {scheduler}, could not reach one ({exc})") from exc
        with client:
            if not client.scheduler_info()["workers"]:
                log.warning("waiting for a Dask worker to join %s", scheduler)
            client.wait_for_workers(1)
            yield client
        return
    # Dask starts workers with 1 OpenMP thread each; a worker's network gets its share of the cores instead. And
    # without Dask's MALLOC_TRIM_THRESHOLD_: a fixed threshold turns glibc's adaptive mmap threshold off, so the
    # network's large buffers are mapped and faulted in anew at every allocation (measured: detection 15-25 % slower
    # on a CPU); the pipeline trims where it frees much (memory.release_freed_memory). Set for the cluster's
    # lifetime: a worker restarted after a crash gets the same.
    threads = max(1, usable_cores() // workers)      # its affinity and CPU quota: not every core of the server
    environ = {k: threads for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    with _caller_environment_kept(environ), dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        with _ctrl_c_left_to_this_process():
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                                   silence_logs=logging.ERROR)
        with cluster, Client(cluster, set_as_default=False) as client:
            level = logging.getLogger("distributed").getEffectiveLevel()
            client.register_plugin(_WorkerLogLevel(level if level < logging.ERROR else logging.CRITICAL),
                                   name="cellseg-log-level")
            client.register_plugin(_WorkerThreads(threads), name="cellseg-threads")
            yield client


@contextmanager
def _ctrl_c_left_to_this_process() -> Iterator[None]:
    """Local workers started within ignore Ctrl-C. A terminal's Ctrl-C reaches every process of its group: each
    worker printed a traceback and went on with its band after this process had kept the journal and let it go.
    Ignored when a process starts, SIGINT stays ignored in Python; this process stops the cluster itself. (Only
    the main thread may set a handler: elsewhere, napari's for one, there is no terminal to press Ctrl-C in.)"""
    import signal
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


@contextmanager
def _caller_environment_kept(names) -> Iterator[None]:
    """Put this process's environment variables `names` back as they were when the block ends. A Nanny sets its
    pre-spawn environment in the process that starts the workers, this one (distributed's nanny.py), and leaves it:
    a napari session or a notebook would run every later subprocess with 1 OpenMP/MKL thread, and their arithmetic
    would differ from its own (torch's results depend on the thread count)."""
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _WorkerThreads(WorkerPlugin):
    """A local worker's share of the cores for the network's threads, set in the worker itself: the pre-spawn
    environment alone is not enough, because a worker forked from a process that an earlier cluster started (a
    forkserver) keeps that cluster's environment, and a torch already imported keeps its thread count."""

    def __init__(self, threads: int):
        self.threads = threads

    def setup(self, worker) -> None:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[name] = str(self.threads)         # for a torch imported later, by the first task
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(self.threads)


class _WorkerLogLevel(WorkerPlugin):
    """The log level of a local cluster's workers, which share this process's terminal: quiet by default (a task's
    failure reaches the client through its future, and cellseg reports it in one line)."""

    def __init__(self, level: int):
        self.level = level

    def setup(self, worker) -> None:
        logging.getLogger("distributed").setLevel(self.level)


@dataclass
class _Slide:
    """One slide of the job while it is in flight: its journal and futures."""

    index: int
    outcome: SlideOutcome
    journal: Journal | None = None
    path: str = ""                            # the slide's absolute path
    image: tuple = (None, None)               # the file's (series, t) counted: the job's, else the counter's
    started: float = 0.0
    planned: object = None                    # the plan task's future
    bands: list[tuple[Band, int]] = field(default_factory=list)
    futures: list = field(default_factory=list)
    tiles_planned: int = 0
    tiles_done: int = 0


class _Job:
    def __init__(self, client, spec: CounterSpec, plugin: str, settings: dict, resume: bool,
                 band_rows: int | None, progress: JobProgress | None):
        self.client, self.spec, self.plugin, self.settings = client, spec, plugin, settings
        self.resume, self.band_rows, self.progress = resume, band_rows, progress
        info = client.scheduler_info()
        offers_gpu = any("GPU" in (w.get("resources") or {}) for w in info["workers"].values())
        self.gpu = {"GPU": 1} if offers_gpu else None
        self.max_in_flight = max(2, SLIDES_PER_WORKER * len(info["workers"]))
        self.record = {"scheduler": info.get("address"), "workers": len(info["workers"]),
                       "gpu_resource": offers_gpu}
        self.owner: dict[str, tuple[_Slide, str]] = {}      # future key -> (slide, what it computes)
        self.unfinished: list[_Slide] = []                   # in flight when the job was stopped

    def run(self, jobs: list[tuple]) -> list[SlideOutcome]:
        from distributed import as_completed
        slides = [_Slide(i, job_outcome(job)) for i, job in enumerate(jobs)]
        for slide in slides:
            outcome = slide.outcome
            slide.image = (self.spec.series if outcome.series is None else outcome.series,
                           self.spec.t if outcome.t is None else outcome.t)
        waiting = list(slides)
        self.pending = as_completed(loop=self.client.loop)
        in_flight = self._start(waiting, 0)
        try:
            for future in self.pending:
                slide, kind = self.owner.pop(future.key, (None, None))
                if slide is None or slide.journal is None:     # its slide has failed already
                    continue
                if future.status != "finished":
                    self._fail(slide, future)
                elif kind == "outline":
                    self._submit_bands(slide, future.result())
                elif kind == "band":
                    done = future.result()
                    self._advance(slide, done.tiles)
                elif kind == "finish":
                    self._commit(slide, future.result())
                if slide.journal is None:
                    in_flight -= 1
                    in_flight = self._start(waiting, in_flight)
        except BaseException:   # the journals of the slides in flight are ended by count_on_dask
            self.unfinished = [slide for slide in slides if slide.journal is not None]
            raise
        return [s.outcome for s in slides]

    def end_unfinished(self, error: BaseException) -> None:
        """End the journals of the slides in flight when the job was stopped by `error` (Journal.end)."""
        for slide in self.unfinished:
            slide.journal.end(error)
            slide.journal = None
        self.unfinished = []

    def _start(self, waiting: list[_Slide], in_flight: int) -> int:
        while waiting and in_flight < self.max_in_flight:
            slide = waiting.pop(0)
            outcome = slide.outcome
            try:
                slide.journal, outcome.summary = begin(outcome.slide, outcome.out,
                                                       image_settings(self.settings, outcome.series, outcome.t),
                                                       mpp=self.spec.mpp, z=self.spec.z, series=slide.image[0],
                                                       t=slide.image[1], resume=self.resume, band_rows=self.band_rows)
            except CellsegError as e:
                outcome.error = e
                continue
            if slide.journal is None:
                outcome.skipped = True
                continue
            outcome.kept_bands = slide.journal.kept_bands
            slide.started = time.time()
            slide.path = os.path.abspath(outcome.slide)      # workers may run in another folder, or machine
            folder = str(slide.journal.folder)              # absolute
            slide.planned = self._submit(slide, "plan", plan_task, self.plugin, slide.path, folder, slide.image,
                                         resources=self.gpu, watch=False)
            self._submit(slide, "outline", outline_task, slide.planned, slide.journal.band_rows)
            in_flight += 1
        return in_flight

    def _submit(self, slide: _Slide, kind: str, fn, *args, resources=None, watch: bool = True):
        future = self.client.submit(fn, *args, resources=resources, priority=-slide.index, pure=False,
                                    key=f"cellseg-{kind}-{slide.index}-{uuid.uuid4().hex[:8]}")
        slide.futures.append(future)
        if watch:
            self.owner[future.key] = (slide, kind)
            self.pending.add(future)
        return future

    def _submit_bands(self, slide: _Slide, bands: list[tuple[Band, int]]) -> None:
        folder = slide.journal.folder
        done = done_bands(folder)
        slide.bands = bands
        slide.tiles_planned = sum(n for _, n in bands)
        if self.progress is not None:
            self.progress.planned(slide.tiles_planned)
        self._advance(slide, sum(n for b, n in bands if b.index in done))
        band_futures = [self._submit(slide, "band", band_task, self.plugin, slide.path, slide.image, slide.planned,
                                     band, str(folder), resources=self.gpu)
                        for band, _ in bands if band.index not in done]
        spread = {**self.record, "band_rows": slide.journal.band_rows, "bands": len(bands),
                  "bands_from_journal": len(bands) - len(band_futures)}
        self._submit(slide, "finish", finish_task, slide.path, slide.planned, slide.journal.band_rows,
                     str(folder), self.spec.protocol, self.spec.mpp, self.spec.z, slide.image,
                     slide.journal.fingerprint, spread, slide.started, band_futures)

    def _advance(self, slide: _Slide, tiles: int) -> None:
        slide.tiles_done += tiles
        if self.progress is not None and tiles:
            self.progress.analysed(tiles)

    def _commit(self, slide: _Slide, summary: dict) -> None:
        try:
            slide.journal.commit()
            slide.outcome.summary = summary
        except CellsegError as e:
            slide.outcome.error = slide.journal.told(e)
            slide.journal.end(e)
        self._release(slide)

    def _fail(self, slide: _Slide, future) -> None:
        error = future.exception() if future.status == "error" else None
        if isinstance(error, CellsegError):
            slide.outcome.error = slide.journal.told(error)
        else:
            what = f"{type(error).__name__}: {error}" if error is not None else f"a task was {future.status}"
            log.debug("slide %s failed", slide.outcome.slide, exc_info=error)
            slide.outcome.error = CellsegError(f"expected the Dask tasks of this slide to finish, one failed "
                                               f"({what}); its finished bands are kept for --resume")
        slide.journal.end(error if error is not None else RuntimeError(future.status))
        if self.progress is not None:
            self.progress.planned(slide.tiles_done - slide.tiles_planned)
        self._release(slide)

    def _release(self, slide: _Slide) -> None:
        self.client.cancel([f for f in slide.futures if not f.done()])
        for f in slide.futures:
            self.owner.pop(f.key, None)
        slide.futures, slide.planned, slide.journal = [], None, None
