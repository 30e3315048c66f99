"""Result writers: label canvas (labelstore), OME-TIFF pyramids (ome_pyramid), pictures, cells.csv, COCO RLE."""

import json
import math
import tracemalloc

import numpy as np
import pandas as pd
import pytest
import tifffile
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from cellseg.errors import ParameterError
from cellseg.geometry import Box
from cellseg.results import (
    CellsTableWriter,
    ChunkFiles,
    CocoWriter,
    LabelPyramid,
    LabelStore,
    Panoptic,
    crop_rle,
    crop_rles,
    write_label_images,
    write_overlay_png,
)


def write_labels_ome_tiff(store, path, mpp, tile=512):
    """labels.ome.tif alone (no panoptic encoding)."""
    write_label_images(store, {path: None}, mpp, tile)


def _painted_store(tmp_path, height=300, width=410, chunk=64, seed=0, cache_bytes=64 << 20):
    """A store painted with random overlapping rectangles of labels, and the numpy reference."""
    rng = np.random.default_rng(seed)
    store = LabelStore(tmp_path / "labels", height, width, chunk=chunk, cache_bytes=cache_bytes)
    ref = np.zeros((height, width), np.uint32)
    for label in range(1, 40):
        r0, c0 = int(rng.integers(0, height - 20)), int(rng.integers(0, width - 20))
        box = Box(r0, c0, min(r0 + int(rng.integers(5, 90)), height), min(c0 + int(rng.integers(5, 90)), width))
        labels = np.where(rng.random(box.shape) < 0.6, label, 0).astype(np.uint32)
        store.paint(box, labels)
        ref[box.slices()] = np.where(labels != 0, labels, ref[box.slices()])
    return store, ref


# --------------------------------------------------------------------------- LabelStore

def test_label_store_paint_read_thumbnail(tmp_path):
    store, ref = _painted_store(tmp_path)
    assert (store.height, store.width) == ref.shape
    assert ref.any() and (ref == 0).any()
    np.testing.assert_array_equal(store.read(Box(0, 0, *ref.shape)), ref)
    np.testing.assert_array_equal(store.read(Box(17, 33, 250, 400)), ref[17:250, 33:400])
    np.testing.assert_array_equal(store.read(Box(5, 7, 299, 409), step=3), ref[5:299:3, 7:409:3])
    for factor in (1, 2, 7, 64, 100, 500):  # below, at and above the chunk size
        thumb = store.thumbnail(factor)
        assert thumb.dtype == np.uint32
        np.testing.assert_array_equal(thumb, ref[::factor, ::factor])


def test_the_pyramid_gives_the_overlay_the_same_label_thumbnail_as_the_canvas(tmp_path):
    # overlay.png's labels come from the deepest pyramid level that holds them (a factor of 4: level 2 read as it
    # is; 12: level 2 every third pixel; odd: the canvas): the same pixels as the canvas's own thumbnail
    store, ref = _painted_store(tmp_path, height=700, width=530, chunk=64)
    pyramid = LabelPyramid(store, tile=128)
    assert len(pyramid.levels) == 4                       # 700 -> 350 -> 175 -> 88 px
    for factor in (1, 2, 3, 4, 6, 8, 12, 16, 24, 48, 1000):
        np.testing.assert_array_equal(pyramid.thumbnail(factor), ref[::factor, ::factor])
        np.testing.assert_array_equal(pyramid.thumbnail(factor), store.thumbnail(factor))
    pyramid.remove()
    assert not list(store.folder.glob("_level*"))


