"""Per-nucleus measurements: the declared cells.csv schema, with scikit-image's definitions, for a tile at once.

Nuclei arrive final and disjoint (cells/merge.py resolved overlaps), grouped by owning tile. Each tile's nuclei
are painted into one small label image over the tile's read box and measured together, with intensities
from the original (not normalised) pixels of every channel. (Cells grown from the nuclei are measured by
cells/cell_measure.py.)

The values are those of skimage.measure.regionprops (area, centroid, perimeter with 4-connectivity,
moment-based axes / eccentricity / orientation, solidity against the pixel convex hull, intensity
mean / std), but computed for all nuclei of the tile with whole-array numpy operations: regionprops
spends ~0.3 ms per nucleus in Python and qhull, which at a million nuclei is most of a run (performance
goal: >= 1e6 nuclei/min through merge + measure). tests/cells/test_measure_speed_equivalence.py checks every
column against regionprops_table on random label images.
"""

from __future__ import annotations

from math import sqrt

import numpy as np

from ..geometry import Box, Instances, MaskRows

_GEOMETRY = {
    "cell_id": "int64", "class_id": "int64", "class_name": "str", "score": "float32",
    "p_nucleus": "float32",     # the score's calibrated probability of a true nucleus: the count fills it in
    "tile_index": "int64",
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


def nucleus_columns(channel_names: list[str]) -> dict[str, str]:
    """The cells.csv columns of every nucleus (name -> dtype), the same whether a slide has 0 or 1e6 nuclei.

    (The column names predate this vocabulary and are kept: `cell_id` is the nucleus's id, `area_px` its area.)
    """
    columns = dict(_GEOMETRY)
    for name in channel_names:
        columns[f"mean_intensity_{name}"] = "float64"
        columns[f"std_intensity_{name}"] = "float64"
    return columns


def label_tile(nuclei: Instances, ids: np.ndarray, box: Box) -> np.ndarray:
    """uint32 label image over `box` with each nucleus painted as its id (nuclei must lie inside box)."""
    return painted_tile(nuclei, ids, box)[0]


def painted_tile(nuclei: Instances, ids: np.ndarray, box: Box) -> tuple[np.ndarray, MaskRows | None]:
    """label_tile's image, and the nuclei's masks as MaskRows in the box's frame when they were painted whole (no
    two overlap, every id nonzero: each labelled pixel is its nucleus's mask pixel, which measure_tile then need not
    check again); None when a later nucleus painted over an earlier one."""
    labels = np.zeros(box.shape, np.uint32)
    boxes = np.asarray(nuclei.boxes, np.int64).reshape(-1, 4) - np.array([box.row0, box.col0] * 2)
    rows = MaskRows.of(boxes, nuclei.masks)
    if len(rows.mask):
        left, right = rows.ends()
        if rows.y.min() < 0 or rows.y.max() >= box.height or left.min() < 0 or right.max() >= box.width:
            raise ValueError(f"expected nuclei inside {box}")
    index = rows.canvas_index(0, 0, box.width)
    labels.reshape(-1)[index] = np.repeat(np.asarray(ids)[rows.mask], rows.count)
    if np.count_nonzero(labels) == len(index):
        return labels, rows
    # Overlapping masks: paint one by one so that the later nucleus wins, as documented.
    labels[:] = 0
    for nid, nbox, mask in zip(ids, boxes, nuclei.masks):
        labels[nbox[0]:nbox[2], nbox[1]:nbox[3]][mask] = nid
    return labels, None


def measure_tile(nuclei: Instances, ids: np.ndarray, labels: np.ndarray, pixels: np.ndarray, box: Box,
                 mpp: float | None, channel_names: list[str], class_names: list[str],
                 rows: MaskRows | None = None) -> dict[str, np.ndarray]:
    """Measure the nuclei of one tile.

    labels: uint32 (h, w) from label_tile over `box`; pixels: (h, w, C) original slide pixels of `box`; rows: the
    MaskRows painted_tile gives with `labels` (the labels then known to be exactly the masks), or None.
    Returns columns in nucleus_columns() order, rows in the order of `ids`.
    """
    ids = np.asarray(ids, np.int64)
    n = len(ids)
    height, width = labels.shape
    px = _NucleusPixels(nuclei, ids, labels, box, rows)
    geo = _moments(px)
    scale = np.nan if mpp is None else float(mpp)
    class_ids = np.asarray(nuclei.class_ids, np.int64)
    known = (class_ids > 0) & (class_ids <= len(class_names))
    class_name = np.array([str(c) for c in class_ids] if not known.all() else [""] * n, dtype=object)
    class_name[known] = np.array(list(class_names) + [""], dtype=object)[class_ids[known] - 1]
    out = {
        "cell_id": ids,
        "class_id": nuclei.class_ids,
        "class_name": class_name,
        "score": nuclei.scores,
        # filled in by the count from the bundle's calibration (results/uncertainty.py); empty without one
        "p_nucleus": np.full(n, np.nan, np.float32),
        "tile_index": nuclei.tile_index,
        "centroid_row_px": geo["centroid_row"] + box.row0,
        "centroid_col_px": geo["centroid_col"] + box.col0,
    }
    out["centroid_row_um"] = out["centroid_row_px"] * scale
    out["centroid_col_um"] = out["centroid_col_px"] * scale
    for k, name in enumerate(("bbox_row0_px", "bbox_col0_px", "bbox_row1_px", "bbox_col1_px")):
        out[name] = nuclei.boxes[:, k]
    area = geo["area"]
    out["area_px"] = area.astype(np.int64)
    out["area_um2"] = out["area_px"] * scale ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        columns = {"perimeter": _perimeters(labels, px.index, px.row, px.nucleus, n), "equivalent_diameter": (4 * area / np.pi) ** 0.5,
                   "major_axis": geo["major"], "minor_axis": geo["minor"]}
        for name, values in columns.items():
            out[f"{name}_px"] = values
            out[f"{name}_um"] = values * scale
        out["eccentricity"] = geo["eccentricity"]
        out["solidity"] = area / _convex_areas(px)
    out["orientation_deg"] = np.degrees(geo["orientation"])
    out["cut_at_seam"] = nuclei.cut
    pixels = np.asarray(pixels).reshape(height * width, -1)
    for k, name in enumerate(channel_names):
        mean, std = _mean_std(px, pixels[px.index, k].astype(np.float64), area)
        out[f"mean_intensity_{name}"] = mean
        out[f"std_intensity_{name}"] = std
    return out


def label_and_measure(nuclei: Instances, ids: np.ndarray, box: Box, pixels: np.ndarray, mpp: float | None,
                      channel_names: list[str], class_names: list[str]) -> dict[str, np.ndarray]:
    """measure_tile on the label image label_tile paints: one tile's measurements from its nuclei and pixels alone
    (what a measuring process is handed: run/measuring.py)."""
    labels, rows = painted_tile(nuclei, ids, box)
    return measure_tile(nuclei, ids, labels, pixels, box, mpp, channel_names, class_names, rows)


class _NucleusPixels:
    """Each nucleus's pixels in the label image, as mask rows (maskrows.MaskRows) in the tile's frame.

    label_tile paints disjoint masks whole, so a nucleus's labelled pixels are its mask: that is checked
    (every mask pixel carries its id, and no other pixel is labelled) rather than searched for. If the
    labels say otherwise (overlapping masks, where the later one won; other labels), each nucleus is re-cut
    from the labels inside its box, so the labels are always what is measured.
    Per pixel: `index` (flat, in the label image), `nucleus` (0 .. n - 1), `row`.
    """

    def __init__(self, nuclei: Instances, ids: np.ndarray, labels: np.ndarray, box: Box,
                 painted: MaskRows | None = None):
        self.n = len(ids)
        self.boxes = boxes = np.asarray(nuclei.boxes, np.int64).reshape(-1, 4) - np.array([box.row0, box.col0] * 2)
        width = labels.shape[1]
        if painted is not None:     # painted_tile's: the labels are these masks, painted whole
            self._set(painted, painted.canvas_index(0, 0, width))
            return
        rows = MaskRows.of(boxes, nuclei.masks)
        index = rows.canvas_index(0, 0, width)
        left, right = rows.ends()
        inside = len(index) == 0 or (rows.y.min() >= 0 and rows.y.max() < labels.shape[0] and left.min() >= 0
                                     and right.max() < width)
        if not (inside and np.count_nonzero(labels) == len(index)
                and np.array_equal(labels.reshape(-1)[index], np.repeat(ids[rows.mask], rows.count))):
            if (boxes[:, :2] < 0).any() or (boxes[:, 2] > labels.shape[0]).any() or (boxes[:, 3] > width).any():
                raise ValueError(f"expected nuclei inside {box}")
            masks = [labels[b[0]:b[2], b[1]:b[3]] == nid for b, nid in zip(boxes, ids)]
            rows = MaskRows.of(boxes, masks)
            index = rows.canvas_index(0, 0, width)
        self._set(rows, index)

    def _set(self, rows: MaskRows, index: np.ndarray) -> None:
        self.rows, self.index = rows, index
        self.nucleus = rows.pixel_masks()                # per pixel: its nucleus
        self.row = np.repeat(rows.y, rows.count)         # per pixel: its row in the tile

    def sum(self, weights: np.ndarray, per_row: bool = False) -> np.ndarray:
        """Per-nucleus sums of per-pixel (or, with per_row, per-row) values."""
        return np.bincount(self.rows.mask if per_row else self.nucleus, weights=weights, minlength=self.n)


def _moments(px: _NucleusPixels) -> dict[str, np.ndarray]:
    """Area, centroid and regionprops' inertia-tensor shape descriptors, from per-row coordinate sums.

    Coordinates are taken from each nucleus's box corner: the sums are then exact integers, so the centroid
    equals regionprops' coords.mean() bit for bit, and n^2 x the central moments are exact in int64
    where they fit (a symmetric nucleus gets exactly equal moments, so its orientation does not flip on
    rounding); float64 otherwise.
    """
    rows = px.rows
    b0, b1 = px.boxes[rows.mask, 0], px.boxes[rows.mask, 1]
    dr = rows.y - b0                                  # row offset of each mask row
    k = rows.x0 - b1                                  # column offset of pixel nz[i] is nz[i] + k
    if len(rows.nz):
        s1 = np.add.reduceat(rows.nz, rows.first)
        s2 = np.add.reduceat(rows.nz * rows.nz, rows.first)
    else:
        s1 = s2 = rows.nz[:0]
    col_sum = s1 + rows.count * k                     # per mask row: sum of column offsets
    col_sq = s2 + 2 * k * s1 + rows.count * k * k     # ... and of their squares
    count, sr, sc, srr, scc, src = (px.sum(v, per_row=True) for v in (
        rows.count, dr * rows.count, col_sum, dr * dr * rows.count, col_sq, dr * col_sum))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        centroid_row = (sr + count * px.boxes[:, 0]) / count
        centroid_col = (sc + count * px.boxes[:, 1]) / count
        ci, ri, ci_, rri, cci, rci = (v.astype(np.int64) for v in (count, sr, sc, srr, scc, src))
        fits = count * np.maximum(srr, scc) < 2.0 ** 62
        n20 = np.where(fits, (ci * rri - ri * ri).astype(np.float64), count * srr - sr * sr)
        n02 = np.where(fits, (ci * cci - ci_ * ci_).astype(np.float64), count * scc - sc * sc)
        n11 = np.where(fits, (ci * rci - ri * ci_).astype(np.float64), count * src - sr * sc)
        count2 = count * count
        # regionprops' inertia tensor [[a, b], [b, c]]: a = mu02 / mu00, c = mu20 / mu00, b = -mu11 / mu00
        a, c, b = n02 / count2, n20 / count2, -n11 / count2
        half_gap = np.sqrt(((a - c) / 2) ** 2 + b * b)
        l1 = np.maximum((a + c) / 2 + half_gap, 0)
        l2 = np.maximum((a + c) / 2 - half_gap, 0)
        eccentricity = np.where(l1 == 0, 0.0, np.sqrt(1 - l2 / l1))
    orientation = np.where(a - c == 0, np.where(b < 0, np.pi / 4, -np.pi / 4), 0.5 * np.arctan2(-2 * b, c - a))
    return {"area": count, "centroid_row": centroid_row, "centroid_col": centroid_col, "major": 4 * np.sqrt(l1),
            "minor": 4 * np.sqrt(l2), "eccentricity": eccentricity, "orientation": orientation}


# skimage.measure.perimeter: a border pixel's code is 1 + 2 x (border 4-neighbours of the same label)
# + 10 x (border diagonal neighbours of the same label); each code has a length.
_PERIMETER_WEIGHTS = np.zeros(50)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1
_PERIMETER_WEIGHTS[[21, 33]] = sqrt(2)
_PERIMETER_WEIGHTS[[13, 23]] = (1 + sqrt(2)) / 2


def _perimeters(labels: np.ndarray, index: np.ndarray, row: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """regionprops' perimeter (4-connectivity border, Benkrid-Crookes weights) of n labelled objects at once: the
    nuclei here, grown cells in cells/cell_measure.py.

    Per pixel of the objects: `index` (flat, in `labels`), `row` (in `labels`) and `owner`, its object (0 .. n - 1).
    An object's border pixels are its pixels with a 4-neighbour of another label (or off the image); a border
    pixel's code counts its neighbours that are border pixels of the same object, as the per-object crop would see
    them. Everything is read at the objects' pixels only (a tile's nuclei cover a few % of it).
    """
    height, width = labels.shape
    flat = labels.reshape(-1)
    index = np.asarray(index, np.int64)
    row = np.asarray(row, np.int64)
    col = index - row * width
    mine = flat[index]
    # (offset, whether that neighbour is inside the image) for the 4-neighbours, then the diagonals
    up, down, left, right = row > 0, row < height - 1, col > 0, col < width - 1
    straight = ((-width, up), (width, down), (-1, left), (1, right))
    diagonal = ((-width - 1, up & left), (-width + 1, up & right), (width - 1, down & left),
                (width + 1, down & right))

    def same(offset: int, at: np.ndarray, label: np.ndarray, where: np.ndarray) -> np.ndarray:
        """Whether the neighbour at `offset` of pixels `at` (inside the image where `where`) carries `label`."""
        return (flat.take(at + offset, mode="clip") == label) & where    # clipped: off the image, `where` is False

    interior = np.ones(len(index), bool)
    for offset, inside in straight:
        interior &= same(offset, index, mine, inside)
    on_border = ~interior
    border = np.zeros(height * width, bool)         # the objects' border pixels
    border[index[on_border]] = True
    at, label = index[on_border], mine[on_border]
    code = np.ones(len(at), np.intp)
    for weight, offsets in ((2, straight), (10, diagonal)):
        for offset, inside in offsets:
            where = inside[on_border]
            code += weight * (same(offset, at, label, where) & border.take(at + offset, mode="clip"))
    return np.bincount(owner[on_border], weights=_PERIMETER_WEIGHTS[code], minlength=n)


def _lower_hull(nucleus: np.ndarray, t: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Indices of the vertices of each nucleus's lower convex envelope x(t) (points sorted by nucleus, then t).

    Every pass drops all points on or above the chord of their neighbours; such a point is never a vertex,
    so dropping them together is safe, and a few passes (about 5 for nuclei) leave only the envelope.
    """
    keep = np.arange(len(t))
    c, tt, xx = nucleus, t, x
    while len(keep) > 2:
        # (x_k - x_p)(t_n - t_p) >= (x_n - x_p)(t_k - t_p): on or above the chord p-n (slices, no gathers)
        above = ((xx[1:-1] - xx[:-2]) * (tt[2:] - tt[:-2]) >= (xx[2:] - xx[:-2]) * (tt[1:-1] - tt[:-2]))
        above &= (c[:-2] == c[1:-1]) & (c[2:] == c[1:-1])
        if not above.any():
            break
        stay = np.ones(len(keep), bool)
        stay[1:-1] = ~above
        keep, c, tt, xx = keep[stay], c[stay], tt[stay], xx[stay]
    return keep


def _convex_areas(px: _NucleusPixels) -> np.ndarray:
    """Pixel count of each nucleus's convex image, as skimage's convex_hull_image counts it.

    skimage takes the hull of the pixels' edge midpoints (each pixel as a diamond of +-0.5) and counts
    the pixel centres inside or on it. In doubled coordinates (t = 2 row, x = 2 col) those midpoints are
    integers: a row's leftmost pixel contributes (t-1, x), (t, x-1), (t+1, x); the hull's left side is
    the lower convex envelope of those, its right side the upper one of the rightmost pixels' points,
    and each row then holds the integer columns between the two — all in exact integer arithmetic.
    """
    n, rows = px.n, px.rows
    heights = (px.boxes[:, 2] - px.boxes[:, 0]).astype(np.int64)
    offset = np.cumsum(heights) - heights
    n_groups = int(heights.sum())                    # one group per (nucleus, row of its box)
    first = np.zeros(n_groups, np.int64)
    last = np.full(n_groups, -1)
    group = offset[rows.mask] + rows.y - px.boxes[rows.mask, 0]
    left, right = rows.ends()
    first[group] = left - px.boxes[rows.mask, 1]
    last[group] = right - px.boxes[rows.mask, 1]
    present = first <= last
    # Each nucleus gets 2h + 1 slots for t = -1 .. 2h - 1; a row's centre is slot 2r + 1 of its nucleus.
    base = 2 * offset + np.arange(n)
    slot_nucleus = np.repeat(np.arange(n), 2 * heights + 1)
    g_nucleus = np.repeat(np.arange(n), heights)
    centre = base[g_nucleus] + 2 * (np.arange(n_groups) - offset[g_nucleus]) + 1
    left_num, left_den, inside = _side(first, present, -1, centre, base, slot_nucleus)
    right_num, right_den, inside_r = _side(last, present, +1, centre, base, slot_nucleus)
    inside &= inside_r
    # a row holds the columns ceil(left) .. floor(right), with ceil(a / b) = -(-a // b)
    count = right_num[inside] // right_den[inside] + (-left_num[inside]) // left_den[inside] + 1
    return np.bincount(g_nucleus[inside], weights=np.maximum(count, 0), minlength=n)


def _side(extreme: np.ndarray, present: np.ndarray, side: int, centre: np.ndarray, base: np.ndarray,
          slot_nucleus: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One side of every nucleus's hull at every row centre: the boundary column as num / den, and whether
    the row lies within the hull at all. side -1: left (leftmost pixels), +1: right (rightmost)."""
    sign = -side                                     # the right side is the lower envelope of -x
    big = np.iinfo(np.int64).max // 4
    x = np.full(len(slot_nucleus), big)
    c = centre[present]
    x[c] = sign * (2 * extreme[present] + side)      # (2r, 2x -+ 1)
    # (2r -+ 1, 2x): the slot between two rows gets a point from each; the outer one counts
    above = np.full(len(slot_nucleus), big)
    above[c - 1] = sign * 2 * extreme[present]
    x[c + 1] = sign * 2 * extreme[present]
    np.minimum(x, above, out=x)
    points = np.flatnonzero(x < big)
    if points.size == 0:
        return np.zeros(len(centre), np.int64), np.ones(len(centre), np.int64), np.zeros(len(centre), bool)
    nucleus = slot_nucleus[points]
    v = points[_lower_hull(nucleus, points, x[points])]   # slots as t: same order, same differences
    # for each row centre: the last vertex at or before it, and the next one
    marker = np.full(len(slot_nucleus), -1)
    marker[v] = np.arange(len(v))
    i = np.maximum.accumulate(marker)[centre]
    ok = i >= 0
    i = np.maximum(i, 0)
    j = np.minimum(i + 1, len(v) - 1)
    g_nucleus = slot_nucleus[centre]
    at_vertex = v[i] == centre
    ok &= (slot_nucleus[v[i]] == g_nucleus) & (at_vertex | ((j > i) & (slot_nucleus[v[j]] == g_nucleus)))
    dt = np.where(at_vertex, 1, v[j] - v[i])
    num = np.where(at_vertex, x[v[i]], x[v[i]] * dt + (x[v[j]] - x[v[i]]) * (centre - v[i]))
    return sign * num, 2 * dt, ok                     # boundary column = sign * num / (2 dt), exactly


def _mean_std(px: _NucleusPixels, values: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-nucleus mean and (population) standard deviation, two-pass like np.std."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = px.sum(values) / count
        dev = values - mean[px.nucleus]
        return mean, np.sqrt(px.sum(dev * dev) / count)
