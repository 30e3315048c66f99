"""The result tables' own process (results.writer_process.TablesProcess): its answers are never lost."""

from __future__ import annotations

import time

import numpy as np

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
