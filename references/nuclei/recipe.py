"""The default nuclei bundle's training recipe: which data, which split, which draw shares, which credits.

train_default_bundle.py is its command line (CPU and GPU runs alike); tests run it with a tiny network. It trains
through cellseg's own training code (cellseg.training.maskrcnn). Data: a folder holding `dsb2018-train/` and `tnbc-train/`
(datasets.py's layout); the split holds out whole acquisition groups and patients and is written beside the bundle
(split.json); only its "train" images are read.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np

from cellseg.errors import CellsegError

from .datasets import (
    DATASET_DIAMETER,
    DATASET_FOLDERS,
    AnnotatedImage,
    Split,
    image_file,
    make_split,
    read_dataset,
    read_pixels,
)

log = logging.getLogger(__name__)

# How often each modality's images are drawn (renormalised over the modalities present in training): fluorescence
# is most of what users bring; stained tissue is where the v3 model misses most (issue 47), so it keeps its share;
# H&E's share is split between TNBC (one organ) and NuInsSeg (25 organs), fluorescence's between DSB2018 and Kromp
# (the dense sections and imprints DSB2018 has few of).
DEFAULT_MIX = {"fluorescence": 0.3, "fluorescence_kromp": 0.12, "stained_tissue": 0.25, "he_breast": 0.1,
               "he_nuinsseg": 0.13, "brightfield_gray": 0.1}
# Within a modality, images of these groups (name prefix) are drawn this many times as often as the others: Kromp's
# tissue sections, the dense fluorescence sections the v3 model undercounts by 10 % (issue 47).
GROUP_WEIGHT = {"kromp/tissue_section-": 3.0}
DATA_CREDITS = {
    "dsb2018": ("DSB2018 stage1_train (BBBC038) with community mask fixes (Caicedo et al., \"Nucleus segmentation "
                "across imaging experiments: the 2018 Data Science Bowl\", Nature Methods 16, 1247-1253, 2019), "
                "licence CC0 1.0"),
    "kromp": ("Kromp F, Bozsaky E, Rifatbegovic F, et al., \"An annotated fluorescence image dataset for training "
              "nuclear segmentation methods\", Scientific Data 7, 262 (2020); BioStudies S-BSST265, licence CC0 1.0"),
    "nuinsseg": ("NuInsSeg (Mahbod A, Polak C, Feldmann K, et al., \"NuInsSeg: A fully annotated dataset for nuclei "
                 "instance segmentation in H&E-stained histological images\", Scientific Data 11, 295, 2024; Zenodo "
                 "record 10518968), licence CC BY 4.0, images re-encoded as JPEG quality 95"),
    "tnbc": ("TNBC nuclei (Naylor P, Laé M, Reyal F, Walter T, \"Segmentation of Nuclei in Histopathology Images by "
             "Deep Regression of the Distance Map\", IEEE Transactions on Medical Imaging 38(2):448-459, 2019; Zenodo "
             "record 1175282), licence CC BY 4.0, relabelled to consecutive ids and converted to COCO"),
}


def parse_mix(text: str | None) -> dict[str, float]:
    """'fluorescence=0.45,he_breast=0.25' -> shares; None -> DEFAULT_MIX."""
    if not text:
        return dict(DEFAULT_MIX)
    mix = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            mix[name.strip()] = float(value)
        except ValueError:
            raise CellsegError(f"expected draw shares as modality=number, found {part!r}") from None
        if not sep or mix[name.strip()] < 0:
            raise CellsegError(f"expected draw shares as modality=number >= 0, found {part!r}")
    return mix


def parse_augmentation(text: str | None):
    """'invert_p=0.2,gray_p=0.1' -> the default Augmentation with those scalar fields changed; None -> the default."""
    import dataclasses

    from cellseg.training import Augmentation
    default = Augmentation()
    if not text:
        return default
    scalars = {f.name for f in dataclasses.fields(Augmentation) if isinstance(getattr(default, f.name), float)}
    changes = {}
    for part in text.split(","):
        name, sep, value = (t.strip() for t in part.partition("="))
        if name not in scalars:
            raise CellsegError(f"expected augmentation settings as one of {', '.join(sorted(scalars))}=number, "
                               f"found {part!r}")
        try:
            changes[name] = float(value)
        except ValueError:
            raise CellsegError(f"expected augmentation settings as name=number, found {part!r}") from None
        if name.endswith("_p") and not 0 <= changes[name] <= 1:
            raise CellsegError(f"expected a probability between 0 and 1 for {name}, found {value}")
    return dataclasses.replace(default, **changes)


def modality_weights(images: list[AnnotatedImage], mix: dict[str, float],
                     groups: dict[str, str] | None = None) -> tuple[np.ndarray, str]:
    """Per-image draw weights giving each modality its share of `mix` (renormalised over those present); within a
    modality, images of a GROUP_WEIGHT group (groups: image key -> group) weigh that much more."""
    present = sorted({im.modality for im in images})
    unknown = [m for m in present if m not in mix]
    if unknown:
        raise CellsegError(f"expected a draw share for every modality in training, found none for {unknown}")
    total = sum(mix[m] for m in present)
    if total <= 0:
        raise CellsegError(f"expected a positive draw share for some modality in training ({present})")
    within = np.array([next((w for prefix, w in GROUP_WEIGHT.items()
                             if (groups or {}).get(im.key, "").startswith(prefix)), 1.0) for im in images])
    counts = {m: sum(w for im, w in zip(images, within) if im.modality == m) for m in present}
    weights = np.array([mix[im.modality] / total * w / counts[im.modality] for im, w in zip(images, within)])
    text = ", ".join(f"{m} {mix[m] / total:.2f} ({sum(im.modality == m for im in images)} images)" for m in present)
    if groups and any(w != 1.0 for w in within):
        text += "; within a modality " + ", ".join(f"{p}* x{w:g}" for p, w in GROUP_WEIGHT.items())
    return weights, text


def at_training_scale(pixels: np.ndarray, labels: np.ndarray, target_px: float) -> tuple[np.ndarray, np.ndarray]:
    """An image and its labels resampled so that their median nucleus diameter is `target_px`, as `--diameter auto`
    resamples a slide for counting (left as they are within 10 %, as there). For the datasets whose images hold
    nuclei beyond the zoom augmentation's reach (DATASET_DIAMETER: Kromp's 63x, 50-180 px)."""
    from skimage.transform import resize
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas > 0]
    if not areas.size:
        return pixels, labels
    factor = target_px / float(np.median(2 * np.sqrt(areas / np.pi)))
    if abs(factor - 1) <= 0.1:
        return pixels, labels
    shape = (max(8, round(labels.shape[0] * factor)), max(8, round(labels.shape[1] * factor)))
    resized = resize(pixels, (*shape, pixels.shape[-1]), order=1, anti_aliasing=factor < 1, preserve_range=True)
    return (np.round(resized).astype(pixels.dtype),
            resize(labels, shape, order=0, anti_aliasing=False, preserve_range=True).astype(labels.dtype))


def load_split(data_root: Path, split_file: Path | None) -> Split:
    """The split in `split_file`, or a new one made from the datasets under `data_root`."""
    if split_file is not None:
        try:
            return Split.from_json(json.loads(Path(split_file).read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            raise CellsegError(f"expected a split JSON file at {split_file}: {e}") from e
    folders = {name: data_root / folder for name, folder in DATASET_FOLDERS.items() if (data_root / folder).is_dir()}
    if not folders:
        raise CellsegError(f"expected {' or '.join(DATASET_FOLDERS.values())} under {data_root}, found neither")
    return make_split(folders, progress=True)[0]


def training_images(data_root: Path, split: Split) -> list[AnnotatedImage]:
    """The split's training images, found under `data_root` (held-out images need not be there)."""
    available = {im.key: im for name, folder in DATASET_FOLDERS.items() if (data_root / folder).is_dir()
                 for im in read_dataset(data_root / folder, name)}
    missing = [k for k in split.train if k not in available]
    if missing:
        raise CellsegError(f"expected every training image of the split under {data_root}, found {len(missing)} "
                           f"missing (e.g. {missing[0]})")
    return [available[k] for k in split.train]


