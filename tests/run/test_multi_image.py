"""A file holding several images like the one counted (the positions of a multi-position acquisition in one
OME-TIFF): without --series the count says, as it starts and first among the report's warnings, that only the first
was counted; with --series N it counts image N as that image saved on its own, and the result says which."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellseg.cli import images_to_count
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
    write_micromanager_stack,
    write_multi_file_ome,
)

PROTOCOL = SMALL_TILES


@pytest.fixture
def plate(tmp_path):
    """An OME-TIFF of two positions (0.5 µm px) whose pixels differ everywhere, and the label image of both."""
    labels = random_cells(80, 90, max_diameter=10, n=60, seed=4)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    rng = np.random.default_rng(4)
    images = [((labels > 0) * level + rng.integers(0, 40, labels.shape)).astype(np.uint8) for level in (150, 90)]
    with tifffile.TiffWriter(tmp_path / "plate.ome.tif", ome=True) as tw:
        for k, image in enumerate(images):
            tw.write(image, metadata={"axes": "YX", "Name": f"A{k + 1}", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    return tmp_path / "plate.ome.tif", tmp_path / "labels.tif", images


def test_a_count_of_a_multi_position_file_says_only_the_first_position_was_counted(tmp_path, plate, caplog):
    path, labels, _ = plate
    with caplog.at_level(logging.WARNING):
        summary = LabelCounterSpec(PROTOCOL, labels).load().count(path, tmp_path / "out")
    said = ("plate.ome.tif holds 2 images like the one counted (OME images: A1, A2): only the first, A1, is counted; "
            "to count another, pass --series N (0-1)")
    assert [r.getMessage() for r in caplog.records].count(said) == 1      # once, as the count starts
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["file_warnings"] == [said] and written["warnings"][0] == said == summary["warnings"][0]
    assert written["series"] is None
    assert said in (tmp_path / "out" / "report.html").read_text()


@pytest.mark.parametrize("processes", [0, 1])     # measured in the count's thread, and in a process of its own
def test_series_counts_that_image_as_if_saved_on_its_own(tmp_path, plate, monkeypatch, processes):
    path, labels, images = plate
    monkeypatch.setattr(measuring, "measure_processes", processes)
    flat = tmp_path / "flat.ome.tif"
    tifffile.imwrite(flat, images[1], metadata={"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    spec = LabelCounterSpec(PROTOCOL, labels)
    (reference,) = count_serially(spec.load(), [(flat, tmp_path / "flat")])
    (outcome,) = count_serially(dataclasses.replace(spec, series=1).load(), [(path, tmp_path / "s1")])
    assert reference.error is None and outcome.error is None
    assert_same_result(tmp_path / "flat", tmp_path / "s1")      # cells.csv's intensities are the second image's
    summary = json.loads((tmp_path / "s1" / "summary.json").read_text())
    assert (summary["series"], summary["file_warnings"], summary["cell_count"] > 30) == (1, [], True)
    assert json.loads((tmp_path / "s1" / "run.json").read_text())["series"] == 1
    assert_report_reads_the_slide_as_counted(tmp_path / "s1", "image 1 of the file (--series)")


def test_an_image_in_another_file_of_a_multi_file_ome_tiff_counts_as_saved_on_its_own(tmp_path, plate):
    """A file per position, each holding the OME-XML of all: --series 1 of the first file counts position 1 from its
    own file (tiled: until 2026-11-29 its tiles were read from the file opened, position 0's)."""
    _, labels, images = plate
    first, _ = write_multi_file_ome(tmp_path, "plate", [image[None] for image in images], layout="tiled")
    flat = tmp_path / "flat.ome.tif"
    tifffile.imwrite(flat, images[1], metadata={"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5,
                                                "Channel": {"Name": ["DAPI"]}})      # the set's channel name
    spec = LabelCounterSpec(PROTOCOL, labels)
    outcomes = count_serially(spec.load(), [(flat, tmp_path / "flat"), (first, tmp_path / "s1", 1)])
    assert [o.error for o in outcomes] == [None, None]
    assert_same_result(tmp_path / "flat", tmp_path / "s1")      # intensities of position 1's pixels


def test_a_batch_of_files_of_one_multi_file_ome_tiff_counts_each_image_once(tmp_path, plate, tiny_bundle, caplog):
    """Every file of a Micro-Manager set is an input of `cellseg count *.ome.tif`: each position, and each time
    point of --t all, is counted once, from the first file naming it; a file alone counts its own position."""
    _, _, images = plate
    files = write_multi_file_ome(tmp_path, "movie", [np.stack([image] * 3) for image in images], split_from=2)
    pos0, pos0_more, pos1, pos1_more = files
    assert images_to_count(tuple(files), None, "all", None, None) == [(pos0, None, n) for n in (1, 2, 3)] + [
        (pos1, None, n) for n in (1, 2, 3)]
    with caplog.at_level(logging.WARNING):
        assert images_to_count(tuple(files), "all", 2, None, None) == [(pos0, 0, None), (pos0, 1, None)]
    assert "movie_MMStack_Pos1.ome.tif: not counted again: 2 images of its multi-file acquisition are counted from " \
           "movie_MMStack_Pos0.ome.tif" in caplog.messages
    assert images_to_count((pos1_more, pos0_more), None, 3, None, None) == [(pos1_more, None, None),
                                                                            (pos0_more, None, None)]
    result = invoke(["count", pos1_more, pos0, pos0_more, pos1, "--t", "3", "--mpp", "0.5", *FAST,
                     "--model", tiny_bundle, "-o", tmp_path / "out"])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "out" / "summary.csv", newline="") as f:
        rows = [(Path(row["input"]).name, row["series"], row["t"]) for row in csv.DictReader(f)]
    assert rows == [("movie_MMStack_Pos1_1.ome.tif", "1", "3"), ("movie_MMStack_Pos0.ome.tif", "", "3")]


