"""Tests for cellseg.slides.opening: every format makes its own tiny file in tmp_path."""

from __future__ import annotations

import logging
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cellseg.errors import ParameterError, SlideError, TimeSeriesError, ZStackError
from cellseg.geometry import Box
from cellseg.slides import open_slide

from ..helpers import DATA, EXAMPLES


def ramp(shape, dtype):
    """Distinct, position-dependent values, so a wrong offset or axis order is caught."""
    a = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)
    if np.dtype(dtype).kind in "iu":
        a %= np.iinfo(dtype).max
    return a.astype(dtype)


def full(slide):
    return slide.read_region(Box(0, 0, slide.info.height, slide.info.width))


# ---------------------------------------------------------------- layouts, dtypes, formats

@pytest.mark.parametrize("shape, axes, dtype, kw, channels", [
    ((70, 90), "YX", np.uint8, {"tile": (32, 32), "compression": "zlib"}, 1),
    ((70, 90), "YX", np.uint16, {"rowsperstrip": 16, "compression": "zlib"}, 1),
    ((70, 90), "YX", np.uint16, {"byteorder": ">"}, 1),  # big-endian, uncompressed (memory-mapped)
    ((70, 90, 3), "YXS", np.uint8, {"photometric": "rgb", "tile": (32, 32)}, 3),
    ((70, 90, 3), "YXS", np.uint8, {"photometric": "rgb", "bigtiff": True}, 3),
    ((4, 70, 90), "CYX", np.float32, {"tile": (32, 32), "compression": "zlib"}, 4),
    ((2, 70, 90), "CYX", np.float64, {}, 2),
])
def test_tiff_layouts_read_channel_last_native_dtype(tmp_path, shape, axes, dtype, kw, channels):
    a = ramp(shape, dtype)
    path = tmp_path / "img.ome.tif"
    tifffile.imwrite(path, a, metadata={"axes": axes}, **kw)
    with open_slide(path) as s:
        assert (s.info.height, s.info.width, s.info.n_channels) == (70, 90, channels)
        assert s.info.dtype == np.dtype(dtype) and s.info.format == "ome-tiff"
        region = s.read_region(Box(5, 7, 40, 83))
        assert region.shape == (35, 76, channels) and region.dtype == np.dtype(dtype).newbyteorder("=")
        expect = np.moveaxis(a, 0, -1) if axes == "CYX" else a.reshape(70, 90, -1)
        np.testing.assert_array_equal(region, expect[5:40, 7:83])


