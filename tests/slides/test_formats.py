"""Slide formats beyond the TIFF family, each read through its own backend behind the one Slide interface.

DICOM: real files made by other software (tests/data/dicom, see its README). CZI and OME-Zarr: small files
written in tmp_path by each format's own writer (pylibCZIrw, Zeiss's libCZI; ome-zarr-py), read back region
by region and counted end to end. MIRAX, Hamamatsu VMS and Ventana BIF have no writer on PyPI and OpenSlide's
own test slides are not available offline: their reading is OpenSlide's, tested here only through DICOM (the
same backend code) and the backend choice.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from cellseg.errors import ParameterError, SlideError
from cellseg.geometry import Box, HostInput, TileSpec, plan_tiles
from cellseg.planning import Protocol, model_channel
from cellseg.slides import looks_like_slide, open_slide, sniff
from cellseg.slides._openslide import flatten_rgba

from ..helpers import (
    DATA,
    FAST,
    LabelReadingDetector,
    assert_nothing_left,
    assert_user_error,
    count_with,
    invoke,
    listing,
    same_partition,
    write_ome_zarr,
)

DICOM = DATA / "dicom"
pyczi = pytest.importorskip("pylibCZIrw.czi", reason="pylibCZIrw has no wheel for this platform")


# --- helpers ----------------------------------------------------------------------------------------------

def cell_grid(height: int, width: int, pitch: int = 24, radius: int = 7) -> np.ndarray:
    """Separate round cells on a grid, labelled 1..n: a threshold finds each one exactly."""
    rr, cc = np.mgrid[:height, :width]
    labels = np.zeros((height, width), np.int32)
    k = 0
    for r in range(pitch // 2, height - radius, pitch):
        for c in range(pitch // 2, width - radius, pitch):
            k += 1
            labels[(rr - r) ** 2 + (cc - c) ** 2 <= radius ** 2] = k
    return labels


class ThresholdDetector(HostInput):
    """Cells = connected regions brighter (or, for brightfield, darker) than mid-range in what the network sees:
    the count depends on the pixels the backend read, not on a ground truth handed over."""

    class_names = ("nucleus",)
    device = "cpu"

    def __init__(self, dark: bool = False):
        self.dark = dark

    def calibrated(self, windows, gray=False) -> ThresholdDetector:
        return self

    def detect(self, images, tiles, scale=1.0):
        out = []
        for image in images:
            gray = image.mean(0)
            labels, _ = ndimage.label(gray < 0.5 if self.dark else gray > 0.5)
            whole = Box(0, 0, *labels.shape)
            out.append(LabelReadingDetector(labels)._tile(TileSpec(0, 0, 0, whole, whole), labels.shape))
        return out


def count(slide: Path, tmp_path: Path, dark: bool = False, **protocol) -> tuple[dict, np.ndarray, Path]:
    out = tmp_path / "out"
    out.mkdir()
    p = Protocol(name="test", tile_size=64, halo_px=16, batch_size=4, min_area_px=1,
                 **{"tissue_method": "none", **protocol})
    summary = count_with(ThresholdDetector(dark), slide, out, p)
    return summary, tifffile.imread(out / "labels.ome.tif"), out


def label_image_mpp(path: Path) -> float:
    with tifffile.TiffFile(path) as tf:
        pixels = tf.ome_metadata.split("<Pixels ", 1)[1]
    return float(pixels.split('PhysicalSizeX="', 1)[1].split('"', 1)[0])


def assert_regions_match(slide, full: np.ndarray, level: int = 0) -> None:
    """Every box of a coarse grid over the level, and the whole level, equal the same slice of `full`."""
    h, w = full.shape[:2]
    for r0 in range(0, h, max(1, h // 3)):
        for c0 in range(0, w, max(1, w // 3)):
            box = Box(r0, c0, min(h, r0 + 37), min(w, c0 + 53))
            np.testing.assert_array_equal(slide.read_region(box, level), full[box.slices()])
    np.testing.assert_array_equal(slide.read_region(Box(0, 0, h, w), level), full)


def truncate(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


# --- DICOM through OpenSlide (real files) --------------------------------------------------------------------

def test_dicom_series_opens_from_either_file_or_its_folder(tmp_path):
    folder = shutil.copytree(DICOM, tmp_path / "case_17")
    pydicom = pytest.importorskip("pydicom")
    # An independent decoding of the VOLUME image's one JPEG tile (64 x 64, the 16 x 16 image at its top left).
    frame = pydicom.dcmread(folder / "boxes_0.dcm").pixel_array[:16, :16]
    seen = []
    for path in (folder / "boxes_0.dcm", folder / "boxes_1.dcm", folder):
        with open_slide(path) as s:
            i = s.info
            assert (i.format, i.backend, i.height, i.width, i.n_channels, i.dtype) == \
                ("dicom", "openslide", 16, 16, 3, np.uint8)
            assert i.mpp == pytest.approx(0.499) and i.mpp_source == "openslide"
            assert i.levels == ((16, 16),) and i.path == path
            whole = s.read_region(Box(0, 0, 16, 16))
            assert_regions_match(s, whole)
            thumb, factor = s.read_thumbnail(8)
            assert thumb.shape == (8, 8, 3) and factor == 2.0
        seen.append(whole)
    assert np.array_equal(seen[0], seen[1]) and np.array_equal(seen[0], seen[2])
    # JPEG decoders may round differently by a level or two; a swapped channel or a shifted tile would not.
    assert np.abs(seen[0].astype(int) - frame.astype(int)).max() <= 3
    assert sniff(folder) == ("dicom-folder", folder / "boxes_0.dcm")   # the VOLUME file, not the thumbnail
    assert looks_like_slide(folder) and looks_like_slide(folder / "boxes_1.dcm")


def test_dicom_folder_with_two_slides_or_none_is_refused(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    two = shutil.copytree(DICOM, tmp_path / "two")
    other = pydicom.dcmread(two / "boxes_0.dcm")
    other.SeriesInstanceUID = other.SeriesInstanceUID + ".2"   # another slide's series in the same folder
    other.save_as(two / "other.dcm")
    with pytest.raises(SlideError, match=r"expected one slide's DICOM series in .*two, found 2 series"):
        open_slide(two)
    thumbnail_only = tmp_path / "thumb"
    thumbnail_only.mkdir()
    shutil.copy(DICOM / "boxes_1.dcm", thumbnail_only)
    with pytest.raises(SlideError, match=r"expected a DICOM whole-slide image \(VOLUME images\)"):
        open_slide(thumbnail_only)
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here\n")
    with pytest.raises(SlideError, match="is a directory holding none of these"):
        open_slide(empty)


def test_dicom_of_another_modality_is_refused(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    ds = pydicom.dcmread(DICOM / "boxes_0.dcm")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"   # CT Image Storage
    ds.save_as(tmp_path / "ct.dcm")
    with pytest.raises(SlideError, match=r"expected a whole-slide image that OpenSlide reads, .*ct.dcm is not one"):
        open_slide(tmp_path / "ct.dcm")


@pytest.mark.slow
def test_dicom_counts_end_to_end_on_the_command_line(tmp_path, tiny_bundle):
    folder = shutil.copytree(DICOM, tmp_path / "case_17")
    result = invoke(["count", folder, "--model", tiny_bundle, *FAST])
    assert result.exit_code == 0, result.output
    out = tmp_path / "case_17.cellseg"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["format"] == "dicom" and summary["mpp"] == pytest.approx(0.499)
    assert summary["mpp_source"] == "openslide"
    labels = tifffile.imread(out / "labels.ome.tif")
    assert labels.shape == (16, 16)   # the slide's geometry
    assert label_image_mpp(out / "labels.ome.tif") == pytest.approx(0.499)


@pytest.mark.parametrize("fraction", [0.3, 0.55, 0.98])
def test_truncated_dicom_is_one_line_exit_1_nothing_written(tmp_path, tiny_bundle, fraction):
    bad = truncate(DICOM / "boxes_0.dcm", tmp_path / "cut.dcm", fraction)
    before = listing(tmp_path)
    result = invoke(["count", bad, "--model", tiny_bundle, *FAST])
    assert_user_error(result, 1, "cut.dcm", "openslide", "DICOM")
    assert_nothing_left(tmp_path, before)


def test_flatten_rgba_onto_the_background():
    rgba = np.array([[[10, 20, 30, 255], [200, 100, 0, 0], [100, 100, 100, 128]]], np.uint8)
    flat = flatten_rgba(rgba, np.array([255, 255, 255]))
    assert flat.dtype == np.uint8 and flat.shape == (1, 3, 3)
    np.testing.assert_array_equal(flat[0, 0], [10, 20, 30])      # opaque: as scanned
    np.testing.assert_array_equal(flat[0, 1], [255, 255, 255])   # nothing scanned: the background
    np.testing.assert_array_equal(flat[0, 2], [177, 177, 177])   # half: (100*128 + 255*127) / 255 = 177.2
    np.testing.assert_array_equal(flatten_rgba(rgba[:, :1], np.array([0, 0, 0])), [[[10, 20, 30]]])


def test_tiffs_that_need_stitching_go_to_openslide(tmp_path, monkeypatch):
    """tifffile reads TIFFs first, except those OpenSlide identifies as Ventana BIF or Trestle (overlapping tiles).
    No BIF can be written here, so OpenSlide's identification is stood in for."""
    import cellseg.slides.opening as slide_module
    path = tmp_path / "scan.tif"
    tifffile.imwrite(path, np.zeros((32, 32), np.uint8))
    assert sniff(path) == ("tiff", path)
    monkeypatch.setattr(slide_module, "openslide_vendor", lambda p: "ventana")
    assert sniff(path) == ("openslide", path)
    monkeypatch.setattr(slide_module, "openslide_vendor", lambda p: "aperio")
    assert sniff(path) == ("tiff", path)


