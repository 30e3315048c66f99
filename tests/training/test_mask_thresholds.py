"""Mask thresholds per protocol modality (references/nuclei/mask_thresholds.py): chosen from validate_bundle runs at
several thresholds, by the COCO mask AP over every image a protocol of that modality counts."""

import json
import shutil
import sys

import pytest

from cellseg.bundles import load_bundle
from references.nuclei import mask_thresholds as mt


def run_folder(tmp_path, threshold, fluorescence, brightfield, weights, tta=False, name=None):
    """A validate_bundle run at one mask threshold whose criterion figure per protocol modality is given (None: no
    images of it)."""
    folder = tmp_path / (name or f"val_{threshold}")
    folder.mkdir()
    (folder / mt.PREDICTIONS_MADE_WITH).write_text(json.dumps(
        {"weights_sha256": weights, "mask_threshold": threshold, "tta": tta}))
    rows = {"protocol_fluorescence": fluorescence, "protocol_brightfield": brightfield}
    (folder / "metrics.json").write_text(json.dumps({name: {
        "images": 10, "ap50_tp_fp_fn_pooled": 0.7, "dsb_score_mean_over_images": 0.4, "coco_mask_ap": 0.45,
        "median_rel_count_error": 0.1, mt.CRITERION: value} for name, value in rows.items() if value is not None}))
    return folder


def test_each_modality_gets_its_best_threshold_and_a_tie_keeps_the_default():
    runs = {0.5: {"protocol_fluorescence": {mt.CRITERION: 0.57}, "protocol_brightfield": {mt.CRITERION: 0.30}},
            0.6: {"protocol_fluorescence": {mt.CRITERION: 0.58}, "protocol_brightfield": {mt.CRITERION: 0.30}},
            0.4: {"protocol_fluorescence": {mt.CRITERION: 0.55}, "protocol_brightfield": {mt.CRITERION: 0.29}}}
    chosen, table = mt.choose(runs, default=0.5)
    assert chosen == {"fluorescence": 0.6, "brightfield": 0.5}
    assert table["fluorescence"]["mask_threshold"] == [0.4, 0.5, 0.6]
    assert table["fluorescence"][mt.CRITERION] == [0.55, 0.57, 0.58]


def test_write_stores_the_choice_and_its_table_in_the_bundle(tiny_bundle, tmp_path, monkeypatch):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    sha = load_bundle(bundle).weights_sha256
    folders = [run_folder(tmp_path, t, f, b, sha) for t, f, b in ((0.5, 0.50, 0.31), (0.65, 0.53, 0.28))]
    monkeypatch.setattr(sys, "argv", ["mask_thresholds", "--bundle", str(bundle), *map(str, folders), "--write"])
    mt.main()
    written = load_bundle(bundle)
    assert written.mask_thresholds == {"fluorescence": 0.65, "brightfield": 0.5}
    assert written.card["mask_threshold_choice"]["brightfield"][mt.CRITERION] == [0.31, 0.28]


def test_runs_of_one_threshold_on_different_modalities_are_combined(tiny_bundle, tmp_path, monkeypatch, capsys):
    """validate_bundle --modality runs: fluorescence alone at 0.6, brightfield alone at 0.6, both at 0.5."""
    sha = load_bundle(tiny_bundle).weights_sha256
    folders = [run_folder(tmp_path, 0.5, 0.50, 0.31, sha), run_folder(tmp_path, 0.6, 0.52, None, sha, name="f"),
               run_folder(tmp_path, 0.6, None, 0.33, sha, name="b")]
    monkeypatch.setattr(sys, "argv", ["mask_thresholds", "--bundle", str(tiny_bundle), *map(str, folders)])
    mt.main()    # no --write: the shared bundle is left alone
    printed = capsys.readouterr().out
    assert "fluorescence: chosen 0.6" in printed and "brightfield: chosen 0.6" in printed


@pytest.mark.parametrize("problem, message", [
    ("weights", "predictions of weights"), ("tta", "without --tta"), ("mixed", "one mask threshold for every"),
    ("twice", "one run per mask threshold and modality")])
def test_runs_it_cannot_compare_are_refused_and_the_bundle_is_left_as_it_was(tiny_bundle, tmp_path, monkeypatch,
                                                                            problem, message):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    before = (bundle / "model.toml").read_bytes()
    sha = load_bundle(bundle).weights_sha256
    folders = [run_folder(tmp_path, 0.5, 0.5, 0.3, "0" * 64 if problem == "weights" else sha, tta=problem == "tta")]
    if problem == "mixed":
        made_with = folders[0] / mt.PREDICTIONS_MADE_WITH
        made_with.write_text(json.dumps({**json.loads(made_with.read_text()),
                                         "mask_threshold": {"fluorescence": 0.6, "brightfield": 0.5}}))
    if problem == "twice":
        folders.append(shutil.copytree(folders[0], tmp_path / "again"))
    monkeypatch.setattr(sys, "argv", ["mask_thresholds", "--bundle", str(bundle), *map(str, folders), "--write"])
    with pytest.raises(SystemExit, match=message):
        mt.main()
    assert (bundle / "model.toml").read_bytes() == before


def test_the_card_says_which_mask_thresholds_its_figures_were_measured_at():
    """The model card gives a count's mask thresholds per modality and how they were chosen, and says when the
    test-time-augmentation figures were measured at others than the bundle's now."""
    import dataclasses

    from references.nuclei.model_card import card_readme
    shipped = load_bundle("nuclei")
    plain = dataclasses.replace(shipped, mask_thresholds={}, card={k: v for k, v in shipped.card.items()
                                                                   if k != "mask_threshold_choice"})
    assert f"masks at probability >= {plain.mask_threshold:.2f}. AP50" in card_readme(plain)
    choice = {"criterion": mt.CRITERION, "fluorescence": {"mask_threshold": [0.5, 0.6]},
              "brightfield": {"mask_threshold": [0.45, 0.5]}}
    tta = {"settings": {"mask_threshold": 0.5}, "all": shipped.card["metrics"]["all"]}
    per_modality = dataclasses.replace(shipped, mask_threshold=0.5, mask_thresholds={"fluorescence": 0.6},
                                       card={**shipped.card, "mask_threshold_choice": choice, "metrics_tta": tta})
    readme = card_readme(per_modality)
    assert ("masks at probability >= 0.50 for brightfield, 0.60 for fluorescence (chosen per protocol modality for the best coco_mask_ap on "
            "these same images, among 0.45, 0.5, 0.6)") in readme
    assert "not the bundle's now (0.50 for brightfield, 0.60 for fluorescence)" in readme
    current = {"settings": {"mask_threshold": {"brightfield": 0.5, "fluorescence": 0.6}},
               "all": shipped.card["metrics"]["all"]}
    readme = card_readme(dataclasses.replace(per_modality, card={**per_modality.card, "metrics_tta": current}))
    assert "Masks at probability >= 0.50 for brightfield, 0.60 for fluorescence." in readme
    assert "not the bundle's now" not in readme
