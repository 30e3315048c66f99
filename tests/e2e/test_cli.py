"""`cellseg` on the command line, through click's CliRunner: bad inputs give one line and an exit code and
leave nothing behind; good inputs give a complete result folder.

Images are small crops of tests/data (64 x 64 px: one 64 px tile), the model is the session's tiny
random-init bundle on the CPU, so every run takes about a second.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import tomllib
from PIL import Image

import cellseg
from cellseg.cells import expanded_columns
from cellseg.planning import list_protocols, load_protocol, protocols_dir
from cellseg.results import RESULT_FILES, result_files

from ..helpers import DATA, FAST, STAGING, assert_nothing_left, assert_user_error, invoke, listing, snapshot

# --- helpers -----------------------------------------------------------------------------------------

def crop_png(src: Path, dst: Path, size: int = 64, offset: int = 0) -> Path:
    Image.fromarray(np.asarray(Image.open(src))[offset:offset + size, offset:offset + size]).save(dst)
    return dst


@pytest.fixture
def small_png(tmp_path, fluo_png) -> Path:
    return crop_png(fluo_png, tmp_path / "small.png")


@pytest.fixture
def model(tiny_bundle) -> list[str]:
    return ["--model", str(tiny_bundle)]


# --- bad inputs: exit 1, one line, nothing written -----------------------------------------------------

def _make_bad_input(kind: str, folder: Path) -> Path:
    image = np.asarray(Image.open(DATA / "dsb_fluo.png"))[:64, :64]
    if kind == "missing":
        return folder / "missing.png"
    if kind == "text-as-png":
        path = folder / "notes.png"
        path.write_text("these are my notes, not an image\n")
    elif kind == "text-file":
        path = folder / "notes.txt"
        path.write_text("these are my notes\n")
    elif kind == "empty-file":
        path = folder / "empty.tif"
        path.write_bytes(b"")
    elif kind == "truncated-tiff":
        full = folder / "full.tif"
        tifffile.imwrite(full, np.tile(image, (2, 2)), tile=(32, 32), compression="zlib")
        path = folder / "truncated.tif"
        path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
        full.unlink()
    elif kind == "truncated-tiff-header":
        full = folder / "full.tif"
        tifffile.imwrite(full, image)
        path = folder / "truncated.tif"
        path.write_bytes(full.read_bytes()[:12])
        full.unlink()
    elif kind == "zero-size":
        path = folder / "zero.tif"
        with pytest.warns(UserWarning):  # tifffile: "writing zero-size array to nonconformant TIFF"
            tifffile.imwrite(path, np.zeros((0, 0), np.uint8))
    elif kind == "z-stack":
        path = folder / "stack.ome.tif"
        tifffile.imwrite(path, np.zeros((2, 3, 64, 64), np.uint8), metadata={"axes": "TZYX"})
    else:
        raise ValueError(kind)
    return path


BAD_INPUTS = {
    # kind: words the one-line message must hold (what was expected / what was found)
    "missing": ("no such file", "missing.png"),
    "text-as-png": ("expected a slide image", "notes.png", "not one"),
    "text-file": ("unsupported file type", ".txt", "expected a slide image"),
    "empty-file": ("expected a slide image", "empty (0 bytes)"),
    "truncated-tiff": ("expected a complete TIFF", "truncated.tif", "truncated"),
    "truncated-tiff-header": ("expected a readable TIFF", "truncated.tif", "corrupt"),
    "zero-size": ("expected an image of positive size", "zero.tif", "(0, 0)"),
    "z-stack": ("expected a 2-D image", "TZYX", "(2, 3, 64, 64)"),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_1_and_writes_nothing(tmp_path, model, kind):
    path = _make_bad_input(kind, tmp_path)
    before = listing(tmp_path)
    result = invoke(["count", path, *model, *FAST])
    assert_user_error(result, 1, *BAD_INPUTS[kind])
    assert_nothing_left(tmp_path, before)
    assert not (tmp_path / f"{path.stem.split('.')[0]}.cellseg").exists()


def test_bad_input_with_output_folder_leaves_no_result_folder(tmp_path, model):
    """-o names a folder that does not exist yet: a failed run must not leave it (empty or not)."""
    path = _make_bad_input("truncated-tiff", tmp_path)
    before = listing(tmp_path)
    result = invoke(["count", path, "-o", tmp_path / "out", *model, *FAST])
    assert_user_error(result, 1, "truncated")
    assert_nothing_left(tmp_path, before)


def test_bad_input_leaves_no_parent_folders_made_for_output(tmp_path, model):
    path = _make_bad_input("truncated-tiff", tmp_path)
    before = listing(tmp_path)
    result = invoke(["count", path, "-o", tmp_path / "new" / "sub" / "out", *model, *FAST])
    assert_user_error(result, 1, "truncated")
    assert_nothing_left(tmp_path, before)


def test_unknown_protocol(tmp_path, small_png, model):
    before = listing(tmp_path)
    result = invoke(["count", small_png, "--protocol", "bogus", *model, *FAST])
    line = assert_user_error(result, 1, "expected a protocol name", "got 'bogus'")
    for name in list_protocols():  # says what would have been accepted
        assert name in line
    assert_nothing_left(tmp_path, before)


def test_missing_protocol_file(tmp_path, small_png, model):
    before = listing(tmp_path)
    result = invoke(["count", small_png, "--protocol", tmp_path / "mine.toml", *model, *FAST])
    assert_user_error(result, 1, "no such protocol file", "mine.toml")
    assert_nothing_left(tmp_path, before)


def test_invalid_protocol_file_names_file_and_key(tmp_path, small_png, model):
    bad = tmp_path / "mine.toml"
    bad.write_text('name = "mine"\n[tiling]\ntile_size = "big"\n')
    before = listing(tmp_path)
    result = invoke(["count", small_png, "--protocol", bad, *model, *FAST])
    assert_user_error(result, 1, "mine.toml", "tile_size", "expected int", "'big'")
    assert_nothing_left(tmp_path, before)


def test_output_below_a_regular_file(tmp_path, small_png, model):
    """Tests run as root, so chmod cannot make a folder unwritable: a file where a folder must go can."""
    blocker = tmp_path / "somefile.txt"
    blocker.write_text("mine\n")
    before = listing(tmp_path)
    result = invoke(["count", small_png, "-o", blocker / "out", *model, *FAST])
    assert_user_error(result, 1, "expected a folder", "found a file", "somefile.txt")
    assert_nothing_left(tmp_path, before)
    assert blocker.read_text() == "mine\n"


def test_output_is_a_regular_file(tmp_path, small_png, model):
    target = tmp_path / "report.txt"
    target.write_text("my report\n")
    before = listing(tmp_path)
    result = invoke(["count", small_png, "-o", target, *model, *FAST])
    assert_user_error(result, 1, "expected a folder", "found a file", "report.txt")
    assert_nothing_left(tmp_path, before)
    assert target.read_text() == "my report\n"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")
def test_output_in_a_folder_nobody_can_write(tmp_path, small_png, model):
    """/proc refuses new folders even to root."""
    target = Path("/proc/cellseg-test-output")
    result = invoke(["count", small_png, "-o", target, *model, *FAST])
    assert_user_error(result, 1, "cannot write results into /proc")
    assert not target.exists()
    assert listing(tmp_path) == {"small.png"}


def test_output_folder_with_someone_elses_files_is_left_alone(tmp_path, small_png, model):
    theirs = tmp_path / "thesis"
    (theirs / "chapter").mkdir(parents=True)
    (theirs / "draft.docx").write_bytes(bytes(range(256)) * 4)
    (theirs / "chapter" / "notes.txt").write_text("do not delete\n")
    files_before = snapshot(theirs)
    before = listing(tmp_path)
    result = invoke(["count", small_png, "-o", theirs, *model, *FAST])
    assert_user_error(result, 1, "expected an empty folder or an earlier cellseg result", "thesis",
                      "not cellseg's")
    assert snapshot(theirs) == files_before  # byte-identical, nothing added
    assert_nothing_left(tmp_path, before)


@pytest.mark.parametrize("theirs", ["summary.csv", "report.html"])
def test_many_inputs_do_not_overwrite_someone_elses_summary_or_report(tmp_path, small_png, model, theirs):
    results = tmp_path / "results"
    results.mkdir()
    (results / theirs).write_text("sample,weight\nmouse1,21.5\n" if theirs == "summary.csv" else "<html>mine</html>")
    other = shutil.copy(small_png, tmp_path / "other.png")
    files_before = snapshot(results)
    before = listing(tmp_path)
    result = invoke(["count", small_png, other, "-o", results, *model, *FAST])
    assert_user_error(result, 1, theirs, "expected", "found another file")
    assert snapshot(results) == files_before
    assert_nothing_left(tmp_path, before)


def test_many_inputs_into_one_slides_result_or_a_file_are_refused_before_counting(tmp_path, small_png, model):
    one = tmp_path / "one"
    assert invoke(["count", small_png, "-o", one, *model, *FAST]).exit_code == 0
    other = shutil.copy(small_png, tmp_path / "other.png")
    files_before = snapshot(one)
    result = invoke(["count", small_png, other, "-o", one, *model, *FAST])
    assert_user_error(result, 1, "expected a folder to hold the results of 2 slides", "found one slide's result")
    assert snapshot(one) == files_before          # its report.html not replaced by a cohort page, nothing added
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    before = listing(tmp_path)
    result = invoke(["count", small_png, other, "-o", a_file, *model, *FAST])
    assert_user_error(result, 1, "expected a folder at", "found a file")
    assert a_file.read_text() == "mine"
    assert_nothing_left(tmp_path, before)


# --- usage errors: exit 2, before anything is loaded or written ----------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--tile-size", "10"], ("'--tile-size'", "10 is not in the range 64<=x<=8192")),
    (["--tile-size", "128", "--halo", "100"], ("halo", "at most", "64", "got 100")),
    (["--halo", "-1"], ("'--halo'", "-1 is not in the range 0<=x<=4096")),
    (["--batch-size", "0"], ("'--batch-size'", "0 is not in the range")),
    (["--mpp", "-1"], ("'--mpp'", "x>0")),
    (["--mpp", "0"], ("'--mpp'", "x>0")),
    (["--channel", "-1"], ("'--channel'", "-1 is not in the range x>=0")),
    (["--score-threshold", "1.5"], ("'--score-threshold'", "1.5 is not in the range 0.0<=x<=1.0")),
    (["--min-tissue-fraction", "2"], ("'--min-tissue-fraction'", "0.0<=x<=1.0")),
    # NaN passes every bound's comparison: refused by name
    (["--score-threshold", "nan"], ("'--score-threshold'", "expected a finite number", "nan")),
    (["--min-tissue-fraction", "nan"], ("'--min-tissue-fraction'", "expected a finite number")),
    (["--cell-expansion-px", "nan"], ("'--cell-expansion-px'", "expected a finite number")),
    (["--network-nucleus-px", "nan"], ("'--network-nucleus-px'", "expected a finite number")),
    (["--mpp", "nan"], ("'--mpp'", "expected a finite number")),
    (["--diameter", "big"], ("'--diameter'", "expected a number of px or 'auto'", "big")),
    (["--diameter", "-3"], ("'--diameter'", "expected a diameter > 0 px", "-3")),
    (["--device", "bogus"], ("'--device'", "bogus")),
    (["--tile-size", "big"], ("'--tile-size'", "big")),
    (["--tissue", "magic"], ("'--tissue'", "'magic' is not one of 'unet', 'otsu', 'none'")),
    (["--precision", "fp8"], ("'--precision'", "'fp8' is not one of 'auto', 'fp32', 'bf16'")),
    (["--mpp", "abc"], ("'--mpp'", "abc")),
    (["--cell-expansion-um", "-1"], ("'--cell-expansion-um'", "-1.0 is not in the range 0.0<=x<=100.0")),
    (["--cell-expansion-px", "wide"], ("'--cell-expansion-px'", "wide")),
    (["--cell-expansion-um", "5", "--cell-expansion-px", "8"], ("cell expansion in µm or in px", "got both")),
    (["--no-such-option"], ("--no-such-option",)),
])
def test_impossible_parameter_is_one_line_usage_error(tmp_path, small_png, args, words):
    before = listing(tmp_path)
    # A missing model: the parameter must be checked before the bundle is even looked for.
    result = invoke(["count", small_png, "--model", tmp_path / "no-bundle", "-q", *args])
    assert_user_error(result, 2, *words)
    assert_nothing_left(tmp_path, before)


@pytest.mark.parametrize("args, words", [
    (["train", "--data", "x.json", "--out", "o", "--steps", "0"], ("'--steps'", "0 is not in the range x>=1")),
    (["train", "--data", "x.json", "--out", "o", "--crop", "32"], ("'--crop'", "x>=64")),
    (["train", "--data", "x.json", "--out", "o", "--lr", "0"], ("'--lr'", "x>0")),
    (["evaluate", "p.json", "--gt", "g.json", "--iou", "0"], ("'--iou'", "0<x<=1")),
])
def test_other_commands_check_their_options_by_type(tmp_path, args, words):
    before = listing(tmp_path)
    assert_user_error(invoke(args), 2, *words)
    assert_nothing_left(tmp_path, before)


def test_count_overrides_every_setting_with_a_flag_as_declared():
    """The protocol overrides of `cellseg count` are made from protocol.SETTINGS: flag, values, help."""
    from cellseg.cli import count
    from cellseg.planning import SETTINGS, OneOf, Range
    options = {p.name: p for p in count.params}
    flagged = [s for s in SETTINGS.values() if s.flag]
    assert {"tile_size", "halo_px", "tissue_method", "cell_expansion_px"} <= {s.key for s in flagged}
    for setting in SETTINGS.values():
        if setting.flag is None:
            assert setting.key not in options
            continue
        option = options[setting.key]
        assert option.opts == [setting.flag] and option.default is None
        assert setting.help in option.help and setting.key in option.help
        if isinstance(setting.allowed, Range):
            assert (option.type.min, option.type.max) == (setting.allowed.lo, setting.allowed.hi)
        if isinstance(setting.allowed, OneOf):
            assert tuple(option.type.choices) == setting.allowed.choices


@pytest.mark.parametrize("image, channel, words", [
    ("small_png", "5", ("expected channel 0 (or none) for this 1-channel image", "got 5", "--channel")),
    ("he_png", "7", ("expected a channel between 0 and 2 for this 3-channel image", "got 7", "[input] channel")),
])
def test_a_channel_the_image_lacks_is_a_usage_error(request, tmp_path, model, image, channel, words):
    path = request.getfixturevalue(image)
    before = listing(tmp_path)
    assert_user_error(invoke(["count", path, "-o", tmp_path / "out", *model, "-q", "--channel", channel]), 2, *words)
    assert_nothing_left(tmp_path, before)


def test_no_inputs_is_usage_error():
    assert_user_error(invoke(["count"]), 2, "Missing argument 'INPUTS...'")


# --- model bundles -------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["/nonexistent", "tmp"])
def test_missing_model_bundle(tmp_path, small_png, where):
    path = Path(where) if where != "tmp" else tmp_path / "no-such-bundle"
    if path.exists():
        pytest.skip(f"{path} exists on this machine")
    before = listing(tmp_path)
    result = invoke(["count", small_png, "--model", path, *FAST])
    assert_user_error(result, 1, "expected a model bundle", "no bundle", str(path))
    assert_nothing_left(tmp_path, before)


def test_unknown_shipped_bundle_name(tmp_path, small_png):
    result = invoke(["count", small_png, "--model", "no-such-model", *FAST])
    line = assert_user_error(result, 1, "expected a model bundle folder or a shipped bundle name", "'no-such-model'",
                             "shipped bundles: nuclei;")   # the names to choose from: not file names, no tissue U-Net
    assert "model.toml" not in line and "tissue" not in line
    assert listing(tmp_path) == {"small.png"}


def test_tampered_weights_sha_mismatch(tmp_path, small_png, tiny_bundle):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    weights = bundle / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one bit pattern in the last tensor changes
    weights.write_bytes(bytes(data))
    before = listing(tmp_path)
    result = invoke(["count", small_png, "--model", bundle, *FAST])
    assert_user_error(result, 1, "weights.safetensors", "does not match the sha256", "corrupt")
    assert_nothing_left(tmp_path, before)


def test_unbuildable_model_toml(tmp_path, small_png, tiny_bundle):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    meta = (bundle / "model.toml").read_text()
    assert "fpn_channels = 32" in meta
    (bundle / "model.toml").write_text(meta.replace("fpn_channels = 32", 'fpn_channels = "big"'))
    before = listing(tmp_path)
    result = invoke(["count", small_png, "--model", bundle, *FAST])
    assert_user_error(result, 1, "expected a buildable network", "model.toml")
    assert_nothing_left(tmp_path, before)


def test_garbage_weights_without_recorded_sha(tmp_path, small_png, tiny_bundle):
    """No sha256 to compare against: the safetensors reader's own error must still become one line."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    meta = (bundle / "model.toml").read_text()
    (bundle / "model.toml").write_text("\n".join(line for line in meta.splitlines()
                                                 if not line.startswith("weights_sha256")))
    (bundle / "weights.safetensors").write_bytes(b"not a tensor file" * 10)
    before = listing(tmp_path)
    result = invoke(["count", small_png, "--model", bundle, *FAST])
    assert_user_error(result, 1, "expected safetensors weights", "weights.safetensors")
    assert_nothing_left(tmp_path, before)


