"""Tiles measured in processes of their own (run/measuring.py): the same result files as measured in the count's
thread, errors handed back, a slide replaced at the same path read anew."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellseg.cells import label_and_measure
from cellseg.geometry import Box, Instances
from cellseg.planning import Protocol
from cellseg.run import measuring

from ..helpers import LabelReadingDetector, count_with, random_cells


def test_the_cores_decide_how_many_processes_measure(monkeypatch):
    monkeypatch.setattr(measuring, "measure_processes", None)
    assert [measuring.measure_processes_for(n) for n in (1, 2, 3, 4, 8, 16, 64)] == [0, 0, 0, 1, 2, 4, 4]
    monkeypatch.setattr(measuring, "measure_processes", 2)
    assert measuring.measure_processes_for(1) == 2


def rgb_slide(path, labels: np.ndarray, seed: int) -> None:
    """An RGB slide whose cells are brighter, with noise: every intensity column has something to measure."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (*labels.shape, 3), dtype=np.uint8)
    pixels[labels > 0] += rng.integers(100, 190, (int((labels > 0).sum()), 3), dtype=np.uint8)
    tifffile.imwrite(path, pixels, photometric="rgb")


@pytest.mark.slow
def test_measured_in_processes_the_result_files_are_the_same(tmp_path, monkeypatch):
    labels = random_cells(230, 190, max_diameter=16, n=300, seed=5)
    slide = tmp_path / "slide.tif"
    rgb_slide(slide, labels, seed=5)
    protocol = Protocol(name="test", tile_size=64, halo_px=20, batch_size=3, min_area_px=1, tissue_method="none")
    from cellseg.results import ResultWriter
    outs = {}
    # measured in the thread; in 2 processes; in 2 processes with the result files written in this process (the
    # label canvas then takes each tile's label image, painted here)
    for key, processes, writers_apart in (("thread", 0, None), ("processes", 2, None), ("writers here", 2, False)):
        monkeypatch.setattr(measuring, "measure_processes", processes)
        monkeypatch.setattr(ResultWriter, "tables_in_a_process", writers_apart)
        outs[key] = tmp_path / key.replace(" ", "_")
        summary = count_with(LabelReadingDetector(labels), slide, outs[key], protocol)
        assert summary["cell_count"] == len(np.unique(labels[labels > 0])) > 100
    for key in ("processes", "writers here"):
        for name in ("cells.csv", "cells.geojson", "predictions.coco.json"):
            assert (outs[key] / name).read_bytes() == (outs["thread"] / name).read_bytes(), (key, name)
        assert np.array_equal(tifffile.imread(outs[key] / "labels.ome.tif"),
                              tifffile.imread(outs["thread"] / "labels.ome.tif")), key


def one_nucleus(row0: int, col0: int) -> Instances:
    mask = np.ones((4, 5), bool)
    return Instances(np.array([[row0, col0, row0 + 4, col0 + 5]], np.int64), [mask], np.ones(1, np.float32),
                     np.ones(1, np.int64), np.zeros(1, np.int64), np.zeros(1, bool))


@pytest.mark.slow
def test_a_process_reads_a_slide_replaced_at_the_same_path_anew_and_hands_errors_back(tmp_path):
    slide = tmp_path / "slide.tif"
    box = Box(0, 0, 20, 20)
    means = []
    for value in (50, 200):
        tifffile.imwrite(slide, np.full((20, 20), value, np.uint8))
        os.utime(slide, ns=(value * 10**9, value * 10**9))     # a new time, whatever the clock's resolution
        with measuring.TileMeasurer(1, slide, False, None, ["gray"], ["nucleus"]) as measurer:
            measured = measurer.measure("tile", one_nucleus(3, 4), np.array([7]), box) + measurer.flush()
        assert [key for key, _ in measured] == ["tile"]
        rows = measured[0][1]
        expected = label_and_measure(one_nucleus(3, 4), np.array([7]), box, np.full((20, 20, 1), value, np.uint8),
                                     None, ["gray"], ["nucleus"])
        assert rows.keys() == expected.keys()
        for column in rows:
            assert np.array_equal(rows[column], expected[column], equal_nan=rows[column].dtype.kind == "f"), column
        means.append(float(rows["mean_intensity_gray"][0]))
    assert means == [50.0, 200.0]
    # a nucleus outside the tile: the process's error comes back to the count
    with pytest.raises(ValueError, match="expected nuclei inside"), \
            measuring.TileMeasurer(1, slide, False, None, ["gray"], ["nucleus"]) as measurer:
        measurer.measure("tile", one_nucleus(18, 18), np.array([1]), box)
        measurer.flush()


SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import numpy as np, tifffile
from cellseg.planning import Protocol
from cellseg.run import CellCounter, measuring
from tests.helpers import LabelReadingDetector, random_cells

print("top level ran", flush=True)
measuring.measure_processes = 1
labels = random_cells(120, 100, max_diameter=12, n=80, seed=2)
tifffile.imwrite({slide!r}, ((labels > 0) * 200 + 20).astype(np.uint8))
protocol = Protocol(name="test", tile_size=48, halo_px=14, batch_size=2, min_area_px=1, tissue_method="none")
summary = CellCounter(protocol, LabelReadingDetector(labels)).count({slide!r}, {out!r})
print("cells", summary["cell_count"], len(np.unique(labels[labels > 0])), flush=True)
"""


@pytest.mark.slow
def test_a_script_without_a_main_guard_counts_once(tmp_path):
    """A user's script that counts at its top level: the measuring processes must not run it again (as
    multiprocessing's spawn would: it imports the parent's main script first)."""
    script = tmp_path / "count.py"
    root = str(Path(__file__).resolve().parents[2])
    script.write_text(SCRIPT.format(root=root, slide=str(tmp_path / "slide.tif"), out=str(tmp_path / "out")))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("top level ran") == 1
    found, true = done.stdout.split("cells")[1].split()
    assert int(found) == int(true) > 20


@pytest.mark.slow
def test_a_measuring_process_that_dies_is_an_error_not_a_hang_and_is_replaced(tmp_path):
    slide = tmp_path / "slide.tif"
    tifffile.imwrite(slide, np.full((20, 20), 90, np.uint8))
    box = Box(0, 0, 20, 20)
    with pytest.raises(measuring.MeasuringProcessError, match="ended"), \
            measuring.TileMeasurer(1, slide, False, None, ["gray"], ["nucleus"]) as measurer:
        killed = measurer._children[0]
        killed.process.kill()      # as the kernel's out-of-memory killer would
        killed.process.wait()
        measurer.measure("tile", one_nucleus(3, 4), np.array([1]), box)
        measurer.flush()
    with measuring.TileMeasurer(1, slide, False, None, ["gray"], ["nucleus"]) as measurer:
        assert measurer._children[0] is not killed
        measured = measurer.measure("tile", one_nucleus(3, 4), np.array([1]), box) + measurer.flush()
    assert measured[0][1]["mean_intensity_gray"][0] == 90.0
