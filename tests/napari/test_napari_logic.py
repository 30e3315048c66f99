"""The napari plugin's pure logic, without Qt or a display: lazy slide levels, layer data of result folders
and slides, the count run behind the widget (progress, cancel, regions), table filters, colours, regions,
the npe2 manifest and what the wheel ships."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellseg.errors import CellsegError, ParameterError
from cellseg.geometry import Box
from cellseg.planning import Protocol
from cellseg.results import RESULT_MARKER
from cellseg.slides import open_slide
from cellseg_napari import _layers, _logic, _run
from cellseg_napari._lazy import LazyLevel, slide_pyramid
from cellseg_napari._reader import get_reader

from ..helpers import DATA, EXAMPLES, ROOT, LabelCounterSpec, invoke, random_cells, write_multi_file_ome

PLUGIN = ROOT / "napari_plugin"


@pytest.fixture(scope="module")
def png_result(tmp_path_factory, tiny_bundle) -> Path:
    """A 256² PNG counted through run_count (the widget's path) with the tiny random model."""
    folder = tmp_path_factory.mktemp("png")
    image = shutil.copy(DATA / "dsb_fluo.png", folder / "dsb_fluo.png")
    return _run.run_count(_run.CountRequest(slide=Path(image), model=str(tiny_bundle), device="cpu",
                                            output=folder / "dsb_fluo.cellseg"))


# --------------------------------------------------------------------------- lazy levels

@pytest.mark.parametrize("name", ["he_mosaic.ome.tif", "fluo_mosaic.ome.tif"])
def test_lazy_level_indexing_matches_the_pixels(name):
    with open_slide(EXAMPLES / name) as slide:
        h, w = slide.info.levels[1]
        full = slide.read_region(Box(0, 0, h, w), 1)
        level = LazyLevel(slide, 1)
        if slide.info.n_channels == 1:
            full = full[..., 0]
        assert level.shape == full.shape and level.dtype == full.dtype and level.ndim == full.ndim
        keys = [np.s_[10:20, 5:9], np.s_[3, 4], np.s_[3], np.s_[...], np.s_[::7, 100:3:-3], np.s_[-5:, -3],
                np.s_[5:5, :], np.s_[h - 2:h + 10, w - 1:]]
        if full.ndim == 3:
            keys += [np.s_[..., 1], np.s_[2:9, 4:6, ::2]]
        for key in keys:
            got = level[key]
            assert np.shape(got) == full[key].shape and np.array_equal(got, full[key]), key
        assert np.array_equal(np.asarray(level), full)
        with pytest.raises(IndexError):
            level[h, 0]


def test_one_channel_of_a_multichannel_slide_and_reads_stay_small(tmp_path):
    data = (np.arange(3 * 300 * 200, dtype=np.uint16) % 4001).reshape(3, 300, 200)
    path = tmp_path / "three.ome.tif"
    tifffile.imwrite(path, data, metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "GFP", "RFP"]}},
                     tile=(64, 64))
    with open_slide(path) as slide:
        level = LazyLevel(slide, 0, channel=2)
        assert level.shape == (300, 200) and level.dtype == np.uint16
        assert np.array_equal(level[100:150, 20:30], data[2, 100:150, 20:30])
        assert level.pixels_read == 50 * 10
    layers = _layers.slide_layer_data(path)
    assert [kw["name"] for _, kw, _ in layers] == ["three [DAPI]", "three [GFP]", "three [RFP]"]
    assert [kw["metadata"]["cellseg"]["channel"] for _, kw, _ in layers] == [0, 1, 2]
    assert all(kw["blending"] == "additive" and kw["contrast_limits"][1] > kw["contrast_limits"][0]
               for _, kw, _ in layers)
    assert np.array_equal(layers[1][0], data[1])     # one small level: a plain array