# --- happy paths ---------------------------------------------------------------------------------------

def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_count_one_png_writes_a_complete_result_beside_it(tmp_path, fluo_png, tiny_bundle):
    image = shutil.copy(fluo_png, tmp_path / "dsb_fluo.png")  # 256 x 256: 4 tiles of 128 px
    # native: a random network's "nuclei" would otherwise set the scale (planning.decide_scale)
    result = invoke(["count", image, "--model", tiny_bundle, "--device", "cpu", "-q", "--tile-size", "128",
                     "--halo", "16", "--tissue", "none", "--precision", "fp32", "--diameter", "native"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "dsb_fluo.cellseg"
    assert out.is_dir()
    for name in RESULT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not [n for n in listing(tmp_path) if STAGING.match(Path(n).name)]
    assert not (out / ".work").exists()

    summary = json.loads((out / "summary.json").read_text())
    assert summary["cell_count"] > 0  # the random-init bundle has score threshold 0: it finds "cells"
    assert f"{summary['cell_count']} cells" in result.stdout
    assert summary["tiles_total"] == 4 and summary["tiles_skipped"] == 0
    assert summary["mpp"] is None
    assert summary["mpp_source"].startswith("none:") and "--mpp" in summary["mpp_source"]
    assert "PNG" in summary["mpp_source"]
    assert summary["area_um2"] is None and summary["area_px"]["median"] > 0
    assert set(summary["seams"]) >= {"duplicates_removed", "cells_cut"}
    assert summary["seconds"]["total"] > 0

    run = json.loads((out / "run.json").read_text())
    assert run["cellseg_version"] == cellseg.__version__
    assert run["protocol"]["name"] == "fluorescence-nuclei"
    assert run["protocol"]["tiling"] == {"tile_size": 128, "halo_px": 16, "batch_size": 4}  # resolved
    assert run["protocol"]["detection"]["model"] == str(tiny_bundle)
    assert run["protocol"]["detection"]["precision"] == "fp32" and run["protocol"]["tissue"]["tissue_method"] == "none"
    assert run["model"]["weights_sha256"] == hashlib.sha256(
        (tiny_bundle / "weights.safetensors").read_bytes()).hexdigest()
    # This run's command line, not the test runner's sys.argv.
    assert run["command"].startswith("cellseg count ")
    assert str(image) in run["command"] and "--tile-size 128" in run["command"]

    rows = read_csv(out / "cells.csv")
    assert len(rows) == summary["cell_count"]
    assert {"area_px", "area_um2", "centroid_row_um", "centroid_row_px"} <= set(rows[0])
    assert all(r["area_um2"] == "" and r["centroid_row_um"] == "" for r in rows)  # no pixel size: empty
    assert all(int(r["area_px"]) > 0 for r in rows)
    with tifffile.TiffFile(out / "labels.ome.tif") as tf:
        labels = tf.series[0].asarray()
    assert labels.shape[-2:] == (256, 256) and labels.dtype == np.uint32
    assert len(np.unique(labels[labels > 0])) == summary["cell_count"]


@pytest.mark.slow
def test_many_inputs_one_folder_each_and_summary_csv(tmp_path, small_png, fluo_png, model):
    a = shutil.copy(small_png, tmp_path / "a.png")
    b = crop_png(fluo_png, tmp_path / "b.png", offset=100)
    results = tmp_path / "results"
    result = invoke(["count", a, b, "-o", results, *model, *FAST])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in results.iterdir()) == ["a", "b", "report.html", "summary.csv"]
    cohort = (results / "report.html").read_text(encoding="utf-8")
    assert 'href="a/report.html"' in cohort and 'href="b/report.html"' in cohort
    for name in "ab":
        assert all((results / name / f).is_file() for f in RESULT_FILES)
    rows = read_csv(results / "summary.csv")
    assert [Path(r["input"]).name for r in rows] == ["a.png", "b.png"]
    for row, name in zip(rows, "ab"):
        summary = json.loads((results / name / "summary.json").read_text())
        assert row["status"] == "ok"
        assert int(row["cell_count"]) == summary["cell_count"]
        assert Path(row["result"]) == results / name
        assert row["warnings"] == "; ".join(summary["warnings"])      # the report's, filterable in a spreadsheet
    assert rows[0]["warnings"]        # a.png: a PNG without a pixel size, said among them


@pytest.mark.slow
def test_many_inputs_one_bad_still_counts_the_others(tmp_path, small_png, model):
    bad = tmp_path / "bad.png"
    bad.write_text("not a picture")
    results = tmp_path / "results"
    result = invoke(["count", small_png, bad, "-o", results, *model, *FAST])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert all(line.startswith("cellseg: error: ") for line in result.stderr.splitlines())
    assert "bad.png" in result.stderr and "1 of 2 inputs failed" in result.stderr
    assert sorted(p.name for p in results.iterdir()) == ["report.html", "small", "summary.csv"]
    cohort = (results / "report.html").read_text(encoding="utf-8")
    assert 'href="small/report.html"' in cohort and "bad.png" in cohort and "expected a slide image" in cohort
    rows = {Path(r["input"]).name: r for r in read_csv(results / "summary.csv")}
    assert rows["small.png"]["status"] == "ok" and rows["bad.png"]["status"] == "error"
    assert "expected a slide image" in rows["bad.png"]["error"]


def test_many_inputs_all_bad_still_get_their_summary(tmp_path, model):
    for name in ("bad.png", "worse.png"):
        (tmp_path / name).write_text("not a picture")
    results = tmp_path / "results"
    result = invoke(["count", tmp_path / "bad.png", tmp_path / "worse.png", "-o", results, *model, *FAST])
    assert result.exit_code == 1 and "Traceback" not in result.output and "2 of 2 inputs failed" in result.stderr
    rows = read_csv(results / "summary.csv")
    assert [r["status"] for r in rows] == ["error", "error"]


def test_many_inputs_with_the_same_name_is_refused(tmp_path, small_png, model):
    (tmp_path / "x").mkdir()
    twin = shutil.copy(small_png, tmp_path / "x" / "small.png")
    before = listing(tmp_path)
    result = invoke(["count", small_png, twin, "-o", tmp_path / "results", *model, *FAST])
    assert_user_error(result, 2, "distinct names")
    assert_nothing_left(tmp_path, before)


@pytest.mark.slow
def test_rerun_replaces_the_previous_result(tmp_path, small_png, model):
    out = tmp_path / "out"
    first = invoke(["count", small_png, "-o", out, *model, *FAST])
    assert first.exit_code == 0, first.output
    # a file the user added to the result is theirs: the rerun refuses rather than delete it
    (out / "notes.txt").write_text("reviewed")
    refused = invoke(["count", small_png, "-o", out, *model, *FAST])
    assert_user_error(refused, 1, "notes.txt")
    assert (out / "notes.txt").read_text() == "reviewed"
    (out / "notes.txt").unlink()
    (out / "cells.csv").write_text("old table\n")
    second = invoke(["count", small_png, "-o", out, "--mpp", "0.5", *model, *FAST])
    assert second.exit_code == 0, second.output
    assert "held an earlier result: replaced" in second.stdout and "replaced" not in first.stdout
    assert (out / "cells.csv").read_text() != "old table\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "small.png"]  # no .old / .tmp siblings
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(RESULT_FILES)

    # The new result is the --mpp one: µm columns filled.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mpp"] == 0.5 and summary["mpp_source"] == "override"
    rows = read_csv(out / "cells.csv")
    assert rows and len(rows) == summary["cell_count"]
    for r in rows:
        assert float(r["area_um2"]) == pytest.approx(int(r["area_px"]) * 0.25, rel=1e-4)
        assert float(r["centroid_row_um"]) == pytest.approx(float(r["centroid_row_px"]) * 0.5, rel=1e-4)


@pytest.mark.slow
def test_protocol_that_needs_pixel_size(tmp_path, he_png, model, monkeypatch):
    image = crop_png(he_png, tmp_path / "he.png")
    before = listing(tmp_path)
    with monkeypatch.context() as m:   # refused before seconds of loading torch and the model, not after
        m.setattr("cellseg.run.counter.CellCounter.load", lambda *a, **k: pytest.fail("the model was loaded"))
        result = invoke(["count", image, "--protocol", "he-nuclei", *model, *FAST])
    assert_user_error(result, 1, "he-nuclei", "needs the pixel size", "--mpp")
    assert_nothing_left(tmp_path, before)

    result = invoke(["count", image, "--protocol", "he-nuclei", "--mpp", "0.25", *model, *FAST])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "he.cellseg" / "summary.json").read_text())
    assert summary["protocol"] == "he-nuclei" and summary["mpp"] == 0.25
    assert summary["model_channel"] is None  # RGB brightfield is used as is
    # he-nuclei grows nuclei by 5 µm into cells (20 px here; more than the 64 px tiles' rows allow at once)
    assert (summary["cell_expansion_um"], summary["cell_expansion_px"]) == (5.0, 20.0)
    assert (tmp_path / "he.cellseg" / "cell_labels.ome.tif").is_file()
    header = (tmp_path / "he.cellseg" / "cells.csv").read_text().splitlines()[0].split(",")
    assert {"cell_area_um2", "cytoplasm_dab_od_mean", "nucleus_hematoxylin_od_mean"} <= set(header)


