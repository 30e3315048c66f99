"""The nuclei reference recipe (references/nuclei/, outside the package): hold-out by acquisition group and patient
(datasets.py) and the recipe that trains on it (recipe.py), on synthetic datasets; and the package's training
augmentation (cellseg.training.augment)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellseg.errors import CellsegError
from cellseg.training import Augmentation, augment_pixels, dim_nuclei, hed_jitter
from references.nuclei.datasets import AnnotatedImage, Split, acquisition_groups, holdout_split, make_split

from ..helpers import tiny_model_config


def nuclei_image(rng, size, n, radius, background, brightness, colour=None):
    """A synthetic field of `n` discs: (pixels (H, W, C) uint8, labels (H, W) uint16)."""
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.uint16)
    for k in range(n):
        r, c = rng.integers(radius, size - radius, 2)
        labels[((yy - r) ** 2 + (xx - c) ** 2 <= radius ** 2) & (labels == 0)] = k + 1
    gray = np.where(labels > 0, brightness, background) + rng.normal(0, 2, labels.shape)
    pixels = np.clip(gray, 0, 255).astype(np.uint8)[..., None]
    if colour is not None:
        pixels = np.clip(pixels * np.asarray(colour)[None, None], 0, 255).astype(np.uint8)
    return pixels, labels


def write_dataset(root: Path, name: str, images: dict[str, tuple[np.ndarray, np.ndarray, str]]) -> Path:
    """A dataset folder in the layout references/nuclei/datasets.py reads: manifest.csv, images/, labels/."""
    folder = root / name
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "height", "width", "channels", "n_nuclei", "modality_guess"])
        for image_id, (pixels, labels, modality) in images.items():
            Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(
                folder / "images" / f"{image_id}.png")
            tifffile.imwrite(folder / "labels" / f"{image_id}.tif", labels)
            w.writerow([image_id, *pixels.shape, int(labels.max()), modality])
    return folder


@pytest.fixture
def two_datasets(tmp_path) -> Path:
    """DSB2018-like: 3 fluorescence experiments (dim/small, bright/large, mid) of 6 crops each, 2 stained
    experiments of 3 (other colours, nucleus sizes); TNBC-like: 4 patients of 2 images each. (Ward's linkage merges
    small clusters more readily than large ones, so few crops need clearly different experiments.)"""
    rng = np.random.default_rng(0)
    dsb = {}
    for e, (bg, fg, radius) in enumerate([(2, 30, 2), (60, 250, 12), (8, 120, 5)]):
        for k in range(6):
            dsb[f"fl{e}_{k}"] = (*nuclei_image(rng, 64, 6, radius, bg, fg), "fluorescence")
    for e, colour in enumerate([(0.6, 0.3, 0.8), (0.95, 0.6, 0.5)]):
        for k in range(3):
            dsb[f"st{e}_{k}"] = (*nuclei_image(rng, 64, 5, 4 + 4 * e, 220, 90, colour), "brightfield_color_histology")
    tnbc = {f"tnbc_0{p}_{k}": (*nuclei_image(rng, 64, 5, 4, 210, 80, (0.8, 0.5, 0.8)), "brightfield_color_histology")
            for p in range(1, 5) for k in range(1, 3)}
    write_dataset(tmp_path / "data", "dsb2018-train", dsb)
    write_dataset(tmp_path / "data", "tnbc-train", tnbc)
    return tmp_path / "data"


def test_groups_follow_acquisitions_and_patients(two_datasets):
    split, images = make_split({"dsb2018": two_datasets / "dsb2018-train", "tnbc": two_datasets / "tnbc-train"})
    group_of = {k: g for g, t in split.groups.items() for k in t["images"]}
    experiment = {im.key: im.image_id.rsplit("_", 1)[0] for im in images}
    # images of one experiment share a group, and a group never holds two experiments
    for a in images:
        for b in images:
            assert (experiment[a.key] == experiment[b.key]) == (group_of[a.key] == group_of[b.key]), (a.key, b.key)
    assert {t["modality"] for t in split.groups.values()} == {"fluorescence", "stained_tissue", "he_breast"}


def test_whole_groups_are_held_out_per_modality(two_datasets):
    split, _ = make_split({"dsb2018": two_datasets / "dsb2018-train", "tnbc": two_datasets / "tnbc-train"})
    held = {m: [g for g, t in split.groups.items() if t["modality"] == m and t["side"] == "val"]
            for m in ("fluorescence", "stained_tissue", "he_breast")}
    assert {m: len(g) for m, g in held.items()} == {"fluorescence": 1, "stained_tissue": 1, "he_breast": 1}
    assert set(split.train).isdisjoint(split.val)
    assert Split.from_json(json.loads(json.dumps(split.to_json()))).val == split.val


def write_manifest_dataset(folder: Path, columns: list[str], rows: dict[str, tuple[np.ndarray, np.ndarray, list]]):
    """A Kromp- or NuInsSeg-like folder: manifest.csv with `columns` after the id and size (no channels column)."""
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "height", "width", *columns])
        for image_id, (pixels, labels, values) in rows.items():
            Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(folder / "images" / f"{image_id}.png")
            tifffile.imwrite(folder / "labels" / f"{image_id}.tif", labels)
            w.writerow([image_id, *labels.shape, *values])


def test_kromp_and_nuinsseg_join_a_split_by_preparation_and_organ_and_the_old_groups_stay(two_datasets):
    """The later datasets are grouped by their manifests (Kromp: preparation + diagnosis; NuInsSeg: organ, species
    apart) and added to an existing split: its groups and sides unchanged, Kromp's listed preparations and whole
    NuInsSeg organs of each species held out, no group on both sides."""
    from references.nuclei.datasets import KROMP_HELD_OUT, extend_with_new_datasets, read_dataset
    rng = np.random.default_rng(1)
    preparations = [("tissue section", "Neuroblastoma"), ("tissue section", "Wilms"),
                    ("Tumor touch imprint", "Neuroblastoma"), ("cellline cytospin", "Neuroblastoma"),
                    ("tissue section", "Ganglioneuroblastoma"), ("BM cytospin", "Neuroblastoma")]
    kromp = {f"{d}_{k}_{p[:4]}": (*nuclei_image(rng, 48, 4, 4, 10, 200), [p, d])
             for p, d in preparations for k in range(2)}
    write_manifest_dataset(two_datasets / "kromp-fluo", ["preparation", "diagnosis"], kromp)
    organs = [f"human {o}" for o in ("liver", "lung", "brain", "skin", "bladder", "tongue", "colon")] + \
        ["mouse heart", "mouse liver"]
    nuinsseg = {f"{o.replace(' ', '_')}_{k}": (*nuclei_image(rng, 48, 4, 4, 220, 90, (0.8, 0.5, 0.8)), [o])
                for o in organs for k in range(3)}
    write_manifest_dataset(two_datasets / "nuinsseg-he", ["organ"], nuinsseg)
    base, _ = make_split({"dsb2018": two_datasets / "dsb2018-train", "tnbc": two_datasets / "tnbc-train"})
    split = extend_with_new_datasets(base, two_datasets)

    assert {g: t for g, t in split.groups.items() if g in base.groups} == base.groups
    assert set(base.train) <= set(split.train) and set(base.val) <= set(split.val)
    assert {g for g, t in split.groups.items() if g.startswith("kromp/") and t["side"] == "val"} == set(KROMP_HELD_OUT)
    assert split.groups["kromp/tissue_section-ganglioneuroblastoma"]["side"] == "train"
    held_organs = [g for g, t in split.groups.items() if g.startswith("nuinsseg/") and t["side"] == "val"]
    assert sum(g.startswith("nuinsseg/human_") for g in held_organs) == 2          # ceil(0.15 x 7)
    assert sum(g.startswith("nuinsseg/mouse_") for g in held_organs) == 1          # ceil(0.15 x 2)
    assert all(len(t["images"]) == 3 for g, t in split.groups.items() if g.startswith("nuinsseg/"))
    modality = split.modality_of()
    assert {modality[k] for k in split.val if k.startswith("kromp/")} == {"fluorescence_kromp"}
    assert {modality[k] for k in split.val if k.startswith("nuinsseg/")} == {"he_nuinsseg"}
    assert Split.from_json(json.loads(json.dumps(split.to_json()))).val == split.val
    images = read_dataset(two_datasets / "kromp-fluo", "kromp")
    assert {im.channels for im in images} == {1}
    with pytest.raises(CellsegError, match="expected new groups only"):
        extend_with_new_datasets(split, two_datasets)


def test_kromp_scale_images_are_resampled_to_the_models_nucleus_size():
    """Kromp's 63x nuclei (50-180 px) are brought to the model's diameter as --diameter auto brings a slide; every
    nucleus keeps one label, and an image already at the size is left as it is."""
    from references.nuclei.recipe import at_training_scale
    rng = np.random.default_rng(2)
    pixels, labels = nuclei_image(rng, 400, 6, 40, 10, 200)        # ~80 px nuclei
    small_pixels, small_labels = at_training_scale(pixels, labels, 20.0)
    assert small_labels.shape == small_pixels.shape[:2] == (100, 100)
    areas = np.bincount(small_labels.ravel())[1:]
    areas = areas[areas > 0]
    assert np.median(2 * np.sqrt(areas / np.pi)) == pytest.approx(20.0, rel=0.1)
    assert set(np.unique(small_labels)) == set(np.unique(labels))
    same = at_training_scale(pixels, labels, 79.0)
    assert same[0] is pixels and same[1] is labels


def test_group_weights_raise_a_group_within_its_modality_and_keep_the_modality_share():
    from references.nuclei.recipe import modality_weights
    images = [AnnotatedImage("kromp", f"i{k}", "fluorescence_kromp", Path("x"), Path("y"), 8, 8, 1) for k in range(4)]
    images += [AnnotatedImage("dsb2018", f"d{k}", "fluorescence", Path("x"), Path("y"), 8, 8, 1) for k in range(2)]
    groups = {images[0].key: "kromp/tissue_section-wilms"} | {im.key: "kromp/bm_cytospin-x" for im in images[1:4]}
    weights, text = modality_weights(images, {"fluorescence_kromp": 0.5, "fluorescence": 0.5}, groups)
    assert weights[:4].sum() == pytest.approx(0.5) and weights[4:].sum() == pytest.approx(0.5)
    assert weights[0] == pytest.approx(3 * weights[1]) and "x3" in text


def test_a_split_with_a_group_on_both_sides_is_refused():
    images = [AnnotatedImage("dsb2018", f"i{k}", "fluorescence", Path("x"), Path("y"), 8, 8, 1) for k in range(4)]
    split = holdout_split(images, {im.key: f"g{int(im.image_id[1]) // 2}" for im in images}, fraction=0.4)
    bad = split.to_json()
    moved = bad["val"].pop()
    bad["train"].append(moved)
    with pytest.raises(CellsegError, match="on its side"):
        Split.from_json(bad)


@pytest.mark.parametrize("seed", range(5))
def test_random_groupings_never_straddle_the_split(seed):
    rng = np.random.default_rng(seed)
    modalities = ["fluorescence", "stained_tissue", "he_breast"]
    images = [AnnotatedImage("dsb2018", f"i{k}", modalities[k % 3], Path("x"), Path("y"), 8, 8, 1)
              for k in range(120)]
    groups = {im.key: f"{im.modality}-{rng.integers(0, 9)}" for im in images}
    split = holdout_split(images, groups, fraction=0.15, seed=seed)
    side = {k: "train" for k in split.train} | {k: "val" for k in split.val}
    for g in set(groups.values()):
        assert len({side[k] for k, gg in groups.items() if gg == g}) == 1
    for m in modalities:       # at least 15 % of each modality's groups held out
        names = {g for g in groups.values() if g.startswith(m)}
        assert sum(split.groups[g]["side"] == "val" for g in names) >= np.ceil(0.15 * len(names))


def test_acquisition_clustering_is_by_key_and_features():
    ims = [AnnotatedImage("dsb2018", f"a{k}", "fluorescence", Path("x"), Path("y"), 64, 64, 1) for k in range(6)]
    feats = {im.key: {"background": 5.0 if k < 3 else 60.0, "bright_end": 50.0 if k < 3 else 250.0,
                      "nucleus_brightness": 40.0 if k < 3 else 200.0, "nucleus_area": 30.0 if k < 3 else 600.0}
             for k, im in enumerate(ims)}
    groups = acquisition_groups(ims, feats)
    assert len({groups[im.key] for im in ims[:3]}) == 1 and len({groups[im.key] for im in ims[3:]}) == 1
    assert groups[ims[0].key] != groups[ims[3].key]


@pytest.mark.slow
def test_the_recipe_trains_only_on_the_training_side(two_datasets, tmp_path, monkeypatch):
    """A tiny network trained by the recipe: it reads no held-out image, and its split keeps groups whole."""
    import references.nuclei.recipe as recipe
    from cellseg.bundles import load_bundle
    from cellseg.training import TrainSettings
    read = []
    real = recipe.read_pixels
    monkeypatch.setattr(recipe, "read_pixels", lambda im: (read.append(im.key), real(im))[1])
    out = tmp_path / "bundle"
    recipe.run_recipe(two_datasets, out, TrainSettings(steps=2, batch_size=2, crop=48, warmup=1),
                      model_cfg=tiny_model_config(), progress=False)
    split = Split.from_json(json.loads((out / "split.json").read_text()))
    assert split.val and sorted(read) == sorted(split.train)
    card = load_bundle(out).card
    assert card["data"]["train_images"] == len(split.train) and "CC BY 4.0" in " ".join(card["data"]["datasets"])
    # the pack that travels to a GPU machine holds the training images alone, and trains the same
    pack = tmp_path / "pack"
    assert recipe.pack_training_data(two_datasets, split, pack) > 0
    packed = recipe.training_images(pack, split)
    assert [im.key for im in packed] == split.train and all(im.image_path.suffix == ".jpg" for im in packed)
    assert not any((pack / "dsb2018-train" / "images" / f"{k.split('/')[1]}.jpg").exists() for k in split.val)
    with pytest.raises(CellsegError, match="expected every training image"):
        recipe.training_images(pack, Split(split.train + split.val[:1], split.val[1:], {}, ""))
    with pytest.raises(CellsegError, match="new or empty folder"):
        recipe.pack_training_data(two_datasets, split, pack)
    # in parts that each fit a device call, gathered on the machine until the pack is whole
    import shutil

    from references.nuclei.pack_training_data import missing_files, pack_parts
    total = sum(p.stat().st_size for p in pack.rglob("*") if p.is_file())
    parts = pack_parts(pack, total // 3 + 4096)
    assert len(parts) >= 3 and all(sum(p.stat().st_size for p in part.rglob("*") if p.is_file()) <= total // 3 + 4096
                                   for part in parts)
    gathered = tmp_path / "gathered"
    for part in parts:
        assert missing_files(gathered) if gathered.exists() else True
        shutil.copytree(part, gathered, dirs_exist_ok=True)
    assert missing_files(gathered) == []
    assert [im.key for im in recipe.training_images(gathered, split)] == split.train


def test_the_reference_recipes_are_not_in_the_wheel(wheel):
    """A user's install holds the training code for their own data, not the recipes for DSB2018 and TNBC."""
    names = wheel.namelist()
    assert "cellseg/training/maskrcnn.py" in names and "cellseg/training/loop.py" in names
    assert not [n for n in names if n.startswith("references/") or n.split("/")[-1] in ("recipe.py", "datasets.py")]