def test_a_file_of_a_multi_file_ome_tiff_opens_with_its_own_position_shown(tmp_path):
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 255, (1, 40, 50)).astype(np.uint8) for _ in range(2)]
    _, second = write_multi_file_ome(tmp_path, "plate", images)
    layers = _layers.slide_layer_data(second)
    assert [(kw["name"], kw["visible"], kw["metadata"]["cellseg"]["series"]) for _, kw, _ in layers] == [
        ("plate_MMStack_Pos1 #0", False, 0), ("plate_MMStack_Pos1 #1", True, 1)]
    assert all(np.array_equal(data, image[0]) for (data, _, _), image in zip(layers, images))


@pytest.mark.slow
def test_a_multi_position_file_opens_a_layer_each_and_counts_the_position_chosen(tmp_path, tiny_bundle):
    with open_slide(EXAMPLES / "fluo_mosaic.ome.tif") as mosaic:
        nuclei = mosaic.read_region(Box(400, 300, 560, 500))[..., 0]
    images = [np.zeros_like(nuclei), nuclei]        # an empty position first: counted, it would have no cells
    path = tmp_path / "plate.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        for k, image in enumerate(images):
            tw.write(image, metadata={"axes": "YX", "Name": f"pos{k}", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    layers = _layers.slide_layer_data(path)
    assert [(kw["name"], kw["visible"], kw["metadata"]["cellseg"]["series"]) for _, kw, _ in layers] == [
        ("plate #0", True, 0), ("plate #1", False, 1)]     # one on the other: the first shown
    assert all(np.array_equal(data, image) for (data, _, _), image in zip(layers, images))
    whole = _run.run_count(_run.CountRequest(slide=path, series=1, model=str(tiny_bundle), device="cpu",
                                             output=tmp_path / "whole"))
    assert json.loads((whole / "summary.json").read_text())["series"] == 1
    assert np.array_equal(_layers.result_layer_data(whole)[0][0], images[1])    # the result shows position 1
    region = _run.run_count(_run.CountRequest(slide=path, series=1, model=str(tiny_bundle), device="cpu",
                                              output=tmp_path / "region", region=Box(20, 30, 120, 150)))
    assert json.loads((region / _layers.REGION_FILE).read_text())["series"] == 1
    (shown, kwargs, _), *_ = _layers.result_layer_data(region)      # the original position, the region on it
    assert np.array_equal(shown, images[1]) and kwargs["translate"] == (0.0, 0.0)
    assert json.loads((region / "summary.json").read_text())["cell_count"] > 5     # position 1's nuclei


def test_a_big_slide_without_pyramid_gets_an_overview_level(tmp_path):
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, np.full((2600, 2200), 7, np.uint8), tile=(256, 256))
    with open_slide(path) as slide:
        levels = slide_pyramid(slide)
        assert isinstance(levels[0], LazyLevel) and levels[0].shape == (2600, 2200)
        assert isinstance(levels[1], np.ndarray) and max(levels[1].shape) <= 1024 and levels[1].dtype == np.uint8


# --------------------------------------------------------------------------- slides and result folders

def test_slide_layer_data_is_a_lazy_multiscale_of_the_pyramid():
    (data, kwargs, kind), = _layers.slide_layer_data(EXAMPLES / "fluo_mosaic.ome.tif")
    assert kind == "image" and kwargs["multiscale"] is True
    assert [lv.shape for lv in data] == [(2048, 2048), (1024, 1024), (512, 512)]
    assert all(isinstance(lv, LazyLevel) and lv.dtype == np.uint8 for lv in data)
    assert data[0].pixels_read == 0 and data[1].pixels_read == 0   # contrast limits from the smallest level
    assert kwargs["metadata"]["cellseg"]["mpp"] == pytest.approx(0.5)
    (rgb, kw, _), = _layers.slide_layer_data(EXAMPLES / "he_mosaic.ome.tif")
    assert kw["rgb"] is True and [lv.shape for lv in rgb] == [(864, 1056, 3), (432, 528, 3), (216, 264, 3)]
    (png, kw, _), = _layers.slide_layer_data(EXAMPLES / "he_patch.png")
    assert kw["multiscale"] is False and png.shape == (256, 320, 3) and png.dtype == np.uint8


@pytest.mark.slow
def test_result_folder_layers(he_result):
    layers = _layers.result_layer_data(he_result)
    assert [(kw["name"], kind) for _, kw, kind in layers] == [
        ("he_mosaic", "image"), ("he_mosaic tissue", "image"), ("he_mosaic cell labels", "labels"),
        ("he_mosaic labels", "labels"), ("he_mosaic cells", "points")]
    (image, ikw, _), (tissue, tkw, _), (grown, gkw, _), (labels, lkw, _), (points, pkw, _) = layers
    # the tissue mask (view resolution) is stretched over the whole slide
    assert np.allclose(np.multiply(tissue.shape, tkw["scale"]), (864, 1056)) and tissue.any()
    assert ikw["rgb"] and [lv.shape for lv in image] == [(864, 1056, 3), (432, 528, 3), (216, 264, 3)]
    assert [lv.shape for lv in labels] == [(864, 1056), (432, 528), (216, 264)]
    assert all(isinstance(lv, LazyLevel) and lv.dtype == np.uint32 for lv in labels) and lkw["multiscale"]
    # he-nuclei grows nuclei into cells: cell_labels.ome.tif, the same pyramid and ids, each cell holding its nucleus
    assert [lv.shape for lv in grown] == [lv.shape for lv in labels] and gkw["multiscale"]
    assert all(isinstance(lv, LazyLevel) and lv.dtype == np.uint32 for lv in grown)
    assert gkw["metadata"]["cellseg"]["kind"] == "cell_labels" and lkw["metadata"]["cellseg"]["kind"] == "labels"
    nuclei, cells_grown = labels[0][:, :], grown[0][:, :]
    assert np.array_equal(cells_grown[nuclei > 0], nuclei[nuclei > 0]) and ((cells_grown > 0) & (nuclei == 0)).any()
    assert set(np.unique(cells_grown)) == set(np.unique(nuclei))
    cells = pkw["features"]
    csv_columns = (he_result / "cells.csv").read_text().splitlines()[0].split(",")
    assert list(cells.columns) == csv_columns and len(cells) == 243 == len(points)
    assert np.allclose(points, cells[["centroid_row_px", "centroid_col_px"]].to_numpy())
    # the centroid of a convex-ish nucleus lies in its own label (cells.csv ids are the label values)
    r, c = points.round().astype(int).T
    assert (labels[0][:, :][r, c] == cells["cell_id"].to_numpy()).mean() > 0.9
    assert np.all(pkw["size"] >= 3)
    result_id = pkw["metadata"]["cellseg"].pop("result_id")
    assert pkw["metadata"]["cellseg"] == {"kind": "cells", "result": str(he_result), "mpp": 0.25, "offset": [0, 0]}
    # one id for the layers of one opening, another for the next (a result counted again into its folder)
    assert all(kw["metadata"]["cellseg"]["result_id"] == result_id for _, kw, _ in layers[:-1])
    assert _layers.result_layer_data(he_result)[-1][1]["metadata"]["cellseg"]["result_id"] != result_id


def test_run_json_opens_the_same_and_a_moved_result_finds_or_misses_its_slide(he_result, tmp_path):
    names = [kw["name"] for _, kw, _ in _layers.result_layer_data(he_result / "run.json")]
    assert names == ["he_mosaic", "he_mosaic tissue", "he_mosaic cell labels", "he_mosaic labels", "he_mosaic cells"]
    moved = tmp_path / "moved.cellseg"
    shutil.copytree(he_result, moved)
    run = json.loads((moved / "run.json").read_text())
    run["slide"] = str(tmp_path / "gone.ome.tif")
    (moved / "run.json").write_text(json.dumps(run))
    result = _layers.load_result(moved)
    assert result.slide_path is None and "missing" in result.notes[0]
    assert [kind for _, _, kind in _layers.result_layer_data(moved)] == ["image", "labels", "labels", "points"]
    shutil.copy(EXAMPLES / "he_mosaic.ome.tif", tmp_path / "he_mosaic.ome.tif")   # moved together
    assert _layers.load_result(moved).slide_path == tmp_path / "he_mosaic.ome.tif"


def test_tissue_mask_is_scaled_onto_the_slide(he_result, tmp_path):
    from PIL import Image
    folder = tmp_path / "with_tissue.cellseg"
    shutil.copytree(he_result, folder)
    mask = np.zeros((216, 264), np.uint8)
    mask[100:200, 50:200] = 255
    Image.fromarray(mask).save(folder / "tissue_mask.png")
    layers = _layers.result_layer_data(folder)
    tissue = next((d, kw) for d, kw, _ in layers if kw["name"].endswith("tissue"))
    assert tissue[0].shape == (216, 264) and tissue[0].max() == 1
    assert tissue[1]["scale"] == (4.0, 4.0) and tissue[1]["translate"] == (1.5, 1.5)


def test_not_a_result_folder(tmp_path):
    assert _layers.find_result_folder(tmp_path) is None
    with pytest.raises(CellsegError, match="result folder"):
        _layers.load_result(tmp_path)


def test_get_reader_claims_results_and_slides_only(he_result, tmp_path):
    assert get_reader(str(he_result)) is not None
    assert get_reader(str(he_result / "run.json")) is not None
    assert get_reader(str(EXAMPLES / "he_patch.png")) is not None
    assert get_reader(str(he_result / "cells.csv")) is None
    assert get_reader(str(tmp_path)) is None                       # an ordinary folder
    (tmp_path / "run.json").write_text("{}")
    assert get_reader(str(tmp_path / "run.json")) is None          # a run.json of something else
    layers = get_reader([str(EXAMPLES / "he_patch.png")])([str(EXAMPLES / "he_patch.png")])
    assert layers[0][0].shape == (256, 320, 3)


def test_get_reader_leaves_z_stacks_and_time_series_to_napari(tmp_path):
    """napari's own readers show a stack's planes; cellseg's would refuse it (it counts one plane or projection)."""
    tifffile.imwrite(tmp_path / "z.ome.tif", np.zeros((3, 20, 20), np.uint8), metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp_path / "t.ome.tif", np.zeros((3, 20, 20), np.uint8), metadata={"axes": "TYX"})
    tifffile.imwrite(tmp_path / "flat.tif", np.zeros((20, 20), np.uint8))
    (tmp_path / "bad.tif").write_bytes(b"II*\x00" + bytes(20))     # damaged: cellseg's reader says so in one line
    assert get_reader(str(tmp_path / "z.ome.tif")) is None
    assert get_reader([str(tmp_path / "flat.tif"), str(tmp_path / "t.ome.tif")]) is None
    assert get_reader(str(tmp_path / "flat.tif")) is not None and get_reader(str(tmp_path / "bad.tif")) is not None


# --------------------------------------------------------------------------- the count run

@pytest.mark.slow
def test_run_count_writes_the_cli_result(png_result, tiny_bundle):
    assert (png_result / RESULT_MARKER).is_file() and not (png_result / _layers.REGION_FILE).exists()
    summary = json.loads((png_result / "summary.json").read_text())
    run = json.loads((png_result / "run.json").read_text())
    assert summary["cell_count"] > 0 and run["interface"] == "napari"
    assert run["model"]["path"] == str(tiny_bundle) and run["protocol"]["name"] == "fluorescence-nuclei"
    assert run["device"] == "cpu" and run["tissue"]["method"] == "unet"
    layers = _layers.result_layer_data(png_result)
    assert [kind for _, _, kind in layers] == ["image", "image", "labels", "points"]   # slide, tissue mask, ...
    assert _layers.labels_layer_data(_layers.load_result(png_result), kind="cell_labels") is None   # nuclei only
    labels = layers[2][0]
    assert labels.shape == (256, 256) and labels.dtype == np.uint32 and labels.max() == summary["cell_count"]


@pytest.mark.slow
def test_run_count_on_a_region_of_a_slide_and_an_array(tmp_path, tiny_bundle):
    seen = []
    out = _run.run_count(_run.CountRequest(slide=EXAMPLES / "he_mosaic.ome.tif", protocol="he-nuclei",
                                           model=str(tiny_bundle), device="cpu", output=tmp_path / "region",
                                           region=Box(100, 200, 228, 360), name="he [crop]"),
                         progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, 1) and seen[-1] == (1, 1)
    region = json.loads((out / _layers.REGION_FILE).read_text())
    assert region["box_px"] == [100, 200, 228, 360] and region["slide"] == str(EXAMPLES / "he_mosaic.ome.tif")
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["height_px"], summary["width_px"], summary["mpp"]) == (128, 160, pytest.approx(0.25))
    layers = _layers.result_layer_data(out)
    (slide, skw, _), _tissue, (grown, gkw, _), (labels, lkw, _), (_, pkw, _) = layers
    assert slide[0].shape == (864, 1056, 3) and skw["translate"] == (0.0, 0.0)   # the original slide
    assert labels.shape == grown.shape == (128, 160)
    assert lkw["translate"] == gkw["translate"] == pkw["translate"] == (100.0, 200.0)
    assert not list(tmp_path.glob(".region*"))

    image = np.asarray(open_slide(EXAMPLES / "he_patch.png").read_region(Box(0, 0, 256, 320)))
    out2 = _run.run_count(_run.CountRequest(slide=None, read=_logic.array_reader(image), shape=(256, 320),
                                            n_channels=3, dtype="uint8", protocol="he-nuclei", mpp=0.5,
                                            model=str(tiny_bundle), device="cpu", output=tmp_path / "array"))
    assert json.loads((out2 / _layers.REGION_FILE).read_text())["slide"] is None
    assert [kind for _, _, kind in _layers.result_layer_data(out2)] == ["image", "labels", "labels", "points"]