@pytest.mark.slow
def test_cell_expansion_options(tmp_path, small_png, model, monkeypatch):
    out = tmp_path / "px"
    result = invoke(["count", small_png, "-o", out, "--cell-expansion-px", "3", *model, *FAST])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(result_files(True))
    rows = read_csv(out / "cells.csv")
    header = (out / "cells.csv").read_text().splitlines()[0].split(",")
    assert header[-len(expanded_columns(["c0"], False)):] == list(expanded_columns(["c0"], False))
    assert all(int(r["cell_area_px"]) >= int(r["area_px"]) for r in rows)
    run = json.loads((out / "run.json").read_text())
    assert run["protocol"]["cells"] == {"cell_expansion_um": 0.0, "cell_expansion_px": 3.0}
    assert run["cell_expansion_px"] == 3.0 and run["cell_expansion_um"] is None

    # in µm on an image without a pixel size: refused before the model loads, nothing written
    before = listing(tmp_path)
    with monkeypatch.context() as m:
        m.setattr("cellseg.run.counter.CellCounter.load", lambda *a, **k: pytest.fail("the model was loaded"))
        refused = invoke(["count", small_png, "-o", tmp_path / "um", "--cell-expansion-um", "2", *model, *FAST])
    assert_user_error(refused, 1, "cell expansion of 2 µm", "pixel size", "--mpp", "--cell-expansion-px")
    assert_nothing_left(tmp_path, before)

    # --cell-expansion-um 0 turns a protocol's expansion off: nuclei only
    he = crop_png(DATA / "dsb_he.png", tmp_path / "he.png")
    result = invoke(["count", he, "-o", tmp_path / "he", "--protocol", "he-nuclei", "--mpp", "0.5",
                     "--cell-expansion-um", "0", *model, *FAST])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "he" / "cell_labels.ome.tif").exists()
    assert "cell_area_px" not in (tmp_path / "he" / "cells.csv").read_text().splitlines()[0]


