"""Fine-tuning a bundle on a user's few annotated images (`cellseg train`'s default, training.finetune): it starts
from the protocol's bundle, trains at the bundle's scale, keeps the bundle's settings but the retuned threshold, holds
images out, and refuses (exit 1) a fine-tune that does not beat the bundle it started from."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cellseg.bundles import load_bundle, update_bundle_metadata
from cellseg.training import TrainSettings, load_coco, resample, split_heldout, train, training_scale, window_of
from cellseg.training.finetune import HeldOutScorer

from ..helpers import DATA, coco_from_labels, invoke


@pytest.fixture
def start_bundle(tmp_path, tiny_bundle) -> Path:
    """The tiny random bundle with the settings a shipped bundle has: per-modality and TTA thresholds, a mask
    threshold, a nucleus size about half the test image's (median 11.6 px), so a fine-tune resamples by 0.58."""
    folder = shutil.copytree(tiny_bundle, tmp_path / "start")
    text = (folder / "model.toml").read_text()
    (folder / "model.toml").write_text(re.sub(r"nucleus_diameter_px = [0-9.]+", "nucleus_diameter_px = 6.7", text)
                                       .replace('name = "tiny"', 'name = "start"'))
    update_bundle_metadata(folder, mask_threshold=0.45,
                           score_thresholds={"fluorescence": 0.05, "fluorescence_gray": 0.1, "brightfield": 0.2},
                           tta_score_thresholds={"fluorescence": 0.3})
    return folder


def _protocol(tmp_path: Path, bundle: Path) -> Path:
    """A protocol file whose model is `bundle` (the shipped protocols name the shipped bundle)."""
    path = tmp_path / "mine.toml"
    path.write_text(f'name = "mine"\nmodality = "fluorescence"\n\n[detection]\nmodel = "{bundle.as_posix()}"\n')
    return path


def _train_args(ann, out, protocol, *more) -> list:
    return ["train", "--data", ann, "--out", out, "-p", protocol, "--steps", 2, "--batch-size", 1, "--crop", 64,
            "--device", "cpu", "-q", *more]


@pytest.mark.slow
def test_cli_train_fine_tunes_the_protocols_bundle_at_its_scale_keeping_its_settings(tmp_path, start_bundle):
    ann, _ = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    out = tmp_path / "mine"
    result = invoke(_train_args(ann, out, _protocol(tmp_path, start_bundle), "--keep-anyway"))
    assert result.exit_code == 0, (result.output, result.exception)
    start, tuned = load_bundle(start_bundle), load_bundle(out)
    card = tuned.card["finetune"]
    assert tuned.card["training"]["init"] == f"bundle start ({start.weights_sha256[:12]})"   # no --init needed
    # the start bundle's scale, thresholds and normalisation, but the retuned threshold of the user's images' key
    assert tuned.model == start.model and tuned.nucleus_diameter_px == pytest.approx(6.7)
    assert (tuned.mask_threshold, tuned.proposal_threshold) == (0.45, start.proposal_threshold)
    assert tuned.tta_score_thresholds == {"fluorescence": 0.3}
    assert card["threshold_key"] == "fluorescence_gray"                    # a one-channel image: gray input
    assert tuned.score_thresholds == {"fluorescence": 0.05, "brightfield": 0.2,
                                      "fluorescence_gray": card["table"][2]["score_threshold"]}
    assert card["table"][0]["score_threshold"] == 0.1                     # the start's own, for gray fluorescence
    # trained at the bundle's scale: the image's nuclei (median 11.6 px) resampled to its 6.7 px
    assert card["scale"]["factor"] == pytest.approx(6.7 / 11.617, abs=0.001)
    assert card["scale"]["count_options"] == "--diameter 11.6" and "--diameter 11.6" in result.stdout
    # one image: a band of it held out (the last quarter of its 256 columns), counted as `cellseg count` would
    heldout = json.loads((out / "heldout" / "annotations.json").read_text())
    assert [(im["height"], im["width"]) for im in heldout["images"]] == [(256, 64)]
    assert card["heldout_nuclei"] == len(heldout["annotations"]) > 0
    assert [s["step"] for s in card["scorings"]] == [0, 1, 2]             # the start, then every step of 2
    for words in ("its threshold", "threshold retuned", "fine-tuned (step", "AP50", "median count error"):
        assert words in result.stdout
    assert "look like" not in result.output          # fluorescence images, a fluorescence protocol: no warning
    assert not (out / "snapshots").exists()