def test_cancel_leaves_nothing_behind(tmp_path, tiny_bundle):
    cancel = threading.Event()
    out = tmp_path / "cancelled"
    with pytest.raises(_run.Cancelled):
        _run.run_count(_run.CountRequest(slide=ROOT / "tests" / "data" / "dsb_fluo.png", model=str(tiny_bundle),
                                         device="cpu", output=out),
                       progress=lambda done, total: cancel.set() if done >= 1 else None, cancel=cancel)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_run_count_user_errors(tmp_path, tiny_bundle):
    with pytest.raises(CellsegError, match="pixel size"):   # he-nuclei needs µm; a PNG has none
        _run.run_count(_run.CountRequest(slide=EXAMPLES / "he_patch.png", protocol="he-nuclei",
                                         model=str(tiny_bundle), device="cpu", output=tmp_path / "x"))
    with pytest.raises(CellsegError, match="protocol"):
        _run.run_count(_run.CountRequest(slide=EXAMPLES / "he_patch.png", protocol="nope"))
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_widget_and_cli_count_the_same_cells(png_result, tiny_bundle, tmp_path):
    """The widget runs the pipeline of `cellseg count` (the slide's normalisation, the tissue U-Net on the
    detector's device): the same image gives the same cells.csv, byte for byte."""
    image = shutil.copy(DATA / "dsb_fluo.png", tmp_path / "dsb_fluo.png")
    result = invoke(["count", image, "--model", tiny_bundle, "--device", "cpu", "-q", "-o", tmp_path / "cli"])
    assert result.exit_code == 0, result.output
    cli_run = json.loads((tmp_path / "cli" / "run.json").read_text())
    widget_run = json.loads((png_result / "run.json").read_text())
    assert cli_run["normalisation_windows"] == widget_run["normalisation_windows"] != []
    assert cli_run["tissue"] == widget_run["tissue"] and cli_run["device"] == widget_run["device"]
    cells = (png_result / "cells.csv").read_bytes()
    assert cells.count(b"\n") > 2 and (tmp_path / "cli" / "cells.csv").read_bytes() == cells


