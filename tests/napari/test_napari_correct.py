"""The correct-train-recount loop's pure parts, without Qt or a display: the COCO export of corrected fields (its
round trip: decoded, it is the painted labels), the mask edits (split, merge, delete), and `cellseg train` run as a
child process with its progress read and a cancel by SIGTERM."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import tifffile
from PIL import Image
from skimage.segmentation import relabel_sequential

from cellseg.errors import CellsegError, ParameterError
from cellseg.geometry import Box
from cellseg_napari import _edit, _export, _train
from cellseg_napari._export import Field, export_coco

from ..helpers import DATA, random_nuclei
from .coco_labels import decoded_labels


def _painted_fields() -> list[Field]:
    """Two fields as a user leaves them: ids with gaps, a nucleus cut by the border, one erased in two pieces."""
    labels = random_nuclei((96, 120), 25, seed=3).astype(np.uint32) * 7       # ids 7, 14, ... (gaps)
    labels[50:70, 80:100] = 5000
    labels[58:61, 80:100] = 0                                                 # erased across: two pieces
    labels[0:10, 0:12] = 1000                                                 # painted, cut by the field's border
    gray = np.asarray(Image.open(DATA / "dsb_fluo.png"))[:96, :120].astype(np.uint16) * 200
    rgb = np.asarray(Image.open(DATA / "dsb_he.png"))[:64, :80, :3]
    he = random_nuclei((64, 80), 8, seed=5).astype(np.uint32)
    return [Field("slide field 1", gray, labels, source="slide", box_px=(100, 200, 196, 320), mpp=0.5),
            Field("slide field 2", rgb, he, source="he", box_px=(0, 0, 64, 80), mpp=0.5)]


def test_a_corrected_field_in_coco_is_the_painted_labels(tmp_path):
    fields = _painted_fields()
    exported = export_coco(fields, tmp_path / "corr")
    assert exported.annotations == tmp_path / "corr" / "annotations.json" and exported.fields == 2
    assert exported.mpp == 0.5
    decoded = decoded_labels(exported.annotations)
    assert list(decoded) == ["images/slide_field_1.png", "images/slide_field_2.png"]    # relative to the JSON
    for field, (name, labels) in zip(fields, decoded.items()):
        expected, _, _ = relabel_sequential(field.labels.astype(np.int64))
        assert np.array_equal(labels, expected), name        # exact: every pixel of every nucleus, numbered 1..n
        pixels = np.asarray(Image.open(tmp_path / "corr" / name))
        assert np.array_equal(pixels, field.image) and pixels.dtype == field.image.dtype   # 16-bit gray, RGB
    assert exported.nuclei == sum(len(np.unique(f.labels)) - 1 for f in fields)
    assert any("in 2 pieces" in p for p in exported.pieces)    # the erasure that cut a nucleus is pointed out
    coco = json.loads(exported.annotations.read_text())
    first = coco["images"][0]
    assert first["cellseg_source"] == {"image": "slide", "box_px": [100, 200, 196, 320], "mpp": 0.5}
    ann = coco["annotations"][0]
    assert ann["bbox"] == list(mask_utils.toBbox(ann["segmentation"])) and ann["area"] == mask_utils.area(
        ann["segmentation"])
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])

    # what `cellseg train --data` reads of it: the same nuclei, the same pixels
    from cellseg.training import load_coco
    items, classes = load_coco(exported.annotations)
    assert classes == ["nucleus"] and [len(it.masks) for it in items] == [
        len(np.unique(f.labels)) - 1 for f in fields]
    r0, c0, r1, c1 = items[0].boxes[0]
    assert np.array_equal(items[0].masks[0], decoded["images/slide_field_1.png"][r0:r1, c0:c1] == 1)


def test_export_replaces_its_own_export_and_refuses_other_folders(tmp_path):
    fields = _painted_fields()
    export_coco(fields, tmp_path / "corr")
    exported = export_coco(fields[1:], tmp_path / "corr")          # a later export of fewer fields: replaced
    assert sorted(p.name for p in (tmp_path / "corr" / "images").iterdir()) == ["slide_field_2.png"]
    assert list(decoded_labels(exported.annotations)) == ["images/slide_field_2.png"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CellsegError, match="holds other files"):
        export_coco(fields, tmp_path / "other")
    with pytest.raises(ParameterError, match="at least one"):
        export_coco([], tmp_path / "new")
    with pytest.raises(ParameterError, match="size of its pixels"):
        export_coco([Field("x", np.zeros((5, 6), np.uint8), np.zeros((6, 5), np.uint32))], tmp_path / "new")
    with pytest.raises(ParameterError, match="distinct names"):
        export_coco([fields[0], fields[0]], tmp_path / "new")
    empty = export_coco([Field("bare", np.zeros((20, 20), np.uint8), np.zeros((20, 20), np.uint32))],
                        tmp_path / "bare")
    assert empty.nuclei == 0 and json.loads(empty.annotations.read_text())["annotations"] == []


def test_png_pixels_and_crops():
    assert _export.png_pixels(np.arange(6, dtype=np.uint16).reshape(2, 3)).dtype == np.uint16
    floats = _export.png_pixels(np.array([[0.0, 0.5], [1.0, np.nan]]))
    assert floats.dtype == np.uint16 and floats.tolist() == [[0, 32768], [65535, 0]]
    assert _export.png_pixels(np.zeros((2, 2, 4), np.uint8)).shape == (2, 2, 3)
    assert _export.png_pixels(np.full((2, 2, 3), 7.0)).dtype == np.uint8
    with pytest.raises(ParameterError, match="gray"):
        _export.png_pixels(np.zeros((2, 2, 5)))
    data = np.arange(20).reshape(4, 5)
    assert np.array_equal(_export.crop(data, Box(1, 1, 3, 4)), data[1:3, 1:4])
    over = _export.crop(data, Box(-1, 3, 2, 7))                # over the edge: zeros there
    assert over.tolist() == [[0, 0, 0, 0], [3, 4, 0, 0], [8, 9, 0, 0]]
    with pytest.raises(ParameterError, match="smaller rectangles"):
        _export.check_field_size(Box(0, 0, 5000, 5000))


# --------------------------------------------------------------------------- edits

def _two_touching_disks() -> np.ndarray:
    rr, cc = np.mgrid[:40, :60]
    labels = np.zeros((40, 60), np.uint16)
    labels[(rr - 20) ** 2 + (cc - 18) ** 2 <= 10 ** 2] = 5
    labels[(rr - 20) ** 2 + (cc - 36) ** 2 <= 10 ** 2] = 5          # one label over two nuclei
    labels[:4, :4] = 9
    return labels


def test_split_along_a_line_and_at_the_neck():
    labels = _two_touching_disks()
    line = np.array([[2.0, 27.0], [38.0, 27.0]])                      # down the neck, background to background
    assert _edit.labels_along(labels, line) == [5]
    cut = _edit.split_label(labels, line=line)
    assert set(np.unique(cut)) == {0, 5, 9, 10}                      # the new piece: max + 1
    assert ((cut == 5) | (cut == 10)).sum() == (labels == 5).sum()    # no pixel lost: the line's joined a piece
    assert (cut[:, :27] != 10).all() or (cut[:, 28:] != 10).all()     # one piece a side
    assert np.array_equal(cut == 9, labels == 9)
    neck = _edit.split_label(labels, 5)                                # no line: the watershed finds the neck
    assert set(np.unique(neck)) == {0, 5, 9, 10}
    left, right = neck[20, 18], neck[20, 36]
    assert {int(left), int(right)} == {5, 10}
    assert abs(int((neck == 5).sum()) - int((neck == 10).sum())) < 0.1 * (labels == 5).sum()
    # a convex blob (one maximum) is halved across its long axis
    blob = np.zeros((20, 40), np.int32)
    blob[8:12, 5:35] = 3
    halves = _edit.split_label(blob, 3)
    assert (halves[8:12, 5:15] == halves[10, 5]).all() and (halves[8:12, 25:35] == halves[10, 34]).all()
    assert {int(halves[10, 5]), int(halves[10, 34])} == {3, 4}


def test_split_refusals():
    labels = _two_touching_disks()
    with pytest.raises(ParameterError, match="cut label 5 through"):
        _edit.split_label(labels, line=np.array([[20.0, 18.0], [20.0, 22.0]]))     # ends inside the nucleus
    with pytest.raises(ParameterError, match="crosses none"):
        _edit.split_label(labels, line=np.array([[38.0, 50.0], [39.0, 58.0]]))
    with pytest.raises(ParameterError, match="colour picker"):
        _edit.split_label(labels, 4)
    one = np.zeros((5, 5), np.int32)
    one[2, 2] = 1
    with pytest.raises(ParameterError, match="two pixels"):
        _edit.split_label(one, 1)
    with pytest.raises(ParameterError, match="2-D integer"):
        _edit.split_label(np.zeros((4, 4)), 1)


def test_merge_delete_and_the_changes_napari_applies():
    labels = random_nuclei((60, 60), 12, seed=1).astype(np.uint32)
    ids = [int(v) for v in np.unique(labels) if v]
    a, b = ids[0], ids[1]
    ra, ca = np.argwhere(labels == a)[0]
    rb, cb = np.argwhere(labels == b)[0]
    crossed = _edit.labels_along(labels, np.array([[ra, ca], [rb, cb]], float))
    assert crossed[0] == a and b in crossed
    merged = _edit.merge_labels(labels, [a, b])
    assert np.array_equal(merged == a, (labels == a) | (labels == b)) and not (merged == b).any()
    deleted = _edit.delete_labels(labels, [a])
    assert not (deleted == a).any() and np.array_equal(deleted[labels != a], labels[labels != a])
    with pytest.raises(ParameterError, match="at least two"):
        _edit.merge_labels(labels, [a, a, 0])
    with pytest.raises(ParameterError, match="to delete"):
        _edit.delete_labels(labels, [0])
    indices, values = _edit.changes(labels, merged)
    again = labels.copy()
    again[indices] = values
    assert np.array_equal(again, merged) and len(values) == int((labels == b).sum())


# --------------------------------------------------------------------------- training in a child process

def test_output_reader_parses_progress_bars_across_chunks():
    seen = []
    reader = _train.OutputReader(lambda *a: seen.append(a))
    text = ("INFO cellseg.training.finetune: fine-tuning tiny on 34 nuclei\n"
            "\rtrain:   0%|          | 0/20 [00:00<?, ?step/s]"
            "\rtrain:  50%|█████     | 10/20 [00:05<00:05,  2.00step/s, loss=1.234]"
            "\rvalidate: 100%|██████████| 2/2 [00:01<00:00,  1.9image/s]\n"
            "cellseg: error: training interrupted at step 10 of 20\n")
    for k in range(0, len(text), 7):                      # cut anywhere, even inside a bar
        reader.feed(text[k:k + 7])
    reader.close()
    assert [s for s in seen if s[2]] == [("train", 0, 20), ("train", 10, 20), ("validate", 2, 2)]
    assert reader.lines == ["INFO cellseg.training.finetune: fine-tuning tiny on 34 nuclei",
                            "cellseg: error: training interrupted at step 10 of 20"]


def test_train_command():
    request = _train.TrainRequest(data=Path("c/annotations.json"), out=Path("b"), protocol="he-nuclei",
                                  init="/bundles/mine", steps=30, minutes=2.5, device="cpu", mpp=0.25,
                                  extra=["--crop", "64"])
    cmd = _train.train_command(request)
    assert cmd[:4] == [sys.executable, "-m", "cellseg", "-v"]
    assert cmd[4:] == ["train", "--data", str(Path("c/annotations.json")), "--out", "b", "-p", "he-nuclei",
                       "--device", "cpu", "--init", "/bundles/mine", "--steps", "30", "--minutes", "2.5",
                       "--mpp", "0.25", "--crop", "64"]
    default = _train.train_command(_train.TrainRequest(data=Path("a.json"), out=Path("b")))
    assert "--init" not in default and "--steps" not in default     # the command's defaults: fine-tune the protocol's


FAKE_TRAIN = r"""
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1]); mode = sys.argv[2]
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
out.mkdir(parents=True, exist_ok=True)
for step in range(1, 1000 if mode == "slow" else 4):
    sys.stderr.write(f"\rtrain: {step}%|##   | {step}/1000 [00:01<00:10]"); sys.stderr.flush()
    if stop:
        print("cellseg: error: training interrupted at step", step, file=sys.stderr)
        sys.exit(130)
    time.sleep(0.05)