def test_hed_jitter_changes_stain_amounts_but_not_tint_direction():
    rng = np.random.default_rng(2)
    from skimage.color import hed2rgb
    hed = np.zeros((32, 32, 3))
    hed[8:24, 8:24, 0] = 0.3          # a haematoxylin square on eosin background
    hed[..., 1] = 0.1
    image = np.moveaxis(hed2rgb(hed), -1, 0).astype(np.float32)
    for _ in range(10):
        out = hed_jitter(image, rng, gain=0.15, shift=0.05)
        assert out.shape == image.shape and 0 <= out.min() and out.max() <= 1
        # the background stays eosin-pink: red above green (a negative eosin would turn it green)
        assert out[1, 0, 0] < out[0, 0, 0]


def test_dimmed_nuclei_move_towards_the_background_and_nothing_else_changes():
    rng = np.random.default_rng(3)
    image = np.full((3, 20, 20), 0.1, np.float32)
    masks = np.zeros((2, 20, 20), bool)
    masks[0, 2:6, 2:6] = masks[1, 10:15, 10:15] = True
    image[:, masks.any(0)] = 0.9
    out = dim_nuclei(image, masks, rng, fraction=1.0, factor=(0.5, 0.5))
    assert np.allclose(out[:, masks.any(0)], 0.5) and np.array_equal(out[:, ~masks.any(0)], image[:, ~masks.any(0)])


