"""From owned detections to final nuclei and cells: seam merge, nucleus measurements, growing nuclei into
cells and measuring them.

The names below load their module on first use (PEP 562, as scikit-image does): importing one module of the
package does not import the rest (torch, numpy), and `cellseg --help` stays instant."""

import importlib

_WHERE = {
    "CellExpansion": "expansion_rows",
    "FinalNuclei": "expansion_rows",
    "SeamMerger": "merge",
    "SeamStats": "merge",
    "centroids_and_areas": "merge",
    "context_margin_px": "expansion",
    "context_rows": "expansion",
    "expand_nuclei": "expansion",
    "expand_owned": "expansion",
    "expand_tile": "expansion_rows",
    "expanded_columns": "cell_measure",
    "expansion_distance_px": "expansion",
    "grow_box": "expansion",
    "label_tile": "nucleus_measure",
    "measure_expanded": "cell_measure",
    "measure_tile": "nucleus_measure",
    "nucleus_columns": "nucleus_measure",
    "overlapping_pairs": "merge",
    "owned_instances": "merge",
    "stain_densities": "cell_measure",
    "stains_apply": "cell_measure",
    "tissue_in": "expansion",
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
