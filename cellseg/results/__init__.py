"""Everything written into a result folder: the streaming writer, cells.csv, GeoJSON, COCO, label
pyramids, pictures, summary, report, and the atomic result folders themselves.

The names below load their module on first use (lazy_loader, as scikit-image does): importing one module of
the package does not import the rest (torch, numpy), and `cellseg --help` stays instant."""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "cells_csv": ["CellsTableWriter"],
    "cells_geojson": ["CellsGeoJsonWriter", "mask_polygon", "read_cells"],
    "coco": ["CocoWriter", "crop_rle", "crop_rles"],
    "folder": [
        "RESULT_MARKER", "abort_output", "atomic_write_bytes", "atomic_write_text", "commit_output", "first_missing",
        "free_space", "partial_folder", "prepare_output", "prepare_parent", "remove_made_parents", "staged_output",
        "write_error",
    ],
    "labelstore": ["ChunkFiles", "LabelStore"],
    "ome": ["ome_metadata", "resolution_tags"],
    "ome_pyramid": ["LabelPyramid", "Panoptic", "write_label_images"],
    "pictures": ["CELL_OUTLINE", "NUCLEUS_OUTLINE", "write_overlay_png"],
    "region_table": ["RegionTally", "write_regions_csv"],
    "report": [
        "CohortRow", "MAX_CROPS", "TileGrid", "check_cohort_report_target", "choose_crops", "result_folders",
        "slide_warnings", "tile_densities", "write_cohort_report", "write_report",
    ],
    "summary": ["RunInfo", "build_summary", "look_record", "no_tissue_warning", "regions_record", "run_record"],
    "uncertainty": [
        "BELOW_FILE", "CURVE_THRESHOLDS", "ScoreTally", "count_calibration", "curve_warning", "estimate_record",
        "region_estimates", "slide_threshold",
    ],
    "writer": [
        "RESULT_FILES", "ResultWriter", "chosen_outputs", "describe_size", "expected_size", "result_files",
        "start_writer_imports", "write_errors",
    ],
})