def test_grayscale_stays_grayscale_under_augmentation():
    rng = np.random.default_rng(4)
    image = np.repeat(rng.random((1, 40, 40), dtype=np.float32), 3, axis=0)
    aug = Augmentation(hed_p=1.0, blur_p=1.0, noise_p=1.0, dim_p=1.0)
    for _ in range(5):
        out = augment_pixels(image, np.zeros((0, 40, 40), bool), False, rng, aug)
        assert np.array_equal(out[0], out[1]) and np.array_equal(out[1], out[2])


def test_inverted_grayscale_crops_turn_bright_nuclei_dark_and_leave_colour_crops_alone():
    """invert_p: a fluorescence crop's bright nuclei on a dark ground become dark nuclei on a light ground (the
    polarity of grayscale brightfield); a colour crop keeps its polarity (turned gray, it has brightfield's already)."""
    rng = np.random.default_rng(5)
    image = np.full((3, 20, 20), 0.1, np.float32)
    nucleus = np.zeros((1, 20, 20), bool)
    nucleus[0, 5:12, 5:12] = True
    image[:, nucleus[0]] = 0.8
    plain = dict(hed_p=0.0, gray_p=0.0, blur_p=0.0, noise_p=0.0, dim_p=0.0, gamma=(1.0, 1.0), contrast=(1.0, 1.0),
                 brightness=0.0, channel_gain=0.0)
    out = augment_pixels(image, nucleus, False, rng, Augmentation(**plain, invert_p=1.0))
    assert np.allclose(out[:, nucleus[0]], 0.2) and np.allclose(out[:, ~nucleus[0]], 0.9)
    colour = image * np.array([1.0, 0.8, 0.6], np.float32)[:, None, None]
    assert np.array_equal(augment_pixels(colour, nucleus, True, rng, Augmentation(**plain, invert_p=1.0)), colour)
    # off (the recipe's default): no draw from the generator, so earlier runs' crops are unchanged
    a, b = np.random.default_rng(6), np.random.default_rng(6)
    augment_pixels(image, nucleus, False, a, Augmentation(**plain, invert_p=0.0))
    augment_pixels(image, nucleus, False, b, Augmentation(**plain))
    assert a.random() == b.random()


