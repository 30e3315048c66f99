"""The ship rule (references/nuclei/compare_bundles.py, issue 47): a candidate ships when it is better pooled on the
held-out images no training stage saw and no modality loses more than 0.01 AP50; the stricter comparison (better on
every figure of every modality) is printed beside it."""

import json

import pytest

from references.nuclei import compare_bundles as cb


def figures(ap50, f1, count_error, dsb, images=10):
    return {"images": images, "ap50_tp_fp_fn_pooled": ap50, "f1_pooled": f1, "median_rel_count_error": count_error,
            "dsb_score_mean_over_images": dsb}


def metrics(**by_modality):
    base = {m: figures(0.7, 0.8, 0.10, 0.4) for m in cb.MODALITIES}
    base.update(by_modality)
    return {"val_images": 40, "held_out_groups": ["a", "b"], "all": figures(0.7, 0.8, 0.1, 0.4, 40), **base}


def write(folder, m):
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps(m))
    return folder


def test_a_lower_count_error_is_better_and_a_lower_ap50_is_worse():
    current = figures(0.70, 0.80, 0.10, 0.40)
    assert cb.compare_row(current, figures(0.70, 0.80, 0.08, 0.40))["median_rel_count_error"] == "better"
    assert cb.compare_row(current, figures(0.69, 0.80, 0.10, 0.40))["ap50_tp_fp_fn_pooled"] == "worse"
    assert cb.compare_row(current, dict(figures(0.7, 0.8, 0.1, 0.4), f1_pooled=None))["f1_pooled"] == "missing"


def test_ships_only_when_every_modality_is_better_and_none_is_worse():
    better = figures(0.75, 0.85, 0.08, 0.45)
    current = metrics()
    assert cb.ships(current, metrics(**{m: better for m in cb.MODALITIES})) == (True, [])
    # better everywhere but one figure of one modality: does not ship, and says where
    mixed = {m: better for m in cb.MODALITIES}
    mixed["brightfield_gray"] = figures(0.75, 0.85, 0.12, 0.45)
    assert cb.ships(current, metrics(**mixed)) == (False, ["brightfield_gray"])
    # equal is not better
    assert cb.ships(current, metrics()) == (False, list(cb.MODALITIES))


def test_the_command_prints_the_table_and_its_exit_status_is_the_ship_rules_verdict(tmp_path, capsys):
    better = {m: figures(0.75, 0.85, 0.08, 0.45) for m in cb.MODALITIES}
    current = write(tmp_path / "current", metrics())
    winner = write(tmp_path / "winner", metrics(**better, all=figures(0.75, 0.85, 0.08, 0.45, 40)))
    loser = write(tmp_path / "loser", metrics(**dict(better, he_breast=figures(0.6, 0.85, 0.08, 0.45)),
                                              all=figures(0.74, 0.85, 0.08, 0.45, 40)))
    assert cb.main(["--current", str(current), "--candidate", str(winner)]) == 0
    out = capsys.readouterr().out
    assert "| fluorescence | 10 | 0.7000 → 0.7500 (better)" in out and "10.0 % → 8.0 % (better)" in out
    assert "(the stricter comparison): yes" in out and "ships: yes (issue 47's rule: the 40 images held out" in out
    assert cb.main(["--current", str(current), "--candidate", str(loser)]) == 1
    out = capsys.readouterr().out
    assert "(the stricter comparison): no (not on H&E (TNBC))" in out
    assert out.rstrip().endswith("ships: no (issue 47's rule: H&E (TNBC) down by 0.1000, more than 0.01)")


def test_the_ship_rule_is_the_unseen_images_pooled_and_no_modality_down_by_more_than_a_hundredth():
    current = metrics(all_unseen=figures(0.60, 0.75, 0.15, 0.32, 20))
    gain = figures(0.62, 0.75, 0.15, 0.32, 20)
    # a figure worse here and there, a modality down by exactly 0.01: ships (the stricter comparison would not)
    ok, why = cb.ship_rule(current, metrics(all_unseen=gain, he_breast=figures(0.69, 0.7, 0.2, 0.3)))
    assert ok and "the 20 images no training stage saw 0.6000 -> 0.6200" in why and "H&E (TNBC) -0.0100" in why
    assert not cb.ships(current, metrics(all_unseen=gain, he_breast=figures(0.69, 0.7, 0.2, 0.3)))[0]
    # one modality down by more than 0.01, or the unseen images not better, or a figure missing: does not
    assert cb.ship_rule(current, metrics(all_unseen=gain, brightfield_gray=figures(0.6889, 0.8, 0.1, 0.4))) == (
        False, "grayscale brightfield down by 0.0111, more than 0.01")
    assert cb.ship_rule(current, metrics(all_unseen=figures(0.60, 0.8, 0.1, 0.4, 20)))[1].endswith("not better")
    assert not cb.ship_rule(current, metrics(all_unseen=gain, fluorescence=figures(None, 0.8, 0.1, 0.4)))[0]
    # the pooled row of every held-out image where neither validation records what training saw
    assert cb.ship_rule(metrics(), metrics(all=figures(0.71, 0.8, 0.1, 0.4, 40)))[0]


