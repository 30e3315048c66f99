"""Model bundles: model.toml + float16 safetensors weights; saved and loaded without pickle, every broken
bundle is a BundleError."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import tomllib
import torch

from cellseg.bundles import (
    BUNDLE_FORMAT,
    Bundle,
    find_bundle,
    load_bundle,
    packaged_bundles_root,
    save_bundle,
    shipped_bundle_names,
)
from cellseg.detection import build_model, load_network
from cellseg.errors import BundleError

from ..helpers import tiny_model_config

CARD = {"training": {"data": "DSB2018 stage 1 (CC0)", "steps": 3}, "metrics": {"ap50": 0.12}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(config, original float32 state dict, bundle folder) of a seeded tiny model."""
    torch.manual_seed(1)
    cfg = tiny_model_config()
    state = {k: v.clone() for k, v in build_model(cfg).state_dict().items()}
    folder = tmp_path_factory.mktemp("bundles") / "tiny"
    save_bundle(folder, cfg, state, name="tiny-test", score_threshold=0.3, mask_threshold=0.45,
                nucleus_diameter_px=12.5, card=CARD)
    return cfg, state, folder


@pytest.fixture
def bundle_copy(saved, tmp_path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(saved[2], folder)
    return folder


def edit_toml(folder: Path, change) -> None:
    path = folder / "model.toml"
    meta = tomllib.loads(path.read_text(encoding="utf-8"))
    change(meta)
    path.write_text(tomli_w.dumps(meta), encoding="utf-8")


# --- round trip ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_round_trip_keeps_config_and_card(saved):
    cfg, _, folder = saved
    bundle = load_bundle(folder)
    assert isinstance(bundle, Bundle)
    assert bundle.model == cfg
    assert bundle.name == "tiny-test"
    assert (bundle.score_threshold, bundle.mask_threshold, bundle.nucleus_diameter_px) == (0.3, 0.45, 12.5)
    assert bundle.card["training"] == CARD["training"] and bundle.card["metrics"] == CARD["metrics"]
    assert bundle.path == folder
    assert sorted(p.name for p in folder.iterdir()) == ["model.toml", "weights.safetensors"]  # no temp files


def test_roi_sampling_ratio_reaches_both_poolers_and_defaults_to_torchvisions():
    """[model] roi_sampling_ratio sets RoIAlign's samples per bin in the box and the mask pooler; a bundle written
    before the key existed keeps torchvision's 2 (what it was trained with)."""
    from cellseg.bundles import ModelConfig
    cfg = tiny_model_config()
    assert ModelConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "roi_sampling_ratio"}) == cfg
    heads = build_model(dataclasses.replace(cfg, roi_sampling_ratio=1)).roi_heads
    assert heads.box_roi_pool.sampling_ratio == heads.mask_roi_pool.sampling_ratio == 1
    assert build_model(cfg).roi_heads.mask_roi_pool.sampling_ratio == 2


def test_round_trip_state_dict_within_float16_precision(saved):
    _, state, folder = saved
    loaded = load_bundle(folder).state_dict()
    assert set(loaded) == set(state)
    keys = sorted(state)
    assert [loaded[k].shape for k in keys] == [state[k].shape for k in keys]
    floats = [k for k in keys if state[k].is_floating_point()]
    assert {loaded[k].dtype for k in floats} == {torch.float32}
    for k in keys:
        if k not in floats:
            assert torch.equal(loaded[k], state[k]), k
    got = torch.cat([loaded[k].flatten() for k in floats])
    original = torch.cat([state[k].flatten() for k in floats])
    assert torch.equal(got, original.half().float())  # exactly the float16 rounding, nothing else
    torch.testing.assert_close(got, original, rtol=1e-3, atol=1e-5)
    assert got.abs().sum() > 0


def test_weights_file_is_float16_safetensors(saved):
    from safetensors import safe_open
    _, state, folder = saved
    weights = folder / "weights.safetensors"
    raw = weights.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 header size, then a JSON header
    header = json.loads(raw[8:8 + header_len])
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert set(tensors) == set(state)
    assert {v["dtype"] for k, v in tensors.items() if state[k].is_floating_point()} == {"F16"}
    with safe_open(str(weights), framework="pt") as f:
        assert set(f.keys()) == set(state)