def test_progress_reports_and_cancels():
    seen, cancel = [], threading.Event()
    report = _run.CancellableProgress(lambda d, t: seen.append((d, t)), cancel)
    report(0, 3)
    report(2, 3)
    assert seen == [(0, 3), (2, 3)]
    cancel.set()
    with pytest.raises(_run.Cancelled):
        report(3, 3)
    assert seen == [(0, 3), (2, 3)]
    with pytest.raises(_run.Cancelled):      # also before anything is reported (the model load)
        report.check()


# --------------------------------------------------------------------------- table, colours, regions

@pytest.fixture
def cells():
    import pandas as pd
    return pd.DataFrame({"cell_id": [1, 2, 3, 4], "area_px": [10.0, 50.0, np.nan, 30.0],
                         "class_name": ["a", "b", "a", "a"], "cut_at_seam": [False, True, False, False],
                         "centroid_row_px": [5.0, 6.0, 7.0, 8.0], "centroid_col_px": [1.0, 2.0, 3.0, 4.0]})


def test_filter_rows(cells):
    assert list(_logic.filter_rows(cells)) == [0, 1, 2, 3]
    assert list(_logic.filter_rows(cells, "area_px", 20, None)) == [1, 3]       # NaN never passes a bound
    assert list(_logic.filter_rows(cells, "area_px", None, 30)) == [0, 3]
    assert list(_logic.filter_rows(cells, "area_px", 30, 30)) == [3]
    assert list(_logic.filter_rows(cells, "class_name", text="B")) == [1]
    with pytest.raises(ParameterError, match="numeric"):
        _logic.filter_rows(cells, "class_name", 1, 2)
    with pytest.raises(ParameterError, match="column"):
        _logic.filter_rows(cells, "nope", 1, 2)
    assert _logic.numeric_columns(cells) == ["cell_id", "area_px", "cut_at_seam", "centroid_row_px",
                                             "centroid_col_px"]
    assert [_logic.format_value(v) for v in (np.nan, 3.14159, True, 7, "x")] == ["", "3.142", "yes", "7", "x"]