@pytest.mark.parametrize("cached_chunks", [1, 3])
def test_label_store_write_back_cache_evicts_and_reloads_chunks(tmp_path, cached_chunks):
    # A cache far smaller than the painted area: chunks go to disk, come back for later paints, and every read
    # (here also between paints) sees exactly what was painted.
    store, ref = _painted_store(tmp_path, chunk=32, cache_bytes=cached_chunks * 32 * 32 * 4)
    assert len(store._cache) <= cached_chunks
    np.testing.assert_array_equal(store.read(Box(0, 0, *ref.shape)), ref)
    assert not store._cache                                    # a read flushes
    store.paint(Box(10, 10, 50, 80), np.full((40, 70), 77, np.uint32))
    ref[10:50, 10:80] = 77
    np.testing.assert_array_equal(store.thumbnail(3), ref[::3, ::3])
    painted = {(i, j) for i in range(-(-300 // 32)) for j in range(-(-410 // 32)) if ref[i * 32:(i + 1) * 32,
                                                                                        j * 32:(j + 1) * 32].any()}
    assert store.written_chunks == painted


def test_painting_masks_pixel_by_pixel_is_painting_their_label_image(tmp_path):
    """LabelFiles.paint_masks puts the nuclei's pixels straight into the canvas; the canvas is the one painted from
    each tile's label image (cells.label_tile), overlapping masks (painted as label_tile paints them) and chunks at
    the canvas's edges included."""
    from types import SimpleNamespace

    from cellseg.cells import label_tile
    from cellseg.results.writer import LabelFiles
    rng = np.random.default_rng(0)
    for trial in range(12):
        height, width = (int(v) for v in rng.integers(150, 700, 2))
        chunk = int(rng.choice([32, 64, 128]))
        reference = LabelStore(tmp_path / f"reference{trial}", height, width, chunk)
        files = LabelFiles(tmp_path / f"files{trial}", height, width, None, chunk, False, frozenset())
        next_id = 1
        for _ in range(5):
            row0, col0 = int(rng.integers(0, height - 60)), int(rng.integers(0, width - 60))
            read = Box(row0, col0, min(height, row0 + 200), min(width, col0 + 200))
            boxes, masks = [], []
            for _ in range(int(rng.integers(0, 30))):
                h, w = (int(v) for v in rng.integers(1, 16, 2))
                r = int(rng.integers(read.row0, read.row1 - h + 1))
                c = int(rng.integers(read.col0, read.col1 - w + 1))
                boxes.append((r, c, r + h, c + w))
                masks.append(rng.random((h, w)) < 0.7)
            boxes = np.array(boxes, np.int64).reshape(-1, 4)
            ids = np.arange(next_id, next_id + len(masks))
            next_id += len(masks)
            reference.paint(read, label_tile(SimpleNamespace(boxes=boxes, masks=masks), ids, read))
            files.paint_masks(tuple(read), ids, boxes, masks, None)
        whole = Box(0, 0, height, width)
        assert np.array_equal(files.nucleus_store.read(whole), reference.read(whole))
    apart = LabelStore(tmp_path / "apart", 100, 100, 32)
    assert apart.paint_pixels(np.array([1, 40]), np.array([1, 70]), np.array([5, 6], np.uint32))
    assert not apart.paint_pixels(np.array([3, 3]), np.array([4, 4]), np.array([7, 8], np.uint32))   # overlap
    assert apart.read(Box(0, 0, 100, 100))[[1, 40, 3], [1, 70, 4]].tolist() == [5, 6, 0]


def test_label_store_paint_keeps_zero_pixels_and_rejects_bad_input(tmp_path):
    store = LabelStore(tmp_path / "s", 20, 30, chunk=8)
    store.paint(Box(0, 0, 20, 30), np.full((20, 30), 5, np.uint32))
    patch = np.zeros((4, 6), np.uint32)
    patch[1, 2] = 9
    store.paint(Box(2, 3, 6, 9), patch)
    out = store.read(Box(0, 0, 20, 30))
    assert out[3, 5] == 9 and (out == 5).sum() == 20 * 30 - 1
    with pytest.raises(ValueError, match="shape"):
        store.paint(Box(0, 0, 4, 4), np.ones((3, 4), np.uint32))
    with pytest.raises(ValueError, match="uint32"):
        store.paint(Box(0, 0, 4, 4), np.ones((4, 4), np.int64))
    with pytest.raises(ValueError, match="inside"):
        store.paint(Box(18, 0, 22, 4), np.ones((4, 4), np.uint32))
    with pytest.raises(ParameterError):
        store.thumbnail(0)
    store.remove()
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- OME-TIFF

@pytest.mark.parametrize("mpp", [0.25, None])
def test_labels_ome_tiff_pyramid(tmp_path, mpp):
    store, ref = _painted_store(tmp_path, height=300, width=410, chunk=64)
    path = tmp_path / "labels.ome.tif"
    write_labels_ome_tiff(store, path, mpp, tile=64)
    # levels /2 until the longer side <= 64: 410 -> 205 -> 103 -> 52
    expected_levels = 4
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and tif.is_bigtiff
        series = tif.series[0]
        assert series.axes == "YX"
        assert len(series.levels) == expected_levels
        for k, level in enumerate(series.levels):
            page = level.keyframe
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (64, 64)
            assert page.compression in (tifffile.COMPRESSION.ADOBE_DEFLATE, tifffile.COMPRESSION.DEFLATE)
            data = level.asarray()
            assert data.dtype == np.uint32
            np.testing.assert_array_equal(data, ref[::2 ** k, ::2 ** k])  # nearest: labels stay labels
        ome = tif.ome_metadata
    if mpp is None:
        assert "PhysicalSizeX" not in ome
    else:
        assert 'PhysicalSizeX="0.25"' in ome and 'PhysicalSizeY="0.25"' in ome
    assert [p.name for p in (tmp_path / "labels").iterdir() if p.name.startswith("_level")] == []


def test_label_images_are_written_together_and_one_failure_stops_them_all(tmp_path):
    store, ref = _painted_store(tmp_path, height=300, width=410, chunk=64)

    class Doubled:                          # a Panoptic's part: new values from the labels
        def encode(self, labels, row0, col0, step, out=None):
            return labels * 2

    a, b = tmp_path / "a.ome.tif", tmp_path / "b.ome.tif"
    write_label_images(store, {a: None, b: Doubled()}, 0.5, tile=64)
    with tifffile.TiffFile(a) as ta, tifffile.TiffFile(b) as tb:
        assert len(ta.series[0].levels) == len(tb.series[0].levels) == 4
        for k, (la, lb) in enumerate(zip(ta.series[0].levels, tb.series[0].levels)):
            np.testing.assert_array_equal(la.asarray(), ref[::2 ** k, ::2 ** k])
            np.testing.assert_array_equal(lb.asarray(), ref[::2 ** k, ::2 ** k] * 2)

    class Broken:
        def encode(self, labels, row0, col0, step, out=None):
            if row0 >= 128:
                raise RuntimeError("encoder broke")
            return labels

    with pytest.raises(RuntimeError, match="encoder broke"):    # raised here, and no writer left waiting
        write_label_images(store, {tmp_path / "c.ome.tif": None, tmp_path / "d.ome.tif": Broken()}, None, tile=64)


def test_panoptic_tiles_without_cells_match_the_pixel_by_pixel_encoding(tmp_path):
    # Glass and cell-free tissue tiles take a shortcut (never materialised), and so do tiles with cells inside the
    # tissue (the tissue value filled, not sampled); every level must still equal the encoding of each pixel from
    # the tissue mask and the labels.
    from cellseg.tissue.finder import TissueMask
    height, width = 300, 410
    store = LabelStore(tmp_path / "labels", height, width, chunk=64)
    ref = np.zeros((height, width), np.uint32)
    ref[10:30, 20:45], ref[200:230, 350:380] = 1, 2       # cell 1 in a tile of tissue, cell 2 at its edge
    store.paint(Box(0, 0, height, width), ref)
    mask = np.zeros((30, 41), bool)
    mask[:, :15] = True                       # tissue on the left: whole tiles of tissue, no cells
    mask[np.arange(30), 15 + np.arange(30) // 2] = True   # a ragged edge: mixed tiles
    mask[18:26, 33:40] = True                 # around cell 2
    tissue = TissueMask(mask, 10.0, 10.0, "test")
    assert tissue.constant(np.array([0, 63]), np.array([0, 63])) is True
    assert tissue.constant(np.array([0, 63]), np.array([320, 383])) is False
    assert tissue.constant(np.array([0, 299]), np.array([0, 409])) is None
    panoptic = Panoptic(tissue, np.array([0, 2, 2], np.uint32), ["nucleus"])
    write_label_images(store, {tmp_path / "p.ome.tif": panoptic}, None, tile=64)
    d = panoptic.label_divisor
    expected = tissue.at(np.arange(height), np.arange(width)).astype(np.uint32) * d
    expected[ref > 0] = 2 * d + ref[ref > 0]
    with tifffile.TiffFile(tmp_path / "p.ome.tif") as tif:
        for k, level in enumerate(tif.series[0].levels):
            np.testing.assert_array_equal(level.asarray(), expected[::2 ** k, ::2 ** k])


def test_labels_ome_tiff_memory_is_a_few_tiles(tmp_path):
    # 1024 x 1024 uint32 = 4 MiB of labels; writing must not hold the canvas (or a level) at once (no compressed
    # chunks held in memory here: these labels hardly compress, so the budget would be most of the peak).
    store = LabelStore(tmp_path / "big", 1024, 1024, chunk=128, memory_bytes=0)
    for r in range(0, 1024, 256):
        labels = np.arange(r * 1024, (r + 256) * 1024, dtype=np.uint32).reshape(256, 1024) + 1
        store.paint(Box(r, 0, r + 256, 1024), labels)
    tracemalloc.start()
    try:
        write_labels_ome_tiff(store, tmp_path / "big.ome.tif", 0.5, tile=128)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024 * 4 / 2, f"peak {peak / 2**20:.1f} MiB"
    with tifffile.TiffFile(tmp_path / "big.ome.tif") as tif:
        assert tif.series[0].levels[0].asarray()[1023, 1023] == 1024 * 1024


def test_labels_ome_tiff_rejects_bad_tile_and_mpp(tmp_path):
    store = LabelStore(tmp_path / "s", 32, 32)
    with pytest.raises(ParameterError, match="multiple of 16"):
        write_labels_ome_tiff(store, tmp_path / "x.tif", None, tile=100)
    with pytest.raises(ParameterError, match="pixel size"):
        write_labels_ome_tiff(store, tmp_path / "x.tif", -1.0)


# --------------------------------------------------------------------------- pictures

@pytest.mark.parametrize("thumb", [
    np.random.default_rng(0).integers(0, 4000, (40, 50, 3)).astype(np.uint16),   # RGB, 12-bit
    np.random.default_rng(1).random((40, 50)).astype(np.float32),                 # grayscale 2-D
    np.random.default_rng(2).random((40, 50, 5)),                                 # 5 channels
    np.zeros((40, 50, 1), np.uint8),                                              # flat
])
def test_overlay_png_draws_outlines(tmp_path, thumb):
    labels = np.zeros((40, 50), np.uint32)
    labels[10:20, 10:25] = 1
    labels[10:20, 25:35] = 2  # touching cell: needs its own outline
    path = tmp_path / "overlay.png"
    write_overlay_png(thumb, labels, path)
    img = np.asarray(Image.open(path))
    assert img.shape == (40, 50, 3) and img.dtype == np.uint8
    yellow = np.all(img == (255, 255, 0), axis=2)
    assert yellow[10, 15] and yellow[19, 15] and yellow[15, 24] and yellow[15, 25]
    assert not yellow[15, 15] and not yellow[0, 0]


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.uint16, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
                  elements=st.integers(0, 3)))