def test_model_toml_records_format_and_sha(saved):
    cfg, _, folder = saved
    meta = tomllib.loads((folder / "model.toml").read_text(encoding="utf-8"))
    assert meta["format"] == BUNDLE_FORMAT
    assert meta["weights_sha256"] == hashlib.sha256((folder / "weights.safetensors").read_bytes()).hexdigest()
    assert meta["model"] == cfg.to_dict()
    assert meta["inference"] == {"score_threshold": 0.3, "mask_threshold": 0.45, "proposal_threshold": 0.0}
    assert load_bundle(folder).weights_sha256 == meta["weights_sha256"]


def test_weights_load_without_pickle(saved, monkeypatch):
    """Neither torch.load nor pickle may be used: weights are data, never code."""
    _, _, folder = saved

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling is not allowed for model weights")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    bundle = load_bundle(folder)
    net = load_network(bundle)
    assert not net.training  # built for inference
    expected, got = bundle.state_dict(), net.state_dict()
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key].to(got[key].dtype)), key
    assert not (folder / "weights.safetensors").read_bytes().startswith((b"PK", b"\x80"))  # zip / pickle


def test_saved_files_are_readable_by_others(tmp_path):
    """A bundle written by `cellseg train` into a shared folder must be readable by colleagues (umask 022)."""
    old = os.umask(0o022)
    try:
        save_bundle(tmp_path / "b", tiny_model_config(), {"w": torch.ones(3)}, name="b")
    finally:
        os.umask(old)
    for name in ("model.toml", "weights.safetensors"):
        assert (tmp_path / "b" / name).stat().st_mode & 0o777 == 0o644, name


def test_resave_replaces_the_bundle(saved, bundle_copy):
    cfg, state, _ = saved
    folder = bundle_copy
    zeroed = {k: torch.zeros_like(v) for k, v in state.items()}
    bundle = save_bundle(folder, cfg, zeroed, name="second")
    assert bundle.name == "second"
    assert all(v.abs().sum() == 0 for v in load_bundle(folder).state_dict().values())
    assert sorted(p.name for p in folder.iterdir()) == ["model.toml", "weights.safetensors"]


# --- broken bundles ------------------------------------------------------------------------------------

def test_tampered_weights(bundle_copy):
    weights = bundle_copy / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match the sha256") as info:
        load_bundle(bundle_copy)
    assert "weights.safetensors" in str(info.value)


def test_replaced_weights_file(bundle_copy):
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2, dtype=torch.float16)}, str(bundle_copy / "weights.safetensors"))
    with pytest.raises(BundleError, match="corrupt or replaced"):
        load_bundle(bundle_copy)


def test_missing_folder(tmp_path):
    with pytest.raises(BundleError, match="no bundle") as info:
        load_bundle(tmp_path / "nonexistent")
    assert str(tmp_path / "nonexistent") in str(info.value)


def test_missing_model_toml(bundle_copy):
    (bundle_copy / "model.toml").unlink()
    with pytest.raises(BundleError, match="model.toml"):
        load_bundle(bundle_copy)


def test_missing_weights(bundle_copy):
    (bundle_copy / "weights.safetensors").unlink()
    with pytest.raises(BundleError, match="expected weights at .*weights.safetensors"):
        load_bundle(bundle_copy)


def test_bad_toml(bundle_copy):
    (bundle_copy / "model.toml").write_text('format = "cellseg-bundle/1"\nname = \n', encoding="utf-8")
    with pytest.raises(BundleError, match="not valid TOML"):
        load_bundle(bundle_copy)


def test_unknown_model_key(bundle_copy):
    edit_toml(bundle_copy, lambda m: m["model"].update(backbone_depth=50))
    with pytest.raises(BundleError, match="backbone_depth"):
        load_bundle(bundle_copy)


def test_wrong_format(bundle_copy):
    edit_toml(bundle_copy, lambda m: m.update(format="someone-else/3"))
    with pytest.raises(BundleError, match="someone-else/3"):
        load_bundle(bundle_copy)


def test_table_given_as_value(bundle_copy):
    edit_toml(bundle_copy, lambda m: m.update(inference=0.5))
    with pytest.raises(BundleError, match="invalid model.toml"):
        load_bundle(bundle_copy)


