"""Annotated images as a folder of images with their label images (evaluation.label_pairs): the layouts Cellpose,
StarDist and QuPath leave, read into the same annotations and training images as the COCO file of the same labels,
and every way such a folder goes wrong refused in one line before anything is trained."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellseg.errors import CellsegError, EvaluationError
from cellseg.evaluation import annotated_images, shared_images
from cellseg.evaluation.label_pairs import find_label_pairs, read_label_image
from cellseg.training import load_annotations, load_coco

from ..helpers import DATA, coco_from_labels, invoke

IMAGE, LABELS = DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif"


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / name)


def test_a_flat_folder_pairs_each_image_with_its_tagged_label_image(tmp_path, caplog):
    # Cellpose's NAME_masks and NAME_cp_masks, QuPath's NAME-labels, NAME_labelled; an image with none is left out
    _touch(tmp_path, "a.png", "a_masks.png", "b.tif", "b-labels.png", "c.jpg", "c_cp_masks.png", "d.png",
           "e.tif", "e_Labelled.tif")
    (tmp_path / "a_seg.npy").write_bytes(b"")              # Cellpose's own file: not an image, not a pair
    with caplog.at_level(logging.WARNING):
        pairs = find_label_pairs(tmp_path)
    assert [(p.name, p.labels.name) for p in pairs] == [("a.png", "a_masks.png"), ("b.tif", "b-labels.png"),
                                                         ("c.jpg", "c_cp_masks.png"), ("e.tif", "e_Labelled.tif")]
    assert "1 image(s) without a label image left out (e.g. d.png); 4 annotated" in caplog.text


def test_images_beside_labels_or_masks_pair_by_name(tmp_path):
    # StarDist's layout (and its QuPath export script's): the same file name in both folders
    _touch(tmp_path / "images", "x.tif", "y.tif")
    _touch(tmp_path / "masks", "x.tif", "y_masks.tif")
    pairs = find_label_pairs(tmp_path)
    assert [(p.name, p.labels.relative_to(tmp_path).as_posix()) for p in pairs] == [
        ("images/x.tif", "masks/x.tif"), ("images/y.tif", "masks/y_masks.tif")]


@pytest.mark.parametrize("files, expected", [
    ((), "found no image with a label image in"),
    (("a.png",), "found no image with a label image in"),
    (("a_masks.png",), "expected an image named a (.tif, .png, .jpg) beside its label image a_masks.png"),
    (("a.png", "a.tif", "a_masks.png"), "expected one image named a, found a.png and a.tif"),
    (("a.png", "a_masks.png", "a-labels.tif"), "expected one label image for image a"),
    (("a.png", "a_masks.jpg"), "expected label images as PNG or TIFF, found a_masks.jpg"),
])
def test_a_folder_that_pairs_nothing_or_ambiguously_is_refused_in_one_line(tmp_path, files, expected):
    _touch(tmp_path / "in", *files)
    with pytest.raises(EvaluationError, match=expected.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        find_label_pairs(tmp_path / "in")


def test_two_label_folders_or_an_orphan_label_image_are_refused(tmp_path):
    _touch(tmp_path / "images", "x.tif")
    _touch(tmp_path / "labels", "x.tif")
    _touch(tmp_path / "masks", "x.tif")
    with pytest.raises(EvaluationError, match="found both labels/ and masks/"):
        find_label_pairs(tmp_path)
    shutil.rmtree(tmp_path / "labels")
    _touch(tmp_path / "masks", "z.tif")
    with pytest.raises(EvaluationError, match=r"found 1 without one \(e.g. z.tif\)"):
        find_label_pairs(tmp_path)


def test_a_palette_png_s_indices_are_its_labels(tmp_path):
    # QuPath can write labels as an indexed-colour PNG: the indices, not the colours, are the nuclei
    labels = np.zeros((20, 20), np.uint8)
    labels[2:6, 2:6], labels[10:15, 10:15] = 1, 7
    im = Image.fromarray(labels, mode="P")
    im.putpalette([0, 0, 0, 255, 0, 0] + [0, 255, 0] * 254)
    im.save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as saved:
        assert saved.mode == "P"
    np.testing.assert_array_equal(read_label_image(tmp_path / "p.png", (20, 20)), labels)


@pytest.mark.parametrize("labels, expected", [
    (np.zeros((20, 20, 3), np.uint8), r"of one channel .* found .* of shape \(20, 20, 3\)"),
    (np.full((20, 20), 0.5, np.float32), "found fractional values"),
    (np.zeros((20, 30), np.uint16), "to be 20 x 20 px like its image, found 20 x 30 px"),
    (np.full((20, 20), -1, np.int16), "found -1"),
])
def test_a_label_image_that_is_not_labels_is_refused(tmp_path, labels, expected):
    tifffile.imwrite(tmp_path / "l.tif", labels)
    with pytest.raises(EvaluationError, match=expected):
        read_label_image(tmp_path / "l.tif", (20, 20))


def test_a_binary_mask_is_refused_and_whole_number_floats_are_labels(tmp_path):
    labels = tifffile.imread(LABELS)
    tifffile.imwrite(tmp_path / "binary.tif", (labels > 0).astype(np.uint8) * 255)
    with pytest.raises(EvaluationError, match=r"found 1 value\(s\) over \d+ separate objects: a binary or class mask"):
        read_label_image(tmp_path / "binary.tif")
    tifffile.imwrite(tmp_path / "float.tif", labels.astype(np.float32))     # ImageJ's 32-bit label images
    np.testing.assert_array_equal(read_label_image(tmp_path / "float.tif"), labels)
    # touching nuclei, each its own value: fewer pieces than values is what instance labels look like
    touching = np.zeros((10, 40), np.uint8)
    for k in range(8):
        touching[2:8, 5 * k:5 * k + 5] = k + 1
    read_label_image(_save(tmp_path / "touching.tif", touching))


def _save(path: Path, array: np.ndarray) -> Path:
    tifffile.imwrite(path, array)
    return path


def _pair_folder(tmp_path: Path, labels: np.ndarray | None = None) -> Path:
    """The fluorescence test image with its labels saved as Cellpose does (NAME_masks.png, 16-bit)."""
    folder = tmp_path / "pairs"
    folder.mkdir(parents=True)
    shutil.copy(IMAGE, folder / IMAGE.name)
    labels = tifffile.imread(LABELS) if labels is None else labels
    if labels.max() > 65535:     # beyond a PNG's 16 bits
        tifffile.imwrite(folder / f"{IMAGE.stem}_masks.tif", labels)
    else:
        Image.fromarray(labels.astype(np.uint16)).save(folder / f"{IMAGE.stem}_masks.png")
    return folder


def test_a_pair_folder_reads_as_the_coco_file_of_the_same_labels(tmp_path):
    folder = _pair_folder(tmp_path)
    ann, n = coco_from_labels(tmp_path, IMAGE, LABELS)
    gt, paths = annotated_images(folder)
    coco_gt, _ = annotated_images(ann)
    assert list(gt) == [IMAGE.name] and paths == {IMAGE.name: folder / IMAGE.name}
    (got,), (want,) = gt.values(), coco_gt.values()
    assert len(got) == n > 10
    np.testing.assert_array_equal(got.boxes, want.boxes)
    assert [r["counts"] for r in got.rles] == [r["counts"] for r in want.rles]
    # training images: the same pixels, boxes and masks as from the COCO file
    (item,), classes = load_annotations(folder)
    (coco_item,), _ = load_coco(ann)
    assert classes == ["nucleus"] and item.source == str(folder / IMAGE.name)
    np.testing.assert_array_equal(item.image, coco_item.image)
    np.testing.assert_array_equal(item.boxes, coco_item.boxes)
    assert all(np.array_equal(a, b) for a, b in zip(item.masks, coco_item.masks))
    # the --val check that an image is trained on too sees through both kinds
    assert shared_images(folder, [tmp_path / IMAGE.name]) == []
    assert shared_images(folder, [folder / IMAGE.name]) == [str(folder / IMAGE.name)]
    assert shared_images(ann, [tmp_path / IMAGE.name]) == [str(tmp_path / IMAGE.name)]


def test_sparse_label_values_train_as_the_same_nuclei(tmp_path):
    labels = tifffile.imread(LABELS).astype(np.int64)
    sparse = np.where(labels > 0, labels * 100_000 + 7, 0)     # values up to ~10^7, each still one nucleus
    (dense,), _ = load_annotations(_pair_folder(tmp_path / "d"))
    (item,), _ = load_annotations(_pair_folder(tmp_path / "s", sparse.astype(np.uint32)))
    np.testing.assert_array_equal(item.boxes, dense.boxes)


def test_cli_train_from_label_images_refuses_a_binary_mask_before_writing(tmp_path):
    labels = tifffile.imread(LABELS)
    folder = _pair_folder(tmp_path, (labels > 0).astype(np.uint16))
    out = tmp_path / "mine"
    result = invoke(["train", "--data", folder, "--out", out, "--steps", 1, "--device", "cpu", "-q"])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "a binary or class mask" in lines[0], result.stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_cli_fine_tunes_on_a_folder_of_label_images(tmp_path, tiny_bundle):
    # a fine-tune from Cellpose-style pairs, judged on a StarDist-style folder: both read as annotations
    folder = _pair_folder(tmp_path)
    val = tmp_path / "val"
    (val / "images").mkdir(parents=True)
    (val / "masks").mkdir()
    shutil.copy(DATA / "dsb_he.png", val / "images" / "he.png")
    shutil.copy(DATA / "dsb_he_labels.tif", val / "masks" / "he.tif")
    protocol = tmp_path / "mine.toml"
    protocol.write_text(f'name = "mine"\nmodality = "fluorescence"\n\n[detection]\nmodel = "{tiny_bundle.as_posix()}"\n')
    out = tmp_path / "mine"
    result = invoke(["train", "--data", folder, "--val", val, "--out", out, "-p", protocol, "--steps", 2,
                     "--batch-size", 1, "--crop", 64, "--device", "cpu", "-q", "--keep-anyway"])
    assert result.exit_code == 0, (result.output, result.exception)
    from cellseg.bundles import load_bundle
    card = load_bundle(out).card["finetune"]
    assert card["heldout_nuclei"] == len(np.unique(tifffile.imread(DATA / "dsb_he_labels.tif"))) - 1
    assert card["training_nuclei"] > 0


def test_training_data_that_is_neither_says_what_was_expected(tmp_path):
    with pytest.raises(CellsegError, match="expected a COCO instance JSON, or a folder of images with their label "
                                           "images .* found no .*nothing-here"):
        load_annotations(tmp_path / "nothing-here")


def test_evaluate_reads_a_palette_png_label_image_by_its_indices(tmp_path):
    # before: "expected a label image (one channel of integers ...), has 3 channel(s)": the palette made it colour
    labels = np.zeros((20, 20), np.uint8)
    labels[2:6, 2:6], labels[10:15, 10:15] = 1, 7
    im = Image.fromarray(labels, mode="P")
    im.putpalette([0, 0, 0, 255, 0, 0] + [0, 255, 0] * 254)
    im.save(tmp_path / "gt.png")
    pred = labels.copy()
    pred[10:15, 10:15] = 0                                       # one nucleus of the two found
    tifffile.imwrite(tmp_path / "pred.tif", pred)
    result = invoke(["evaluate", tmp_path / "pred.tif", "--gt", tmp_path / "gt.png"])
    assert result.exit_code == 0, result.output
    assert "1 image: 2 true cells, 1 predicted" in result.stdout and "TP 1 FP 0 FN 1" in result.stdout
