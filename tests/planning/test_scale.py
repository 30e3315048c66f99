"""The scale a count chooses by itself (issue 51, planning.decide_scale): the pixel size with the model's scale in µm,
checked against the measured nuclei; the measured nuclei where there is no pixel size to go by."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cellseg.bundles import MicronScale
from cellseg.geometry import HostInput
from cellseg.planning import Protocol, decide_scale, pixel_size_diameter
from cellseg.slides import SlideInfo

MODEL_PX = 20.0
HE = MicronScale(0.25, 20.0, "40x H&E")       # nuclei of 5 µm, 20 px at 0.25 µm/px
BRIGHTFIELD = Protocol(name="t", modality="brightfield")


def info(mpp: float | None, source: str = "ome") -> SlideInfo:
    return SlideInfo(Path("s.ome.tif"), "ome-tiff", "tifffile", 1000, 1000, 3, np.dtype(np.uint8), None, mpp,
                     source if mpp else "none: no pixel size", ((1000, 1000),))


class Nuclei:
    """measure(factor) for a slide whose nuclei are `diameter` slide px: what the network finds once the slide is
    resampled by `factor`, biased as a real one is far from its training size (nuclei seen smaller than 10 px are
    missed, so the median rises; larger than 30 px are split, so it falls). Records the factors measured at."""

    def __init__(self, diameter: float | None, n: int = 300, split_above: float = 30.0, kept: float = 0.5):
        self.diameter, self.n, self.at = diameter, n, []
        self.split_above, self.kept = split_above, kept    # seen larger: read as split_above + kept * the excess

    def __call__(self, factor: float):
        self.at.append(factor)
        if self.diameter is None:
            return None
        seen = self.diameter * factor
        biased = (seen + 0.5 * (10 - seen) if seen < 10 else
                  self.split_above + self.kept * (seen - self.split_above) if seen > self.split_above else seen)
        return biased / factor, self.n


@pytest.mark.parametrize("mpp, factor", [(0.25, 1.0), (0.5, 2.0), (0.333, 1.332), (0.125, 0.5)])
def test_a_known_pixel_size_resamples_to_the_models_training_pixel_size(mpp, factor):
    nuclei = Nuclei(5.0 / mpp)                  # the pixel size is right
    scale = decide_scale(MODEL_PX, HE, BRIGHTFIELD, info(mpp), nuclei)
    assert scale.factor == pytest.approx(factor, rel=1e-3) and scale.method == "pixel size"
    assert scale.warning is None and "checked" in scale.source and f"{mpp:g} µm/px" in scale.source
    assert scale.pixel_size_diameter_px == pytest.approx(5.0 / mpp) and nuclei.at == [1.0]   # measured once, natively


def test_a_pixel_size_off_by_two_warns_and_the_measured_size_sets_the_scale():
    """A 20x scan (0.5 µm/px, nuclei of 10 px) whose metadata says 0.25 µm/px: the pixel size would leave it native,
    the nuclei say 2x; the warning says which was used."""
    scale = decide_scale(MODEL_PX, HE, BRIGHTFIELD, info(0.25), Nuclei(10.0))
    assert scale.method == "measured" and scale.factor == pytest.approx(2.0, rel=0.2)
    assert scale.warning and "0.25 µm/px" in scale.warning and "the measured size set the scale" in scale.warning
    assert scale.pixel_size_diameter_px == pytest.approx(20.0) and scale.measured_diameter_px < 15
    too_big = decide_scale(MODEL_PX, HE, BRIGHTFIELD, info(0.5), Nuclei(20.0))      # 40x said to be 20x
    assert too_big.warning and too_big.factor == 1.0 and "measured" in too_big.source


@pytest.mark.parametrize("mpp, implied", [(2.5, 2.0), (0.025, 200.0)])
def test_a_pixel_size_off_by_ten_warns_as_one_off_by_two_does(mpp, implied):
    """A 40x scan (nuclei of 20 px) said to be 2.5 or 0.025 µm/px: resampling by the pixel size would go beyond
    1/8-4x, so it sets no scale, but the µm columns are in it: warned all the same."""
    scale = decide_scale(MODEL_PX, HE, BRIGHTFIELD, info(mpp), Nuclei(20.0))
    assert scale.method == "measured" and scale.factor == 1.0
    assert scale.warning and f"{mpp:g} µm/px" in scale.warning and f"implies nuclei of {implied:.1f} px" in scale.warning
    right = decide_scale(MODEL_PX, HE, BRIGHTFIELD, info(2.5), Nuclei(2.0))       # a 4x scan: the pixel size is right
    assert "implies nuclei" not in right.warning and "higher magnification" in right.warning   # nuclei of 2 px: too small


def test_a_right_pixel_size_far_from_the_models_is_not_overruled_by_a_biased_first_read():
    """A 10x scan (1 µm/px) whose nuclei are 1.35x the model's in µm, 6.75 px: at the slide's own scale only the
    largest are found, so they first read 8.4 px, 1.7x the 5 px implied (the H&E mosaic at 0.25x read 10.9 px for
    ~6.9); measured again nearer the model's size they read true, and the right pixel size stands, unwarned."""
    nuclei = Nuclei(6.75)
    scale = decide_scale(MODEL_PX, HE, BRIGHTFIELD, info(1.0), nuclei)
    assert scale.method == "pixel size" and scale.factor == pytest.approx(4.0) and scale.warning is None
    assert len(nuclei.at) > 1 and scale.measured_diameter_px == pytest.approx(6.75, rel=0.05)
    assert "measured again nearer the model's size" in scale.source
    wrong = decide_scale(MODEL_PX, HE, BRIGHTFIELD, info(1.0), Nuclei(13.5))    # a 20x scan said to be 10x
    assert wrong.method == "measured" and wrong.warning and wrong.factor * 13.5 == pytest.approx(MODEL_PX, rel=0.2)