def test_garbage_weights_without_recorded_sha(bundle_copy):
    edit_toml(bundle_copy, lambda m: m.pop("weights_sha256"))
    (bundle_copy / "weights.safetensors").write_bytes(b"\x00" * 64)
    bundle = load_bundle(bundle_copy)  # nothing to compare the file with yet
    with pytest.raises(BundleError, match="expected safetensors weights"):
        bundle.state_dict()


def test_weights_for_another_architecture(bundle_copy):
    edit_toml(bundle_copy, lambda m: m["model"].update(fpn_channels=16))
    bundle = load_bundle(bundle_copy)
    with pytest.raises(BundleError, match="do not match the architecture"):
        load_network(bundle)


@pytest.mark.parametrize("value", ["big", -4])
def test_unbuildable_model_settings(bundle_copy, value):
    edit_toml(bundle_copy, lambda m: m["model"].update(fpn_channels=value))
    bundle = load_bundle(bundle_copy)
    with pytest.raises(BundleError, match="expected a buildable network"):
        load_network(bundle)


def test_unknown_shipped_name():
    with pytest.raises(BundleError, match=r"expected a model bundle folder or a shipped bundle name, got "
                                          r"'no-such-bundle' \(shipped bundles: nuclei; train one with"):
        find_bundle("no-such-bundle")


def test_one_lookup_for_every_kind_of_bundle(tmp_path):
    """Cell models and tissue U-Nets are found by one find_bundle: a shipped name of the kind (None: its default),
    or a path taken as given, whatever the kind."""
    from cellseg.tissue.unet import TISSUE_BUNDLE
    assert find_bundle(None) == packaged_bundles_root() / "nuclei"
    assert find_bundle(None, TISSUE_BUNDLE) == packaged_bundles_root() / "tissue"
    assert shipped_bundle_names() == ["nuclei"] and shipped_bundle_names(TISSUE_BUNDLE) == ["tissue"]
    assert find_bundle(tmp_path / "nowhere", TISSUE_BUNDLE) == tmp_path / "nowhere"   # read_bundle_folder refuses it
    assert find_bundle("elsewhere/nuclei") == Path("elsewhere/nuclei")   # a path, though it ends in a shipped name
    with pytest.raises(BundleError, match=r"expected a tissue bundle folder .* got 'nuclei-typo' \(shipped bundles: "
                                          r"tissue;"):
        find_bundle("nuclei-typo", TISSUE_BUNDLE)


def test_find_bundle_accepts_folder_or_its_model_toml(saved):
    folder = saved[2]
    assert find_bundle(folder) == folder
    assert find_bundle(folder / "model.toml") == folder


# --- thresholds per modality ------------------------------------------------------------------------------

@pytest.mark.slow
def test_score_thresholds_per_modality_reach_the_detector(bundle_copy):
    """A protocol without its own threshold runs at its modality's tuned threshold (TTA's own when asked), else
    the bundle's default; the protocol's explicit threshold wins."""
    from cellseg.bundles import update_bundle_metadata
    from cellseg.planning import load_protocol
    from cellseg.run import CellCounter
    update_bundle_metadata(bundle_copy, score_thresholds={"fluorescence": 0.65, "brightfield": 0.8,
                                                          "brightfield_gray": 0.95},
                           tta_score_thresholds={"brightfield": 0.55})
    bundle = load_bundle(bundle_copy)
    assert bundle.threshold_for("fluorescence") == 0.65 and bundle.threshold_for("brightfield") == 0.8
    assert bundle.threshold_for("brightfield", gray=True) == 0.95
    assert bundle.threshold_for("fluorescence", gray=True) == 0.65    # no gray threshold: the modality's
    assert bundle.threshold_for("brightfield", tta=True) == 0.55
    assert bundle.threshold_for("brightfield", tta=True, gray=True) == 0.55   # TTA's, not the plain gray one
    assert bundle.threshold_for("fluorescence", tta=True) == 0.65     # no TTA threshold: the plain one
    assert bundle.threshold_for("other") == 0.3                       # the bundle's default
    window = [np.zeros((3, 64, 64), np.float32)]
    for name, colour, gray in (("fluorescence-nuclei", 0.65, 0.65), ("he-nuclei", 0.8, 0.95)):
        protocol = load_protocol(name).replace(model=str(bundle_copy))
        detector = CellCounter.load(protocol, "cpu").detector
        assert detector.score_threshold == colour and detector.calibrated(window).score_threshold == colour
        assert detector.calibrated(window, gray=True).score_threshold == gray
        chosen = CellCounter.load(protocol.replace(score_threshold=0.42), "cpu").detector   # the protocol's wins
        assert chosen.calibrated(window).score_threshold == chosen.calibrated(window, gray=True).score_threshold == 0.42
    protocol = load_protocol("he-nuclei").replace(model=str(bundle_copy))
    augmented = CellCounter.load(protocol, "cpu", tta=True).detector
    assert augmented.calibrated(window, gray=True).score_threshold == augmented.score_threshold == 0.55
    update_bundle_metadata(bundle_copy, tta_score_thresholds={"brightfield": 0.55, "brightfield_gray": 0.7})
    augmented = CellCounter.load(protocol, "cpu", tta=True).detector
    assert augmented.calibrated(window, gray=True).score_threshold == 0.7
    assert augmented.calibrated(window).score_threshold == 0.55 and augmented.inner.score_threshold == 0.3


