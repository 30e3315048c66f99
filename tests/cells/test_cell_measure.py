"""Cell and cytoplasm columns (cellseg.cells.cell_measure): regionprops' values for cells and cytoplasm, the cytoplasm
is the cell minus its nucleus, stain optical densities on a synthetic IHC image, same columns with no cells."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.color import hed2rgb, rgb2hed
from skimage.measure import regionprops_table

from cellseg.cells import (
    expand_nuclei,
    expanded_columns,
    measure_expanded,
    stain_densities,
    stain_white,
    stains_apply,
)

from ..helpers import random_nuclei

NAMES = ["dapi", "marker"]


def test_columns_declared_once_and_stains_only_for_brightfield_rgb():
    plain = expanded_columns(NAMES, stains=False)
    assert list(plain)[:5] == ["cell_area_px", "cell_area_um2", "cell_perimeter_px", "cell_perimeter_um",
                               "nucleus_cell_area_ratio"]
    for name in NAMES:
        for column in ("cell_mean_intensity_", "cell_std_intensity_", "cytoplasm_mean_intensity_",
                       "cytoplasm_std_intensity_"):
            assert column + name in plain
    stained = expanded_columns(["red", "green", "blue"], stains=True)
    od = [c for c in stained if "_od_" in c]
    assert od == [f"{part}_{stain}_od_{stat}" for part in ("nucleus", "cytoplasm")
                  for stain in ("hematoxylin", "dab") for stat in ("mean", "std")]
    assert not any("_od_" in c for c in plain)
    assert stains_apply("brightfield", 3) and not stains_apply("fluorescence", 3) and not stains_apply("brightfield", 1)


@pytest.mark.parametrize("stains", [False, True])
def test_no_cells_give_the_same_columns_empty(stains):
    names = ["red", "green", "blue"]
    out = measure_expanded(np.zeros(0, np.int64), np.zeros((8, 9), np.uint32), np.zeros((8, 9), np.uint32),
                           np.zeros((8, 9, 3), np.uint8), 0.5, names, stains)
    columns = expanded_columns(names, stains)
    assert list(out) == list(columns)
    for name, dtype in columns.items():
        assert len(out[name]) == 0 and out[name].dtype == np.dtype(dtype), name


def test_values_are_regionprops_of_the_cell_and_of_the_cell_minus_its_nucleus():
    nuclei = random_nuclei((70, 80), 40, seed=7, max_radius=4)
    nuclei[10:13, 10:13] = 900
    nuclei[11, 11] = 901                                        # hemmed in by 900: no cytoplasm
    cells = expand_nuclei(nuclei, 4.0)
    pixels = np.random.default_rng(0).integers(0, 4096, (70, 80, 2)).astype(np.uint16)
    ids = np.unique(nuclei[nuclei > 0])[::-1].copy()           # any row order
    out = measure_expanded(ids, cells, nuclei, pixels, 0.5, NAMES, stains=False)
    props = ["label", "area", "perimeter", "intensity_mean", "intensity_std"]
    cell = regionprops_table(cells, pixels, properties=props)
    order = np.searchsorted(cell["label"], ids)
    np.testing.assert_array_equal(out["cell_area_px"], cell["area"][order])
    np.testing.assert_allclose(out["cell_area_um2"], cell["area"][order] * 0.25)
    np.testing.assert_allclose(out["cell_perimeter_px"], cell["perimeter"][order])
    np.testing.assert_allclose(out["cell_perimeter_um"], cell["perimeter"][order] * 0.5)
    nucleus_area = regionprops_table(nuclei, properties=["label", "area"])
    np.testing.assert_allclose(out["nucleus_cell_area_ratio"],
                               nucleus_area["area"][np.searchsorted(nucleus_area["label"], ids)] / cell["area"][order])
    cytoplasm_labels = np.where(nuclei == 0, cells, 0)
    cyto = regionprops_table(cytoplasm_labels, pixels, properties=["label", "intensity_mean", "intensity_std"])
    has = np.isin(ids, cyto["label"])
    assert not has[ids == 901].any() and has.sum() > len(ids) // 2
    at = np.searchsorted(cyto["label"], ids[has])
    for k, name in enumerate(NAMES):
        np.testing.assert_allclose(out[f"cell_mean_intensity_{name}"], cell[f"intensity_mean-{k}"][order])
        np.testing.assert_allclose(out[f"cell_std_intensity_{name}"], cell[f"intensity_std-{k}"][order])
        np.testing.assert_allclose(out[f"cytoplasm_mean_intensity_{name}"][has], cyto[f"intensity_mean-{k}"][at])
        np.testing.assert_allclose(out[f"cytoplasm_std_intensity_{name}"][has], cyto[f"intensity_std-{k}"][at])
        assert np.isnan(out[f"cytoplasm_mean_intensity_{name}"][~has]).all()


def test_cytoplasm_is_the_cell_minus_its_nucleus():
    """Nuclei at 200, the rest at 50 and 10 on alternate rows: the cytoplasm sees exactly the rest, the cell both."""
    nuclei = random_nuclei((50, 60), 15, seed=9, max_radius=4)
    cells = expand_nuclei(nuclei, 3.0)
    rows = np.indices(nuclei.shape)[0]
    pixels = np.where(nuclei > 0, 200, np.where(rows % 2, 50, 10)).astype(np.uint8)[..., None]
    ids = np.unique(nuclei[nuclei > 0])
    out = measure_expanded(ids, cells, nuclei, pixels, None, ["c0"], stains=False)
    for k, cid in enumerate(ids):
        cytoplasm = (cells == cid) & (nuclei != cid)
        if not cytoplasm.any():
            continue
        assert out["cytoplasm_mean_intensity_c0"][k] == pytest.approx(pixels[cytoplasm, 0].mean())
        assert out["cytoplasm_std_intensity_c0"][k] == pytest.approx(pixels[cytoplasm, 0].std())
        assert out["cell_area_px"][k] == (nuclei == cid).sum() + cytoplasm.sum()
        assert out["nucleus_cell_area_ratio"][k] == pytest.approx((nuclei == cid).sum() / (cells == cid).sum())
    assert np.isnan(out["cell_area_um2"]).all()                 # no pixel size: µm columns empty


def test_labels_not_asked_for_are_left_out_and_absent_cells_are_empty():
    nuclei = random_nuclei((30, 30), 6, seed=5, max_radius=3)
    cells = expand_nuclei(nuclei, 2.0)
    ids = np.unique(nuclei[nuclei > 0])
    out = measure_expanded(np.r_[ids[:2], 999_999], cells, nuclei, np.ones((30, 30, 1)), 1.0, ["c0"], False)
    np.testing.assert_array_equal(out["cell_area_px"][:2], [(cells == i).sum() for i in ids[:2]])
    assert out["cell_area_px"][2] == 0 and np.isnan(out["cell_mean_intensity_c0"][2])


@pytest.mark.parametrize("bits", [8, 12])
def test_dab_and_hematoxylin_optical_densities_of_a_synthetic_ihc_image(bits):
    """Nuclei of hematoxylin OD 0.5; around each a DAB ring of OD 0.4 (positive cells) or none (negative),
    wider than the expansion; glass elsewhere. An 8-bit RGB made with skimage's hed2rgb from those densities, or a
    12-bit camera's stored in 16 bits (white 4095: stain_white finds it from the brightest pixels)."""
    shape = (64, 96)
    rows, cols = np.indices(shape)
    nuclei = np.zeros(shape, np.int32)
    dab = np.zeros(shape)
    centres = {1: (16, 16, 0.4), 2: (16, 48, 0.0), 3: (16, 80, 0.4), 4: (48, 16, 0.0), 5: (48, 48, 0.4),
               6: (48, 80, 0.0)}
    for cid, (r, c, ring_od) in centres.items():
        d2 = (rows - r) ** 2 + (cols - c) ** 2
        nuclei[d2 <= 25] = cid
        dab[(d2 > 25) & (d2 <= 13 ** 2)] = ring_od
    hed = np.zeros(shape + (3,))
    hed[..., 0] = np.where(nuclei > 0, 0.5, 0.0) / 6           # rgb2hed / hed2rgb units are OD / 6
    hed[..., 2] = dab / 6
    top = 2 ** bits - 1
    rgb = np.round(hed2rgb(hed) * top).astype(np.uint8 if bits == 8 else np.uint16)
    white = stain_white(rgb.dtype, float(rgb.max()))
    assert white == top
    cells = expand_nuclei(nuclei, 6.0)
    ids = np.array(sorted(centres))
    out = measure_expanded(ids, cells, nuclei, rgb, 0.25, ["red", "green", "blue"], stains=True, white=white)
    ring = np.array([centres[i][2] for i in ids])
    np.testing.assert_allclose(out["cytoplasm_dab_od_mean"], ring, atol=0.02)
    np.testing.assert_allclose(out["nucleus_hematoxylin_od_mean"], 0.5, atol=0.02)
    np.testing.assert_allclose(out["nucleus_dab_od_mean"], 0.0, atol=0.02)
    np.testing.assert_allclose(out["cytoplasm_hematoxylin_od_mean"], 0.0, atol=0.02)
    assert (out["cytoplasm_dab_od_std"] < 0.02).all() and (out["nucleus_hematoxylin_od_std"] < 0.02).all()
    positive = out["cytoplasm_dab_od_mean"] > 0.2              # a usual DAB positivity threshold
    np.testing.assert_array_equal(positive, ring > 0)
    if bits == 12:      # against the 16-bit full scale the glass itself reads as stain
        full_scale = measure_expanded(ids, cells, nuclei, rgb, 0.25, ["red", "green", "blue"], stains=True)
        assert (full_scale["cytoplasm_dab_od_mean"] > 0.2).all()


def test_stain_white_is_the_full_scale_of_the_bits_used():
    assert stain_white(np.uint8, 100.0) == 255
    assert [stain_white(np.uint16, b) for b in (200.0, 4000.0, 4095.0, 4096.0, 30000.0, 65535.0, None)] == [
        255, 4095, 4095, 8191, 32767, 65535, 65535]
    assert stain_white(np.float32, 0.9) is None


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float64])
def test_stain_densities_are_rgb2hed_in_log10_units(dtype):
    rng = np.random.default_rng(1)
    top = 1.0 if dtype == np.float64 else np.iinfo(dtype).max
    rgb = (rng.random((500, 3)) * top).astype(dtype)
    rgb[:3] = [[0, 0, 0], [top, top, top], [top, 0, top]]      # black (clipped at 1e-6), glass, one dark channel
    np.testing.assert_allclose(stain_densities(rgb), rgb2hed(rgb)[:, [0, 2]] * 6, rtol=1e-12, atol=1e-12)
    assert stain_densities(rgb[:0]).shape == (0, 2)