def test_plain_tiff_without_ome(tmp_path):
    a = ramp((50, 60), np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", a, tile=(16, 16), metadata=None)
    with open_slide(tmp_path / "a.tif") as s:
        assert s.info.format == "tiff" and s.info.mpp is None
        assert s.info.mpp_source.startswith("none: ")
        np.testing.assert_array_equal(full(s)[..., 0], a)


def test_tczyx_with_single_t_and_z_is_squeezed(tmp_path):
    a = ramp((1, 3, 1, 40, 50), np.uint16)
    tifffile.imwrite(tmp_path / "a.ome.tif", a, metadata={"axes": "TCZYX"})
    with open_slide(tmp_path / "a.ome.tif") as s:
        np.testing.assert_array_equal(full(s), np.moveaxis(a[0, :, 0], 0, -1))


@pytest.mark.parametrize("shape, axes, hint", [((3, 2, 40, 50), "ZCYX", r"a Z-stack: pass --z max or --z mean .* --z N"),
                                               ((4, 40, 50), "TYX", r"a time series: pass --t N to count time point N"),
                                               ((4, 3, 40, 50), "TZYX", r"a time series")])
def test_stacks_without_z_and_time_series_are_refused(tmp_path, shape, axes, hint):
    tifffile.imwrite(tmp_path / "a.ome.tif", np.zeros(shape, np.uint8), metadata={"axes": axes})
    with pytest.raises(SlideError, match=rf"expected a 2-D image .* got axes {axes} with shape .*\({hint}"):
        open_slide(tmp_path / "a.ome.tif")
    if "T" in axes:     # --z reads a Z-stack, not a time series
        with pytest.raises(SlideError, match=r"a time series"):
            open_slide(tmp_path / "a.ome.tif", z="max")


@pytest.mark.parametrize("imagej", [False, True])   # OME-TIFF through tifffile's zarr store; ImageJ memory-mapped
def test_a_z_stack_reads_as_one_plane_or_a_projection(tmp_path, imagej):
    stack = ramp((4, 2, 40, 50), np.uint16)[::-1].copy()     # planes differ, and the brightest is not the last
    stack[2, 0, 5:9, 7:12] = 65535
    path = tmp_path / ("ij.tif" if imagej else "z.ome.tif")
    if imagej:
        tifffile.imwrite(path, stack, imagej=True, metadata={"axes": "ZCYX"})
    else:
        tifffile.imwrite(path, stack, metadata={"axes": "ZCYX"}, tile=(16, 16))
    box = Box(3, 4, 31, 45)
    expected = {"max": stack.max(axis=0), 1: stack[0], 3: stack[2], "4": stack[3],
                "mean": np.rint(stack.mean(axis=0, dtype=np.float64)).astype(np.uint16)}
    for z, planes in expected.items():
        with open_slide(path, z=z) as s:
            assert (s.info.z_planes, s.info.n_channels, s.info.dtype) == (4, 2, np.uint16)
            assert s.info.z == (int(z) if str(z).isdigit() else z)
            np.testing.assert_array_equal(s.read_region(box), np.moveaxis(planes, 0, -1)[3:31, 4:45])
            thumbnail, _ = s.read_thumbnail(25)     # read through the same levels
            assert thumbnail.shape == (20, 25, 2)
    with pytest.raises(ParameterError, match=r"expected --z 1-4 \(the Z-stack's planes\), got --z 5"):
        open_slide(path, z=5)


@pytest.mark.parametrize("imagej", [False, True])
def test_a_time_series_reads_one_time_point_and_its_z_stack_as_asked(tmp_path, imagej):
    planes = ramp((40, 50), np.uint16) + (1000 * np.arange(3, dtype=np.uint16))[:, None, None]
    data = np.stack([planes, planes + 7])       # TZYX: 2 time points of 3 planes, each plane its own
    path = tmp_path / ("ij.tif" if imagej else "t.ome.tif")
    if imagej:
        tifffile.imwrite(path, data, imagej=True, metadata={"axes": "TZYX"})
    else:
        tifffile.imwrite(path, data, metadata={"axes": "TZYX"}, tile=(16, 16))
    with pytest.raises(TimeSeriesError, match=r"a time series: pass --t N to count time point N, counted from 1"):
        open_slide(path, z="max")
    with pytest.raises(ZStackError):
        open_slide(path, t=2)
    for t, z, expected in ((2, 1, data[1, 0]), (1, 3, data[0, 2]), (2, "max", data[1].max(axis=0))):
        with open_slide(path, t=t, z=z) as s:
            assert (s.info.t_points, s.info.t, s.info.z_planes, s.info.z) == (2, t, 3, z)
            np.testing.assert_array_equal(full(s)[..., 0], expected)
    with pytest.raises(ParameterError, match=r"^expected --t 1-2 \(the time series' points\), got --t 3$"):
        open_slide(path, t=3, z=1)
    with pytest.raises(ParameterError, match=r"^expected --t N, a time point counted from 1, got 0$"):
        open_slide(path, t=0, z=1)
    tifffile.imwrite(tmp_path / "flat.tif", data[0, 0])       # an image without time points: --t 1 only
    with open_slide(tmp_path / "flat.tif", t=1) as s:
        assert (s.info.t_points, s.info.t) == (1, None)
    with pytest.raises(ParameterError, match=r"^expected --t 1 on an image without time points, got --t 2$"):
        open_slide(tmp_path / "flat.tif", t=2)


@pytest.mark.parametrize("z", [0, -1, "first", "max2", 1.5, True])
def test_a_z_that_is_neither_a_plane_nor_a_projection_is_refused(tmp_path, z):
    tifffile.imwrite(tmp_path / "a.ome.tif", np.zeros((3, 40, 50), np.uint8), metadata={"axes": "ZYX"})
    with pytest.raises(ParameterError, match=r"expected --z max, mean or a plane number from 1, got "):
        open_slide(tmp_path / "a.ome.tif", z=z)


def test_a_2d_image_reads_as_it_is_with_z_1_or_a_projection_and_refuses_another_plane(tmp_path):
    a = ramp((40, 50), np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", a)
    Image.fromarray(a).save(tmp_path / "a.png")
    for name in ("a.tif", "a.png"):
        for z in (1, "max", "mean", None):
            with open_slide(tmp_path / name, z=z) as s:      # a cohort of stacks and flat images with one --z
                assert (s.info.z_planes, s.info.z) == (1, None)
                np.testing.assert_array_equal(full(s)[..., 0], a)
        with pytest.raises(ParameterError, match=r"expected --z 1, max or mean on a 2-D image \(one plane\), got --z 2"):
            open_slide(tmp_path / name, z=2)


def write_ome_pyramid(path, levels, **meta):
    opts = dict(tile=(64, 64), compression="zlib")
    rgb = levels[0].ndim == 3 and levels[0].shape[-1] == 3
    if rgb:
        opts["photometric"] = "rgb"
    with tifffile.TiffWriter(path) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, metadata=meta, **opts)
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, **opts)


