"""The README's two set-up commands stay true: CI runs the same test command; the example exists;
protocols ship inside the wheel, not only in a checkout."""

from __future__ import annotations

import re

import pytest

from ..helpers import ROOT


def readme_command(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```(?:bash|sh)?\n(.+?)\n```", text, re.S)
    assert match, f"README.md has no code block after <!-- {marker} -->"
    return match.group(1).strip()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci and 'bash -c "$TEST_COMMAND"' in ci
    assert "pytest" in readme_command("test-command")


def test_quickstart_counts_a_shipped_example_slide():
    command = readme_command("quickstart-command")
    slide = re.search(r"cellseg count (\S+)", command).group(1)
    assert (ROOT / slide).is_file()


@pytest.mark.slow
def test_wheel_ships_protocols_and_models(wheel):
    names = wheel.namelist()
    for protocol in (ROOT / "protocols").glob("*.toml"):
        assert f"cellseg/protocols/{protocol.name}" in names
    for template in (ROOT / "cellseg" / "templates").glob("*.j2"):     # report.html's (cellseg/results/report.py)
        assert f"cellseg/templates/{template.name}" in names
    for bundle_file in (ROOT / "cellseg" / "models").glob("*/*"):
        if bundle_file.suffix in (".toml", ".safetensors", ".md"):
            assert f"cellseg/models/{bundle_file.parent.name}/{bundle_file.name}" in names