@example(np.array([[5]], np.uint16))
def test_outline_pixels_are_scikit_images_inner_boundaries(labels):
    from skimage.segmentation import find_boundaries

    from cellseg.results.pictures import outline_pixels
    assert np.array_equal(outline_pixels(labels), find_boundaries(labels, mode="inner"))


@pytest.mark.parametrize("image", [
    np.random.default_rng(3).integers(0, 256, (30, 40), dtype=np.uint8),
    np.random.default_rng(4).integers(0, 4096, (30, 40, 3)).astype(np.uint16),
    np.random.default_rng(5).integers(-50, 50, (30, 40)).astype(np.int16),
    np.random.default_rng(6).random((30, 40)).astype(np.float32),
    np.where(np.random.default_rng(7).random((30, 40)) < 0.1, np.nan, 5.0),
    np.random.default_rng(8).random((30, 40)) < 0.5,
    np.full((30, 40), 7, np.uint8),
])
def test_the_display_stretch_by_table_lookup_is_the_arithmetic_on_every_pixel(image):
    from cellseg.results.pictures import _display_rgb
    values = image.astype(np.float32)      # the stretch written out, pixel by pixel
    finite = values[np.isfinite(values)]
    lo, hi = np.percentile(finite, [1, 99.8]) if finite.size else (0.0, 1.0)
    hi = lo + 1.0 if hi <= lo else hi
    expected = (np.clip(np.nan_to_num((values - lo) / (hi - lo), nan=0.0), 0, 1) * 255).astype(np.uint8)
    expected = np.repeat(expected[..., None], 3, axis=2) if expected.ndim == 2 else expected
    assert np.array_equal(_display_rgb(image), expected)