# --- other commands ------------------------------------------------------------------------------------

def test_protocols_list_shows_the_shipped_protocols():
    result = invoke(["protocols", "list"])
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert {"fluorescence-nuclei", "he-nuclei"} <= set(names)
    assert sorted(names) == sorted(p.stem for p in protocols_dir().glob("*.toml"))


@pytest.mark.parametrize("name", ["fluorescence-nuclei", "he-nuclei"])
def test_protocols_show_prints_toml_that_parses_back(name):
    result = invoke(["protocols", "show", name])
    assert result.exit_code == 0, result.output
    shown = tomllib.loads(result.stdout)
    assert shown == load_protocol(name).to_dict()
    assert shown == tomllib.loads((protocols_dir() / f"{name}.toml").read_text(encoding="utf-8"))


def test_protocols_show_unknown_name():
    result = invoke(["protocols", "show", "bogus"])
    assert_user_error(result, 1, "expected a protocol name", "'bogus'")


def test_help_and_version():
    result = invoke(["--help"])
    assert result.exit_code == 0
    assert "count" in result.stdout and "protocols" in result.stdout and "train" in result.stdout
    result = invoke(["count", "--help"])
    assert result.exit_code == 0
    for option in ("--output", "--protocol", "--tile-size", "--halo", "--mpp", "--device", "--model"):
        assert option in result.stdout
    result = invoke(["--version"])
    assert result.exit_code == 0 and cellseg.__version__ in result.stdout


