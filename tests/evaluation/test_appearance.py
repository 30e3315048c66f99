"""The appearance reference (issue 48 item 4): robust distances to the nearest validation images, its threshold from
group-out scores, and the check that a modality held out whole scores higher (ROC AUC)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cellseg.bundles.appearance import AppearanceReference, BundleAppearance
from cellseg.errors import BundleError
from cellseg.evaluation.appearance import fit_appearance, roc_auc


def test_roc_auc_on_known_inputs():
    assert roc_auc([3, 4], [1, 2]) == 1.0 and roc_auc([1, 2], [3, 4]) == 0.0
    assert roc_auc([1, 2], [1, 2]) == 0.5 and roc_auc([], [1]) is None


def test_a_modality_held_out_whole_scores_higher_and_the_reference_reads_back(tmp_path):
    rng = np.random.default_rng(0)
    names = ("a", "b", "c")
    x = np.concatenate([rng.normal(0, 1, (40, 3)), rng.normal(0, 1, (40, 3)) + [0.3, 0, 0],
                        rng.normal(0, 1, (30, 3)) + [8, 8, 0]])                # the third modality: far away
    groups = [f"m0g{k % 4}" for k in range(40)] + [f"m1g{k % 4}" for k in range(40)] + \
             [f"m2g{k % 3}" for k in range(30)]
    modalities = ["m0"] * 40 + ["m1"] * 40 + ["m2"] * 30
    reference, report = fit_appearance(x, groups, modalities, names)
    far = report["held_out_whole"]["m2"]
    assert far["roc_auc"] > 0.95 and far["warned"] > 0.9 and far["others_warned"] <= 0.1
    assert report["held_out_whole"]["m0"]["roc_auc"] < 0.8        # m0 is like m1: not unlike anything validated
    assert 0.0 < report["in_distribution_warned"] <= 0.1
    assert reference.score({"a": 0.0, "b": 0.0, "c": 0.0}) < reference.threshold
    assert reference.score({"a": 30.0, "b": -30.0, "c": 0.0}) > reference.threshold
    BundleAppearance("ab" * 32, {"fluorescence": reference}, report).write(tmp_path)
    back = BundleAppearance.read(tmp_path)
    assert back.weights_sha256 == "ab" * 32 and back.report == json.loads(json.dumps(report))
    assert back.keys["fluorescence"].score({"a": 1.0, "b": 2.0, "c": 0.5}) == pytest.approx(
        reference.score({"a": 1.0, "b": 2.0, "c": 0.5}), abs=1e-3)
    assert BundleAppearance.read(tmp_path / "none") is None
    (tmp_path / "appearance.json").write_text('{"format": "other"}')
    with pytest.raises(BundleError, match="cellseg-appearance"):
        BundleAppearance.read(tmp_path)


def test_a_broken_reference_is_a_bundle_error():
    with pytest.raises(BundleError, match="consistent"):
        AppearanceReference.from_dict({"features": ["a"], "reference": [[1.0]], "center": [0.0], "spread": [0.0],
                                       "k": 1, "threshold": 1.0}, "test")


def test_the_warning_tells_the_score_from_the_threshold():
    """A score of 3.672 over a threshold of 3.658 was said as "3.7, above the 3.7": as many decimals as tell them
    apart."""
    from cellseg.results.appearance import appearance_warning
    close = appearance_warning({"score": 3.672, "threshold": 3.658, "unlike": True, "nuclei": 447})
    assert "appearance score 3.67, above the 3.66 that" in close
    far = appearance_warning({"score": 4.412, "threshold": 3.658, "unlike": True, "nuclei": 447})
    assert "appearance score 4.4, above the 3.7 that" in far
    assert appearance_warning({"score": 3.0, "threshold": 3.658, "unlike": False, "nuclei": 447}) is None
