"""The tissue U-Net: architecture on any size, the input normalisation, bundles (save / load / broken),
windowed prediction, the shipped bundle on self-made views, and the tissue recipe training in cellseg's loop."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import tomli_w  # noqa: E402
import tomllib  # noqa: E402
import torch  # noqa: E402

from cellseg.errors import BundleError, ParameterError  # noqa: E402
from cellseg.tissue.unet import (
    DEFAULT_TISSUE_BUNDLE,
    TissueBundle,
    TissueUNetConfig,
    build_tissue_unet,
    for_inference,
    load_tissue_bundle,
    predict_tissue,
    save_tissue_bundle,
    tissue_input,
)

TINY = TissueUNetConfig(base_channels=4, depth=2)


@pytest.fixture(autouse=True)
def one_thread():
    """These tiny nets run fastest on one thread; restored after each test, so that the tests that compare a
    subprocess's arithmetic with this process's (test_resume, test_distributed) see torch's own thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_net(seed: int = 0, cfg: TissueUNetConfig = TINY) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_tissue_unet(cfg).eval()


# --- architecture ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("h, w", [(1, 1), (23, 37), (300, 200)])
def test_forward_any_size_gives_logits_of_that_size(h, w):
    net = tiny_net(cfg=TissueUNetConfig())  # the shipped architecture: depth 4, pads to multiples of 16
    with torch.inference_mode():
        out = net(torch.rand(2, 3, h, w))
    assert out.shape == (2, 1, h, w)
    assert torch.isfinite(out).all()


def test_config_round_trip_and_rejects_unknown_or_bad_keys():
    cfg = TissueUNetConfig(base_channels=8, depth=3)
    assert TissueUNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(BundleError, match="unknown"):
        TissueUNetConfig.from_dict({"base_channels": 8, "width": 3})
    with pytest.raises(BundleError, match="depth"):
        TissueUNetConfig.from_dict({"depth": 0})
    with pytest.raises(BundleError, match="base_channels"):
        TissueUNetConfig.from_dict({"base_channels": "big"})


# --- input normalisation -----------------------------------------------------------------------------------

def test_tissue_input_same_for_uint8_and_uint16_copy():
    rng = np.random.default_rng(0)
    img8 = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    a, b = tissue_input(img8), tissue_input(img8.astype(np.uint16) * 257)
    assert a.dtype == np.float32 and a.shape == (3, 40, 50)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert a.min() == 0.0 and a.max() == 1.0


