"""Resuming a killed count (run/journal.py, run/cohort.py, `cellseg count --resume`): finished bands are kept beside the
result, a resumed run computes only what is missing and gives the result of an uninterrupted run; a journal of
another slide, protocol or cellseg version is refused with one line; complete results are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellseg.errors import JournalError, OutputError
from cellseg.geometry import Band, Instances
from cellseg.planning import plan_slide
from cellseg.results import partial_folder
from cellseg.run import Journal, count_serially, done_bands, load_band, load_plan, save_band, save_plan
from cellseg.run.journal import fingerprint
from cellseg.slides import open_slide
from cellseg.tissue.finder import TissueFinder
from cellseg.util import StageTimer

from ..helpers import (
    DATA,
    FAST,
    SMALL_TILES,
    LabelCounterSpec,
    LabelReadingDetector,
    Tally,
    assert_same_result,
    assert_user_error,
    invoke,
    listing,
    random_cells,
)

PROTOCOL = SMALL_TILES


@pytest.fixture
def slide(tmp_path) -> tuple[Path, Path]:
    """A 200 x 170 px slide (5 rows of 40 px tiles) and its label image."""
    labels = random_cells(200, 170, max_diameter=10, n=500, seed=11)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    tifffile.imwrite(tmp_path / "slide.tif", ((labels > 0) * 200 + 20).astype(np.uint8))
    return tmp_path / "slide.tif", tmp_path / "labels.tif"


class PowerCut(LabelReadingDetector):
    """Stops the process's work (an error that is not the input's fault) once it has seen `tiles` tiles."""

    def __init__(self, labels, tiles: int):
        super().__init__(labels, shift_px=2, score=None)
        self.tiles = tiles

    def detect(self, images, tiles, scale=1.0):
        if len(self.seen) >= self.tiles:
            raise RuntimeError("power cut")
        return super().detect(images, tiles, scale)


def counter_of(spec: LabelCounterSpec, detector=None):
    counter = spec.load()
    if detector is not None:
        counter.detector = detector
    return counter


def interrupted(spec: LabelCounterSpec, slide: Path, out: Path, tiles: int) -> Path:
    """Count `slide` with band_rows=1 until the power cut after `tiles` tiles; returns the kept partial folder."""
    cut = PowerCut(tifffile.imread(spec.labels), tiles)
    with pytest.raises(RuntimeError, match="power cut"):
        list(count_serially(counter_of(spec, cut), [(slide, out)], band_rows=1))
    return partial_folder(out)


def uninterrupted_then_interrupted(spec: LabelCounterSpec, slide: Path, folder: Path, tiles: int):
    """(the result of an uninterrupted count of `slide`, the result folder of an interrupted one, its partial
    folder)."""
    reference = folder / "reference"
    spec.load().count(slide, reference)
    return reference, folder / "out", interrupted(spec, slide, folder / "out", tiles)


@pytest.mark.slow
def test_a_resumed_count_detects_only_the_missing_bands_and_equals_an_uninterrupted_one(tmp_path, slide):
    path, labels = slide
    spec = LabelCounterSpec(PROTOCOL, labels, shift_px=2)
    # 5 tiles a row: rows 0 and 1 done, row 2 started
    reference, out, partial = uninterrupted_then_interrupted(spec, path, tmp_path, tiles=12)
    assert done_bands(partial) == {0, 1} and not out.exists()
    # Without --resume the unfinished work is neither mixed in nor thrown away.
    (outcome,) = count_serially(spec.load(), [(path, out)], band_rows=1)
    assert isinstance(outcome.error, JournalError) and "--resume" in str(outcome.error)
    assert done_bands(partial) == {0, 1}
    counter, progress = spec.load(), Tally()
    (outcome,) = count_serially(counter, [(path, out)], resume=True, progress=progress)
    assert outcome.error is None and outcome.kept_bands == 2
    assert progress.total == progress.done == 25                  # the job's tiles, those read back included
    assert sorted(counter.detector.seen) == list(range(10, 25))     # rows 2-4 only
    assert_same_result(reference, out)
    assert not partial.exists()
    assert json.loads((out / "run.json").read_text())["fingerprint"]["protocol"] == PROTOCOL.to_dict()


@pytest.mark.parametrize("change", ["protocol", "model", "slide", "version"])
def test_a_journal_of_another_run_is_refused_in_one_line(tmp_path, slide, change, monkeypatch):
    path, labels = slide
    spec = LabelCounterSpec(PROTOCOL, labels)
    out = tmp_path / "out"
    partial = interrupted(spec, path, out, tiles=6)
    before = {p.name: p.read_bytes() for p in partial.iterdir() if p.is_file()}
    words = {"protocol": "dedupe_overlap", "model": "other model settings (shift_px: 0 there, 3 here)",
             "slide": "changed since", "version": "cellseg 0.0.1 there"}[change]
    if change == "protocol":
        spec = dataclasses.replace(spec, protocol=PROTOCOL.replace(dedupe_overlap=0.3))
    elif change == "model":
        spec = dataclasses.replace(spec, shift_px=3)
    elif change == "slide":
        time.sleep(0.05)
        path.write_bytes(path.read_bytes())      # rewritten: the same pixels, but not provably the same file
    else:
        header = json.loads((partial / "journal.json").read_text())
        header["fingerprint"]["cellseg_version"] = "0.0.1"
        (partial / "journal.json").write_text(json.dumps(header))
        before["journal.json"] = (partial / "journal.json").read_bytes()
    (outcome,) = count_serially(spec.load(), [(path, out)], resume=True)
    message = str(outcome.error)
    assert isinstance(outcome.error, JournalError) and "\n" not in message
    assert words in message and str(partial) in message
    assert {p.name: p.read_bytes() for p in partial.iterdir() if p.is_file()} == before    # left as it was


def test_a_resumed_count_may_write_other_files_than_the_run_it_resumes(tmp_path, slide, caplog):
    """A count that filled the disk is resumed with fewer files (`--outputs cells.csv`): the bands hold detected
    cells, not files, so they are used, and the result is the files asked for now. It was refused ("other protocol
    settings"), leaving the choice of making room or counting again from the start."""
    path, labels = slide
    spec = LabelCounterSpec(PROTOCOL, labels, shift_px=2)
    reference, out, partial = uninterrupted_then_interrupted(spec, path, tmp_path, tiles=12)
    fewer = dataclasses.replace(spec, protocol=PROTOCOL.replace(outputs="cells.csv"))
    counter = fewer.load()
    (outcome,) = count_serially(counter, [(path, out)], resume=True)
    assert outcome.error is None and outcome.kept_bands == 2
    assert sorted(counter.detector.seen) == list(range(10, 25))     # the kept bands were used
    assert (out / "cells.csv").read_bytes() == (reference / "cells.csv").read_bytes()
    assert not (out / "labels.ome.tif").exists() and not partial.exists()
    run = json.loads((out / "run.json").read_text())
    assert run["fingerprint"]["protocol"] == fewer.protocol.to_dict()       # what this result was made with
    # and the result is this count's: --resume with the same settings skips it; so does a batch resumed with other
    # files after a full disk (its complete results hold the same cells), saying so
    (outcome,) = count_serially(fewer.load(), [(path, out)], resume=True)
    assert outcome.error is None and outcome.skipped
    (outcome,) = count_serially(spec.load(), [(path, out)], resume=True)
    assert outcome.error is None and outcome.skipped and not (out / "labels.ome.tif").exists()
    assert "written with other protocol settings (export.outputs: 'cells.csv' there, 'all' here)" in caplog.text
    # anything the cells depend on still refuses the journal
    partial = interrupted(spec, path, tmp_path / "again", tiles=12)
    other = dataclasses.replace(spec, protocol=PROTOCOL.replace(outputs="cells.csv", min_area_px=2))
    (outcome,) = count_serially(other.load(), [(path, tmp_path / "again")], resume=True)
    assert isinstance(outcome.error, JournalError) and "min_area_px" in str(outcome.error)
    assert done_bands(partial) == {0, 1}


def test_an_interrupted_recount_with_other_settings_into_an_earlier_result_resumes_and_replaces_it(tmp_path, slide):
    path, labels = slide
    earlier = LabelCounterSpec(PROTOCOL, labels)
    out = tmp_path / "out"
    earlier.load().count(path, out)
    spec = LabelCounterSpec(PROTOCOL, labels, shift_px=2)     # other settings, e.g. another score threshold
    reference = tmp_path / "reference"
    spec.load().count(path, reference)
    partial = interrupted(spec, path, out, tiles=12)
    assert done_bands(partial) == {0, 1}
    counter = spec.load()
    (outcome,) = count_serially(counter, [(path, out)], resume=True)
    assert outcome.error is None and outcome.kept_bands == 2 and not outcome.skipped
    assert sorted(counter.detector.seen) == list(range(10, 25))     # only the bands not yet done
    assert_same_result(reference, out)
    assert not partial.exists()
    # with nothing of this count to resume, the earlier result is not taken for it: refused, pointing at the way
    (outcome,) = count_serially(LabelCounterSpec(PROTOCOL, labels, shift_px=4).load(), [(path, out)], resume=True)
    assert isinstance(outcome.error, JournalError) and "rerun without --resume to replace it" in str(outcome.error)


def test_an_interrupted_recount_of_the_same_count_is_resumed_not_skipped(tmp_path, slide):
    """The same count again into its earlier result, killed: --resume finishes it (it was skipped, its unfinished
    count left beside the result, and every count without --resume refused for it)."""
    path, labels = slide
    spec = LabelCounterSpec(PROTOCOL, labels, shift_px=2)
    reference, out = tmp_path / "reference", tmp_path / "out"
    spec.load().count(path, reference)
    (outcome,) = count_serially(spec.load(), [(path, out)])         # as `cellseg count` does: run.json's fingerprint
    assert outcome.error is None
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}
    partial = interrupted(spec, path, out, tiles=12)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier      # the earlier result is untouched
    (outcome,) = count_serially(spec.load(), [(path, out)], resume=True)
    assert outcome.error is None and not outcome.skipped and outcome.kept_bands == 2
    assert not partial.exists() and listing(out) == listing(reference)
    assert_same_result(reference, out)
    (outcome,) = count_serially(spec.load(), [(path, out)])         # and a plain recount is not refused
    assert outcome.error is None
    # an unfinished count of other settings beside it: refused in one line naming it, not skipped
    partial = interrupted(dataclasses.replace(spec, shift_px=3), path, out, tiles=12)
    (outcome,) = count_serially(spec.load(), [(path, out)], resume=True)
    assert isinstance(outcome.error, JournalError) and str(partial) in str(outcome.error)
    assert "\n" not in str(outcome.error) and done_bands(partial) == {0, 1}


