"""validate_bundle.py --threshold-by modality: a threshold key's score threshold (brightfield: stained tissue, TNBC,
NuInsSeg) chosen by the mean of its dataset modalities' F1, each alike, not by the F1 of all their nuclei pooled,
where the dataset with the most nuclei decides."""

from types import SimpleNamespace

import numpy as np
import pycocotools.mask as mask_utils

from cellseg.evaluation import evaluate
from cellseg.evaluation.image_masks import ImageMasks
from references.nuclei.validate_bundle import modality_mean_threshold


def report(f1_by_threshold: dict[float, float], predicted: int = 10, eligible_from: float = 0.0):
    return SimpleNamespace(pooled={"pred_count": predicted}, sweep=[
        {"threshold": t, "f1": f1, "eligible": t >= eligible_from} for t, f1 in f1_by_threshold.items()])


def test_each_modality_weighs_alike_ties_go_to_the_lower_and_unmeasured_thresholds_are_not_chosen():
    large = report({0.7: 0.70, 0.8: 0.72, 0.85: 0.71})     # its best is 0.8
    small = report({0.7: 0.60, 0.8: 0.62, 0.85: 0.66})     # its best is 0.85: the mean's best too (0.685 vs 0.670)
    assert modality_mean_threshold([large, small], 0.5) == 0.85
    assert modality_mean_threshold([report({0.7: 0.6, 0.8: 0.6}), report({0.7: 0.6, 0.8: 0.6})], 0.5) == 0.7
    assert modality_mean_threshold([large, report({0.7: 0.9, 0.8: 0.6, 0.85: 0.6}, eligible_from=0.8)], 0.5) == 0.8
    assert modality_mean_threshold([report({0.7: 0.0}, predicted=0)], 0.5) == 0.5      # nothing scored: fallback


def test_it_reads_the_sweep_evaluate_makes():
    """On real reports: a modality whose only nucleus is found at a score of 0.6 and one whose false cell scores
    0.5 choose a threshold between them."""
    mask = np.zeros((20, 20), np.uint8)
    mask[5:12, 5:12] = 1
    other = np.zeros_like(mask)
    other[14:18, 14:18] = 1

    def masks(name, arrays, scores=None):
        rles = [mask_utils.encode(np.asfortranarray(a)) for a in arrays]
        boxes = np.array([[*np.argwhere(a).min(0), *(np.argwhere(a).max(0) + 1)] for a in arrays], np.int64)
        return {name: ImageMasks(name, None, 20, 20, rles, boxes, np.array(scores or [1.0] * len(arrays), float),
                                 np.zeros(len(arrays), bool), scores is not None)}

    found = evaluate(masks("a", [mask], [0.6]), masks("a", [mask]))
    false = evaluate(masks("b", [mask, other], [0.9, 0.5]), masks("b", [mask]))
    assert 0.5 < modality_mean_threshold([found, false], 0.3) <= 0.6


def test_the_card_says_how_its_thresholds_were_chosen():
    """The model card's README names the criterion validate_bundle recorded in its metrics' settings."""
    import dataclasses
    from pathlib import Path

    from cellseg.bundles import load_bundle
    from references.nuclei.model_card import card_readme
    shipped = load_bundle(Path(__file__).resolve().parents[2] / "cellseg" / "models" / "nuclei")

    def readme(threshold_by: str | None) -> str:
        metrics = {**shipped.card.get("metrics", {}), "settings": {"threshold_by": threshold_by} if threshold_by else {}}
        return card_readme(dataclasses.replace(shipped, card={**shipped.card, "metrics": metrics}))
    assert "for the best pooled F1 on these" in readme("pooled") and "for the best pooled F1 on these" in readme(None)
    by_modality = readme("modality")
    assert "for the best mean of a threshold key's dataset modalities' pooled F1" in by_modality
    assert "for the best pooled F1 on these" not in by_modality
