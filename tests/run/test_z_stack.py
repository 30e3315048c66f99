"""Counting a Z-stack (`cellseg count --z`): one plane or a projection of them all gives the result of counting that
2-D image, measured in processes or in the count's thread; the result records what was counted, the report reads
the same planes back, and --resume refuses a journal of another --z."""

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
def stack(tmp_path) -> tuple[Path, Path, np.ndarray]:
    """A 3-plane Z-stack (ZYX OME-TIFF, 0.5 µm px) whose planes differ in every pixel, its label image, its planes."""
    labels = random_cells(120, 100, max_diameter=10, n=200, seed=3)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    rng = np.random.default_rng(3)
    planes = np.stack([((labels > 0) * level + rng.integers(0, 40, labels.shape)).astype(np.uint8)
                       for level in (60, 200, 120)])
    tifffile.imwrite(tmp_path / "stack.ome.tif", planes,
                     metadata={"axes": "ZYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    return tmp_path / "stack.ome.tif", tmp_path / "labels.tif", planes


@pytest.mark.parametrize("processes", [0, 1])     # measured in the count's thread, and in a process of its own
@pytest.mark.parametrize("z", [2, "max", "mean"])
def test_a_plane_or_a_projection_counts_as_that_2d_image(tmp_path, stack, monkeypatch, z, processes):
    path, labels, planes = stack
    monkeypatch.setattr(measuring, "measure_processes", processes)
    image = {2: planes[1], "max": planes.max(axis=0), "mean": np.rint(planes.mean(axis=0)).astype(np.uint8)}[z]
    flat = tmp_path / "flat.ome.tif"
    tifffile.imwrite(flat, image, metadata={"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    spec = LabelCounterSpec(PROTOCOL, labels)
    (reference,) = count_serially(spec.load(), [(flat, tmp_path / "flat")])
    (outcome,) = count_serially(dataclasses.replace(spec, z=z).load(), [(path, tmp_path / "z")])
    assert reference.error is None and outcome.error is None
    assert_same_result(tmp_path / "flat", tmp_path / "z")      # cells.csv's intensities are the plane's
    summary = json.loads((tmp_path / "z" / "summary.json").read_text())
    assert (summary["z_planes"], summary["z"]) == (3, z) and summary["cell_count"] > 50
    assert json.loads((tmp_path / "z" / "run.json").read_text())["z"] == z
    assert_report_reads_the_slide_as_counted(
        tmp_path / "z", "plane 2 of a 3-plane Z-stack" if z == 2 else f"{z} projection of a 3-plane Z-stack")


def test_resume_refuses_a_journal_of_another_z(tmp_path, stack):
    path, labels, _ = stack
    spec = LabelCounterSpec(PROTOCOL, labels, z="max")
    other = resumed_with_other_settings(spec, dataclasses.replace(spec, z=1), path, tmp_path / "out")
    assert isinstance(other.error, JournalError)
    assert "z: 'max' there, 1 here" in str(other.error)


def test_the_command_line_says_what_z_is_expected_and_info_what_is_counted(tmp_path, stack):
    path, _, _ = stack
    assert_user_error(invoke(["count", path, "-o", tmp_path / "out"]), 1, "a Z-stack: pass --z max")
    assert_user_error(invoke(["count", path, "--z", "4", "-o", tmp_path / "out"]), 2,
                      "expected --z 1-3 (the Z-stack's planes), got --z 4")
    result = invoke(["count", path, "--z", "top", "-o", tmp_path / "out"])
    assert result.exit_code == 2 and "expected --z max, mean or a plane number from 1, got 'top'" in result.stderr
    assert not (tmp_path / "out").exists()
    result = invoke(["info", path])     # info describes a stack without --z, saying what a count needs
    assert result.exit_code == 0, result.output
    assert "z-stack     3 planes (1-3): a count needs --z max, --z mean or --z N" in result.output
    result = invoke(["info", path, "--z", "mean"])
    assert result.exit_code == 0, result.output
    assert "z-stack     3 planes (1-3): counting their mean projection" in result.output
    assert "z-stack     3 planes (1-3): counting plane 2\n" in invoke(["info", path, "--z", "2"]).output


def test_a_cohort_of_stacks_and_2d_images_says_what_each_row_counted(tmp_path, stack, tiny_bundle):
    """One --z for the whole cohort: the stack's row of summary.csv has it, a 2-D image's row has none."""
    path, _, planes = stack
    tifffile.imwrite(tmp_path / "flat.tif", planes[1])
    result = invoke(["count", path, tmp_path / "flat.tif", "--z", "max", "--mpp", "0.5", *FAST, "--model", tiny_bundle,
                     "-o", tmp_path / "cohort"])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "cohort" / "summary.csv", newline="") as f:
        rows = {row["input"]: row for row in csv.DictReader(f)}
    assert rows[str(path)]["z"] == "max" and rows[str(tmp_path / "flat.tif")]["z"] == ""