def test_ome_subifd_pyramid_levels_mpp_and_channel_names(tmp_path):
    a = ramp((2, 300, 260), np.uint16)
    levels = [a, a[:, ::2, ::2].copy(), a[:, ::4, ::4].copy()]
    write_ome_pyramid(tmp_path / "p.ome.tif", levels, axes="CYX", PhysicalSizeX=500, PhysicalSizeXUnit="nm",
                      PhysicalSizeY=500, PhysicalSizeYUnit="nm", Channel={"Name": ["DAPI", "GFP"]})
    with open_slide(tmp_path / "p.ome.tif") as s:
        assert s.info.levels == ((300, 260), (150, 130), (75, 65))
        assert s.info.mpp == pytest.approx(0.5) and s.info.mpp_source == "ome"
        assert s.info.channel_names == ("DAPI", "GFP")
        np.testing.assert_array_equal(s.read_region(Box(10, 20, 60, 100), level=1),
                                      np.moveaxis(levels[1], 0, -1)[10:60, 20:100])


def test_reduced_pages_as_series_levels(tmp_path):
    """Pyramids stored as top-level reduced pages, which tifffile exposes as series[0].levels."""
    a = ramp((256, 320), np.uint8)
    with tifffile.TiffWriter(tmp_path / "g.tif") as tw:
        tw.write(a, tile=(64, 64), metadata=None)
        tw.write(a[::2, ::2], tile=(64, 64), subfiletype=1, metadata=None)
    with open_slide(tmp_path / "g.tif") as s:
        assert s.info.levels == ((256, 320), (128, 160))
        np.testing.assert_array_equal(s.read_region(Box(0, 0, 128, 160), level=1)[..., 0], a[::2, ::2])


def test_a_multi_image_ome_tiff_warns_that_only_its_first_image_is_counted_unless_series_picks_one(tmp_path):
    with tifffile.TiffWriter(tmp_path / "m.ome.tif", ome=True) as tw:
        for k in range(3):      # three positions of one acquisition, each its own pixel size, then an overview
            tw.write(np.full((64, 80 + k), 10 * k, np.uint8), metadata={
                "axes": "YX", "Name": f"pos{k}", "PhysicalSizeX": 0.5 * (k + 1), "PhysicalSizeY": 0.5 * (k + 1)})
        tw.write(np.zeros((8, 10, 3), np.uint8), photometric="rgb", metadata={"axes": "YXS", "Name": "overview"})
    with open_slide(tmp_path / "m.ome.tif") as s:
        assert s.info.warnings == (
            "m.ome.tif holds 3 images like the one counted (OME images: pos0, pos1, pos2): only the first, pos0, is "
            "counted; to count another, pass --series N (0-2)",)
        assert full(s).max() == 0 and s.info.mpp == 0.5 and s.info.series is None     # the first position's
        assert s.info.positions == (0, 1, 2)        # what --series all counts
    for k in (0, 2):        # the position chosen: its pixels, size and pixel size; no warning
        with open_slide(tmp_path / "m.ome.tif", series=k) as s:
            assert (s.info.series, s.info.width, s.info.mpp, s.info.warnings) == (k, 80 + k, 0.5 * (k + 1), ())
            assert s.info.positions == (0, 1, 2)
            assert np.all(full(s) == 10 * k)
    with open_slide(tmp_path / "m.ome.tif", series="3") as s:    # the overview, as the command line names it
        assert s.info.n_channels == 3 and s.info.height == 8
    with pytest.raises(ParameterError, match=r"^expected --series 0-3 \(the file's 4 images\), got --series 4$"):
        open_slide(tmp_path / "m.ome.tif", series=4)
    with pytest.raises(ParameterError, match=r"^expected --series N, an image of the file counted from 0, got -1$"):
        open_slide(tmp_path / "m.ome.tif", series=-1)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "one.png")     # a format of one image
    with open_slide(tmp_path / "one.png", series=0) as s:
        assert s.info.series == 0
    with pytest.raises(ParameterError, match=r"^expected --series 0 \(the file holds one image\), got --series 1$"):
        open_slide(tmp_path / "one.png", series=1)
    with tifffile.TiffWriter(tmp_path / "one.ome.tif", ome=True) as tw:     # an image and its overview: no warning
        tw.write(np.ones((64, 80), np.uint8), metadata={"axes": "YX"})
        tw.write(np.zeros((8, 10, 3), np.uint8), photometric="rgb", metadata={"axes": "YXS"})
    with open_slide(tmp_path / "one.ome.tif") as s:
        assert s.info.warnings == ()


