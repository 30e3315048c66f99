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
           "e.tif", "e_Labelled.tif", "f.ome.tif", "f_labels.tif", "g.ome.tif", "h.tif")
    (tmp_path / "g.ome.tif.geojson").write_text("{}")     # QuPath's export, named with the image's extension
    (tmp_path / "h.geojson").write_text("{}")             # or without it
    (tmp_path / "a_seg.npy").write_bytes(b"")              # Cellpose's own file: not an image, not a pair
    with caplog.at_level(logging.WARNING):
        pairs = find_label_pairs(tmp_path)
    assert [(p.name, p.annotations.name) for p in pairs] == [
        ("a.png", "a_masks.png"), ("b.tif", "b-labels.png"), ("c.jpg", "c_cp_masks.png"), ("e.tif", "e_Labelled.tif"),
        ("f.ome.tif", "f_labels.tif"), ("g.ome.tif", "g.ome.tif.geojson"), ("h.tif", "h.geojson")]
    assert "1 image(s) without annotations left out (e.g. d.png); 7 annotated" in caplog.text


def test_images_beside_labels_or_masks_pair_by_name(tmp_path):
    # StarDist's layout (and its QuPath export script's): the same file name in both folders
    _touch(tmp_path / "images", "x.tif", "y.tif")
    _touch(tmp_path / "masks", "x.tif", "y_masks.tif")
    pairs = find_label_pairs(tmp_path)
    assert [(p.name, p.annotations.relative_to(tmp_path).as_posix()) for p in pairs] == [
        ("images/x.tif", "masks/x.tif"), ("images/y.tif", "masks/y_masks.tif")]


