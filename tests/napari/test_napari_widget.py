"""The napari plugin in a real viewer (Qt, OpenGL) under Xvfb: pytest-xvfb starts the X server; napari needs
a real one (QT_QPA_PLATFORM=offscreen renders black frames). Skipped where napari or pytest-qt is missing."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest

napari = pytest.importorskip("napari")
pytest.importorskip("pytestqt")
if sys.platform.startswith("linux") and not os.environ.get("DISPLAY") and not os.environ.get("CI"):
    # Qt aborts the whole process without an X server; CI installs Xvfb (.ci/run), so there it must run.
    pytest.skip("no X server: install xvfb (see .ci/run) so that pytest-xvfb can start one",
                allow_module_level=True)

from cellseg.errors import CellsegError  # noqa: E402
from cellseg.geometry import Box  # noqa: E402
from cellseg_napari._lazy import LazyLevel  # noqa: E402
from cellseg_napari._widget import WHOLE_IMAGE, CellsegWidget, camera  # noqa: E402

from ..helpers import DATA, EXAMPLES  # noqa: E402

PLUGIN = "cellseg-toolkit"


@pytest.mark.slow
def test_reader_layers_in_the_viewer(make_napari_viewer, he_result):
    viewer = make_napari_viewer()
    layers = viewer.open(he_result, plugin=PLUGIN)
    # the slide, the tissue mask, the cells grown from the nuclei (he-nuclei: 5 µm), the nuclei, their centroids
    assert [type(layer).__name__ for layer in layers] == ["Image", "Image", "Labels", "Labels", "Points"]
    image, _tissue, grown, labels, points = layers
    assert image.multiscale and image.rgb and labels.multiscale and grown.multiscale
    assert [lv.shape for lv in image.data] == [(864, 1056, 3), (432, 528, 3), (216, 264, 3)]
    assert [lv.shape for lv in labels.data] == [lv.shape for lv in grown.data] == [(864, 1056), (432, 528), (216, 264)]
    assert grown.name == "he_mosaic cell labels" and labels.name == "he_mosaic labels"
    assert image.dtype == np.uint8 and labels.dtype == np.uint32
    assert all(isinstance(lv, LazyLevel) for lv in [*image.data, *labels.data])
    assert points.data.shape == (243, 2) and len(points.features) == 243
    assert {"cell_id", "area_px", "area_um2", "centroid_row_px", "mean_intensity_red"} <= set(points.features.columns)
    assert points.features["area_um2"].notna().all()
    # the labels under a cell's centroid are that cell's id
    row = points.features.iloc[10]
    assert labels.get_value((row["centroid_row_px"], row["centroid_col_px"]))[-1] == row["cell_id"]
    assert grown.get_value((row["centroid_row_px"], row["centroid_col_px"]))[-1] == row["cell_id"]
    assert {"cell_area_um2", "cytoplasm_dab_od_mean"} <= set(points.features.columns)
    # the same from run.json
    assert [layer.name for layer in viewer.open(he_result / "run.json", plugin=PLUGIN)][-1].startswith(
        "he_mosaic cells")
    # a big slide opened through our reader: showing it whole never decodes its full-resolution level
    viewer.layers.clear()
    slide, = viewer.open(EXAMPLES / "empty_regions.ome.tif", plugin=PLUGIN)
    assert slide.multiscale and [lv.shape for lv in slide.data] == [(4096, 4096), (2048, 2048), (1024, 1024),
                                                                  (512, 512)]
    viewer.reset_view()
    viewer.screenshot(canvas_only=True, flash=False)
    assert slide.data[0].pixels_read == 0 and slide.data[1].pixels_read == 0
    camera(viewer).zoom = 4 * camera(viewer).zoom * 1024 / 512     # zoomed in: a small region of level 0
    camera(viewer).center = (2000, 2000)
    viewer.screenshot(canvas_only=True, flash=False)
    assert 0 < slide.data[0].pixels_read < 4096 * 4096 // 8


@pytest.mark.slow
def test_widget_counts_a_small_image_and_the_table_drives_the_view(make_napari_viewer, qtbot, tiny_bundle,
                                                                     tmp_path):
    from PIL import Image
    viewer = make_napari_viewer(show=True)
    pixels = np.asarray(Image.open(DATA / "dsb_fluo.png"))[:128, :160]
    viewer.add_image(pixels, name="field", translate=(1000, 2000))   # results must land on the image
    widget = CellsegWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.image_combo.currentText() == "field" and widget.region_combo.currentText() == WHOLE_IMAGE
    widget.protocol_combo.setCurrentText("fluorescence-nuclei")
    widget.device_combo.setCurrentText("cpu")
    widget.model_edit.setText(str(tiny_bundle))
    widget.output_edit.setText(str(tmp_path / "field.cellseg"))

    worker = widget.run()
    assert worker is not None and widget.cancel_button.isEnabled() and not widget.run_button.isEnabled()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)    # the GUI kept processing events
    assert widget.status.text().startswith(f"{len(viewer.layers['field cells'].data)} cells"), \
        widget.status.text()
    assert widget.progress_bar.value() == widget.progress_bar.maximum() == 1
    labels, points = viewer.layers["field labels"], viewer.layers["field cells"]
    assert labels.data.shape == (128, 160) and labels.data.dtype == np.uint32 and labels.data.max() > 0
    assert tuple(labels.translate) == tuple(points.translate) == (1000, 2000)
    assert (tmp_path / "field.cellseg" / "cells.csv").is_file()

    # the table shows the cells; selecting a row centres the view on that cell
    assert widget.cells_combo.currentData() is points
    assert widget.model.rowCount() == len(points.data) > 1
    last = widget.model.rowCount() - 1
    widget.select_row(last)
    cell = points.features.iloc[widget.model.position(last)]
    expected = (1000 + cell["centroid_row_px"], 2000 + cell["centroid_col_px"])
    assert np.allclose(camera(viewer).center[-2:], expected)
    assert points.selected_data == {widget.model.position(last)}
    widget.select_row(0)
    assert not np.allclose(camera(viewer).center[-2:], expected) or len(points.data) == 1

    # filtering hides points and rows; colouring by a column colours the labels too
    widget.filter_column.setCurrentText("area_px")
    median = float(np.median(points.features["area_px"]))
    widget.filter_min.setText(str(median))
    widget.filter_min.editingFinished.emit()
    assert widget.model.rowCount() == int((points.features["area_px"] >= median).sum()) == int(points.shown.sum())
    widget.color_combo.setCurrentText("area_px")
    assert len(np.unique(points.face_color, axis=0)) > 1
    assert labels.colormap.__class__.__name__ == "DirectLabelColormap"

    # the screenshot shows the labels: many distinct colours where the cells are, not a black frame
    widget.color_combo.setCurrentText("(one colour)")
    viewer.layers["field"].visible = False
    points.visible = False
    labels.opacity = 1.0
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    rgb = shot[..., :3].reshape(-1, 3)
    assert (rgb.max(axis=1) > 40).mean() > 0.05
    assert len(np.unique(rgb, axis=0)) > 20


@pytest.mark.slow
def test_widget_counts_a_drawn_rectangle_and_can_cancel(make_napari_viewer, qtbot, tiny_bundle, tmp_path):
    viewer = make_napari_viewer()
    slide, = viewer.open(EXAMPLES / "he_mosaic.ome.tif", plugin=PLUGIN)
    shapes = viewer.add_shapes([[[300, 400], [300, 520], [400, 520], [400, 400]]], shape_type="rectangle",
                               name="roi")
    widget = CellsegWidget(viewer)
    widget.image_combo.setCurrentIndex(widget.image_combo.findText(slide.name))
    widget.region_combo.setCurrentIndex(widget.region_combo.findText("roi"))
    widget.protocol_combo.setCurrentText("he-nuclei")
    widget.device_combo.setCurrentText("cpu")
    widget.model_edit.setText(str(tiny_bundle))
    request = widget.request()
    assert request.slide == EXAMPLES / "he_mosaic.ome.tif" and tuple(request.region) == (300, 400, 401, 521)

    widget.output_edit.setText(str(tmp_path / "roi.cellseg"))
    widget.run()
    widget.cancel()                    # stops at the first batch: nothing written, the widget ready again
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert "cancelled" in widget.status.text() and widget.run_button.isEnabled()
    assert not (tmp_path / "roi.cellseg").exists()
    assert [layer.name for layer in viewer.layers] == [slide.name, shapes.name]

    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    cells = viewer.layers["roi cells"]
    assert tuple(cells.translate) == (300, 400)
    assert len(cells.data) and (cells.data >= 0).all() and (cells.data <= (101, 121)).all()   # crop pixels
    grown, labels = viewer.layers["roi cell labels"], viewer.layers["roi labels"]   # he-nuclei grows cells
    assert tuple(grown.translate) == (300, 400) and grown.data.shape == labels.data.shape == (101, 121)
    widget.color_combo.setCurrentText("cell_area_um2")    # colours the nuclei and their cells alike
    assert type(grown.colormap).__name__ == type(labels.colormap).__name__ == "DirectLabelColormap"
    same = grown.colormap.color_dict, labels.colormap.color_dict
    assert same[0].keys() == same[1].keys() and all(np.allclose(same[0][k], same[1][k]) for k in same[0])
    # a user mistake is one line in the widget, not a traceback
    widget.device_combo.setCurrentText("cuda")
    import torch
    if not torch.cuda.is_available():
        widget.run()
        qtbot.waitUntil(lambda: widget.worker is None, timeout=30_000)
        assert "CUDA" in widget.status.text()
    shutil.rmtree(tmp_path / "roi.cellseg")


@pytest.mark.slow
def test_widget_is_discovered_by_napari(make_napari_viewer):
    viewer = make_napari_viewer()
    dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Count cells")
    assert isinstance(widget, CellsegWidget)
    assert widget.protocol_combo.count() >= 2


@pytest.mark.slow
def test_regions_open_as_shapes_and_are_counted_in_and_saved(make_napari_viewer, tmp_path):
    from cellseg.planning import load_regions
    viewer = make_napari_viewer()
    slide, = viewer.open(EXAMPLES / "he_mosaic.ome.tif", plugin=PLUGIN)
    widget = CellsegWidget(viewer)
    regions, = viewer.open(DATA / "qupath_annotations.geojson", plugin=PLUGIN)
    assert type(regions).__name__ == "Shapes" and len(regions.data) == 3        # two regions and a hole
    assert widget.regions_combo.currentText() == regions.name                   # an opened regions file is chosen
    widget.image_combo.setCurrentIndex(widget.image_combo.findText(slide.name))
    request = widget.request()
    assert request.region is None
    assert [f["properties"]["name"] for f in request.regions["features"]] == ["Tumor core", "Stroma"]
    saved = widget.save_regions(tmp_path / "saved.geojson")
    assert load_regions(saved).names == ("Tumor core", "Stroma")
    assert load_regions(saved).geometries[0].equals(load_regions(DATA / "qupath_annotations.geojson").geometries[0])
    # a shape drawn in napari is a region too
    viewer.add_shapes([[[10, 10], [10, 60], [40, 60], [40, 10]]], shape_type="rectangle", name="drawn")
    widget.regions_combo.setCurrentIndex(widget.regions_combo.findText("drawn"))
    [feature] = widget.request().regions["features"]
    assert feature["geometry"]["coordinates"][0][0] == [10.5, 10.5]


def _nucleus_alone_on_its_column(labels: np.ndarray) -> tuple[int, np.ndarray]:
    """A nucleus inside the field that a vertical line through its centre, from just above it to just below it,
    crosses alone: (its id, that line in the field's pixels)."""
    from skimage.measure import regionprops
    for region in sorted(regionprops(labels.astype(np.int32)), key=lambda r: -r.area):
        r0, c0, r1, c1 = region.bbox
        col = int(round(region.centroid[1]))
        if r0 < 2 or c0 < 1 or r1 > labels.shape[0] - 2 or c1 > labels.shape[1] - 1 or region.area < 30:
            continue
        column = labels[r0 - 1:r1 + 1, col]
        if set(np.unique(column)) == {0, region.label} and column[0] == column[-1] == 0:
            return region.label, np.array([[r0 - 1.0, col], [r1 + 0.0, col]])
    raise AssertionError("no nucleus to split in the field")


@pytest.mark.slow
def test_correct_export_train_and_recount_without_leaving_napari(make_napari_viewer, qtbot, he_result, tiny_bundle,
                                                                 tmp_path):
    """Issue 49 item 4: open a result, correct two fields (paint, erase, split, merge, delete), export them as COCO
    (decoded, it is the painted labels: item 6), fine-tune from the Count tab's model with a progress bar, recount
    with the new bundle: all in the viewer."""
    import json

    from PIL import Image
    from skimage.segmentation import relabel_sequential

    from cellseg.bundles import load_bundle

    from .coco_labels import decoded_labels
    viewer = make_napari_viewer(show=True)
    layers = viewer.open(he_result, plugin=PLUGIN)
    slide, result_labels = layers[0], viewer.layers["he_mosaic labels"]
    widget = CellsegWidget(viewer)
    viewer.window.add_dock_widget(widget)
    panel = widget.correct
    widget.tabs.setCurrentWidget(panel)
    # two fields of 160 x 200 px, where the nuclei are many (the fine-tune holds a band of each out to check it)
    fields = viewer.add_shapes([[[360, 40], [360, 239], [519, 239], [519, 40]],
                                [[680, 120], [680, 319], [839, 319], [839, 120]]], shape_type="rectangle",
                               name="fields")
    widget.image_combo.setCurrentIndex(widget.image_combo.findText(slide.name))
    panel.fields_combo.setCurrentIndex(panel.fields_combo.findText(fields.name))
    assert panel.labels_combo.currentText() == result_labels.name        # the result's nuclei, to start from

    # edit: one editable Labels layer per field, the result's nuclei copied in, placed on the slide
    first, second = panel.edit_fields()
    assert [layer.name for layer in panel.correction_layers()] == ["he_mosaic field 1", "he_mosaic field 2"]
    level0 = np.asarray(result_labels.data[0][360:520, 40:240])
    assert np.array_equal(first.data, level0) and first.data.dtype == np.uint32
    assert tuple(first.translate) == (360, 40) and tuple(second.translate) == (680, 120)
    assert viewer.layers.selection.active is first and first.mode == "paint"
    lines = panel.lines_layer()
    assert lines is not None and lines.name == "edit lines"

    # split a nucleus along a line drawn across it
    target, cut = _nucleus_alone_on_its_column(first.data)
    before_max = int(first.data.max())
    lines.add_lines(cut + (360, 40))                                      # world = field pixels + its place
    assert panel.split(), panel.status.text()
    assert set(np.unique(first.data[first.data > before_max])) == {before_max + 1}
    assert (first.data == target).any() and len(lines.data) == 0          # the line is used up
    # merge the two nuclei a line joins, delete the picked one, and undo / redo like any brush stroke
    ids = [int(v) for v in np.unique(first.data) if v and v != target and v <= before_max]
    a, b = ids[0], ids[1]
    ca, cb = (np.argwhere(first.data == k).mean(0) for k in (a, b))
    crossed = [int(v) for v in np.unique(first.data[[int(round(t)) for t in np.linspace(ca[0], cb[0], 50)],
                                                    [int(round(t)) for t in np.linspace(ca[1], cb[1], 50)]]) if v]
    lines.add_lines(np.array([ca, cb]) + (360, 40))
    assert panel.merge(), panel.status.text()
    survivor = int(first.data[tuple(np.round(ca).astype(int))])
    assert all(not (first.data == k).any() for k in crossed if k != survivor) and (first.data == survivor).any()
    deleted = ids[-1]
    first.selected_label = deleted
    assert panel.delete() and not (first.data == deleted).any()
    first.undo()
    assert (first.data == deleted).any()
    first.redo()
    assert not (first.data == deleted).any()
    # paint a nucleus the count missed and erase part of another, with napari's own brush
    second.brush_size = 7
    new_id = int(second.data.max()) + 1
    second.paint((40, 50), new_id)
    second.paint((10, 10), 0)
    assert (second.data == new_id).sum() > 20

    # export: COCO + crops; decoded, each field is its painted labels
    panel.export_edit.setText(str(tmp_path / "corrections"))
    exported = panel.export()
    assert exported is not None and exported.fields == 2, panel.status.text()
    decoded = decoded_labels(exported.annotations)
    for layer, (name, labels) in zip((first, second), decoded.items()):
        assert name == f"images/{layer.name.replace(' ', '_')}.png"
        assert np.array_equal(labels, relabel_sequential(np.asarray(layer.data).astype(np.int64))[0]), name
    crop = np.asarray(Image.open(tmp_path / "corrections" / "images" / "he_mosaic_field_2.png"))
    assert np.array_equal(crop, np.asarray(slide.data[0][680:840, 120:320]))          # the slide's pixels

    # train: fine-tune the Count tab's model on them, in a child process, with a progress bar
    widget.protocol_combo.setCurrentText("he-nuclei")
    widget.device_combo.setCurrentText("cpu")
    widget.model_edit.setText(str(tiny_bundle))
    panel.steps_spin.setValue(1)
    panel.options_edit.setText("--crop 64 --batch-size 1")
    steps = []
    panel._signals.progress.connect(lambda what, done, total: steps.append((what, done, total)))
    worker = panel.train()
    assert worker is not None and panel.train_cancel_button.isEnabled() and not panel.train_button.isEnabled()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=900_000)
    outcome = panel.outcome
    assert outcome is not None and outcome.usable, (panel.status.text(), outcome and outcome.output[-8:])
    assert ("train", 1, 1) in steps and panel.train_progress.maximum() == panel.train_progress.value() == 1
    assert outcome.bundle == tmp_path / "corrections" / "bundle" and (outcome.bundle / "model.toml").is_file()
    assert "--init" in outcome.command and str(tiny_bundle) in outcome.command
    assert panel.recount_button.isEnabled() and panel.train_button.isEnabled()

    # recount the slide's second field with the new bundle: new layers on the slide
    widget.region_combo.setCurrentIndex(widget.region_combo.findText(fields.name))     # its last rectangle
    assert panel.recount() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=300_000)
    recounted = viewer.layers["he_mosaic-retrained labels"]
    assert tuple(recounted.translate) == (680, 120) and recounted.data.shape == (160, 200)
    assert "he_mosaic-retrained cells" in viewer.layers
    run = json.loads((outcome.bundle / "recount" / "he_mosaic-retrained.cellseg" / "run.json").read_text())
    assert run["model"]["weights_sha256"] == load_bundle(outcome.bundle).weights_sha256