def test_recipe_augmentation_settings_change_named_fields_only():
    from references.nuclei.recipe import parse_augmentation
    assert parse_augmentation(None) == Augmentation()
    changed = parse_augmentation("invert_p=0.2, gray_p=0.1")
    assert (changed.invert_p, changed.gray_p, changed.dim_p) == (0.2, 0.1, Augmentation().dim_p)
    with pytest.raises(CellsegError, match="expected augmentation settings as one of .*invert_p"):
        parse_augmentation("invert=0.2")
    with pytest.raises(CellsegError, match="expected augmentation settings as one of"):
        parse_augmentation("scale=0.2")      # a range, not a number
    with pytest.raises(CellsegError, match="expected a probability between 0 and 1 for invert_p, found 1.5"):
        parse_augmentation("invert_p=1.5")
    with pytest.raises(CellsegError, match="expected augmentation settings as name=number, found 'gray_p=x'"):
        parse_augmentation("gray_p=x")


def test_the_long_runs_heldout_curve_goes_into_the_card_and_says_when_it_is_flat(tmp_path):
    """plot_heldout reads RUN/heldout.csv (train_default_bundle's rows), knows flatness only once the curve spans the
    window, and validate_bundle --heldout-curve puts it in the card: a table in model.toml, the plot and a table in
    README.md."""
    import dataclasses
    import os
    import shutil

    from cellseg.bundles import load_bundle, update_bundle_metadata
    from references.nuclei.model_card import card_readme, curve_table
    from references.nuclei.plot_heldout import flat_ranges, plot_curve, read_curve
    from references.nuclei.train_default_bundle import HELDOUT_COLUMNS
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(CellsegError, match="expected .*heldout.csv \\(a run with --snapshot-every\\), found none"):
        read_curve(run)
    values = {0: (0.775, 0.686, 0.544, 0.574), 5000: (0.773, 0.659, 0.480, 0.693),
              10000: (0.787, 0.682, 0.384, 0.670), 20000: (0.789, 0.684, 0.386, 0.672)}
    # a curve of the v1-v3 runs: no Kromp or NuInsSeg column values
    lines = [",".join(HELDOUT_COLUMNS)] + [f"{step},{','.join(map(str, v))},,,0.65,0.1,0.64" for step, v in
                                           sorted(values.items(), reverse=True)]
    (run / "heldout.csv").write_text("\n".join(lines) + "\n")
    rows = read_curve(run)
    assert [r["step"] for r in rows] == [0, 5000, 10000, 20000] and rows[1]["he_breast"] == 0.693
    assert flat_ranges(rows[:3], 15000) is None                 # spans 10,000 steps: not yet known
    ranges = flat_ranges(rows, 15000)                           # 5,000 to 20,000
    assert ranges["brightfield_gray"] == pytest.approx(0.480 - 0.384) and ranges["fluorescence"] == pytest.approx(0.016)
    assert flat_ranges(rows, 10000)["fluorescence"] == pytest.approx(0.002)    # 10,000 to 20,000: flat

    shipped = Path(__file__).resolve().parents[2] / "cellseg" / "models" / "nuclei"
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for f in shipped.iterdir():     # the weights linked, not copied: the card is all that changes
        os.link(f, bundle / f.name) if f.suffix == ".safetensors" else shutil.copy(f, bundle / f.name)
    table = curve_table(rows, run)
    assert table["run"] == str(run)                 # no checkout holds it: as given
    (tmp_path / ".git").mkdir()                     # in a checkout: named from its root, not by the machine's path
    assert curve_table(rows, run)["run"] == "run" == curve_table(rows, run / ".." / "run")["run"]
    update_bundle_metadata(bundle, card={"heldout_curve": table})
    plot_curve(rows, bundle / "heldout_curve.png")
    loaded = load_bundle(bundle)
    assert loaded.card["heldout_curve"]["steps"] == [0, 5000, 10000, 20000]
    readme = card_readme(loaded)
    assert "## Held-out AP50 against training steps" in readme and "](heldout_curve.png)" in readme
    assert "| 5,000 | 0.773 | 0.659 | 0.480 | 0.693 | 0.650 | 10.0 % |" in readme
    assert "at each step of the table a snapshot scored" in readme          # 5,000 then 10,000 steps apart
    update_bundle_metadata(bundle, card={"heldout_curve": curve_table(rows[:3], run)})
    assert "every 5,000 steps a snapshot scored" in card_readme(load_bundle(bundle))   # the run's own interval
    assert (bundle / "heldout_curve.png").read_bytes()[:4] == b"\x89PNG"
    without = dataclasses.replace(loaded, card={k: v for k, v in loaded.card.items() if k != "heldout_curve"})
    assert "Held-out AP50 against training steps" not in card_readme(without)   # a bundle of no long run


