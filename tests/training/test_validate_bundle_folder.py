"""references/nuclei/validate_bundle.py reuses the predictions in its --out folder: only those of the same weights and
settings (a stale folder once meant a new snapshot would be scored on an older one's predictions)."""

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from references.nuclei.validate_bundle import PREDICTIONS_MADE_WITH, claim_predictions_folder

MADE_WITH = {"weights_sha256": "aa", "model": {"anchor_sizes": (8, 16)}, "floor": 0.3, "tta": False}


def test_a_new_folder_records_what_made_its_predictions_and_a_rerun_is_let_through(tmp_path):
    out = tmp_path / "val"
    claim_predictions_folder(out, MADE_WITH)
    assert json.loads((out / PREDICTIONS_MADE_WITH).read_text())["weights_sha256"] == "aa"
    (out / "00000_img").mkdir()
    (out / "00000_img" / "predictions.coco.json").write_text("{}")
    claim_predictions_folder(out, dict(MADE_WITH))        # the same bundle and settings (tuples read back as lists)


@pytest.mark.parametrize("change", [{"weights_sha256": "bb"}, {"tta": True}, {"model": {"anchor_sizes": (8, 32)}}])
def test_another_bundle_or_setting_is_refused_and_the_folder_is_left_as_it_was(tmp_path, change):
    out = tmp_path / "val"
    claim_predictions_folder(out, MADE_WITH)
    before = (out / PREDICTIONS_MADE_WITH).read_text()
    with pytest.raises(SystemExit, match=f"found ones with another {next(iter(change))}: give this run its own --out"):
        claim_predictions_folder(out, {**MADE_WITH, **change})
    assert (out / PREDICTIONS_MADE_WITH).read_text() == before


def test_predictions_of_unknown_origin_are_refused(tmp_path):
    out = tmp_path / "val"
    (out / "00000_img").mkdir(parents=True)
    (out / "00000_img" / "predictions.coco.json").write_text("{}")
    with pytest.raises(SystemExit, match="no predictions of unknown origin"):
        claim_predictions_folder(out, MADE_WITH)
    assert not (out / PREDICTIONS_MADE_WITH).exists()


def test_a_folder_from_before_the_scale_was_recorded_is_taken_as_made_at_the_bundles_scale(tmp_path):
    """Records written before nucleus_diameter_px and count_at were kept hold predictions made at the bundle's own
    scale with the datasets' default scales: reused by such a run, refused by one at another dataset scale."""
    from references.nuclei.datasets import DATASET_DIAMETER
    out = tmp_path / "val"
    claim_predictions_folder(out, MADE_WITH)          # an old record: neither key
    now = {**MADE_WITH, "nucleus_diameter_px": 20.8, "count_at": dict(DATASET_DIAMETER)}
    claim_predictions_folder(out, now)
    with pytest.raises(SystemExit, match="found ones with another count_at"):
        claim_predictions_folder(out, {**now, "count_at": {**DATASET_DIAMETER, "dsb2018": "auto"}})


def test_count_at_names_a_dataset_and_a_scale():
    from references.nuclei.validate_bundle import counted_at
    assert counted_at(["dsb2018=auto", "kromp=native"]) == {"dsb2018": "auto"}
    with pytest.raises(SystemExit, match="expected --count-at DATASET=auto|native"):
        counted_at(["dsb=auto"])


def test_each_image_is_counted_at_its_protocol_modalitys_mask_threshold(tiny_bundle, tmp_path):
    """validate_bundle counts a held-out image with the mask threshold a count of its protocol modality would use;
    the record stays one figure where every modality has the same (as records from before the table)."""
    import shutil

    from cellseg.bundles import load_bundle, update_bundle_metadata
    from references.nuclei.validate_bundle import mask_threshold_record, mask_thresholds, protocol_modality
    assert [protocol_modality(m) for m in ("fluorescence", "fluorescence_kromp", "brightfield_gray", "he_nuinsseg",
                                           "stained_tissue", "he_breast")] == ["fluorescence"] * 2 + ["brightfield"] * 4
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    update_bundle_metadata(bundle, mask_thresholds={"fluorescence": 0.6})
    thresholds = mask_thresholds(load_bundle(bundle))
    assert thresholds == {"fluorescence": 0.6, "brightfield": 0.5}
    assert mask_threshold_record(thresholds) == {"fluorescence": 0.6, "brightfield": 0.5}
    forced = mask_thresholds(load_bundle(bundle), 0.55)
    assert forced == {"fluorescence": 0.55, "brightfield": 0.55} and mask_threshold_record(forced) == 0.55