# --- CZI through pylibCZIrw -------------------------------------------------------------------------------------

def write_czi(path: Path, planes: dict, mpp_um: float | None = 0.5, names: dict | None = None) -> Path:
    """planes: {(scene, channel, z[, t]): (array (h, w) gray or (h, w, 3) RGB, (x, y))}; RGB is stored BGR, as CZI
    does."""
    with pyczi.create_czi(str(path), exist_ok=True) as czi:
        for (scene, c, z, *t), (data, location) in planes.items():
            data = data[..., ::-1] if data.ndim == 3 else data[..., None]
            czi.write(np.ascontiguousarray(data), plane={"C": c, "Z": z, **({"T": t[0]} if t else {})},
                      location=location, scene=scene)
        scale = mpp_um * 1e-6 if mpp_um else 0.0
        czi.write_metadata(document_name=path.stem, channel_names=names or {}, scale_x=scale, scale_y=scale)
    return path


def he_like(labels: np.ndarray) -> np.ndarray:
    """Purple nuclei on a near-white background, RGB uint8."""
    rgb = np.full(labels.shape + (3,), (240, 236, 244), np.uint8)
    rgb[labels > 0] = (90, 40, 140)
    return rgb


def test_czi_brightfield_scenes_read_in_place(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (120, 150, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (60, 70, 3), dtype=np.uint8)
    path = write_czi(tmp_path / "bf.czi", {(0, 0, 0): (a, (100, 40)), (1, 0, 0): (b, (400, 300))}, mpp_um=0.25)
    with open_slide(path) as s:
        i = s.info
        assert (i.format, i.backend, i.height, i.width, i.n_channels, i.dtype) == ("czi", "pylibCZIrw", 320, 370, 3,
                                                                                 np.uint8)
        assert i.mpp == pytest.approx(0.25) and i.mpp_source == "czi" and i.channel_names is None
        assert any("2 scenes" in d for d in i.details)
        expected = np.full((320, 370, 3), 255, np.uint8)   # between scenes: white glass
        expected[0:120, 0:150] = a
        expected[260:320, 300:370] = b
        assert_regions_match(s, expected)
        thumb, factor = s.read_thumbnail(37)
        assert thumb.shape == (32, 37, 3) and factor == 10


@pytest.mark.slow
def test_czi_fluorescence_channels_by_name(tmp_path):
    labels = cell_grid(100, 130)
    dapi = np.where(labels > 0, 3000, 200).astype(np.uint16)
    gfp = np.random.default_rng(2).integers(0, 4000, labels.shape).astype(np.uint16)
    path = write_czi(tmp_path / "fl.czi", {(0, 0, 0): (gfp, (-30, 15)), (0, 1, 0): (dapi, (-30, 15))},
                     names={0: "EGFP", 1: "Hoechst 33342"})
    with open_slide(path) as s:
        assert s.info.channel_names == ("EGFP", "Hoechst 33342") and s.info.n_channels == 2
        assert_regions_match(s, np.stack([gfp, dapi], axis=-1))
        assert model_channel(Protocol(name="p"), s) == 1   # the nuclear stain, picked by name
    summary, out_labels, _ = count(path, tmp_path)
    assert summary["cell_count"] == labels.max() and same_partition(labels, out_labels)
    assert summary["model_channel"] == 1 and summary["mpp"] == pytest.approx(0.5)


@pytest.mark.slow
def test_czi_brightfield_counted_end_to_end(tmp_path):
    labels = cell_grid(150, 170)
    path = write_czi(tmp_path / "he.czi", {(0, 0, 0): (he_like(labels), (0, 0))}, mpp_um=0.5)
    summary, out_labels, out = count(path, tmp_path, dark=True)
    assert out_labels.shape == labels.shape and same_partition(labels, out_labels)
    assert summary["format"] == "czi" and label_image_mpp(out / "labels.ome.tif") == pytest.approx(0.5)
    import pandas as pd
    cells = pd.read_csv(out / "cells.csv")
    # intensities from the original pixels in RGB order (CZI stores BGR)
    assert (cells["mean_intensity_red"].round() == 90).all() and (cells["mean_intensity_blue"].round() == 140).all()


def test_czi_pyramid_levels_are_zoomed_reads(tmp_path, monkeypatch):
    """The CZI writer makes no pyramid subblocks; with pyramid factors stood in, libCZI zooms from layer 0."""
    import cellseg.slides._czi as czi_module
    a = np.kron(np.arange(64, dtype=np.uint8).reshape(8, 8), np.ones((16, 16), np.uint8))   # 128 x 128 blocks
    path = write_czi(tmp_path / "p.czi", {(0, 0, 0): (a, (5, 7))})
    monkeypatch.setattr(czi_module, "pyramid_factors", lambda reader: (1, 2, 4))
    with open_slide(path) as s:
        assert s.info.levels == ((128, 128), (64, 64), (32, 32))
        np.testing.assert_array_equal(s.read_region(Box(0, 0, 32, 32), 2)[..., 0], a[::4, ::4])
        np.testing.assert_array_equal(s.read_region(Box(8, 16, 40, 56), 1)[..., 0], a[16:80:2, 32:112:2])


def test_czi_z_stack_reads_as_one_plane_or_a_projection(tmp_path):
    rng = np.random.default_rng(1)
    planes = {(0, c, z): (rng.integers(0, 4000, (32, 40), dtype=np.uint16), (0, 0)) for c in range(2) for z in range(3)}
    path = write_czi(tmp_path / "z.czi", planes)
    with pytest.raises(SlideError, match=r"expected a 2-D CZI .* has Z=3 \(a Z-stack: pass --z max or --z mean .* --z N"):
        open_slide(path)
    stack = np.stack([np.stack([planes[(0, c, z)][0] for c in range(2)], axis=-1) for z in range(3)])
    for z, expected in ((1, stack[0]), (3, stack[2]), ("max", stack.max(axis=0)),
                        ("mean", np.rint(stack.mean(axis=0)).astype(np.uint16))):
        with open_slide(path, z=z) as s:
            assert (s.info.z_planes, s.info.z, s.info.n_channels) == (3, z, 2)
            np.testing.assert_array_equal(s.read_region(Box(0, 0, 32, 40)), expected)
    with pytest.raises(ParameterError, match=r"expected --z 1-3 \(the Z-stack's planes\), got --z 4"):
        open_slide(path, z=4)


def test_czi_and_ome_zarr_time_series_read_one_time_point(tmp_path):
    rng = np.random.default_rng(2)
    planes = {(0, 0, 0, t): (rng.integers(0, 4000, (32, 40), dtype=np.uint16), (0, 0)) for t in range(3)}
    path = write_czi(tmp_path / "t.czi", planes)
    with pytest.raises(SlideError, match=r"expected a 2-D CZI .* has T=3 \(a time series: pass --t N"):
        open_slide(path)
    with open_slide(path, t=3) as s:
        assert (s.info.t_points, s.info.t) == (3, 3)
        np.testing.assert_array_equal(s.read_region(Box(0, 0, 32, 40))[..., 0], planes[(0, 0, 0, 2)][0])
    with pytest.raises(ParameterError, match=r"expected --t 1-3 \(the time series' points\), got --t 4"):
        open_slide(path, t=4)
    frames = rng.integers(0, 250, (4, 48, 64), dtype=np.uint8)
    series = write_ome_zarr(tmp_path / "t.zarr", frames, "tyx", levels=2)
    with pytest.raises(SlideError, match=r"axes TYX .*\(a time series: pass --t N"):
        open_slide(series)
    with open_slide(series, t=2) as s:      # every pyramid level reads the same time point
        assert (s.info.t_points, s.info.t) == (4, 2)
        assert_regions_match(s, frames[1][..., None])
        assert s.read_region(Box(0, 0, 24, 32), level=1).shape == (24, 32, 1)


@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.9])
def test_truncated_czi_is_one_line_exit_1_nothing_written(tmp_path, tiny_bundle, fraction):
    labels = cell_grid(64, 64)
    full = write_czi(tmp_path / "full.czi", {(0, 0, 0): (he_like(labels), (0, 0))})
    bad = truncate(full, tmp_path / "cut.czi", fraction)
    full.unlink()
    before = listing(tmp_path)
    result = invoke(["count", bad, "--model", tiny_bundle, *FAST])
    assert_user_error(result, 1, "cut.czi", "pylibCZIrw", "CZI")
    assert_nothing_left(tmp_path, before)