@given(st.integers(1, 3000), st.integers(1, 65535), st.sampled_from([np.uint8, np.uint16]), st.integers(0, 2 ** 32 - 1))
@settings(max_examples=200, deadline=None)
def test_integer_percentiles_from_a_histogram_are_numpys_to_the_bit(size, top, dtype, seed):
    from cellseg.results.pictures import _integer_percentiles
    image = np.random.default_rng(seed).integers(0, min(top, np.iinfo(dtype).max) + 1, size).astype(dtype)
    percents = (0, 1, 37.5, 50, 99.8, 100)
    assert _integer_percentiles(image, percents) == np.percentile(image.astype(np.float32), percents).tolist()


@pytest.mark.parametrize("image", [
    np.random.default_rng(9).integers(0, 256, (37, 53, 3), dtype=np.uint8),      # RGB
    np.random.default_rng(10).integers(0, 256, (1, 70), dtype=np.uint8),         # grayscale, one row
    np.full((20, 9, 3), 255, np.uint8),
])
def test_png_bytes_are_the_same_pixels_to_any_png_reader(image):
    import io

    import imagecodecs

    from cellseg.results.pictures import png_bytes
    data = png_bytes(image)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), image)
    assert np.array_equal(imagecodecs.png_decode(data), image)


def test_overlay_png_resizes_labels_off_by_rounding(tmp_path):
    labels = np.zeros((21, 26), np.uint32)
    labels[5:15, 5:15] = 3
    write_overlay_png(np.ones((20, 25, 3), np.uint8), labels, tmp_path / "o.png")
    assert np.asarray(Image.open(tmp_path / "o.png")).shape == (20, 25, 3)