def _whole_bundle(folder: Path) -> None:
    """A bundle folder load_bundle accepts (model.toml recording its weights' sha256), with a token tensor."""
    import torch

    from cellseg.bundles.bundle import BUNDLE_FORMAT, sha256_file, write_toml, write_weights
    folder.mkdir(parents=True)
    write_weights(folder / "weights.safetensors", {"w": torch.zeros(2)})
    write_toml(folder / "model.toml", {"format": BUNDLE_FORMAT, "name": folder.name,
                                       "weights_sha256": sha256_file(folder / "weights.safetensors")})


def test_a_resumed_long_run_scores_the_snapshots_its_killed_run_left(tmp_path):
    """Scoring moves a snapshot out of snapshots/; one still there was being scored when the run was killed: the resume scores it
    (in step order). One that cannot be scored does not stop the run: a whole bundle is kept in unscored/ (no trained
    weight lost to a failing scorer), a half-written one removed."""
    import subprocess

    from references.nuclei.train_default_bundle import score_leftover_snapshots
    for name in ("step0005000", "step0000000", "step0010000"):
        (tmp_path / "snapshots" / name).mkdir(parents=True)
    _whole_bundle(tmp_path / "snapshots" / "step0015000")
    (tmp_path / "snapshots" / "notes.txt").write_text("not a snapshot")
    scored = []

    def score(folder, step):
        if step >= 10000:        # validation fails: on a half-written bundle (10,000) or for its own reasons
            raise subprocess.CalledProcessError(1, ["validate_bundle"])
        scored.append(step)
        folder.rmdir()

    score_leftover_snapshots(tmp_path, score)
    assert scored == [0, 5000]
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == ["notes.txt"]
    assert [p.name for p in (tmp_path / "unscored").iterdir()] == ["step0015000"]
    assert (tmp_path / "unscored" / "step0015000" / "weights.safetensors").is_file()
    score_leftover_snapshots(tmp_path / "never-trained", score)     # no snapshots folder: nothing to do
    assert scored == [0, 5000]


