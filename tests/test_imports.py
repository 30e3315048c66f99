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


def test_the_modules_import_one_another_without_cycles():
    """A module's imports at its top level (those for type checking included) never lead back to it: a lower layer
    (the plan) does not import a higher one (the summary writer) for a helper they share."""
    package = ROOT / "cellseg"
    imports: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = [n for n in tree.body] + [n for node in tree.body if isinstance(node, ast.If) for n in node.body]
        names = set()
        for node in top:
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        imports[path.stem] = names
    modules = set(imports)

    def reaches(start: str, goal: str, seen: set[str]) -> list[str] | None:
        for name in sorted(imports[start] & modules):
            if name == goal:
                return [name]
            if name not in seen:
                seen.add(name)
                if (rest := reaches(name, goal, seen)) is not None:
                    return [name, *rest]
        return None

    for module in sorted(modules):
        cycle = reaches(module, module, set())
        assert cycle is None, f"an import cycle: {' -> '.join([module, *cycle])}"