def _scored_by_step(monkeypatch, ap50_of_step) -> dict:
    """Held-out scoring replaced by a table: the AP50 of a snapshot is ap50_of_step(step) (the run's folder scores
    as its last step). Returns {step: sha256 of the weights scored}."""
    from cellseg.bundles import sha256_file
    seen = {}

    def predictions(self, bundle_dir):
        bundle_dir = Path(bundle_dir)
        found = re.fullmatch(r"step(\d+)", bundle_dir.name)
        step = int(found.group(1)) if found else load_bundle(bundle_dir).card["training"]["steps"]
        seen[step] = sha256_file(bundle_dir / "weights.safetensors")
        return {"step": step}

    def figures(self, predictions, threshold):
        ap = ap50_of_step(predictions["step"])
        return {"score_threshold": threshold, "images": 1, "ap50_tp_fp_fn_pooled": ap, "f1_pooled": ap,
                "median_rel_count_error": 0.1, "dsb_score_mean_over_images": ap / 2, "coco_mask_ap": ap / 2,
                "tp_fp_fn": 100}

    monkeypatch.setattr(HeldOutScorer, "predictions", predictions)
    monkeypatch.setattr(HeldOutScorer, "figures", figures)
    monkeypatch.setattr(HeldOutScorer, "best", lambda self, p, fallback: figures(self, p, 0.6))
    return seen


@pytest.mark.slow
def test_a_fine_tune_worse_than_its_start_is_refused_unless_kept_anyway(tmp_path, start_bundle, monkeypatch):
    ann, _ = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    protocol = _protocol(tmp_path, start_bundle)
    _scored_by_step(monkeypatch, lambda step: 0.8 - 0.1 * step)             # every step makes it worse
    result = invoke(_train_args(ann, tmp_path / "a", protocol))
    assert result.exit_code == 1, (result.output, result.exception)
    assert "does NOT beat" in result.stderr and "0.700 against 0.800" in result.stderr
    card = load_bundle(tmp_path / "a").card["finetune"]
    assert card["better"] is False and card["verdict"].startswith("NOT better")
    result = invoke(_train_args(ann, tmp_path / "b", protocol, "--keep-anyway"))
    assert result.exit_code == 0 and "kept anyway" in result.stdout
    assert f"count with `cellseg count -p {protocol} --model {tmp_path / 'b'}" in result.stdout   # the file, by path
    # the start bundle better at a retuned threshold: the count that uses it, with the protocol that names it
    figures = HeldOutScorer.figures
    monkeypatch.setattr(HeldOutScorer, "best", lambda self, p, fallback: {
        **figures(self, p, 0.55), "ap50_tp_fp_fn_pooled": figures(self, p, 0.55)["ap50_tp_fp_fn_pooled"] + 0.05})
    result = invoke(_train_args(ann, tmp_path / "d", protocol))
    assert result.exit_code == 1
    assert re.search(rf"`cellseg count -p {re.escape(str(protocol))} (--diameter [0-9.]+ )?--score-threshold 0.55` "
                     "uses it", result.stderr)
    assert load_bundle(tmp_path / "b").card["finetune"]["better"] is False   # the card says so all the same
    # a gain within the held-out noise (AP50 0.8 on 100 nuclei found, missed or false: 0.04) is no gain
    _scored_by_step(monkeypatch, lambda step: 0.8 + 0.01 * step)
    result = invoke(_train_args(ann, tmp_path / "c", protocol))
    assert result.exit_code == 1 and "+0.020 where chance alone moves it by 0.040" in result.stderr
    card = load_bundle(tmp_path / "c").card["finetune"]
    assert (card["better"], card["ap50_gain"], card["noise_margin"]) == (False, 0.02, 0.04)