def test_a_micro_manager_stack_counts_each_position_once_and_as_saved_on_its_own(tmp_path, plate):
    """Micro-Manager's own stack layout (tifffile's MMStack reader: positions an axis of one image, found in the
    acquisition's files by their prefix) was refused ("expected a 2-D image, got axes RYX"): each position is now
    counted as that image saved on its own, a batch of the files counts each position once."""
    _, labels, images = plate
    files = write_micromanager_stack(tmp_path, "run", [image[None].astype(np.uint16) for image in images])
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, images[1].astype(np.uint16), resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    outcomes = count_serially(LabelCounterSpec(PROTOCOL, labels).load(), [(flat, tmp_path / "flat"),
                                                                          (files[0], tmp_path / "s1", 1)])
    assert [o.error for o in outcomes] == [None, None]
    assert_same_result(tmp_path / "flat", tmp_path / "s1")
    assert images_to_count(tuple(files), None, None, None, None) == [(files[0], None, None), (files[1], None, None)]
    assert images_to_count(tuple(files), "all", None, None, None) == [(files[0], 0, None), (files[0], 1, None)]


def test_resume_refuses_a_journal_of_another_series(tmp_path, plate):
    path, labels, _ = plate
    spec = LabelCounterSpec(PROTOCOL, labels, series=1)
    other = resumed_with_other_settings(spec, dataclasses.replace(spec, series=0), path, tmp_path / "out")
    assert isinstance(other.error, JournalError)
    assert "series: 1 there, 0 here" in str(other.error)