(out / "model.toml").write_text("name = 'fake'")
if mode == "worse":
    print("cellseg: error: the fine-tuned bundle does NOT beat tiny on the held-out images", file=sys.stderr)
    sys.exit(1)
if mode == "broken":
    print("cellseg: error: expected a COCO annotation JSON file", file=sys.stderr)
    sys.exit(2)
print(f"bundle written to {out}")
"""


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    """run_training with a stand-in for `cellseg train` (the real one: test_real_training_stops_on_cancel)."""
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    data = tmp_path / "annotations.json"
    data.write_text("{}")

    def run(mode: str, cancel=None, progress=None) -> _train.TrainOutcome:
        monkeypatch.setattr(_train, "train_command", lambda r: [sys.executable, str(script), str(r.out), mode])
        out = _train.next_free(tmp_path / "bundle")
        return _train.run_training(_train.TrainRequest(data=data, out=out), progress, cancel)
    return run


def test_run_training_says_how_it_ended(fake_train, tmp_path):
    seen = []
    better = fake_train("better", progress=lambda *a: seen.append(a))
    assert (better.status, better.bundle, better.usable) == ("better", tmp_path / "bundle", True)
    assert better.message == f"bundle written to {tmp_path / 'bundle'}" and ("train", 3, 1000) in seen
    worse = fake_train("worse")                      # kept for a look, said so; the widget lets one recount with it
    assert (worse.status, worse.bundle, worse.usable) == ("not better", tmp_path / "bundle-2", True)
    assert worse.message.startswith("the fine-tuned bundle does NOT beat tiny")
    broken = fake_train("broken")
    assert (broken.status, broken.bundle, broken.message) == ("failed", None, "expected a COCO annotation JSON file")
    with pytest.raises(CellsegError, match="holds files"):
        _train.run_training(_train.TrainRequest(data=tmp_path / "annotations.json", out=tmp_path / "bundle"))


def test_cancel_sends_sigterm_and_the_training_ends(fake_train):
    cancel = threading.Event()
    seen = []

    def progress(what, done, total):
        seen.append(done)
        if done >= 3:
            cancel.set()
    outcome = fake_train("slow", cancel, progress)
    assert outcome.status == "cancelled" and outcome.bundle is None and not outcome.usable
    assert "interrupted at step" in outcome.message and max(seen) < 100      # it stopped, it did not run out


@pytest.mark.slow
def test_real_training_stops_on_cancel_with_its_checkpoint(tmp_path, tiny_bundle):
    """`cellseg train` itself: the progress bar's steps arrive, and a cancel stops it after the step under way with
    the checkpoint and bundle saved (the loop's SIGTERM handling)."""
    labels = tifffile.imread(DATA / "dsb_fluo_labels.tif")
    image = np.asarray(Image.open(DATA / "dsb_fluo.png"))
    exported = export_coco([Field("a", image[:128], labels[:128]), Field("b", image[128:], labels[128:])],
                           tmp_path / "corr")
    cancel = threading.Event()
    steps = []

    def progress(what, done, total):
        if what == "train":
            steps.append((done, total))
            if done >= 1:
                cancel.set()
    request = _train.TrainRequest(data=exported.annotations, out=tmp_path / "bundle", init=str(tiny_bundle),
                                  steps=500, device="cpu", extra=["--crop", "64", "--batch-size", "1"])
    outcome = _train.run_training(request, progress, cancel)
    assert outcome.status == "cancelled", outcome.output[-5:]
    assert steps and steps[0][1] == 500 and max(d for d, _ in steps) < 500
    assert "interrupted at step" in outcome.message
    assert (tmp_path / "bundle" / "checkpoint.pt").is_file()
    # what to type: the widget has no resume of its own, and its command starts with this Python
    assert f"`cellseg train --data {exported.annotations}" in outcome.message
    assert outcome.message.endswith("--resume` in a terminal continues it") and "same command" not in outcome.message
