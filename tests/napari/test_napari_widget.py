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