def test_a_job_of_one_image_counts_it_whatever_the_counter_s_series(tmp_path, plate):
    """`--series all` gives each position a job (slide, result folder, series): counted as --series N counts it."""
    path, labels, _ = plate
    spec = LabelCounterSpec(PROTOCOL, labels)
    (one,) = count_serially(dataclasses.replace(spec, series=1).load(), [(path, tmp_path / "one")])
    outcomes = list(count_serially(spec.load(), [(path, tmp_path / "s0", 0), (path, tmp_path / "s1", 1)]))
    assert [(o.error, o.series, o.summary["series"]) for o in outcomes] == [(None, 0, 0), (None, 1, 1)]
    assert_same_result(tmp_path / "one", tmp_path / "s1")
    assert json.loads((tmp_path / "s1" / "run.json").read_text())["fingerprint"]["options"]["series"] == 1
    (again,) = count_serially(spec.load(), [(path, tmp_path / "s1", 1)], resume=True)     # its own, complete
    assert again.skipped


def test_the_command_line_takes_series_and_says_what_it_expects(tmp_path, plate, tiny_bundle):
    path, _, images = plate
    assert_user_error(invoke(["count", path, "--series", "2", "-o", tmp_path / "out"]), 2,
                      "expected --series 0-1 (the file's 2 images), got --series 2")
    assert not (tmp_path / "out").exists()
    result = invoke(["count", path, "--series", "-1", "-o", tmp_path / "out"])
    assert result.exit_code == 2 and "--series" in result.stderr and not (tmp_path / "out").exists()
    result = invoke(["info", path, "--series", "1"])
    assert result.exit_code == 0, result.output
    assert "note        image 1 of 0-1 (--series): A2" in result.output and "warning" not in result.output
    tifffile.imwrite(tmp_path / "flat.tif", images[0])      # a cohort: the plate's row says which image it counted
    result = invoke(["count", path, tmp_path / "flat.tif", "--series", "0", "--mpp", "0.5", *FAST,
                     "--model", tiny_bundle, "-o", tmp_path / "cohort"])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "cohort" / "summary.csv", newline="") as f:
        rows = {row["input"]: row for row in csv.DictReader(f)}
    assert rows[str(path)]["series"] == "0" and rows[str(tmp_path / "flat.tif")]["series"] == "0"
    # every position: a result folder each, a row each, and the 2-D image once
    result = invoke(["count", path, tmp_path / "flat.tif", "--series", "all", "--mpp", "0.5", *FAST,
                     "--model", tiny_bundle, "-o", tmp_path / "all"])
    assert result.exit_code == 0, result.output
    assert "plate.ome.tif (--series 1): " in result.output
    with open(tmp_path / "all" / "summary.csv", newline="") as f:
        rows = [(row["input"], row["series"], Path(row["result"]).name) for row in csv.DictReader(f)]
    assert rows == [(str(path), "0", "plate_s0"), (str(path), "1", "plate_s1"),
                    (str(tmp_path / "flat.tif"), "", "flat")]
    for k in (0, 1):
        assert json.loads((tmp_path / "all" / f"plate_s{k}" / "summary.json").read_text())["series"] == k
    result = invoke(["count", path, "--series", "all", "--estimate", "--mpp", "0.5", *FAST, "--model", tiny_bundle])
    assert result.exit_code == 0 and result.output.count("plate.ome.tif: ") == 2, result.output
    result = invoke(["count", path, "--series", "first", "-o", tmp_path / "out"])
    assert result.exit_code == 2 and "or all" in result.stderr


def test_the_report_of_a_result_from_before_series_and_t_is_rebuilt(tmp_path, plate):
    """A result folder written before --series and --t (its summary.json has neither) still gets its report."""
    path, labels, _ = plate
    LabelCounterSpec(PROTOCOL, labels).load().count(path, tmp_path / "out")
    summary_file = tmp_path / "out" / "summary.json"
    summary = json.loads(summary_file.read_text())
    summary_file.write_text(json.dumps({k: v for k, v in summary.items() if k not in ("series", "t", "t_points")}))
    rebuilt = invoke(["report", tmp_path / "out"])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "of the file (--series)" not in (tmp_path / "out" / "report.html").read_text()