@pytest.mark.parametrize("areas", [np.array([30.5, 42.0, 55.1, np.nan, 61.0]), np.array([])])
def test_area_histogram(areas):
    from io import BytesIO

    from cellseg.results.report_plots import histogram_png
    with Image.open(BytesIO(histogram_png(areas, "nucleus area (µm²)", "Nucleus area"))) as img:
        assert img.size == (540, 324)
        bars = np.all(np.asarray(img.convert("RGB")) == (0x48, 0x78, 0xA8), axis=2)
    assert bars.any() == bool(np.isfinite(areas).any())   # bars drawn for the finite values, none without


# --------------------------------------------------------------------------- cells.csv

COLUMNS = {"id": "int64", "class": "str", "area_px": "int32", "centroid_row_um": "float64",
           "score": "float32"}


def test_cells_table_header_only_when_no_cells(tmp_path):
    path = tmp_path / "cells.csv"
    with CellsTableWriter(path, COLUMNS):
        pass
    assert path.read_text() == "id,class,area_px,centroid_row_um,score\n"
    assert list(pd.read_csv(path).columns) == list(COLUMNS)


@pytest.mark.parametrize("flush_rows", [1, 2, 20000])   # rows written per append, in pairs, all at close
def test_cells_table_rows_formats_and_validation(tmp_path, flush_rows):
    path = tmp_path / "cells.csv"
    with CellsTableWriter(path, COLUMNS, flush_rows=flush_rows) as writer:
        writer.append({"score": np.array([0.912345678, 0.5], np.float32), "id": np.array([1, 2]),
                       "class": np.array(["nucleus", "a, b"]), "area_px": np.array([12, 400]),
                       "centroid_row_um": np.array([1234.56789012, np.nan])})
        writer.append(pd.DataFrame({"id": [3], "class": ["nucleus"], "area_px": [7],
                                    "centroid_row_um": [1e-7], "score": [1.0]}))
        with pytest.raises(ValueError, match=r"missing \['score'\]"):
            writer.append({k: np.zeros(1) for k in COLUMNS if k != "score"})
        with pytest.raises(ValueError, match="one length"):
            writer.append({k: np.zeros(2 if k == "id" else 1) for k in COLUMNS})
        assert writer.rows == 3
    lines = path.read_text().splitlines()
    assert lines[1] == "1,nucleus,12,1234.57,0.912346"
    assert lines[2] == '2,"a, b",400,,0.5'  # NaN -> empty field; commas quoted
    assert lines[3] == "3,nucleus,7,1e-07,1"
    table = pd.read_csv(path)
    assert len(table) == 3 and math.isnan(table["centroid_row_um"][1])


# --------------------------------------------------------------------------- COCO RLE

def _decode_counts(s):
    """Python port of pycocotools rleFrString, with unbounded ints (pycocotools truncates to 32 bits)."""
    counts, p = [], 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


@st.composite
def _placed_crops(draw):
    height, width = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    h, w = draw(st.integers(0, height)), draw(st.integers(0, width))
    row0, col0 = draw(st.integers(0, height - h)), draw(st.integers(0, width - w))
    crop = draw(hnp.arrays(bool, (h, w)))
    return crop, row0, col0, height, width


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(_placed_crops())
@example((np.ones((5, 4), bool), 0, 0, 5, 4))                       # the whole image
@example((np.ones((5, 2), bool), 0, 1, 5, 4))                       # full height, inner columns
@example((np.zeros((3, 3), bool), 1, 1, 5, 5))                      # empty crop
@example((np.zeros((0, 3), bool), 2, 1, 5, 5))                      # zero-size crop
@example((np.eye(3, dtype=bool), 2, 2, 5, 5))                       # bottom-right corner
@example((np.array([[True], [False], [True]]), 0, 0, 3, 1))        # first pixel set
def test_crop_rle_matches_pycocotools(placed):
    crop, row0, col0, height, width = placed
    full = np.zeros((height, width), np.uint8, order="F")
    full[row0:row0 + crop.shape[0], col0:col0 + crop.shape[1]] = crop
    expected = mask_utils.encode(full)
    got = crop_rle(crop, row0, col0, height, width)
    assert got == {"size": [height, width], "counts": expected["counts"].decode("ascii")}
    assert sum(_decode_counts(got["counts"])) == height * width


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.data())
def test_crop_rles_of_many_crops_at_once_match_pycocotools_one_by_one(height, width, data):
    """The batched path the COCO writer uses: runs must never merge across two crops (e.g. one ending in ones
    and the next starting with ones at the origin)."""
    from cellseg.results import crop_rles

    crops, rows, cols = [], [], []
    for _ in range(data.draw(st.integers(0, 6))):
        h, w = data.draw(st.integers(0, height)), data.draw(st.integers(0, width))
        rows.append(data.draw(st.integers(0, height - h)))
        cols.append(data.draw(st.integers(0, width - w)))
        crops.append(data.draw(hnp.arrays(bool, (h, w))))
    got = crop_rles(crops, rows, cols, height, width)
    assert len(got) == len(crops)
    for crop, r0, c0, rle in zip(crops, rows, cols, got):
        full = np.zeros((height, width), np.uint8, order="F")
        full[r0:r0 + crop.shape[0], c0:c0 + crop.shape[1]] = crop
        assert rle == {"size": [height, width], "counts": mask_utils.encode(full)["counts"].decode("ascii")}


