"""cells.csv: one row per nucleus (and the cell grown from it), streamed as they are measured (the columns:
measure.nucleus_columns, then cells.expanded_columns when nuclei are grown into cells)."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import IO

import numpy as np

_QUOTE = re.compile(r'[,"\n]')    # the csv module quotes the separator, the quote and the line end


def _column_text(values: np.ndarray) -> list[str]:
    """One column's fields as pandas' to_csv writes them here (float_format "%.6g", NaN as an empty field, the csv
    module's minimal quoting), formatted column by column: pandas formats every float through a Python call of its
    own and took ~0.5 s for the 9,000 rows of a dense 8192² slide, ten times this."""
    kind = values.dtype.kind
    if kind == "f":
        if np.isfinite(values).all():
            return [f"{v:.6g}" for v in values.tolist()]
        return ["" if v != v else f"{v:.6g}" for v in values.tolist()]
    if kind in "iub":
        return [str(v) for v in values.tolist()]
    text = ["" if v is None else str(v) for v in values.tolist()]
    return ['"' + t.replace('"', '""') + '"' if _QUOTE.search(t) else t for t in text]


class CellsTableWriter:
    """Streams cells.csv: the header is written at open (so zero nuclei still give a valid table),
    then rows per batch. `columns` maps column name -> numpy dtype string, in file order.

    Floats are written with 6 significant digits, NaN as an empty field: the text pandas' to_csv(float_format="%.6g",
    na_rep="") writes (cellseg wrote it with pandas before), formatted column by column. Rows are buffered and written
    `flush_rows` at a time (and at close).
    """

    def __init__(self, path: Path, columns: dict[str, str], flush_rows: int = 20000):
        self.path = Path(path)
        self.columns = {name: np.dtype(dt) for name, dt in columns.items()}
        self.rows = 0
        self.flush_rows = flush_rows
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_rows = 0
        self._fh: IO[str] | None = open(self.path, "w", newline="", encoding="utf-8")
        csv.writer(self._fh, lineterminator="\n").writerow(list(self.columns))

    def append(self, table) -> None:
        """Append rows from a dict of 1-D arrays or a DataFrame with exactly the declared columns."""
        if self._fh is None:
            raise ValueError(f"{self.path} is already closed")
        got = list(table) if isinstance(table, dict) else list(table.columns)     # a dict, or a DataFrame
        if set(got) != set(self.columns):
            missing = [c for c in self.columns if c not in got]
            extra = [c for c in got if c not in self.columns]
            raise ValueError(f"expected the declared cells.csv columns, missing {missing}, unexpected {extra}")
        data = {name: np.asarray(table[name]).astype(dt, copy=False) for name, dt in self.columns.items()}
        lengths = {len(v) for v in data.values()}
        if len(lengths) > 1:
            raise ValueError(f"expected columns of one length, got lengths {sorted(lengths)}")
        n = lengths.pop() if lengths else 0
        self._pending.append(data)
        self._pending_rows += n
        self.rows += n
        if self._pending_rows >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows."""
        if self._fh is None or not self._pending:
            return
        columns = [_column_text(np.concatenate([part[name] for part in self._pending]))
                   for name in self.columns]
        self._fh.write("".join(",".join(row) + "\n" for row in zip(*columns)))
        self._pending, self._pending_rows = [], 0

    def close(self) -> None:
        """Write the buffered rows and close the file (closed even when the writing fails: a full disk)."""
        if self._fh is not None:
            try:
                self.flush()
            finally:
                fh, self._fh = self._fh, None
                fh.close()

    def __enter__(self) -> CellsTableWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self._pending = []   # a failed run: its staging folder is discarded, do not format what it buffered
        self.close()