@pytest.mark.slow
@pytest.mark.parametrize("steps", [20, 4])
def test_the_best_snapshot_becomes_the_bundle_and_the_run_stops_when_it_stops_improving(tmp_path, start_bundle,
                                                                                        monkeypatch, steps):
    """Steps 3 and 4 not better than step 2, patience 2: a run of 20 steps stops early at step 4; a run of 4 ends
    there as planned, not early."""
    from cellseg.planning import load_protocol
    from cellseg.training import Recipe, finetune
    ann, _ = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    items, classes = load_coco(ann)
    seen = _scored_by_step(monkeypatch, lambda step: {0: 0.5, 1: 0.6, 2: 0.7}.get(step, 0.55))
    out = tmp_path / "mine"
    verdict = finetune(items, classes, out, str(start_bundle), load_protocol(_protocol(tmp_path, start_bundle)),
                       steps=steps, batch_size=1, crop=64, progress=False, recipe=Recipe(scorings=steps, patience=2))
    assert verdict.better and verdict.chosen_step == 2
    assert sorted(seen) == [0, 1, 2, 3, 4]                  # steps 3 and 4 not better than 2: patience 2, stopped
    tuned = load_bundle(out)
    assert tuned.weights_sha256 == seen[2] != seen[4]       # step 2's weights, not the last ones
    assert tuned.card["training"]["steps"] == 2 and tuned.card["finetune"]["steps_run"] == 4
    assert tuned.score_thresholds["fluorescence_gray"] == 0.6
    assert verdict.stopped_early == tuned.card["finetune"]["stopped_early"] == (steps > 4)
    assert tuned.card["finetune"]["planned_steps"] == steps


def test_a_protocol_that_needs_the_pixel_size_refuses_images_without_one_before_training(tmp_path, start_bundle):
    """As `cellseg count -p PROTOCOL` refuses them: the count the fine-tune would end by printing could not run."""
    ann, _ = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")   # a PNG: no pixel size
    protocol = tmp_path / "needs_mpp.toml"
    protocol.write_text(f'name = "needs-mpp"\nmodality = "fluorescence"\n\n[input]\nrequire_mpp = true\n\n'
                        f'[detection]\nmodel = "{start_bundle.as_posix()}"\n')
    out = tmp_path / "mine"
    result = invoke(_train_args(ann, out, protocol, "--keep-anyway"))
    assert result.exit_code == 1 and not out.exists(), (result.output, result.exception)
    message = result.stderr.strip()
    assert "\n" not in message and message.startswith("cellseg: error: protocol needs-mpp needs the pixel size")
    assert "dsb_fluo.png has none" in message and message.endswith("pass --mpp")


def test_the_count_options_carry_the_mpp_the_training_was_given(tmp_path, start_bundle):
    """--mpp given and the annotated nuclei deciding the scale (they contradict the pixel size): the count needs
    both, --mpp for a protocol that requires the pixel size, --diameter for the scale."""
    from cellseg.planning import load_protocol
    items = _items(tmp_path)
    bundle = load_bundle(start_bundle)
    protocol = load_protocol("fluorescence-nuclei").replace(nucleus_diameter_um=2.0)   # 4 px at 0.5 µm/px: 2.9x off
    scale = training_scale(bundle, items, protocol, mpp=0.5)
    assert scale.method == "measured" and scale.count_options() == "--mpp 0.5 --diameter 11.6"