# --- OME-Zarr through zarr ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_levels_channels_and_pixel_size(tmp_path, version):
    rng = np.random.default_rng(3)
    data = rng.integers(0, 60000, (2, 150, 170), dtype=np.uint16)
    path = write_ome_zarr(tmp_path / "img.ome.zarr", data, "cyx", version, names=["DAPI", "Cy5"])
    import zarr
    group = zarr.open_group(str(path), mode="r")
    with open_slide(path) as s:
        i = s.info
        assert (i.format, i.backend, i.height, i.width, i.n_channels, i.dtype) == ("ome-zarr", "zarr", 150, 170, 2,
                                                                                 np.uint16)
        assert i.channel_names == ("DAPI", "Cy5") and i.mpp == pytest.approx(0.5) and i.mpp_source == "ome-zarr"
        assert i.levels == ((150, 170), (75, 85), (37, 42))
        assert_regions_match(s, data.transpose(1, 2, 0))
        for k in (1, 2):   # each level is the writer's own array
            assert_regions_match(s, np.asarray(group[f"s{k}"]).transpose(1, 2, 0), level=k)
    assert open_slide(path / ("zarr.json" if version == "0.5" else ".zattrs")).info.levels == i.levels


def test_ome_zarr_units_z_stacks_and_bioformats2raw(tmp_path):
    data = np.arange(60 * 80, dtype=np.uint16).reshape(1, 1, 1, 60, 80)
    nm = write_ome_zarr(tmp_path / "nm.zarr", data, "tczyx", mpp=325.0, unit="nanometer", levels=1)
    with open_slide(nm) as s:
        assert s.info.mpp == pytest.approx(0.325) and s.info.n_channels == 1
        assert_regions_match(s, data[0, 0, 0][..., None])
    planes = np.random.default_rng(0).integers(0, 250, (3, 2, 64, 64), dtype=np.uint8)
    stack = write_ome_zarr(tmp_path / "z.zarr", planes.transpose(1, 0, 2, 3), "czyx", levels=2)
    with pytest.raises(SlideError, match=r"expected a 2-D image .* axes CZYX .* Z-stack: pass --z max or --z mean"):
        open_slide(stack)
    for z, expected in ((2, planes[1]), ("max", planes.max(axis=0)),
                        ("mean", np.rint(planes.mean(axis=0)).astype(np.uint8))):
        with open_slide(stack, z=z) as s:      # every pyramid level reads the same plane or projection
            assert (s.info.z_planes, s.info.z, s.info.n_channels) == (3, z, 2)
            assert_regions_match(s, np.moveaxis(expected, 0, -1))
            assert s.read_region(Box(0, 0, 32, 32), level=1).shape == (32, 32, 2)
    # bioformats2raw writes the image as series 0 below a root group that only says so
    import zarr
    root = tmp_path / "converted.zarr"
    write_ome_zarr(root / "0", np.ones((32, 48), np.uint8), "yx", levels=1)
    zarr.open_group(str(root), mode="a").attrs["ome"] = {"version": "0.5", "bioformats2raw.layout": 3}
    with open_slide(root) as s:
        assert s.info.levels == ((32, 48),) and any("series 0" in d for d in s.info.details)
        assert s.info.warnings == ()
    # a multi-position acquisition: series 1 is another position, series 2 a small overview; one warning names both
    # positions, since only series 0 is counted
    write_ome_zarr(root / "1", np.ones((30, 50), np.uint8), "yx", levels=1)
    write_ome_zarr(root / "2", np.ones((6, 8), np.uint8), "yx", levels=1)
    with open_slide(root) as s:
        assert s.info.warnings == (
            "converted.zarr holds 2 images like the one counted (bioformats2raw series: series 0, series 1): only the "
            "first, series 0, is counted; to count another, pass --series N (0-1)",)
    with open_slide(root, series=1) as s:   # another position, chosen: read, said, and no warning
        assert (s.info.levels, s.info.series, s.info.warnings, s.info.positions) == (((30, 50),), 1, (), (0, 1))
        assert any("series 1 of 0-2" in d for d in s.info.details)
    with pytest.raises(ParameterError, match=r"^expected --series 0-2 \(the file's 3 images\), got --series 3$"):
        open_slide(root, series=3)
    with pytest.raises(ParameterError, match=r"^expected --series 0 \(the file holds one image\), got --series 1$"):
        open_slide(root / "1", series=1)    # an OME-Zarr image of its own