def test_a_damaged_band_file_is_detected_again_on_resume(tmp_path, slide, caplog):
    """A band file cut short (written atomically: damaged from outside) was a traceback (BadZipFile), and then, once
    one line, the whole journal thrown away while the line said to remove it."""
    path, labels = slide
    spec = LabelCounterSpec(PROTOCOL, labels, shift_px=2)
    reference, out, partial = uninterrupted_then_interrupted(spec, path, tmp_path, tiles=12)
    band = partial / "band-00001.npz"
    band.write_bytes(band.read_bytes()[:-40])
    counter = spec.load()
    (outcome,) = count_serially(counter, [(path, out)], resume=True)
    assert outcome.error is None and outcome.kept_bands == 1
    assert sorted(counter.detector.seen) == list(range(5, 25))      # band 1 again, then rows 2-4
    assert "band 1 of" in caplog.text and "damaged" in caplog.text
    assert_same_result(reference, out)


@pytest.mark.parametrize("name", ["journal.json", "plan.npz"])
def test_a_damaged_journal_or_plan_is_refused_in_one_line_and_kept(tmp_path, slide, name):
    """A journal.json cut short made the journal look new: its bands were thrown away silently and the count started
    over; a damaged plan.npz was refused with "remove ... to start over", the folder removed already."""
    path, labels = slide
    spec = LabelCounterSpec(PROTOCOL, labels, shift_px=2)
    out = tmp_path / "out"
    partial = interrupted(spec, path, out, tiles=12)
    (partial / name).write_bytes((partial / name).read_bytes()[:30])
    for resume in (True, False):     # without --resume an unfinished count is refused too, whichever way
        (outcome,) = count_serially(spec.load(), [(path, out)], resume=resume)
        message = str(outcome.error)
        assert isinstance(outcome.error, JournalError) and "\n" not in message and str(partial) in message
        assert not resume or (name in message and "damaged" in message and "remove" in message)
        assert done_bands(partial) == {0, 1} and not out.exists()


