"""The vectorised measure_tile against scikit-image's regionprops_table, column by column.

cells/nucleus_measure.py computes regionprops' definitions for a whole tile at once; the reference here is the plain
regionprops_table call it replaced (same properties, intensities as float32 as before). Tolerances:
- exact: ids, classes, scores, boxes, area, centroid (integer sums, same division), solidity (same pixel
  hull, counted exactly), cut flag;
- rtol 1e-9: perimeter, equivalent diameter, axes, eccentricity (closed-form 2x2 eigenvalues instead of
  LAPACK; atol 1e-6 where the true value is 0 and regionprops returns rounding noise);
- orientation: only where the nucleus is not isotropic (l1 - l2 > 1e-6 l1; otherwise the angle is rounding
  noise in regionprops), modulo 180 degrees;
- rtol 1e-5: intensity mean / std (regionprops accumulates the float32 image in float32).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.measure import regionprops_table

from cellseg.cells import label_tile, measure_tile, nucleus_columns, painted_tile
from cellseg.geometry import Box, Instances

CHANNELS = ["dapi", "gfp"]


def random_label_tile(seed: int, height: int = 110, width: int = 130) -> np.ndarray:
    """Touching ellipses of many sizes and angles, thin lines, ragged and two-piece nuclei, nuclei at the edges."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((height, width), np.int32)
    rr, cc = np.mgrid[:height, :width]
    k = 0
    for _ in range(70):
        k += 1
        kind = rng.random()
        r, c = rng.uniform(-3, height + 3), rng.uniform(-3, width + 3)
        if kind < 0.1:                          # a 1 px wide line at any angle
            t = rng.uniform(0, np.pi)
            length = rng.integers(2, 25)
            s = np.linspace(0, length, 4 * length)
            blob = np.zeros_like(labels, bool)
            rows = np.round(r + s * np.sin(t)).astype(int)
            cols = np.round(c + s * np.cos(t)).astype(int)
            ok = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
            blob[rows[ok], cols[ok]] = True
        else:
            a, b = rng.uniform(0.4, 14, size=2)
            t = rng.uniform(0, np.pi)
            u = (rr - r) * np.cos(t) + (cc - c) * np.sin(t)
            v = -(rr - r) * np.sin(t) + (cc - c) * np.cos(t)
            blob = (u / a) ** 2 + (v / b) ** 2 <= 1
            if kind < 0.3:                      # ragged, with holes
                blob &= rng.random(blob.shape) < 0.75
            elif kind < 0.4:                    # two pieces, one nucleus
                blob |= np.roll(blob, (rng.integers(5, 20), rng.integers(5, 20)), axis=(0, 1))
        labels[blob] = k                        # later nuclei cover earlier ones: touching, cut shapes
    return labels


def nuclei_of(labels: np.ndarray, origin: tuple[int, int], rng: np.random.Generator):
    """Instances (slide coordinates) and shuffled, non-consecutive ids of the nuclei of a label image."""
    boxes, masks = [], []
    for value, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is not None:
            boxes.append((sl[0].start + origin[0], sl[1].start + origin[1], sl[0].stop + origin[0],
                          sl[1].stop + origin[1]))
            masks.append(labels[sl] == value)
    n = len(masks)
    order = rng.permutation(n)
    nuclei = Instances(np.asarray(boxes, np.int64).reshape(-1, 4), masks, rng.random(n).astype(np.float32),
                      rng.integers(1, 4, n), np.full(n, 7, np.int64), rng.random(n) < 0.2).take(order)
    ids = rng.choice(np.arange(1, 10 * n + 1), n, replace=False)
    return nuclei, ids


