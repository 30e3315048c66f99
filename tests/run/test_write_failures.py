"""A result file that cannot be written (a full disk, no permission) ends the count with one line naming the file, the
folder and the space left there; a journaled count keeps its finished bands for --resume, which then gives the
result of an uninterrupted count. The writers are made to fail (a disk cannot be filled portably); `--outputs`
picks the files written."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellseg.errors import WriteError
from cellseg.results import CellsGeoJsonWriter, CellsTableWriter, CocoWriter, ResultWriter, partial_folder, result_files
from cellseg.results.writer import LabelFiles
from cellseg.run import count_serially, done_bands

from ..helpers import SMALL_TILES, LabelCounterSpec, assert_same_result, assert_user_error, invoke, random_cells

ALL_FILES = set(result_files(True, True))
PROTOCOL = SMALL_TILES


@pytest.fixture
def slide(tmp_path):
    """A 200 x 170 px slide (5 rows of 40 px tiles) and its label image."""
    labels = random_cells(200, 170, max_diameter=10, n=500, seed=11)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    tifffile.imwrite(tmp_path / "slide.tif", ((labels > 0) * 200 + 20).astype(np.uint8))
    return tmp_path / "slide.tif", tmp_path / "labels.tif"


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# Writers on a full disk (the tables' process imports them from here, by name).
class FullGeoJson(CellsGeoJsonWriter):
    append = _no_space


class FullCoco(CocoWriter):
    append = _no_space


class FullTable(CellsTableWriter):
    def flush(self):
        if self._pending:
            _no_space()


class FullLabels(LabelFiles):
    def close(self, *args):
        self.nucleus_store.chunk_files()           # the canvas goes to disk first (LabelStore.flush)
        _no_space()


@pytest.mark.parametrize("name, process", [("cells.geojson", True), ("cells.geojson", False),
                                           ("predictions.coco.json", True), ("cells.csv", False),
                                           ("labels.ome.tif", True), ("labels.ome.tif", False),
                                           ("cells.csv", "per output"), ("labels.ome.tif", "per output")])
def test_a_full_disk_stops_the_count_in_one_line_and_resume_finishes_it(tmp_path, slide, monkeypatch, name, process,
                                                                       caplog):
    path, labels = slide
    spec = LabelCounterSpec(PROTOCOL, labels, shift_px=2)
    reference = tmp_path / "reference"
    spec.load().count(path, reference)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(ResultWriter, "tables_in_a_process", bool(process))
        m.setattr(ResultWriter, "process_per_output", process == "per output")
        attribute = {"cells.geojson": "geojson_writer", "predictions.coco.json": "coco_writer",
                     "cells.csv": "table_writer", "labels.ome.tif": "label_files"}[name]
        m.setattr(ResultWriter, attribute, {"cells.geojson": FullGeoJson, "predictions.coco.json": FullCoco,
                                            "cells.csv": FullTable, "labels.ome.tif": FullLabels}[name])
        (outcome,) = count_serially(spec.load(), [(path, out)], band_rows=1)
    message = str(outcome.error)
    assert isinstance(outcome.error, WriteError) and "\n" not in message
    assert name in message and "No space left on device" in message and "MB free there" in message
    # named in the result folder asked for, not in the staging folder it was written in (removed below)
    assert message.startswith(f"cannot write {name}") and f" into {out}: " in message and ".partial" not in message
    partial = partial_folder(out)
    kept = done_bands(partial)
    assert kept and not out.exists()          # the finished bands are kept for --resume
    # ... not the result files written before the disk filled: --resume writes them again, and they held the space
    assert not (partial / "result").exists() and "the result files written so far removed" in caplog.text
    # ... with room again, or with fewer files (the bands do not depend on them): the warning says both
    assert "rerun with --resume to continue once there is room, or with fewer files (--outputs" in caplog.text
    (outcome,) = count_serially(spec.load(), [(path, out)], resume=True)
    assert outcome.error is None and outcome.kept_bands == len(kept)
    assert_same_result(reference, out)
    assert not partial.exists()


class FullAt(LabelFiles):
    """LabelFiles whose disk fills when `function` (of results.writer) writes, once the tables are written: the
    count has gone on to its report by then (the tables' process imports the subclasses from here, by name)."""
    function = ""

    def close(self, *args):
        import cellseg.results.writer as writer
        kept = getattr(writer, self.function)
        setattr(writer, self.function, _no_space)
        try:
            super().close(*args)
        finally:
            setattr(writer, self.function, kept)


class FullPyramids(FullAt):
    function = "LabelPyramid"       # building the label pyramids (their chunk files) fills the disk


class FullOverlay(FullAt):
    function = "write_overlay_png"


@pytest.mark.parametrize("full, name", [(FullPyramids, "labels.ome.tif"), (FullOverlay, "overlay.png")])
@pytest.mark.parametrize("process", [True, False, "per output"])
def test_label_files_failing_beside_the_report_stop_the_count_in_one_line(tmp_path, slide, monkeypatch, process,
                                                                          full, name):
    """The label pyramids or overlay.png fail while the report is drawn (it waits for overlay.png before its
    density map, for labels.ome.tif before its crops): one line, nothing half-kept, --resume offered."""
    path, labels = slide
    spec = LabelCounterSpec(PROTOCOL, labels, shift_px=2)
    out = tmp_path / "out"
    monkeypatch.setattr(ResultWriter, "tables_in_a_process", bool(process))
    monkeypatch.setattr(ResultWriter, "process_per_output", process == "per output")
    monkeypatch.setattr(ResultWriter, "label_files", full)
    (outcome,) = count_serially(spec.load(), [(path, out)], band_rows=1)
    message = str(outcome.error)
    assert isinstance(outcome.error, WriteError) and "\n" not in message
    assert name in message and "No space left on device" in message
    assert not out.exists() and done_bands(partial_folder(out))


@pytest.mark.parametrize("process, per_output", [(True, False), (False, False), (True, True)])
def test_the_tables_are_the_same_written_in_a_process_or_in_threads(tmp_path, slide, monkeypatch, process,
                                                                     per_output):
    """Threads of the count, one process for all the result files, or one per heavy output (with more cores)."""
    path, labels = slide
    spec = LabelCounterSpec(PROTOCOL, labels, shift_px=2)
    monkeypatch.setattr(ResultWriter, "process_per_output", per_output)
    monkeypatch.setattr(ResultWriter, "tables_in_a_process", process)
    spec.load().count(path, tmp_path / "a")
    monkeypatch.setattr(ResultWriter, "tables_in_a_process", not process)
    spec.load().count(path, tmp_path / "b")
    for name in ("cells.csv", "cells.geojson", "predictions.coco.json", "overlay.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert_same_result(tmp_path / "a", tmp_path / "b")      # labels.ome.tif's pixels too


def test_a_journal_file_on_a_full_disk_is_one_line_too(tmp_path, slide, monkeypatch):
    """The journal's own files (a finished band) are written outside the result writer: the same one line."""
    path, labels = slide
    spec = LabelCounterSpec(PROTOCOL, labels)

    def save_band(folder, band, owned):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / f"band-{band.index}.npz"))
    monkeypatch.setattr("cellseg.run.pipeline.save_band", save_band)
    (outcome,) = count_serially(spec.load(), [(path, tmp_path / "out")], band_rows=1)
    assert isinstance(outcome.error, WriteError)
    # the journal's folder, kept for --resume, is where that file was to be
    assert f"cannot write band-0.npz into {partial_folder(tmp_path / 'out')}: " in str(outcome.error)
    assert "MB free there" in str(outcome.error)


