"""The result files written by a process of their own: the tables (cells.csv, cells.geojson, predictions.coco.json)
and, in a thread of it, the label canvases and the files drawn from them (results.writer.LabelFiles: the label
pyramids, the overlay).

Formatting text is Python work that holds the interpreter lock: in a thread beside the count it ran by turns with
merging and measuring instead of beside them. A child interpreter (`python -m cellseg.results.writer_process`,
started by `TablesProcess` with the parent's import path) writes the files on another core; the parent sends each
tile's nuclei through a pipe (pickled: the read box, ids, boxes, the masks in one flat array, class ids, scores, the
cells.csv rows, and with cells their label image; the child paints the label canvas from the masks as the count
does), which also bounds memory: a send waits while the child is a pipe's worth of tiles behind. The child ends when
the pipe closes (its parent ended, or died).

Messages to the child: the writers to open, then ("tile", ...) per tile, then ("end", the label files' closing
arguments) (close the files: reply ("tables", seconds per file) once the tables are written and ("pictures",) once
overlay.png is, so that the parent draws the report while the overlay and the label images are written, then
("done", seconds per file, its peak memory)) or
("stop",) (close them as a failed run does; after "end" the parent kills the child instead). A
failure in the child is sent back as ("error", file, exception) before it exits: the parent raises it
(results/writer.py makes an OSError a WriteError naming the file).
"""

from __future__ import annotations

import atexit
import importlib
import os
import pickle
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from ..util import child_pipes, end_child, import_path, started_child


class TablesProcess:
    """The child process writing `writers`: {file name: (writer class, args, kwargs)}, each class importable by its
    module and name (CellsTableWriter, CellsGeoJsonWriter, CocoWriter or a subclass, with the append/close/
    __exit__ of those), and "labels": results.writer.LabelFiles, the label canvases and their files."""

    def __init__(self, writers: dict[str, tuple[type, tuple, dict]]):
        self._process, self._send, self._reply = _taken_spare() or _started_child()
        self.seconds: dict[str, float] = {}
        self.peak_rss_mb: float | None = None      # the child's, once it has closed the files (Linux)
        self._tables_done = False                  # its ("tables", ...) has come: the tables are written
        self._pictures_done = False                # its ("pictures",) has come: overlay.png is written
        self._done = False                         # its ("done", ...) has come (maybe read by _message's check)
        self._closed = False
        self.writers = frozenset(writers)         # their names ("labels": the label canvases)
        specs = {name: (cls.__module__, cls.__qualname__, args, kwargs) for name, (cls, args, kwargs) in
                 writers.items()}
        self._message(("open", specs))

    def _message(self, message: tuple) -> None:
        """Send `message`; a failure the child has reported is raised instead."""
        self._check()
        try:
            self._send.send_bytes(pickle.dumps(message, protocol=5))
        except OSError:         # the child has gone: say why, if it said (its error may follow other replies)
            while True:
                self._wait_reply()      # raises the child's error, or says it ended without a word
        self._check()

    def _check(self) -> None:
        if self._reply.poll():
            self._answer(pickle.loads(self._reply.recv_bytes()))

    def _wait_reply(self) -> None:
        try:
            self._answer(pickle.loads(self._reply.recv_bytes()))
        except EOFError:
            code = self._process.wait()
            raise RuntimeError(f"the process writing the result tables ended (exit code {code}) without a word")

    def _answer(self, reply: tuple) -> None:
        if reply[0] == "ready":     # its modules imported (start_spares): nothing to do
            return
        if reply[0] == "error":
            _, what, error = reply
            raise TableWriteError(what, error)
        if reply[0] == "tables":
            self.seconds, self._tables_done = reply[1], True
        if reply[0] == "pictures":
            self._pictures_done = True
        if reply[0] == "done":
            self.seconds, self.peak_rss_mb, self._done = reply[1], reply[2], True

    def tile(self, read: tuple, ids: np.ndarray, boxes: np.ndarray, masks: list[np.ndarray], class_ids: np.ndarray,
             scores: np.ndarray, rows: dict[str, np.ndarray], cell_image) -> None:
        """One tile's nuclei (as ResultWriter.add_nuclei has them; read: the tile's read box)."""
        flat = np.concatenate([np.asarray(m, bool).reshape(-1) for m in masks]) if masks else np.zeros(0, bool)
        self._message(("tile", read, ids, np.asarray(boxes), flat, np.asarray(class_ids), np.asarray(scores), rows,
                       cell_image))

    def end(self, *labels) -> None:
        """Close the files (the label files with `labels`: LabelFiles.close's arguments) and wait until the tables
        are written; overlay.png and the label images go on (wait_pictures, finish_labels wait for them)."""
        self._message(("end", labels))
        while not (self._tables_done or self._done):  # a quick answer may have been read by the check after the send
            self._wait_reply()

    def wait_pictures(self) -> None:
        """Wait until overlay.png is written (after end)."""
        while not (self._pictures_done or self._done):
            self._wait_reply()

    def finish_labels(self) -> None:
        """Wait for the label images, the child's last files, and let it go."""
        while not self._done:
            self._wait_reply()
        self._close()

    def stop(self) -> None:
        """Close the files as a failed run does, and let the child go (nothing, once it has ended)."""
        if self._closed:
            return
        if self._tables_done:       # past "end", writing the label images: no longer listening
            self._process.kill()
        try:
            self._send.send_bytes(pickle.dumps(("stop",)))
        except OSError:
            pass
        self._close()

    def _close(self) -> None:
        self._closed = True
        end_child(self._process, self._send, self._reply, timeout=60)


