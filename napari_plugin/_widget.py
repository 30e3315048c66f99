"""The dock widget: count cells on an image layer (or a drawn rectangle of it, or inside drawn or opened regions),
then browse the cells.

A thin shell: the run is `_run.run_count` (the CLI's CellCounter) in a napari thread worker, the layers come
from `_layers.result_layer_data`, filtering and colours from `_logic`. Everything here is wiring.
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path

import numpy as np
from qtpy.QtCore import QObject, Qt, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QApplication,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QTableView,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from cellseg.errors import CellsegError

from . import _logic, _regions
from ._layers import load_result, result_layer_data
from ._qtable import CellsTableModel
from ._qtparts import fill_combo, follow_layer_names, with_browse
from ._run import Cancelled, CountRequest, Failed, run_count

log = logging.getLogger(__name__)

WHOLE_IMAGE = "(whole image)"
NO_REGIONS = "(none)"
NO_COLOR = "(one colour)"
POINT_COLOR = "yellow"


class _Progress(QObject):
    """Carries (done, total) from the worker thread to the GUI thread (a queued connection)."""

    tiles = Signal(int, int)


class CellsegWidget(QWidget):
    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.worker = None
        self._cancel = threading.Event()       # one flag, cleared at each start: the teardown below holds it
        # closing the viewer (or this dock) mid-count stops the count, which removes its half-written output; the
        # last window closing comes first, as napari then waits for every worker before it quits
        self.destroyed.connect(self._cancel.set)
        QApplication.instance().lastWindowClosed.connect(self._cancel.set)
        self._progress = _Progress()
        self._progress.tiles.connect(self._on_progress)
        self._original_colormaps: dict[int, object] = {}

        # ---- count
        self.image_combo = QComboBox()
        self.region_combo = QComboBox()
        self.region_combo.setToolTip("Count only the selected (or last) shape of a Shapes layer: its bounding box")
        self.regions_combo = QComboBox()
        self.regions_combo.setToolTip("Count only nuclei inside the shapes of a Shapes layer (polygons, rectangles, "
                                      "ellipses; an opened QuPath annotations file), as cellseg count --regions")
        self.save_regions_button = QPushButton("Save…")
        self.save_regions_button.setToolTip("Save the regions layer's shapes as GeoJSON (QuPath: File > Import "
                                            "objects)")
        self.protocol_combo = QComboBox()
        from cellseg.planning import list_protocols
        self.protocol_combo.addItems(list_protocols())
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda"])
        self.model_edit = QLineEdit()
        self.model_edit.setPlaceholderText("the protocol's model")
        self.mpp_edit = QLineEdit()
        self.mpp_edit.setPlaceholderText("the image's own")
        self.mpp_edit.setToolTip("Pixel size in µm/px, as cellseg count --mpp: for an image that records none (a PNG, "
                                 "a JPEG, an array) or records a wrong one. H&E's protocol needs one.")
        self.output_edit = QLineEdit()
        self.output_edit.setPlaceholderText("a temporary folder")
        self.run_button = QPushButton("Count cells")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress_bar = QProgressBar()
        self.progress_bar.setFormat("%v / %m tiles")
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Region", self.region_combo)
        regions_row = QHBoxLayout()
        regions_row.addWidget(self.regions_combo, 1)
        regions_row.addWidget(self.save_regions_button)
        form.addRow("Regions", regions_row)
        form.addRow("Protocol", self.protocol_combo)
        form.addRow("Pixel size (µm/px)", self.mpp_edit)
        form.addRow("Device", self.device_combo)
        form.addRow("Model", with_browse(self.model_edit, self, "Model bundle folder"))
        form.addRow("Results", with_browse(self.output_edit, self, "Result folder"))
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        count_box = QGroupBox("Count")
        count_layout = QVBoxLayout(count_box)
        count_layout.addLayout(form)
        count_layout.addLayout(buttons)
        count_layout.addWidget(self.progress_bar)
        count_layout.addWidget(self.status)

        # ---- cells
        self.cells_combo = QComboBox()
        self.color_combo = QComboBox()
        self.filter_column = QComboBox()
        self.filter_min = QLineEdit()
        self.filter_min.setPlaceholderText("min")
        self.filter_max = QLineEdit()
        self.filter_max.setPlaceholderText("max")
        self.summary = QLabel("")
        self.model = CellsTableModel(self)
        self.table = QTableView()
        self.table.setModel(self.model)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setSortingEnabled(True)
        self.table.setHorizontalScrollMode(QAbstractItemView.ScrollMode.ScrollPerPixel)
        self.table.verticalHeader().setDefaultSectionSize(20)
        filter_row = QHBoxLayout()
        filter_row.addWidget(self.filter_column, 2)
        filter_row.addWidget(self.filter_min, 1)
        filter_row.addWidget(self.filter_max, 1)
        cells_form = QFormLayout()
        cells_form.addRow("Cells", self.cells_combo)
        cells_form.addRow("Colour by", self.color_combo)
        cells_form.addRow("Filter", filter_row)
        cells_box = QGroupBox("Cells")
        cells_layout = QVBoxLayout(cells_box)
        cells_layout.addLayout(cells_form)
        cells_layout.addWidget(self.summary)
        cells_layout.addWidget(self.table)

        # ---- correct, train, recount (its own tab: _correct_widget)
        from ._correct_widget import CorrectPanel
        self.correct = CorrectPanel(self)
        self.tabs = QTabWidget()
        self.tabs.addTab(count_box, "Count")
        self.tabs.addTab(self.correct, "Correct && train")

        layout = QVBoxLayout(self)
        layout.addWidget(self.tabs)
        layout.addWidget(cells_box, 1)

        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.save_regions_button.clicked.connect(self._save_regions_dialog)
        self.cells_combo.currentIndexChanged.connect(self._show_cells)
        self.color_combo.currentIndexChanged.connect(self._apply_colors)
        self.filter_column.currentIndexChanged.connect(self._apply_filter)
        self.filter_min.editingFinished.connect(self._apply_filter)
        self.filter_max.editingFinished.connect(self._apply_filter)
        self.table.selectionModel().currentRowChanged.connect(self._on_row)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed,
                      napari_viewer.layers.events.moved):
            event.connect(self._refresh_layers)
        follow_layer_names(napari_viewer, self._refresh_layers)
        self._refresh_layers()

    # ------------------------------------------------------------------ layer lists

    def _layers_of(self, kind: str) -> list:
        from napari.layers import Image, Points, Shapes
        if kind == "image":
            return [layer for layer in self.viewer.layers if isinstance(layer, Image)]
        if kind == "shapes":
            return [layer for layer in self.viewer.layers if isinstance(layer, Shapes)]
        return [layer for layer in self.viewer.layers if isinstance(layer, Points)
                and layer.metadata.get("cellseg", {}).get("kind") == "cells"]

    def _refresh_layers(self, event=None) -> None:
        inserted = getattr(event, "type", None) == "inserted"
        new = getattr(event, "value", None) if inserted else None
        # a new slide or image is chosen, never a result's own layer (its tissue mask): that is not what to count
        fill_combo(self.image_combo, self._layers_of("image"), prefer=None if _of_a_result(new) else new)
        fill_combo(self.region_combo, self._layers_of("shapes"), first=WHOLE_IMAGE, prefer=None)
        opened = new if getattr(new, "metadata", {}).get("cellseg", {}).get("kind") == "regions" else None
        fill_combo(self.regions_combo, self._layers_of("shapes"), first=NO_REGIONS, prefer=opened)
        fill_combo(self.cells_combo, self._layers_of("cells"), prefer=new)

    def _current(self, combo: QComboBox):
        layer = combo.currentData()
        return layer if layer is not None and layer in self.viewer.layers else None

    # ------------------------------------------------------------------ count

    def request(self) -> CountRequest:
        """What the form asks for, as a CountRequest (CellsegError when it cannot be counted)."""
        image = self._current(self.image_combo)
        if image is None:
            raise CellsegError("expected an image layer to count, found none (open a slide first)")
        meta = image.metadata.get("cellseg", {})
        # a stack (Z, time) from napari's own reader: the plane on screen
        level0, plane = _logic.displayed_plane(image.data[0] if image.multiscale else image.data, image.rgb,
                                               image.world_to_data(self.viewer.dims.point))
        shape = tuple(int(n) for n in level0.shape[:2])
        output = self.output_edit.text().strip()
        request = CountRequest(slide=None, protocol=self.protocol_combo.currentText(),
                               device=self.device_combo.currentText(), model=self.model_edit.text().strip() or None,
                               output=Path(output) if output else None,
                               name=image.name + "".join(f"_{k}" for k in plane),
                               mpp=_pixel_size(self.mpp_edit.text()),
                               extra={"plane": list(plane)} if plane else {})
        if meta.get("kind") == "slide" and meta.get("path") and Path(meta["path"]).is_file():
            request.slide = Path(meta["path"])
            request.channel = meta.get("channel")
            request.series = meta.get("series")      # a position of a multi-image file
        else:
            request.read = _logic.array_reader(level0)
            request.shape = shape
            request.n_channels = 3 if image.rgb else 1
            request.dtype = str(level0.dtype)
        shapes = self._current(self.region_combo)
        if shapes is not None:
            if not len(shapes.data):
                raise CellsegError(f"expected a rectangle in the Shapes layer {shapes.name!r}, found no shapes")
            chosen = sorted(shapes.selected_data)[-1] if shapes.selected_data else len(shapes.data) - 1
            vertices = np.array([image.world_to_data(shapes.data_to_world(v)) for v in shapes.data[chosen]])
            request.region = _logic.region_box(vertices, shape)
        regions = self._current(self.regions_combo)
        if regions is not None:
            request.regions = self.regions_geojson(regions, image)
        return request

    def regions_geojson(self, shapes, image) -> dict:
        """The shapes of a Shapes layer as GeoJSON regions in `image`'s pixels (a file's regions as they were: its
        holes and parts, drawn as shapes of their own, put back together by _regions.shapes_to_geojson)."""
        features = shapes.features
        names = list(features["name"]) if "name" in features else [None] * len(shapes.data)
        data = [np.array([image.world_to_data(shapes.data_to_world(v)) for v in vertices]) for vertices in shapes.data]
        return _regions.shapes_to_geojson(data, list(shapes.shape_type), names)

    def save_regions(self, path) -> Path | None:
        """Write the chosen regions layer to `path` as GeoJSON (in the chosen image's pixels)."""
        import json
        shapes, image = self._current(self.regions_combo), self._current(self.image_combo)
        if shapes is None or image is None:
            self._say("expected an image and a Shapes layer of regions, found none", error=True)
            return None
        try:
            geojson = self.regions_geojson(shapes, image)
        except CellsegError as e:
            self._say(str(e), error=True)
            return None
        Path(path).write_text(json.dumps(geojson, indent=1), encoding="utf-8")
        self._say(f"regions saved to {path}")
        return Path(path)

    def _save_regions_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save regions as GeoJSON", str(Path.home() / "regions.geojson"),
                                              "GeoJSON (*.geojson)")
        if path:
            self.save_regions(path)

    def run(self, model: str | None = None, output: Path | None = None):
        """Start a count in a worker thread; returns the worker (None when the form is incomplete).

        model, output: instead of the form's (the Correct & train tab's recount with a new bundle)."""
        from napari.qt.threading import create_worker

        if self.worker is not None:
            return self.worker
        try:
            request = self.request()
        except CellsegError as e:
            self._say(str(e), error=True)
            return None
        request.model = model or request.model
        request.output = Path(output) if output is not None else request.output
        image = self._current(self.image_combo)
        self._placement = (tuple(image.scale), tuple(image.translate))
        self._cancel.clear()
        self.progress_bar.setRange(0, 0)       # busy until the first tile count arrives
        self._say(f"counting {request.name} ({request.protocol}, {request.device})…")
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.worker = create_worker(_count, request, self._progress.tiles.emit, self._cancel,
                                    _start_thread=False, _connect={"returned": self._on_done,
                                                                   "errored": self._on_error,
                                                                   "finished": self._on_finished})
        self.worker.start()
        return self.worker

    def cancel(self) -> None:
        if self.worker is not None:
            self._cancel.set()
            self._say("cancelling after the current batch of tiles…")

    def _on_progress(self, done: int, total: int) -> None:
        self.progress_bar.setRange(0, total)
        self.progress_bar.setValue(done)

    def _on_done(self, outcome) -> None:
        if isinstance(outcome, Failed):
            cancelled = isinstance(outcome.error, Cancelled)
            # the count's own words name its command-line option; here it is a field of the form
            text = str(outcome.error).replace("pass --mpp", "give it in Pixel size (µm/px)")
            self._say("cancelled; nothing was written" if cancelled else text, error=not cancelled)
            return
        folder = outcome
        result = load_result(folder)
        scale, translate = self._placement
        layers = result_layer_data(folder, with_slide=False, translate=result.offset)
        for data, kwargs, layer_type in layers:
            kwargs = _logic.place_on_image(kwargs, scale, translate)
            getattr(self.viewer, f"add_{layer_type}")(data, **kwargs)
        n = len(layers[-1][0])
        # the count with its interval and warnings (summary.json), as report.html gives them
        self._say(_logic.count_message(result.summary, n, folder), error=bool(result.summary.get("warnings")))

    def _on_error(self, exc: Exception) -> None:
        self._say(f"error: {type(exc).__name__}: {exc}", error=True)

    def _on_finished(self) -> None:
        self.worker = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        if self.progress_bar.maximum() == 0:
            self.progress_bar.setRange(0, 1)

    def _say(self, text: str, error: bool = False) -> None:
        self.status.setText(text)
        self.status.setStyleSheet("color: #e0584f" if error else "")
        (log.warning if error else log.info)("%s", text)

    # ------------------------------------------------------------------ table

    def cells_layer(self):
        return self._current(self.cells_combo)

    def _show_cells(self, *_) -> None:
        layer = self.cells_layer()
        cells = layer.features if layer is not None else None
        columns = list(cells.columns) if cells is not None else []
        numeric = _logic.numeric_columns(cells) if cells is not None else []
        for combo, items, first in ((self.color_combo, columns, NO_COLOR), (self.filter_column, numeric, None)):
            combo.blockSignals(True)
            combo.clear()
            if first:
                combo.addItem(first)
            combo.addItems(items)
            combo.blockSignals(False)
        self.model.set_cells(cells)
        self.table.resizeColumnsToContents()
        self._update_summary()

    def _update_summary(self) -> None:
        layer = self.cells_layer()
        if layer is None:
            self.summary.setText("")
            return
        result = layer.metadata.get("cellseg", {}).get("result", "")
        self.summary.setText(f"{len(self.model.positions)} of {len(layer.features)} cells · {Path(result).name}")

    def _apply_filter(self, *_) -> None:
        layer = self.cells_layer()
        if layer is None:
            return
        try:
            low, high = (float(e.text()) if e.text().strip() else None for e in (self.filter_min, self.filter_max))
        except ValueError:
            self._say("expected numbers for the filter's min and max", error=True)
            return
        column = self.filter_column.currentText() or None
        positions = _logic.filter_rows(layer.features, column, low, high)
        self.model.set_positions(positions)
        shown = np.zeros(len(layer.data), bool)
        shown[positions] = True
        layer.shown = shown
        self._update_summary()

    def _apply_colors(self, *_) -> None:
        layer = self.cells_layer()
        if layer is None:
            return
        column = self.color_combo.currentText()
        labels_layers = self._labels_for(layer)
        if column in ("", NO_COLOR):
            layer.face_color = POINT_COLOR
            for labels in labels_layers:
                if id(labels) in self._original_colormaps:
                    labels.colormap = self._original_colormaps[id(labels)]
            return
        colors, limits = _logic.colors_by_column(layer.features, column)
        layer.face_color = colors
        if labels_layers:
            from napari.utils.colormaps import DirectLabelColormap
            color_dict = _logic.label_color_dict(layer.features["cell_id"], colors)
            for labels in labels_layers:     # the nuclei and the cells grown from them: the same ids
                self._original_colormaps.setdefault(id(labels), labels.colormap)
                labels.colormap = DirectLabelColormap(color_dict=color_dict)
        if limits:
            self._say(f"{column}: {limits[0]:.4g} (dark) … {limits[1]:.4g} (bright)")
        current = self.table.currentIndex()
        self.table.scrollTo(self.model.index(max(current.row(), 0), list(layer.features.columns).index(column)))

    def _labels_for(self, cells_layer) -> list:
        """The Labels layers (nuclei, and cells when grown) of the result a cells layer came from: the same opening
        of it (result_id), as a count into the same folder again leaves the earlier result's layers in the viewer."""
        from napari.layers import Labels
        meta = cells_layer.metadata.get("cellseg", {})
        key = (meta.get("result"), meta.get("result_id"))
        return [layer for layer in self.viewer.layers if isinstance(layer, Labels)
                and (layer.metadata.get("cellseg", {}).get("result"),
                     layer.metadata.get("cellseg", {}).get("result_id")) == key]

    def select_row(self, row: int) -> None:
        """Select view row `row` of the table (as a click does)."""
        self.table.selectRow(row)
        self.table.setCurrentIndex(self.model.index(row, 0))

    def _on_row(self, current, previous=None) -> None:
        layer = self.cells_layer()
        if layer is None or not current.isValid():
            return
        position = self.model.position(current.row())
        world = layer.data_to_world(layer.data[position])
        camera(self.viewer).center = tuple(float(v) for v in world)
        layer.selected_data = {position}


def _pixel_size(text: str) -> float | None:
    """The Pixel size field: None when empty (the image's own), else a number of µm/px > 0."""
    text = text.strip()
    if not text:
        return None
    try:
        mpp = float(text)
    except ValueError:
        mpp = math.nan
    if not (math.isfinite(mpp) and mpp > 0):
        raise CellsegError(f"expected a pixel size in µm/px (a number > 0) or nothing, got {text!r}")
    return mpp


def _of_a_result(layer) -> bool:
    """A layer a result brought (its tissue mask, labels, cells), not the slide it was counted on."""
    meta = getattr(layer, "metadata", {}).get("cellseg", {})
    return meta.get("result") is not None and meta.get("kind") != "slide"


def camera(viewer):
    """The viewer's camera: viewer.scene.camera from napari 0.9, viewer.camera before."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def _count(request: CountRequest, progress, cancel):
    """Worker body: the result folder, or the CellsegError a user can act on as Failed (shown in the widget, not as
    a traceback); anything else propagates to napari's error notification."""
    try:
        return run_count(request, progress, cancel)
    except CellsegError as e:
        return Failed(e)