def test_the_scale_note_says_the_annotated_nuclei_were_measured_once(tmp_path, start_bundle):
    """Annotated nuclei above the bundle's size: a count measures such nuclei again, resampled (its network reads
    them biased); the annotated sizes are exact and are not measured again, and the note must not say they were."""
    from cellseg.planning import load_protocol
    items = _items(tmp_path)
    bundle = load_bundle(start_bundle)
    scale = training_scale(bundle, items, load_protocol("fluorescence-nuclei"))
    assert _diameter(items[0].masks) > bundle.nucleus_diameter_px        # 11.6 px against 6.7
    n = sum(len(it.masks) for it in items)
    assert scale.source.startswith(f"measured: {n} annotated nuclei, median 11.6 px (")
    assert "again" not in scale.source and scale.source.endswith(f": resampled by {6.7 / 11.617:.3g}")


def test_held_out_counts_name_the_users_protocol(tmp_path, start_bundle):
    """A held-out image's count warns in the words of a count (e.g. 'protocol X is for fluorescence'): X must be
    the protocol the user gave, not the internal validation settings."""
    from cellseg.planning import load_protocol
    from cellseg.training.finetune import HeldOut, HeldOutScorer
    ann, _ = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    protocol = load_protocol(_protocol(tmp_path, start_bundle))
    scale = training_scale(load_bundle(start_bundle), load_coco(ann)[0], protocol)
    scorer = HeldOutScorer(HeldOut(ann, "test"), protocol, "fluorescence", scale, None, "cpu")
    assert (scorer.protocol.name, scorer.protocol.modality) == ("mine", "fluorescence")


def test_a_held_out_part_without_nuclei_is_one_line_and_writes_nothing(tmp_path, start_bundle):
    """Nuclei annotated only on the left of the image: the held-out band (its right quarter) could judge nothing."""
    import tifffile
    labels = tifffile.imread(DATA / "dsb_fluo_labels.tif")
    right = np.unique(labels[:, 180:])
    labels[np.isin(labels, right[right > 0])] = 0
    tifffile.imwrite(tmp_path / "left_only.tif", labels)
    ann, n = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", tmp_path / "left_only.tif")
    assert n > 10
    out = tmp_path / "mine"
    result = invoke(_train_args(ann, out, _protocol(tmp_path, start_bundle)))
    assert result.exit_code != 0 and not out.exists()
    message = result.stderr.strip()
    assert "\n" not in message and "expected annotated nuclei in the held-out part" in message and "found none" in message


def test_val_images_without_nuclei_are_one_line_and_write_nothing(tmp_path, start_bundle):
    ann, _ = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    val = tmp_path / "val.json"
    val.write_text(json.dumps({**json.loads(ann.read_text()), "annotations": []}))
    out = tmp_path / "mine"
    result = invoke(_train_args(ann, out, _protocol(tmp_path, start_bundle), "--val", val))
    assert result.exit_code != 0 and not out.exists()
    assert "expected annotated nuclei in the --val images" in result.stderr and "found none" in result.stderr


def test_training_scale_is_the_one_count_would_choose(tmp_path, start_bundle):
    """planning.decide_scale (a count's default) with the annotated nuclei as its measurement."""
    from cellseg.planning import load_protocol
    items = _items(tmp_path)
    bundle = load_bundle(start_bundle)
    protocol = load_protocol("fluorescence-nuclei")
    scale = training_scale(bundle, items, protocol)            # a PNG without a pixel size: the annotated nuclei
    assert scale.method == "measured" and _diameter(items[0].masks) == pytest.approx(11.617, abs=0.001)
    assert scale.factor == pytest.approx(6.7 / 11.617, abs=1e-3) and scale.count_diameter == pytest.approx(11.617, abs=1e-3)
    assert scale.count_options() == "--diameter 11.6"
    # the protocol's nucleus size at --mpp: 5 µm at 0.5 µm/px is 10 px (the annotated 11.6 px do not contradict it)
    in_um = training_scale(bundle, items, protocol.replace(nucleus_diameter_um=5.0), mpp=0.5)
    assert (in_um.method, in_um.factor, in_um.count_options()) == ("pixel size", pytest.approx(0.67), "--mpp 0.5")
    wrong = training_scale(bundle, items, protocol.replace(nucleus_diameter_um=2.0), mpp=0.5)   # 4 px: 2.9x off
    assert wrong.method == "measured" and wrong.factor == pytest.approx(scale.factor)   # the nuclei decide, as count