def test_colors_by_column(cells):
    rgba, limits = _logic.colors_by_column(cells, "area_px", limits=(10, 50))
    assert rgba.shape == (4, 4) and limits == (10.0, 50.0)
    from matplotlib import colormaps
    assert np.allclose(rgba[0], colormaps["viridis"](0.0)) and np.allclose(rgba[1], colormaps["viridis"](1.0))
    assert np.allclose(rgba[2], _logic.NAN_RGBA) and np.allclose(rgba[3], colormaps["viridis"](0.5))
    cat, none = _logic.colors_by_column(cells, "class_name")
    assert none is None and np.allclose(cat[0], cat[2]) and not np.allclose(cat[0], cat[1])
    flags, _ = _logic.colors_by_column(cells, "cut_at_seam")
    assert np.allclose(flags[0], flags[2]) and not np.allclose(flags[0], flags[1])
    lut = _logic.label_color_dict(cells["cell_id"], rgba)
    assert lut[0] == lut[None] == _logic.TRANSPARENT and np.allclose(lut[2], rgba[1]) and len(lut) == 6


def test_region_box():
    square = [[10.2, 20.7], [10.2, 60.4], [50.6, 60.4], [50.6, 20.7]]
    assert _logic.region_box(square, (100, 100)) == Box(10, 21, 52, 61)
    assert _logic.region_box([[-5, -5], [40, 300]], (100, 100)) == Box(0, 0, 41, 100)   # clipped
    assert _logic.region_box(np.array([[0, 3, 4], [0, 30, 40]]), (100, 100)) == Box(3, 4, 31, 41)  # nD shapes
    with pytest.raises(ParameterError, match="overlapping"):
        _logic.region_box([[200, 200], [300, 300]], (100, 100))
    with pytest.raises(ParameterError, match="16 x 16"):
        _logic.region_box([[0, 0], [5, 90]], (100, 100))