@pytest.mark.slow
def test_ome_zarr_counted_end_to_end_with_the_nuclear_channel(tmp_path):
    labels = cell_grid(140, 120)
    other = np.where(cell_grid(140, 120, pitch=17, radius=4) > 0, 250, 0).astype(np.uint8)  # other cells elsewhere
    data = np.stack([other, np.where(labels > 0, 200, 10).astype(np.uint8)])
    path = write_ome_zarr(tmp_path / "fl.ome.zarr", data, "cyx", names=["phalloidin", "DAPI"], mpp=0.65)
    summary, out_labels, out = count(path, tmp_path)
    assert summary["model_channel"] == 1 and summary["cell_count"] == labels.max()
    assert out_labels.shape == labels.shape and same_partition(labels, out_labels)
    assert label_image_mpp(out / "labels.ome.tif") == pytest.approx(0.65)


def test_corrupt_ome_zarr_is_one_line_exit_1_nothing_written(tmp_path, tiny_bundle):
    data = np.where(cell_grid(96, 96) > 0, 200, 10).astype(np.uint8)
    path = write_ome_zarr(tmp_path / "img.ome.zarr", data, "yx", levels=1)
    chunk = max((p for p in (path / "s0").rglob("*") if p.is_file() and p.name != "zarr.json"),
                key=lambda p: p.stat().st_size)
    truncate(chunk, chunk, 0.5)   # a damaged chunk: found when the tile is read, mid-run
    before = listing(tmp_path)
    result = invoke(["count", path, "--model", tiny_bundle, *FAST])
    assert_user_error(result, 1, "img.ome.zarr", "zarr", "corrupt")
    assert_nothing_left(tmp_path, before)
    truncate(path / "zarr.json", path / "zarr.json", 0.5)   # damaged metadata: found at open
    result = invoke(["count", path, "--model", tiny_bundle, *FAST])
    assert_user_error(result, 1, "img.ome.zarr", "zarr")
    assert_nothing_left(tmp_path, before)