@pytest.mark.slow
def test_the_image_box_never_switches_to_a_results_tissue_mask(make_napari_viewer, he_result):
    """A result's tissue mask (added after a count, or opened with the result) is not what to count: chosen, the next
    count, Edit fields and Recount would take it for the slide."""
    viewer = make_napari_viewer()
    field = viewer.add_image(np.zeros((64, 64), np.uint8), name="field")
    widget = CellsegWidget(viewer)
    viewer.add_image(np.ones((8, 8), np.uint8), name="field tissue",       # as _on_done adds it
                     metadata={"cellseg": {"kind": "tissue", "result": "/results/field.cellseg"}})
    assert widget.image_combo.currentData() is field
    slide, tissue, *_ = viewer.open(he_result, plugin=PLUGIN)
    assert tissue.name == "he_mosaic tissue" and widget.image_combo.currentData() is slide   # a newly opened slide is chosen


@pytest.mark.slow
def test_colour_by_colours_the_labels_of_its_own_result_only(make_napari_viewer, he_result):
    """A count into the same Results folder again leaves the earlier result's layers, with the same folder in their
    metadata: colouring the new cells must leave the old labels alone."""
    viewer = make_napari_viewer()
    widget = CellsegWidget(viewer)
    old = viewer.open(he_result, plugin=PLUGIN)
    new = viewer.open(he_result, plugin=PLUGIN)
    assert widget.cells_combo.currentData() is new[-1]
    widget.color_combo.setCurrentText("area_px")
    assert [type(layer.colormap).__name__ for layer in new[2:4]] == ["DirectLabelColormap"] * 2
    assert [type(layer.colormap).__name__ for layer in old[2:4]] != ["DirectLabelColormap"] * 2