def test_place_on_image():
    kw = _logic.place_on_image({"translate": (100.0, 200.0), "name": "x"}, (1, 2.0, 2.0), (0, 10.0, 20.0))
    assert kw == {"translate": (210.0, 420.0), "scale": (2.0, 2.0), "name": "x"}


@pytest.mark.parametrize("channels, names", [(1, None), (3, None), (3, ["CD3", "DAPI", "CK"])])
def test_write_region_tiff_round_trip(tmp_path, channels, names):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (700, 600, channels), dtype=np.uint8)
    read = _logic.array_reader(image[..., 0] if channels == 1 else image)
    path = _logic.write_region_tiff(read, Box(50, 40, 650, 590), tmp_path / "r.ome.tif", n_channels=channels,
                                    dtype=np.uint8, mpp=0.5, rgb=channels == 3 and not names, tile=256,
                                    channel_names=names)
    with open_slide(path) as slide:
        assert (slide.info.height, slide.info.width, slide.info.n_channels) == (600, 550, channels)
        assert slide.info.mpp == pytest.approx(0.5)
        assert np.array_equal(slide.read_region(Box(0, 0, 600, 550)), image[50:650, 40:590])
        # a region of a slide with named channels keeps them: its count names its intensity columns as the slide's
        assert (list(slide.info.channel_names or []) or None) == names


