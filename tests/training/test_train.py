"""Training: crops and augmentations keep masks and boxes consistent; a tiny run learns; the bundle it
writes loads and runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cellseg.bundles import load_bundle
from cellseg.detection import load_network
from cellseg.training import TrainImage, TrainSettings, load_coco, sample_crop, train

from ..helpers import DATA, assert_user_error, coco_from_labels, invoke, snapshot, tiny_model_config


def test_sample_crop_keeps_masks_and_boxes_consistent():
    rng = np.random.default_rng(0)
    masks = [np.ones((10, 12), bool), np.ones((8, 8), bool)]
    item = TrainImage(rng.random((3, 300, 280), dtype=np.float32), np.array([[20, 30, 30, 42], [100, 100, 108, 108]]),
                      masks, np.array([1, 1]))
    for _ in range(20):
        image, target = sample_crop(item, 128, rng)
        assert image.shape == (3, 128, 128) and 0 <= float(image.min()) and float(image.max()) <= 1
        n = len(target["masks"])
        assert target["boxes"].shape == (n, 4) and target["labels"].shape == (n,)
        for box, m in zip(target["boxes"], target["masks"]):
            ys, xs = torch.where(m.bool())
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_masks_cross_processes_bit_packed_and_come_back_equal():
    from cellseg.training import pack_masks, unpack_masks
    rng = np.random.default_rng(1)
    for shape in [(3, 17, 29), (0, 8, 8), (5, 64, 64)]:
        masks = torch.from_numpy((rng.random(shape) > 0.5).astype(np.uint8))
        back = unpack_masks(pack_masks(masks), torch.device("cpu"))
        assert back.dtype == torch.uint8 and torch.equal(back, masks)


@pytest.mark.slow
def test_crop_workers_train_like_the_main_process(tmp_path):
    """Crops made by DataLoader worker processes (a GPU run's --workers) reach the network intact."""
    ann, _ = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    items, classes = load_coco(ann)
    out = tmp_path / "bundle"
    train(items, classes, out, TrainSettings(steps=2, batch_size=2, crop=64, workers=1),
          model_cfg=tiny_model_config(), progress=False)
    assert load_bundle(out).card["training"]["steps"] == 2


def test_sample_crop_without_cells():
    item = TrainImage(np.zeros((3, 200, 200), np.float32), np.zeros((0, 4), np.int64), [], np.zeros(0, np.int64))
    rng = np.random.default_rng(3)
    for _ in range(10):           # scale jitter on an empty crop used to crash F.interpolate
        image, target = sample_crop(item, 96, rng)
        assert image.shape == (3, 96, 96) and target["masks"].shape == (0, 96, 96)


@pytest.mark.slow
def test_tiny_training_run_learns_and_writes_a_bundle(tmp_path):
    ann, n_cells = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    items, classes = load_coco(ann)
    assert classes == ["nucleus"] and len(items[0].masks) == n_cells
    out = tmp_path / "bundle"
    torch.manual_seed(0)
    train(items, classes, out, TrainSettings(steps=24, batch_size=2, crop=96, lr=1e-3, warmup=4,
                                             checkpoint_every=12),
          model_cfg=tiny_model_config(), progress=False)
    history = np.loadtxt(out / "training_log.csv", delimiter=",", skiprows=1)
    first, last = history[:6, 1].mean(), history[-6:, 1].mean()
    assert last < 0.8 * first, (first, last)
    assert (out / "training_loss.png").is_file()
    bundle = load_bundle(out)
    assert bundle.card["training"]["steps"] == 24
    assert bundle.nucleus_diameter_px == pytest.approx(
        np.median([2 * np.sqrt(m.sum() / np.pi) for m in items[0].masks]))
    load_network(bundle)      # weights load into the architecture the card describes


def test_a_run_with_a_moving_average_ships_the_average_and_its_card_says_so(tmp_path):
    """--weight-average: the Mask R-CNN's bundle holds the moving average of its weights (not the last step's, which
    the checkpoint keeps for the next step), and its card names it."""
    from references.nuclei.model_card import _recipe
    ann, _ = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    items, classes = load_coco(ann)
    out = tmp_path / "bundle"
    torch.manual_seed(0)
    train(items, classes, out, TrainSettings(steps=6, batch_size=1, crop=64, lr=1e-3, warmup=2, checkpoint_every=6,
                                             weight_average_decay=0.5),
          model_cfg=tiny_model_config(), progress=False)
    bundle = load_bundle(out)
    assert bundle.card["training"]["weight_average_decay"] == 0.5
    assert "moving average" in _recipe(bundle.card["training"])
    last = torch.load(out / "checkpoint.pt", weights_only=True)
    shipped = bundle.state_dict()
    differs = [k for k, v in last["average"].items() if k.startswith("module.") and v.is_floating_point()
               and not torch.equal(shipped[k.removeprefix("module.")].float(), last["model"][k.removeprefix("module.")])]
    assert differs     # the bundle is not the last step's weights
    for k, v in last["average"].items():
        if k.startswith("module.") and v.is_floating_point():
            assert torch.allclose(shipped[k.removeprefix("module.")].float(), v.float(), atol=1e-3), k


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(tmp_path):
    ann, _ = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    items, classes = load_coco(ann)
    out = tmp_path / "bundle"
    settings = TrainSettings(steps=6, batch_size=1, crop=64, checkpoint_every=3)
    train(items, classes, out, settings, model_cfg=tiny_model_config(), progress=False)
    settings.steps = 9
    train(items, classes, out, settings, model_cfg=tiny_model_config(), resume=True, progress=False)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 9 and len(ckpt["history"]) == 9
    # A resumed run stopped before its first step (time budget spent) still writes the bundle and its log.
    (out / "weights.safetensors").unlink()
    settings.steps, settings.minutes = 12, 0
    train(items, classes, out, settings, model_cfg=tiny_model_config(), resume=True, progress=False)
    assert (out / "weights.safetensors").is_file()
    assert (out / "training_log.csv").read_text().splitlines()[0].startswith("step,loss,loss_")


@pytest.mark.slow
def test_ctrl_c_keeps_what_was_learnt_and_resume_goes_on(tmp_path, monkeypatch):
    import cellseg.training.crops as crops_module
    from cellseg.errors import TrainingInterrupted
    ann, _ = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    items, classes = load_coco(ann)
    real_crop, calls = crops_module.sample_crop, []

    def crop_then_ctrl_c(item, size, rng, *aug):
        calls.append(1)
        if len(calls) == 5:              # during the third step (two crops a step)
            raise KeyboardInterrupt
        return real_crop(item, size, rng, *aug)
    monkeypatch.setattr(crops_module, "sample_crop", crop_then_ctrl_c)
    out = tmp_path / "b"
    settings = TrainSettings(steps=6, batch_size=2, crop=64, checkpoint_every=50)
    with pytest.raises(TrainingInterrupted, match="interrupted at step 2 of 6.*--resume"):
        train(items, classes, out, settings, model_cfg=tiny_model_config(), progress=False)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2     # not lost: saved at the interrupt
    bundle = load_bundle(out)
    assert bundle.card["training"]["steps"] == 2 and bundle.card["training"]["finished"] is False
    monkeypatch.setattr(crops_module, "sample_crop", real_crop)
    train(items, classes, out, settings, model_cfg=tiny_model_config(), resume=True, progress=False)
    assert load_bundle(out).card["training"]["finished"] is True


@pytest.mark.slow
def test_sigterm_stops_after_the_step_under_way_and_saves_it(tmp_path, monkeypatch):
    """scripts/train_long.sh stops its background run (which ignores Ctrl-C) with SIGTERM: the step under way is
    finished and saved, not lost with up to 10 minutes of training."""
    import os
    import signal

    import cellseg.training.crops as crops_module
    from cellseg.errors import TrainingInterrupted
    ann, _ = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    items, classes = load_coco(ann)
    real_crop, calls = crops_module.sample_crop, []

    def crop_then_sigterm(item, size, rng, *aug):
        calls.append(1)
        if len(calls) == 5:              # during the third step (two crops a step)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_crop(item, size, rng, *aug)
    monkeypatch.setattr(crops_module, "sample_crop", crop_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "b"
    with pytest.raises(TrainingInterrupted, match="interrupted at step 3 of 6"):
        train(items, classes, out, TrainSettings(steps=6, batch_size=2, crop=64, checkpoint_every=50),
              model_cfg=tiny_model_config(), progress=False)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is before       # the handler is the loop's only while it runs


@pytest.mark.slow
def test_sample_weights_decide_which_images_are_drawn(tmp_path, monkeypatch):
    import cellseg.training.crops as crops_module
    from cellseg.errors import CellsegError
    ann, _ = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    items, classes = load_coco(ann)
    blank = TrainImage(np.zeros_like(items[0].image), np.zeros((0, 4), np.int64), [], np.zeros(0, np.int64))
    drawn = []
    real_crop = crops_module.sample_crop
    monkeypatch.setattr(crops_module, "sample_crop", lambda item, size, rng, *aug: (drawn.append(item is blank),
                                                                                   real_crop(item, size, rng))[1])
    settings = TrainSettings(steps=3, batch_size=2, crop=64, checkpoint_every=3)
    train([items[0], blank], classes, tmp_path / "b", settings, model_cfg=tiny_model_config(), progress=False,
          sample_weights=[0.0, 1.0])
    assert drawn == [True] * 6
    with pytest.raises(CellsegError, match="2 non-negative sample weights"):
        train([items[0], blank], classes, tmp_path / "c", settings, model_cfg=tiny_model_config(), progress=False,
              sample_weights=[1.0])


def test_init_from_a_bundle_fine_tunes_its_weights(tmp_path, tiny_bundle):
    from cellseg.detection import build_model
    from cellseg.training import initial_weights, load_matching
    cfg, state, note = initial_weights(str(tiny_bundle), ["nucleus"])
    assert "bundle tiny" in note and cfg.fpn_channels == tiny_model_config().fpn_channels
    model = build_model(cfg)
    assert load_matching(model, state) == []                       # same classes: every tensor loads
    two = build_model(initial_weights(str(tiny_bundle), ["nucleus", "mitosis"])[0])
    fresh = load_matching(two, state)                              # new classes: only the class heads restart
    assert fresh and all("predictor" in k for k in fresh)
    assert torch.equal(two.state_dict()["backbone.body.conv1.weight"], state["backbone.body.conv1.weight"])


def test_a_resumed_fine_tune_keeps_the_bundle_it_started_from_in_its_card(tmp_path, tiny_bundle):
    """--resume takes no --init: the run's card must still name the bundle it continued and that bundle's stages
    (the long run's card once said "random initialisation" after its first resume)."""
    from cellseg.bundles import save_bundle
    ann, _ = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    items, classes = load_coco(ann)
    start = load_bundle(tiny_bundle)
    parent = tmp_path / "parent"   # a bundle that is itself a fine-tune: its stage and its parent's both count
    save_bundle(parent, start.model, start.state_dict(), name="parent", nucleus_diameter_px=12.0,
                card={"training": {"init": "random initialisation", "steps": 7},
                      "earlier_stages": [{"bundle": "grandparent", "steps": 5}]})
    out = tmp_path / "run"
    settings = TrainSettings(steps=2, batch_size=1, crop=64, checkpoint_every=1)
    train(items, classes, out, settings, init=str(parent), progress=False)
    settings.steps = 3
    train(items, classes, out, settings, resume=True, model_cfg=start.model, progress=False)   # no init
    card = load_bundle(out).card
    digest = load_bundle(parent).weights_sha256
    assert card["training"]["steps"] == 3 and card["training"]["init"] == f"bundle parent ({digest[:12]})"
    assert [s["bundle"] for s in card["earlier_stages"]] == ["grandparent", "parent"]
    assert card["earlier_stages"][1]["weights_sha256"] == digest
    # a run begun before lineage.json existed takes the --init given with its resume, once, and keeps it
    (out / "lineage.json").unlink()
    settings.steps = 4
    train(items, classes, out, settings, resume=True, init=str(parent), progress=False)
    assert load_bundle(out).card["earlier_stages"][1]["bundle"] == "parent"
    assert (out / "lineage.json").is_file()


def test_a_run_keeps_its_starts_settings_as_they_were_when_it_started(tmp_path, tiny_bundle):
    """keep_settings_of: the bundles a run writes keep the start's thresholds and count size (its snapshots are
    scored as they would ship), also after a resume when the start bundle has since changed (a new one shipped in
    its place); without it a bundle counts at its training images' median size."""
    from cellseg.bundles import save_bundle
    from cellseg.training.maskrcnn import KEPT_SETTINGS_FILE
    ann, _ = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    items, classes = load_coco(ann)
    tiny = load_bundle(tiny_bundle)
    start = tmp_path / "start"
    save_bundle(start, tiny.model, tiny.state_dict(), name="start", score_threshold=0.8, mask_threshold=0.6,
                nucleus_diameter_px=12.5)
    settings = TrainSettings(steps=2, batch_size=1, crop=64, checkpoint_every=1)
    out = tmp_path / "kept"
    train(items, classes, out, settings, init=str(start), keep_settings_of=start, progress=False)
    kept = load_bundle(out)
    assert (kept.nucleus_diameter_px, kept.score_threshold, kept.mask_threshold) == (12.5, 0.8, 0.6)
    assert "not the" in kept.card["training"]["count_size"] and (out / KEPT_SETTINGS_FILE).is_file()

    save_bundle(start, tiny.model, tiny.state_dict(), name="start", score_threshold=0.3, nucleus_diameter_px=40.0)
    settings.steps = 3
    train(items, classes, out, settings, resume=True, keep_settings_of=start, progress=False)
    resumed = load_bundle(out)
    assert resumed.card["training"]["steps"] == 3
    assert (resumed.nucleus_diameter_px, resumed.score_threshold) == (12.5, 0.8)

    plain = tmp_path / "plain"
    train(items, classes, plain, TrainSettings(steps=2, batch_size=1, crop=64), init=str(start), progress=False)
    own = load_bundle(plain)
    assert own.nucleus_diameter_px not in (12.5, 40.0) and "count_size" not in own.card["training"]
    assert not (plain / KEPT_SETTINGS_FILE).exists()


@pytest.mark.parametrize("extra, expected", [((), "expected --init to be a bundle folder"),
                                             (("--init", "coco"), "expected --init to be a bundle folder"),
                                             (("--resume",), "this run started without it")])
def test_keep_init_settings_needs_a_bundle_to_keep_them_from(tmp_path, monkeypatch, capsys, extra, expected):
    import references.nuclei.train_default_bundle as train_default
    monkeypatch.setattr("sys.argv", ["train_default_bundle", "--out", str(tmp_path / "run"), "--keep-init-settings",
                                     *extra])
    with pytest.raises(SystemExit) as exit_info:
        train_default.main()
    assert exit_info.value.code == 2 and expected in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_run_from_a_bundle_of_another_network_resumes_without_being_told_it(tmp_path, tiny_bundle):
    """train_long.sh resumes with --resume alone: a run started from a bundle whose network is not the default (on
    2026-11-27 a ResNet-34 candidate, resumed as a ResNet-18: "Unexpected key(s) in state_dict") goes on with the
    network it started with, recorded in its lineage.json; a run begun before that was recorded, with the bundle
    its last stop wrote."""
    import json
    ann, _ = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    items, classes = load_coco(ann)
    start = load_bundle(tiny_bundle).model
    assert start != type(start)()          # not the default network: a resume that builds the default fails
    out = tmp_path / "run"
    settings = TrainSettings(steps=2, batch_size=1, crop=64, checkpoint_every=1)
    train(items, classes, out, settings, init=str(tiny_bundle), progress=False)
    assert json.loads((out / "lineage.json").read_text())["model"] == start.to_dict()
    settings.steps = 3
    train(items, classes, out, settings, resume=True, progress=False)      # no init, no network
    assert load_bundle(out).model == start and load_bundle(out).card["training"]["steps"] == 3
    lineage = json.loads((out / "lineage.json").read_text())
    del lineage["model"]
    (out / "lineage.json").write_text(json.dumps(lineage))
    settings.steps = 4
    train(items, classes, out, settings, resume=True, progress=False)
    assert load_bundle(out).model == start and load_bundle(out).card["training"]["steps"] == 4


@pytest.mark.slow
def test_init_coco_uses_a_local_torchvision_checkpoint(tmp_path):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    from cellseg.detection import build_model
    from cellseg.errors import CellsegError
    from cellseg.training import initial_weights, load_matching
    with pytest.raises(CellsegError, match="nothing is downloaded"):
        initial_weights(f"coco:{tmp_path / 'missing.pth'}", ["nucleus"])
    # A checkpoint with the exact layout of torchvision's COCO file (91 classes), random values.
    reference = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).state_dict()
    path = tmp_path / "maskrcnn_resnet50_fpn_coco.pth"
    torch.save(reference, path)
    cfg, state, note = initial_weights(f"coco:{path}", ["nucleus"])
    assert cfg.backbone == "resnet50" and "COCO" in note
    model = build_model(cfg)
    fresh = load_matching(model, state)
    assert fresh and all("predictor" in k for k in fresh)          # only the 91-class heads restart
    assert torch.equal(model.state_dict()["roi_heads.mask_head.0.0.weight"],
                       reference["roi_heads.mask_head.0.0.weight"])


# --- `cellseg train` on the command line -----------------------------------------------------------------

def test_cli_train_never_overwrites_a_folder_it_did_not_start(tmp_path, tiny_bundle):
    import shutil
    ann, _ = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    theirs = shutil.copytree(tiny_bundle, tmp_path / "my_model")
    before = snapshot(theirs)
    result = invoke(["train", "--data", ann, "--out", theirs, "--steps", 1, "--device", "cpu"])
    assert_user_error(result, 1, "expected --out to be a new or empty folder", "my_model", "--resume")
    assert snapshot(theirs) == before
    result = invoke(["train", "--data", ann, "--out", tmp_path / "new", "--resume", "--device", "cpu"])
    assert_user_error(result, 1, "expected a training to resume", "checkpoint.pt")
    assert not (tmp_path / "new").exists()


def test_cli_train_checks_val_before_training(tmp_path):
    ann, _ = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    result = invoke(["train", "--data", ann, "--val", tmp_path / "val.json", "--out", tmp_path / "b", "--device", "cpu"])
    assert_user_error(result, 1, "val.json")
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_cli_train_with_val_tunes_the_threshold_of_the_bundle(tmp_path):
    ann, _ = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    out = tmp_path / "b"
    result = invoke(["train", "--data", ann, "--val", ann, "--out", out, "--steps", 2, "--batch-size", 1,
                     "--crop", 64, "--device", "cpu", "--init", "none"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "also in --data" in result.stderr and "optimistic" in result.stderr     # the same image twice
    assert "default score threshold" in result.stdout
    bundle = load_bundle(out)
    assert bundle.card["metrics"]["val_images"] == 1
    assert bundle.score_threshold == bundle.card["metrics"]["score_threshold"]
    assert {p.name for p in (out / "validation").iterdir()} == {"metrics.json", "per_image.csv",
                                                                "threshold_sweep.png"}
    assert bundle.card["training"]["lr"] == 3e-4                    # from random weights


@pytest.mark.slow
def test_cli_fine_tuning_defaults_to_a_lower_learning_rate(tmp_path, tiny_bundle):
    ann, _ = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    result = invoke(["train", "--data", ann, "--out", tmp_path / "b", "--init", tiny_bundle, "--steps", 1,
                     "--batch-size", 1, "--crop", 64, "--device", "cpu", "--keep-anyway"])
    assert result.exit_code == 0, (result.output, result.exception)
    card = load_bundle(tmp_path / "b").card["training"]
    assert card["lr"] == 1e-4 and "bundle tiny" in card["init"]


def _bad_training_data(kind: str, folder) -> tuple:
    """A broken annotation file of `kind` and the words its one-line error must hold."""
    ann, _ = coco_from_labels(folder, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    coco = json.loads(ann.read_text())
    if kind == "not-json":
        ann.write_text("image,cells\nA1,12\n")
        return ann, ("not valid JSON",)
    if kind == "not-coco":
        ann.write_text(json.dumps({"cells": [1, 2]}))
        return ann, ("'images' and 'annotations'", "cells")
    if kind == "no-categories":
        del coco["categories"]
    elif kind == "unknown-category":
        coco["annotations"][3]["category_id"] = 7
    elif kind == "missing-image":
        (folder / "dsb_fluo.png").unlink()
    elif kind == "wrong-size":
        coco["images"][0]["height"] = coco["images"][0]["width"] = 300
        for a in coco["annotations"]:
            a["segmentation"] = [[10, 10, 40, 10, 40, 40]]
    elif kind == "box-only":
        del coco["annotations"][0]["segmentation"]
    elif kind == "no-cells":
        coco["annotations"] = []
    ann.write_text(json.dumps(coco))
    return ann, {"no-categories": ("'categories'",), "unknown-category": ("category ids [1]", "7"),
                 "missing-image": ("1 of 1 missing", "dsb_fluo.png"), "wrong-size": ("300 x 300", "256 x 256"),
                 "box-only": ("expected a mask", "box-only"),
                 "no-cells": ("expected annotated cells", "1 image(s) with none")}[kind]


@pytest.mark.parametrize("kind", ["not-json", "not-coco", "no-categories", "unknown-category", "missing-image",
                                  "wrong-size", "box-only", "no-cells"])
def test_cli_train_bad_annotations_give_one_line(tmp_path, kind):
    ann, words = _bad_training_data(kind, tmp_path)
    result = invoke(["train", "--data", ann, "--out", tmp_path / "b", "--steps", 1, "--device", "cpu"])
    assert_user_error(result, 1, *words)
    assert not (tmp_path / "b").exists()


def _train_lrs(monkeypatch, run) -> list[float]:
    """The learning rate of every optimiser step `run()` takes."""
    seen = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    try:
        run()
    finally:
        monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bf16_and_fp32_training_steps_give_finite_losses_of_one_order(tmp_path, precision):
    ann, _ = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    items, classes = load_coco(ann)
    losses = {}
    for p in ("fp32", precision):
        torch.manual_seed(0)
        out = tmp_path / f"bundle_{p}"
        if out.exists():
            continue
        train(items, classes, out, TrainSettings(steps=3, batch_size=2, crop=96, precision=p),
              model_cfg=tiny_model_config(), progress=False)
        losses[p] = np.loadtxt(out / "training_log.csv", delimiter=",", skiprows=1)[:, 1]
        assert np.isfinite(losses[p]).all()
        assert load_bundle(out).card["training"]["precision"].startswith(p)
    # the same seed, crops and weights: the first step's loss differs only by bf16 rounding
    assert losses[precision][0] == pytest.approx(losses["fp32"][0], rel=0.1)


@pytest.mark.slow
def test_auto_precision_falls_back_to_fp32_on_a_cpu_without_bf16(tmp_path, monkeypatch):
    import cellseg.detection.precision as precision
    from cellseg.detection import resolve_precision
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)   # a cap would turn the bf16 CPU below to fp32 too
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f"})     # a Xeon without bf16
    assert resolve_precision("auto", "cpu")[0] == "fp32"
    ann, _ = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    items, classes = load_coco(ann)
    train(items, classes, tmp_path / "b", TrainSettings(steps=1, batch_size=1, crop=64),
          model_cfg=tiny_model_config(), progress=False)
    assert load_bundle(tmp_path / "b").card["training"]["precision"].startswith("fp32: this CPU has no native")
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})   # a Zen 4/5
    assert resolve_precision("auto", "cpu")[0] == "bf16"
    assert resolve_precision("fp32", "cpu")[0] == "fp32"


def test_precision_flags_come_from_cpuinfo(tmp_path):
    from cellseg.detection import cpu_flags
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx512f avx512_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "sse", "avx512f", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


@pytest.mark.slow
def test_a_resumed_long_run_continues_its_step_count_schedule_and_snapshots(tmp_path, monkeypatch):
    ann, _ = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    items, classes = load_coco(ann)

    def settings(steps_this_run=None):
        return TrainSettings(steps=8, batch_size=1, crop=64, lr=1e-3, warmup=2, snapshot_every=3,
                             minutes=None if steps_this_run is None else 0)
    straight_snaps, split_snaps = [], []
    straight = _train_lrs(monkeypatch, lambda: train(
        items, classes, tmp_path / "a", settings(), model_cfg=tiny_model_config(), progress=False,
        on_snapshot=lambda path, step: straight_snaps.append(step)))
    # the same run stopped after 4 steps (a Ctrl-C or a session's end) and resumed
    import cellseg.training.loop as loop_module
    calls = {"n": 0}
    real_isfinite = torch.isfinite

    def interrupt_after_four(x):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return real_isfinite(x)
    monkeypatch.setattr(loop_module.torch, "isfinite", interrupt_after_four)
    from cellseg.errors import TrainingInterrupted
    with pytest.raises(TrainingInterrupted):
        _train_lrs(monkeypatch, lambda: train(
            items, classes, tmp_path / "b", settings(), model_cfg=tiny_model_config(), progress=False,
            on_snapshot=lambda path, step: split_snaps.append(step)))
    monkeypatch.setattr(loop_module.torch, "isfinite", real_isfinite)
    second = _train_lrs(monkeypatch, lambda: train(
        items, classes, tmp_path / "b", settings(), model_cfg=tiny_model_config(), resume=True, progress=False,
        on_snapshot=lambda path, step: split_snaps.append(step)))
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 8
    assert len(second) == 4 and second == pytest.approx(straight[4:])
    assert straight_snaps == split_snaps == [0, 3, 6]       # 0: the starting weights, the curve's first point
    assert load_bundle(tmp_path / "b" / "snapshots" / "step0000006").card["training"]["steps"] == 6
    assert load_bundle(tmp_path / "b" / "snapshots" / "step0000000").card["training"]["steps"] == 0


def test_the_schedule_warms_up_then_follows_steps_or_time_whichever_is_further():
    from cellseg.training import LoopSettings
    s = LoopSettings(steps=110, lr=1.0, warmup=10)
    assert [s.learning_rate(k, 0.0) for k in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert s.learning_rate(10, 0.0) == pytest.approx(1.0)
    assert s.learning_rate(60, 0.0) == pytest.approx(0.05 + 0.95 * 0.5)       # half way: the cosine's middle
    assert s.learning_rate(109, 0.0) > s.learning_rate(110, 0.0) == pytest.approx(0.05)
    timed = LoopSettings(steps=10_000, lr=1.0, warmup=10, schedule_minutes=1, final_lr_fraction=0.03)
    assert timed.learning_rate(20, 30.0) == pytest.approx(0.03 + 0.97 * 0.5)   # half the minute gone
    assert not timed.time_schedule_done(5, 120.0) and timed.time_schedule_done(20, 60.0)
    assert timed.finished(20, 60.0) and not timed.finished(20, 59.0)


@pytest.mark.slow
def test_a_checkpoint_of_the_first_format_resumes(tmp_path):
    """A checkpoint written before loss parts were named (and by the single-module trainer: the same keys) still
    resumes, and its log names the parts by position."""
    from cellseg.detection import build_model
    ann, _ = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    items, classes = load_coco(ann)
    out = tmp_path / "b"
    out.mkdir()
    torch.manual_seed(0)
    model = build_model(tiny_model_config())
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    n_parts = 5
    torch.save({"model": model.state_dict(), "optim": optim.state_dict(), "step": 2,
                "history": [[1, 3.0] + [0.6] * n_parts, [2, 2.9] + [0.58] * n_parts], "wall_s": 4.5},
               out / "checkpoint.pt")
    train(items, classes, out, TrainSettings(steps=3, batch_size=1, crop=64), model_cfg=tiny_model_config(),
          resume=True, progress=False)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3 and len(ckpt["history"]) == 3 and ckpt["wall_s"] > 4.5
    assert load_bundle(out).card["training"]["steps"] == 3
    assert (out / "training_log.csv").read_text().splitlines()[0].startswith("step,loss,loss_classifier")


def test_train_long_resumes_with_the_schedule_its_run_started_with(tmp_path):
    """scripts/train_long.sh: a new run keeps its learning rate, length, augmentation changes and split beside it,
    and a resume started without them (the next session's plain command) trains on that schedule and those images,
    not the defaults."""
    import os
    import shutil
    import subprocess
    import time
    script = Path(__file__).resolve().parents[2] / "scripts" / "train_long.sh"
    recorder = tmp_path / "python"      # stands in for the trainer: records its arguments
    recorder.write_text(f"#!/usr/bin/env bash\necho \"$*\" >> {tmp_path / 'calls'}\n")
    recorder.chmod(0o755)
    run = tmp_path / "long"

    def start(**env) -> tuple[str, list[str]]:
        before = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
        out = subprocess.run(["bash", str(script)], env={**os.environ, "RUN": str(run), "PYTHON": str(recorder),
                                                         **env}, capture_output=True, text=True, check=True).stdout
        for _ in range(100):            # the trainer runs in the background
            calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
            if len(calls) > len(before):
                return out, calls[-1].split()
            time.sleep(0.05)
        raise AssertionError(f"the trainer was not started: {out}")

    out, args = start(LR="2e-4", STEPS="1234", AUGMENT="invert_p=0.25", SPLIT="runs/branch_split.json",
                      BACKBONE="resnet34", ANCHORS="0.33,0.5,1,2,3", MIX="fluorescence=0.5,he_nuinsseg=0",
                      AVERAGE="0.999", BODY_LR="0.1", SNAPSHOT_EVERY="1000", KEEP_INIT_SETTINGS="1")
    assert args[args.index("--weight-average") + 1] == "0.999" and args[args.index("--snapshot-every") + 1] == "1000"
    assert "--keep-init-settings" in args
    assert args[args.index("--backbone-lr-scale") + 1] == "0.1"
    assert args[args.index("--aspect-ratios") + 1] == "0.33,0.5,1,2,3"
    assert args[args.index("--mix") + 1] == "fluorescence=0.5,he_nuinsseg=0"
    assert "starting" in out and args[args.index("--lr") + 1] == "2e-4" and args[args.index("--steps") + 1] == "1234"
    assert "--resume" not in args and args[args.index("--augment") + 1] == "invert_p=0.25"
    assert args[args.index("--split") + 1] == "runs/branch_split.json"
    assert args[args.index("--backbone") + 1] == "resnet34"
    run.mkdir(exist_ok=True)
    (run / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "long.pid").unlink()    # the next session: the last one's processes are gone
    out, args = start()
    assert "resuming" in out and "--resume" in args
    assert args[args.index("--lr") + 1] == "2e-4" and args[args.index("--steps") + 1] == "1234"
    assert args[args.index("--augment") + 1] == "invert_p=0.25"
    assert args[args.index("--backbone") + 1] == "resnet34"    # the network the run started with
    assert args[args.index("--aspect-ratios") + 1] == "0.33,0.5,1,2,3"
    assert args[args.index("--mix") + 1] == "fluorescence=0.5,he_nuinsseg=0"     # the draw shares it started with
    assert args[args.index("--weight-average") + 1] == "0.999"     # and its moving average of the weights
    assert args[args.index("--backbone-lr-scale") + 1] == "0.1"    # and its body's share of the rate
    assert args[args.index("--snapshot-every") + 1] == "1000"      # and its held-out curve's interval
    assert "--keep-init-settings" in args                          # and its start's thresholds and count size
    assert "--split" not in args    # the run's own split.json, not whatever the shipped bundle's is now
    # a run started before AUGMENT and SPLIT were kept: none and its own split, even with them in the environment
    (tmp_path / "long.settings").write_text("LR=2e-4\nSTEPS=1234\n")
    (tmp_path / "long.pid").unlink()
    out, args = start(AUGMENT="gray_p=0", SPLIT="other.json", BACKBONE="resnet50", MIX="fluorescence=1",
                      AVERAGE="0.99", BODY_LR="0.5", SNAPSHOT_EVERY="2000")
    assert "--resume" in args and "--augment" not in args and "--split" not in args and "--backbone" not in args
    assert args[args.index("--snapshot-every") + 1] == "2000"      # none kept: the environment's
    assert "--aspect-ratios" not in args and "--mix" not in args and "--weight-average" not in args
    assert "--backbone-lr-scale" not in args and "--keep-init-settings" not in args
    # a new run without SPLIT holds out what the v4 split holds out (the v3 bundle's, with Kromp and NuInsSeg)
    shutil.rmtree(run)
    (tmp_path / "long.settings").unlink()
    (tmp_path / "long.pid").unlink()
    out, args = start()
    assert "starting" in out and args[args.index("--split") + 1] == "references/nuclei/splits/v4.json"
    init = args[args.index("--init") + 1]      # the newest committed candidate, else the shipped bundle
    assert init == "cellseg/models/nuclei" or init.startswith("references/nuclei/candidates/")
    # runs/ gone, a candidate kept from a branch: the new run goes on with the branch's settings, unless told others
    candidate = tmp_path / "candidate"
    candidate.mkdir()
    (candidate / "run.settings").write_text("LR=3e-5\nSTEPS=777\nAUGMENT=paste_p=0.5,aspect_p=0.3\nSPLIT=b.json\n"
                                            "AVERAGE=0.998\nBODY_LR=0.2\n")
    for env, lr, augment in (({}, "3e-5", "paste_p=0.5,aspect_p=0.3"), ({"LR": "1e-5", "AUGMENT": "gray_p=0"}, "1e-5",
                                                                         "gray_p=0")):
        shutil.rmtree(run, ignore_errors=True)
        (tmp_path / "long.settings").unlink()
        (tmp_path / "long.pid").unlink()
        out, args = start(INIT=str(candidate), **env)
        assert "starting" in out and args[args.index("--init") + 1] == str(candidate) and "--backbone" not in args
        assert args[args.index("--lr") + 1] == lr and args[args.index("--steps") + 1] == "777"
        assert args[args.index("--augment") + 1] == augment and args[args.index("--split") + 1] == "b.json"
        assert args[args.index("--weight-average") + 1] == "0.998"
        assert args[args.index("--backbone-lr-scale") + 1] == "0.2"
    # the session ended before the run's first checkpoint (only its step-0 scoring there): the plain command starts
    # it again as it was started, not from the newest candidate with that candidate's settings
    (run / "snapshots").mkdir(parents=True)
    (tmp_path / "long.pid").unlink()
    out, args = start()
    assert "restarting" in out and "--resume" not in args and args[args.index("--init") + 1] == str(candidate)
    assert args[args.index("--lr") + 1] == "1e-5" and args[args.index("--augment") + 1] == "gray_p=0"
    assert (tmp_path / "long.before-checkpoint" / "snapshots").is_dir() and not run.exists()


def test_train_long_pause_freezes_the_trainer_and_its_scoring_child(tmp_path):
    """scripts/train_long.sh pause stops the trainer and the held-out scoring it started (a child process), so a
    benchmark is not timed beside either; resume lets both go on."""
    import os
    import subprocess
    import time
    script = Path(__file__).resolve().parents[2] / "scripts" / "train_long.sh"
    trainer = tmp_path / "python"       # stands in for the trainer: a child that keeps running (the scoring)
    trainer.write_text(f"#!/usr/bin/env bash\nsleep 60 &\necho $! > {tmp_path / 'child'}\nwait\n")
    trainer.chmod(0o755)
    env = {**os.environ, "RUN": str(tmp_path / "long"), "PYTHON": str(trainer)}

    def call(*args: str) -> str:
        return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True,
                              check=True).stdout

    def state(pid: str) -> str:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]

    call()
    for _ in range(100):
        if (tmp_path / "child").exists() and (tmp_path / "child").read_text().strip():
            break
        time.sleep(0.05)
    pids = [(tmp_path / "long.pid").read_text().strip(), (tmp_path / "child").read_text().strip()]
    try:
        assert "paused" in call("pause")
        assert [state(p) for p in pids] == ["T", "T"]
        assert "resumed" in call("resume")
        assert all(state(p) != "T" for p in pids)
    finally:
        for p in pids:
            subprocess.run(["kill", "-CONT", p]), subprocess.run(["kill", "-KILL", p])