def test_mask_thresholds_per_modality_reach_the_detector_and_run_json(bundle_copy):
    """A protocol without its own mask threshold counts at its modality's, else the bundle's default; the protocol's
    wins; an empty table removes it."""
    from cellseg.bundles import update_bundle_metadata
    from cellseg.planning import load_protocol
    from cellseg.run import CellCounter
    update_bundle_metadata(bundle_copy, mask_thresholds={"fluorescence": 0.6})
    bundle = load_bundle(bundle_copy)
    assert (bundle.mask_threshold_for("fluorescence"), bundle.mask_threshold_for("brightfield")) == (0.6, 0.45)
    for name, expected in (("fluorescence-nuclei", 0.6), ("he-nuclei", 0.45)):
        protocol = load_protocol(name).replace(model=str(bundle_copy))
        counter = CellCounter.load(protocol, "cpu")
        assert counter.detector.mask_threshold == counter.run_info.model["mask_threshold"] == expected
        assert CellCounter.load(protocol.replace(mask_threshold=0.3), "cpu").detector.mask_threshold == 0.3
    update_bundle_metadata(bundle_copy, mask_thresholds={})
    assert load_bundle(bundle_copy).mask_thresholds == {}
    assert "mask_threshold_by_modality" not in tomllib.loads((bundle_copy / "model.toml").read_text())["inference"]


def test_bad_mask_threshold_table_is_one_line(bundle_copy):
    edit_toml(bundle_copy, lambda m: m["inference"].update(mask_threshold_by_modality={"brightfield": -0.1}))
    with pytest.raises(BundleError, match=r"mask probability threshold between 0 and 1 for 'brightfield'"):
        load_bundle(bundle_copy)


def test_bad_threshold_table_is_one_line(bundle_copy):
    edit_toml(bundle_copy, lambda m: m["inference"].update(score_threshold_by_modality={"fluorescence": 1.5}))
    with pytest.raises(BundleError, match=r"between 0 and 1 for 'fluorescence'.*score_threshold_by_modality"):
        load_bundle(bundle_copy)


@pytest.mark.slow
def test_interpolated_weights_are_the_weighted_mean_and_the_card_keeps_every_stage(tmp_path):
    from cellseg.bundles import interpolate_bundles
    cfg = tiny_model_config()
    torch.manual_seed(1)
    start = save_bundle(tmp_path / "start", cfg, build_model(cfg).state_dict(), name="start",
                        card={"training": {"steps": 10}})
    torch.manual_seed(2)
    tuned = save_bundle(tmp_path / "tuned", cfg, build_model(cfg).state_dict(), name="tuned",
                        card={"training": {"steps": 5, "init": "bundle start"},
                              "earlier_stages": [{"bundle": "start", "steps": 10}]})
    (tuned.path / "split.json").write_text("{}")
    mixed = interpolate_bundles(start.path, tuned.path, 0.25, tmp_path / "mixed", name="mixed", reproduce="cmd")
    a, b, m = start.state_dict(), tuned.state_dict(), mixed.state_dict()
    key = next(k for k in a if a[k].is_floating_point() and not torch.equal(a[k], b[k]))
    # float16 storage: the mean of the float16 weights, rounded to float16 once more
    assert torch.allclose(m[key], (0.75 * a[key] + 0.25 * b[key]).half().float())
    assert [s["steps"] for s in mixed.card["earlier_stages"]] == [10, 5]
    assert mixed.card["training"]["interpolation"]["alpha"] == 0.25 and (mixed.path / "split.json").is_file()
    assert load_bundle(mixed.path).weights_sha256 == mixed.weights_sha256
    with pytest.raises(BundleError, match="new or empty folder"):
        interpolate_bundles(start.path, tuned.path, 0.5, tmp_path / "mixed", name="again")
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(BundleError, match="being a file"):
        interpolate_bundles(start.path, tuned.path, 0.5, tmp_path / "a_file", name="file")
    assert (tmp_path / "a_file").read_text() == "mine"
    with pytest.raises(BundleError, match="between 0 and 1"):
        interpolate_bundles(start.path, tuned.path, 1.5, tmp_path / "other", name="other")
    other_cfg = dataclasses.replace(cfg, fpn_channels=cfg.fpn_channels * 2)
    other = save_bundle(tmp_path / "wide", other_cfg, build_model(other_cfg).state_dict(), name="wide")
    with pytest.raises(BundleError, match="one architecture"):
        interpolate_bundles(start.path, other.path, 0.5, tmp_path / "other", name="other")



