"""Tiles' nuclei measured beside the count, in processes of their own, where a machine has the cores for it.

Measuring a tile (cells.label_tile + cells.measure_tile: ~4 ms for a dense 640² tile on one core) is numpy driven
from Python. In the count's own process it shares one interpreter with the seam merge and, on a GPU, with the
detection thread that feeds the GPU: on a lent H100 (16 cores) a 20480² count spent 9.3 s measuring and 7.1 s
merging in its main thread while the detection thread, busy 2/3 of the time, waited for the interpreter, and the
network-free pipeline stopped growing past 8 cores (docs/performance.md). So from MEASURE_PROCESS_CORES cores on,
`TileMeasurer` hands each tile's final nuclei (masks at box size, a few kB) and its pixels to a pool of processes and
takes their rows back in the order given: the same cells.csv, byte for byte, as measured in the thread. On fewer
cores the second core is already busy with the result files' process, and a tile measured in the thread costs less
than one pickled to a process and back.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from ..cells import label_and_measure
from ..geometry import Box, Instances

log = logging.getLogger(__name__)

MEASURE_PROCESS_CORES = 4       # from this many cores on, tiles are measured in processes of their own
MAX_MEASURE_PROCESSES = 4       # a process measures ~250 dense tiles/s: four keep up with any GPU we have seen
IN_FLIGHT_PER_PROCESS = 4       # tiles handed over and not yet taken back, per process: memory stays a few tiles

# None: by the cores (measure_processes_for); 0: in the count's thread; N: N processes (tests, benchmarks).
measure_processes: int | None = None


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def measure_processes_for(n_cores: int) -> int:
    """How many measuring processes a count on `n_cores` cores uses (0: it measures in its own thread)."""
    if measure_processes is not None:
        return measure_processes
    # a daemonic process (a Dask worker's, by default) may not start processes of its own
    if n_cores < MEASURE_PROCESS_CORES or multiprocessing.current_process().daemon:
        return 0
    return min(MAX_MEASURE_PROCESSES, n_cores // 4)


_pool: ProcessPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _ready() -> None:
    """A spare process's first task: its imports done (cellseg.cells's measuring) before a tile needs it."""


def measuring_pool(processes: int) -> ProcessPoolExecutor:
    """The processes tiles are measured in, started once and kept for the next slides (a CellCounter counts many)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != processes:
            if _pool is not None:
                _pool.shutdown(wait=False, cancel_futures=True)
            # spawn, not fork: the count's process has threads (detection, readers, writers) and maybe a CUDA context
            _pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
            _pool_size = processes
            for _ in range(processes):
                _pool.submit(_ready)
        return _pool


def _forget_pool() -> None:
    """After a process died (killed for memory): the next count starts new ones."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None


def start_spare_measurers() -> None:
    """Start, now, the measuring processes a count on this machine would use, so that their start overlaps the
    caller's own (CellCounter.load: the network's loading)."""
    processes = measure_processes_for(cores())
    if processes:
        measuring_pool(processes)


_opened: dict[tuple, object] = {}     # in a measuring process: the slide its last tile came from, kept open


def _measure_tile(slide_key: tuple, nuclei: Instances, ids: np.ndarray, box: Box, mpp: float | None,
                  channel_names: list[str], class_names: list[str]) -> dict[str, np.ndarray]:
    """In a measuring process: one tile's measurements (cells.label_and_measure), its pixels read here from the
    slide (open_slide's path and skip_unreadable, then the file's size and time, in `slide_key`)."""
    slide = _opened.get(slide_key)
    if slide is None:
        for other in _opened.values():
            other.close()
        _opened.clear()
        from ..slides import open_slide
        slide = _opened[slide_key] = open_slide(slide_key[0], skip_unreadable=slide_key[1])
    return label_and_measure(nuclei, ids, box, slide.read_region(box), mpp, channel_names, class_names)


class TileMeasurer:
    """Measures tiles' nuclei in `processes` processes (cells.label_and_measure) and hands their rows back in the
    order the tiles came, with at most IN_FLIGHT_PER_PROCESS x processes tiles handed over and not taken back.

    A tile crosses as its nuclei alone (a few kB): the processes read its pixels from the slide themselves (decoding
    a tile costs a process ~2 ms; pickling its pixels cost the count's thread ~1.3 ms of the ~4 ms it saves).
    slide_path, skip_unreadable: as the count opened the slide (slides.open_slide); mpp, channel_names,
    class_names: as cells.measure_tile takes them.
    """

    def __init__(self, processes: int, slide_path: Path, skip_unreadable: bool, mpp: float | None,
                 channel_names: list[str], class_names: list[str]):
        if processes < 1:
            raise ValueError(f"expected at least one measuring process, got {processes}")
        self.processes = processes
        stat = os.stat(slide_path)    # a file replaced at the same path is opened anew
        self.slide_key = (str(slide_path), bool(skip_unreadable), stat.st_size, stat.st_mtime_ns)
        self.mpp, self.channel_names, self.class_names = mpp, list(channel_names), list(class_names)
        self._pool = measuring_pool(processes)
        self._pending: deque[tuple[object, Future]] = deque()

    def measure(self, key: object, nuclei: Instances, ids: np.ndarray, box: Box
                ) -> list[tuple[object, dict[str, np.ndarray]]]:
        """Hand over one tile's nuclei (`ids` theirs, `box` its read box). Returns (key, rows) of the tiles measured
        by now, in the order given."""
        try:
            future = self._pool.submit(_measure_tile, self.slide_key, nuclei, ids, box, self.mpp, self.channel_names,
                                       self.class_names)
        except BrokenProcessPool:
            _forget_pool()
            raise
        self._pending.append((key, future))
        return self._taken(wait=len(self._pending) > IN_FLIGHT_PER_PROCESS * self.processes)

    def flush(self) -> list[tuple[object, dict[str, np.ndarray]]]:
        """(key, rows) of every tile still being measured, in the order given."""
        done = []
        while self._pending:
            done += self._taken(wait=True)
        return done

    def _taken(self, wait: bool) -> list[tuple[object, dict[str, np.ndarray]]]:
        """The tiles measured, from the oldest on; with `wait`, at least the oldest (waited for)."""
        done = []
        while self._pending and (wait or self._pending[0][1].done()):
            key, future = self._pending.popleft()
            try:
                done.append((key, future.result()))
            except BrokenProcessPool:
                _forget_pool()
                raise
            wait = False
        return done