def training_diameter_px(init: str) -> float:
    """The nucleus diameter resampled datasets are brought to: the starting bundle's, else the shipped bundle's."""
    from cellseg.bundles import load_bundle
    start = Path(init) if init not in ("none", "coco") and not init.startswith("coco:") and Path(init).is_dir() \
        else Path(__file__).resolve().parents[2] / "cellseg" / "models" / "nuclei"
    return float(load_bundle(start).nucleus_diameter_px)


def run_recipe(data_root: Path, out: Path, settings, *, split_file: Path | None = None, init: str = "none",
               mix: dict[str, float] | None = None, model_cfg=None, resume: bool = False, device: str = "cpu",
               limit: int | None = None, reproduce: str = "", progress: bool = True, on_snapshot=None,
               keep_settings_of: Path | None = None) -> Path:
    """Train the nuclei bundle on the split's training images into `out` (see cellseg.training.maskrcnn.train; on_snapshot is
    its callback for settings.snapshot_every, keep_settings_of the bundle whose thresholds and count size its bundles keep)."""
    from cellseg.training import check_output_folder, train, train_image_from_labels
    check_output_folder(out, resume)   # before minutes of loading, not after
    split = load_split(data_root, split_file or (out / "split.json" if resume else None))
    chosen = training_images(data_root, split)[:limit]
    target_px = training_diameter_px(init)
    items = [train_image_from_labels(*(at_training_scale(*read_pixels(im), target_px)
                                       if DATASET_DIAMETER.get(im.dataset) == "auto" else read_pixels(im)))
             for im in chosen]
    group_of = {k: g for g, t in split.groups.items() for k in t["images"]}
    weights, mix_text = modality_weights(chosen, mix or DEFAULT_MIX, group_of)
    log.info("loaded %d training images, %d instances; draw shares: %s", len(items),
             sum(len(i.masks) for i in items), mix_text)
    datasets = sorted({k.split("/")[0] for k in split.train + split.val})
    card = {"data": {"datasets": [DATA_CREDITS[d] for d in datasets if d in DATA_CREDITS],
                     "train_images": len(split.train), "val_images": len(split.val),
                     "split": "Held out: whole acquisition groups (DSB2018) and whole patients (TNBC). " + split.method
                              + " See split.json.",
                     "sampling": f"images drawn by modality: {mix_text}"},
            "training": {"mix": mix_text, "reproduce": reproduce}}
    resampled = sorted(d for d in datasets if DATASET_DIAMETER.get(d) == "auto")
    if resampled:
        card["data"]["scale"] = (f"{', '.join(resampled)} images resampled so that their median nucleus diameter is "
                                 f"{target_px:.1f} px, as --diameter auto counts them; the others at their native scale")
    return train(items, ["nucleus"], out, settings, model_cfg=model_cfg, resume=resume, device=device, card=card,
                 init=init, sample_weights=weights, progress=progress, on_snapshot=on_snapshot,
                 keep_settings_of=keep_settings_of, files={"split.json": json.dumps(split.to_json(), indent=1)})