def test_help_is_instant_in_a_fresh_process():
    """The console entry point works and --help imports none of the heavy libraries."""
    import subprocess
    code = ("import sys\n"
            "from cellseg.cli import main\n"
            "try:\n"
            "    main(['count', '--help'])\n"
            "except SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "heavy = [m for m in ('torch', 'torchvision', 'numpy', 'tifffile', 'skimage', 'matplotlib')\n"
            "         if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--tile-size" in done.stdout
    assert "HEAVY []" in done.stdout, done.stdout


def test_an_h_and_e_image_counted_with_the_fluorescence_protocol_is_warned(tmp_path, he_png, model, caplog):
    """The default protocol is fluorescence's: a user counting an H&E image without --protocol is told which to use
    (logged as a warning when the slide is planned: stderr in a shell; the runner here leaves logging to pytest), and
    the count still completes (a warning, not an error)."""
    image = crop_png(he_png, tmp_path / "he.png", size=128)
    with caplog.at_level("WARNING", logger="cellseg"):
        result = invoke(["count", image, *model, *FAST])
    assert result.exit_code == 0, result.output
    (logged,) = [r.getMessage() for r in caplog.records if "looks like brightfield" in r.getMessage()]
    assert logged.startswith("he.png: ") and "--protocol he-nuclei" in logged
    assert "--protocol he-nuclei" in ";".join(json.loads((tmp_path / "he.cellseg" / "summary.json").read_text())["warnings"])


def test_a_warning_beside_the_progress_bar_starts_its_own_line(capsys):
    """Said while the job's bar is drawn (stderr to a log file, or a terminal): the bar's line is cleared first, so the
    warning is not glued to the bar's last redraw."""
    import re

    from cellseg.cli import _JobBar
    with _JobBar("2 slides", enabled=True) as bar:
        bar.planned(10)
        bar.analysed(3)
        bar.echo("cellseg: warning: a.tif: check the pixel size", err=True)
        bar.echo("a.tif: 12 cells -> a.cellseg")
    captured = capsys.readouterr()
    assert "cellseg: warning: a.tif: check the pixel size" in re.split(r"[\r\n]", captured.err)
    assert "a.tif: 12 cells -> a.cellseg" in captured.out.splitlines()


def test_a_logged_warning_beside_the_progress_bar_starts_its_own_line(capsys):
    """The library's warnings (a band kept for --resume) logged while the bar is drawn clear its line too: written
    straight to stderr they followed the bar's last redraw, and a terminal's next redraw overwrote them."""
    import logging
    import re

    from cellseg.cli import _JobBar
    root = logging.getLogger()
    handler = logging.StreamHandler()       # what `cellseg`'s basicConfig installs: stderr at the time of the call
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    try:
        with _JobBar("a.tif", enabled=True) as bar:
            bar.planned(10)
            bar.analysed(3)
            logging.getLogger("cellseg.run.journal").warning("kept 1 finished band(s)")
        logging.getLogger("cellseg.run.journal").warning("after the bar")
    finally:
        root.removeHandler(handler)
    lines = re.split(r"[\r\n]", capsys.readouterr().err)
    assert "WARNING cellseg.run.journal: kept 1 finished band(s)" in lines
    assert "WARNING cellseg.run.journal: after the bar" in lines      # the handler given back after the bar


def test_sigterm_ends_a_count_as_ctrl_c_does(tmp_path, fluo_png, model, monkeypatch):
    """A batch scheduler's time limit (SIGTERM) mid-count: the finished band kept for --resume with a line that says
    so, exit 1, nothing half-written; by default the process died where it stood, silently. The handler is the
    count's only: the previous one comes back."""
    import os
    import signal

    from cellseg.run import pipeline
    slide = crop_png(fluo_png, tmp_path / "slide.png", size=256)
    saved = pipeline.save_band

    def save_then_terminated(folder, band, owned):
        saved(folder, band, owned)
        os.kill(os.getpid(), signal.SIGTERM)        # delivered to the main thread at its next bytecode
    monkeypatch.setattr(pipeline, "save_band", save_then_terminated)

    def ignored(signum, frame):     # this test's own: a count that does not take SIGTERM up finishes (and fails here)
        pass
    before = signal.signal(signal.SIGTERM, ignored)
    try:
        result = invoke(["count", slide, "-o", tmp_path / "out", *model, *FAST, "--band-rows", "1"])
        assert signal.getsignal(signal.SIGTERM) is ignored
    finally:
        signal.signal(signal.SIGTERM, before)
    assert result.exit_code == 1 and "Aborted!" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    kept = tmp_path / ".out.partial"
    assert kept.is_dir() and any(kept.glob("band-*.npz"))
    monkeypatch.setattr(pipeline, "save_band", saved)
    resumed = invoke(["count", slide, "-o", tmp_path / "out", *model, *FAST, "--band-rows", "1", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert (tmp_path / "out" / "cells.csv").is_file() and not kept.exists()