def test_svs_mpp_from_description(tmp_path):
    rgb = ramp((300, 400, 3), np.uint8)
    desc = "Aperio Image Library v12.0.15 \r\n400x300 (256x256) JPEG/RGB Q=70|AppMag = 20|MPP = 0.2520"
    with tifffile.TiffWriter(tmp_path / "s.svs") as tw:
        tw.write(rgb, tile=(64, 64), description=desc, metadata=None, photometric="rgb")
        tw.write(rgb[::8, ::8], description="Aperio thumbnail", metadata=None, photometric="rgb")
        tw.write(rgb[::4, ::4], tile=(64, 64), description="Aperio level", metadata=None, photometric="rgb")
    with open_slide(tmp_path / "s.svs") as s:
        assert s.info.format == "svs" and s.info.levels == ((300, 400), (75, 100))
        assert s.info.mpp == pytest.approx(0.252) and s.info.mpp_source == "svs"
        np.testing.assert_array_equal(full(s), rgb)


def test_imagej_hyperstack_calibration(tmp_path):
    a = ramp((2, 40, 50), np.float32)
    tifffile.imwrite(tmp_path / "ij.tif", a, imagej=True, resolution=(1 / 0.65, 1 / 0.65),
                     metadata={"axes": "CYX", "unit": "micron"})
    with open_slide(tmp_path / "ij.tif") as s:
        assert s.info.format == "imagej-tiff" and s.info.n_channels == 2
        assert s.info.mpp == pytest.approx(0.65, rel=1e-3) and s.info.mpp_source == "imagej"
        np.testing.assert_array_equal(full(s), np.moveaxis(a, 0, -1))


@pytest.mark.parametrize("resolution, unit, mpp, reason", [
    ((20000, 20000), "CENTIMETER", 0.5, None),
    ((50800, 50800), "INCH", 0.5, None),
    ((72, 72), "INCH", None, "screen default"),
    ((300, 300), "INCH", None, "screen default"),
    ((5, 5), "NONE", None, "NONE"),
])
def test_tiff_resolution_tags(tmp_path, resolution, unit, mpp, reason):
    tifffile.imwrite(tmp_path / "r.tif", np.zeros((8, 8), np.uint8), resolution=resolution,
                     resolutionunit=unit, metadata=None)
    with open_slide(tmp_path / "r.tif") as s:
        if mpp is None:
            assert s.info.mpp is None and reason in s.info.mpp_source
            assert s.info.mpp_source.startswith("none: ") and "--mpp" in s.info.mpp_source
        else:
            assert s.info.mpp == pytest.approx(mpp) and s.info.mpp_source == "tiff-resolution"


def test_non_square_pixels_keep_their_area(tmp_path, caplog):
    """0.25 x 0.5 µm pixels: one size whose square is the pixel's area (areas and densities in µm² exact; the
    arithmetic mean overstated them by 12.5 %), and a warning that says what is off."""
    tifffile.imwrite(tmp_path / "r.tif", np.zeros((8, 8), np.uint8), resolution=(40000, 20000),
                     resolutionunit="CENTIMETER", metadata=None)
    with caplog.at_level("WARNING"), open_slide(tmp_path / "r.tif") as s:
        assert s.info.mpp ** 2 == pytest.approx(0.25 * 0.5)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "not square (0.25 x 0.5 µm)" in said and "areas in µm² are exact" in said and "41 %" in said