@pytest.mark.slow
def test_a_cancel_and_a_mistake_found_by_the_worker_are_one_plain_line(make_napari_viewer, qtbot, tmp_path):
    """superqt raises an exception the worker returns: the widget's own messages, not "error: Cancelled: ..."."""
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((64, 80), np.uint8), name="field")
    widget = CellsegWidget(viewer)
    widget.device_combo.setCurrentText("cpu")
    widget.model_edit.setText(str(tmp_path / "no-bundle"))
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    text = widget.status.text()
    assert "no-bundle" in text and not text.startswith("error:") and "\n" not in text, text
    widget.model_edit.setText("")
    widget.run()
    widget.cancel()                    # seen before the model loads
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget.status.text() == "cancelled; nothing was written"


def test_a_renamed_layer_is_shown_by_its_new_name(make_napari_viewer):
    viewer = make_napari_viewer()
    before = viewer.add_image(np.zeros((32, 32), np.uint8), name="he_patch")
    widget = CellsegWidget(viewer)
    after = viewer.add_image(np.zeros((32, 32), np.uint8), name="second")
    before.name, after.name = "my slide", "my other slide"
    names = [widget.image_combo.itemText(i) for i in range(widget.image_combo.count())]
    assert names == ["my slide", "my other slide"] and widget.image_combo.currentText() == "my other slide"
    viewer.add_labels(np.zeros((32, 32), np.uint32), name="nuclei").name = "corrected nuclei"
    panel = widget.correct
    assert "corrected nuclei" in [panel.labels_combo.itemText(i) for i in range(panel.labels_combo.count())]