def _items(folder: Path):
    """The test image's annotated nuclei, as `cellseg train` reads them from a COCO file in `folder`."""
    ann, _ = coco_from_labels(folder, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    return load_coco(ann)[0]


def _diameter(masks) -> float:
    return float(np.median([2 * np.sqrt(m.sum() / np.pi) for m in masks]))


@pytest.mark.parametrize("factor", [0.5, 1.6])
def test_resampling_keeps_masks_on_their_nuclei(tmp_path, factor):
    (item,) = _items(tmp_path)
    small = resample(item, factor)
    assert small.image.shape == (3, round(256 * factor), round(256 * factor)) and small.image.dtype == np.float32
    assert _diameter(small.masks) == pytest.approx(factor * _diameter(item.masks), rel=0.08)
    assert len(small.masks) >= 0.95 * len(item.masks)
    for box, mask in zip(small.boxes, small.masks):
        assert mask.shape == (box[2] - box[0], box[3] - box[1]) and mask[0].any() and mask[:, 0].any()
        # a nucleus is darker or brighter than the ground it lies on; its pixels must be the nucleus's
    inside = np.concatenate([small.image[0, b[0]:b[2], b[1]:b[3]][m] for b, m in zip(small.boxes, small.masks)])
    outside = small.image[0].mean()
    assert inside.mean() > outside + 0.1                                  # fluorescence: bright nuclei


def test_held_out_parts_partition_the_annotated_nuclei(tmp_path):
    (item,) = _items(tmp_path)
    train_items, held, how = split_heldout([item], 0.25)
    assert "25 %" in how and train_items[0].image.shape == (3, 256, 192) and held[0][1].shape[:2] == (256, 64)
    area = sum(int(m.sum()) for m in item.masks)
    assert sum(int(m.sum()) for m in train_items[0].masks) + sum(int(m.sum()) for m in held[0][2].masks) == area
    left = window_of(item, 0, 0, 256, 192)
    assert [b.tolist() for b in left.boxes] == [b.tolist() for b in train_items[0].boxes]
    many = [item] * 8
    train_items, held, how = split_heldout(many, 0.25)
    assert (len(train_items), len(held)) == (6, 2) and "whole" in how


def test_a_frozen_or_slower_backbone_gets_its_share_of_the_schedule(tmp_path, monkeypatch):
    from cellseg.detection import build_model
    from cellseg.training import parameter_groups

    from ..helpers import tiny_model_config
    model = build_model(tiny_model_config())
    groups = parameter_groups(model, 0.0)
    assert len(groups) == 1 and not any(p.requires_grad for p in model.backbone.body.parameters())
    assert sum(p.numel() for p in groups[0]["params"]) == sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith("backbone.body."))
    (item,) = _items(tmp_path)
    seen = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.append([g["lr"] for g in self.param_groups])
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    from ..helpers import tiny_model_config as cfg
    train([item], ["nucleus"], tmp_path / "b", TrainSettings(steps=3, warmup=1, lr=1e-3, batch_size=1, crop=64,
                                                            backbone_lr_scale=0.1),
          model_cfg=cfg(), progress=False)
    assert all(body == pytest.approx(0.1 * rest) for rest, body in seen) and len(seen) == 3
    assert load_bundle(tmp_path / "b").card["training"]["backbone_lr_scale"] == 0.1


def test_a_snapshot_callback_can_stop_the_run(tmp_path):
    from ..helpers import tiny_model_config
    (item,) = _items(tmp_path)
    steps = []

    def on_snapshot(folder, step):
        steps.append(step)
        return step == 2
    train([item], ["nucleus"], tmp_path / "b", TrainSettings(steps=10, batch_size=1, crop=64, snapshot_every=1),
          model_cfg=tiny_model_config(), progress=False, on_snapshot=on_snapshot)
    assert steps == [0, 1, 2] and load_bundle(tmp_path / "b").card["training"]["steps"] == 2
