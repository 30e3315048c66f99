"""The stain of a colour slide's nuclei read from cells.csv's mean colours (the report's "Nuclear stain" chart when
nuclei are not grown into cells, and the appearance check's stain features): hematoxylin and DAB optical densities,
the same for an 8-bit slide and its 16-bit copy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellseg.bundles.appearance import BundleAppearance
from cellseg.cells import stain_densities
from cellseg.results.appearance import appearance_features
from cellseg.results.report import intensity_values

COLOURS = np.array([[120, 80, 160], [90, 60, 140], [200, 150, 190]] * 2, np.float64)   # hematoxylin-blue nuclei


def _cells(scale: float) -> pd.DataFrame:
    return pd.DataFrame({"mean_intensity_red": COLOURS[:, 0] * scale, "mean_intensity_green": COLOURS[:, 1] * scale,
                         "mean_intensity_blue": COLOURS[:, 2] * scale, "std_intensity_red": 1.0,
                         "area_px": 300.0, "score": 0.95})


@pytest.mark.parametrize("dtype, scale", [("uint8", 1.0), ("uint16", 257.0)])
def test_the_reports_nuclear_stain_of_a_colour_slide_is_hematoxylin_od_in_its_own_range(dtype, scale):
    values, label = intensity_values(_cells(scale), {"channels": 3, "dtype": dtype})
    assert label == "hematoxylin OD of the nucleus's mean colour"          # not the red channel's intensity
    np.testing.assert_allclose(values, stain_densities(COLOURS.astype(np.uint8))[:, 0], rtol=0.02)


def test_the_appearance_stains_are_hematoxylin_and_dab_alike_for_8_and_16_bit():
    summary = {"channels": 3, "scale": {"factor": 1.0, "model_diameter_px": 20.0}, "tissue_area_px": 1e5}
    run = {"intensity_range": [0, 255]}
    eight = appearance_features({**summary, "dtype": "uint8"}, run, _cells(1.0))
    sixteen = appearance_features({**summary, "dtype": "uint16"}, {"intensity_range": [0, 65535]}, _cells(257.0))
    h, dab = stain_densities(np.median(COLOURS, axis=0).astype(np.uint8)[None])[0]
    assert eight["stain_h"] == pytest.approx(h) and eight["stain_dab"] == pytest.approx(dab)
    assert sixteen["stain_h"] == pytest.approx(h, rel=0.02) and sixteen["stain_dab"] == pytest.approx(dab, abs=0.01)
    assert "stain_e" not in eight


def test_a_bundles_appearance_reference_from_before_the_rename_reads_its_dab_feature_as_such():
    shipped = Path(__file__).parents[2] / "cellseg" / "models" / "nuclei"
    reference = BundleAppearance.read(shipped).keys["brightfield"]
    assert "stain_dab" in reference.features and "stain_e" not in reference.features
