"""The benchmark scripts still run against the code they measure (they are not part of the test run otherwise, and
one once failed for a release because a function it timed had moved)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_pipeline_ceiling_runs_and_times_every_write_part(tmp_path):
    slide, out = tmp_path / "dense.ome.tif", tmp_path / "ceiling.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "make_big_slide.py"), "--size", "2048", "--out", str(slide)],
                   check=True, capture_output=True)
    subprocess.run([sys.executable, str(BENCHMARKS / "pipeline_ceiling.py"), "--slide", str(slide), "--json", str(out)],
                   check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result["cells"] > 100 and result["ceiling_mp_per_s"] > 0 and result["cpu_s"] > 0
    assert result["path"] == "gpu"      # the GPU path's host work: the U-Net's output replayed, tiles as native pixels
    cells = result["cells"]
    # each table's writer, the label canvases' (their pyramids and the overlay), the report; "process: ...": handing
    # the files to the process that writes them
    parts = set(result["write_parts_s"])
    assert {p for p in parts if not p.startswith("process: ")} == {"cells.csv", "cells.geojson",
                                                                   "predictions.coco.json", "labels", "report.html"}
    subprocess.run([sys.executable, str(BENCHMARKS / "pipeline_ceiling.py"), "--slide", str(slide), "--json", str(out),
                    "--writer-processes", "per-output"], check=True, capture_output=True)
    assert {p for p in json.loads(out.read_text())["write_parts_s"] if p.startswith("process: ")} == {
        "process: cells.geojson", "process: cells.csv, predictions.coco.json", "process: labels"}
    # --outputs: only what is asked for
    subprocess.run([sys.executable, str(BENCHMARKS / "pipeline_ceiling.py"), "--slide", str(slide), "--json", str(out),
                    "--outputs", "cells.csv", "--cpus", "1", "--path", "cpu"], check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert set(result["write_parts_s"]) == {"cells.csv", "report.html"} and result["cpu_cores"] == 1
    assert result["path"] == "cpu" and result["cells"] == cells       # the CPU path's host work: the same count