def test_a_stack_is_counted_at_the_plane_on_screen():
    stack = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)       # (T, Z, Y, X)
    plane, at = _logic.displayed_plane(stack, False, (1.2, 2.0, 0.0, 0.0))
    assert at == (1, 2) and np.array_equal(plane, stack[1, 2])
    plane, at = _logic.displayed_plane(stack, False, (-3, 9, 0, 0))       # beyond the axes: their first and last
    assert at == (0, 2) and np.array_equal(_logic.array_reader(plane)(Box(0, 0, 4, 5))[..., 0], stack[0, 2])
    rgb = np.zeros((3, 4, 5, 3))
    assert _logic.displayed_plane(rgb, True, (2, 0, 0, 0))[1] == (2,)
    assert _logic.displayed_plane(rgb[0], True, (0, 0, 0))[1] == () and _logic.displayed_plane(stack[0, 0], False,
                                                                                               (0, 0))[1] == ()


def test_array_reader_refuses_stacks():
    with pytest.raises(ParameterError, match="2-D"):
        _logic.array_reader(np.zeros((3, 10, 10, 2)))
    with pytest.raises(ParameterError, match="2-D"):
        _logic.array_reader(np.zeros((5, 10, 10)))


# --------------------------------------------------------------------------- manifest, samples, wheel

def test_manifest_is_valid_and_its_commands_import():
    npe2 = pytest.importorskip("npe2")
    import importlib
    manifest = npe2.PluginManifest.from_file(PLUGIN / "napari.yaml")
    assert manifest.name == "cellseg-toolkit"
    for command in manifest.contributions.commands:
        module, attr = command.python_name.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), command.python_name
    assert {s.key for s in manifest.contributions.sample_data} == {"fluo_mosaic", "he_mosaic", "empty_regions",
                                                                  "he_patch"}
    installed = npe2.PluginManifest.from_distribution("cellseg-toolkit")   # found through the entry point
    assert installed.name == manifest.name


def test_sample_data_are_the_example_slides():
    from cellseg_napari import _sample_data
    for name, expect in [("fluo_mosaic", (2048, 2048)), ("he_mosaic", (864, 1056, 3)),
                         ("empty_regions", (4096, 4096)), ("he_patch", (256, 320, 3))]:
        (data, kwargs, kind), = getattr(_sample_data, name)()
        assert kind == "image" and (data[0] if kwargs["multiscale"] else data).shape == expect