def test_crop_rle_beyond_32_bit_pixel_counts():
    # A 100k x 100k slide: runs exceed 2**32, where pycocotools' uint32 counts would overflow.
    height = width = 100_000
    crop = np.zeros((3, 4), bool)
    crop[0, 1] = crop[2, 1] = crop[1, 3] = True
    row0, col0 = 99_990, 70_000
    counts = _decode_counts(crop_rle(crop, row0, col0, height, width)["counts"])
    assert sum(counts) == height * width and max(counts) > 2 ** 32
    ends = np.cumsum(counts)
    ones = [i for run in range(1, len(counts), 2) for i in range(ends[run - 1], ends[run])]
    rows, cols = np.nonzero(crop)
    assert sorted(ones) == sorted((col0 + c) * height + row0 + r for r, c in zip(rows, cols))
    with pytest.raises(ValueError, match="inside"):
        crop_rle(crop, 99_998, 0, height, width)


def test_coco_writer_loads_and_decodes_in_place(tmp_path):
    path = tmp_path / "predictions.json"
    cats = [{"id": 1, "name": "nucleus"}]
    disk = np.hypot(*np.mgrid[-4:5, -4:5]) <= 4  # 9 x 9
    with CocoWriter(path, "slide.tif", 60, 80, cats) as writer:
        writer.append(np.array([1, 2]), np.array([[10, 20, 19, 29], [51, 71, 60, 80]]),
                      [disk, disk], np.array([0.9, 0.75]), np.array([1, 1]))
        writer.append(np.zeros(0, int), np.zeros((0, 4), int), [], np.zeros(0), np.zeros(0, int))
        writer.append(np.array([3]), np.array([[0, 0, 2, 3]]), [np.ones((2, 3), bool)],
                      np.array([0.5]), np.array([1]))
        with pytest.raises(ValueError, match="box's shape"):
            writer.append(np.array([4]), np.array([[0, 0, 2, 2]]), [disk], np.array([0.5]), np.array([1]))
    coco = COCO(str(path))
    assert coco.imgs[1] == {"id": 1, "file_name": "slide.tif", "height": 60, "width": 80}
    assert sorted(coco.anns) == [1, 2, 3]
    ann = coco.anns[2]
    assert ann["bbox"] == [71, 51, 9, 9] and ann["area"] == int(disk.sum()) and ann["score"] == 0.75
    full = coco.annToMask(ann)
    assert full.shape == (60, 80) and full.sum() == disk.sum()
    np.testing.assert_array_equal(full[51:60, 71:80], disk)
    res = coco.loadRes(coco.dataset["annotations"])
    assert len(res.anns) == 3 and res.anns[3]["area"] == 6
    np.testing.assert_array_equal(np.nonzero(res.annToMask(res.anns[3]))[0], [0, 0, 0, 1, 1, 1])