def test_tissue_input_keeps_colour_and_grey_gives_three_equal_channels():
    rng = np.random.default_rng(1)
    rgb = np.zeros((30, 30, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[..., 2] = rng.integers(0, 100, (30, 30))
    x = tissue_input(rgb)
    assert x[0].mean() > 0.9 and x[1].mean() < 0.05  # one range for all channels: red stays red, green dark
    grey = tissue_input(rng.integers(0, 4096, (17, 19, 1)).astype(np.uint16))
    assert grey.shape == (3, 17, 19)
    assert np.array_equal(grey[0], grey[1]) and np.array_equal(grey[1], grey[2])
    assert np.array_equal(tissue_input(np.asarray(rgb[..., 2])), tissue_input(rgb[..., 2:3]))  # 2-D = one channel


@pytest.mark.parametrize("value, dtype", [(0, np.uint8), (7, np.uint16), (0.0, np.float32), (0.3, np.float64)])
def test_tissue_input_constant_image_is_finite(value, dtype):
    x = tissue_input(np.full((9, 11, 1), value, dtype))
    assert np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1


def test_tissue_input_nan_and_faint_noise():
    img = np.random.default_rng(2).normal(0.5, 0.1, (20, 20, 3)).astype(np.float32)
    img[3, 4, 1] = np.nan
    assert np.isfinite(tissue_input(img)).all()
    # A nearly empty dark field (3 grey levels of noise) is not stretched to the full range.
    dark = np.random.default_rng(3).integers(5, 9, (64, 64, 1), dtype=np.uint8)
    assert tissue_input(dark).max() < 0.3
    # The same for the dark frame of a 12-bit camera in uint16 (offset 100, noise of +-20 counts).
    dark16 = np.random.default_rng(3).integers(80, 120, (64, 64, 1)).astype(np.uint16)
    assert tissue_input(dark16).max() < 0.1


def test_tissue_input_multichannel_scales_each_channel_then_takes_the_max():
    rng = np.random.default_rng(4)
    img = np.zeros((32, 32, 5), np.uint16)
    img[..., 0] = rng.integers(0, 4000, (32, 32))
    img[:16, :, 3] = 60000  # a bright region in one channel only
    x = tissue_input(img)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    assert np.array_equal(x[0], x[2])
    assert x[0, :16].min() == 1.0  # the bright channel wins where it is bright
    assert 0.3 < x[0, 16:].mean() < 0.7 and x[0, 16:].std() > 0.2  # elsewhere channel 0, scaled on its own


def test_bad_views_and_windows_are_parameter_errors():
    with pytest.raises(ParameterError, match="expected a \\(h, w, C\\) numeric view"):
        tissue_input(np.zeros((2, 3, 4, 1)))
    with pytest.raises(ParameterError):
        tissue_input(np.array([["a", "b"]]))
    with pytest.raises(ParameterError, match="window"):
        predict_tissue(tiny_net(), np.zeros((8, 8, 1)), window=64, overlap=32)


# --- bundles -----------------------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    net = tiny_net(seed=3)
    for m in net.modules():  # non-trivial BatchNorm statistics, so that the round trip covers them
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    folder = tmp_path / "tiny"
    bundle = save_tissue_bundle(folder, TINY, net.state_dict(), name="tiny", view_um_per_px=8.0, threshold=0.4,
                                card={"training": {"steps": 3}})
    return net, folder, bundle


def _net_with_batchnorm_statistics(seed: int = 1) -> torch.nn.Module:
    net = tiny_net(seed)
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():               # non-trivial running statistics and affine terms, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return net


def test_inference_net_fuses_batchnorm_and_predicts_the_same():
    net = _net_with_batchnorm_statistics()
    view = np.random.default_rng(0).integers(0, 255, (150, 170, 3), dtype=np.uint8)
    expected = predict_tissue(net, view, window=64, overlap=8)
    fused = for_inference(_net_with_batchnorm_statistics())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    np.testing.assert_allclose(predict_tissue(fused, view, window=64, overlap=8), expected, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_inference_net_on_cuda_predicts_like_the_cpu():
    view = np.random.default_rng(0).integers(0, 255, (150, 170, 3), dtype=np.uint8)
    cpu = predict_tissue(for_inference(_net_with_batchnorm_statistics()), view, window=64, overlap=8)
    gpu = predict_tissue(for_inference(_net_with_batchnorm_statistics(), "cuda"), view, window=64, overlap=8)
    np.testing.assert_allclose(gpu, cpu, atol=1e-3)


def test_save_load_round_trip_gives_same_outputs(saved):
    net, folder, bundle = saved
    loaded = load_tissue_bundle(folder)
    assert isinstance(loaded, TissueBundle) and loaded == bundle
    assert (loaded.config, loaded.view_um_per_px, loaded.threshold, loaded.name) == (TINY, 8.0, 0.4, "tiny")
    assert loaded.card == {"training": {"steps": 3}}
    assert sorted(p.name for p in folder.iterdir()) == ["model.toml", "weights.safetensors"]
    rebuilt = loaded.build()
    assert not rebuilt.training
    x = torch.rand(1, 3, 40, 56)
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt(x), net(x), rtol=1e-2, atol=1e-2)  # float16 weights
    meta = tomllib.loads((folder / "model.toml").read_text(encoding="utf-8"))
    assert meta["format"] == "cellseg-tissue-bundle/1" and meta["model"] == TINY.to_dict()


def test_corrupted_weights_are_rejected(saved):
    _, folder, _ = saved
    weights = folder / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        load_tissue_bundle(folder)


def test_missing_folder_and_missing_parts(tmp_path, saved):
    with pytest.raises(BundleError, match="expected a tissue bundle folder, found no bundle"):
        load_tissue_bundle(tmp_path / "nowhere")
    # an unknown name lists the shipped tissue bundles (not the cell models): the cell model's lookup, its kind
    with pytest.raises(BundleError, match=r"expected a tissue bundle folder or a shipped bundle name, got "
                                          r"'no-such-shipped-bundle' \(shipped bundles: tissue; make one with"):
        load_tissue_bundle("no-such-shipped-bundle")
    _, folder, _ = saved
    (folder / "weights.safetensors").unlink()
    with pytest.raises(BundleError, match="expected weights"):
        load_tissue_bundle(folder)
    (folder / "model.toml").unlink()
    with pytest.raises(BundleError, match="model.toml"):
        load_tissue_bundle(folder)


def _edit(folder, change):
    meta = tomllib.loads((folder / "model.toml").read_text(encoding="utf-8"))
    change(meta)
    (folder / "model.toml").write_text(tomli_w.dumps(meta), encoding="utf-8")


def test_wrong_format_string(saved):
    _, folder, _ = saved
    _edit(folder, lambda m: m.update(format="cellseg-bundle/1"))
    with pytest.raises(BundleError, match="expected format = 'cellseg-tissue-bundle/1'.*found 'cellseg-bundle/1'"):
        load_tissue_bundle(folder)


def test_weights_not_matching_the_architecture(saved):
    _, folder, _ = saved
    _edit(folder, lambda m: m["model"].update(base_channels=6))
    with pytest.raises(BundleError, match="architecture"):
        load_tissue_bundle(folder).build()


def test_errors_are_one_line(saved):
    _, folder, _ = saved
    (folder / "model.toml").write_text("format = \n", encoding="utf-8")
    with pytest.raises(BundleError) as info:
        load_tissue_bundle(folder)
    assert "\n" not in str(info.value) and "expected" in str(info.value)


# --- windowed prediction -----------------------------------------------------------------------------------

def test_windows_stitch_without_seams():
    """With overlap >= the receptive field, windowed prediction equals one pass over the whole view."""
    net = tiny_net(seed=5, cfg=TissueUNetConfig(base_channels=4, depth=1))
    view = np.random.default_rng(6).integers(0, 256, (100, 130, 3), dtype=np.uint8)
    whole = predict_tissue(net, view)
    windowed = predict_tissue(net, view, window=48, overlap=16)
    assert whole.shape == windowed.shape == (100, 130) and whole.dtype == np.float32
    np.testing.assert_allclose(windowed, whole, atol=1e-5)


def test_predict_tiny_and_odd_views():
    net = tiny_net()
    for shape in [(20, 30, 3), (1, 1, 1), (5, 700, 2)]:
        prob = predict_tissue(net, np.random.default_rng(0).random(shape).astype(np.float32), window=64, overlap=8)
        assert prob.shape == shape[:2] and np.isfinite(prob).all() and 0 <= prob.min() <= prob.max() <= 1


# --- the shipped bundle ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped():
    bundle = load_tissue_bundle(None)
    return bundle, bundle.build()


def _disc(size=128, radius=30):
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    return r < radius, r < radius - 8, r > radius + 20


def test_shipped_bundle_loads_and_is_small(shipped):
    bundle, net = shipped
    assert bundle.name == DEFAULT_TISSUE_BUNDLE and bundle.path.name == "tissue"
    assert load_tissue_bundle("tissue") == bundle
    assert load_tissue_bundle(bundle.path / "model.toml") == bundle
    assert (bundle.path / "weights.safetensors").stat().st_size < 5 * 2 ** 20
    assert bundle.view_um_per_px == 8.0 and 0 < bundle.threshold < 1
    assert not net.training


def test_shipped_bundle_finds_a_fluorescence_disc(shipped):
    _, net = shipped
    rng = np.random.default_rng(10)
    disc, inner, outer = _disc()
    view = rng.normal(8, 2, (128, 128))
    dots = disc & (rng.random((128, 128)) < 0.35)
    view[dots] = rng.uniform(80, 255, dots.sum())
    prob = predict_tissue(net, np.clip(view, 0, 255).astype(np.uint8)[..., None])
    assert prob[inner].mean() > 0.5
    assert prob[outer].mean() < 0.5 and (prob[outer] >= 0.5).mean() < 0.05


def test_shipped_bundle_finds_a_stained_disc_on_glass(shipped):
    _, net = shipped
    rng = np.random.default_rng(11)
    disc, inner, outer = _disc()
    view = np.ones((128, 128, 3)) * np.array([232.0, 229.0, 234.0]) + rng.normal(0, 2, (128, 128, 3))
    purple, pink = np.array([120.0, 70.0, 160.0]), np.array([225.0, 160.0, 200.0])
    mix = rng.random((128, 128, 1))
    view[disc] = (mix * purple + (1 - mix) * pink)[disc] + rng.normal(0, 6, (disc.sum(), 3))
    prob = predict_tissue(net, np.clip(view, 0, 255).astype(np.uint8))
    assert prob[inner].mean() > 0.5
    assert prob[outer].mean() < 0.5 and (prob[outer] >= 0.5).mean() < 0.05


@pytest.mark.parametrize("kind", ["glass", "dark"])
def test_shipped_bundle_finds_no_tissue_on_empty_views(shipped, kind):
    _, net = shipped
    rng = np.random.default_rng(12)
    yy, xx = np.mgrid[:160, :160] / 160
    if kind == "glass":
        view = np.array([236.0, 232.0, 238.0]) * (1 - 0.06 * ((yy - 0.4) ** 2 + (xx - 0.6) ** 2))[..., None]
        view = view + rng.normal(0, 2, (160, 160, 3))
    else:
        view = (6 + 4 * xx + rng.normal(0, 1.5, (160, 160)))[..., None]
    prob = predict_tissue(net, np.clip(view, 0, 255).astype(np.uint8))
    assert (prob >= 0.5).mean() < 0.05


# --- training ----------------------------------------------------------------------------------------------

def _disc_pool(n: int = 4, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A pool of views as the tissue recipe keeps it: float16 network inputs (n, 3, S, S), uint8 labels (n, S, S);
    each view a pink disc of tissue on bright glass."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    xs, ys = [], []
    for _ in range(n):
        r, c = rng.integers(20, size - 20, 2)
        label = ((yy - r) ** 2 + (xx - c) ** 2 < 15 ** 2).astype(np.uint8)
        view = np.where(label[..., None] > 0, [150, 80, 170], [235, 232, 236]).astype(np.uint8)
        xs.append(tissue_input(view).astype(np.float16))
        ys.append(label)
    return np.stack(xs), np.stack(ys)


@pytest.mark.slow
def test_the_tissue_recipe_trains_in_cellsegs_loop_and_resumes(tmp_path):
    """references/tissue/train_tissue_unet.py's U-Net task in cellseg.training.loop: the loss falls, the run stops and
    resumes from its checkpoint, and its bundle loads."""
    from cellseg.training import LoopSettings, run_training
    from references.tissue.train_tissue_unet import TissueTraining

    x, y = _disc_pool()
    out = tmp_path / "run"

    def run(steps: int, resume: bool) -> None:
        torch.manual_seed(0)
        net = build_tissue_unet(TINY).train()
        task = TissueTraining(net, TINY, x, y, batch_size=4, crop=48, seed=0, threshold=0.5, card={"seed": 0})
        settings = LoopSettings(steps=steps, lr=1e-2, warmup=2, final_lr_fraction=0.03, checkpoint_every=5,
                                clip_grad_norm=None)
        optim = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=1e-4)
        run_training(task, net, optim, settings, out, resume=resume, progress=False)

    run(12, resume=False)
    run(20, resume=True)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 20 and len(ckpt["history"]) == 20 and ckpt["loss_names"] == ["loss_bce", "loss_dice"]
    losses = [row[1] for row in ckpt["history"]]
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses
    bundle = load_tissue_bundle(out)
    assert bundle.card["training"]["steps"] == 20 and bundle.card["training"]["finished"] is True
    assert (out / "training_log.csv").read_text().startswith("step,loss,loss_bce,loss_dice")
    assert predict_tissue(bundle.build(), np.full((32, 32, 3), 235, np.uint8)).shape == (32, 32)
