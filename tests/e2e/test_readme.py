"""The README's two set-up commands stay true: CI runs the same test command; the quickstart counts the cells the
README says it does; protocols, models and every module ship inside the wheel, not only in a checkout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ..helpers import ROOT, invoke


def readme_command(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```(?:bash|sh)?\n(.+?)\n```", text, re.S)
    assert match, f"README.md has no code block after <!-- {marker} -->"
    return match.group(1).strip()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci and 'bash -c "$TEST_COMMAND"' in ci
    assert "pytest" in readme_command("test-command")


@pytest.mark.slow
def test_quickstart_counts_the_cells_the_readme_shows(tmp_path):
    """The quickstart's `cellseg count` on the shipped example, with the shipped model and defaults: the count the
    README's worked example prints, and a cells.csv with a row per cell."""
    import shutil

    import pandas as pd
    command = readme_command("quickstart-command")
    slide = re.search(r"cellseg count (\S+)", command).group(1)
    assert (ROOT / slide).is_file()
    shown = re.search(rf"\$ cellseg count {re.escape(slide)}\n{re.escape(slide)}: (\d+) cells ->",
                      (ROOT / "README.md").read_text())
    assert shown, "README.md's worked example shows no count of the quickstart slide"
    in_bf16 = re.search(r"the network runs in bf16 by default\s+and finds (\d+) cells", (ROOT / "README.md").read_text())
    assert in_bf16, "README.md's worked example does not say what a CPU with bf16 counts"
    copy = tmp_path / Path(slide).name
    shutil.copy(ROOT / slide, copy)
    result = invoke(["count", copy])
    assert result.exit_code == 0, result.output
    folder = copy.parent / "fluo_mosaic.cellseg"
    precision = json.loads((folder / "run.json").read_text())["precision"]
    expected = (in_bf16 if precision.startswith("bf16") else shown).group(1)   # the default: bf16 where native
    assert f"{copy}: {expected} cells ->" in result.output, precision
    cells = pd.read_csv(folder / "cells.csv")
    assert len(cells) == int(expected) and cells["cell_id"].is_unique


@pytest.mark.slow
def test_wheel_ships_protocols_and_models(wheel):
    names = wheel.namelist()
    for protocol in (ROOT / "protocols").glob("*.toml"):
        assert f"cellseg/protocols/{protocol.name}" in names
    for template in (ROOT / "cellseg" / "templates").glob("*.j2"):     # report.html's (cellseg/results/report.py)
        assert f"cellseg/templates/{template.name}" in names
    for module in (ROOT / "cellseg").rglob("*.py"):      # every subpackage listed in pyproject's packages
        assert module.relative_to(ROOT).as_posix() in names, module
    for bundle_file in (ROOT / "cellseg" / "models").glob("*/*"):
        if bundle_file.suffix in (".toml", ".safetensors", ".md"):
            assert f"cellseg/models/{bundle_file.parent.name}/{bundle_file.name}" in names