# --- cellseg info ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_info_says_what_cellseg_sees(tmp_path):
    data = np.zeros((2, 600, 700), np.uint16)
    path = write_ome_zarr(tmp_path / "big.ome.zarr", data, "cyx", names=["DAPI", "GFP"], mpp=0.4)
    result = invoke(["info", path, "--tile-size", "128", "--halo", "32"])
    assert result.exit_code == 0, result.output
    text = result.stdout
    n_tiles = len(plan_tiles(600, 700, 128, 32))   # what count_slide plans at native scale
    assert n_tiles == 30
    for words in ("ome-zarr, read by zarr", "600 x 700 px", "3 level(s): 0: 600 x 700, 1: 300 x 350 (/2)",
                  "2: DAPI, GFP", "0.4 µm/px (from ome-zarr)", f"{n_tiles} (5 x 6) of 128 px with a 32 px halo",
                  "cells       nuclei only"):
        assert words in text, (words, text)
    text = invoke(["info", path, "--protocol", "he-nuclei"]).stdout
    assert "nuclei grown by up to 5 µm = 12.5 px into cells" in text, text
    czi = write_czi(tmp_path / "x.czi", {(0, 0, 0): (np.zeros((40, 50, 3), np.uint8), (0, 0))}, mpp_um=None)
    text = invoke(["info", czi]).stdout
    assert "czi, read by pylibCZIrw" in text and "3 (RGB)" in text and "unknown (the CZI scaling 0 x 0 µm is not positive" in text
    assert "a 5 µm cell expansion needs the pixel size" in invoke(["info", czi, "--protocol", "he-nuclei"]).stdout
    text = invoke(["info", DICOM]).stdout
    assert "dicom, read by openslide" in text and "0.499 µm/px (from openslide)" in text
    result = invoke(["info", tmp_path / "missing.czi"])
    assert_user_error(result, 1, "no such file")