def test_mpp_override_and_validation(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    with open_slide(tmp_path / "a.png", mpp=0.3) as s:
        assert s.info.mpp == 0.3 and s.info.mpp_source == "override"
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ParameterError, match="expected --mpp > 0"):
            open_slide(tmp_path / "a.png", mpp=bad)


# ---------------------------------------------------------------- PNG / JPEG

@pytest.mark.parametrize("array, mode_shape", [
    (ramp((30, 40), np.uint8), (30, 40, 1)),
    (ramp((30, 40), np.uint16), (30, 40, 1)),
    (ramp((30, 40, 3), np.uint8), (30, 40, 3)),
])
def test_png_roundtrip(tmp_path, array, mode_shape):
    Image.fromarray(array).save(tmp_path / "a.png")
    with open_slide(tmp_path / "a.png") as s:
        assert s.info.format == "png" and s.info.levels == ((30, 40),)
        assert s.info.mpp is None and "PNG has no pixel size" in s.info.mpp_source
        region = full(s)
        assert region.shape == mode_shape and region.dtype == array.dtype
        np.testing.assert_array_equal(region, array.reshape(mode_shape))


def test_png_alpha_dropped_and_dpi_used(tmp_path):
    rgba = ramp((20, 30, 4), np.uint8)
    rgba[..., 3] = 255                                                   # opaque: the colour as it is
    Image.fromarray(rgba).save(tmp_path / "a.png", dpi=(50800, 50800))  # 0.5 µm per pixel
    with open_slide(tmp_path / "a.png") as s:
        np.testing.assert_array_equal(full(s), rgba[..., :3])
        assert s.info.mpp == pytest.approx(0.5, rel=1e-3)


@pytest.mark.parametrize("light", [True, False])
def test_transparent_pixels_take_the_images_own_ground(tmp_path, light):
    """A brightfield PNG's transparent margin is glass (white), a fluorescence one's dark ground (black): never
    black 'tissue' on a light image, nor bright 'nuclei' on a dark one."""
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3] = 200 if light else 30
    rgba[:, :10, 3] = 255                        # the left third opaque, the rest transparent (RGB 0 there)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    with open_slide(tmp_path / "a.png") as s:
        pixels = full(s)
    assert s.info.n_channels == 3
    assert (pixels[:, :10] == (200 if light else 30)).all() and (pixels[:, 10:] == (255 if light else 0)).all()


def test_jpeg(tmp_path):
    Image.fromarray(np.full((24, 32, 3), 120, np.uint8)).save(tmp_path / "a.jpg", dpi=(72, 72))
    with open_slide(tmp_path / "a.jpg") as s:
        assert s.info.format == "jpeg" and s.info.n_channels == 3 and s.info.mpp is None
        assert np.abs(full(s).astype(int) - 120).max() <= 2


def test_real_dsb_images():
    with open_slide(DATA / "dsb_fluo.png") as s:
        assert (s.info.height, s.info.width, s.info.n_channels, s.info.dtype) == (256, 256, 1, np.uint8)
        img = full(s)
    with open_slide(DATA / "dsb_fluo_labels.tif") as s:
        labels = full(s)[..., 0]
        assert s.info.dtype == np.uint16 and labels.max() == 56
    assert img[..., 0][labels > 0].mean() > 2 * img[..., 0][labels == 0].mean()  # nuclei are bright
    with open_slide(DATA / "dsb_he.png") as s:
        assert (s.info.height, s.info.width, s.info.n_channels) == (256, 320, 3)


# ---------------------------------------------------------------- regions and thumbnails

@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    a = ramp((203, 317, 2), np.uint16)
    path = tmp_path_factory.mktemp("tiled") / "t.ome.tif"
    tifffile.imwrite(path, np.moveaxis(a, -1, 0), tile=(48, 64), compression="zlib", metadata={"axes": "CYX"})
    return path, a


@settings(max_examples=30, deadline=None)
@given(r=st.tuples(st.integers(0, 202), st.integers(1, 203)), c=st.tuples(st.integers(0, 316), st.integers(1, 317)))
def test_any_region_equals_numpy_slice(tiled, r, c):
    path, a = tiled
    r0, r1 = min(r), max(r) + (r[0] == r[1])
    c0, c1 = min(c), max(c) + (c[0] == c[1])
    with open_slide(path) as s:
        np.testing.assert_array_equal(s.read_region(Box(r0, c0, r1, c1)), a[r0:r1, c0:c1])