@pytest.mark.slow
def test_complete_results_are_skipped_on_resume_and_reported(tmp_path, slide, tiny_bundle):
    """Two inputs counted, then the same command with --resume: nothing is counted again, both are reported as
    skipped and summary.csv still lists both. A result of another protocol is not taken for this one's."""
    path, _ = slide
    second = tmp_path / "second.tif"
    second.write_bytes(path.read_bytes())
    command = ["count", path, second, *FAST, "--model", tiny_bundle, "-o", tmp_path / "out"]
    first = invoke(command)
    assert first.exit_code == 0, first.output
    results = {p: (tmp_path / "out" / p / "cells.csv").stat().st_mtime_ns for p in ("slide", "second")}
    again = invoke([*command, "--resume"])
    assert again.exit_code == 0, again.output
    assert again.stdout.count("skipped (--resume)") == 2
    assert {p: (tmp_path / "out" / p / "cells.csv").stat().st_mtime_ns for p in results} == results
    summary = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    assert len(summary) == 3 and all(",ok," in line for line in summary[1:])
    other = invoke([*command, "--resume", "--halo", "8"])
    assert other.exit_code == 1
    assert other.stderr.count("halo_px") == 2 and "rerun without --resume" in other.stderr


def test_plan_and_band_files_give_back_what_was_saved(tmp_path, slide):
    path, labels = slide
    from cellseg.planning import load_regions
    protocol = PROTOCOL.replace(tissue_method="otsu", cell_expansion_px=3.0)
    regions = tmp_path / "regions.geojson"     # the cell expansion and the regions travel with the plan too
    regions.write_text('{"type": "Polygon", "coordinates": [[[5, 5], [90.5, 7], [60, 80.25], [5, 5]]]}')
    with open_slide(path) as opened:
        plan = plan_slide(opened, protocol, LabelReadingDetector(tifffile.imread(labels)), TissueFinder("otsu"),
                          StageTimer(), regions=load_regions(regions))
        save_plan(tmp_path, plan, opened.info)
    assert plan.cell_expansion_px == 3.0 and plan.regions is not None
    back = load_plan(tmp_path)
    for f in dataclasses.fields(plan):
        a, b = getattr(plan, f.name), getattr(back, f.name)
        if f.name == "tissue":
            assert np.array_equal(a.mask, b.mask) and dataclasses.replace(a, mask=None) == dataclasses.replace(
                b, mask=None)
        elif isinstance(a, np.ndarray):
            assert np.array_equal(a, b) and a.dtype == b.dtype
        else:
            assert a == b, f.name
    rng = np.random.default_rng(1)
    masks = [rng.random((h, w)) > 0.4 for h, w in [(3, 5), (7, 2), (1, 1)]]
    boxes = np.array([[10, 12, 13, 17], [0, 0, 7, 2], [30, 31, 31, 32]], np.int64)
    cells = Instances(boxes, masks, np.float32([0.9, 0.5, 0.7]), np.int64([1, 2, 1]), np.int64([4, 4, 6]),
                      np.array([False, True, False]))
    band = Band(2, 1, 2)
    save_band(tmp_path, band, {4: cells.take([0, 1]), 5: Instances.empty(), 6: cells.take([2])})
    loaded = load_band(tmp_path, band)
    assert sorted(loaded) == [4, 5, 6] and len(loaded[5]) == 0
    both = Instances.concat([loaded[4], loaded[6]])
    for name in ("boxes", "scores", "class_ids", "tile_index", "cut"):
        assert np.array_equal(getattr(both, name), getattr(cells, name))
        assert getattr(both, name).dtype == getattr(cells, name).dtype
    assert all(np.array_equal(a, b) and b.dtype == bool for a, b in zip(cells.masks, both.masks))
    with pytest.raises(JournalError, match="another band"):
        load_band(tmp_path, Band(2, 1, 3))