@pytest.mark.parametrize("files, expected", [
    ((), "found no image with a label image in"),
    (("a.png",), "found no image with a label image in"),
    (("a_masks.png",), "expected an image named a (.tif, .png, .jpg, a slide) beside a_masks.png"),
    (("a.png", "a.tif", "a_masks.png"), "expected one image named a, found a.png and a.tif"),
    (("a.png", "a_masks.png", "a-labels.tif"), "expected one label image or GeoJSON file for image a"),
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


def _palette_labels(path: Path) -> np.ndarray:
    """Two nuclei (values 1 and 7) saved as an indexed-colour PNG, as QuPath can write labels; their values."""
    labels = np.zeros((20, 20), np.uint8)
    labels[2:6, 2:6], labels[10:15, 10:15] = 1, 7
    im = Image.fromarray(labels, mode="P")
    im.putpalette([0, 0, 0, 255, 0, 0] + [0, 255, 0] * 254)
    im.save(path)
    with Image.open(path) as saved:
        assert saved.mode == "P"
    return labels


def test_a_palette_png_s_indices_are_its_labels(tmp_path):
    # the indices, not the colours, are the nuclei
    labels = _palette_labels(tmp_path / "p.png")
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
    assert shared_images(folder, [(tmp_path / IMAGE.name, None)]) == []
    assert shared_images(folder, [(folder / IMAGE.name, None)]) == [str(folder / IMAGE.name)]
    assert shared_images(ann, [(tmp_path / IMAGE.name, None)]) == [str(tmp_path / IMAGE.name)]


def test_sparse_label_values_train_as_the_same_nuclei(tmp_path):
    labels = tifffile.imread(LABELS).astype(np.int64)
    sparse = np.where(labels > 0, labels * 100_000 + 7, 0)     # values up to ~10^7, each still one nucleus
    (dense,), _ = load_annotations(_pair_folder(tmp_path / "d"))
    (item,), _ = load_annotations(_pair_folder(tmp_path / "s", sparse.astype(np.uint32)))
    np.testing.assert_array_equal(item.boxes, dense.boxes)


@pytest.mark.slow
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
    pred = _palette_labels(tmp_path / "gt.png").copy()
    pred[10:15, 10:15] = 0                                       # one nucleus of the two found
    tifffile.imwrite(tmp_path / "pred.tif", pred)
    result = invoke(["evaluate", tmp_path / "pred.tif", "--gt", tmp_path / "gt.png"])
    assert result.exit_code == 0, result.output
    assert "1 image: 2 true cells, 1 predicted" in result.stdout and "TP 1 FP 0 FN 1" in result.stdout


# --------------------------------------------------------------------------- QuPath GeoJSON beside an image

def _geometries(labels: np.ndarray, row0: int = 0, col0: int = 0) -> list[dict]:
    """Each label's outline as cellseg's cells.geojson writes it (pixel-edge polygons), shifted by (row0, col0)."""
    from cellseg.results.polygons import mask_geometries
    from cellseg.training import train_image_from_labels
    item = train_image_from_labels(np.zeros(labels.shape + (1,), np.uint8), labels)
    return mask_geometries(item.boxes + [row0, col0, row0, col0], item.masks)


def _feature(geometry: dict, kind: str = "detection", **more) -> dict:
    return {"type": "Feature", "geometry": geometry, "properties": {"objectType": kind}, **more}


def _rectangle(x0, y0, x1, y1) -> dict:
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


def _write_geojson(path: Path, features: list[dict]) -> Path:
    import json
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def test_cellseg_s_own_geojson_trains_as_the_label_image_it_was_written_from(tmp_path):
    # a count's cells.geojson, opened in QuPath and exported again: the same masks, pixel for pixel
    labels = tifffile.imread(LABELS)
    folder = tmp_path / "geo"
    folder.mkdir()
    shutil.copy(IMAGE, folder / IMAGE.name)
    path = _write_geojson(folder / f"{IMAGE.name}.geojson", [_feature(g) for g in _geometries(labels)])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())     # saved again by a Windows editor: a byte order mark
    (item,), classes = load_annotations(folder)
    (want,), _ = load_annotations(_pair_folder(tmp_path))
    assert classes == ["nucleus"] and item.window is None and len(item.masks) == 56
    np.testing.assert_array_equal(item.boxes, want.boxes)
    assert all(np.array_equal(a, b) for a, b in zip(item.masks, want.masks))
    gt, paths = annotated_images(folder)                                      # and as held-out images (--val)
    assert [len(v) for v in gt.values()] == [56] and paths == {IMAGE.name: folder / IMAGE.name}


def _slide_with_fields(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A 512 x 768 "slide" of the test image's pixels tiled 2 x 3 with the nuclei of five copies as QuPath cells (the
    nucleus in nucleusGeometry), two field rectangles (the top-left copy, the bottom-right one, each 4 px inside
    it) and a counting region left in the export on the sixth: (folder, pixels, labels of the slide)."""
    image, labels = np.asarray(Image.open(IMAGE)), tifffile.imread(LABELS)
    slide = np.tile(image, (2, 3))
    slide_labels = np.zeros(slide.shape, np.int32)
    features = []
    for r in range(2):
        for c in range(3):
            copy = np.where(labels > 0, labels + 100 * (3 * r + c + 1), 0)
            slide_labels[256 * r:256 * (r + 1), 256 * c:256 * (c + 1)] = copy
            if (r, c) != (1, 0):    # the bottom-left copy is left unannotated: a counting region lies there
                features += [_feature(_rectangle(0, 0, 1, 1), "cell", nucleusGeometry=g)
                             for g in _geometries(labels, 256 * r, 256 * c)]
    features += [_feature(_rectangle(4, 4, 252, 252), "annotation"), _feature(_rectangle(516, 260, 764, 508),
                                                                                "annotation"),
                 _feature(_rectangle(20, 276, 236, 492), "annotation", id="region without nuclei")]
    folder = tmp_path / "slide"
    folder.mkdir()
    tifffile.imwrite(folder / "slide.tif", slide)
    _write_geojson(folder / "slide.geojson", features)
    return folder, slide, slide_labels


def test_field_rectangles_of_a_slide_train_on_their_windows_with_every_nucleus_meeting_them(tmp_path, caplog):
    folder, slide, slide_labels = _slide_with_fields(tmp_path)
    with caplog.at_level(logging.WARNING):
        items, _ = load_annotations(folder)
    assert "1 polygon(s) of more than 25 times the median nucleus' area and holding none left out" in caplog.text
    assert [it.window for it in items] == [(4, 4, 252, 252), (260, 516, 508, 764)]
    for item in items:
        r0, c0, r1, c1 = item.window
        assert item.image.shape[1:] == (r1 - r0, c1 - c0)
        want = slide_labels[r0:r1, c0:c1]       # every nucleus meeting the field, cut at its edge
        assert len(item.masks) == len(np.unique(want)) - 1
        got = np.zeros(want.shape, np.int32)
        for k, (box, mask) in enumerate(zip(item.boxes, item.masks), start=1):
            got[box[0]:box[2], box[1]:box[3]][mask] = k
        np.testing.assert_array_equal(got > 0, want > 0)
    # a fine-tune's held-out band is read from the field, not from the whole slide
    from cellseg.training import split_heldout
    _, held, _ = split_heldout(items, 0.25)
    np.testing.assert_array_equal(held[1][1][..., 0], slide[260:508, 702:764])
    # a field is no image to count whole: scored only once written as the window it is (label_pairs.write_fields)
    with pytest.raises(EvaluationError, match=r"found the field slide.tif \(x 4, y 4, 248 x 248 px\) of a larger"):
        annotated_images(folder)


@pytest.mark.parametrize("features, expected", [
    ([_feature({"type": "Polygon", "coordinates": [[[0, 0], [300, 0], [0, 300], [0, 0]]]}, "annotation")],
     "expected a rectangle around the annotated nuclei of slide.tif, found a polygon holding"),
    ([_feature(_rectangle(0, 0, 200, 200), "annotation"), _feature(_rectangle(100, 100, 300, 300), "annotation")],
     "expected the field rectangles of slide.geojson apart, found two that overlap"),
    ([], "expected rectangle annotations around the annotated nuclei of slide.tif"),
])
def test_fields_that_cannot_be_trained_on_are_refused(tmp_path, monkeypatch, features, expected):
    from cellseg.evaluation import geojson_fields
    folder, _, _ = _slide_with_fields(tmp_path)
    import json
    data = json.loads((folder / "slide.geojson").read_text())
    nuclei = [f for f in data["features"] if f["properties"]["objectType"] == "cell"]
    _write_geojson(folder / "slide.geojson", nuclei + features)
    monkeypatch.setattr(geojson_fields, "WHOLE_IMAGE_PX", 256 * 256)    # the test slide stands for a large one
    with pytest.raises(EvaluationError, match=expected):
        load_annotations(folder)


@pytest.mark.slow
def test_cli_fine_tunes_on_the_fields_of_a_slide(tmp_path, tiny_bundle):
    folder, slide, _ = _slide_with_fields(tmp_path)
    protocol = tmp_path / "mine.toml"
    protocol.write_text(f'name = "mine"\nmodality = "fluorescence"\n\n[detection]\nmodel = "{tiny_bundle.as_posix()}"\n')
    out = tmp_path / "mine"
    result = invoke(["train", "--data", folder, "--out", out, "-p", protocol, "--steps", 2, "--batch-size", 1,
                     "--crop", 64, "--device", "cpu", "-q", "--keep-anyway"])
    assert result.exit_code == 0, (result.output, result.exception)
    # each field's last quarter held out, written as its own image: the slide's pixels of that band
    held = sorted((out / "heldout" / "images").iterdir())
    assert [tifffile.imread(p).shape for p in held] == [(248, 62), (248, 62)]
    np.testing.assert_array_equal(tifffile.imread(held[1]), slide[260:508, 702:764])


def test_evaluate_scores_a_count_on_the_fields_someone_checked_in_qupath(tmp_path):
    # PRED: a count's cells.geojson (scores kept) that missed 3 nuclei of the first field and found 2 specks in the
    # second and many nuclei outside both; GT: the same slide corrected in QuPath with two field rectangles
    folder, _, slide_labels = _slide_with_fields(tmp_path)
    import json
    truth = json.loads((folder / "slide.geojson").read_text())["features"]
    nuclei = [f["nucleusGeometry"] for f in truth if f["properties"]["objectType"] == "cell"]
    missed = {0, 1, 2}                                   # the top-left copy's first three nuclei
    specks = []
    for r, c in zip(*np.nonzero(slide_labels[300:500, 560:760] == 0)):
        if len(specks) == 2:
            break
        if (slide_labels[300 + r - 2:300 + r + 5, 560 + c - 2:560 + c + 5] == 0).all() and \
                all(abs(r - a) > 10 for a, _ in specks):
            specks.append((int(r), int(c)))
    found = [{**_feature(g), "properties": {"objectType": "detection", "measurements": {"score": 0.9}}}
             for k, g in enumerate(nuclei) if k not in missed]
    # the specks as QuPath 0.3 wrote measurements: a list of {name, value}
    found += [{**_feature(_rectangle(560 + c, 300 + r, 563 + c, 303 + r)),
               "properties": {"objectType": "detection", "measurements": [{"name": "score", "value": 0.4}]}}
              for r, c in specks]
    result = tmp_path / "slide.cellseg"
    result.mkdir()
    _write_geojson(result / "cells.geojson", found)
    out = tmp_path / "report"
    cli = invoke(["evaluate", result, "--gt", folder / "slide.geojson", "--out", out])
    assert cli.exit_code == 0, cli.output
    in_fields = [len(np.unique(slide_labels[4:252, 4:252])) - 1, len(np.unique(slide_labels[260:508, 516:764])) - 1]
    assert f"2 images: {sum(in_fields)} true cells, {sum(in_fields) - 3 + 2} predicted" in cli.stdout
    assert f"TP {sum(in_fields) - 3} FP 2 FN 3" in cli.stdout
    assert "best score threshold (max F1): 0.45" in cli.stdout           # the specks scored 0.4
    per_image = (out / "per_image.csv").read_text()
    assert "slide (x 4, y 4, 248 x 248 px)" in per_image and "slide (x 516, y 260, 248 x 248 px)" in per_image
    # a result folder without cells.geojson says so
    (result / "cells.geojson").unlink()
    cli = invoke(["evaluate", result, "--gt", folder / "slide.geojson"])
    assert cli.exit_code != 0 and "holding cells.geojson as PRED" in cli.stderr


def _fields_only(folder: Path, dest: Path, keep: list[list[int]]) -> Path:
    """`dest` with a link to folder's slide and its GeoJSON's nuclei with only the field rectangles `keep` (x0, y0,
    x1, y1)."""
    import json
    dest.mkdir()
    (dest / "slide.tif").symlink_to(folder / "slide.tif")
    features = json.loads((folder / "slide.geojson").read_text())["features"]
    nuclei = [f for f in features if f["properties"]["objectType"] == "cell"]
    return _write_geojson(dest / "slide.geojson", nuclei + [_feature(_rectangle(*r), "annotation") for r in keep])


@pytest.mark.slow
def test_cli_fine_tunes_on_one_field_and_judges_on_another(tmp_path, tiny_bundle):
    # validation as it should be: on a field the training never saw, counted as the window it is (not as the slide)
    folder, slide, slide_labels = _slide_with_fields(tmp_path)
    _fields_only(folder, tmp_path / "train", [[4, 4, 252, 252]])
    _fields_only(folder, tmp_path / "val", [[516, 260, 764, 508]])
    protocol = tmp_path / "mine.toml"
    protocol.write_text(f'name = "mine"\nmodality = "fluorescence"\n\n[detection]\nmodel = "{tiny_bundle.as_posix()}"\n')
    out = tmp_path / "mine"
    result = invoke(["train", "--data", tmp_path / "train", "--val", tmp_path / "val", "--out", out, "-p", protocol,
                     "--steps", 2, "--batch-size", 1, "--crop", 64, "--device", "cpu", "-q", "--keep-anyway"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "also in --data" not in result.stderr                 # one slide, fields apart
    (held,) = (out / "heldout" / "images").iterdir()
    np.testing.assert_array_equal(tifffile.imread(held), slide[260:508, 516:764])
    from cellseg.bundles import load_bundle
    card = load_bundle(out).card["finetune"]
    assert card["heldout_nuclei"] == len(np.unique(slide_labels[260:508, 516:764])) - 1
    assert "the fields of --val" in card["heldout"]
    # a --val field overlapping a --data field of the same slide is warned of
    from cellseg.evaluation import annotated_regions
    _fields_only(folder, tmp_path / "overlapping", [[200, 200, 300, 300]])
    assert shared_images(tmp_path / "train", annotated_regions(tmp_path / "overlapping")) == [
        str(tmp_path / "overlapping" / "slide.tif")]
    assert shared_images(tmp_path / "train", annotated_regions(tmp_path / "val")) == []


@pytest.mark.slow
def test_a_bundle_is_validated_on_fields_as_the_windows_they_are(tmp_path, tiny_bundle):
    # `cellseg train --init none --val FIELDS`: the fields written beside the report, each counted as one image
    from cellseg.evaluation import validate_bundle
    folder, slide, _ = _slide_with_fields(tmp_path)
    _fields_only(folder, tmp_path / "val", [[516, 260, 764, 508], [4, 4, 100, 60]])
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    validation = validate_bundle(bundle, tmp_path / "val", tmp_path / "report", device="cpu", progress=False)
    assert [im["image"] for im in validation.report.images] == ["images/0000_slide.tif", "images/0001_slide.tif"]
    assert [(im["height"], im["width"]) for im in validation.report.images] == [(248, 248), (56, 96)]
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "report" / "heldout" / "images" / "0001_slide.tif"),
                                  slide[4:60, 4:100])


def test_evaluate_a_batch_of_counts_against_a_folder_of_label_images(tmp_path):
    # `cellseg count a.png b.png -o results` and the images' Cellpose masks: every image scored, paired by name
    import json
    results, truth = tmp_path / "results", tmp_path / "truth"
    truth.mkdir()
    expected = {}
    for image, labels, dropped in ((IMAGE, LABELS, 0), (DATA / "dsb_he.png", DATA / "dsb_he_labels.tif", 5)):
        folder = results / f"{image.stem}.cellseg"
        folder.mkdir(parents=True)
        ann, n = coco_from_labels(folder, image, labels)
        coco = json.loads(ann.read_text())
        coco["annotations"] = coco["annotations"][dropped:]          # the count missed `dropped` nuclei
        (folder / "predictions.coco.json").write_text(json.dumps(coco))
        shutil.copy(image, truth / image.name)
        Image.fromarray(tifffile.imread(labels).astype(np.uint16)).save(truth / f"{image.stem}_masks.png")
        expected[image.name] = (n, dropped)
    report = tmp_path / "report"
    cli = invoke(["evaluate", results, "--gt", truth, "--out", report])
    assert cli.exit_code == 0, cli.output
    n_all, missed = sum(n for n, _ in expected.values()), sum(d for _, d in expected.values())
    assert f"2 images: {n_all} true cells, {n_all - missed} predicted" in cli.stdout
    assert f"TP {n_all - missed} FP 0 FN {missed}" in cli.stdout
    # a folder with neither results nor label images says what it expected
    (tmp_path / "neither").mkdir()
    shutil.copy(IMAGE, tmp_path / "neither" / IMAGE.name)
    cli = invoke(["evaluate", results, "--gt", tmp_path / "neither"])
    assert cli.exit_code != 0
    assert "expected a cellseg result folder holding predictions.coco.json, a folder of them, or images" in cli.stderr
