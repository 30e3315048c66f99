"""The result tables' own process (results.writer_process.TablesProcess): its answers are never lost."""

from __future__ import annotations

import errno
import os
import time

import numpy as np
import pytest

from cellseg.results import writer_process
from cellseg.results.cells_csv import CellsTableWriter
from cellseg.results.writer_process import TablesProcess


def test_a_child_that_answers_before_the_parent_looks_is_heard(tmp_path, monkeypatch):
    """The child may close its files and answer "done" before the parent's check after the send has run: that
    check reads the answer, and end() and finish_labels() must not then wait for another (it used to fail: "ended
    (exit code 0) without a word", seen on a loaded machine)."""
    check = TablesProcess._check

    def late_check(self):
        time.sleep(0.5)          # the parent descheduled between its send and its look at the replies
        check(self)

    monkeypatch.setattr(TablesProcess, "_check", late_check)
    process = TablesProcess({"cells.csv": (CellsTableWriter, (tmp_path / "cells.csv", {"id": "int64"}), {})})
    process.tile((0, 0, 8, 8), np.array([1]), np.array([[0, 0, 2, 2]]), [np.ones((2, 2), bool)], np.array([0]),
                 np.array([0.9]), {"id": np.array([1])}, None)
    process.end()       # returns once the tables are written ("tables"); the label images go on
    assert (tmp_path / "cells.csv").read_text() == "id\n1\n"
    process.finish_labels()     # "done" may have been read already: no second wait
    assert set(process.seconds) == {"cells.csv"}


class FullTable(CellsTableWriter):
    """A table on a full disk (the child imports it from here, by name)."""

    def append(self, rows):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_child_s_error_is_heard_behind_its_earlier_answers(tmp_path, monkeypatch):
    """A child that fails and ends breaks the pipe to it: the parent then reads what the child said, and its error
    may come behind an answer not yet read (its "ready"): the error is raised, not the broken pipe (seen once in
    the full-disk tests: "cannot write cells.csv, cells.geojson, ...: Broken pipe")."""
    monkeypatch.setattr(TablesProcess, "_check", lambda self: None)     # the parent never looked before the send
    process = TablesProcess({"cells.csv": (FullTable, (tmp_path / "cells.csv", {"id": "int64"}), {})})
    with pytest.raises(writer_process.TableWriteError) as caught:
        for _ in range(1000):           # until a send meets the pipe the ended child broke
            process.tile((0, 0, 8, 8), np.array([1]), np.array([[0, 0, 2, 2]]), [np.ones((2, 2), bool)],
                         np.array([0]), np.array([0.9]), {"id": np.array([1])}, None)
            time.sleep(0.01)
    assert caught.value.what == "cells.csv" and caught.value.error.errno == errno.ENOSPC
    process.stop()


def _write_one_cell(path):
    process = TablesProcess({"cells.csv": (CellsTableWriter, (path, {"id": "int64"}), {})})
    process.tile((0, 0, 8, 8), np.array([1]), np.array([[0, 0, 2, 2]]), [np.ones((2, 2), bool)], np.array([0]),
                 np.array([0.9]), {"id": np.array([1])}, None)
    process.end()
    process.finish_labels()
    return process


def test_a_spare_started_ahead_writes_the_next_files_and_a_dead_one_is_passed_over(tmp_path):
    """start_spares starts children that import their modules before a count needs them (CellCounter.load, while
    the network loads); the next TablesProcess takes one, and one that has died meanwhile is never handed out."""
    writer_process.start_spares(2)
    dead, alive = writer_process._spares[0].process, writer_process._spares[1].process
    writer_process.wait_for_spares()     # both have imported their modules and said so
    assert all(spare.ready for spare in writer_process._spares)
    writer_process.wait_for_spares(timeout=0)     # read once: a second wait has nothing left to read
    dead.kill()
    dead.wait()
    process = _write_one_cell(tmp_path / "cells.csv")
    assert process._process is alive
    assert (tmp_path / "cells.csv").read_text() == "id\n1\n"
    assert not writer_process._spares
    process = _write_one_cell(tmp_path / "again.csv")      # none left: a new child, as before
    assert process._process not in (dead, alive) and (tmp_path / "again.csv").read_text() == "id\n1\n"


def test_a_forked_process_never_takes_its_parents_spares(tmp_path):
    """The spares' pipes are the parent's: a process forked from it (Dask's, multiprocessing's) starts its own."""
    writer_process.start_spares(1)
    spare = writer_process._spares[0].process
    pid = os.fork()
    if pid == 0:        # the child: write a file through a process of its own, and say whose it was
        code = 1
        try:
            process = _write_one_cell(tmp_path / "child.csv")
            code = 0 if process._process is not spare and process._process.pid != spare.pid else 2
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0
    assert (tmp_path / "child.csv").read_text() == "id\n1\n"
    assert writer_process._spares and writer_process._spares[0].process is spare   # still the parent's to take
    writer_process._end_spares()
    assert spare.poll() is not None