@pytest.mark.slow
def test_a_soup_is_the_mean_of_its_bundles_and_its_card_names_each(tmp_path):
    from cellseg.bundles import average_bundles
    from references.nuclei.model_card import _recipe
    cfg = tiny_model_config()
    made = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        made.append(save_bundle(tmp_path / f"b{seed}", cfg, build_model(cfg).state_dict(), name=f"b{seed}",
                                card={"training": {"steps": seed}, "earlier_stages": [{"bundle": "v3", "steps": 9}]}))
    (made[0].path / "split.json").write_text('{"val": []}')
    soup = average_bundles([b.path for b in made], tmp_path / "soup", name="soup", reproduce="cmd")
    states = [b.state_dict() for b in made]
    key = next(k for k in states[0] if states[0][k].is_floating_point() and not torch.equal(states[0][k], states[1][k]))
    mean = (states[0][key] + states[1][key] + states[2][key]) / 3
    assert torch.allclose(soup.state_dict()[key], mean.half().float(), atol=1e-3)
    assert [i["bundle"] for i in soup.card["training"]["soup"]] == ["b1", "b2", "b3"]
    assert [i["training"]["steps"] for i in soup.card["training"]["soup"]] == [1, 2, 3]
    assert soup.card["earlier_stages"][0]["bundle"] == "v3"
    assert (soup.path / "split.json").read_text() == '{"val": []}'
    assert "(model soup) of 3 bundles" in _recipe(soup.card["training"])
    with pytest.raises(BundleError, match="at least two bundles"):
        average_bundles([made[0].path], tmp_path / "one", name="one")
    with pytest.raises(BundleError, match="new or empty folder"):
        average_bundles([b.path for b in made], tmp_path / "soup", name="again")
    other_cfg = dataclasses.replace(cfg, fpn_channels=cfg.fpn_channels * 2)
    other = save_bundle(tmp_path / "wide", other_cfg, build_model(other_cfg).state_dict(), name="wide")
    with pytest.raises(BundleError, match="one architecture"):
        average_bundles([made[0].path, other.path], tmp_path / "other", name="other")
    assert not (tmp_path / "other").exists()


def test_a_soup_takes_the_thresholds_and_count_size_of_the_bundle_it_is_told(tmp_path, monkeypatch, capsys):
    """average_bundles --settings-of: a run's snapshots (at the size of the run's draw) averaged into a bundle with
    the shipped bundle's thresholds and count size, its card saying why; a wrong bundle writes nothing."""
    import references.nuclei.average_bundles as script
    cfg = tiny_model_config()
    snaps = [save_bundle(tmp_path / f"s{k}", cfg, build_model(cfg).state_dict(), name="run",
                         nucleus_diameter_px=22.1) for k in (1, 2)]
    shipped = save_bundle(tmp_path / "shipped", cfg, build_model(cfg).state_dict(), name="nuclei",
                          score_threshold=0.8, mask_threshold=0.6, nucleus_diameter_px=20.3)
    monkeypatch.setattr("sys.argv", ["average_bundles", "--out", str(tmp_path / "soup"), "--settings-of",
                                     str(shipped.path), *(str(s.path) for s in snaps)])
    script.main()
    soup = load_bundle(tmp_path / "soup")
    assert (soup.nucleus_diameter_px, soup.score_threshold, soup.mask_threshold) == (20.3, 0.8, 0.6)
    assert "not the 22.1 px of its ingredients" in soup.card["training"]["count_size"]
    assert [i["bundle"] for i in soup.card["training"]["soup"]] == ["run", "run"]
    monkeypatch.setattr("sys.argv", ["average_bundles", "--out", str(tmp_path / "none"), "--settings-of",
                                     str(tmp_path / "missing"), *(str(s.path) for s in snaps)])
    with pytest.raises(SystemExit, match="average_bundles: error: expected a model bundle folder"):
        script.main()
    assert not (tmp_path / "none").exists()

