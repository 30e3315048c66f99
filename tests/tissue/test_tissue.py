"""Tissue prefilter in the pipeline: masks, skipped tiles, reporting, panoptic output, slides with no tissue."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellseg.errors import ProtocolError
from cellseg.geometry import Box
from cellseg.planning import Protocol, load_protocol
from cellseg.tissue.finder import TissueFinder, TissueMask, disk, otsu_tissue, view_side

from ..helpers import LabelReadingDetector, count_with, random_cells


def cells_in_corner(size: int = 512, corner: int = 150, seed: int = 3) -> np.ndarray:
    """Cells only in the top-left `corner` x `corner` px; the rest of the slide is empty."""
    labels = np.zeros((size, size), np.int32)
    labels[:corner, :corner] = random_cells(corner, corner, max_diameter=12, n=120, seed=seed)
    return labels


def fluorescence_slide(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Dark noisy field (mean 10) with bright cells (~180)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(10, 2, labels.shape) + (labels > 0) * 170
    return np.clip(img, 0, 255).astype(np.uint8)


def count(tmp_path, labels, image, method, mpp=0.5, tile=64, halo=16, **protocol):
    slide = tmp_path / "slide.ome.tif"
    tifffile.imwrite(slide, image, metadata={"axes": "YX" if image.ndim == 2 else "YXS",
                                             "PhysicalSizeX": mpp, "PhysicalSizeY": mpp})
    out = tmp_path / f"out-{method}"
    detector = LabelReadingDetector(labels)
    p = Protocol(name="t", tile_size=tile, halo_px=halo, batch_size=3, min_area_px=1, tissue_method=method, **protocol)
    summary = count_with(detector, slide, out, p)
    return summary, out, detector.seen


def test_mask_geometry():
    mask = np.zeros((4, 8), bool)
    mask[0, :2] = True                      # rows 0-9, cols 0-19 of a 40 x 80 slide
    t = TissueMask(mask, 10.0, 10.0, "otsu")
    assert t.area_px() == 200.0
    assert t.box_fraction(Box(0, 0, 10, 20)) == 1.0
    assert t.box_fraction(Box(0, 0, 20, 40)) == 2 / 8
    assert t.box_fraction(Box(20, 40, 40, 80)) == 0.0
    assert t.box_fraction(Box(5, 15, 6, 16)) == 1.0   # a box inside one mask pixel
    assert t.at(np.array([0, 9, 10]), np.array([19, 20])).tolist() == [[True, False], [True, False], [False, False]]


def test_tissue_at_any_pixels_is_the_mask_pixel_each_falls_in():
    # `at` repeats the mask pixels that runs of equal indices sample (panoptic.ome.tif's tiles): the same as
    # indexing the mask once per level-0 pixel, for any factors, strides, orders and empty selections
    rng = np.random.default_rng(1)
    for trial in range(200):
        mask = rng.random((int(rng.integers(1, 40)), int(rng.integers(1, 40)))) < 0.5
        row_factor, col_factor = float(rng.uniform(0.3, 20)), float(rng.uniform(0.3, 20))
        t = TissueMask(mask, row_factor, col_factor, "otsu")
        height = max(1, int(mask.shape[0] * row_factor))
        rows = rng.integers(0, height, int(rng.integers(0, 300)))
        if trial % 2:
            rows = np.sort(rows)
        cols = np.arange(int(rng.integers(0, 300))) * int(rng.integers(1, 4))
        ri = np.minimum((rows // row_factor).astype(int), mask.shape[0] - 1)
        ci = np.minimum((cols // col_factor).astype(int), mask.shape[1] - 1)
        got = t.at(rows, cols)
        assert got.dtype == bool and np.array_equal(got, mask[ri][:, ci]), trial


@pytest.mark.parametrize("radius", [0, 1, 2, 3, 7, 16])
def test_the_tissue_margin_disk_is_scikit_images(radius):
    from skimage.morphology import disk as skimage_disk
    assert np.array_equal(disk(radius), skimage_disk(radius).astype(bool))


def test_view_side_is_about_8_um_per_px_and_never_tiny():
    assert view_side(40000, 30000, 0.25) == 1250
    assert view_side(4096, 4096, 0.5) == 256
    assert view_side(4096, 4096, None) == 256           # 0.5 µm/px assumed
    assert view_side(300, 200, 0.5) == 64                # at least 64 px ...
    assert view_side(40, 30, 0.5) == 40                  # ... but never finer than the slide


def test_otsu_finds_the_cells_and_not_the_glass():
    labels = cells_in_corner()
    fluo = fluorescence_slide(labels).reshape(64, 8, 64, 8).mean(axis=(1, 3))[..., None]   # an 8x block-mean view
    mask, _ = otsu_tissue(fluo, "fluorescence")
    assert mask[:15, :15].mean() > 0.8 and mask[30:, 30:].mean() < 0.01
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(235, 2, (64, 64, 3)), 0, 255).astype(np.uint8)
    assert not otsu_tissue(glass, "brightfield")[0].any()
    he = glass.copy()
    he[10:30, 10:40] = (150, 80, 160)                    # a purple stain patch
    mask, _ = otsu_tissue(he, "brightfield")
    assert mask[12:28, 12:38].all() and mask[40:].sum() == 0


@pytest.mark.slow
def test_background_tiles_are_skipped_and_no_cell_is_lost(tmp_path):
    labels = cells_in_corner()
    image = fluorescence_slide(labels)
    full, _, seen_full = count(tmp_path, labels, image, "none")
    pre, out, seen = count(tmp_path, labels, image, "otsu")
    assert full["tiles_total"] == pre["tiles_total"] == 64 and full["tiles_skipped"] == 0
    assert pre["tiles_skipped"] >= 40 and len(seen) == 64 - pre["tiles_skipped"]     # the detector never saw them
    assert sorted(seen_full) == list(range(64))
    assert pre["cell_count"] == full["cell_count"] > 50
    a = tifffile.imread(tmp_path / "out-none" / "labels.ome.tif")
    b = tifffile.imread(out / "labels.ome.tif")
    assert np.array_equal(a, b)
    # reported: area of the mask in mm² and the density of cells on it
    assert 0 < pre["tissue_area_mm2"] < full["tissue_area_mm2"] == pytest.approx(512 * 512 * 0.25 / 1e6)
    assert pre["cells_per_mm2"] == pytest.approx(pre["cell_count"] / pre["tissue_area_mm2"])
    assert pre["tissue_method"] == "otsu" and "otsu" in pre["tissue_note"]
    png = np.asarray(Image.open(out / "tissue_mask.png"))
    assert png.dtype == np.uint8 and set(np.unique(png)) == {0, 255}
    assert png[: png.shape[0] // 5, : png.shape[1] // 5].mean() > 200 and png[-10:, -10:].max() == 0


@pytest.mark.slow
def test_panoptic_image_combines_tissue_and_cells(tmp_path):
    labels = cells_in_corner()
    summary, out, _ = count(tmp_path, labels, fluorescence_slide(labels), "otsu")
    info = summary["panoptic"]
    d = info["label_divisor"]
    assert d == 1000 and info["semantic"] == {"0": "background", "1": "tissue", "2": "nucleus"}
    with tifffile.TiffFile(out / "panoptic.ome.tif") as tif:
        levels = [tif.series[0].levels[k].asarray() for k in range(len(tif.series[0].levels))]
    pan, inst = levels[0], tifffile.imread(out / "labels.ome.tif")
    semantic, instance = pan // d, pan % d
    assert np.array_equal(instance, inst)                                # things keep their cell ids
    assert (semantic[inst > 0] == 2).all()
    tissue = np.asarray(Image.open(out / "tissue_mask.png")) > 0
    stuff = semantic[inst == 0]
    assert set(np.unique(stuff)) == {0, 1}
    scale = 512 // tissue.shape[0]
    expected = np.repeat(np.repeat(tissue, scale, 0), scale, 1)[inst == 0]
    assert np.array_equal(stuff == 1, expected)
    for k, level in enumerate(levels[1:], start=1):                      # the pyramid agrees with level 0
        assert np.array_equal(level, pan[::2 ** k, ::2 ** k])


def test_a_slide_without_tissue_gives_zero_cells_and_a_clear_summary(tmp_path):
    labels = np.zeros((256, 256), np.int32)
    summary, out, seen = count(tmp_path, labels, np.full((256, 256), 7, np.uint8), "otsu")
    assert summary["cell_count"] == 0 and seen == []
    assert summary["tiles_skipped"] == summary["tiles_total"] == 16
    assert summary["tissue_area_mm2"] == 0.0 and summary["cells_per_mm2"] is None
    assert "no tissue" in summary["cells_per_mm2_note"]
    assert (out / "cells.csv").read_text().startswith("cell_id,")
    assert json.loads((out / "summary.json").read_text())["tiles_skipped"] == 16
    assert not tifffile.imread(out / "panoptic.ome.tif").any()


def test_protocol_tissue_settings_are_checked(tmp_path):
    assert load_protocol("fluorescence-nuclei").tissue_method == "unet"
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[tissue]\ntissue_method = "magic"\n')
    with pytest.raises(ProtocolError, match="tissue_method"):
        load_protocol(bad)
    bad.write_text('name = "x"\n[tissue]\nmin_tissue_fraction = 1.5\n')
    with pytest.raises(ProtocolError, match="min_tissue_fraction"):
        load_protocol(bad)
    with pytest.raises(Exception, match="min_tissue_fraction: expected between 0.0 and 1.0"):
        load_protocol("fluorescence-nuclei").replace(min_tissue_fraction=-0.1)
    with pytest.raises(Exception, match="tissue method"):
        TissueFinder("magic")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["glass", "dark"])
def test_cellseg_count_on_a_slide_with_no_tissue_exits_0_with_zero_cells(tmp_path, tiny_bundle, kind, caplog):
    from click.testing import CliRunner

    from cellseg.cli import main
    rng = np.random.default_rng(0)
    if kind == "glass":     # brightfield glass with dust specks, through the he-nuclei protocol
        image = np.clip(rng.normal(232, 2, (1024, 1024, 3)), 0, 255).astype(np.uint8)
        image[rng.integers(0, 1024, 40), rng.integers(0, 1024, 40)] = 90
        args = ["--protocol", "he-nuclei", "--mpp", "0.5"]
    else:                   # fluorescence dark field with camera noise
        image = np.clip(rng.normal(12, 3, (1024, 1024)), 0, 255).astype(np.uint8)
        args = ["--mpp", "0.5"]
    slide = tmp_path / f"{kind}.tif"
    tifffile.imwrite(slide, image)
    result = CliRunner().invoke(main, ["count", str(slide), "-q", "--device", "cpu", "--model", str(tiny_bundle),
                                       "--tile-size", "256", *args])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / f"{kind}.cellseg" / "summary.json").read_text())
    assert summary["tissue_method"] == "unet" and summary["cell_count"] == 0
    assert summary["tiles_skipped"] == summary["tiles_total"] == 16
    assert summary["tissue_area_mm2"] == 0.0 and summary["cells_per_mm2"] is None
    assert "no tissue" in summary["cells_per_mm2_note"]
    # said as the count starts and first on the report: a bare "0 cells" reads as a finding (a dim slide, the
    # wrong channel), which it is not
    said = "no tissue found by the unet prefilter: every tile was skipped, so the count of 0 says nothing"
    assert any(said in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert summary["warnings"][0].startswith(said)


@pytest.mark.slow
def test_unet_keeps_the_tiles_with_cells_and_skips_the_glass(tmp_path):
    labels = cells_in_corner(size=1024, corner=300)
    summary, out, seen = count(tmp_path, labels, fluorescence_slide(labels), "unet", tile=128, halo=16)
    assert summary["tissue_method"] == "unet" and summary["tiles_total"] == 64
    assert summary["tiles_skipped"] >= 40
    assert summary["cell_count"] == len(np.unique(labels)) - 1     # every cell still found


def test_intensity_range_is_measured_on_tissue_not_on_the_glass():
    from cellseg.planning import measure_range, tissue_pixels
    thumb = np.full((200, 200, 1), 10, np.uint8)
    thumb[:4, :10] = 180                                    # 0.1 % of the slide holds (bright) cells
    mask = np.zeros((20, 20), bool)
    mask[:1, :1] = True                                     # the tissue mask, 10x coarser
    t = TissueMask(mask, 20.0, 20.0, "unet")                # on a 400 x 400 slide
    assert measure_range(thumb).high < 20                   # whole thumbnail: the glass decides
    assert measure_range(tissue_pixels(thumb, t, 400, 400, min_pixels=50)).high == 180
    # too little tissue to measure on: the whole thumbnail
    assert tissue_pixels(thumb, t, 400, 400, min_pixels=1000).shape == (40000, 1)
