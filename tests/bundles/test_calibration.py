"""Score calibration and the count interval (issue 48): maps fitted monotone, stored in model.toml and read back
without pickle, checked when read; the interval arithmetic on known inputs; fitting and cross-validation by group on
synthetic held-out images whose truth is known."""

from __future__ import annotations

import math
import pickle
import shutil

import numpy as np
import pytest
import tomllib
import torch

from cellseg.bundles import load_bundle, save_bundle, update_bundle_metadata
from cellseg.bundles.calibration import (
    NO_CALIBRATION,
    BundleCalibration,
    CountSpread,
    KeyCalibration,
    RecallTable,
    ScoreMap,
    estimate_count,
)
from cellseg.detection import build_model
from cellseg.errors import BundleError
from cellseg.evaluation.calibration import (
    ImageOutcomes,
    cross_validate,
    expected_calibration_error,
    fit_bundle_calibration,
    fit_recall_table,
    fit_score_map,
    fit_spread,
)

from ..helpers import tiny_model_config


def key_calibration(key="fluorescence", threshold=0.6) -> KeyCalibration:
    return KeyCalibration(key, ScoreMap((0.3, 0.6, 0.9), (0.2, 0.7, 0.95)),
                          RecallTable((0.3, 0.6, 0.9), (0.1,), ((0.95, 0.9), (0.9, 0.8), (0.6, 0.5))),
                          CountSpread(sigma2=0.01, tau2=0.5, z_low=-1.5, z_high=2.0), threshold,
                          {"images": 12, "groups": 4})


def test_score_map_fitted_is_monotone_and_calibrated_on_its_own_data():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.3, 1.0, 20000)
    truth = rng.random(20000) < scores ** 2          # P(true | s) = s²: rising, not the identity
    fitted = fit_score_map(scores, truth)
    assert np.all(np.diff(fitted.scores) > 0) and np.all(np.diff(fitted.p) >= 0)
    grid = np.linspace(0, 1.2, 500)
    assert np.all(np.diff(fitted(grid)) >= 0)       # between and beyond the knots too
    assert np.abs(fitted(np.array([0.5, 0.7, 0.9])) - np.array([0.25, 0.49, 0.81])).max() < 0.06
    assert expected_calibration_error(fitted(scores), truth) < 0.02
    assert expected_calibration_error(scores, truth) > 0.1    # the raw score is not a probability here


@pytest.mark.parametrize("scores, p", [((0.3, 0.3), (0.1, 0.2)), ((0.3, 0.5), (0.6, 0.2)), ((0.3,), (1.2,)),
                                       ((0.3, 0.5), (0.1,))])
def test_score_map_refuses_what_is_not_a_monotone_map(scores, p):
    with pytest.raises(BundleError, match="score map|knot"):
        ScoreMap(scores, p)


def test_interval_arithmetic_on_known_inputs():
    cal = key_calibration()
    # 200 detections kept at 0.6 whose p_nucleus sum to 180; nuclei cover 5 % of the tissue: density bin 0, whose
    # recall at 0.6 is 0.9
    est = estimate_count(cal, 200, 180.0, 0.05, 0.6)
    assert est.recall == pytest.approx(0.9)
    assert est.estimated_true_count == pytest.approx(200.0)         # 180 / 0.9
    assert est.estimated_missed == pytest.approx(20.0)              # 180 x (1 - 0.9) / 0.9
    s = math.sqrt(0.01 + 0.5 / 180)
    assert est.low == pytest.approx(200 * math.exp(-1.5 * s))
    assert est.high == pytest.approx(200 * math.exp(2.0 * s))
    assert est.low < est.estimated_true_count < est.high
    # denser tissue: bin 1 (recall 0.8); between table thresholds the recall is linear: 0.75 -> (0.8 + 0.5) / 2
    assert estimate_count(cal, 200, 180.0, 0.2, 0.6).estimated_true_count == pytest.approx(225.0)
    assert estimate_count(cal, 200, 180.0, 0.2, 0.75).recall == pytest.approx(0.65)
    # the relative interval narrows with more nuclei, down to the spread shared by all slides (sigma2)
    big = estimate_count(cal, 2_000_000, 1_800_000.0, 0.05, 0.6)
    assert big.high / big.estimated_true_count == pytest.approx(math.exp(2.0 * math.sqrt(0.01 + 0.5 / 1.8e6)))
    assert (big.high - big.low) / big.estimated_true_count < (est.high - est.low) / est.estimated_true_count
    # nothing found: 0, with an upper end
    none = estimate_count(cal, 0, 0.0, 0.0, 0.6)
    assert none.estimated_true_count == 0 and none.low == 0 and none.high > 0
    record = est.to_dict()
    assert record["estimated_true_count"] == 200 and "estimate from validation data" in record["note"]


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    torch.manual_seed(1)
    cfg = tiny_model_config()
    folder = tmp_path_factory.mktemp("calibrated") / "tiny"
    save_bundle(folder, cfg, build_model(cfg).state_dict(), name="tiny", score_threshold=0.5)
    return folder


