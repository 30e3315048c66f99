"""From owned detections to final nuclei and cells: seam merge, nucleus measurements, growing nuclei into
cells and measuring them.

The names below load their module on first use (lazy_loader, as scikit-image does): importing one module of
the package does not import the rest (torch, numpy), and `cellseg --help` stays instant."""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "cell_measure": [
        "expanded_columns", "mean_colour_stains", "measure_expanded", "stain_densities", "stain_white", "stains_apply",
    ],
    "expansion": [
        "context_margin_px", "context_rows", "expand_nuclei", "expand_owned", "expansion_distance_px", "grow_box",
        "tissue_in",
    ],
    "expansion_rows": ["CellExpansion", "FinalNuclei", "expand_tile"],
    "merge": ["SeamMerger", "SeamStats", "centroids_and_areas", "overlapping_pairs", "owned_instances"],
    "nucleus_measure": ["label_and_measure", "label_tile", "measure_tile", "nucleus_columns", "painted_tile"],
})