@dataclass
class _Spare:
    """An interpreter started ahead of a count (start_spares), its imports done by the time a count needs it."""

    parent: int                     # the pid that started it: a forked copy of this list is not that process's
    import_path: tuple[str, ...]    # the sys.path it was given
    process: subprocess.Popen
    send: Connection
    reply: Connection
    ready: bool = False             # its ("ready",) has been read (wait_for_spares)

    def mine(self) -> bool:
        return self.parent == os.getpid()


_spares: list[_Spare] = []
_spares_lock = threading.Lock()


def _import_path() -> tuple[str, ...]:
    return import_path()


def _started_child() -> tuple[subprocess.Popen, Connection, Connection]:
    """A new child interpreter running _serve, and the pipe ends that talk to it (to it, from it)."""
    return started_child("cellseg.results.writer_process")


def start_spares(count: int) -> None:
    """Have `count` child interpreters started and importing their modules now, so that the next counts find them
    ready: starting one costs ~0.3 s of a core (numpy, tifffile, imagecodecs, Pillow and the writers imported), which
    `CellCounter.load` overlaps with loading the network instead of a count's first tiles. Spares left unused
    end with this process."""
    with _spares_lock:
        _spares[:] = [s for s in _spares if s.mine() and s.process.poll() is None]
        while len(_spares) < count:
            _spares.append(_Spare(os.getpid(), _import_path(), *_started_child()))


def wait_for_spares(timeout: float = 60.0) -> None:
    """Wait until every spare has imported its modules (a benchmark that leaves a process's start out of its timing)."""
    with _spares_lock:
        for spare in _spares:
            if spare.mine() and not spare.ready and spare.process.poll() is None and spare.reply.poll(timeout):
                reply = pickle.loads(spare.reply.recv_bytes())
                if reply[0] != "ready":
                    raise RuntimeError(f"expected a spare writer process to say it is ready, it said {reply[0]!r}")
                spare.ready = True


def _taken_spare() -> tuple[subprocess.Popen, Connection, Connection] | None:
    """A spare started by this process with this import path and still running, else None (a forked process's
    copy of its parent's spares is never taken: their pipes are the parent's)."""
    with _spares_lock:
        while _spares:
            spare = _spares.pop(0)
            if spare.mine() and spare.import_path == _import_path() and spare.process.poll() is None:
                return spare.process, spare.send, spare.reply
            if spare.mine():
                _end_spare(spare.process, spare.send, spare.reply)
    return None


def _end_spare(process: subprocess.Popen, send: Connection, reply: Connection) -> None:
    end_child(process, send, reply)


@atexit.register
def _end_spares() -> None:
    with _spares_lock:
        mine = [s for s in _spares if s.mine()]
        _spares.clear()
    for spare in mine:
        _end_spare(spare.process, spare.send, spare.reply)


