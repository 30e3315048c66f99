"""The architecture's import rules (docs/architecture.md, "Layers"): each package imports only from the packages
below it, modules never import one another in a cycle, the core runs without torch (only detection, training and
the tissue U-Net need it), and test modules share helpers through tests/helpers.py, never by importing one
another."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from .helpers import ROOT

PACKAGE = ROOT / "cellseg"
# Bottom first. A package may import from its own modules and from the packages before it; errors.py (and
# cellseg's __version__) from anywhere; the command line (cli.py, describe.py) sits on top of them all.
LAYERS = ["util", "geometry", "slides", "bundles", "tissue", "cells", "planning", "detection", "results", "run",
          "evaluation", "training"]
TORCH_PACKAGES = {"detection", "training"}
TORCH_MODULES = {"cellseg.tissue.unet"}     # the tissue U-Net, imported by the tissue finder only when it runs


def _module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path, *, top_level_only: bool = False) -> list[tuple[str, int]]:
    """(absolute module imported, line) for every `from ... import` of cellseg in `path`: at any depth (lazy imports
    and type-checking imports count), or only at the module's top level (an `if` block's included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = ([n for n in tree.body] + [n for node in tree.body if isinstance(node, ast.If) for n in node.body]
             if top_level_only else list(ast.walk(tree)))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                targets = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            else:
                targets = [node.module] if node.module else []
            out += [(t, node.lineno) for t in targets if t == "cellseg" or t.startswith("cellseg.")]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("cellseg.")]
    return out


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_is_in_a_layer_or_on_top():
    loose = {_module_name(p) for p in PACKAGE.glob("*.py")}
    assert loose == {"cellseg", "cellseg.__main__", "cellseg.cli", "cellseg.describe", "cellseg.errors"}, loose
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders == set(LAYERS) | {"models"}, folders


def test_no_package_imports_one_above_it():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = _layer(_module_name(path))
        if layer is None:
            continue
        for target, line in _imports(path):
            other = _layer(target)
            if other is None:
                if target not in ("cellseg", "cellseg.__version__", "cellseg.errors"):
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target} (the command line's)")
            elif LAYERS.index(other) > LAYERS.index(layer):
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({layer}) imports {target} ({other}, above it)")
    assert not wrong, "\n".join(wrong)


def test_errors_import_nothing_of_cellseg():
    assert _imports(PACKAGE / "errors.py") == []


def test_the_modules_import_one_another_without_cycles():
    """A module's imports at its top level (those for type checking included) never lead back to it: a lower layer
    (the plan) does not import a higher one (the summary writer) for a helper they share."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    imports = {name: {t for t, _ in _imports(path, top_level_only=True) if t in paths and t != name}
               for name, path in paths.items() if not path.name == "__init__.py"}

    def reaches(start: str, goal: str, seen: set[str]) -> list[str] | None:
        for name in sorted(imports.get(start, ())):
            if name == goal:
                return [name]
            if name not in seen:
                seen.add(name)
                if (rest := reaches(name, goal, seen)) is not None:
                    return [name, *rest]
        return None

    for module in sorted(imports):
        cycle = reaches(module, module, set())
        assert cycle is None, f"an import cycle: {' -> '.join([module, *cycle])}"


@pytest.mark.slow
def test_the_core_does_not_import_torch():
    """Every module of the torch-free layers, and the packages' re-exports, import without torch (a machine that
    only reads results, merges or writes never loads it)."""
    modules = sorted(name for p in PACKAGE.rglob("*.py")
                     if _layer(name := _module_name(p)) not in (None, *TORCH_PACKAGES) and name not in TORCH_MODULES)
    modules += ["cellseg.detection", "cellseg.training"]     # their names load lazily, torch with them
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n    importlib.import_module(m)\n"
            "print('TORCH', sorted(m for m in ('torch', 'torchvision') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "TORCH []" in done.stdout, done.stdout
    assert len(modules) > 40


def test_each_package_re_exports_public_names_only():
    import importlib
    for layer in LAYERS:
        package = importlib.import_module(f"cellseg.{layer}")
        names = getattr(package, "__all__", [])
        assert names, f"cellseg.{layer} declares no public names"
        assert not [n for n in names if n.startswith("_")], layer
        assert all(hasattr(package, n) for n in names), layer     # each name loads from its module


def test_cell_counter_is_importable_from_the_top():
    import cellseg
    from cellseg.run import CellCounter
    assert cellseg.CellCounter is CellCounter


def test_test_modules_do_not_import_each_other():
    tests = ROOT / "tests"
    modules = {p.stem for p in tests.rglob("test_*.py")} | {"conftest"}
    for path in tests.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                assert (node.module or "").split(".")[-1] not in modules, \
                    f"{path.name} imports from {node.module}: use tests/helpers.py"
            elif isinstance(node, ast.Import):
                assert not any(a.name.split(".")[-1] in modules for a in node.names), path.name