def test_a_scored_snapshot_goes_on_the_curve_is_kept_and_becomes_best_only_when_better(tmp_path):
    import csv

    from references.nuclei.train_default_bundle import record_snapshot_score

    def metrics(ap50: float) -> dict:
        per = {m: {"ap50_tp_fp_fn_pooled": ap50} for m in
               ("fluorescence", "stained_tissue", "brightfield_gray", "he_breast", "all")}
        return {**per, "all": {"ap50_tp_fp_fn_pooled": ap50, "median_rel_count_error": 0.1}}

    for step, ap50 in ((0, 0.60), (5000, 0.58), (10000, 0.65)):
        snapshot = tmp_path / "snapshots" / f"step{step:07d}"
        snapshot.mkdir(parents=True)
        (snapshot / "weights.safetensors").write_text(f"weights of step {step}")
        row = record_snapshot_score(snapshot, step, metrics(ap50), tmp_path)
        assert row["mean_of_modalities"] == ap50 and not snapshot.exists()
        assert (tmp_path / "scored" / snapshot.name / "weights.safetensors").read_text() == f"weights of step {step}"
        best = "weights of step 0" if step < 10000 else "weights of step 10000"     # 5000 was worse than 0
        assert (tmp_path / "best" / "weights.safetensors").read_text() == best
    with open(tmp_path / "heldout.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 5000, 10000]
    assert list((tmp_path / "snapshots").iterdir()) == []
    # A rescore (rescore_snapshots: the scoring changed) replaces a point where it is and may change the best.
    record_snapshot_score(tmp_path / "scored" / "step0005000", 5000, metrics(0.70), tmp_path)
    with open(tmp_path / "heldout.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["step"]), float(r["all"])) for r in rows] == [(0, 0.60), (5000, 0.70), (10000, 0.65)]
    assert (tmp_path / "scored" / "step0005000" / "weights.safetensors").read_text() == "weights of step 5000"
    assert (tmp_path / "best" / "weights.safetensors").read_text() == "weights of step 5000"


def test_snapshots_are_scored_by_the_code_the_run_started_with(tmp_path):
    """The trainer freezes the checkout's code beside OUT (frozen_code) and the scorer runs from that copy, so an edit
    of the working tree during a scoring cannot fail it; a failed scoring names its log and last line."""
    import subprocess

    import references.nuclei.train_default_bundle as train
    code = train.frozen_code(tmp_path / "run")
    assert code == tmp_path / "run.code" and not (tmp_path / "run").exists()     # OUT stays new for a new run
    assert (code / "cellseg" / "templates" / "report.html.j2").is_file()
    assert (code / "references" / "nuclei" / "validate_bundle.py").is_file()
    assert not (code / "references" / "nuclei" / "candidates").exists()     # candidate weights are not code
    # the scorer is whatever validate_bundle the frozen copy holds: here one that writes its arguments as metrics
    (code / "references" / "nuclei" / "validate_bundle.py").write_text(
        "import json, sys, pathlib\n"
        "args = sys.argv[1:]\n"
        "out = pathlib.Path(args[args.index('--out') + 1])\n"
        "out.mkdir(parents=True)\n"
        "(out / 'metrics.json').write_text(json.dumps({'args': args, 'module': __file__}))\n")
    snapshot = tmp_path / "run" / "snapshots" / "step0001000"
    snapshot.mkdir(parents=True)
    metrics = train.heldout_metrics(snapshot, out=tmp_path / "run", data_root=tmp_path / "data", per_modality=3,
                                    code=code)
    assert metrics["module"] == str(code / "references" / "nuclei" / "validate_bundle.py")
    assert metrics["args"][metrics["args"].index("--bundle") + 1] == str(snapshot)
    assert metrics["args"][-2:] == ["--per-modality", "3"]
    (code / "references" / "nuclei" / "validate_bundle.py").write_text("raise SystemExit('no held-out images')\n")
    with pytest.raises(subprocess.CalledProcessError, match="no held-out images"):
        train.heldout_metrics(snapshot, out=tmp_path / "run", data_root=tmp_path / "data", per_modality=3, code=code)
    assert (tmp_path / "run" / "heldout" / "step0001000.log").is_file()


def test_a_rescore_scores_every_kept_snapshot_again_in_place(tmp_path, monkeypatch):
    """After the scoring changed (thresholds, sweep), every kept snapshot is scored again and its point rewritten; the
    snapshots stay where they are and the best follows the new figures."""
    import csv

    import references.nuclei.train_default_bundle as train
    old = {0: 0.60, 5000: 0.62}
    new = {0: 0.61, 5000: 0.59}

    def metrics(ap50: float) -> dict:
        per = {m: {"ap50_tp_fp_fn_pooled": ap50} for m in ("fluorescence", "stained_tissue", "brightfield_gray",
                                                           "he_breast")}
        return {**per, "all": {"ap50_tp_fp_fn_pooled": ap50, "median_rel_count_error": 0.1}}

    for step, ap50 in old.items():
        snapshot = tmp_path / "snapshots" / f"step{step:07d}"
        snapshot.mkdir(parents=True)
        (snapshot / "weights.safetensors").write_text(f"weights of step {step}")
        train.record_snapshot_score(snapshot, step, metrics(ap50), tmp_path)
    assert (tmp_path / "best" / "weights.safetensors").read_text() == "weights of step 5000"
    scored = []

    def heldout_metrics(snapshot, *, out, data_root, per_modality):
        scored.append((snapshot.name, out, per_modality))
        return metrics(new[int(snapshot.name[4:])])

    # a snapshot whose scoring failed when its run resumed (score_leftover_snapshots) is scored too
    (tmp_path / "unscored" / "step0002000").mkdir(parents=True)
    (tmp_path / "unscored" / "step0002000" / "weights.safetensors").write_text("weights of step 2000")
    new[2000] = 0.63
    monkeypatch.setattr(train, "heldout_metrics", heldout_metrics)
    train.rescore_snapshots(tmp_path, data_root=tmp_path / "data", per_modality=24)
    assert scored == [("step0000000", tmp_path, 24), ("step0002000", tmp_path, 24), ("step0005000", tmp_path, 24)]
    with open(tmp_path / "heldout.csv", newline="") as f:
        assert [(int(r["step"]), float(r["all"])) for r in csv.DictReader(f)] == [(0, 0.61), (2000, 0.63),
                                                                                  (5000, 0.59)]
    assert sorted(p.name for p in (tmp_path / "scored").iterdir()) == ["step0000000", "step0002000", "step0005000"]
    assert not any((tmp_path / "unscored").iterdir())
    assert (tmp_path / "best" / "weights.safetensors").read_text() == "weights of step 2000"


def test_train_on_seen_moves_only_the_seen_held_out_images_of_one_modality(tmp_path):
    """A fine-tune that wins back a forgotten modality trains on the held-out images its lineage already saw: a
    partly seen group splits in two (GROUP-seen trains, the unseen rest stays held out), nothing else moves, and the
    command writes the split without overwriting one."""
    import subprocess
    import sys

    from references.nuclei.datasets import seen_images
    gray = [f"dsb2018/g{i}" for i in range(4)]
    split = Split(["dsb2018/f0", "dsb2018/f1"], gray + ["dsb2018/f2", "tnbc/p1"], {
        "dsb2018/brightfield_gray-1": {"modality": "brightfield_gray", "side": "val", "images": gray},
        "dsb2018/fluorescence-1": {"modality": "fluorescence", "side": "train", "images": ["dsb2018/f0", "dsb2018/f1"]},
        "dsb2018/fluorescence-2": {"modality": "fluorescence", "side": "val", "images": ["dsb2018/f2"]},
        "tnbc/patient-1": {"modality": "he_breast", "side": "val", "images": ["tnbc/p1"]}}, "grouped.")
    old = tmp_path / "stage1_split.json"     # an old random-image split: bare DSB2018 ids
    old.write_text(json.dumps({"train": ["g0", "g1", "g2", "f2", "f0"], "val": ["g3", "f1"]}))
    seen = seen_images([old])
    assert seen == {"dsb2018/g0", "dsb2018/g1", "dsb2018/g2", "dsb2018/f2", "dsb2018/f0"}
    moved = split.train_on_seen(seen, "brightfield_gray")
    assert moved.train == split.train + gray[:3] and moved.val == ["dsb2018/g3", "dsb2018/f2", "tnbc/p1"]
    assert moved.groups["dsb2018/brightfield_gray-1-seen"]["side"] == "train"
    assert moved.groups["dsb2018/brightfield_gray-1"]["images"] == ["dsb2018/g3"]
    assert moved.groups["dsb2018/fluorescence-2"] == split.groups["dsb2018/fluorescence-2"]    # seen, other modality
    assert "3 held-out brightfield_gray images" in moved.method and moved.method.startswith("grouped.")
    with pytest.raises(CellsegError, match="expected held-out he_breast images that the seen split trained on, "
                                           "found none \\(held out: 1\\)"):
        split.train_on_seen(seen, "he_breast")

    (tmp_path / "split.json").write_text(json.dumps(split.to_json()))
    command = [sys.executable, "-m", "references.nuclei.train_on_seen", "--split", str(tmp_path / "split.json"),
               "--seen", str(old), "--modality", "brightfield_gray", "--out", str(tmp_path / "gray_split.json")]
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert Split.from_json(json.loads((tmp_path / "gray_split.json").read_text())).train == moved.train
    again = subprocess.run(command, cwd=root, capture_output=True, text=True)
    assert again.returncode != 0 and "expected a new file for --out, found" in again.stderr
    assert Split.from_json(json.loads((tmp_path / "gray_split.json").read_text())).train == moved.train


def test_a_split_records_the_held_out_images_an_earlier_stage_saw_and_keeps_them_through_its_changes(tmp_path):
    """`seen`: held-out images an earlier stage of the lineage trained on. It round-trips, must lie among the held-out
    images, counts as seen for seen_images (so validate_bundle's "_unseen" figures leave it out), and images
    train_on_seen moves to the training side leave it."""
    from references.nuclei.datasets import seen_images
    gray, fluo = [f"dsb2018/g{i}" for i in range(3)], [f"dsb2018/f{i}" for i in range(3)]
    split = Split(["dsb2018/t0"], gray + fluo, {
        "dsb2018/train-1": {"modality": "fluorescence", "side": "train", "images": ["dsb2018/t0"]},
        "dsb2018/brightfield_gray-1": {"modality": "brightfield_gray", "side": "val", "images": gray},
        "dsb2018/fluorescence-2": {"modality": "fluorescence", "side": "val", "images": fluo}}, "grouped.")
    stage1 = tmp_path / "stage1_split.json"      # an old random-image split: bare DSB2018 ids
    stage1.write_text(json.dumps({"train": ["g0", "f1", "t0", "elsewhere"], "val": ["g1"]}))
    recorded = split.with_seen(seen_images([stage1]))
    assert recorded.seen == ["dsb2018/f1", "dsb2018/g0"]            # only held-out images are recorded
    assert "seen" not in split.to_json() and Split.from_json(recorded.to_json()) == recorded
    (tmp_path / "split.json").write_text(json.dumps(recorded.to_json()))
    assert seen_images([tmp_path / "split.json"]) == {"dsb2018/t0", "dsb2018/f1", "dsb2018/g0"}
    moved = recorded.train_on_seen({"dsb2018/g0"}, "brightfield_gray")
    assert "dsb2018/g0" in moved.train and moved.seen == ["dsb2018/f1"]
    bad = recorded.to_json() | {"seen": ["dsb2018/t0"]}
    with pytest.raises(CellsegError, match="expected the 'seen' images among the held-out ones, found 1"):
        Split.from_json(bad)


def test_the_v4_split_records_every_held_out_image_the_lineages_first_stages_trained_on():
    """The v3 and v4 bundles descend from stages 1-2 trained on a random-image split of DSB2018 (splits/stage12.json):
    137 of the v4 split's held-out images were on its training side, and the v4 split says so, so figures on "images
    no training stage saw" leave them out whichever --seen is given."""
    from references.nuclei.datasets import seen_images
    splits = Path(__file__).resolve().parents[2] / "references" / "nuclei" / "splits"
    v4 = Split.from_json(json.loads((splits / "v4.json").read_text()))
    first_stages = seen_images([splits / "stage12.json"])
    assert set(v4.seen) == first_stages & set(v4.val) and len(v4.seen) == 137
    assert not first_stages & set(v4.val) - set(v4.seen)


def test_an_id_given_to_nuclei_apart_is_read_as_that_many_nuclei_and_a_nucleus_drawn_under_another_as_one(tmp_path):
    """datasets.separate_shared_ids: Kromp's held-out Wilms section gives 48 of its 55 ids to two nuclei each; read as
    one, every such nucleus the model finds counted as a false one. Parts lying apart on background are nuclei of
    their own; the two visible sides of a nucleus drawn under another, and stray pixels, stay one nucleus. The same
    for annotations as COCO masks (validate_bundle's ground truth)."""
    import pycocotools.mask as mask_utils

    from cellseg.evaluation import ImageMasks
    from references.nuclei.datasets import read_pixels, separate_shared_ids, separated_annotations

    labels = np.zeros((60, 80), np.uint16)
    labels[5:15, 5:15] = 7          # id 7: two nuclei far apart on background
    labels[40:50, 50:60] = 7
    labels[30:38, 5:25] = 3         # id 3: one nucleus under id 4, its two sides visible
    labels[28:40, 12:18] = 4
    labels[5:15, 40:50] = 9         # id 9: one nucleus with 2 stray pixels apart
    labels[20, 60:62] = 9
    out = separate_shared_ids(labels)
    assert out.dtype == np.int32 and sorted(np.unique(out)) == [0, 3, 4, 7, 9, 10]
    assert (out[5:15, 5:15] == 7).all() and (out[40:50, 50:60] == 10).all()     # the larger part keeps its id
    for kept in (3, 4, 9):
        assert ((out == kept) == (labels == kept)).all()
    assert separate_shared_ids(out).tolist() == out.tolist()                  # nothing left to separate

    def rle(mask):
        return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))

    ids = (3, 4, 7, 9)
    truth = ImageMasks("a.png", 1, 60, 80, [rle(labels == k) for k in ids], np.zeros((4, 4), np.int64), np.ones(4),
                       np.zeros(4, bool), False)
    separated = separated_annotations(truth)
    assert len(separated) == 5 and separated.rles[:2] == truth.rles[:2] and separated.rles[3] == truth.rles[3]
    assert (mask_utils.decode(separated.rles[2]) == (out == 7)).all()
    assert (mask_utils.decode(separated.rles[4]) == (out == 10)).all()
    assert separated.boxes[4].tolist() == [40, 50, 50, 60] and not separated.iscrowd.any()
    assert separated_annotations(separated) is separated                      # one nucleus an id: unchanged

    # training reads an image's labels this way too
    image = AnnotatedImage("kromp", "x", "fluorescence_kromp", tmp_path / "x.png", tmp_path / "x.tif", 60, 80, 1)
    Image.fromarray(np.zeros((60, 80), np.uint8)).save(image.image_path)
    tifffile.imwrite(image.labels_path, labels)
    assert read_pixels(image)[1].tolist() == out.tolist()
