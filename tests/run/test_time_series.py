"""Counting a time series (`cellseg count --t N|all`): a time point counts as that 2-D image saved on its own,
measured in processes or in the count's thread; the result records which, the report reads it back, --resume
refuses a journal of another --t, and `--t all` counts each time point into a result folder of its own."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellseg.errors import JournalError
from cellseg.run import count_serially, measuring

from ..helpers import (
    FAST,
    SMALL_TILES,
    LabelCounterSpec,
    assert_report_reads_the_slide_as_counted,
    assert_same_result,
    assert_user_error,
    invoke,
    random_cells,
    resumed_with_other_settings,
)

PROTOCOL = SMALL_TILES


@pytest.fixture
def movie(tmp_path) -> tuple[Path, Path, np.ndarray]:
    """A 3-point time series (TYX ImageJ hyperstack, 0.5 µm px) whose frames differ in every pixel, its label image,
    its frames."""
    labels = random_cells(100, 90, max_diameter=10, n=150, seed=6)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    rng = np.random.default_rng(6)
    frames = np.stack([((labels > 0) * level + rng.integers(0, 40, labels.shape)).astype(np.uint8)
                       for level in (80, 200, 140)])
    tifffile.imwrite(tmp_path / "movie.tif", frames, imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": "TYX", "unit": "um"})
    return tmp_path / "movie.tif", tmp_path / "labels.tif", frames


@pytest.mark.parametrize("processes", [0, 1])     # measured in the count's thread, and in a process of its own
def test_a_time_point_counts_as_that_2d_image(tmp_path, movie, monkeypatch, processes):
    path, labels, frames = movie
    monkeypatch.setattr(measuring, "measure_processes", processes)
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, frames[1], imagej=True, resolution=(2.0, 2.0), metadata={"unit": "um"})
    spec = LabelCounterSpec(PROTOCOL, labels)
    (reference,) = count_serially(spec.load(), [(flat, tmp_path / "flat")])
    (outcome,) = count_serially(dataclasses.replace(spec, t=2).load(), [(path, tmp_path / "t2")])
    assert reference.error is None and outcome.error is None
    assert_same_result(tmp_path / "flat", tmp_path / "t2")      # cells.csv's intensities are the frame's
    summary = json.loads((tmp_path / "t2" / "summary.json").read_text())
    assert (summary["t_points"], summary["t"], summary["mpp"]) == (3, 2, 0.5) and summary["cell_count"] > 50
    assert json.loads((tmp_path / "t2" / "run.json").read_text())["t"] == 2
    assert_report_reads_the_slide_as_counted(tmp_path / "t2", "time point 2 of 3")


def test_resume_refuses_a_journal_of_another_time_point_and_jobs_count_their_own(tmp_path, movie):
    path, labels, _ = movie
    spec = LabelCounterSpec(PROTOCOL, labels, t=1)
    other = resumed_with_other_settings(spec, dataclasses.replace(spec, t=3), path, tmp_path / "out")
    assert isinstance(other.error, JournalError) and "t: 1 there, 3 here" in str(other.error)
    # `--t all`: a job (slide, folder, series, t) counts its own time point, as --t N does
    (one,) = count_serially(dataclasses.replace(spec, t=3).load(), [(path, tmp_path / "one")])
    (job,) = count_serially(spec.load(), [(path, tmp_path / "job", None, 3)])
    assert (job.error, job.t, job.summary["t"]) == (None, 3, 3)
    assert_same_result(tmp_path / "one", tmp_path / "job")


def test_the_command_line_says_what_t_is_expected_and_counts_each_time_point(tmp_path, movie, tiny_bundle):
    path, _, _ = movie
    assert_user_error(invoke(["count", path, "-o", tmp_path / "out"]), 1, "a time series: pass --t N")
    assert_user_error(invoke(["count", path, "--t", "4", "-o", tmp_path / "out"]), 2,
                      "expected --t 1-3 (the time series' points), got --t 4")
    result = invoke(["count", path, "--t", "last", "-o", tmp_path / "out"])
    assert result.exit_code == 2 and "expected --t N, a time point counted from 1, got 'last' or all" in result.stderr
    assert not (tmp_path / "out").exists()
    result = invoke(["info", path])     # info describes a time series without --t, saying what a count needs
    assert result.exit_code == 0, result.output
    assert "time        3 points (1-3): a count needs --t N (time point N) or --t all" in result.output
    assert "time        3 points (1-3): counting time point 2\n" in invoke(["info", path, "--t", "2"]).output
    result = invoke(["count", path, "--t", "all", *FAST, "--model", tiny_bundle, "-o", tmp_path / "all"])
    assert result.exit_code == 0, result.output
    assert "movie.tif (--t 3): " in result.output
    with open(tmp_path / "all" / "summary.csv", newline="") as f:
        rows = [(row["t"], Path(row["result"]).name) for row in csv.DictReader(f)]
    assert rows == [("1", "movie_t1"), ("2", "movie_t2"), ("3", "movie_t3")]
    assert [json.loads((tmp_path / "all" / f"movie_t{n}" / "summary.json").read_text())["t"] for n in (1, 2, 3)] == [
        1, 2, 3]
