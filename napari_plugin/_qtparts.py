"""Small Qt pieces the dock widget's tabs share: a combo box of layers, a line edit with a folder button."""

from __future__ import annotations

from pathlib import Path

from qtpy.QtWidgets import QComboBox, QFileDialog, QHBoxLayout, QLineEdit, QPushButton, QWidget


def fill_combo(combo: QComboBox, layers: list, first: str | None = None, prefer=None) -> None:
    """Refill a layer combo, keeping the current choice (or choosing `prefer`, a newly added layer)."""
    current = combo.currentData()
    combo.blockSignals(True)
    combo.clear()
    if first:
        combo.addItem(first, None)
    for layer in layers:
        combo.addItem(layer.name, layer)
    target = prefer if prefer is not None and prefer in layers else current
    index = next((i for i in range(combo.count()) if combo.itemData(i) is target), -1) if target is not None else -1
    combo.setCurrentIndex(index if index >= 0 else (0 if combo.count() else -1))
    combo.blockSignals(False)
    if combo.currentData() is not current:
        combo.currentIndexChanged.emit(combo.currentIndex())


def follow_layer_names(viewer, refresh) -> None:
    """Call `refresh` when any layer of `viewer`, now or added later, is renamed: the layer combos show names, and
    the layer list itself says nothing of a rename."""
    for layer in viewer.layers:
        layer.events.name.connect(refresh)
    viewer.layers.events.inserted.connect(lambda event: event.value.events.name.connect(refresh))


def with_browse(edit: QLineEdit, parent: QWidget, title: str) -> QWidget:
    box = QWidget()
    row = QHBoxLayout(box)
    row.setContentsMargins(0, 0, 0, 0)
    row.addWidget(edit, 1)
    button = QPushButton("…")
    button.setMaximumWidth(28)

    def browse() -> None:
        folder = QFileDialog.getExistingDirectory(parent, title, edit.text() or str(Path.home()))
        if folder:
            edit.setText(folder)
    button.clicked.connect(browse)
    row.addWidget(button)
    return box