def test_within_the_stated_factor_the_pixel_size_is_trusted():
    scale = decide_scale(MODEL_PX, HE, BRIGHTFIELD, info(0.25), Nuclei(27.0))       # 1.35x the 20 px implied
    assert scale.method == "pixel size" and scale.factor == 1.0 and scale.warning is None
    assert scale.measured_diameter_px == pytest.approx(27.0)


@pytest.mark.parametrize("micron, protocol, slide, why", [
    (None, BRIGHTFIELD, info(0.5), "no scale in µm for brightfield"),
    (None, Protocol(name="t", modality="fluorescence"), info(0.5), "no scale in µm for fluorescence"),
    (HE, BRIGHTFIELD, info(None), "no pixel size"),
    (HE, BRIGHTFIELD, info(0.5, "image-dpi"), "image-dpi"),
    (HE, BRIGHTFIELD, info(3.0), "beyond"),
])
def test_without_a_pixel_size_to_go_by_the_nuclei_are_measured(micron, protocol, slide, why):
    """No scale in µm for the modality (a bundle made before it existed, or fluorescence), no pixel size, one that is
    a guess (a PNG's dpi) or one that would resample too far: --diameter auto by default."""
    implied = pixel_size_diameter(micron, protocol, slide, MODEL_PX)
    assert isinstance(implied, str) and why in implied
    scale = decide_scale(MODEL_PX, micron, protocol, slide, Nuclei(10.0))
    assert scale.method == "measured" and scale.factor == pytest.approx(2.0, rel=0.2)
    assert why in scale.source
    # 3 µm/px implies nuclei of 1.7 px, these measure 10: a pixel size that wrong is said, though it set no scale
    assert (scale.warning is None) == (why != "beyond")


def test_a_measurement_far_from_the_models_size_is_measured_again_nearer_it():
    """Nuclei of 60 px are measured 45 px natively (split); once resampled they measure right, so a 40x slide and
    its 20x copy end at the same network size."""
    for diameter in (60.0, 30.0):        # a 40x slide and its 20x copy
        nuclei = Nuclei(diameter)
        scale = decide_scale(MODEL_PX, None, BRIGHTFIELD, info(None), nuclei)
        assert len(nuclei.at) >= 2 and scale.factor * diameter == pytest.approx(MODEL_PX, rel=0.2)
    native = Nuclei(18.0)
    assert decide_scale(MODEL_PX, None, BRIGHTFIELD, info(None), native).factor == 1.0 and native.at == [1.0]


@pytest.mark.parametrize("diameter", [20.0, 22.0, 35.0, 44.0, 60.0])
def test_a_median_above_the_models_size_is_measured_again_where_large_nuclei_read_true(diameter):
    """Nuclei larger than the network learnt read toward its size whatever their own (the example mosaic at 2x: ~35
    px read as 22.6; here everything seen above 0.9x the model's size reads a quarter of its excess), so a read above
    the model's size is measured again at half the size it implies: nuclei of 35 px end at the model's size, not
    native (where they were, 1.75x it, before), and nuclei at the model's size stay native."""
    nuclei = Nuclei(diameter, split_above=0.9 * MODEL_PX, kept=0.25)
    scale = decide_scale(MODEL_PX, None, BRIGHTFIELD, info(None), nuclei)
    if diameter <= 22.0:
        assert scale.factor == 1.0
    else:
        assert nuclei.at[1] < 0.5 * MODEL_PX / 18 and scale.factor * diameter == pytest.approx(MODEL_PX, rel=0.15)
        assert "above the model's" in scale.source


