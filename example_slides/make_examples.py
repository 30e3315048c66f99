"""Build the example slides in this folder from held-out DSB2018 (BBBC038, CC0) nuclei images.

    python example_slides/make_examples.py [--data ../shared/data/dsb2018-train] [--out example_slides]

Every pasted image comes from the validation split that the shipped model was NOT trained on:
`stratified_split(manifest, val_fraction=0.1, seed=0)` from scripts/train_default_bundle.py, imported
(not copied) so the examples follow that split exactly. No image is used twice.

Deterministic: the image choice is a fixed rule over the split and manifest.csv, the noise is seeded and
the OME UUIDs are fixed, so the same data always gives byte-identical files. See README.md in this folder
for what each file is.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import logging
import shutil
import uuid
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from skimage.segmentation import relabel_sequential

log = logging.getLogger("make_examples")

HERE = Path(__file__).resolve().parent
TRAIN_SCRIPT = HERE.parent / "scripts" / "train_default_bundle.py"
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "dsb2018-train"
VAL_FRACTION, SPLIT_SEED = 0.1, 0  # must match what scripts/train_default_bundle.py uses
SEED = 2018
FLUO_MPP = 0.5  # nominal: DSB2018 gives no pixel size
HE_MPP = 0.25  # nominal
FLUO_MAX_DIAMETER_PX = 30.0  # one magnification: leave out the val images with 35-52 px nuclei
# Val stained-tissue image left out: its out-of-focus nuclei are not annotated, so a count would be
# "wrong" against its labels for no fault of the model.
HE_EXCLUDED = {"8f27ebc74164eddfe989a98a754dcf5a9c85ef599a1321de24bcf097df1814ca"}

# Slide layouts: (row0, col0, (height, width)) of each pasted image. Offsets are deliberately not
# multiples of 256, so the seams of 256-, 384- and 512-px tile grids run through images and cross nuclei.
S256, S320, S520, S603 = (256, 256), (256, 320), (520, 696), (603, 1272)
FLUO_SIZE = (2048, 2048)
FLUO_LAYOUT = (
    [(32, 32, S603), (32, 1336, S320), (32, 1688, S320), (320, 1336, S256), (320, 1688, S256),
     (667, 32, S520), (667, 760, S520),
     (667, 1480, S256), (667, 1760, S256), (955, 1480, S256), (955, 1760, S256)]
    + [(r, 32 + 288 * k, S256) for r in (1243, 1531) for k in range(7)])
# empty_regions: a 4096 x 4096 field where 5 separate regions (8.8 % of the area) hold nuclei;
# inside a region the images abut.
EMPTY_SIZE = (4096, 4096)
EMPTY_LAYOUT = (
    [(300 + 256 * i, 420 + 256 * j, S256) for i in range(2) for j in range(2)]  # 2 x 2 block
    + [(900 + 256 * i, 2600 + 256 * j, S256) for i in range(2) for j in range(2)]  # 2 x 2 block
    + [(1700, 2900, S520)]  # one sparse 520 x 696 field
    + [(2600 + 256 * i, 700 + 256 * j, S256) for i in range(2) for j in range(3)]  # 2 x 3 block
    + [(3500, 2300 + 256 * j, S256) for j in range(3)])  # 1 x 3 strip


def validation_split(data: Path) -> list[str]:
    """The held-out image ids of the shipped model, from the training script itself."""
    spec = importlib.util.spec_from_file_location("train_default_bundle", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports torch and cellseg.training.maskrcnn, as the training run does
    split = module.stratified_split(data / "manifest.csv", val_fraction=VAL_FRACTION, seed=SPLIT_SEED)
    if set(split["val"]) & set(split["train"]):
        raise RuntimeError("expected disjoint train and val splits, got overlapping ones")
    return split["val"]


def load_manifest(data: Path) -> dict[str, dict]:
    with open(data / "manifest.csv", newline="") as fh:
        return {r["image_id"]: r for r in csv.DictReader(fh)}


def read_labels(data: Path, image_id: str) -> np.ndarray:
    lab, _, _ = relabel_sequential(tifffile.imread(data / "labels" / f"{image_id}.tif").astype(np.uint32))
    return lab


def median_diameter(labels: np.ndarray) -> float:
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas > 0]
    return float(np.median(np.sqrt(4 * areas / np.pi))) if len(areas) else 0.0


def assign(layout: list, pools: dict[tuple[int, int], list[str]], rng: np.random.Generator) -> list:
    """Fill each layout slot with an image of its size: each pool in a seeded random order, each image once."""
    queues = {shape: [ids[k] for k in rng.permutation(len(ids))] for shape, ids in pools.items()}
    for shape in {s for *_, s in layout}:
        n = sum(1 for *_, s in layout if s == shape)
        if len(queues.get(shape, [])) < n:
            raise RuntimeError(f"expected {n} val images of {shape} px, got {len(queues.get(shape, []))}")
    slots = [(r, c, queues[shape].pop(0)) for r, c, shape in layout]
    if any(queues.values()):
        raise RuntimeError(f"expected every chosen image placed, left over: {queues}")
    return slots


def fluorescence_pools(data: Path, rows: dict[str, dict], val: list[str]):
    """Split the val fluorescence images with DSB-typical nuclei (median diameter <= 30 px) between
    fluo_mosaic (the most crowded ones) and empty_regions (the sparsest ones)."""
    diam = {}
    for i in sorted(val):
        if rows[i]["modality_guess"] == "fluorescence" and rows[i]["has_overlapping_masks"] == "0":
            diam[i] = median_diameter(read_labels(data, i))
    usable = sorted(i for i in diam if diam[i] <= FLUO_MAX_DIAMETER_PX)
    log.info("val fluorescence: %d images, %d with median nucleus diameter <= %.0f px (%.1f-%.1f px)",
             len(diam), len(usable), FLUO_MAX_DIAMETER_PX, min(diam[i] for i in usable),
             max(diam[i] for i in usable))
    by_shape: dict[tuple[int, int], list[str]] = {}
    for i in sorted(usable, key=lambda i: (-int(rows[i]["n_nuclei"]), i)):  # most nuclei first
        by_shape.setdefault((int(rows[i]["height"]), int(rows[i]["width"])), []).append(i)
    need = {shape: sum(1 for *_, s in FLUO_LAYOUT if s == shape) for shape in by_shape}
    mosaic = {shape: ids[:need[shape]] for shape, ids in by_shape.items() if need[shape]}
    empty = {shape: ids[need[shape]:] for shape, ids in by_shape.items() if ids[need[shape]:]}
    return mosaic, empty


def stained_choice(rows: dict[str, dict], val: list[str]) -> tuple[str, list[str]]:
    """he_patch: the val stained-tissue image with the most nuclei; he_mosaic: the other 9."""
    cands = sorted((i for i in val if rows[i]["modality_guess"] == "brightfield_color_histology"
                    and rows[i]["has_overlapping_masks"] == "0" and i not in HE_EXCLUDED),
                   key=lambda i: (-int(rows[i]["n_nuclei"]), i))
    if len(cands) != 10:
        raise RuntimeError(f"expected 10 usable val stained-tissue images, got {len(cands)}")
    return cands[0], cands[1:]


def paste(data: Path, slots: list, background: np.ndarray):
    """Paste images over `background`; labels relabelled unique across images (uint32)."""
    image = background
    labels = np.zeros(image.shape[:2], np.uint32)
    occupied = np.zeros(image.shape[:2], bool)
    next_label = 1
    placed = []
    for r, c, image_id in slots:
        img = np.asarray(Image.open(data / "images" / f"{image_id}.png"))
        lab = read_labels(data, image_id)
        h, w = lab.shape
        if r + h > image.shape[0] or c + w > image.shape[1] or occupied[r:r + h, c:c + w].any():
            raise RuntimeError(f"image {image_id} at ({r}, {c}) leaves the slide or overlaps another")
        image[r:r + h, c:c + w] = img.reshape(image[r:r + h, c:c + w].shape)
        labels[r:r + h, c:c + w] = np.where(lab > 0, lab + (next_label - 1), 0)
        occupied[r:r + h, c:c + w] = True
        placed.append((r, c, h, w, next_label - 1, int(lab.max()), image_id))
        next_label += int(lab.max())
    return image, labels, placed


def dark_background(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Dark fluorescence background: uneven illumination (a broad off-centre bright area, a dimmer haze
    and a left-right gradient: about 3-9 grey levels) plus sparse noise (2 % of pixels off by +-1 or
    +-2). The noise is sparse on purpose: i.i.d. noise on every pixel (even +-2 levels) costs over
    2 bits/px under deflate, about 4 MB for a 4096^2 field."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy / h, xx / w
    illum = (3.0 + 3.0 * np.exp(-((yy - 0.42) ** 2 + (xx - 0.58) ** 2) / 0.18)
             + 1.5 * np.exp(-((yy - 0.85) ** 2 + (xx - 0.15) ** 2) / 0.05) + 1.5 * xx)
    noise = np.where(rng.random(shape, np.float32) < 0.02, rng.choice(np.array([-2, -1, 1, 2]), shape), 0)
    return np.clip(np.rint(illum) + noise, 0, 255).astype(np.uint8)


def pyramid(image: np.ndarray, min_side: int = 512) -> list[np.ndarray]:
    """Level 0 and 2x2-mean reductions until the longer side is <= min_side."""
    levels = [image]
    while max(levels[-1].shape[:2]) > min_side:
        a = levels[-1].astype(np.float32)
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        a = a[:h, :w]
        levels.append(np.rint((a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]) / 4)
                      .astype(image.dtype))
    return levels


def write_ome_pyramid(path: Path, levels: list[np.ndarray], mpp: float, name: str,
                      channel: str | None, predictor: bool = True) -> None:
    rgb = levels[0].ndim == 3
    # A fixed UUID (from the name) keeps regenerated files byte-identical.
    meta = {"axes": "YXS" if rgb else "YX", "Name": name, "UUID": str(uuid.uuid5(uuid.NAMESPACE_URL, name)),
            "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm"}
    if channel:
        meta["Channel"] = {"Name": [channel]}
    opts = dict(tile=(256, 256), compression="zlib", compressionargs={"level": 9}, predictor=predictor,
                photometric="rgb" if rgb else "minisblack")
    with tifffile.TiffWriter(path, bigtiff=False, ome=True) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, metadata=meta, **opts)
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, **opts)  # reduced-resolution SubIFDs of level 0


def write_labels(path: Path, labels: np.ndarray, mpp: float) -> None:
    tifffile.imwrite(path, labels, tile=(256, 256), compression="zlib", compressionargs={"level": 9},
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER", metadata=None)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="DSB2018 training folder")
    ap.add_argument("--out", type=Path, default=HERE, help="output folder")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = load_manifest(args.data)
    val = validation_split(args.data)
    log.info("validation split: %d images", len(val))
    args.out.mkdir(parents=True, exist_ok=True)
    mosaic_pool, empty_pool = fluorescence_pools(args.data, rows, val)

    # Fluorescence mosaic, 2048 x 2048: the 603 x 1272 image, two 520 x 696, two 256 x 320 and twenty
    # 256 x 256 val images (the most crowded ones) over dark Gaussian noise.
    rng = np.random.default_rng(SEED)
    bg = np.clip(rng.normal(6.0, 1.5, FLUO_SIZE), 0, 255).round().astype(np.uint8)
    image, labels, placed = paste(args.data, assign(FLUO_LAYOUT, mosaic_pool, rng), bg)
    sources = [("fluo_mosaic.ome.tif", *p) for p in placed]
    write_ome_pyramid(args.out / "fluo_mosaic.ome.tif", pyramid(image), FLUO_MPP,
                      "DSB2018 validation-split fluorescence mosaic", "nuclei")
    write_labels(args.out / "fluo_mosaic_labels.tif", labels, FLUO_MPP)
    log.info("fluo_mosaic: %d images, %d nuclei", len(placed), labels.max())

    # Mostly empty fluorescence field, 4096 x 4096, for tissue-prefilter benchmarks: the remaining
    # (sparsest) val fluorescence images in 5 regions over a dark, unevenly lit background.
    rng = np.random.default_rng(SEED + 2)
    bg = dark_background(EMPTY_SIZE, rng)
    image, labels, placed = paste(args.data, assign(EMPTY_LAYOUT, empty_pool, rng), bg)
    sources += [("empty_regions.ome.tif", *p) for p in placed]
    write_ome_pyramid(args.out / "empty_regions.ome.tif", pyramid(image), FLUO_MPP,
                      "DSB2018 validation-split sparse fluorescence field", "nuclei", predictor=False)
    write_labels(args.out / "empty_regions_labels.tif", labels, FLUO_MPP)
    log.info("empty_regions: %d images, %d nuclei, %.1f %% of the area pasted", len(placed), labels.max(),
             100 * sum(p[2] * p[3] for p in placed) / (EMPTY_SIZE[0] * EMPTY_SIZE[1]))

    # One stained-tissue image as a plain PNG (byte copy of the DSB file) and its labels.
    he_patch, he_ids = stained_choice(rows, val)
    shutil.copyfile(args.data / "images" / f"{he_patch}.png", args.out / "he_patch.png")
    shutil.copyfile(args.data / "labels" / f"{he_patch}.tif", args.out / "he_patch_labels.tif")
    lab = tifffile.imread(args.out / "he_patch_labels.tif")
    sources.append(("he_patch.png", 0, 0, *lab.shape, 0, int(lab.max()), he_patch))

    # H&E mosaic: 3 x 3 val images (256 x 320) on a light, slightly noisy glass-like background.
    rng = np.random.default_rng(SEED + 1)
    bg = np.clip(rng.normal((236, 233, 238), 1.5, (864, 1056, 3)), 0, 255).round().astype(np.uint8)
    he_layout = [(24 + 280 * i, 24 + 344 * j, S320) for i in range(3) for j in range(3)]
    image, labels, placed = paste(args.data, assign(he_layout, {S320: he_ids}, rng), bg)
    sources += [("he_mosaic.ome.tif", *p) for p in placed]
    write_ome_pyramid(args.out / "he_mosaic.ome.tif", pyramid(image), HE_MPP,
                      "DSB2018 validation-split H&E mosaic", None)
    write_labels(args.out / "he_mosaic_labels.tif", labels, HE_MPP)
    log.info("he_mosaic: %d images, %d nuclei", len(placed), labels.max())

    # Provenance: where each DSB image sits in each slide, and which label ids it got.
    with open(args.out / "sources.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["slide", "row0", "col0", "height", "width", "label_offset", "n_nuclei", "dsb_image_id",
                    "split"])
        w.writerows(s + ("val",) for s in sources)
    used = [s[-1] for s in sources]
    if len(set(used)) != len(used) or not set(used) <= set(val):
        raise RuntimeError("expected each example image once and only from the val split")


if __name__ == "__main__":
    main()
