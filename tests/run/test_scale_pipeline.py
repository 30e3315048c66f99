"""The scale a count chooses by itself, through the whole pipeline (issue 51): a downscaled slide keeps its count,
a wrong pixel size is caught and said so in summary.json, run.json and the report, and the tiles measured to decide
are not detected twice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellseg.bundles import MicronScale
from cellseg.geometry import TileDetections
from cellseg.planning import DEFAULT_SCALE, Protocol
from cellseg.run import CellCounter

from ..helpers import LabelReadingDetector

MODEL_PX = 15.0
HE = MicronScale(0.25, MODEL_PX, "test: nuclei of 3.75 µm at 0.25 µm/px")


class SizeSelectiveDetector(LabelReadingDetector):
    """The ground truth as a network trained on nuclei of MODEL_PX would find it: nuclei that reach it smaller than
    `min_px` (their diameter in slide px times the scale) are missed."""

    def __init__(self, labels: np.ndarray, min_px: float = 10.0):
        super().__init__(labels)
        self.min_px = min_px

    def detect(self, images, tiles, scale=1.0):
        found = []
        for det in super().detect(images, tiles, scale):
            keep = [k for k, m in enumerate(det.masks) if 2 * np.sqrt(m.sum() / np.pi) * scale >= self.min_px]
            found.append(TileDetections(det.boxes[keep].reshape(-1, 4), [det.masks[k] for k in keep],
                                        det.scores[keep], det.class_ids[keep]))
        return found


def discs(side: int, seed: int = 3) -> np.ndarray:
    """Non-overlapping discs of 12-18 px across on a jittered grid, labelled 1..n."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((side, side), np.int32)
    rr, cc = np.mgrid[:side, :side]
    label = 0
    for r in range(14, side - 14, 28):
        for c in range(14, side - 14, 28):
            radius = rng.uniform(6, 9)
            label += 1
            labels[(rr - r - rng.integers(-3, 4)) ** 2 + (cc - c - rng.integers(-3, 4)) ** 2 <= radius ** 2] = label
    return labels


def write_slide(path: Path, labels: np.ndarray, mpp: float) -> Path:
    tifffile.imwrite(path, ((labels > 0) * 180 + 30).astype(np.uint8),
                     metadata={"axes": "YX", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp})
    return path