@pytest.mark.slow
def test_wheel_ships_the_manifest_and_sample_slides(wheel):
    names = wheel.namelist()
    assert "cellseg_napari/napari.yaml" in names and "cellseg_napari/_widget.py" in names
    for slide in ("fluo_mosaic.ome.tif", "he_mosaic.ome.tif", "empty_regions.ome.tif", "he_patch.png"):
        assert f"cellseg_napari/example_slides/{slide}" in names
    entry_points = wheel.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "[napari.manifest]" in entry_points and "cellseg-toolkit = cellseg_napari:napari.yaml" in entry_points


def test_triton_is_kept_out_only_where_mesas_llvm_is_loaded(tmp_path, monkeypatch):
    """A napari on software OpenGL (Mesa's llvmpipe maps libLLVM) crashes when torch then loads Triton's own LLVM;
    run_count keeps Triton out there, and only there."""
    import sys
    had = "triton" in sys.modules
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libGL.so.1\n")
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    try:
        assert not _run.keep_triton_out(maps) and "triton" not in sys.modules        # no LLVM mapped: untouched
        assert not _run.keep_triton_out(tmp_path / "no-proc")                         # not Linux: untouched
        maps.write_text(maps.read_text() + "7f02-7f03 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/libLLVM-15.so.1\n")
        assert _run.keep_triton_out(maps) and sys.modules["triton"] is None
        with pytest.raises(ImportError):
            import triton  # noqa: F401
        assert not _run.keep_triton_out(maps)                                         # once is enough
    finally:
        if not had:
            sys.modules.pop("triton", None)


def test_count_message_gives_the_interval_and_the_warnings():
    """The widget's line after a count (issue 48): the interval as an estimate from validation data, or why none."""
    summary = {"cell_count": 1386, "warnings": ["the count moves 12% between ..."],
               "count_estimate": {"estimated_true_count": 1356.4, "interval_low": 856.0, "interval_high": 1786.6,
                                  "interval_level": 0.9, "note": "an estimate from validation data"}}
    text = _logic.count_message(summary)
    assert text.startswith("1,386 cells; estimated true count 1,356 (90 % interval 856–1,787")
    assert "estimate from validation data" in text and "\nwarning: the count moves 12%" in text
    bare = _logic.count_message({"cell_count": 12, "count_estimate": {"estimated_true_count": None,
                                                                     "note": "no calibration in this bundle"}}, 12)
    assert bare == "12 cells (no calibration in this bundle)"
    # the result folder ends the count's line, not the last warning
    lines = _logic.count_message(summary, folder="/results/x.cellseg").split("\n")
    assert lines[0].endswith("validation data) → /results/x.cellseg") and lines[1:] == [
        "warning: the count moves 12% between ..."]


def test_a_z_stack_result_shows_the_stack_as_it_was_counted(tmp_path):
    """The slide layer of a Z-stack's result is the plane or projection counted (run.json's z), not a refusal."""
    labels = random_cells(80, 90, max_diameter=10, n=60, seed=2)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    planes = np.stack([(labels > 0).astype(np.uint8) * v + 10 for v in (40, 200, 90)])
    tifffile.imwrite(tmp_path / "stack.ome.tif", planes, metadata={"axes": "ZYX"})
    protocol = Protocol(name="test", tile_size=40, halo_px=10, min_area_px=1, tissue_method="none")
    LabelCounterSpec(protocol, tmp_path / "labels.tif", z="max").load().count(tmp_path / "stack.ome.tif",
                                                                               tmp_path / "out")
    layers = _layers.result_layer_data(tmp_path / "out")
    (image, kw, kind) = layers[0]
    assert kind == "image" and kw["name"] == "stack"
    shown = image[0] if isinstance(image, list) else image
    np.testing.assert_array_equal(np.asarray(shown).squeeze(), planes.max(axis=0))