# --- the scale in µm (issue 51) ------------------------------------------------------------------------

def test_a_bundle_with_a_scale_in_micrometres_round_trips_and_one_without_still_loads(saved, tmp_path):
    """[scale.<modality>] (MicronScale): saved, loaded, replaced by update_bundle_scale; a bundle made before it
    existed (no such table) loads with none, so its counts measure their nuclei (planning.decide_scale)."""
    from cellseg.bundles import MicronScale, update_bundle_scale
    cfg, state, old = saved
    assert load_bundle(old).micron_scales == {} and load_bundle(old).micron_scale("brightfield") is None
    scale = MicronScale(0.25, 19.8, "40x H&E")
    bundle = save_bundle(tmp_path / "um", cfg, state, name="um", nucleus_diameter_px=12.5,
                         micron_scales={"brightfield": scale})
    assert bundle.micron_scale("brightfield") == scale and bundle.micron_scale("fluorescence") is None
    assert bundle.nucleus_diameter_px == 12.5 and scale.nucleus_diameter_um == pytest.approx(4.95)
    written = tomllib.loads((tmp_path / "um" / "model.toml").read_text(encoding="utf-8"))["scale"]
    assert written["nucleus_diameter_px"] == 12.5 and written["brightfield"]["nucleus_diameter_um"] == 4.95
    assert "scale" not in bundle.card
    replaced = update_bundle_scale(tmp_path / "um", {"fluorescence": MicronScale(0.5, 20.0)})
    assert set(replaced.micron_scales) == {"fluorescence"} and replaced.nucleus_diameter_px == 12.5
    assert replaced.weights_sha256 == bundle.weights_sha256


@pytest.mark.parametrize("table", [{"mpp": 0, "nucleus_diameter_px": 20.0}, {"nucleus_diameter_px": 20.0},
                                   {"mpp": 0.25, "nucleus_diameter_px": "big"}])
def test_a_broken_scale_in_micrometres_is_one_line(bundle_copy, table):
    edit_toml(bundle_copy, lambda m: m["scale"].update(brightfield=table))
    with pytest.raises(BundleError, match=r"\[scale.brightfield\].*mpp .* nucleus_diameter_px, both > 0"):
        load_bundle(bundle_copy)


def test_the_shipped_bundle_has_a_scale_in_micrometres_for_brightfield_only():
    """TNBC (40x, 0.25 µm/px) gives brightfield its scale; DSB2018 has no pixel size, so fluorescence has none
    (references/nuclei/micron_scale.py)."""
    bundle = load_bundle("nuclei")
    scale = bundle.micron_scale("brightfield")
    assert scale is not None and scale.mpp == 0.25 and 15 < scale.nucleus_diameter_px < 25
    assert 4 < scale.nucleus_diameter_um < 6 and "TNBC" in scale.source
    assert bundle.micron_scale("fluorescence") is None


def test_a_card_figure_not_measured_is_left_out_of_model_toml(tiny_bundle, tmp_path):
    """TOML has no null: a None in the card (a figure on images without nuclei) is dropped, not a TypeError that
    leaves a half-written bundle."""
    from cellseg.bundles import load_bundle, update_bundle_metadata
    folder = shutil.copytree(tiny_bundle, tmp_path / "b")
    update_bundle_metadata(folder, card={"finetune": {"gain": None, "table": [{"ap50": None, "model": "start"}],
                                                      "scorings": [None, {"step": 3}]}})
    card = load_bundle(folder).card["finetune"]
    assert card == {"table": [{"model": "start"}], "scorings": [{"step": 3}]}
    assert not list(folder.glob("*.tmp"))
