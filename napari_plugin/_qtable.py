"""A Qt table model over the per-cell DataFrame: shows only the rows a filter kept, sorts by any column.

Virtual (Qt asks for the visible cells only), so a slide with 100k cells opens instantly. Row r of the view is
table position `positions[r]` (0..n-1 in cells.csv order, = the Points layer's point index).
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QAbstractTableModel, QModelIndex, Qt

from ._logic import format_value


class CellsTableModel(QAbstractTableModel):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._cells = None
        self._columns: list[str] = []
        self.positions = np.zeros(0, np.int64)

    def set_cells(self, cells, positions=None) -> None:
        self.beginResetModel()
        self._cells = cells
        self._columns = list(cells.columns) if cells is not None else []
        n = len(cells) if cells is not None else 0
        self.positions = np.arange(n) if positions is None else np.asarray(positions, np.int64)
        self.endResetModel()

    def set_positions(self, positions) -> None:
        self.beginResetModel()
        self.positions = np.asarray(positions, np.int64)
        self.endResetModel()

    def position(self, row: int) -> int:
        """The table position (point index) shown in view row `row`."""
        return int(self.positions[row])

    def rowCount(self, parent=QModelIndex()) -> int:  # noqa: N802 (Qt API)
        return 0 if parent.isValid() else len(self.positions)

    def columnCount(self, parent=QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else len(self._columns)

    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid() or self._cells is None:
            return None
        if role == Qt.ItemDataRole.DisplayRole:
            return format_value(self._cells.iat[self.position(index.row()), index.column()])
        if role == Qt.ItemDataRole.TextAlignmentRole:
            kind = self._cells.dtypes.iloc[index.column()].kind
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter) if kind in "iuf" else None
        return None

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):  # noqa: N802
        if role != Qt.ItemDataRole.DisplayRole:
            return None
        if orientation == Qt.Orientation.Horizontal:
            return self._columns[section] if section < len(self._columns) else None
        return str(section + 1)

    def sort(self, column: int, order=Qt.SortOrder.AscendingOrder) -> None:
        if self._cells is None or not len(self.positions):
            return
        values = self._cells.iloc[self.positions, column]
        # stable, NaN last either way
        idx = np.argsort(values.to_numpy(), kind="stable") if values.dtype.kind in "biuf" \
            else np.argsort(values.astype(str).to_numpy(), kind="stable")
        if order == Qt.SortOrder.DescendingOrder:
            idx = idx[::-1]
        if values.dtype.kind == "f":
            nan = np.isnan(values.to_numpy()[idx])
            idx = np.concatenate([idx[~nan], idx[nan]])
        self.layoutAboutToBeChanged.emit()
        self.positions = self.positions[idx]
        self.layoutChanged.emit()
