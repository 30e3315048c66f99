"""Per-cell measurements: the declared cells.csv schema, filled by skimage's regionprops_table.

Cells arrive final and disjoint (merge.py resolved overlaps), grouped by owning tile. Each tile's cells
are painted into one small label image over the tile's read box and measured in a single
regionprops_table call, with intensities from the original (not normalised) pixels of every channel.
"""

from __future__ import annotations

import numpy as np
from skimage.measure import regionprops_table

from .merge import Instances
from .tiling import Box

_GEOMETRY = {
    "cell_id": "int64", "class_id": "int64", "class_name": "str", "score": "float32", "tile_index": "int64",
    "centroid_row_px": "float64", "centroid_col_px": "float64",
    "centroid_row_um": "float64", "centroid_col_um": "float64",
    "bbox_row0_px": "int64", "bbox_col0_px": "int64", "bbox_row1_px": "int64", "bbox_col1_px": "int64",
    "area_px": "int64", "area_um2": "float64",
    "perimeter_px": "float64", "perimeter_um": "float64",
    "equivalent_diameter_px": "float64", "equivalent_diameter_um": "float64",
    "major_axis_px": "float64", "major_axis_um": "float64",
    "minor_axis_px": "float64", "minor_axis_um": "float64",
    "eccentricity": "float64", "solidity": "float64", "orientation_deg": "float64",
    "cut_at_seam": "bool",
}


def cell_columns(channel_names: list[str]) -> dict[str, str]:
    """The cells.csv schema (name -> dtype), the same whether a slide has 0 or 1e6 cells."""
    columns = dict(_GEOMETRY)
    for name in channel_names:
        columns[f"mean_intensity_{name}"] = "float64"
        columns[f"std_intensity_{name}"] = "float64"
    return columns


def label_tile(cells: Instances, cell_ids: np.ndarray, box: Box) -> np.ndarray:
    """uint32 label image over `box` with each cell painted as its id (cells must lie inside box)."""
    labels = np.zeros(box.shape, np.uint32)
    for cid, cbox, mask in zip(cell_ids, cells.boxes, cells.masks):
        view = labels[cbox[0] - box.row0:cbox[2] - box.row0, cbox[1] - box.col0:cbox[3] - box.col0]
        view[mask] = cid
    return labels


def measure_tile(cells: Instances, cell_ids: np.ndarray, labels: np.ndarray, pixels: np.ndarray, box: Box,
                 mpp: float | None, channel_names: list[str], class_names: list[str]) -> dict[str, np.ndarray]:
    """Measure the cells of one tile.

    labels: uint32 (h, w) from label_tile over `box`; pixels: (h, w, C) original slide pixels of `box`.
    Returns columns in cell_columns() order, rows in the order of `cell_ids`.
    """
    props = regionprops_table(
        labels, intensity_image=pixels.astype(np.float32, copy=False),
        properties=("label", "area", "centroid", "perimeter", "equivalent_diameter_area", "axis_major_length",
                    "axis_minor_length", "eccentricity", "solidity", "orientation", "intensity_mean",
                    "intensity_std"))
    row_of = {int(label): i for i, label in enumerate(props["label"])}
    order = np.array([row_of[int(c)] for c in cell_ids], np.int64)
    scale = np.nan if mpp is None else float(mpp)

    def p(name: str) -> np.ndarray:
        return np.asarray(props[name], np.float64)[order]

    out = {
        "cell_id": cell_ids.astype(np.int64),
        "class_id": cells.class_ids,
        "class_name": np.array([class_names[c - 1] if 0 < c <= len(class_names) else str(c)
                                for c in cells.class_ids], dtype=object),
        "score": cells.scores,
        "tile_index": cells.tile_index,
        "centroid_row_px": p("centroid-0") + box.row0,
        "centroid_col_px": p("centroid-1") + box.col0,
    }
    out["centroid_row_um"] = out["centroid_row_px"] * scale
    out["centroid_col_um"] = out["centroid_col_px"] * scale
    for k, name in enumerate(("bbox_row0_px", "bbox_col0_px", "bbox_row1_px", "bbox_col1_px")):
        out[name] = cells.boxes[:, k]
    out["area_px"] = p("area").astype(np.int64)
    out["area_um2"] = out["area_px"] * scale ** 2
    for src, name in (("perimeter", "perimeter"), ("equivalent_diameter_area", "equivalent_diameter"),
                      ("axis_major_length", "major_axis"), ("axis_minor_length", "minor_axis")):
        out[f"{name}_px"] = p(src)
        out[f"{name}_um"] = out[f"{name}_px"] * scale
    out["eccentricity"] = p("eccentricity")
    out["solidity"] = p("solidity")
    out["orientation_deg"] = np.degrees(p("orientation"))
    out["cut_at_seam"] = cells.cut
    for k, name in enumerate(channel_names):
        suffix = f"-{k}"   # a (h, w, C) intensity image always gives per-channel columns
        out[f"mean_intensity_{name}"] = p(f"intensity_mean{suffix}")
        out[f"std_intensity_{name}"] = p(f"intensity_std{suffix}")
    return out
