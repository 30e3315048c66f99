"""Tiles' nuclei measured beside the count, in processes of their own, where a machine has the cores for it.

Measuring a tile (cells.label_tile + cells.measure_tile: ~4 ms for a dense 640² tile on one core) is numpy driven
from Python. In the count's own process it shares one interpreter with the seam merge and, on a GPU, with the
detection thread that feeds the GPU: on a lent H100 (16 cores) a 20480² count spent 9.3 s measuring and 7.1 s
merging in its main thread while the detection thread, busy 2/3 of the time, waited for the interpreter, and the
network-free pipeline stopped growing past 8 cores (docs/performance.md). So from MEASURE_PROCESS_CORES cores on,
`TileMeasurer` hands each tile's final nuclei (masks at box size, a few kB) to child interpreters
(run/measure_process.py), which read the tile's pixels from the slide themselves, and takes the rows back in the
order the tiles came: the same cells.csv, byte for byte, as measured in the count's thread. On fewer cores the
second core is already busy with the result files' process, and measuring in the thread costs less.

Each child has a courier thread here that sends it one tile, waits for its rows and resolves the tile's future:
pickling happens off the count's thread, and a child that replies with a large tile's rows is always read (no pipe
fills both ways). Tiles go to the children in turn, so each child's tiles come back in the order sent. Children
are started once (as spares while CellCounter.load loads the network) and kept for the next slides; a count holds
its children alone while it runs.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import queue
import subprocess
import threading
from collections import deque
from concurrent.futures import Future
from multiprocessing import current_process
from pathlib import Path

import numpy as np

from ..geometry import Box, Instances
from ..util import end_child, started_child, usable_cores

log = logging.getLogger(__name__)

MEASURE_PROCESS_CORES = 4       # from this many cores on, tiles are measured in processes of their own
MAX_MEASURE_PROCESSES = 4       # a process measures ~250 dense tiles/s: four keep up with any GPU we have seen
IN_FLIGHT_PER_PROCESS = 4       # tiles handed over and not yet taken back, per process: memory stays a few tiles

# None: by the cores (measure_processes_for); 0: in the count's thread; N: N processes (tests, benchmarks).
measure_processes: int | None = None


def measure_processes_for(n_cores: int) -> int:
    """How many measuring processes a count on `n_cores` cores uses (0: it measures in its own thread)."""
    if measure_processes is not None:
        return measure_processes
    # a daemonic process (a Dask worker's, by default) is not to leave children behind
    if n_cores < MEASURE_PROCESS_CORES or current_process().daemon:
        return 0
    return min(MAX_MEASURE_PROCESSES, n_cores // 4)


class MeasuringProcessError(RuntimeError):
    """A measuring process ended without measuring a tile it was given (killed for memory, say)."""


class _Child:
    """One measuring process and the courier thread that talks to it (see the module's docstring)."""

    def __init__(self):
        self.parent = os.getpid()     # a forked copy of this object is not that process's
        self.process, self._send, self._reply = started_child("cellseg.run.measure_process")
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.broken = False
        threading.Thread(target=self._courier, name="cellseg-measure-courier", daemon=True).start()
        self.ready = self.submit(("ready",))     # its imports done (a spare's, while the network loads)

    def alive(self) -> bool:
        return not self.broken and self.parent == os.getpid() and self.process.poll() is None

    def submit(self, message: tuple) -> Future:
        future: Future = Future()
        self._tasks.put((future, message))
        return future

    def _courier(self) -> None:
        while True:
            item = self._tasks.get()
            if item is None:
                return
            future, message = item
            if self.broken:
                future.set_exception(MeasuringProcessError("a measuring process had ended"))
                continue
            try:
                payload = pickle.dumps(message, protocol=5)
            except Exception as e:      # the count's to raise: this thread must go on, or the count waits forever
                future.set_exception(e)
                continue
            try:
                self._send.send_bytes(payload)
                kind, value = pickle.loads(self._reply.recv_bytes())
            except (OSError, EOFError):
                self.broken = True
                try:
                    code = self.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    code = "none yet"
                future.set_exception(MeasuringProcessError(
                    f"a measuring process ended (exit code {code}) without measuring its tile"))
                continue
            except Exception as e:      # a reply that does not unpickle
                future.set_exception(e)
                continue
            if kind == "error":
                future.set_exception(value)
            else:
                future.set_result(value)

    def close(self) -> None:
        """Let the process go: it reads the end of its pipe and leaves (after the tiles it was given)."""
        self._tasks.put(None)
        end_child(self.process, self._send, self._reply)


_idle: list[_Child] = []
_idle_lock = threading.Lock()


def _take_children(count: int) -> list[_Child]:
    """`count` measuring processes for one count alone: idle ones (spares, or a finished count's), else new."""
    with _idle_lock:
        taken = []
        while _idle and len(taken) < count:
            child = _idle.pop()
            if child.alive():
                taken.append(child)
            elif child.parent == os.getpid():
                child.close()
    return taken + [_Child() for _ in range(count - len(taken))]


def _give_back(children: list[_Child]) -> None:
    with _idle_lock:
        _idle.extend(c for c in children if c.alive())


def start_spare_measurers() -> None:
    """Start, now, the measuring processes a count on this machine would use, so that their start (~0.3 s of a core:
    numpy, the slide readers) overlaps the caller's own (CellCounter.load: the network's loading)."""
    _give_back(_take_children(measure_processes_for(usable_cores())))


def wait_for_spare_measurers(timeout: float = 60.0) -> None:
    """Wait until every idle measuring process has its imports done (a benchmark that leaves starts out of its time)."""
    with _idle_lock:
        ready = [c.ready for c in _idle]
    for future in ready:
        future.result(timeout)


@atexit.register
def _end_children() -> None:
    with _idle_lock:
        mine = [c for c in _idle if c.parent == os.getpid()]
        _idle.clear()
    for child in mine:
        child.close()


class TileMeasurer:
    """Measures tiles' nuclei in `processes` child processes (cells.label_and_measure, run/measure_process.py) and
    hands their rows back in the order the tiles came, with at most IN_FLIGHT_PER_PROCESS x processes tiles handed
    over and not taken back. A context manager: leaving it without an error keeps the processes for the next count;
    with one, they are let go (what they were given is not waited for).

    A tile crosses as its nuclei alone: the processes read its pixels from the slide themselves (pickling a 640² RGB
    tile's pixels cost ~1.3 ms of the ~4 ms its measuring takes). slide_path, skip_unreadable, z, series, t: as the
    count opened the slide (slides.open_slide); mpp, channel_names, class_names: as cells.measure_tile takes them.
    """

    def __init__(self, processes: int, slide_path: Path, skip_unreadable: bool, mpp: float | None,
                 channel_names: list[str], class_names: list[str], z: int | str | None = None,
                 series: int | None = None, t: int | None = None):
        if processes < 1:
            raise ValueError(f"expected at least one measuring process, got {processes}")
        stat = os.stat(slide_path)    # a file replaced at the same path is opened anew
        self.slide_key = (str(slide_path), bool(skip_unreadable), z, series, t, stat.st_size, stat.st_mtime_ns)
        self.mpp, self.channel_names, self.class_names = mpp, list(channel_names), list(class_names)
        self._children = _take_children(processes)
        self._pending: deque[tuple[object, Future]] = deque()
        self._sent = 0

    def __enter__(self) -> TileMeasurer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._pending:
            _give_back(self._children)
        else:
            for child in self._children:
                child.close()
        self._children = []

    def measure(self, key: object, nuclei: Instances, ids: np.ndarray, box: Box
                ) -> list[tuple[object, dict[str, np.ndarray]]]:
        """Hand over one tile's nuclei (`ids` theirs, `box` its read box). Returns (key, rows) of the tiles measured
        by now, in the order given."""
        child = self._children[self._sent % len(self._children)]
        self._sent += 1
        self._pending.append((key, child.submit(("tile", self.slide_key, nuclei, ids, box, self.mpp,
                                                 self.channel_names, self.class_names))))
        return self._taken(wait=len(self._pending) > IN_FLIGHT_PER_PROCESS * len(self._children))

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
            key, future = self._pending[0]
            rows = future.result()          # a failure to measure is raised here, in the count's thread
            self._pending.popleft()
            done.append((key, rows))
            wait = False
        return done

