"""references/nuclei/validate_bundle.py reuses the predictions in its --out folder: only those of the same weights and
settings (a stale folder once meant a new snapshot would be scored on an older one's predictions)."""

import json

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
