"""cellseg's napari plugin (installed as `cellseg_napari`; manifest: napari.yaml).

Qt-free modules, tested without a display: `_lazy` (lazy pyramid levels), `_layers` (layer data from a
result folder or a slide), `_logic` (table filtering, colours, regions), `_run` (a count run through the same
`cellseg.run.counter.CellCounter` as the CLI), `_edit` (split, merge, delete nuclei), `_export` (corrected fields as
COCO + image crops), `_train` (`cellseg train` in a child process: progress, cancel). Qt modules: `_widget` (the dock
widget), `_correct_widget` (its Correct & train tab), `_qtable` (the cell table), `_qtparts` (shared pieces),
`_reader` and `_sample_data` (npe2 entry points, thin).

Importing this package does not import napari or Qt.
"""

from cellseg import __version__

__all__ = ["__version__"]