def test_a_band_file_written_on_a_full_disk_keeps_the_bands_before_it(tmp_path, slide, monkeypatch):
    """The journal's own write (atomic_write_bytes) failing for lack of space, as on a real full disk: the finished
    bands are kept, and --resume with room again gives the result of an uninterrupted count."""
    import os
    path, labels = slide
    spec = LabelCounterSpec(PROTOCOL, labels)
    spec.load().count(path, tmp_path / "reference")
    replace = os.replace

    def full_after_two_bands(src, dst, *args, **kwargs):
        if Path(dst).name.startswith("band-") and Path(dst).name not in ("band-00000.npz", "band-00001.npz"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return replace(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, "replace", full_after_two_bands)
    out = tmp_path / "out"
    (outcome,) = count_serially(spec.load(), [(path, out)], band_rows=1)
    assert isinstance(outcome.error, WriteError) and "MB free there" in str(outcome.error)
    assert done_bands(partial_folder(out)) == {0, 1}
    monkeypatch.setattr(os, "replace", replace)
    (outcome,) = count_serially(spec.load(), [(path, out)], resume=True)
    assert outcome.error is None and outcome.kept_bands == 2
    assert_same_result(tmp_path / "reference", out)


def test_a_finished_result_that_cannot_move_into_place_is_kept_for_resume(tmp_path, slide):
    """Files added to the earlier result while the count ran (or a permission taken away): the move into place is
    refused, and the finished work is kept, not thrown away with the refusal."""
    path, labels = slide
    spec = LabelCounterSpec(PROTOCOL, labels)
    out = tmp_path / "out"
    spec.load().count(path, out)
    reference = {p.name: p.read_bytes() for p in out.iterdir() if p.name == "cells.csv"}

    class AddsANote(LabelCounterSpec):
        def load(self):
            counter = super().load()
            count_into = counter.count_into

            def count_then_note(*args, **kwargs):
                summary = count_into(*args, **kwargs)
                (out / "notes.txt").write_text("mine")       # the user, while the count was finishing
                return summary
            counter.count_into = count_then_note
            return counter
    (outcome,) = count_serially(AddsANote(PROTOCOL, labels).load(), [(path, out)], band_rows=1)
    assert outcome.error is not None and "notes.txt" in str(outcome.error)
    partial = partial_folder(out)
    assert (partial / "journal.json").is_file() and done_bands(partial) == {0, 1, 2, 3, 4}
    (out / "notes.txt").unlink()
    counter = spec.load()
    (outcome,) = count_serially(counter, [(path, out)], resume=True)
    assert outcome.error is None and outcome.kept_bands == 5 and not counter.detector.seen   # nothing detected again
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name == "cells.csv"} == reference
    assert not partial.exists()