def test_a_median_below_the_models_size_is_not_measured_again_within_its_band():
    """1/1.2x the model's size keeps the slide native (the mosaic at 1x: 0.85x), measured once."""
    for diameter in (17.0, 19.9):
        nuclei = Nuclei(diameter)
        assert decide_scale(MODEL_PX, None, BRIGHTFIELD, info(None), nuclei).factor == 1.0 and nuclei.at == [1.0]


def test_too_few_nuclei_leave_the_pixel_size_unchecked_or_the_slide_native():
    scale = decide_scale(MODEL_PX, HE, BRIGHTFIELD, info(0.5), Nuclei(None))
    assert scale.factor == 2.0 and "not checked" in scale.source
    scale = decide_scale(MODEL_PX, HE, BRIGHTFIELD, info(None), Nuclei(None))
    assert scale.factor == 1.0 and "too few nuclei" in scale.source


def test_diameter_auto_ignores_the_pixel_size_and_no_model_size_means_native():
    # 0.32 µm/px would resample by 1.28; the nuclei (3.2 µm at it: plausible, so nothing is said) by 2
    scale = decide_scale(MODEL_PX, HE, BRIGHTFIELD, info(0.32), Nuclei(10.0), auto=True)
    assert scale.method == "measured" and scale.factor == pytest.approx(2.0, rel=0.2) and scale.warning is None
    nuclei = Nuclei(10.0)
    assert decide_scale(0.0, HE, BRIGHTFIELD, info(0.25), nuclei).factor == 1.0 and nuclei.at == []


def test_the_protocols_nucleus_size_in_micrometres_counts_as_a_pixel_size_scale():
    protocol = Protocol(name="t", modality="fluorescence", nucleus_diameter_um=10.0)
    scale = decide_scale(MODEL_PX, None, protocol, info(0.25), Nuclei(40.0))       # 10 µm at 0.25 µm/px: 40 px
    assert scale.method == "pixel size" and scale.factor == pytest.approx(0.5) and "nucleus_diameter_um" in scale.source


def test_a_slide_enlarged_for_the_network_keeps_its_pixel_centres_and_levels():
    """planning.intensity.enlarged (bicubic): the shape asked for, a flat image stays flat, and a spot stays where it
    was in slide coordinates (pixel centres as skimage's resize, which the masks are mapped back with)."""
    from skimage.transform import resize

    from cellseg.planning.intensity import enlarged
    flat = np.full((20, 30, 3), 0.4, np.float32)
    out = enlarged(flat, (43, 65))
    assert out.shape == (43, 65, 3) and out.dtype == np.float32 and np.allclose(out, 0.4, atol=1e-6)
    spot = np.zeros((40, 40, 1), np.float32)
    spot[10:13, 25:28] = 1.0                              # centred on pixel (11, 26)
    for factor in (2.0, 2.5):
        size = round(40 * factor)
        big = enlarged(spot, (size, size))[..., 0]
        rows, cols = np.indices(big.shape)
        weights = np.clip(big, 0, None)
        centre = np.array([(rows * weights).sum(), (cols * weights).sum()]) / weights.sum()
        assert centre == pytest.approx(((11 + 0.5) * factor - 0.5, (26 + 0.5) * factor - 0.5), abs=0.05)
        reference = resize(spot[..., 0], (size, size), order=1, preserve_range=True)
        difference = np.abs(big - reference)               # the same picture as bilinear, sharper at the edges
        assert difference.max() < 0.3 and difference.mean() < 0.01


class OneNucleusPerTile(HostInput):
    """Stands in for a calibrated TileDetector: one round nucleus of `diameter` slide px at the centre of each tile's
    core; records the tiles it was asked to detect."""

    def __init__(self, diameter: int):
        self.diameter, self.detected = diameter, []

    def calibrated(self, windows, gray=False):
        return self

    def detect(self, images, tiles, scale=1.0):
        from cellseg.geometry import TileDetections
        self.detected += tiles
        d = self.diameter
        yy, xx = np.mgrid[:d, :d]
        disc = (yy - (d - 1) / 2) ** 2 + (xx - (d - 1) / 2) ** 2 <= (d / 2) ** 2
        found = []
        for tile in tiles:
            r = (tile.core.row0 + tile.core.row1) // 2 - tile.read.row0
            c = (tile.core.col0 + tile.core.col1) // 2 - tile.read.col0
            found.append(TileDetections(np.array([[r, c, r + d, c + d]], np.int64), [disc], np.ones(1, np.float32),
                                        np.ones(1, np.int64)))
        return found