def test_the_pixel_size_field_gives_an_image_without_one_its_pixel_size(make_napari_viewer, qtbot):
    """H&E's protocol needs a pixel size, which an array (or a PNG) does not carry: the form's field gives it, and
    the message asking for one names the field, not the command line's --mpp."""
    viewer = make_napari_viewer()
    viewer.add_image(np.full((64, 80, 3), 200, np.uint8), name="he field", rgb=True)
    widget = CellsegWidget(viewer)
    widget.protocol_combo.setCurrentText("he-nuclei")
    widget.device_combo.setCurrentText("cpu")
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    text = widget.status.text()
    assert "needs the pixel size" in text and "Pixel size (µm/px)" in text and "--mpp" not in text, text
    widget.mpp_edit.setText("0.25")
    assert widget.request().mpp == 0.25
    widget.mpp_edit.setText("quarter")
    with pytest.raises(CellsegError, match="expected a pixel size in µm/px"):
        widget.request()


def test_a_stack_from_napari_s_own_reader_is_counted_at_the_plane_on_screen(make_napari_viewer):
    """A Z-stack layer (not cellseg's reader: an array) gives the widget the plane the viewer shows, as --z would."""
    viewer = make_napari_viewer()
    stack = np.stack([np.full((64, 80), 10 * k, np.uint8) for k in range(4)])
    viewer.add_image(stack, name="confocal")
    viewer.dims.set_current_step(0, 2)
    request = CellsegWidget(viewer).request()
    assert (request.name, request.shape, request.extra, request.n_channels) == ("confocal_2", (64, 80), {"plane": [2]},
                                                                                1)
    assert np.all(request.read(Box(0, 0, 64, 80)) == 20)