def test_cells_table_text_is_pandas_to_csv_text(tmp_path):
    """The table is formatted column by column; its text is the text pandas' to_csv(float_format="%.6g") wrote
    before, NaN, inf, -0, float32, bools and strings to be quoted included."""
    import io
    rng = np.random.default_rng(5)
    n = 3000
    floats = rng.standard_normal(n) * 10.0 ** rng.integers(-40, 40, n)
    floats[rng.integers(0, n, 300)] = np.nan
    floats[:6] = [np.inf, -np.inf, -0.0, 0.0, 1e16, 123456.5]
    data = {"id": rng.integers(-10 ** 12, 10 ** 12, n), "class": rng.choice(["", "a", "a,b", 'q"x', "x\ny", "x\ry"], n),
            "area_px": rng.integers(0, 1000, n).astype(np.int32), "centroid_row_um": floats,
            "score": np.where(rng.random(n) < 0.1, np.nan, rng.random(n)).astype(np.float32),
            "cut": rng.random(n) < 0.5}
    columns = {**COLUMNS, "cut": "bool"}
    with CellsTableWriter(tmp_path / "cells.csv", columns, flush_rows=1000) as writer:
        writer.append(data)
    expected = io.StringIO()
    pd.DataFrame(data, columns=list(columns)).to_csv(expected, index=False, float_format="%.6g", na_rep="",
                                                     lineterminator="\n")
    assert (tmp_path / "cells.csv").read_bytes().decode() == expected.getvalue()