def test_a_measurement_takes_more_tiles_until_it_holds_enough_nuclei(tmp_path):
    """measure_diameter: the busiest MEASURE_TILES tiles, then as many more as it takes to measure MEASURE_NUCLEI
    nuclei (up to MEASURE_TILES_MAX): at a higher magnification a tile holds fewer nuclei, and a fixed number of tiles
    would measure only the slide's busiest corner."""
    import tifffile

    from cellseg.planning import plan
    from cellseg.planning.intensity import measure_range
    from cellseg.slides import open_slide
    rng = np.random.default_rng(0)
    tifffile.imwrite(tmp_path / "s.tif", rng.integers(0, 255, (2048, 2048), dtype=np.uint8), tile=(256, 256))
    protocol = Protocol(name="t", modality="fluorescence", tile_size=256)
    with open_slide(tmp_path / "s.tif") as slide:
        thumbnail, thumb_factor = slide.read_thumbnail(512)
        network = plan.NetworkInput(None, measure_range(thumbnail), scale=plan.Scale(1.0, ""))
        detector = OneNucleusPerTile(12)
        diameter, n = plan.measure_diameter(slide, detector, network, protocol, thumbnail, thumb_factor)
        assert n == len(detector.detected) == min(64, plan.MEASURE_TILES_MAX) > plan.MEASURE_TILES
        assert diameter == pytest.approx(12, rel=0.1)


@pytest.mark.parametrize("diameter, words", [(3.0, "higher magnification"), (400.0, "lower magnification")])
def test_nuclei_too_far_from_the_models_size_for_the_range_are_warned(diameter, words):
    """Nuclei of 3 px (fluorescence at 2 µm/px) would need resampling by ~6.7, beyond the 4 a count goes to: counted
    at 4, they reach the network at 12 px and many are missed or merged, which the scale says."""
    scale = decide_scale(MODEL_PX, None, BRIGHTFIELD, info(None), Nuclei(diameter, split_above=1e9))
    assert scale.factor in (4.0, 1 / 8) and scale.warning and words in scale.warning
    assert "beyond the 0.125-4" in scale.warning
    assert decide_scale(MODEL_PX, None, BRIGHTFIELD, info(None), Nuclei(6.0)).warning is None    # 3.3x: within


FLUORESCENCE = Protocol(name="t", modality="fluorescence")


@pytest.mark.parametrize("mpp, warned", [(0.65, False), (0.3, False), (6.5, True), (0.065, True)])
def test_a_pixel_size_that_makes_the_nuclei_implausible_is_warned_without_a_scale_in_um(mpp, warned):
    """Fluorescence has no nucleus size in µm to check a pixel size against (its training images record none), yet
    the µm columns are in it: a 20x field (nuclei of 15 px, ~10 µm at 0.65 µm/px) said to be 6.5 or 0.065 µm/px makes
    them 98 or 1 µm across, which is said; at 0.3 µm/px they are 4.5 µm, small but plausible: nothing said."""
    scale = decide_scale(MODEL_PX, None, FLUORESCENCE, info(mpp), Nuclei(15.0))
    assert scale.method == "measured"                       # the scale is the measurement's, as before
    assert (scale.warning is not None) == warned
    if warned:
        assert f"{mpp:g} µm/px" in scale.warning and "Check the pixel size" in scale.warning
    # a guessed pixel size (a PNG's dpi) is not one to check; --diameter auto checks it all the same
    assert decide_scale(MODEL_PX, None, FLUORESCENCE, info(mpp, "image-dpi"), Nuclei(15.0)).warning is None
    assert (decide_scale(MODEL_PX, None, FLUORESCENCE, info(mpp), Nuclei(15.0), auto=True).warning is None) != warned


def test_non_finite_pixels_leave_a_tiles_contrast_ranked_on_its_finite_ones():
    """A float slide's NaN or infinite pixels (a registered image's padding) made a tile's contrast NaN, which ranks
    anywhere among the tiles measured (and printed numpy's warnings); they are left out, a tile of nothing else is
    as flat as glass."""
    import warnings

    from cellseg.geometry import Box
    from cellseg.planning.plan import thumbnail_contrast
    thumb = np.zeros((8, 8), np.float32)
    thumb[:4, :4] = np.arange(16, dtype=np.float32).reshape(4, 4)
    thumb[0, 0], thumb[1, 1] = np.inf, np.nan
    thumb[4:, 4:] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert thumbnail_contrast(thumb, Box(0, 0, 4, 4), 1.0) == pytest.approx(np.delete(np.arange(16), [0, 5]).std())
        assert thumbnail_contrast(thumb, Box(4, 4, 8, 8), 1.0) == 0.0