def reference(nuclei: Instances, ids: np.ndarray, labels: np.ndarray, pixels: np.ndarray, box: Box) -> dict:
    """What the regionprops_table version of measure_tile returned (its columns that are measured)."""
    props = regionprops_table(
        labels, intensity_image=pixels.astype(np.float32, copy=False),
        properties=("label", "area", "centroid", "perimeter", "equivalent_diameter_area", "axis_major_length",
                    "axis_minor_length", "eccentricity", "solidity", "orientation", "intensity_mean",
                    "intensity_std", "inertia_tensor_eigvals"))
    row_of = {int(label): i for i, label in enumerate(props["label"])}
    order = np.array([row_of[int(c)] for c in ids], np.int64)
    p = {name: np.asarray(values, np.float64)[order] for name, values in props.items()}
    out = {"centroid_row_px": p["centroid-0"] + box.row0, "centroid_col_px": p["centroid-1"] + box.col0,
           "area_px": p["area"].astype(np.int64), "perimeter_px": p["perimeter"],
           "equivalent_diameter_px": p["equivalent_diameter_area"], "major_axis_px": p["axis_major_length"],
           "minor_axis_px": p["axis_minor_length"], "eccentricity": p["eccentricity"], "solidity": p["solidity"],
           "orientation_deg": np.degrees(p["orientation"]),
           "_l1": p["inertia_tensor_eigvals-0"], "_l2": p["inertia_tensor_eigvals-1"]}
    for k, name in enumerate(CHANNELS):
        out[f"mean_intensity_{name}"] = p[f"intensity_mean-{k}"]
        out[f"std_intensity_{name}"] = p[f"intensity_std-{k}"]
    return out


