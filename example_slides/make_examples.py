"""Build the example slides in this folder from DSB2018 (BBBC038, CC0) nuclei images.

    python example_slides/make_examples.py [--data ../shared/data/dsb2018-train] [--out example_slides]

Deterministic: the image choice is a fixed rule over manifest.csv and the noise is seeded, so the
same data always gives byte-identical files. See README.md in this folder for what each file is.
"""

from __future__ import annotations

import argparse
import csv
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
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "dsb2018-train"
SEED = 2018
FLUO_MPP = 0.5  # nominal: DSB2018 gives no pixel size
HE_MPP = 0.25  # nominal
HE_PATCH_ID = "2dd3356f2dcf470aec4003800744dfec6490e75d88011e1d835f4f3d60f88e7a"


def load_manifest(data: Path) -> list[dict]:
    with open(data / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def median_diameter(labels: np.ndarray) -> float:
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas > 0]
    return float(np.median(np.sqrt(4 * areas / np.pi))) if len(areas) else 0.0


def pick_fluorescence(data: Path, rows: list[dict], n: int) -> list[str]:
    """n 256x256 fluorescence images (>= 20 whole nuclei, no overlaps) whose median nucleus
    diameter is closest to the median over all such images: similar nucleus size."""
    cands = [r["image_id"] for r in rows
             if r["modality_guess"] == "fluorescence" and r["height"] == "256" and r["width"] == "256"
             and r["has_overlapping_masks"] == "0" and int(r["n_nuclei"]) >= 20]
    diam = {i: median_diameter(tifffile.imread(data / "labels" / f"{i}.tif")) for i in sorted(cands)}
    target = float(np.median(list(diam.values())))
    chosen = sorted(diam, key=lambda i: (abs(diam[i] - target), i))[:n]
    log.info("fluorescence: %d candidates, target median diameter %.1f px, chose %d (%.1f-%.1f px)",
             len(cands), target, n, min(diam[i] for i in chosen), max(diam[i] for i in chosen))
    return chosen


def pick_stained(rows: list[dict], n: int) -> list[str]:
    """The n stained-tissue images with the most annotated nuclei (these are fully annotated)."""
    cands = [r for r in rows if r["modality_guess"] == "brightfield_color_histology"
             and r["has_overlapping_masks"] == "0"]
    cands.sort(key=lambda r: (-int(r["n_nuclei"]), r["image_id"]))
    return [r["image_id"] for r in cands[:n]]


def mosaic(data: Path, ids: list[str], grid: tuple[int, int], pitch: tuple[int, int],
           margin: int, background: np.ndarray, rng: np.random.Generator):
    """Paste images on a grid over `background`; labels relabelled unique across images (uint32)."""
    image = background
    labels = np.zeros(image.shape[:2], np.uint32)
    order = rng.permutation(len(ids))
    next_label = 1
    placed = []
    for k, idx in enumerate(order[: grid[0] * grid[1]]):
        r = margin + (k // grid[1]) * pitch[0]
        c = margin + (k % grid[1]) * pitch[1]
        img = np.asarray(Image.open(data / "images" / f"{ids[idx]}.png"))
        lab, _, _ = relabel_sequential(tifffile.imread(data / "labels" / f"{ids[idx]}.tif").astype(np.uint32))
        h, w = lab.shape
        image[r:r + h, c:c + w] = img.reshape(image[r:r + h, c:c + w].shape)
        labels[r:r + h, c:c + w] = np.where(lab > 0, lab + (next_label - 1), 0)
        placed.append((r, c, h, w, next_label - 1, int(lab.max()), ids[idx]))
        next_label += int(lab.max())
    return image, labels, placed


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
                      channel: str | None) -> None:
    rgb = levels[0].ndim == 3
    # A fixed UUID (from the name) keeps regenerated files byte-identical.
    meta = {"axes": "YXS" if rgb else "YX", "Name": name, "UUID": str(uuid.uuid5(uuid.NAMESPACE_URL, name)),
            "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm"}
    if channel:
        meta["Channel"] = {"Name": [channel]}
    opts = dict(tile=(256, 256), compression="zlib", compressionargs={"level": 9}, predictor=True,
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
    args.out.mkdir(parents=True, exist_ok=True)

    # Fluorescence mosaic: 7 x 7 images of 256 px at a 288 px pitch from a 32 px margin, so the
    # seams of 256-, 384- and 512-px tile grids fall inside pasted images and cross nuclei.
    rng = np.random.default_rng(SEED)
    ids = pick_fluorescence(args.data, rows, 49)
    bg = np.clip(rng.normal(6.0, 1.5, (2048, 2048)), 0, 255).round().astype(np.uint8)
    image, labels, placed = mosaic(args.data, ids, (7, 7), (288, 288), 32, bg, rng)
    sources = [("fluo_mosaic.ome.tif", *p) for p in placed]
    write_ome_pyramid(args.out / "fluo_mosaic.ome.tif", pyramid(image), FLUO_MPP,
                      "DSB2018 fluorescence mosaic", "nuclei")
    write_labels(args.out / "fluo_mosaic_labels.tif", labels, FLUO_MPP)
    log.info("fluo_mosaic: %d nuclei", labels.max())

    # One stained-tissue image as a plain PNG (byte copy of the DSB file) and its labels.
    shutil.copyfile(args.data / "images" / f"{HE_PATCH_ID}.png", args.out / "he_patch.png")
    shutil.copyfile(args.data / "labels" / f"{HE_PATCH_ID}.tif", args.out / "he_patch_labels.tif")
    n = int(tifffile.imread(args.out / "he_patch_labels.tif").max())
    sources.append(("he_patch.png", 0, 0, 256, 320, 0, n, HE_PATCH_ID))

    # H&E mosaic: 3 x 3 images (256 x 320) on a light, slightly noisy glass-like background.
    rng = np.random.default_rng(SEED + 1)
    he_ids = pick_stained(rows, 9)
    bg = np.clip(rng.normal((236, 233, 238), 1.5, (864, 1056, 3)), 0, 255).round().astype(np.uint8)
    image, labels, placed = mosaic(args.data, he_ids, (3, 3), (280, 344), 24, bg, rng)
    sources += [("he_mosaic.ome.tif", *p) for p in placed]
    write_ome_pyramid(args.out / "he_mosaic.ome.tif", pyramid(image), HE_MPP, "DSB2018 H&E mosaic", None)
    write_labels(args.out / "he_mosaic_labels.tif", labels, HE_MPP)
    log.info("he_mosaic: %d nuclei", labels.max())

    # Provenance: where each DSB image sits in each slide, and which label ids it got.
    with open(args.out / "sources.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["slide", "row0", "col0", "height", "width", "label_offset", "n_nuclei", "dsb_image_id"])
        w.writerows(sources)


if __name__ == "__main__":
    main()