def test_a_journal_held_by_a_running_count_is_refused(tmp_path, slide):
    path, labels = slide
    out = tmp_path / "out"
    print_ = {"cellseg_version": "x"}
    with Journal.open(out, print_, resume=False):
        before = listing(tmp_path)
        with pytest.raises(OutputError, match=f"found one \\(process {os.getpid()}\\)"):
            Journal.open(out, print_, resume=True)
        assert listing(tmp_path) == before
    assert not partial_folder(out).exists()      # ended without a result or an error: nothing kept


def test_a_file_system_without_locks_counts_with_a_warning_not_a_refusal(tmp_path, slide, monkeypatch, caplog):
    """Lustre mounted without flock (ENOSYS), NFS without its lock daemon (ENOLCK): flock fails there for every
    count, which was refused as if another count held the folder ("found one (process ?)"), so no count could run on
    such a file system. Only "held by another" refuses; anything else counts, with a warning."""
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    path, labels = slide
    spec = LabelCounterSpec(PROTOCOL, labels, shift_px=2)
    reference = tmp_path / "reference"
    spec.load().count(path, reference)
    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "out"
    (outcome,) = count_serially(spec.load(), [(path, out)])
    assert outcome.error is None
    assert_same_result(reference, out)
    assert "cannot lock" in caplog.text and "Function not implemented" in caplog.text