@pytest.mark.parametrize("box, level", [
    (Box(-1, 0, 10, 10), 0), (Box(0, 0, 204, 10), 0), (Box(0, 0, 10, 318), 0),
    (Box(5, 5, 5, 10), 0), (Box(0, 0, 10, 10), 1), (Box(0, 0, 10, 10), -1),
])
def test_region_outside_or_bad_level_is_parameter_error(tiled, box, level):
    with open_slide(tiled[0]) as s, pytest.raises(ParameterError, match="expected"):
        s.read_region(box, level)


def test_thumbnail_is_block_mean_with_exact_longer_side(tmp_path):
    a = ramp((100, 60), np.float32)
    tifffile.imwrite(tmp_path / "a.tif", a, tile=(16, 16))
    with open_slide(tmp_path / "a.tif") as s:
        thumb, factor = s.read_thumbnail(10)
        assert thumb.shape == (10, 6, 1) and thumb.dtype == np.float32 and factor == 10.0
        np.testing.assert_allclose(thumb[..., 0], a.reshape(10, 10, 6, 10).mean(axis=(1, 3)), rtol=1e-5)
        thumb, factor = s.read_thumbnail(37)  # not a divisor: block mean, then a small resize
        assert thumb.shape == (37, 22, 1) and factor == pytest.approx(100 / 37)
        assert thumb[..., 0].min() >= a.min() and thumb[..., 0].max() <= a.max()
        thumb, factor = s.read_thumbnail(500)  # never upsampled
        assert thumb.shape == (100, 60, 1) and factor == 1.0
        with pytest.raises(ParameterError):
            s.read_thumbnail(0)


def test_thumbnail_uses_smallest_sufficient_pyramid_level(tmp_path):
    # Level 1 is deliberately NOT a downsample of level 0: a constant 7 proves it was the one read.
    base = np.full((512, 512), 200, np.uint8)
    write_ome_pyramid(tmp_path / "p.ome.tif", [base, np.full((256, 256), 7, np.uint8),
                                               np.full((128, 128), 99, np.uint8)], axes="YX")
    with open_slide(tmp_path / "p.ome.tif") as s:
        thumb, factor = s.read_thumbnail(200)  # 128 < 200 <= 256: level 1
        assert thumb.shape == (200, 200, 1) and factor == pytest.approx(2.56)
        assert (thumb == 7).all()
    rng = np.random.default_rng(0)
    level1 = rng.integers(0, 65536, (256, 256), dtype=np.uint16)
    write_ome_pyramid(tmp_path / "q.ome.tif", [np.zeros((512, 512), np.uint16), level1], axes="YX")
    with open_slide(tmp_path / "q.ome.tif") as s:
        thumb, factor = s.read_thumbnail(256)  # a level of exactly the thumbnail's size: its pixels as they are
        assert thumb.dtype == np.uint16 and factor == 2.0
        np.testing.assert_array_equal(thumb[..., 0], level1)