def test_a_count_without_a_journal_names_the_result_folder_too(tmp_path, slide, monkeypatch):
    """CellCounter.count (the Python API: no journal) on a full disk: the same line, naming the folder asked for
    (its staging folder is removed), and nothing left behind."""
    path, labels = slide
    monkeypatch.setattr(ResultWriter, "geojson_writer", FullGeoJson)
    out = tmp_path / "new" / "out"
    with pytest.raises(WriteError) as caught:
        LabelCounterSpec(PROTOCOL, labels).load().count(path, out)
    assert str(caught.value).startswith(f"cannot write cells.geojson into {out}: No space left on device (")
    assert not (tmp_path / "new").exists()


def test_a_write_error_crosses_processes_whole():
    """A Dask worker's WriteError reaches the client pickled: the same line, and still placed in its folder."""
    import pickle
    error = WriteError("cells.csv", Path("/data/.out.partial/result"), "No space left on device", "0.0 MB free there")
    back = pickle.loads(pickle.dumps(error))
    assert str(back) == str(error) and back.folder == error.folder
    moved = back.seen_from(Path("/data/.out.partial/result"), Path("/data/out"))
    assert str(moved) == "cannot write cells.csv into /data/out: No space left on device (0.0 MB free there)"
    assert error.seen_from(Path("/elsewhere"), Path("/data/out")) is error


@pytest.mark.slow
def test_the_command_line_says_it_in_one_line_and_offers_resume(tmp_path, tiny_bundle, monkeypatch, caplog):
    """`cellseg count` on a full disk: exit code 1, one line on stderr, no traceback; the journal's warning names
    the kept partial folder and --resume."""
    slide = tmp_path / "slide.tif"
    tifffile.imwrite(slide, ((random_cells(160, 160, 10, 60, seed=3) > 0) * 200 + 20).astype(np.uint8))
    monkeypatch.setattr(ResultWriter, "geojson_writer", FullGeoJson)
    out = tmp_path / "out"
    result = invoke(["count", str(slide), "-o", str(out), "--model", str(tiny_bundle), "--tile-size", "64",
                     "--halo", "16", "--tissue", "none", "--band-rows", "1", "-q"])
    assert_user_error(result, 1, f"cannot write cells.geojson into {out}:", "No space left on device",
                      "MB free there")
    assert done_bands(partial_folder(out))
    assert any("--resume" in r.getMessage() for r in caplog.records)


def test_outputs_picks_the_files_written(tmp_path, slide):
    path, labels = slide
    spec = LabelCounterSpec(PROTOCOL.replace(outputs="cells.csv,labels.ome.tif"), labels)
    out = tmp_path / "some"
    summary = spec.load().count(path, out)
    written = {p.name for p in out.iterdir() if p.name in ALL_FILES}
    assert written == set(result_files(False, outputs="cells.csv,labels.ome.tif"))
    assert {"cells.csv", "labels.ome.tif", "run.json", "summary.json"} <= written
    assert not written & {"cells.geojson", "predictions.coco.json", "panoptic.ome.tif", "overlay.png", "report.html"}
    assert summary["cell_count"] == len(np.unique(tifffile.imread(out / "labels.ome.tif"))) - 1
    assert json.loads((out / "run.json").read_text())["protocol"]["export"]["outputs"] == "cells.csv,labels.ome.tif"
    # the report brings what it is drawn from
    spec = LabelCounterSpec(PROTOCOL.replace(outputs="report.html"), labels)
    spec.load().count(path, tmp_path / "report")
    written = {p.name for p in (tmp_path / "report").iterdir() if p.name in ALL_FILES}
    assert written == set(result_files(False, outputs="report.html"))
    assert {"report.html", "cells.csv", "overlay.png", "tissue_mask.png", "labels.ome.tif"} <= written
    assert not written & {"cells.geojson", "predictions.coco.json", "panoptic.ome.tif", "area_histogram.png"}


