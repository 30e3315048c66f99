"""Everything written into a result folder: the streaming writer, cells.csv, GeoJSON, COCO, label
pyramids, pictures, summary, report, and the atomic result folders themselves.

The names below load their module on first use (PEP 562, as scikit-image does): importing one module of the
package does not import the rest (torch, numpy), and `cellseg --help` stays instant."""

import importlib

_WHERE = {
    "CELL_OUTLINE": "pictures",
    "CellsGeoJsonWriter": "cells_geojson",
    "CellsTableWriter": "cells_csv",
    "ChunkFiles": "labelstore",
    "CocoWriter": "coco",
    "CohortRow": "report",
    "LabelStore": "labelstore",
    "MAX_CROPS": "report",
    "NUCLEUS_OUTLINE": "pictures",
    "Panoptic": "ome_pyramid",
    "RESULT_FILES": "writer",
    "RESULT_MARKER": "folder",
    "RegionTally": "region_table",
    "ResultWriter": "writer",
    "RunInfo": "summary",
    "TileGrid": "report",
    "abort_output": "folder",
    "atomic_write_bytes": "folder",
    "atomic_write_text": "folder",
    "build_summary": "summary",
    "choose_crops": "report",
    "commit_output": "folder",
    "crop_rle": "coco",
    "crop_rles": "coco",
    "first_missing": "folder",
    "mask_polygon": "cells_geojson",
    "ome_metadata": "ome",
    "partial_folder": "folder",
    "prepare_output": "folder",
    "prepare_parent": "folder",
    "read_cells": "cells_geojson",
    "regions_record": "summary",
    "remove_made_parents": "folder",
    "resolution_tags": "ome",
    "result_files": "writer",
    "result_folders": "report",
    "run_record": "summary",
    "slide_warnings": "report",
    "staged_output": "folder",
    "start_writer_imports": "writer",
    "tile_densities": "report",
    "write_area_histogram": "pictures",
    "write_cohort_report": "report",
    "write_label_images": "ome_pyramid",
    "write_overlay_png": "pictures",
    "write_regions_csv": "region_table",
    "write_report": "report",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