@pytest.mark.parametrize("change", [{"val_images": 39}, {"held_out_groups": ["a"]}])
def test_bundles_scored_on_different_images_are_not_compared(tmp_path, capsys, change):
    current = write(tmp_path / "current", metrics())
    other = write(tmp_path / "other", {**metrics(), **change})
    assert cb.main(["--current", str(current), "--candidate", str(other)]) == 2
    assert "expected both scored on the same held-out images" in capsys.readouterr().err


def test_a_folder_without_metrics_is_a_one_line_error(tmp_path, capsys):
    current = write(tmp_path / "current", metrics())
    assert cb.main(["--current", str(current), "--candidate", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("compare_bundles: expected validate_bundle.py's metrics.json in") and "\n" not in err


def test_the_command_says_which_scoring_settings_differ_between_the_two_validations(tmp_path, capsys):
    current = write(tmp_path / "current", metrics())
    candidate = write(tmp_path / "candidate", metrics())
    made_with = {"mask_threshold": {"fluorescence": 0.6, "brightfield": 0.5}, "nucleus_diameter_px": 20.279,
                 "precision": "fp32", "tta": False, "count_at": {"kromp": "auto"}}
    (current / "predictions_made_with.json").write_text(json.dumps(made_with))
    (candidate / "predictions_made_with.json").write_text(json.dumps(made_with))
    cb.main(["--current", str(current), "--candidate", str(candidate)])
    assert "scored differently" not in capsys.readouterr().out
    (candidate / "predictions_made_with.json").write_text(
        json.dumps(dict(made_with, mask_threshold=0.5, nucleus_diameter_px=22.08)))
    cb.main(["--current", str(current), "--candidate", str(candidate)])
    out = capsys.readouterr().out
    assert "- mask threshold: brightfield 0.5, fluorescence 0.6 (current) against 0.5 (candidate)" in out
    assert "- count size (px): 20.3 (current) against 22.1 (candidate)" in out
    assert "precision" not in out.split("scored differently")[1]
    tuned = {"threshold_chosen_on": "these held-out images, per protocol modality, gray input apart (pooled F1)"}
    (current / "metrics.json").write_text(json.dumps(dict(metrics(), **tuned)))
    (candidate / "metrics.json").write_text(json.dumps(dict(metrics(), threshold_chosen_on="the bundle's own")))
    cb.main(["--current", str(current), "--candidate", str(candidate)])
    assert ("- score thresholds chosen on: these held-out images, per protocol modality, gray input apart (pooled "
            "F1) (current) against the bundle's own (candidate)") in capsys.readouterr().out


def test_the_ap50_change_interval_is_a_paired_bootstrap_over_the_images():
    current = {f"img{i}": (8, 1, 1) for i in range(20)}
    assert cb.ap50_change_interval(current, dict(current)) == (0.0, 0.0)
    # one more nucleus found on every image: the change is positive on every resample
    better = {k: (9, 1, 0) for k in current}
    low, high = cb.ap50_change_interval(current, better)
    assert 0 < low <= high and high == pytest.approx(0.9 - 0.8)
    # a gain on two images and a loss on two: the interval spans zero
    mixed = dict(current, img0=(10, 0, 0), img1=(10, 0, 0), img2=(6, 2, 3), img3=(6, 2, 3))
    low, high = cb.ap50_change_interval(current, mixed)
    assert low < 0 < high
    # not the same images: no interval
    assert cb.ap50_change_interval(current, {k: v for k, v in current.items() if k != "img0"}) is None


def test_the_table_gives_each_modalitys_interval_from_the_per_image_figures(tmp_path, capsys):
    current = write(tmp_path / "current", metrics())
    candidate = write(tmp_path / "candidate", metrics())
    images = [{"image": f"images/{i}.png", "tp": 8, "fp": 1, "fn": 1} for i in range(10)]
    (current / "metrics_fluorescence.json").write_text(json.dumps({"images": images}))
    (candidate / "metrics_fluorescence.json").write_text(
        json.dumps({"images": [dict(im, tp=9, fn=0) for im in images]}))
    cb.main(["--current", str(current), "--candidate", str(candidate)])
    rows = {line.split(" | ")[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert rows["| fluorescence"].endswith("| +0.100 to +0.100 | no |")
    assert rows["| stained tissue"].endswith("| - | no |")     # no per-image figures: no interval
