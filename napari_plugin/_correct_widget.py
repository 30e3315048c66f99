"""The "Correct & train" tab of the dock widget: fix the masks of a few fields, export them as COCO, fine-tune a
bundle on them, recount with it — one loop without leaving napari (docs/napari.md).

A thin shell: the edits are `_edit` (split, merge, delete; napari paints, erases and fills), the export is
`_export.export_coco`, the training `_train.run_training` (`cellseg train` in a child process) in a napari thread
worker, and the recount the Count tab's own run with the new bundle. Everything here is wiring.

Layers it makes: one editable Labels layer per field (metadata["cellseg"]["kind"] == "correction", with the image
layer it was cut from and its box in that image's level-0 px) and a Shapes layer "edit lines" for the lines that
say where to split and which nuclei to merge or delete.
"""

from __future__ import annotations

import logging
import shlex
import tempfile
import threading
from pathlib import Path

import numpy as np
from qtpy.QtCore import QObject, Qt, Signal
from qtpy.QtWidgets import (
    QApplication,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from cellseg.errors import CellsegError
from cellseg.geometry import Box

from . import _edit, _logic
from ._export import Exported, Field, check_field_size, crop, export_coco, safe_name
from ._qtparts import fill_combo, follow_layer_names, with_browse
from ._run import Failed
from ._train import TrainOutcome, TrainRequest, next_free, run_training

log = logging.getLogger(__name__)

WHOLE_IMAGE = "(whole image)"
NO_LABELS = "(none: start empty)"
CORRECTION = "correction"
EDIT_LINES = "edit_lines"
LINES_NAME = "edit lines"


class _TrainSignals(QObject):
    """Carries the training's (what, done, total) from the worker thread to the GUI thread."""

    progress = Signal(str, int, int)


class CorrectPanel(QWidget):
    """Correct, export, train, recount; `owner` is the CellsegWidget (its image, protocol, device, model, count)."""

    def __init__(self, owner):
        super().__init__()
        self.owner = owner
        self.viewer = owner.viewer
        self.worker = None
        self.exported: Exported | None = None
        self.outcome: TrainOutcome | None = None
        self._cancel = threading.Event()       # one flag, cleared at each start: the teardown below holds it
        # closing the viewer (or the dock) mid-training stops `cellseg train` (its child process) as Cancel does
        self.destroyed.connect(self._cancel.set)
        QApplication.instance().lastWindowClosed.connect(self._cancel.set)
        self._signals = _TrainSignals()
        self._signals.progress.connect(self._on_progress)

        # ---- correct
        self.fields_combo = QComboBox()
        self.fields_combo.setToolTip("The fields to correct: every shape of a Shapes layer (its bounding box, in the "
                                     "Count tab's image), or the whole image when it is small")
        self.labels_combo = QComboBox()
        self.labels_combo.setToolTip("The nuclei to start from (a result's labels), or none")
        self.edit_button = QPushButton("Edit fields")
        self.edit_button.setToolTip("Copy each field's labels into an editable Labels layer: paint, erase and fill "
                                    "with napari's tools; split, merge and delete below")
        self.split_button = QPushButton("Split")
        self.split_button.setToolTip("Split a nucleus in two: along the last line drawn in 'edit lines' across it, "
                                     "or, without a line, the picked label at its neck")
        self.merge_button = QPushButton("Merge")
        self.merge_button.setToolTip("Merge the nuclei that the last line drawn in 'edit lines' crosses")
        self.delete_button = QPushButton("Delete")
        self.delete_button.setToolTip("Delete the nuclei that the last line in 'edit lines' crosses, or the picked "
                                      "label")
        self.export_edit = QLineEdit()
        self.export_edit.setPlaceholderText("a new temporary folder")
        self.export_button = QPushButton("Export COCO")
        self.export_button.setToolTip("Write the corrected fields as COCO (annotations.json) + image crops (images/)")

        form = QFormLayout()
        form.addRow("Fields", self.fields_combo)
        form.addRow("Start from", self.labels_combo)
        edits = QHBoxLayout()
        for button in (self.split_button, self.merge_button, self.delete_button):
            edits.addWidget(button)
        export_row = QHBoxLayout()
        export_row.addWidget(with_browse(self.export_edit, self, "Folder for the corrections"), 1)
        export_row.addWidget(self.export_button)
        correct_box = QGroupBox("Correct")
        correct_layout = QVBoxLayout(correct_box)
        correct_layout.addLayout(form)
        correct_layout.addWidget(self.edit_button)
        correct_layout.addLayout(edits)
        correct_layout.addLayout(export_row)

        # ---- train
        self.bundle_edit = QLineEdit()
        self.bundle_edit.setPlaceholderText("bundle/ in the corrections folder")
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(0, 100_000)
        self.steps_spin.setSpecialValueText("auto")
        self.steps_spin.setToolTip("Training steps (auto: scaled to the annotated nuclei)")
        self.options_edit = QLineEdit()
        self.options_edit.setPlaceholderText("more cellseg train options, e.g. --minutes 20")
        self.train_button = QPushButton("Train")
        self.train_button.setToolTip("Fine-tune the Count tab's model (or the protocol's) on the exported fields: "
                                     "cellseg train, checked on held-out parts of them")
        self.train_cancel_button = QPushButton("Cancel")
        self.train_cancel_button.setEnabled(False)
        self.train_progress = QProgressBar()
        self.train_progress.setFormat("%v / %m steps")
        self.train_progress.setRange(0, 1)
        self.train_progress.setValue(0)
        self.recount_button = QPushButton("Recount with the new bundle")
        self.recount_button.setEnabled(False)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        train_form = QFormLayout()
        train_form.addRow("Bundle", with_browse(self.bundle_edit, self, "Folder for the trained bundle"))
        train_form.addRow("Steps", self.steps_spin)
        train_form.addRow("Options", self.options_edit)
        train_buttons = QHBoxLayout()
        train_buttons.addWidget(self.train_button)
        train_buttons.addWidget(self.train_cancel_button)
        train_box = QGroupBox("Train")
        train_layout = QVBoxLayout(train_box)
        train_layout.addLayout(train_form)
        train_layout.addLayout(train_buttons)
        train_layout.addWidget(self.train_progress)
        train_layout.addWidget(self.recount_button)

        layout = QVBoxLayout(self)
        layout.addWidget(correct_box)
        layout.addWidget(train_box)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.edit_button.clicked.connect(self.edit_fields)
        self.split_button.clicked.connect(self.split)
        self.merge_button.clicked.connect(self.merge)
        self.delete_button.clicked.connect(self.delete)
        self.export_button.clicked.connect(self.export)
        self.train_button.clicked.connect(self.train)
        self.train_cancel_button.clicked.connect(self.cancel_training)
        self.recount_button.clicked.connect(self.recount)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed,
                      self.viewer.layers.events.moved):
            event.connect(self._refresh_layers)
        follow_layer_names(self.viewer, self._refresh_layers)
        self._refresh_layers()
        results = [i for i in range(self.labels_combo.count())
                   if getattr(self.labels_combo.itemData(i), "metadata", {}).get("cellseg", {}).get("kind") == "labels"]
        if results:          # a result is open already: start from its nuclei
            self.labels_combo.setCurrentIndex(results[-1])

    # ------------------------------------------------------------------ layers

    def _refresh_layers(self, event=None) -> None:
        from napari.layers import Labels, Shapes

        new = getattr(event, "value", None) if getattr(event, "type", None) == "inserted" else None
        shapes = [layer for layer in self.viewer.layers if isinstance(layer, Shapes)
                  and layer.metadata.get("cellseg", {}).get("kind") != EDIT_LINES]
        labels = [layer for layer in self.viewer.layers if isinstance(layer, Labels)
                  and layer.metadata.get("cellseg", {}).get("kind") != CORRECTION]
        fill_combo(self.fields_combo, shapes, first=WHOLE_IMAGE, prefer=None)
        result_labels = new if getattr(new, "metadata", {}).get("cellseg", {}).get("kind") == "labels" else None
        fill_combo(self.labels_combo, labels, first=NO_LABELS, prefer=result_labels)

    def _current(self, combo: QComboBox):
        layer = combo.currentData()
        return layer if layer is not None and layer in self.viewer.layers else None

    def correction_layers(self) -> list:
        from napari.layers import Labels
        return [layer for layer in self.viewer.layers if isinstance(layer, Labels)
                and layer.metadata.get("cellseg", {}).get("kind") == CORRECTION]

    def field_boxes(self, image) -> list[Box]:
        """The fields in `image`'s level-0 px: each shape of the chosen Shapes layer, or the whole image."""
        level0 = image.data[0] if image.multiscale else image.data
        shape = tuple(int(n) for n in level0.shape[:2])
        shapes = self._current(self.fields_combo)
        if shapes is None:
            return [Box(0, 0, *shape)]
        if not len(shapes.data):
            raise CellsegError(f"expected rectangles around the fields in the Shapes layer {shapes.name!r}, found none")
        return [_logic.region_box(np.array([image.world_to_data(shapes.data_to_world(v)) for v in vertices]), shape)
                for vertices in shapes.data]

    def edit_fields(self) -> list:
        """One editable Labels layer per field, the chosen labels copied in (0 where they do not reach)."""
        image = self.owner._current(self.owner.image_combo)
        try:
            if image is None:
                raise CellsegError("expected an image layer (the Count tab's) to correct, found none")
            boxes = self.field_boxes(image)
            for box in boxes:
                check_field_size(box)
            source = self._current(self.labels_combo)
            copies = [self._labels_in(source, image, box) for box in boxes]
        except CellsegError as e:
            self._say(str(e), error=True)
            return []
        meta = image.metadata.get("cellseg", {})
        first = 1 + sum(layer.metadata["cellseg"].get("image") == image.name for layer in self.correction_layers())
        layers = []
        for k, (box, labels) in enumerate(zip(boxes, copies), start=first):
            placed = _logic.place_on_image({"translate": (box.row0, box.col0)}, image.scale, image.translate)
            layers.append(self.viewer.add_labels(
                labels, name=f"{image.name} field {k}", opacity=0.6, **placed,
                metadata={"cellseg": {"kind": CORRECTION, "image": image.name, "box_px": [int(v) for v in box],
                                      "mpp": meta.get("mpp"), "slide": meta.get("path")}}))
        self.lines_layer(create=True)
        self.viewer.layers.selection.active = layers[0]
        layers[0].mode = "paint"
        self._say(f"{len(layers)} field(s) to correct: paint, erase and fill in napari's layer controls; pick a "
                  f"label and Split or Delete it, or draw a line in '{LINES_NAME}' across nuclei to split, merge or "
                  "delete them; then Export")
        return layers

    def _labels_in(self, source, image, box: Box) -> np.ndarray:
        """A copy (uint32) of `source`'s labels over `box` of `image` (level-0 px of both; zeros without a source)."""
        if source is None:
            return np.zeros(box.shape, np.uint32)
        if not np.allclose(np.asarray(source.scale)[-2:], np.asarray(image.scale)[-2:]):
            raise CellsegError(f"expected the labels {source.name!r} at the pixel size of the image {image.name!r}, "
                               f"got scales {_scale_text(source)} and {_scale_text(image)}")
        r, c = np.round(source.world_to_data(image.data_to_world(np.array([box.row0, box.col0], float))))[-2:]
        data = source.data[0] if source.multiscale else source.data
        return crop(data, Box(int(r), int(c), int(r) + box.height, int(c) + box.width)).astype(np.uint32)

    def lines_layer(self, create: bool = False):
        from napari.layers import Shapes
        for layer in self.viewer.layers:
            if isinstance(layer, Shapes) and layer.metadata.get("cellseg", {}).get("kind") == EDIT_LINES:
                return layer
        if not create:
            return None
        return self.viewer.add_shapes(name=LINES_NAME, ndim=2, edge_color="white", edge_width=2,
                                      metadata={"cellseg": {"kind": EDIT_LINES}})

    def active_field(self):
        """The correction layer being edited: the selected one, else the last made."""
        active = self.viewer.layers.selection.active
        if active is not None and active in self.correction_layers():
            return active
        fields = self.correction_layers()
        return fields[-1] if fields else None

    # ------------------------------------------------------------------ edits

    def _last_line(self, field):
        """(index, vertices in `field`'s px) of the selected (else last) shape of 'edit lines', or None."""
        lines = self.lines_layer()
        if lines is None or not len(lines.data):
            return None
        index = sorted(lines.selected_data)[-1] if lines.selected_data else len(lines.data) - 1
        vertices = np.array([field.world_to_data(lines.data_to_world(v)) for v in lines.data[index]])
        return index, vertices[:, -2:]

    def _edit(self, what: str) -> bool:
        field = self.active_field()
        if field is None:
            self._say("expected a field to edit: press 'Edit fields' first", error=True)
            return False
        line = self._last_line(field)
        old = np.asarray(field.data)
        try:
            if what == "split":
                new = _edit.split_label(old, None if line else int(field.selected_label),
                                        line[1] if line else None)
            else:
                ids = _edit.labels_along(old, line[1]) if line else [int(field.selected_label)]
                new = _edit.merge_labels(old, ids) if what == "merge" else _edit.delete_labels(old, ids)
        except CellsegError as e:
            self._say(str(e), error=True)
            return False
        indices, values = _edit.changes(old, new)
        field.data_setitem(indices, values)          # in the layer's undo history, like a brush stroke
        if line is not None:
            self.lines_layer().selected_data = {line[0]}
            self.lines_layer().remove_selected()
        self._say(f"{what}: {len(values)} px changed in {field.name} (Ctrl+Z on the layer undoes it)")
        return True

    def split(self) -> bool:
        return self._edit("split")

    def merge(self) -> bool:
        return self._edit("merge")

    def delete(self) -> bool:
        return self._edit("delete")

    # ------------------------------------------------------------------ export

    def fields(self) -> list[Field]:
        """The corrected fields with their pixels, read from the image layers they were cut from."""
        out = []
        for layer in self.correction_layers():
            meta = layer.metadata["cellseg"]
            if meta["image"] not in self.viewer.layers:
                raise CellsegError(f"expected the image layer {meta['image']!r} that {layer.name!r} was cut from, "
                                   "found none (was it closed or renamed?)")
            image = self.viewer.layers[meta["image"]]
            level0 = image.data[0] if image.multiscale else image.data
            box = Box(*meta["box_px"])
            out.append(Field(layer.name, crop(level0, box), np.asarray(layer.data), source=meta.get("slide")
                             or meta["image"], box_px=tuple(box), mpp=meta.get("mpp")))
        return out

    def export(self) -> Exported | None:
        folder = self.export_edit.text().strip()
        try:
            target = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="cellseg-corrections-"))
            self.exported = export_coco(self.fields(), target)
        except CellsegError as e:
            self._say(str(e), error=True)
            return None
        self.export_edit.setText(str(target))
        note = f"; check: {', '.join(self.exported.pieces[:3])}" if self.exported.pieces else ""
        self._say(f"{self.exported.nuclei} nuclei in {self.exported.fields} field(s) → "
                  f"{self.exported.annotations}{note}", error=bool(note))
        return self.exported

    # ------------------------------------------------------------------ train

    def train_request(self) -> TrainRequest:
        if self.exported is None or not self.exported.annotations.is_file():
            raise CellsegError("expected exported corrections to train on: press 'Export COCO' first")
        text = self.bundle_edit.text().strip()
        out = Path(text) if text else next_free(self.exported.annotations.parent / "bundle")
        try:
            extra = shlex.split(self.options_edit.text())
        except ValueError as e:
            raise CellsegError(f"expected cellseg train options, got {self.options_edit.text()!r}: {e}") from e
        return TrainRequest(data=self.exported.annotations, out=out, protocol=self.owner.protocol_combo.currentText(),
                            init=self.owner.model_edit.text().strip() or None, steps=self.steps_spin.value() or None,
                            device=self.owner.device_combo.currentText(), mpp=self.exported.mpp, extra=extra)

    def train(self):
        """Start `cellseg train` in a worker thread; returns the worker (None when it cannot start)."""
        from napari.qt.threading import create_worker

        if self.worker is not None:
            return self.worker
        try:
            request = self.train_request()
        except CellsegError as e:
            self._say(str(e), error=True)
            return None
        self._cancel.clear()
        self.train_progress.setRange(0, 0)
        self.train_button.setEnabled(False)
        self.train_cancel_button.setEnabled(True)
        self.recount_button.setEnabled(False)
        start = request.init or f"the {request.protocol} protocol's bundle"
        self._say(f"training from {start} into {request.out}…")
        self.worker = create_worker(_train, request, self._signals.progress.emit, self._cancel, _start_thread=False,
                                    _connect={"returned": self._on_trained, "errored": self._on_error,
                                              "finished": self._on_finished})
        self.worker.start()
        return self.worker

    def cancel_training(self) -> None:
        if self.worker is not None:
            self._cancel.set()
            self._say("stopping after the training step under way…")

    def _on_progress(self, what: str, done: int, total: int) -> None:
        if what == "train" and total:
            self.train_progress.setFormat("%v / %m steps")
            self.train_progress.setRange(0, total)
            self.train_progress.setValue(done)
        elif total:
            self.status.setText(f"{what}: {done} / {total}")
        elif not what.startswith(("INFO", "DEBUG")) or "step" in what or "fine-tuning" in what:
            self.status.setText(what.split(": ", 1)[-1] if what.startswith("INFO") else what)

    def _on_trained(self, outcome) -> None:
        if isinstance(outcome, Failed):
            self._say(str(outcome.error), error=True)
            return
        self.outcome = outcome
        self.recount_button.setEnabled(outcome.usable)
        if outcome.status == "better":
            self._say(f"{outcome.message}. Recount to see it at work.")
        elif outcome.status == "not better":
            self._say(f"{outcome.message}. You may still recount with it to compare.", error=True)
        else:
            self._say(outcome.message, error=True)

    def _on_error(self, exc: Exception) -> None:
        self._say(f"error: {type(exc).__name__}: {exc}", error=True)

    def _on_finished(self) -> None:
        self.worker = None
        self.train_button.setEnabled(True)
        self.train_cancel_button.setEnabled(False)
        if self.train_progress.maximum() == 0:
            self.train_progress.setRange(0, 1)

    # ------------------------------------------------------------------ recount

    def recount(self):
        """Count the Count tab's image (and region) again with the new bundle; the result lands as new layers."""
        if self.outcome is None or not self.outcome.usable:
            self._say("expected a trained bundle to recount with: train first", error=True)
            return None
        bundle = self.outcome.bundle
        image = self.owner._current(self.owner.image_combo)
        name = f"{safe_name(image.name) if image is not None else 'image'}-retrained"
        worker = self.owner.run(model=str(bundle), output=bundle / "recount" / f"{name}.cellseg")
        if worker is not None:
            self._say(f"recounting with {bundle} (progress in the Count tab)…")
        else:
            self._say(self.owner.status.text(), error=True)
        return worker

    def _say(self, text: str, error: bool = False) -> None:
        self.status.setText(text)
        self.status.setStyleSheet("color: #e0584f" if error else "")
        (log.warning if error else log.info)("%s", text)


def _scale_text(layer) -> str:
    """A layer's pixel size in the viewer, as a person reads it: "0.5 x 0.5"."""
    return " x ".join(f"{float(v):g}" for v in layer.scale[-2:])


def _train(request: TrainRequest, progress, cancel):
    """Worker body: the TrainOutcome, or the CellsegError a user can act on as Failed (shown in the widget, not as
    a traceback)."""
    try:
        return run_training(request, progress, cancel)
    except CellsegError as e:
        return Failed(e)
