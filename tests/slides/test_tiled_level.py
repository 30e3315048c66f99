"""Tiled TIFF levels read tile by tile (slides/_tiff.py TiledLevel) give exactly the pixels tifffile's zarr store
gives, for every layout they take; other layouts stay with the zarr store."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import tifffile
import zarr

from cellseg.geometry import Box
from cellseg.slides import open_slide
from cellseg.slides._tiff import TiledLevel
from cellseg.slides.base import ArrayLevel, find_channel_axis


@contextmanager
def _zarr_level(path, level: int = 0) -> Iterator[ArrayLevel]:
    """The same level through tifffile's zarr store, as slides/_tiff.py read every level before TiledLevel."""
    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        lv = series.levels[level]
        with series.aszarr(level=level) as store:
            arr = zarr.open(store, mode="r")
            yield ArrayLevel(arr, lv.axes, find_channel_axis(series.axes, series.shape), (64, 64))


def _random_boxes(height: int, width: int, n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        r0, c0 = int(rng.integers(0, height - 1)), int(rng.integers(0, width - 1))
        yield r0, c0, int(rng.integers(r0 + 1, min(height, r0 + 150) + 1)), int(rng.integers(c0 + 1, min(width, c0 + 150) + 1))


def _smooth(shape, dtype, seed=0) -> np.ndarray:
    """Image-like pixels (JPEG and predictors see structure, not noise), the dtype's range in use."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:shape[0], :shape[1]]
    base = (np.sin(y / 9.0) + np.cos(x / 13.0) + 2) / 4
    if len(shape) == 3:
        base = base[..., None] * np.linspace(0.6, 1.0, shape[2])
    top = np.iinfo(dtype).max
    return np.clip(base * top + rng.normal(0, top * 0.02, shape), 0, top).astype(dtype)


LAYOUTS = {
    "uint8 zlib": dict(data=_smooth((200, 300), np.uint8), compression="zlib"),
    "uint16 lzw predictor": dict(data=_smooth((200, 300), np.uint16), compression="lzw", predictor=True),
    "uint16 big-endian, uncompressed": dict(data=_smooth((130, 170), np.uint16), byteorder=">"),
    "rgb jpeg": dict(data=_smooth((200, 300, 3), np.uint8), compression="jpeg", photometric="rgb"),
    "rgb zstd": dict(data=_smooth((200, 300, 3), np.uint8), compression="zstd", photometric="rgb"),
    "float32 deflate": dict(data=_smooth((120, 90), np.uint16).astype(np.float32) / 7, compression="zlib"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tiled_levels_read_what_the_zarr_store_reads(tmp_path, layout):
    options = dict(LAYOUTS[layout])
    data = options.pop("data")
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, data, tile=(64, 48), **options)      # edge tiles partly outside the image
    with open_slide(path) as slide, _zarr_level(path) as reference:
        assert isinstance(slide._levels[0], TiledLevel)
        for box in _random_boxes(*data.shape[:2]):
            np.testing.assert_array_equal(slide.read_region(Box(*box)), reference.read(*box))
        whole = slide.read_region(Box(0, 0, *data.shape[:2]))
    if options.get("compression") != "jpeg":
        np.testing.assert_array_equal(whole.reshape(data.shape), data)


def test_a_multichannel_ome_pyramid_one_page_a_channel(tmp_path):
    data = np.stack([_smooth((160, 200), np.uint16, seed=s) for s in range(3)])
    path = tmp_path / "channels.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(data, tile=(64, 64), compression="zlib", subifds=1, metadata={"axes": "CYX"})
        tw.write(data[:, ::2, ::2], tile=(64, 64), compression="zlib", subfiletype=1)
    with open_slide(path) as slide:
        assert [type(level).__name__ for level in slide._levels] == ["TiledLevel", "TiledLevel"]
        for level in (0, 1):
            h, w = slide.info.levels[level]
            with _zarr_level(path, level) as reference:
                for box in _random_boxes(h, w, n=15, seed=level):
                    np.testing.assert_array_equal(slide.read_region(Box(*box), level), reference.read(*box))
        np.testing.assert_array_equal(slide.read_region(Box(0, 0, 160, 200)), np.moveaxis(data, 0, -1))


def test_tiles_the_file_leaves_out_read_as_its_fill_value(tmp_path):
    """A sparse TIFF (tiles with no bytes: tifffile writes none for all-zero tiles when asked) reads as zeros."""
    data = np.zeros((128, 128), np.uint8)
    data[70:100, 10:50] = 200
    path = tmp_path / "sparse.tif"
    tifffile.imwrite(path, data, tile=(64, 64), compression="zlib")
    raw = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tf:      # drop the first tile's bytes: offset and count 0
        page = tf.pages.first
        offsets, counts = page.tags["TileOffsets"], page.tags["TileByteCounts"]
        for tag in (offsets, counts):
            size = tag.valuebytecount // tag.count
            raw[tag.valueoffset:tag.valueoffset + size] = bytes(size)
    path.write_bytes(bytes(raw))
    with open_slide(path) as slide:
        np.testing.assert_array_equal(slide.read_region(Box(0, 0, 128, 128))[..., 0], data)


def test_tiled_reads_from_several_threads_at_once(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    data = _smooth((512, 512), np.uint8)
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, data, tile=(64, 64), compression="zlib")
    boxes = list(_random_boxes(512, 512, n=200, seed=3))
    with open_slide(path) as slide, ThreadPoolExecutor(4) as pool:
        reads = list(pool.map(lambda b: slide.read_region(Box(*b)), boxes))
    for (r0, c0, r1, c1), region in zip(boxes, reads):
        np.testing.assert_array_equal(region[..., 0], data[r0:r1, c0:c1])


def test_other_layouts_stay_with_the_zarr_store(tmp_path):
    striped, planar = tmp_path / "striped.tif", tmp_path / "planar.tif"
    tifffile.imwrite(striped, _smooth((100, 100), np.uint8), compression="zlib", rowsperstrip=16)
    tifffile.imwrite(planar, _smooth((3, 100, 100), np.uint8), tile=(64, 64), compression="zlib",
                     planarconfig="separate", photometric="rgb")
    for path in (striped, planar):
        with open_slide(path) as slide:
            assert isinstance(slide._levels[0], ArrayLevel)
