"""A slide that looks like another modality than its protocol's is said so (planning/modality.py)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import tifffile

from cellseg.planning import images_warning, load_protocol, modality_warning, slide_look

from ..helpers import DATA, LabelReadingDetector, count_with, random_cells


def _image(ground, nuclei, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(256, 256, C) uint8 pixels: `ground` everywhere, `nuclei` (same channels) inside random nuclei; the labels."""
    labels = random_cells(256, 256, 14, 120, seed)
    rng = np.random.default_rng(seed)
    pixels = np.where(labels[..., None] > 0, nuclei, ground).astype(np.float32)
    pixels += rng.normal(0, 3, pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8), labels


@pytest.mark.parametrize("ground, nuclei, colour, expected", [
    ((10,), (200,), False, "fluorescence"),                     # DAPI: bright nuclei on black
    ((5, 5, 10), (20, 30, 220), True, "fluorescence"),          # the same saved as a blue RGB picture
    ((235, 190, 220), (90, 60, 150), True, "brightfield"),      # H&E: purple nuclei on pink
    ((230,), (70,), False, "brightfield"),                      # gray brightfield: dark nuclei on light glass
])
def test_what_a_slide_looks_like(ground, nuclei, colour, expected):
    pixels, _ = _image(ground, nuclei)
    look = slide_look(pixels, colour)
    assert look.modality == expected
    assert (look.light_ground > 0.5) == (expected == "brightfield")


def test_a_pale_h_and_e_patch_full_of_nuclei_is_still_described_as_brightfield():
    """Dense H&E: the median pixel low in the range (NuInsSeg's lowest is 0.235), still colour brightfield, and the
    warning's words agree with it."""
    nuclei = np.tile([[90, 60, 150]], (4500, 1))                                 # 45 % of the pixels
    stroma = np.linspace([150, 110, 150], [240, 200, 230], 5500)                  # pale to pink
    look = slide_look(np.concatenate([nuclei, stroma]).astype(np.uint8), True)
    assert look.modality == "brightfield" and look.light_ground < 0.5
    assert "darker than their ground" in look.describe()


def test_nothing_claimed_where_it_cannot_be_told():
    assert slide_look(np.full((64, 64, 1), 7, np.uint8), False).modality is None     # flat: no nuclei
    # a gray field whose median lies mid-range: dense fluorescence sections and pale smears both do
    mid = np.concatenate([np.full(400, 20), np.full(600, 120), np.full(400, 220)]).astype(np.uint8)[:, None]
    look = slide_look(mid, False)
    assert look.modality is None and 0.5 <= look.light_ground < 0.8


def test_the_warning_names_the_protocol_to_use():
    he, _ = _image((235, 190, 220), (90, 60, 150))
    look = slide_look(he, True)
    assert modality_warning(look, "he-nuclei", "brightfield") is None
    text = modality_warning(look, "fluorescence-nuclei", "fluorescence", mpp=0.25)
    assert "looks like brightfield" in text and "--protocol he-nuclei" in text and "fluorescence-nuclei" in text
    assert "--mpp" not in text
    # he-nuclei needs the pixel size: an image without one is told to give it, or the suggested count would fail
    assert "--protocol he-nuclei --mpp" in modality_warning(look, "fluorescence-nuclei", "fluorescence", mpp=None)
    fluo, _ = _image((10,), (200,))
    to_fluorescence = modality_warning(slide_look(fluo, False), "he-nuclei", "brightfield")
    assert "--protocol fluorescence-nuclei, or" in to_fluorescence      # no pixel size needed there


def test_a_fine_tune_s_images_are_checked_together():
    """cellseg train warns when some of its images look like the other modality (counted), not when none can be
    told or all match."""
    he = slide_look(_image((235, 190, 220), (90, 60, 150))[0], True)
    fluo = slide_look(_image((10,), (200,))[0], False)
    flat = slide_look(np.full((64, 64, 1), 7, np.uint8), False)
    assert images_warning([fluo, flat, fluo], "fluorescence-nuclei", "fluorescence") is None
    text = images_warning([fluo, he, flat, he], "fluorescence-nuclei", "fluorescence")
    assert text.startswith("2 of the 4 images look like brightfield") and "--protocol he-nuclei" in text
    assert "--protocol fluorescence-nuclei" in images_warning([he, fluo], "he-nuclei", "brightfield")


@pytest.mark.slow
def test_a_count_with_the_wrong_protocol_warns_at_once_and_in_the_summary(tmp_path, he_png, caplog):
    """The stained-tissue test image counted with the default fluorescence protocol: warned when planned (before any
    tile is detected), in summary.json and among the report's warnings; with he-nuclei, not."""
    labels = tifffile.imread(DATA / "dsb_he_labels.tif")
    with caplog.at_level(logging.WARNING, logger="cellseg"):
        summary = count_with(LabelReadingDetector(labels), he_png, tmp_path / "fluo", load_protocol("fluorescence-nuclei"))
    looks = summary["looks_like"]
    assert looks["modality"] == "brightfield" and looks["colour"] and looks["protocol_modality"] == "fluorescence"
    assert "--protocol he-nuclei" in looks["warning"]
    assert any("--protocol he-nuclei" in r.getMessage() for r in caplog.records)
    written = json.loads((tmp_path / "fluo" / "summary.json").read_text())
    assert looks["warning"] in written["warnings"]
    summary = count_with(LabelReadingDetector(labels), he_png, tmp_path / "he", load_protocol("he-nuclei"), mpp=0.5)
    assert summary["looks_like"]["modality"] == "brightfield" and summary["looks_like"]["warning"] is None


def test_a_fluorescence_image_with_its_protocol_is_not_warned(tmp_path, fluo_png):
    labels = tifffile.imread(DATA / "dsb_fluo_labels.tif")
    summary = count_with(LabelReadingDetector(labels), fluo_png, tmp_path / "out", load_protocol("fluorescence-nuclei"))
    assert summary["looks_like"]["modality"] == "fluorescence" and summary["looks_like"]["warning"] is None