def test_calibration_stored_in_model_toml_and_loaded_without_pickle(tiny_bundle, tmp_path, monkeypatch):
    folder = tmp_path / "b"
    shutil.copytree(tiny_bundle, folder)
    assert load_bundle(folder).calibration is None and load_bundle(folder).calibration_note == NO_CALIBRATION
    sha = load_bundle(folder).weights_sha256
    stored = BundleCalibration(sha, {"fluorescence": key_calibration(), "brightfield": key_calibration("brightfield")},
                               "isotonic, test", {"fluorescence": {"ece": 0.01}})
    update_bundle_metadata(folder, calibration=stored)
    text = (folder / "model.toml").read_text(encoding="utf-8")
    assert "[calibration.fluorescence.score_map]" in text and "p_nucleus = [" in text     # plain numbers in TOML

    def no_pickle(*args, **kwargs):
        raise AssertionError("a bundle's calibration must load without pickle")
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    loaded = load_bundle(folder)
    assert loaded.calibration == stored
    assert "calibration" not in loaded.card
    assert loaded.calibration.for_slide("fluorescence") == stored.keys["fluorescence"]
    # gray input: the modality's calibration unless gray slides of it are a kind of their own (fluorescence: every
    # slide is gray, at whatever threshold; brightfield: a smear is tuned apart from stained tissue)
    assert loaded.calibration.for_slide("fluorescence", gray=True) == stored.keys["fluorescence"]
    assert loaded.calibration.for_slide("brightfield", gray=True) == stored.keys["brightfield"]
    assert loaded.calibration.for_slide("brightfield", gray=True, gray_is_own_kind=True) is None
    assert loaded.calibration.for_slide("other") is None


def test_calibration_of_other_weights_is_not_used(tiny_bundle, tmp_path):
    folder = tmp_path / "b"
    shutil.copytree(tiny_bundle, folder)
    update_bundle_metadata(folder, calibration=BundleCalibration("0" * 64, {"fluorescence": key_calibration()}))
    bundle = load_bundle(folder)
    assert bundle.calibration is None and "refit" in bundle.calibration_note


def test_a_broken_calibration_is_a_bundle_error(tiny_bundle, tmp_path):
    import tomli_w
    folder = tmp_path / "b"
    shutil.copytree(tiny_bundle, folder)
    sha = load_bundle(folder).weights_sha256
    update_bundle_metadata(folder, calibration=BundleCalibration(sha, {"fluorescence": key_calibration()}))
    meta = tomllib.loads((folder / "model.toml").read_text(encoding="utf-8"))
    meta["calibration"]["fluorescence"]["score_map"]["p_nucleus"] = [0.9, 0.5, 0.95]    # not monotone
    (folder / "model.toml").write_text(tomli_w.dumps(meta), encoding="utf-8")
    with pytest.raises(BundleError, match="non-decreasing"):
        load_bundle(folder)
    del meta["calibration"]["fluorescence"]["spread"]
    meta["calibration"]["fluorescence"]["score_map"]["p_nucleus"] = [0.2, 0.5, 0.95]
    (folder / "model.toml").write_text(tomli_w.dumps(meta), encoding="utf-8")
    with pytest.raises(BundleError, match="spread"):
        load_bundle(folder)