def test_info_says_when_a_slide_looks_like_the_other_protocols_modality():
    """An H&E slide with the default (fluorescence) protocol: said before a long count, as the count would say it."""
    from ..helpers import EXAMPLES
    text = invoke(["info", EXAMPLES / "he_mosaic.ome.tif"]).stdout
    assert "looks like  brightfield" in text and "count it with --protocol he-nuclei" in text, text
    text = invoke(["info", EXAMPLES / "he_mosaic.ome.tif", "-p", "he-nuclei"]).stdout
    assert "looks like  brightfield" in text and "warning" not in text, text
    text = invoke(["info", EXAMPLES / "fluo_mosaic.ome.tif"]).stdout
    assert "looks like  fluorescence" in text and "warning" not in text, text


def test_info_loads_no_torch():
    code = ("import sys; from cellseg.cli import main; "
            f"main(['info', {str(DICOM)!r}, '--diameter', '30'], standalone_mode=False); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "dicom, read by openslide" in done.stdout and "--diameter" in done.stdout


# --- napari opens the same slides lazily ------------------------------------------------------------------

def test_napari_reader_opens_every_format_lazily(tmp_path):
    from cellseg_napari._lazy import LazyLevel
    from cellseg_napari._reader import get_reader
    czi = write_czi(tmp_path / "bf.czi", {(0, 0, 0): (he_like(cell_grid(64, 80)), (0, 0))})
    zarr_path = write_ome_zarr(tmp_path / "fl.ome.zarr", np.zeros((2, 300, 200), np.uint8), "cyx",
                               names=["DAPI", "GFP"])
    dicom = shutil.copytree(DICOM, tmp_path / "case")
    for path, n_layers, multiscale in ((czi, 1, False), (zarr_path, 2, True), (dicom, 1, False),
                                       (dicom / "boxes_0.dcm", 1, False)):
        reader = get_reader(str(path))
        assert reader is not None, path
        layers = reader(str(path))
        assert len(layers) == n_layers
        data, kwargs, kind = layers[0]
        assert kind == "image" and kwargs["multiscale"] == multiscale
        if multiscale:
            assert all(isinstance(level, LazyLevel) for level in data)
            assert kwargs["name"] == "fl [DAPI]" and data[0].slide.info.backend == "zarr"
    assert get_reader(str(tmp_path / "notes")) is None


@pytest.mark.slow
def test_concurrent_region_reads_in_every_backend(tmp_path):
    """The pipeline reads tiles in a thread of its own and napari in several: every backend must allow it."""
    from concurrent.futures import ThreadPoolExecutor
    rgb = np.random.default_rng(4).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    paths = [write_czi(tmp_path / "c.czi", {(0, 0, 0): (rgb, (0, 0))}),
             write_ome_zarr(tmp_path / "z.ome.zarr", np.moveaxis(rgb, -1, 0), "cyx", levels=1), DICOM]
    for path in paths:
        with open_slide(path) as s:
            h, w = s.info.levels[0]
            full = s.read_region(Box(0, 0, h, w))
            boxes = [Box(r, c, min(h, r + 7), min(w, c + 9)) for r in range(0, h, 5) for c in range(0, w, 8)]
            with ThreadPoolExecutor(4) as pool:
                for box, region in zip(boxes, pool.map(s.read_region, boxes)):
                    np.testing.assert_array_equal(region, full[box.slices()])