def test_calibrate_bundle_finds_each_images_predictions_where_validate_bundle_put_them(tmp_path):
    """One layout for both (validate_bundle.prediction_groups): a folder per count scale, and one per mask threshold
    where the modalities' differ; a record from before thresholds per modality is one threshold for all."""
    from references.nuclei.calibrate_bundle import prediction_folders
    from references.nuclei.validate_bundle import prediction_groups
    keys = ["dsb2018/b_fluo", "dsb2018/a_tissue", "kromp/c", "tnbc/d"]
    modality = {"dsb2018/b_fluo": "fluorescence", "dsb2018/a_tissue": "stained_tissue", "kromp/c": "fluorescence_kromp",
                "tnbc/d": "he_breast"}
    made_with = {"count_at": {"kromp": "auto"}, "mask_threshold": {"fluorescence": 0.6, "brightfield": 0.5}}
    groups = prediction_groups(tmp_path, keys, modality, made_with["count_at"], made_with["mask_threshold"])
    assert [(g[0].relative_to(tmp_path).as_posix(), g[1], g[2], g[3]) for g in groups] == [
        ("mask_0.5", None, 0.5, ["dsb2018/a_tissue", "tnbc/d"]), ("mask_0.6", None, 0.6, ["dsb2018/b_fluo"]),
        ("diameter_auto/mask_0.6", "auto", 0.6, ["kromp/c"])]
    expected = {"dsb2018/a_tissue": "mask_0.5/00000_a_tissue", "tnbc/d": "mask_0.5/00001_d",
                "dsb2018/b_fluo": "mask_0.6/00000_b_fluo", "kromp/c": "diameter_auto/mask_0.6/00000_c"}
    for folder in expected.values():
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "predictions.coco.json").write_text("{}")
    found = prediction_folders(tmp_path, keys, modality, made_with)
    assert {k: v.relative_to(tmp_path).as_posix() for k, v in found.items()} == expected
    with pytest.raises(SystemExit, match="expected validate_bundle's predictions for tnbc/d in .*/old/00000_d,"):
        prediction_folders(tmp_path / "old", ["tnbc/d"], modality, {"mask_threshold": 0.5})


def test_each_held_out_group_gets_its_own_figures_and_a_row_of_the_card(tmp_path):
    """validate_bundle scores every held-out group apart (a lab's images are like one group, not like the pool): only
    held-out groups, only their images among those scored, and the card lists them modality by modality."""
    import dataclasses

    from cellseg.bundles import load_bundle
    from cellseg.evaluation import ImageMasks, card_figures, evaluate
    from references.nuclei.datasets import Split
    from references.nuclei.model_card import card_readme
    from references.nuclei.validate_bundle import heldout_group_figures

    def masks(*corners):     # square nuclei at these (row, col) corners, 6 px a side, in a 40 x 40 image (named below)
        rles, boxes = [], []
        for r, c in corners:
            mask = np.zeros((40, 40), np.uint8, order="F")
            mask[r:r + 6, c:c + 6] = 1
            rles.append(mask_utils.encode(mask))
            boxes.append((r, c, r + 6, c + 6))
        n = len(corners)
        return ImageMasks("", None, 40, 40, rles, np.array(boxes, np.int64).reshape(n, 4), np.ones(n),
                          np.zeros(n, bool), True)

    truth = {"spleen_1": masks((2, 2), (20, 20)), "spleen_2": masks((2, 2)), "liver_1": masks((2, 2), (20, 20)),
             "liver_2": masks((10, 10)), "train_1": masks((2, 2))}
    pred = {"spleen_1": masks((2, 2)), "spleen_2": masks((2, 2)), "liver_1": masks((2, 2), (20, 20)),
            "liver_2": masks((10, 10), (30, 30)), "train_1": masks((2, 2))}
    for images in (truth, pred):
        for key, image in images.items():
            image.file_name = key
    split = Split(["train_1"], ["spleen_1", "spleen_2", "liver_1", "liver_2"],
                  {"nuinsseg/human_spleen": {"modality": "he_nuinsseg", "side": "val", "images": ["spleen_1", "spleen_2"]},
                   "nuinsseg/mouse_liver": {"modality": "he_nuinsseg", "side": "val", "images": ["liver_1", "liver_2"]},
                   "tnbc/patient-01": {"modality": "he_breast", "side": "val", "images": ["tnbc_1"]},
                   "nuinsseg/human_liver": {"modality": "he_nuinsseg", "side": "train", "images": ["train_1"]}}, "test")
    asked = []

    def figures_of(members):
        asked.append(sorted(members))
        report = evaluate({k: pred[k] for k in members}, {k: truth[k] for k in members})
        return {**card_figures(report), "nuclei": int(report.pooled["true_count"]),
                "recall_pooled": round(float(report.pooled["recall"]), 4)}

    # tnbc_1 was not scored (e.g. --per-modality): its group has no images here and is left out
    groups = heldout_group_figures(split, ["liver_1", "liver_2", "spleen_1", "spleen_2"], figures_of)
    assert list(groups) == ["nuinsseg/human_spleen", "nuinsseg/mouse_liver"]
    assert asked == [["spleen_1", "spleen_2"], ["liver_1", "liver_2"]]
    spleen, liver = groups["nuinsseg/human_spleen"], groups["nuinsseg/mouse_liver"]
    assert spleen["modality"] == "he_nuinsseg" and spleen["images"] == 2 and spleen["nuclei"] == 3
    assert spleen["recall_pooled"] == pytest.approx(2 / 3, abs=1e-4) and spleen["ap50_tp_fp_fn_pooled"] == pytest.approx(2 / 3, abs=1e-4)
    assert liver["recall_pooled"] == 1.0 and liver["ap50_tp_fp_fn_pooled"] == pytest.approx(3 / 4, abs=1e-4)   # one false

    shipped = load_bundle(Path(__file__).resolve().parents[2] / "cellseg" / "models" / "nuclei")
    metrics = {**shipped.card["metrics"], "by_group": groups}
    readme = card_readme(dataclasses.replace(shipped, card={**shipped.card, "metrics": metrics}))
    assert "### By held-out group" in readme
    assert ("| `nuinsseg/human_spleen` | H&E, other organs (NuInsSeg) | 2 | 3 | 0.667 | 0.667 | 0.800 |"
            in readme)
    without = {k: v for k, v in shipped.card["metrics"].items() if k != "by_group"}
    assert "By held-out group" not in card_readme(dataclasses.replace(shipped, card={**shipped.card,
                                                                                      "metrics": without}))