def halved(labels: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(labels[::2, ::2])      # nearest neighbour: a 20x scan of the 40x field


PROTOCOL = Protocol(name="t", modality="brightfield", tile_size=128, halo_px=32, min_area_px=1, tissue_method="none")


def count(detector, slide: Path, out: Path, diameter_px=DEFAULT_SCALE) -> dict:
    return CellCounter(PROTOCOL, detector, model_diameter_px=MODEL_PX, micron_scale=HE,
                       diameter_px=diameter_px).count(slide, out)


def test_the_default_scale_keeps_the_count_of_a_downscaled_slide(tmp_path):
    """At 40x (0.25 µm/px) every nucleus reaches the network at its size; the same field at 20x (0.5 µm/px) loses
    them all as it is, and keeps them all once the pixel size resamples it (no option given)."""
    full = discs(512)
    n = len(np.unique(full)) - 1
    at_40x = count(SizeSelectiveDetector(full), write_slide(tmp_path / "x40.ome.tif", full, 0.25), tmp_path / "a")
    assert at_40x["cell_count"] == n and at_40x["scale"]["factor"] == 1.0
    half = halved(full)
    x20 = write_slide(tmp_path / "x20.ome.tif", half, 0.5)
    as_is = count(SizeSelectiveDetector(half), x20, tmp_path / "b", diameter_px="native")
    assert as_is["cell_count"] < n / 4 and as_is["scale"]["method"] == "native"
    default = count(SizeSelectiveDetector(half), x20, tmp_path / "c")
    assert default["cell_count"] == n and default["scale"]["factor"] == pytest.approx(2.0)
    assert default["scale"]["method"] == "pixel size" and default["scale"]["warning"] is None
    run = json.loads((tmp_path / "c" / "run.json").read_text())
    assert run["scale"]["method"] == "pixel size" and "0.5 µm/px" in run["scale"]["source"]


def test_a_pixel_size_off_by_two_is_caught_and_said_so(tmp_path):
    """The 20x field whose metadata says 0.25 µm/px: its nuclei measure half the size the pixel size implies, so
    the measured size sets the scale, and summary.json, run.json and the report say so."""
    half = halved(discs(512))
    slide = write_slide(tmp_path / "wrong.ome.tif", half, 0.25)
    summary = count(LabelReadingDetector(half), slide, tmp_path / "out")
    scale = summary["scale"]
    assert scale["method"] == "measured" and scale["factor"] == pytest.approx(2.0, rel=0.15)
    assert scale["pixel_size_diameter_px"] == pytest.approx(MODEL_PX) and scale["measured_diameter_px"] < 10
    assert "0.25 µm/px" in scale["warning"] and "the measured size set the scale" in scale["warning"]
    assert scale["warning"] in summary["warnings"]          # the report's warnings (results.report)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["scale"]["warning"] == scale["warning"] and run["scale"]["factor"] == scale["factor"]
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "network px per slide px" in page and "the measured size set the scale" in page
    right = count(LabelReadingDetector(half), write_slide(tmp_path / "right.ome.tif", half, 0.5), tmp_path / "ok")
    assert right["scale"]["warning"] is None and "checked" in right["scale"]["source"]


def test_the_tiles_measured_to_decide_are_not_detected_again(tmp_path):
    """At native scale the count takes the measured tiles' detections (planning.Calibration): every tile reaches the
    detector once, and the cells are those of a count that measures nothing."""
    full = discs(512)
    slide = write_slide(tmp_path / "x40.ome.tif", full, 0.25)
    measuring = LabelReadingDetector(full)
    summary = count(measuring, slide, tmp_path / "a")
    assert summary["scale"]["method"] == "pixel size" and summary["scale"]["measured_nuclei"] > 10
    assert sorted(measuring.seen) == list(range(summary["tiles_total"]))
    plain = count(LabelReadingDetector(full), slide, tmp_path / "b", diameter_px=None)
    assert plain["scale"]["method"] == "native"
    assert (tmp_path / "a" / "cells.csv").read_bytes() == (tmp_path / "b" / "cells.csv").read_bytes()


@pytest.mark.parametrize("how", ["pixel size", "measured"])
def test_network_nucleus_px_brings_the_nuclei_to_that_size_instead_of_the_models(tmp_path, how):
    """A protocol's network_nucleus_px (--network-nucleus-px) is the size every scale decision brings nuclei to, in
    place of the model's training size: at 0.25 µm/px (nuclei of MODEL_PX) and 30 px asked, the slide is resampled
    by 2 whether the pixel size or the measured nuclei decide, and the same cells are found."""
    full = discs(512)
    slide = write_slide(tmp_path / "x40.ome.tif", full, 0.25)
    protocol = PROTOCOL.replace(network_nucleus_px=2 * MODEL_PX)
    detector = LabelReadingDetector(full)
    summary = CellCounter(protocol, detector, model_diameter_px=MODEL_PX, micron_scale=HE,
                          diameter_px="auto" if how == "measured" else DEFAULT_SCALE).count(slide, tmp_path / "out")
    assert summary["scale"]["method"] == how and summary["scale"]["factor"] == pytest.approx(2.0, rel=0.1)
    assert summary["scale"]["model_diameter_px"] == pytest.approx(2 * MODEL_PX)
    assert summary["cell_count"] == len(np.unique(full)) - 1
    plain = count(LabelReadingDetector(full), slide, tmp_path / "plain")
    assert plain["scale"]["factor"] == 1.0


def test_the_count_says_a_wrong_pixel_size_on_the_terminal(tmp_path, monkeypatch):
    """Every µm figure of a slide whose pixel size the nuclei contradict is wrong: `cellseg count` says so on stderr,
    as it says a slide unlike the validation data, not only in summary.json and the report."""
    from cellseg.run import CounterSpec

    from ..helpers import invoke
    half = halved(discs(512))
    slide = write_slide(tmp_path / "wrong.ome.tif", half, 0.25)
    counter = CellCounter(PROTOCOL, LabelReadingDetector(half), model_diameter_px=MODEL_PX, micron_scale=HE,
                          diameter_px=DEFAULT_SCALE)
    monkeypatch.setattr(CounterSpec, "load", lambda self: counter)
    result = invoke(["count", slide, "-o", tmp_path / "out", "-q"])
    assert result.exit_code == 0, result.output
    assert "cellseg: warning: " in result.stderr and "0.25 µm/px (ome) implies nuclei of" in result.stderr
    assert "the measured size set the scale" in result.stderr