def test_a_count_started_at_the_same_moment_leaves_the_running_ones_folder(tmp_path, slide, monkeypatch):
    """Two counts of one result folder started at once: the second looked for the partial folder before the first
    made it, took itself for its maker, and when refused the lock removed the folder the first was counting in."""
    path, labels = slide
    out = tmp_path / "out"
    with open_slide(path) as opened:
        print_ = fingerprint(opened.info, LabelCounterSpec(PROTOCOL, labels).settings())
    first = Journal.open(out, print_, resume=False)
    monkeypatch.setattr(Path, "is_dir", lambda self: False if self == first.folder else os.path.isdir(self))
    with pytest.raises(OutputError, match="expected no other cellseg count writing"):
        Journal.open(out, print_, resume=False)
    assert (first.folder / "journal.json").is_file() and (first.folder / "lock").is_file()
    first.end(None)


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_slide_then_resume(tmp_path, tiny_bundle):
    """A real `cellseg count` process killed with SIGKILL while it counts; `--resume` then reads back the bands it
    finished, detects the rest, and writes the result of an uninterrupted run."""
    import torch
    image = np.asarray(Image.open(DATA / "dsb_fluo.png"))
    Image.fromarray(np.concatenate([image, image[::-1][:128]])).save(tmp_path / "slide.png")   # 384 x 256: 6 x 4 tiles
    args = ["count", tmp_path / "slide.png", *FAST, "--model", tiny_bundle, "--band-rows", "1"]
    out = tmp_path / "slide.cellseg"
    partial = partial_folder(out)
    # The same number of threads as this process, where the other runs happen: the same arithmetic.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.Popen([sys.executable, "-m", "cellseg.cli", *map(str, args)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not done_bands(partial) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
        stderr = process.stderr.read().decode()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL, stderr
    kept = done_bands(partial)
    assert 0 < len(kept) < 6 and not out.exists()
    refused = invoke(args)
    assert_user_error(refused, 1, "unfinished count", "--resume", str(partial))
    resumed = invoke([*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"({len(kept)} band(s) read back from the interrupted run)" in resumed.stdout
    assert not partial.exists()
    uninterrupted = invoke([*args, "-o", tmp_path / "uninterrupted"])
    assert uninterrupted.exit_code == 0, uninterrupted.output
    assert_same_result(tmp_path / "uninterrupted", out)


@pytest.mark.slow
def test_a_serial_journal_is_resumed_on_dask(tmp_path, slide):
    import distributed

    from cellseg.run import count_on_dask
    path, labels = slide
    spec = LabelCounterSpec(PROTOCOL, labels, shift_px=2)
    reference, out, _ = uninterrupted_then_interrupted(spec, path, tmp_path, tiles=7)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster:
        (outcome,) = count_on_dask(spec, [(path, out)], scheduler=cluster.scheduler_address, resume=True)
    assert outcome.error is None and outcome.kept_bands == 1
    assert json.loads((out / "run.json").read_text())["distributed"]["bands_from_journal"] == 1
    assert_same_result(reference, out)


def test_a_slide_run_reads_journaled_bands_back_and_calibrates_only_for_tiles_to_detect(tmp_path, slide):
    from cellseg.run import SlideRun
    path, labels = slide
    journal = tmp_path / "journal"
    journal.mkdir()
    first = LabelReadingDetector(tifffile.imread(labels))
    with open_slide(path) as opened:
        run = SlideRun(opened, PROTOCOL, first, journal=journal, band_rows=2)
        run.plan(TissueFinder("none"))
        owned = list(run.owned_tiles())
    assert first.windows and first.seen and done_bands(journal) == {0, 1, 2}
    again = LabelReadingDetector(tifffile.imread(labels))
    with open_slide(path) as opened:
        run = SlideRun(opened, PROTOCOL, again, journal=journal, band_rows=2)
        assert run.plan() is not None                   # the journal's: no tissue finder needed
        back = list(run.owned_tiles())
    assert again.seen == [] and again.windows == []     # nothing left to detect: not calibrated either
    assert [t for t, _ in back] == [t for t, _ in owned]
    for (_, a), (_, b) in zip(owned, back):
        assert np.array_equal(a.boxes, b.boxes) and all(np.array_equal(m, n) for m, n in zip(a.masks, b.masks))