def pack_training_data(data_root: Path, split: Split, out: Path, jpeg_quality: int = 95) -> int:
    """Copy the split's training images into `out` (same layout, manifests listing only them) for a machine that
    cannot read `data_root`: images re-encoded as JPEG at `jpeg_quality` (no chroma subsampling; DSB2018's noisy
    PNGs are 3x larger), labels as they are; the images of a DATASET_DIAMETER "auto" dataset (Kromp) at the training
    scale, with their labels; split.json beside them. Returns the bytes written."""
    import shutil

    from PIL import Image
    out = Path(out)
    target_px = training_diameter_px("none")
    if out.exists() and any(out.iterdir()):
        raise CellsegError(f"expected a new or empty folder for the training data pack, found {out} holding files")
    wanted = set(split.train)
    total = 0
    for name, folder in DATASET_FOLDERS.items():
        source = data_root / folder
        if not source.is_dir():
            continue
        with open(source / "manifest.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        keep = [r for r in rows if f"{name}/{r['image_id']}" in wanted]
        (out / folder / "images").mkdir(parents=True, exist_ok=True)
        (out / folder / "labels").mkdir(exist_ok=True)
        resample = DATASET_DIAMETER.get(name) == "auto"
        annotated = {im.image_id: im for im in read_dataset(source, name)} if resample else {}
        for row in keep:
            image_id = row["image_id"]
            src = image_file(source, image_id)
            target = out / folder / "images" / f"{image_id}.jpg"
            labels_target = out / folder / "labels" / f"{image_id}.tif"
            if resample:      # packed at the training scale run_recipe would bring it to (a few times smaller)
                import tifffile
                pixels, labels = at_training_scale(*read_pixels(annotated[image_id]), target_px)
                row.update(height=labels.shape[0], width=labels.shape[1])
                Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(
                    target, quality=jpeg_quality, subsampling=0)
                tifffile.imwrite(labels_target, labels, compression="zlib")
            elif src.suffix.lower() in (".jpg", ".jpeg"):
                shutil.copyfile(src, target)           # already JPEG: never re-encoded twice
            else:
                with Image.open(src) as im:
                    pixels = np.asarray(im)
                pixels = pixels[..., :3] if pixels.ndim == 3 else pixels
                Image.fromarray(pixels).save(target, quality=jpeg_quality, subsampling=0)
            if not resample:
                shutil.copyfile(source / "labels" / f"{image_id}.tif", labels_target)
            total += target.stat().st_size + labels_target.stat().st_size
        with open(out / folder / "manifest.csv", "w", newline="", encoding="utf-8") as f:   # sizes as packed
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(keep)
    (out / "split.json").write_text(json.dumps(split.to_json(), indent=1), encoding="utf-8")
    return total