# --------------------------------------------------------------------------- fitting on synthetic held-out images

def synthetic_images(seed=0, groups=5, per_group=6, recall=0.85) -> list[ImageOutcomes]:
    """Held-out images whose detections are true with P = score² and whose detector finds `recall` of the true
    nuclei (the rest missed): the estimate E / r should then cover the truth."""
    rng = np.random.default_rng(seed)
    out = []
    for g in range(groups):
        for k in range(per_group):
            true = int(rng.integers(40, 400))
            found = rng.binomial(true, recall)
            tp_scores = np.sqrt(rng.uniform(0.09, 1.0, found))          # true detections score high
            fp_scores = rng.uniform(0.3, 0.8, int(found * 0.3))           # false ones lower
            scores = np.r_[tp_scores, fp_scores]
            matched = np.r_[np.ones(found, bool), np.zeros(len(fp_scores), bool)]
            out.append(ImageOutcomes(f"g{g}/im{k}", "fluorescence" if g % 2 else "fluorescence_b", "fluorescence",
                                     f"g{g}", scores, matched, rng.uniform(80, 120, len(scores)), 512.0 * 512,
                                     true))
    return out


def test_recall_table_and_spread_from_images():
    images = synthetic_images()
    table = fit_recall_table(images, 0.5)
    assert len(table.density_edges) == 2 and len(table.recall) == 13
    column = np.asarray(table.recall)[:, 0]
    assert np.all(np.diff(column) <= 1e-12)            # recall falls as the threshold rises
    assert abs(table(0.3, 0.0) - 0.85) < 0.05           # all true detections score >= 0.3
    spread = fit_spread(np.array([0.1, -0.1, 0.05, -0.2, 0.0]), np.array([10.0, 100, 1000, 50, 20]))
    assert spread.z_low <= 0 <= spread.z_high and spread.sigma2 >= 0 and spread.tau2 >= 0


def test_cross_validation_by_group_covers_the_truth():
    images = synthetic_images()
    cv = cross_validate(images, "fluorescence", 0.5)
    figures = cv.figures()
    assert set(figures) == {"fluorescence", "fluorescence_b"}
    for f in figures.values():
        assert f["ece"] < 0.08
        assert f["coverage"] >= 0.8
        assert f["median_rel_error_estimate"] < f["median_rel_error_count"]     # better than the raw count
    calibration, report, _ = fit_bundle_calibration(images + [ImageOutcomes(
        "gray/im", "brightfield_gray", "brightfield_gray", "gray0", np.array([0.95]), np.array([True]),
        np.array([100.0]), 1e4, 1)], {"fluorescence": 0.5, "brightfield_gray": 0.9}, "ab" * 32, "test")
    assert set(calibration.keys) == {"fluorescence"}
    assert "left_out" in report["brightfield_gray"]
    assert report["fluorescence"]["groups"] == 5


def test_the_shipped_bundle_is_calibrated_for_its_own_weights():
    """Shipping new weights without rerunning references/nuclei/calibrate_bundle.py (which refits model.toml's
    [calibration] and appearance.json) fails here, instead of counts that silently lose p_nucleus and the interval."""
    from cellseg.bundles.appearance import BundleAppearance
    bundle = load_bundle("nuclei")
    assert bundle.calibration is not None, bundle.calibration_note
    assert bundle.calibration.weights_sha256 == bundle.weights_sha256
    assert {"fluorescence", "brightfield"} <= set(bundle.calibration.keys)
    appearance = BundleAppearance.read(bundle.path)
    assert appearance is not None and appearance.weights_sha256 == bundle.weights_sha256
    assert set(bundle.calibration.keys) <= set(appearance.keys)