def test_the_outputs_help_names_the_files_always_written_and_those_the_report_brings():
    from cellseg.planning import SETTINGS
    from cellseg.results.writer import ALWAYS, REPORT_NEEDS
    text = SETTINGS["outputs"].help
    always, brings = text.split("always written", 1)
    named = {name: set(re.findall(r"[a-z_]+\.(?:json|csv|png|html|ome\.tif)", part))
             for name, part in (("always", always.split(";", 1)[1]), ("brings", brings.split("(", 1)[1]))}
    assert named == {"always": set(ALWAYS), "brings": set(REPORT_NEEDS)}


def test_an_unknown_output_is_a_usage_error():
    result = invoke(["count", "slide.tif", "--outputs", "cells.csv,cells.xlsx"])
    assert_user_error(result, 2, "outputs", "cells.xlsx")


def test_the_expected_size_is_about_the_result_folders(tmp_path, slide):
    """results.expected_size (what --estimate and `cellseg info` state) against a real result folder."""
    from cellseg.results import expected_size
    path, labels = slide
    out = tmp_path / "out"
    summary = LabelCounterSpec(PROTOCOL, labels).load().count(path, out)
    n = summary["cell_count"]

    def size(names):
        return sum((out / name).stat().st_size for name in names)
    tables = "cells.csv,cells.geojson,predictions.coco.json,labels.ome.tif,panoptic.ome.tif"
    per_nucleus = expected_size(n, False, tables, 200, 170) - expected_size(0, False, tables, 200, 170)
    actual = size(tables.split(","))
    assert actual / 2 < per_nucleus < 2 * actual, (per_nucleus, actual)
    whole = size([p.name for p in out.iterdir() if p.name in ALL_FILES])
    assert whole < expected_size(n, False, "all", 200, 170) < 3 * whole


def test_the_expected_size_of_a_colour_slide_is_about_its_result_folder(tmp_path):
    """An H&E slide's overlay and report crops compress less than a fluorescence one's: the real H&E patch tiled 3 x 3
    (768 x 960 px) against what expected_size states for a colour slide (the gray figures said half)."""
    from PIL import Image

    from cellseg.results import expected_size
    examples = Path(__file__).resolve().parents[2] / "example_slides"
    patch = np.asarray(Image.open(examples / "he_patch.png").convert("RGB"))
    labels = tifffile.imread(examples / "he_patch_labels.tif").astype(np.int32)
    tiles = [np.where(labels > 0, labels + k * (labels.max() + 1), 0) for k in range(9)]
    tiled = np.block([[tiles[3 * r + c] for c in range(3)] for r in range(3)])
    Image.fromarray(np.tile(patch, (3, 3, 1))).save(tmp_path / "he.png")
    tifffile.imwrite(tmp_path / "labels.tif", tiled)
    protocol = PROTOCOL.replace(modality="brightfield", tile_size=256, halo_px=32)
    summary = LabelCounterSpec(protocol, tmp_path / "labels.tif").load().count(tmp_path / "he.png", tmp_path / "out")
    whole = sum(p.stat().st_size for p in (tmp_path / "out").iterdir() if p.name in ALL_FILES)
    colour = expected_size(summary["cell_count"], False, "all", *tiled.shape, colour=True)
    assert whole / 1.5 < colour < 1.5 * whole, (colour, whole)
    assert expected_size(summary["cell_count"], False, "all", *tiled.shape) < whole / 1.5     # the gray figures


def test_the_estimate_and_info_state_the_result_folders_size(tmp_path, slide):
    from cellseg.run import estimate_count
    from cellseg.tissue.finder import TissueFinder

    from ..helpers import LabelReadingDetector
    path, labels = slide
    image = tifffile.imread(labels)
    est = estimate_count(path, PROTOCOL, LabelReadingDetector(image), TissueFinder("none"), sample_tiles=8)
    cells = len(np.unique(image)) - 1
    assert cells / 2 < est.nuclei < 2 * cells and est.result_bytes > 0
    assert "its result folder about" in est.describe() and "nuclei at the sample tiles' density" in est.describe()
    result = invoke(["info", str(path), "--mpp", "0.5"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if line.strip().startswith("results"))
    assert "a nucleus" in line and "nuclei/mm²" in line


def test_info_states_a_small_fields_area_as_it_is(tmp_path):
    """864 x 1056 px at 0.25 µm/px is 0.057 mm², which `cellseg info` said as 0.1."""
    path = tmp_path / "field.tif"
    tifffile.imwrite(path, np.zeros((864, 1056), np.uint8))
    result = invoke(["info", str(path), "--mpp", "0.25"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if line.strip().startswith("results"))
    assert "if all 0.057 mm² were tissue" in line