@pytest.mark.slow
def test_big_tiled_tiff_is_read_lazily(tmp_path):
    """An 8000 x 8000 uint8 slide (64 MB of pixels) opens, reads a region and a thumbnail in a
    few MB: nothing ever loads the whole image."""
    n, t = 8000, 256

    def tiles():
        for r in range(0, n, t):
            for c in range(0, n, t):
                tile = np.full((t, t), (r // t * 7 + c // t) % 200, np.uint8)
                tile[::16] = 250
                yield tile

    path = tmp_path / "big.tif"
    tifffile.imwrite(path, tiles(), shape=(n, n), dtype=np.uint8, tile=(t, t), compression="zlib")
    assert path.stat().st_size < 2_000_000
    tracemalloc.start()
    try:
        with open_slide(path) as s:
            region = s.read_region(Box(4000, 4100, 4256, 4356))
            thumb, factor = s.read_thumbnail(256)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert region.shape == (256, 256, 1) and thumb.shape == (256, 256, 1) and factor == 8000 / 256
    assert region[0, 0, 0] == 250 and region[1, 0, 0] == (4000 // t * 7 + 4100 // t) % 200
    assert peak < 20_000_000, f"peak {peak / 1e6:.1f} MB: the slide was not read lazily"


# ---------------------------------------------------------------- errors

def test_missing_file_and_directory(tmp_path):
    with pytest.raises(SlideError, match="no such file"):
        open_slide(tmp_path / "nope.tif")
    with pytest.raises(SlideError, match="is a directory"):
        open_slide(tmp_path)


@pytest.mark.parametrize("name, content, match", [
    ("notes.tif", b"hello, I am text\n", r"expected a slide image \(TIFF.*\), .* is not one \(starts with bytes"),
    ("scan.czi", b"ZISRAWFILE\x00\x00", r"expected a readable CZI, .*scan.czi is corrupt or truncated \(pylibCZIrw: "),
    ("notes.txt", b"hello, I am text\n", r"unsupported file type '.txt' .* expected a slide image: TIFF"),
    ("empty.png", b"", r"is empty \(0 bytes\)"),
    ("bad.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, r"expected a readable PNG/JPEG"),
])
def test_not_an_image(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SlideError, match=match) as info:
        open_slide(tmp_path / name)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.99])
def test_truncated_tiff_fails_at_open(tmp_path, fraction):
    rng = np.random.default_rng(0)
    tifffile.imwrite(tmp_path / "ok.tif", rng.integers(0, 255, (300, 300), dtype=np.uint8),
                     tile=(64, 64), compression="zlib")
    data = (tmp_path / "ok.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(SlideError, match="expected a .*TIFF") as info:
        open_slide(tmp_path / "cut.tif")
    assert "\n" not in str(info.value)


def test_a_truncated_tiff_is_one_line_without_tifffiles_records_before_it(tmp_path, caplog):
    a = ramp((1024, 1024), np.uint8)
    write_ome_pyramid(tmp_path / "p.ome.tif", [a, a[::2, ::2].copy()], axes="YX")
    data = (tmp_path / "p.ome.tif").read_bytes()
    (tmp_path / "cut.ome.tif").write_bytes(data[: len(data) // 3])
    with caplog.at_level(logging.DEBUG), pytest.raises(SlideError, match="truncated or corrupt"):
        open_slide(tmp_path / "cut.ome.tif")
    assert not [r for r in caplog.records if r.name.startswith("tifffile")]     # kept from the console


def test_truncated_pyramid_losing_its_ifds_fails_at_open(tmp_path):
    a = ramp((256, 256), np.uint8)
    write_ome_pyramid(tmp_path / "p.ome.tif", [a, a[::2, ::2].copy()], axes="YX")
    data = (tmp_path / "p.ome.tif").read_bytes()
    (tmp_path / "cut.ome.tif").write_bytes(data[:-200])
    with pytest.raises(SlideError):
        open_slide(tmp_path / "cut.ome.tif")


def test_corrupt_tile_data_fails_at_read_with_chained_cause(tmp_path):
    rng = np.random.default_rng(0)
    tifffile.imwrite(tmp_path / "ok.tif", rng.integers(0, 255, (256, 256), dtype=np.uint8),
                     tile=(64, 64), compression="zlib")
    data = bytearray((tmp_path / "ok.tif").read_bytes())
    data[len(data) // 2: len(data) // 2 + 3000] = b"\xff" * 3000  # same length, garbage tiles
    (tmp_path / "bad.tif").write_bytes(bytes(data))
    with open_slide(tmp_path / "bad.tif") as s:
        with pytest.raises(SlideError, match="corrupt") as info:
            full(s)
        assert info.value.__cause__ is not None and "\n" not in str(info.value)
        with pytest.raises(SlideError):
            s.read_thumbnail(32)


def test_truncated_png_fails(tmp_path):
    Image.fromarray(ramp((64, 64), np.uint8)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match="corrupt"):
        open_slide(tmp_path / "a.png")


def test_zero_size_tiff(tmp_path):
    with pytest.warns(UserWarning):
        tifffile.imwrite(tmp_path / "z.tif", np.zeros((0, 10), np.uint8))
    with pytest.raises(SlideError, match="positive size"):
        open_slide(tmp_path / "z.tif")


def test_closed_slide_refuses_reads(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    s = open_slide(tmp_path / "a.png")
    s.close()
    s.close()  # idempotent
    with pytest.raises(SlideError, match="closed"):
        s.read_region(Box(0, 0, 2, 2))


# ---------------------------------------------------------------- shipped example slides

@pytest.mark.parametrize("name, shape, levels, mpp", [
    ("fluo_mosaic.ome.tif", (2048, 2048, 1), ((2048, 2048), (1024, 1024), (512, 512)), 0.5),
    ("empty_regions.ome.tif", (4096, 4096, 1), ((4096, 4096), (2048, 2048), (1024, 1024), (512, 512)), 0.5),
    ("he_mosaic.ome.tif", (864, 1056, 3), ((864, 1056), (432, 528), (216, 264)), 0.25),
    ("he_patch.png", (256, 320, 3), ((256, 320),), None),
])
def test_example_slides(name, shape, levels, mpp):
    path = EXAMPLES / name
    if not path.exists():
        pytest.skip(f"{name} not built (python example_slides/make_examples.py)")
    with open_slide(path) as s:
        assert (s.info.height, s.info.width, s.info.n_channels) == shape
        assert s.info.dtype == np.uint8 and s.info.levels == levels
        assert s.info.mpp == (pytest.approx(mpp) if mpp else None)
        thumb, _ = s.read_thumbnail(256)
        assert max(thumb.shape[:2]) == min(256, max(shape[:2]))
    labels = path.with_name(name.split(".")[0] + "_labels.tif")
    with open_slide(labels) as s:
        assert (s.info.height, s.info.width, s.info.n_channels) == shape[:2] + (1,)
        assert s.read_region(Box(0, 0, *shape[:2])).max() > 50  # many distinct nuclei


@pytest.mark.parametrize("name, save", [
    ("a.png", lambda p, a: Image.fromarray(a).save(p)),
    ("a.tif", lambda p, a: tifffile.imwrite(p, a)),  # uncompressed: memory-mapped
    ("b.tif", lambda p, a: tifffile.imwrite(p, a, tile=(16, 16), compression="zlib")),
])
def test_regions_are_writable_copies(tmp_path, name, save):
    save(tmp_path / name, ramp((32, 48), np.uint8))
    with open_slide(tmp_path / name) as s:
        region = full(s)
        region[:] = 0  # must neither raise (read-only map) nor change the slide
        assert full(s).max() > 0


def test_png_over_pixel_limit_is_refused_with_advice(tmp_path, monkeypatch):
    import cellseg.slides._pil as pil_backend

    monkeypatch.setattr(pil_backend, "MAX_PIL_PIXELS", 100)
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(SlideError, match=r"expected a PNG of 1 to 100 pixels .* tiled pyramidal TIFF"):
        open_slide(tmp_path / "a.png")


def test_concurrent_region_reads(tiled):
    from concurrent.futures import ThreadPoolExecutor

    path, a = tiled
    boxes = [Box(r, c, r + 40, c + 50) for r in range(0, 160, 40) for c in range(0, 250, 50)]
    with open_slide(path) as s, ThreadPoolExecutor(4) as pool:
        for box, region in zip(boxes, pool.map(s.read_region, boxes)):
            np.testing.assert_array_equal(region, a[box.slices()])


# ---------------------------------------------------------------- import direction

SLIDE_MODULES = ("base", "unreadable", "cache", "_tiff", "_openslide", "_czi", "_zarr", "_pil")
BACKENDS = ("_tiff", "_openslide", "_czi", "_zarr", "_pil")


def cellseg_imports(module: str) -> set[str]:
    """The modules of cellseg.slides that `module` (one of them) imports anywhere in its source (top level or inside
    functions)."""
    import ast

    import cellseg
    tree = ast.parse((Path(cellseg.__file__).parent / "slides" / f"{module}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cellseg."):
            found.add(node.module.removeprefix("cellseg.slides."))
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("cellseg.slides.") for a in node.names if a.name.startswith("cellseg."))
    return found


@pytest.mark.parametrize("module", SLIDE_MODULES)
def test_slide_imports_go_one_way(module):
    """opening.open_slide imports the backends; the backends and the interface they build never import it back,
    and the interface imports no backend."""
    imported = cellseg_imports(module)
    assert "opening" not in imported
    if module in ("base", "unreadable", "cache"):
        assert not imported & set(BACKENDS)


def test_open_slide_reaches_every_backend():
    assert set(BACKENDS) <= cellseg_imports("opening")
