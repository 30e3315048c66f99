"""Shared fixtures: a tiny random-init model bundle (built offline, seeded) and small real images."""

from __future__ import annotations

import os
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning threads starve
# each other and a 1 s test takes a minute. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

DATA = Path(__file__).parent / "data"


def tiny_model_config():
    from cellseg.detect import ModelConfig
    return ModelConfig(fpn_channels=32, box_head_size=64, detections_per_tile=300,
                       rpn_pre_nms_top_n_test=400, rpn_post_nms_top_n_test=300,
                       rpn_pre_nms_top_n_train=400, rpn_post_nms_top_n_train=200, box_batch_size_per_image=64)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A random-init bundle with score threshold 0 so that it does emit (meaningless) cells."""
    import torch
    from cellseg.bundle import save_bundle
    from cellseg.detect import build_model
    torch.manual_seed(0)
    cfg = tiny_model_config()
    folder = tmp_path_factory.mktemp("bundle") / "tiny"
    save_bundle(folder, cfg, build_model(cfg).state_dict(), name="tiny", score_threshold=0.0,
                nucleus_diameter_px=12.0)
    return folder


@pytest.fixture
def fluo_png() -> Path:
    return DATA / "dsb_fluo.png"


@pytest.fixture
def he_png() -> Path:
    return DATA / "dsb_he.png"
