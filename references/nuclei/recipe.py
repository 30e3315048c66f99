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

from .datasets import DATASET_FOLDERS, AnnotatedImage, Split, image_file, make_split, read_dataset, read_pixels

log = logging.getLogger(__name__)

# How often each modality's images are drawn (renormalised over the modalities present in training): fluorescence
# is most of what users bring, but H&E is where the model was weakest; grayscale brightfield is held out whole.
DEFAULT_MIX = {"fluorescence": 0.4, "stained_tissue": 0.25, "he_breast": 0.25, "brightfield_gray": 0.1}
DATA_CREDITS = {
    "dsb2018": ("DSB2018 stage1_train (BBBC038) with community mask fixes (Caicedo et al., \"Nucleus segmentation "
                "across imaging experiments: the 2018 Data Science Bowl\", Nature Methods 16, 1247-1253, 2019), "
                "licence CC0 1.0"),
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


def modality_weights(images: list[AnnotatedImage], mix: dict[str, float]) -> tuple[np.ndarray, str]:
    """Per-image draw weights giving each modality its share of `mix` (renormalised over those present)."""
    present = sorted({im.modality for im in images})
    unknown = [m for m in present if m not in mix]
    if unknown:
        raise CellsegError(f"expected a draw share for every modality in training, found none for {unknown}")
    total = sum(mix[m] for m in present)
    if total <= 0:
        raise CellsegError(f"expected a positive draw share for some modality in training ({present})")
    counts = {m: sum(im.modality == m for im in images) for m in present}
    weights = np.array([mix[im.modality] / total / counts[im.modality] for im in images])
    text = ", ".join(f"{m} {mix[m] / total:.2f} ({counts[m]} images)" for m in present)
    return weights, text


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


def run_recipe(data_root: Path, out: Path, settings, *, split_file: Path | None = None, init: str = "none",
               mix: dict[str, float] | None = None, model_cfg=None, resume: bool = False, device: str = "cpu",
               limit: int | None = None, reproduce: str = "", progress: bool = True, on_snapshot=None) -> Path:
    """Train the nuclei bundle on the split's training images into `out` (see cellseg.training.maskrcnn.train; on_snapshot is
    its callback for settings.snapshot_every)."""
    from cellseg.training import check_output_folder, train, train_image_from_labels
    check_output_folder(out, resume)   # before minutes of loading, not after
    split = load_split(data_root, split_file or (out / "split.json" if resume else None))
    chosen = training_images(data_root, split)[:limit]
    items = [train_image_from_labels(*read_pixels(im)) for im in chosen]
    weights, mix_text = modality_weights(chosen, mix or DEFAULT_MIX)
    log.info("loaded %d training images, %d instances; draw shares: %s", len(items),
             sum(len(i.masks) for i in items), mix_text)
    datasets = sorted({k.split("/")[0] for k in split.train + split.val})
    card = {"data": {"datasets": [DATA_CREDITS[d] for d in datasets if d in DATA_CREDITS],
                     "train_images": len(split.train), "val_images": len(split.val),
                     "split": "Held out: whole acquisition groups (DSB2018) and whole patients (TNBC). " + split.method
                              + " See split.json.",
                     "sampling": f"images drawn by modality: {mix_text}"},
            "training": {"mix": mix_text, "reproduce": reproduce}}
    return train(items, ["nucleus"], out, settings, model_cfg=model_cfg, resume=resume, device=device, card=card,
                 init=init, sample_weights=weights, progress=progress, on_snapshot=on_snapshot,
                 files={"split.json": json.dumps(split.to_json(), indent=1)})


def pack_training_data(data_root: Path, split: Split, out: Path, jpeg_quality: int = 95) -> int:
    """Copy the split's training images into `out` (same layout, manifests listing only them) for a machine that
    cannot read `data_root`: images re-encoded as JPEG at `jpeg_quality` (no chroma subsampling; DSB2018's noisy
    PNGs are 3x larger), labels as they are; split.json beside them. Returns the bytes written."""
    import shutil

    from PIL import Image
    out = Path(out)
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
        with open(out / folder / "manifest.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(keep)
        for row in keep:
            image_id = row["image_id"]
            src = image_file(source, image_id)
            target = out / folder / "images" / f"{image_id}.jpg"
            if src.suffix.lower() in (".jpg", ".jpeg"):
                shutil.copyfile(src, target)           # already JPEG: never re-encoded twice
            else:
                with Image.open(src) as im:
                    pixels = np.asarray(im)
                pixels = pixels[..., :3] if pixels.ndim == 3 else pixels
                Image.fromarray(pixels).save(target, quality=jpeg_quality, subsampling=0)
            shutil.copyfile(source / "labels" / f"{image_id}.tif", out / folder / "labels" / f"{image_id}.tif")
            total += target.stat().st_size + (out / folder / "labels" / f"{image_id}.tif").stat().st_size
    (out / "split.json").write_text(json.dumps(split.to_json(), indent=1), encoding="utf-8")
    return total