def check_against_regionprops(nuclei: Instances, ids: np.ndarray, labels: np.ndarray, box: Box, seed: int):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60000, (*labels.shape, len(CHANNELS))).astype(np.uint16)
    got = measure_tile(nuclei, ids, labels, pixels, box, 0.25, CHANNELS, ["nucleus", "other"])
    want = reference(nuclei, ids, labels, pixels, box)
    assert list(got) == list(nucleus_columns(CHANNELS))
    assert all(len(v) == len(ids) for v in got.values())
    # passed through or exact
    np.testing.assert_array_equal(got["cell_id"], ids)
    np.testing.assert_array_equal(got["class_id"], nuclei.class_ids)
    np.testing.assert_array_equal(got["class_name"], [("nucleus", "other", "3")[c - 1] for c in nuclei.class_ids])
    np.testing.assert_array_equal(got["score"], nuclei.scores)
    np.testing.assert_array_equal(got["tile_index"], nuclei.tile_index)
    np.testing.assert_array_equal(got["cut_at_seam"], nuclei.cut)
    for k, name in enumerate(("bbox_row0_px", "bbox_col0_px", "bbox_row1_px", "bbox_col1_px")):
        np.testing.assert_array_equal(got[name], nuclei.boxes[:, k])
    for name in ("area_px", "centroid_row_px", "centroid_col_px", "solidity"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    for name in ("perimeter_px", "equivalent_diameter_px", "major_axis_px", "minor_axis_px", "eccentricity"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-9, atol=1e-6, err_msg=name)
    anisotropic = want["_l1"] - want["_l2"] > 1e-6 * want["_l1"]
    diff = (got["orientation_deg"] - want["orientation_deg"] + 90) % 180 - 90
    np.testing.assert_allclose(diff[anisotropic], 0, atol=1e-6)
    for name in CHANNELS:
        for stat in ("mean", "std"):
            column = f"{stat}_intensity_{name}"
            np.testing.assert_allclose(got[column], want[column], rtol=1e-5, atol=1e-3, err_msg=column)
    # µm columns are the px columns scaled
    np.testing.assert_allclose(got["area_um2"], got["area_px"] * 0.0625)
    for name in ("centroid_row", "centroid_col"):
        np.testing.assert_allclose(got[f"{name}_um"], got[f"{name}_px"] * 0.25)
    for name in ("perimeter", "equivalent_diameter", "major_axis", "minor_axis"):
        np.testing.assert_allclose(got[f"{name}_um"], got[f"{name}_px"] * 0.25)
    return want


@pytest.mark.parametrize("seed", range(12))
def test_every_column_matches_regionprops(seed):
    labels = random_label_tile(seed)
    box = Box(300, 700, 300 + labels.shape[0], 700 + labels.shape[1])
    nuclei, ids = nuclei_of(labels, (box.row0, box.col0), np.random.default_rng(seed))
    painted = label_tile(nuclei, ids, box)
    assert painted.dtype == np.uint32 and painted.shape == box.shape
    relabelled = np.zeros_like(painted)
    for cid, cbox, mask in zip(ids, nuclei.boxes, nuclei.masks):
        relabelled[cbox[0] - box.row0:cbox[2] - box.row0, cbox[1] - box.col0:cbox[3] - box.col0][mask] = cid
    np.testing.assert_array_equal(painted, relabelled)
    want = check_against_regionprops(nuclei, ids, painted, box, seed)
    assert want["solidity"].min() < 0.9 and want["eccentricity"].max() > 0.99   # the shapes were varied


@pytest.mark.parametrize("seed", range(4))
def test_masks_painted_whole_are_measured_without_checking_them_again(seed):
    # painted_tile hands measure_tile the masks' rows when no two overlapped: every column is what measure_tile
    # gives after checking the label image against the masks itself
    labels = random_label_tile(seed)
    box = Box(300, 700, 300 + labels.shape[0], 700 + labels.shape[1])
    nuclei, ids = nuclei_of(labels, (box.row0, box.col0), np.random.default_rng(seed))
    painted, rows = painted_tile(nuclei, ids, box)
    assert rows is not None
    np.testing.assert_array_equal(painted, label_tile(nuclei, ids, box))
    pixels = np.random.default_rng(seed).integers(0, 60000, (*labels.shape, len(CHANNELS))).astype(np.uint16)
    checked = measure_tile(nuclei, ids, painted, pixels, box, 0.25, CHANNELS, ["nucleus", "other"])
    trusted = measure_tile(nuclei, ids, painted, pixels, box, 0.25, CHANNELS, ["nucleus", "other"], rows)
    for column, values in checked.items():
        np.testing.assert_array_equal(trusted[column], values, err_msg=column)


def test_overlapping_masks_are_measured_as_painted():
    """Masks that overlap (not from cells/merge.py): label_tile paints in order, the later nucleus wins, and
    measure_tile measures what the label image holds, as regionprops on it does."""
    box = Box(0, 0, 40, 50)
    disc = np.add.outer((np.arange(15) - 7) ** 2, (np.arange(15) - 7) ** 2) <= 49
    bar = np.ones((4, 30), bool)
    nuclei = Instances(np.array([[5, 5, 20, 20], [10, 12, 25, 27], [14, 2, 18, 32]]), [disc, disc, bar],
                      np.array([0.9, 0.8, 0.7], np.float32), np.array([1, 1, 1]), np.zeros(3, np.int64),
                      np.zeros(3, bool))
    ids = np.array([5, 9, 2])
    labels, rows = painted_tile(nuclei, ids, box)
    assert rows is None                                          # not the masks as they are: measured as painted
    assert (labels == 2).sum() == bar.sum()                      # painted last: whole
    assert (labels == 5).sum() < disc.sum() and (labels == 9).sum() < disc.sum()
    check_against_regionprops(nuclei, ids, labels, box, seed=1)


def test_no_nuclei_gives_empty_columns():
    box = Box(0, 0, 8, 9)
    labels = label_tile(Instances.empty(), np.zeros(0, np.int64), box)
    assert not labels.any()
    rows = measure_tile(Instances.empty(), np.zeros(0, np.int64), labels, np.zeros((8, 9, 2), np.uint8), box,
                        None, CHANNELS, ["nucleus"])
    assert list(rows) == list(nucleus_columns(CHANNELS)) and all(len(v) == 0 for v in rows.values())


def test_nuclei_outside_the_box_are_refused():
    nuclei = Instances(np.array([[0, 0, 3, 3]]), [np.ones((3, 3), bool)], np.array([0.5], np.float32),
                      np.array([1]), np.array([0]), np.array([False]))
    with pytest.raises(ValueError, match="inside"):
        label_tile(nuclei, np.array([1]), Box(1, 1, 10, 10))