def test_a_training_step_with_roialign_as_matrices_is_torchvisions_step():
    """prepare_for_training pools with detection/roi_align.py on a CPU: the same losses and, through its gathers and
    products, the same gradients as torchvision's kernel."""
    from torchvision.ops import MultiScaleRoIAlign

    from cellseg.detection import MatrixMultiScaleRoIAlign, build_model
    from cellseg.training import prepare_for_training

    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 96, generator=g) for _ in range(2)]
    targets = []
    for _ in images:
        corners = torch.randint(0, 70, (5, 2), generator=g).float()
        boxes = torch.cat([corners, corners + 8 + torch.randint(0, 16, (5, 2), generator=g)], 1)
        masks = torch.zeros(5, 96, 96, dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[k, y0:y1, x0:x1] = 1
        targets.append({"boxes": boxes, "labels": torch.ones(5, dtype=torch.int64), "masks": masks})
    results = []
    for matrix in (False, True):
        torch.manual_seed(0)
        model, _, _ = prepare_for_training(build_model(tiny_model_config()), torch.device("cpu"), "fp32",
                                           matrix_roi_align=matrix)
        pooler = MatrixMultiScaleRoIAlign if matrix else MultiScaleRoIAlign
        assert type(model.roi_heads.box_roi_pool) is pooler and type(model.roi_heads.mask_roi_pool) is pooler
        torch.manual_seed(1)     # the proposal and RoI samplers draw at random
        losses = model([i.clone() for i in images], [dict(t) for t in targets])
        total = sum(losses.values())
        total.backward()
        results.append((float(total.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss_tv, grads_tv), (loss_matrix, grads_matrix) = results
    assert loss_matrix == pytest.approx(loss_tv, rel=1e-5)
    assert len(grads_tv) == len(grads_matrix) > 0
    for want, got in zip(grads_tv, grads_matrix):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


def test_a_deeper_backbone_started_from_a_bundle_computes_the_bundles_function(tmp_path, tiny_bundle):
    """--init BUNDLE with a deeper backbone (ResNet-34 from a ResNet-18 bundle): the blocks the bundle has are its
    own, the new ones start as the identity, so the deeper network's features and detections are the bundle's; the
    card says where it started."""
    import dataclasses

    import torch

    from cellseg.bundles import load_bundle
    from cellseg.detection import build_model
    from cellseg.training.warm_start import deepen_as_identity, load_matching
    bundle = load_bundle(tiny_bundle)
    torch.manual_seed(1)
    shallow = build_model(bundle.model)
    shallow.load_state_dict(bundle.state_dict())
    for name, p in shallow.named_parameters():       # norms away from their init (1, 0): a trained network's
        if "bn" in name:
            p.data.uniform_(0.5, 1.5)
    deep = build_model(dataclasses.replace(bundle.model, backbone="resnet34"))
    fresh = load_matching(deep, shallow.state_dict())
    new = deepen_as_identity(deep, fresh)
    assert new == ["layer1.2", "layer2.2", "layer2.3", "layer3.2", "layer3.3", "layer3.4", "layer3.5", "layer4.2"]
    assert all(".layer" in n and any(n.startswith(f"backbone.body.{b}.") for b in new) for n in fresh)
    shallow.eval(), deep.eval()
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        a, b = shallow.backbone(x), deep.backbone(x)
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
        da, db = shallow([x[0]])[0], deep([x[0]])[0]
    assert torch.equal(da["boxes"], db["boxes"]) or torch.allclose(da["boxes"], db["boxes"], atol=1e-3)

    from cellseg.training import TrainSettings, train
    from cellseg.training.data import train_image_from_labels
    yy, xx = np.mgrid[:64, :64]
    labels = ((yy - 30) ** 2 + (xx - 30) ** 2 < 64).astype(np.int32)
    item = train_image_from_labels(np.where(labels > 0, 200, 20).astype(np.uint8)[..., None], labels)
    out = train([item], ["nucleus"], tmp_path / "deep", TrainSettings(steps=1, batch_size=1, crop=64, warmup=1),
                model_cfg=dataclasses.replace(bundle.model, backbone="resnet34"), init=str(tiny_bundle),
                progress=False)
    trained = load_bundle(out)
    assert trained.model.backbone == "resnet34"
    assert "deepened to resnet34" in trained.card["training"]["init"]


def test_anchor_ratios_widened_from_a_bundle_start_as_its_nearest_old_ones(tmp_path, tiny_bundle):
    """--aspect-ratios 0.33,0.5,1,2,3 from a bundle with 0.5,1,2: the RPN's objectness and box deltas for each new
    ratio are those of its nearest old one (3:1 from 2:1), the old ratios' are unchanged, and the card says so."""
    import dataclasses

    import torch

    from cellseg.bundles import load_bundle
    from cellseg.detection import build_model
    from cellseg.errors import CellsegError
    from cellseg.training.warm_start import load_matching, widen_anchor_ratios
    bundle = load_bundle(tiny_bundle)
    assert tuple(bundle.model.aspect_ratios) == (0.5, 1.0, 2.0)
    ratios = (0.33, 0.5, 1.0, 2.0, 3.0)
    wide = build_model(dataclasses.replace(bundle.model, aspect_ratios=ratios))
    assert load_matching(wide, widen_anchor_ratios(bundle.state_dict(), (0.5, 1.0, 2.0), ratios)) == []
    narrow = build_model(bundle.model)
    narrow.load_state_dict(bundle.state_dict())
    features = [torch.rand(1, bundle.model.fpn_channels, 12, 12)]
    with torch.no_grad():
        (old_logits,), (old_deltas,) = narrow.rpn.head(features)
        (new_logits,), (new_deltas,) = wide.rpn.head(features)
    for new, old in enumerate([0, 0, 1, 2, 2]):
        assert torch.allclose(new_logits[:, new], old_logits[:, old], atol=1e-6)
        assert torch.allclose(new_deltas[:, 4 * new:4 * new + 4], old_deltas[:, 4 * old:4 * old + 4], atol=1e-6)
    with pytest.raises(CellsegError, match="outputs for the anchor ratios"):
        widen_anchor_ratios(bundle.state_dict(), (0.5, 1.0), ratios)

    from cellseg.training import TrainSettings, train
    from cellseg.training.data import train_image_from_labels
    yy, xx = np.mgrid[:64, :64]
    labels = ((yy - 30) ** 2 + (xx - 30) ** 2 < 64).astype(np.int32)
    item = train_image_from_labels(np.where(labels > 0, 200, 20).astype(np.uint8)[..., None], labels)
    out = train([item], ["nucleus"], tmp_path / "wide", TrainSettings(steps=1, batch_size=1, crop=64, warmup=1),
                model_cfg=dataclasses.replace(bundle.model, aspect_ratios=ratios), init=str(tiny_bundle),
                progress=False)
    trained = load_bundle(out)
    assert tuple(trained.model.aspect_ratios) == ratios
    assert "anchor ratios 0.5/1/2 -> 0.33/0.5/1/2/3" in trained.card["training"]["init"]


@pytest.mark.slow
def test_a_committed_candidate_counts_and_a_run_from_it_continues_its_lineage(tmp_path, tiny_bundle):
    """references/nuclei/make_candidate: a trained bundle kept as a candidate (float16 weights, model.toml, card) is a
    bundle `cellseg count --model` counts with, and a training started from it (what train_long.sh does when runs/
    is gone) names it and its own stages in the card."""
    from click.testing import CliRunner

    from cellseg.bundles import save_bundle
    from cellseg.cli import main
    from cellseg.errors import CellsegError
    from references.nuclei.make_candidate import make_candidate
    start = load_bundle(tiny_bundle)
    trained = tmp_path / "runs" / "best"
    save_bundle(trained, start.model, start.state_dict(), name="best", nucleus_diameter_px=12.0, score_threshold=0.0,
                card={"training": {"init": "bundle tiny", "steps": 9}, "earlier_stages": [{"bundle": "v3", "steps": 5}]})
    (tmp_path / "runs" / "heldout.csv").write_text("step,all\n0,0.5\n")
    (tmp_path / "runs.settings").write_text("LR=5e-5\nSTEPS=40000\nAUGMENT=paste_p=0.5\nSPLIT=s.json\nBACKBONE=resnet34\n")
    root = tmp_path / "candidates"
    candidate = make_candidate(trained, "v4-cpu", tmp_path / "runs", root=root)
    assert sorted(p.name for p in candidate.iterdir()) == ["README.md", "heldout.csv", "model.toml", "run.settings",
                                                            "weights.safetensors"]
    # the run's schedule and data go with it, not its BACKBONE: the candidate is already that network
    assert (candidate / "run.settings").read_text() == "LR=5e-5\nSTEPS=40000\nAUGMENT=paste_p=0.5\nSPLIT=s.json\n"
    assert "| step | all |" in (candidate / "README.md").read_text()     # its held-out curve in the card
    assert "| 0 | 0.5 |" in (candidate / "README.md").read_text()
    assert load_bundle(candidate).weights_sha256 == load_bundle(trained).weights_sha256
    with pytest.raises(CellsegError, match="expected a new candidate name"):
        make_candidate(trained, "v4-cpu", root=root)
    result = CliRunner().invoke(main, ["count", str(DATA / "dsb_fluo.png"), "--model", str(candidate),
                                       "--output", str(tmp_path / "counted")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "counted" / "cells.csv").is_file()

    ann, _ = coco_from_labels(tmp_path, DATA / "dsb_fluo.png", DATA / "dsb_fluo_labels.tif")
    items, classes = load_coco(ann)
    out = train(items, classes, tmp_path / "resumed", TrainSettings(steps=1, batch_size=1, crop=64),
                init=str(candidate), progress=False)
    card = load_bundle(out).card
    assert [s["bundle"] for s in card["earlier_stages"]] == ["v3", "best"]
    assert card["earlier_stages"][1]["weights_sha256"] == load_bundle(candidate).weights_sha256


def test_a_candidate_gets_its_scale_in_microns_from_its_tnbc_training_patients(tmp_path, tiny_bundle):
    """make_candidate writes [scale.brightfield] (micron_scale.py) from the labels of the split's H&E training
    patients at 0.25 µm/px; the held-out patients do not count, and without the data there is no scale."""
    import json

    import tifffile

    from cellseg.bundles import save_bundle
    from references.nuclei.make_candidate import make_candidate
    start = load_bundle(tiny_bundle)
    trained = tmp_path / "best"
    save_bundle(trained, start.model, start.state_dict(), name="best", nucleus_diameter_px=12.0, score_threshold=0.0)
    groups = {"tnbc/patient-01": {"modality": "he_breast", "side": "train", "images": ["tnbc/a"]},
              "tnbc/patient-02": {"modality": "he_breast", "side": "val", "images": ["tnbc/b"]}}
    (trained / "split.json").write_text(json.dumps({"method": "test", "train": [], "val": [], "groups": groups}))
    labels = tmp_path / "data" / "tnbc-train" / "labels"
    labels.mkdir(parents=True)
    a = np.zeros((64, 64), np.uint16)
    a[10:20, 10:20], a[30:40, 30:40], a[50:60, 5:15] = 1, 2, 3       # three nuclei of 100 px
    tifffile.imwrite(labels / "a.tif", a)
    tifffile.imwrite(labels / "b.tif", np.ones((64, 64), np.uint16))    # held out: not counted
    candidate = make_candidate(trained, "scaled", root=tmp_path / "candidates", data_root=tmp_path / "data")
    scale = load_bundle(candidate).micron_scale("brightfield")
    assert scale.mpp == 0.25 and scale.nucleus_diameter_px == pytest.approx(2 * np.sqrt(100 / np.pi))
    bare = make_candidate(trained, "bare", root=tmp_path / "candidates", data_root=tmp_path / "nowhere")
    assert load_bundle(bare).micron_scale("brightfield") is None


def test_the_bundles_nucleus_size_weighs_each_image_by_how_often_it_is_drawn():
    """median_diameter_px: an image of many large nuclei drawn seldom does not set the size counts aim at (v4:
    NuInsSeg's ~23,000 nuclei of ~33 px made the pooled median 25.6 px); all images alike, it is np.median's."""
    from cellseg.training.data import TrainImage, median_diameter_px

    def image(diameter: int, n: int) -> TrainImage:
        yy, xx = np.mgrid[:diameter, :diameter]
        disc = (yy - (diameter - 1) / 2) ** 2 + (xx - (diameter - 1) / 2) ** 2 <= (diameter / 2) ** 2
        return TrainImage(np.zeros((3, 8, 8), np.float32), np.zeros((n, 4), np.int64), [disc] * n, np.ones(n, np.int64))
    big, small = image(33, 100), image(20, 10)
    assert median_diameter_px([big, small], np.array([0.1, 0.9])) == pytest.approx(20, rel=0.05)
    assert median_diameter_px([big, small], np.array([100.0, 10.0])) == pytest.approx(33, rel=0.05)   # pooled
    one = [image(d, 1) for d in (10, 12, 14, 30)]
    diameters = [2 * np.sqrt(i.masks[0].sum() / np.pi) for i in one]
    assert median_diameter_px(one) == pytest.approx(np.median(diameters))