def test_a_position_of_a_multi_position_file_is_counted_as_that_image(make_napari_viewer, tmp_path):
    import tifffile
    path = tmp_path / "plate.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        for k in range(3):
            tw.write(np.full((64, 80), 10 * k, np.uint8), metadata={"axes": "YX", "Name": f"pos{k}"})
    viewer = make_napari_viewer()
    layers = viewer.open(path, plugin=PLUGIN)
    assert [(layer.name, layer.visible) for layer in layers] == [("plate #0", True), ("plate #1", False),
                                                                 ("plate #2", False)]
    widget = CellsegWidget(viewer)
    widget.image_combo.setCurrentIndex(widget.image_combo.findText("plate #2"))
    request = widget.request()
    assert (request.slide, request.series) == (path, 2)


@pytest.mark.slow
def test_correct_panel_messages_are_plain(make_napari_viewer, qtbot, tmp_path):
    """A training refused in the worker is its one line (not "error: CellsegError: ..."); scales read as numbers."""
    from cellseg_napari._export import Exported
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((64, 64), np.uint8), name="field")
    viewer.add_labels(np.zeros((32, 32), np.uint32), name="coarse", scale=(2, 2))
    widget = CellsegWidget(viewer)
    panel = widget.correct
    panel.labels_combo.setCurrentIndex(panel.labels_combo.findText("coarse"))
    assert panel.edit_fields() == []
    assert panel.status.text().endswith("got scales 2 x 2 and 1 x 1"), panel.status.text()

    annotations = tmp_path / "corrections" / "annotations.json"
    annotations.parent.mkdir()
    annotations.write_text("{}")
    panel.exported = Exported(annotations, 1, 1)
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "model.toml").write_text("")
    panel.bundle_edit.setText(str(tmp_path / "bundle"))
    assert panel.train() is not None
    qtbot.waitUntil(lambda: panel.worker is None, timeout=30_000)
    assert panel.status.text().startswith("expected a new or empty folder for the trained bundle"), \
        panel.status.text()


