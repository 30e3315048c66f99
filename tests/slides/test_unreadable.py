"""A bad tile is not a lost slide: a slide with damaged pixel data stops the count by default (one line, exit 1,
the finished bands kept for --resume); --skip-unreadable counts the rest and leaves the damaged regions out of the
count, the tissue area and the density, listing them in summary.json and report.html.

The detector reads the ground truth back (helpers.LabelReadingDetector), so it 'sees' cells even in the zeros of a
damaged tile: only the pipeline's rule removes them (cells whose centroid lies in an unreadable region)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from ..helpers import LabelCounterSpec, assert_user_error, invoke, random_cells, write_ome_zarr

SIDE, TILE = 384, 64                 # slide side, the file's storage tile
BAD = (2, 3)                         # the damaged storage tile (row, col): rows 128:192 cols 192:256


def _slide(tmp_path, compression: str, levels: int = 1):
    """A tiled OME-TIFF of bright cells on a dark background (with `levels` pyramid levels) and its labels."""
    labels = random_cells(SIDE, SIDE, 14, 400, seed=3)
    image = np.where(labels > 0, 200, 20).astype(np.uint8)
    path = tmp_path / f"slide_{compression}.ome.tif"
    options = {"tile": (TILE, TILE), "compression": compression, "photometric": "minisblack"}
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(image, subifds=levels - 1, metadata={"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
                  **options)
        for k in range(1, levels):
            tif.write(image[:: 2 ** k, :: 2 ** k], subfiletype=1, **options)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    (tmp_path / "intact").mkdir()
    tifffile.imwrite(tmp_path / "intact" / "labels.tif", labels)     # for _intact_cells
    return path, labels


def _damage(path, tile: tuple[int, int], level: int = 0) -> None:
    """Overwrite one storage tile's compressed bytes with garbage of the same length."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0] if level == 0 else tif.pages[0].pages[level - 1]
        per_row = -(-page.imagewidth // page.tilewidth)
        k = tile[0] * per_row + tile[1]
        offset, size = page.dataoffsets[k], page.databytecounts[k]
    data = bytearray(path.read_bytes())
    data[offset:offset + size] = bytes((i * 37 + 11) % 256 for i in range(size))
    path.write_bytes(bytes(data))


def _count(tmp_path, path, *extra):
    from cellseg.planning import load_protocol
    protocol = load_protocol("fluorescence-nuclei").replace(tile_size=128, halo_px=24, tissue_method="none")
    spec = LabelCounterSpec(protocol, tmp_path / "labels.tif")
    from cellseg.run import count_serially
    out = tmp_path / "out"
    counter = spec.load()
    counter.skip_unreadable = "--skip-unreadable" in extra
    return out, next(count_serially(counter, [(path, out)]))


def _centroids(out) -> np.ndarray:
    """(row, col) of every cell in a result's cells.csv."""
    import pandas as pd
    table = pd.read_csv(out / "cells.csv")     # by name: the column order grows with the table
    return table[["centroid_row_px", "centroid_col_px"]].to_numpy(float).reshape(-1, 2)


def _outside(centres: np.ndarray, box) -> np.ndarray:
    return centres[~((centres[:, 0] >= box[0]) & (centres[:, 0] < box[2]) & (centres[:, 1] >= box[1])
                     & (centres[:, 1] < box[3]))]


def _intact_cells(tmp_path, path) -> np.ndarray:
    """The cells of the slide before it is damaged (a count of an intact copy)."""
    import shutil
    intact = tmp_path / "intact"
    copy = intact / path.name
    (shutil.copytree if path.is_dir() else shutil.copy)(path, copy)
    out, outcome = _count(intact, copy)
    assert outcome.error is None
    return _centroids(out)


BAD_BOX = [BAD[0] * TILE, BAD[1] * TILE, (BAD[0] + 1) * TILE, (BAD[1] + 1) * TILE]


@pytest.mark.slow
@pytest.mark.parametrize("compression", ["zlib", "zstd", "jpeg"])
def test_a_damaged_tile_is_left_out_with_skip_unreadable(tmp_path, compression):
    path, labels = _slide(tmp_path, compression)
    intact = _intact_cells(tmp_path, path)
    _damage(path, BAD)
    out, outcome = _count(tmp_path, path, "--skip-unreadable")
    assert outcome.error is None, outcome.error
    summary = outcome.summary
    assert [r["box"] for r in summary["unreadable"]] == [BAD_BOX]
    assert summary["unreadable_area_px"] == TILE * TILE
    assert summary["tissue_area_px"] == SIDE * SIDE - TILE * TILE          # tissue "none": all but the bad tile
    # exactly the intact count's cells whose centroid is outside the bad tile: neighbours whose halo reaches into
    # it still find their own cells whole
    expected = _outside(intact, BAD_BOX)
    assert summary["cell_count"] == len(expected) < len(intact)
    assert np.array_equal(np.sort(_centroids(out), axis=0), np.sort(expected, axis=0))
    assert summary["cells_per_mm2"] == pytest.approx(summary["cell_count"] / summary["tissue_area_mm2"])
    assert json.loads((out / "summary.json").read_text())["unreadable"] == summary["unreadable"]
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "unreadable region" in page and f"rows {BAD_BOX[0]}:{BAD_BOX[2]} cols {BAD_BOX[1]}:{BAD_BOX[3]}" in page


@pytest.mark.slow
def test_a_damaged_tile_stops_the_count_by_default_and_keeps_the_bands(tmp_path, monkeypatch):
    # As on a big slide: the thumbnail comes from an intact lower level, so the count meets the bad tile mid-run.
    # (and the normalisation windows, read before any band, small: a few cells each)
    monkeypatch.setattr("cellseg.planning.plan.THUMBNAIL_SIDE", 100)
    monkeypatch.setattr("cellseg.planning.plan.CALIBRATION_WINDOW_PX", 16)
    path, labels = _slide(tmp_path, "zlib", levels=3)
    _damage(path, (4, 1))      # in the last band of tile rows (band_rows 1)
    from cellseg.planning import load_protocol
    protocol = load_protocol("fluorescence-nuclei").replace(tile_size=128, halo_px=24, tissue_method="none")
    from cellseg.run import count_serially
    out = tmp_path / "out"
    outcome = next(count_serially(LabelCounterSpec(protocol, tmp_path / "labels.tif").load(), [(path, out)],
                                  band_rows=1))
    assert "are corrupt" in str(outcome.error) and "--skip-unreadable" in str(outcome.error)
    assert not out.exists()
    partial = tmp_path / ".out.partial"
    # band 0 (rows 0:128, read to row 152) was read fine; band 1 (rows 128:256) reads its halo to row 280, into the
    # bad tile (rows 256:320), and stops there
    assert sorted(p.name for p in partial.glob("band-*.npz")) == ["band-00000.npz"]
    counter = LabelCounterSpec(protocol, tmp_path / "labels.tif").load()
    counter.skip_unreadable = True
    resumed = next(count_serially(counter, [(path, out)], resume=True, band_rows=1))
    assert resumed.error is None and resumed.kept_bands == 1
    assert [r["box"] for r in resumed.summary["unreadable"]] == [[256, 64, 320, 128]]


@pytest.mark.slow
def test_cli_default_error_then_skip_unreadable_warns_and_exits_0(tmp_path, tiny_bundle):
    path, _ = _slide(tmp_path, "zlib")
    _damage(path, BAD)
    fast = ["--model", tiny_bundle, "--device", "cpu", "-q", "--tile-size", "128", "--halo", "24", "--tissue", "none"]
    assert_user_error(invoke(["count", path, "-o", tmp_path / "a", *fast]), 1, "rows 128:", "are corrupt",
                      "--skip-unreadable")
    result = invoke(["count", path, "-o", tmp_path / "b", "--skip-unreadable", *fast])
    assert result.exit_code == 0, result.output
    assert "cellseg: warning:" in result.stderr and "1 unreadable region(s), 4,096 px" in result.stderr
    assert_user_error(invoke(["count", path, "--skip-unreadable", "--workers", "2", *fast]), 2, "--skip-unreadable")


def test_a_damaged_lower_level_is_read_from_level_0(tmp_path):
    from cellseg.slides import open_slide
    path, _ = _slide(tmp_path, "zlib", levels=3)
    _damage(path, (0, 0), level=2)      # the 96² level 2 is one storage tile
    with open_slide(path) as strict:
        with pytest.raises(Exception, match="corrupt"):
            strict.read_thumbnail(96)
    with open_slide(path, skip_unreadable=True) as slide:
        thumb, _ = slide.read_thumbnail(96)
        assert slide.unreadable == []       # level 0 is intact: nothing is lost
        image = np.where(tifffile.imread(tmp_path / "labels.tif") > 0, 200, 20).astype(np.float32)
        # the damaged storage tile (level 2 rows 0:64 cols 0:64): the 4 x 4 block mean of level 0 instead
        block_mean = image.reshape(96, 4, 96, 4).mean(axis=(1, 3))
        assert np.abs(thumb[:64, :64, 0] - block_mean[:64, :64]).max() <= 1
        assert np.array_equal(thumb[64:, :, 0], image[::4, ::4][64:])     # the intact tiles as written


@pytest.mark.slow
def test_a_damaged_ome_zarr_chunk_is_left_out(tmp_path):
    labels = random_cells(192, 192, 12, 150, seed=5)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    path = write_ome_zarr(tmp_path / "slide.ome.zarr", np.where(labels > 0, 200, 20).astype(np.uint8), "yx",
                          levels=1)      # 32 px chunks
    (tmp_path / "intact").mkdir()
    tifffile.imwrite(tmp_path / "intact" / "labels.tif", labels)
    intact = _intact_cells(tmp_path, path)
    chunk = path / "s0" / "c" / "2" / "3"      # rows 64:96, cols 96:128
    chunk.write_bytes(bytes((i * 37 + 11) % 256 for i in range(chunk.stat().st_size)))
    out, outcome = _count(tmp_path, path)
    assert "are corrupt" in str(outcome.error)
    out, outcome = _count(tmp_path, path, "--skip-unreadable")
    assert outcome.error is None, outcome.error
    box = [64, 96, 96, 128]
    assert [r["box"] for r in outcome.summary["unreadable"]] == [box]
    assert outcome.summary["tissue_area_px"] == 192 * 192 - 32 * 32
    assert outcome.summary["cell_count"] == len(_outside(intact, box)) < len(intact)


@pytest.mark.slow
def test_brightfield_with_grown_cells_counts_around_a_damaged_tile(tmp_path):
    """RGB JPEG tiles, he-nuclei (nuclei grown into cells: expansion reads context around each tile, measurement
    reads stain densities): the damaged tile is left out and every other cell is grown and measured."""
    labels = random_cells(SIDE, SIDE, 14, 400, seed=4)
    rgb = np.where(labels[..., None] > 0, np.array([90, 60, 160], np.uint8), np.array([235, 225, 235], np.uint8))
    path = tmp_path / "he.ome.tif"
    tifffile.imwrite(path, rgb, tile=(TILE, TILE), compression="jpeg", photometric="rgb", ome=True,
                     metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    (tmp_path / "intact").mkdir()
    tifffile.imwrite(tmp_path / "intact" / "labels.tif", labels)
    from cellseg.planning import load_protocol
    from cellseg.run import count_serially
    protocol = load_protocol("he-nuclei").replace(tile_size=128, halo_px=24, tissue_method="none")
    import shutil
    shutil.copy(path, tmp_path / "intact" / "he.ome.tif")
    _damage(path, BAD)
    results = {}
    for name, folder in (("intact", tmp_path / "intact"), ("damaged", tmp_path)):
        counter = LabelCounterSpec(protocol, folder / "labels.tif").load()
        counter.skip_unreadable = True
        outcome = next(count_serially(counter, [(folder / "he.ome.tif", folder / "out")]))
        assert outcome.error is None, outcome.error
        results[name] = outcome.summary, folder / "out"
    (intact, _), (damaged, out) = results["intact"], results["damaged"]
    assert intact["unreadable"] == [] and [r["box"] for r in damaged["unreadable"]] == [BAD_BOX]
    assert intact["cell_expansion_px"] > 0
    assert damaged["cell_count"] == len(_outside(_centroids(tmp_path / "intact" / "out"), BAD_BOX))
    import pandas as pd
    cells = pd.read_csv(out / "cells.csv")
    assert cells["cell_area_px"].gt(0).all() and cells["nucleus_hematoxylin_od_mean"].notna().all()
    assert (out / "cell_labels.ome.tif").is_file() and "unreadable region" in (out / "report.html").read_text()