class TableWriteError(Exception):
    """A failure in the tables' process: `what` (the file) and the exception it met."""

    def __init__(self, what: str, error: BaseException):
        super().__init__(f"{what}: {error}")
        self.what, self.error = what, error


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory since it began running this program (VmHWM: unlike ru_maxrss, not the
    parent's pages it shared between fork and exec); None where /proc does not say."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM"))
    except (OSError, StopIteration, ValueError):
        return None


def append_to_table(name: str, writer, ids, boxes, masks, class_ids, scores, rows, cell_image) -> None:
    """One tile's nuclei to the writer of table `name` (CellsTableWriter, CellsGeoJsonWriter or CocoWriter), each
    given the columns it writes."""
    if name == "cells.csv":
        writer.append(rows)
    elif name == "cells.geojson":
        writer.append(ids, boxes, masks, class_ids, rows, cell_image)
    else:
        writer.append(ids, boxes, masks, scores, class_ids)


def _masks(boxes: np.ndarray, flat: np.ndarray) -> list[np.ndarray]:
    shapes = (boxes[:, 2:] - boxes[:, :2]).tolist()
    ends = np.cumsum([h * w for h, w in shapes]).tolist()
    return [flat[e - h * w:e].reshape(h, w) for (h, w), e in zip(shapes, ends)]


def _serve(receive: Connection, reply: Connection) -> None:
    """The child's loop: open the writers, write each tile, close them. The tables are written here, the label
    canvases (results.writer.LabelFiles: painted from the masks, then the pyramids and the overlay) by a thread."""
    from .writer import _NamedOSError, _Worker
    writers: dict = {}
    labels = None           # the label files' thread
    seconds: dict[str, float] = {}
    name = "the result tables"
    try:
        while True:
            name = "the result tables"
            try:
                message = pickle.loads(receive.recv_bytes())
            except EOFError:             # the parent has gone without a word: a failed run
                message = ("stop",)
            kind = message[0]
            if kind == "open":
                for name, (module, qualname, args, kwargs) in message[1].items():
                    cls = importlib.import_module(module)
                    for part in qualname.split("."):
                        cls = getattr(cls, part)
                    writer = cls(*args, **kwargs)
                    if name == "labels":
                        labels = _Worker("labels", writer.paint_masks, writer.close, writer.remove,
                                         what="labels.ome.tif (its label canvas)")
                    else:
                        writers[name] = writer
                        seconds[name] = 0.0
            elif kind == "tile":
                _, read, ids, boxes, flat, class_ids, scores, rows, cell_image = message
                masks = _masks(boxes, flat)
                if labels is not None:
                    name = labels.what
                    labels.put(read, ids, boxes, masks, cell_image)
                for name, writer in writers.items():
                    start = time.perf_counter()
                    append_to_table(name, writer, ids, boxes, masks, class_ids, scores, rows, cell_image)
                    seconds[name] += time.perf_counter() - start
            elif kind == "end":
                pictures = threading.Event()     # overlay.png written: the parent may draw the report
                if labels is not None:
                    name = labels.what
                    labels.end(*message[1], pictures.set)
                for name, writer in writers.items():
                    start = time.perf_counter()
                    writer.close()
                    seconds[name] += time.perf_counter() - start
                writers = {}
                reply.send_bytes(pickle.dumps(("tables", dict(seconds))))
                if labels is not None:
                    name = labels.what
                    labels.wait_for(pictures)
                reply.send_bytes(pickle.dumps(("pictures",)))
                if labels is not None:
                    if labels.join() is not None:
                        raise labels.error
                    seconds["labels"] = labels.seconds
                reply.send_bytes(pickle.dumps(("done", seconds, _peak_rss_mb())))
                return
            else:       # stop
                return
    except BaseException as e:      # sent to the parent, which raises it
        if isinstance(e, _NamedOSError):
            name, e = e.what, e.error
        try:
            reply.send_bytes(pickle.dumps(("error", name, e)))
        except Exception:           # an exception that does not pickle: its text
            reply.send_bytes(pickle.dumps(("error", name, RuntimeError(repr(e)))))
    finally:
        if labels is not None:
            labels.stop()
        for writer in writers.values():
            try:
                writer.__exit__(RuntimeError, None, None)
            except Exception:       # the first failure is the one reported
                pass


def _import_writers() -> None:
    """What every writer needs, imported before the first message (a spare does this while the parent loads its
    network): the writers' own modules, and through them numpy, tifffile and imagecodecs."""
    import imagecodecs  # noqa: F401
    import tifffile  # noqa: F401

    from . import cells_csv, cells_geojson, coco, ome_pyramid, pictures, writer  # noqa: F401


if __name__ == "__main__":
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C is the parent's to handle: it stops this process
    receive, reply = child_pipes()
    _import_writers()
    reply.send_bytes(pickle.dumps(("ready",)))
    _serve(receive, reply)
    # Every file is closed and every thread joined by now, and the parent has had its last word; the interpreter's
    # teardown (numpy, tifffile, imagecodecs: 60 ms on a 2-core Zen 3) would only keep the parent waiting for the
    # count's last step.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