@pytest.mark.slow
def test_closing_the_viewer_stops_a_count_and_a_training(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    """A count (or training) left running after its viewer closed keeps its thread, writes its result, and napari's
    quit waits for it: the widget's teardown sets the cancel flags."""
    import time

    from cellseg_napari import _correct_widget, _widget
    from cellseg_napari._export import Exported
    from cellseg_napari._run import Cancelled
    stopped = []

    def slow(what):                                  # 15 s unless cancelled
        def run(request, progress, cancel):
            for k in range(1500):
                if cancel.is_set():
                    stopped.append(what)
                    raise Cancelled("cancelled by the user; no result was written")
                if what == "count":
                    progress(k, 1500)
                time.sleep(0.01)
            raise AssertionError("not cancelled")
        return run

    monkeypatch.setattr(_widget, "run_count", slow("count"))
    monkeypatch.setattr(_correct_widget, "run_training", slow("training"))
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((64, 64), np.uint8), name="field")
    widget = CellsegWidget(viewer)
    viewer.window.add_dock_widget(widget)
    worker = widget.run()
    annotations = tmp_path / "annotations.json"
    annotations.write_text("{}")
    widget.correct.exported = Exported(annotations, 1, 1)
    training = widget.correct.train()
    qtbot.waitUntil(lambda: widget.progress_bar.value() > 0, timeout=10_000)
    with qtbot.waitSignals([worker.finished, training.finished], timeout=10_000):
        viewer.close()
    assert sorted(stopped) == ["count", "training"]
