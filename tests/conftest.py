"""Shared fixtures: a tiny random-init model bundle (built offline, seeded), small real images, a result folder of a
real example slide, and the wheel (built once per test run). Shared plain helpers live in helpers.py."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning threads starve
# each other and a 1 s test takes a minute. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

from .helpers import DATA, EXAMPLES, ROOT, oracle_result, tiny_model_config


@contextmanager
def _environment_kept():
    before = dict(os.environ)
    yield
    if os.environ != before:
        os.environ.clear()
        os.environ.update(before)


# A test's or a test module's changes to os.environ end with it: a local Dask cluster started there (distributed's
# Nanny) sets 1 OpenMP/MKL thread in this process's environment, and a later test's subprocess would inherit it.
# Module scope too: a module's cluster fixture is started before any test's own fixtures.
@pytest.fixture(autouse=True, scope="module")
def _module_environment_kept():
    with _environment_kept():
        yield


@pytest.fixture(autouse=True)
def _test_environment_kept():
    with _environment_kept():
        yield


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A random-init bundle with score threshold 0 so that it does emit (meaningless) cells."""
    import torch

    from cellseg.bundles import save_bundle
    from cellseg.detection import build_model
    torch.manual_seed(0)
    cfg = tiny_model_config()
    folder = tmp_path_factory.mktemp("bundle") / "tiny"
    # no training nucleus size: its counts run natively, as a random network's "nuclei" must not choose the scale
    # (planning.decide_scale measures them otherwise)
    save_bundle(folder, cfg, build_model(cfg).state_dict(), name="tiny", score_threshold=0.0,
                nucleus_diameter_px=0.0)
    return folder


@pytest.fixture
def fluo_png() -> Path:
    return DATA / "dsb_fluo.png"


@pytest.fixture
def he_png() -> Path:
    return DATA / "dsb_he.png"


@pytest.fixture(scope="session")
def he_result(tmp_path_factory) -> Path:
    """he_mosaic.ome.tif (864 x 1056 RGB, 3 levels, 0.25 µm/px) counted by the real pipeline with a detector that
    reads its ground truth back: 243 real nuclei."""
    folder = tmp_path_factory.mktemp("he") / "he_mosaic.cellseg"
    return oracle_result(EXAMPLES / "he_mosaic.ome.tif", EXAMPLES / "he_mosaic_labels.tif", folder, "he-nuclei")


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The distribution's wheel, built once for the tests that check what it ships."""
    if not (ROOT / "pyproject.toml").is_file():
        pytest.skip("needs the source tree")
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-w", str(folder), "-q"], check=True, capture_output=True)
    return zipfile.ZipFile(next(folder.glob("*.whl")))
