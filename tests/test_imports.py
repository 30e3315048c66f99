"""The architecture's import rules: the pipeline's core runs without torch (only the detector and the tissue U-Net
need it), and test modules share helpers through tests/helpers.py, never by importing one another."""

from __future__ import annotations

import ast
import subprocess
import sys

from .helpers import ROOT


def test_the_core_does_not_import_torch():
    code = ("import sys\n"
            "import cellseg.pipeline, cellseg.merge, cellseg.measure, cellseg.export, cellseg.counter\n"
            "import cellseg.slide_plan, cellseg.instances, cellseg.tiling, cellseg.journal, cellseg.cohort\n"
            "import cellseg.distributed\n"
            "print('TORCH', sorted(m for m in ('torch', 'torchvision') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "TORCH []" in done.stdout, done.stdout


def test_test_modules_do_not_import_each_other():
    tests = ROOT / "tests"
    modules = {p.stem for p in tests.glob("test_*.py")} | {"conftest"}
    for path in tests.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                assert node.module not in modules, f"{path.name} imports from {node.module}: use tests/helpers.py"
            elif isinstance(node, ast.Import):
                assert not any(a.name.split(".")[-1] in modules for a in node.names), path.name