@pytest.mark.parametrize("batch_nuclei", [1, 7, 256])
def test_coco_annotations_are_json_dumps_text(tmp_path, batch_nuclei):
    """Annotations are formatted by one template each; the text is json.dumps' of the same dicts, whether tiles are
    written one by one or several at once (batch_nuclei)."""
    path = tmp_path / "predictions.json"
    rng = np.random.default_rng(2)
    masks = [rng.random((rng.integers(1, 30), rng.integers(1, 30))) < 0.7 for _ in range(40)]
    boxes = np.array([(r, c, r + m.shape[0], c + m.shape[1]) for m, (r, c) in
                      zip(masks, rng.integers(0, 200, (40, 2)))])
    scores, classes = rng.random(40).astype(np.float32), rng.integers(1, 3, 40)
    with CocoWriter(path, "s.tif", 300, 300, [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
                    batch_nuclei=batch_nuclei) as writer:
        for a, b in ((0, 3), (3, 3), (3, 20), (20, 21), (21, 40)):     # tiles of 3, 0, 17, 1 and 19 nuclei
            writer.append(np.arange(a + 1, b + 1), boxes[a:b], masks[a:b], scores[a:b], classes[a:b])
    rles = crop_rles(masks, boxes[:, 0], boxes[:, 1], 300, 300)
    assert any("\\" in r["counts"] for r in rles)        # a backslash to escape
    lines = path.read_text().split("\n")[1:-2]
    for k, line in enumerate(lines):
        r0, c0, r1, c1 = boxes[k].tolist()
        ann = {"id": k + 1, "image_id": 1, "category_id": int(classes[k]), "bbox": [c0, r0, c1 - c0, r1 - r0],
               "area": int(masks[k].sum()), "score": float(f"{float(scores[k]):.6g}"), "iscrowd": 0,
               "segmentation": rles[k]}
        assert line.rstrip(",") == json.dumps(ann)


def test_coco_writer_zero_cells_is_valid_json(tmp_path):
    path = tmp_path / "predictions.json"
    with CocoWriter(path, "empty.png", 10, 10, [{"id": 1, "name": "nucleus"}]):
        pass
    doc = json.loads(path.read_text())
    assert doc["annotations"] == [] and doc["images"][0]["width"] == 10


@pytest.mark.parametrize("memory_bytes", [0, 64 << 20])
def test_chunk_files_read_any_strided_window_and_keep_zero_blocks_off_disk(tmp_path, memory_bytes):

    rng = np.random.default_rng(3)
    ref = np.zeros((150, 230), np.uint32)
    ref[20:100, 40:180] = rng.integers(0, 5, (80, 140))
    blocks = ChunkFiles(tmp_path / "c", *ref.shape, chunk=64, memory_bytes=memory_bytes)
    for i in range(3):
        for j in range(4):
            blocks.store(i, j, ref[i * 64:(i + 1) * 64, j * 64:(j + 1) * 64].copy())
    assert not (tmp_path / "c" / "0.3.zst").exists() and (0, 3) not in blocks.written    # all zero: no file
    for _ in range(50):
        r0, c0 = rng.integers(0, 150), rng.integers(0, 230)
        r1, c1 = rng.integers(r0, 200), rng.integers(c0, 300)     # may run past the edge: clipped
        step = int(rng.integers(1, 5))
        np.testing.assert_array_equal(blocks.read(r0, r1, c0, c1, step), ref[r0:r1:step, c0:c1:step])
    blocks.store(1, 1, np.zeros((64, 64), np.uint32))              # overwritten with zeros: its file goes
    assert (1, 1) not in blocks.written and not (tmp_path / "c" / "1.1.zst").exists()
    assert not blocks.read(64, 128, 64, 128).any()
    with pytest.raises(ValueError, match="shape"):
        blocks.store(2, 3, np.ones((64, 64), np.uint32))           # the edge block is 22 x 38


def test_chunk_files_hold_compressed_blocks_in_memory_up_to_their_budget(tmp_path):
    rng = np.random.default_rng(4)
    ref = rng.integers(1, 1 << 30, (128, 256)).astype(np.uint32)   # incompressible: 16 kB a 64² block
    blocks = ChunkFiles(tmp_path / "c", *ref.shape, chunk=64, memory_bytes=40_000)
    for i in range(2):
        for j in range(4):
            blocks.store(i, j, ref[i * 64:(i + 1) * 64, j * 64:(j + 1) * 64].copy())
    on_disk = sorted(f.name for f in (tmp_path / "c").iterdir())
    assert len(on_disk) == 6 and len(blocks.written) == 8            # two blocks fit the budget, six went to files
    np.testing.assert_array_equal(blocks.read(0, 128, 0, 256), ref)
    # overwriting a block held in memory with one that no longer fits moves it to a file, and back
    held = next((i, j) for i in range(2) for j in range(4) if f"{i}.{j}.zst" not in on_disk)
    blocks.store(*held, np.zeros((64, 64), np.uint32))
    assert held not in blocks.written and not blocks.read(held[0] * 64, held[0] * 64 + 64, held[1] * 64,
                                                          held[1] * 64 + 64).any()
    blocks.store(1, 3, np.ones((64, 64), np.uint32))                 # was on disk; now fits in memory
    assert not (tmp_path / "c" / "1.3.zst").exists()
    np.testing.assert_array_equal(blocks.load(1, 3), 1)


def test_a_removed_canvas_lets_go_of_its_chunks(tmp_path):
    store = LabelStore(tmp_path / "labels", 64, 64, chunk=32)
    store.paint(Box(0, 0, 64, 64), np.arange(1, 64 * 64 + 1, dtype=np.uint32).reshape(64, 64))
    blocks = store.chunk_files()
    assert len(blocks.written) == 4 and blocks._held_bytes > 0 and (tmp_path / "labels").is_dir()
    store.remove()
    assert not blocks.written and not blocks._held and blocks._held_bytes == 0
    assert not (tmp_path / "labels").exists()


def test_tile_batch_hands_out_tiles_in_order_once_enough_nuclei_wait():
    from cellseg.results.tile_batch import TileBatch
    batch = TileBatch(10)
    assert batch.add(("a",), 4) == [] and batch.add(("b",), 0) == []
    assert batch.add(("c",), 6) == [("a",), ("b",), ("c",)]      # 10 nuclei wait
    assert batch.add(("d",), 3) == [] and batch.take() == [("d",)] and batch.take() == []
    assert batch.add(("e",), 25) == [("e",)]                       # one big tile is a batch of its own


def test_thread_scratch_is_reused_per_thread_and_name():
    import threading

    from cellseg.util import thread_scratch
    a = thread_scratch("t", 100, np.uint32)
    a[:] = 7
    b = thread_scratch("t", 50, np.uint32)
    assert b.size == 50 and np.shares_memory(a, b) and (b == 7).all()     # the same memory, not fresh
    assert not np.shares_memory(a, thread_scratch("other", 50, np.uint32))
    assert thread_scratch("t", 200, np.uint32).size == 200               # grows when asked for more
    elsewhere = []
    t = threading.Thread(target=lambda: elsewhere.append(thread_scratch("t", 50, np.uint32)))
    t.start()
    t.join()
    assert not np.shares_memory(elsewhere[0], thread_scratch("t", 50, np.uint32))


def test_boxed_crop_is_twice_the_size_with_its_box_and_outlines():
    import io

    from cellseg.results.report_plots import boxed_png
    labels = np.zeros((30, 40), np.uint32)
    labels[10:20, 12:22] = 1
    picture = np.asarray(Image.open(io.BytesIO(boxed_png(np.full((30, 40), 100, np.uint8), labels, (5, 6, 25, 30),
                                                          (255, 0, 0)))))
    assert picture.shape == (60, 80, 3)
    assert np.array_equal(picture[2 * 4, 2 * 10], (255, 0, 0)) and np.array_equal(picture[2 * 4 + 1, 2 * 10 + 1],
                                                                                   (255, 0, 0))
    assert np.array_equal(picture[2 * 10, 2 * 15], (255, 255, 0))          # the nucleus's outline, 2 x 2 px
    assert np.array_equal(picture[2 * 15, 2 * 15], picture[0, 0])          # inside it and outside: the picture
