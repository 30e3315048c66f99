"""Which `--z` to count a thick section's Z-stack with: each plane, the max and the mean projection, scored against
the annotated nuclei, beside the 2-D image the stack was made from.

The stack is synthetic, made from an annotated 2-D image (default: the example fluorescence mosaic): each annotated
nucleus is given a depth (one of --planes, at random), and each plane shows a nucleus as it is where the nucleus lies,
blurred (Gaussian, --blur-px per plane of distance) and dimmed (halved per plane, as a confocal's pinhole rejects
out-of-focus light) where it lies further away; the background is the image's own in every plane. So in any one
plane most nuclei are out of focus, as in a section thicker than the depth of field. What it does not model: nuclei
overlapping in depth (a projection merges them), scattering, the point spread's own shape.

    python benchmarks/z_stack.py [--slide example_slides/fluo_mosaic.ome.tif --labels example_slides/fluo_mosaic_labels.tif]
                                 [--planes 5] [--blur-px 2.0] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def synthetic_stack(image: np.ndarray, labels: np.ndarray, planes: int, blur_px: float, seed: int) -> np.ndarray:
    """(planes, h, w) in the image's dtype: every annotated nucleus sharp in the plane of its (random) depth."""
    from scipy import ndimage
    rng = np.random.default_rng(seed)
    ids = np.unique(labels[labels > 0])
    depth_of = np.zeros(int(labels.max()) + 1, np.int64)
    depth_of[ids] = rng.integers(0, planes, len(ids))
    depth = np.where(labels > 0, depth_of[labels], -1)
    pixels = image.astype(np.float32)
    # inside the nuclei, the background they would leave: the median of the pixels outside them
    background = np.where(depth < 0, pixels, np.float32(np.median(pixels[depth < 0])))
    stack = np.empty((planes, *image.shape), np.float32)
    for k in range(planes):
        stack[k] = background
        for g in range(planes):
            nuclei = np.where(depth == g, pixels - background, 0).astype(np.float32)
            d = abs(k - g)
            stack[k] += (ndimage.gaussian_filter(nuclei, blur_px * d) if d else nuclei) * 0.5 ** d
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        return np.clip(np.rint(stack), info.min, info.max).astype(image.dtype)
    return stack.astype(image.dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slide", type=Path, default=ROOT / "example_slides" / "fluo_mosaic.ome.tif")
    p.add_argument("--labels", type=Path, default=ROOT / "example_slides" / "fluo_mosaic_labels.tif")
    p.add_argument("--planes", type=int, default=5)
    p.add_argument("--blur-px", type=float, default=2.0, help="Gaussian sigma per plane of distance (px)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--protocol", default="fluorescence-nuclei")
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    import tifffile

    from cellseg.detection.precision import cpu_model
    from cellseg.evaluation import evaluate
    from cellseg.geometry import Box
    from cellseg.planning import load_protocol
    from cellseg.run import CellCounter
    from cellseg.slides import open_slide

    with open_slide(args.slide) as slide:
        image = slide.read_region(Box(0, 0, slide.info.height, slide.info.width))[..., 0]
        mpp = slide.info.mpp
    labels = tifffile.imread(args.labels)
    stack = synthetic_stack(image, labels, args.planes, args.blur_px, args.seed)
    loaded = CellCounter.load(load_protocol(args.protocol), args.device)
    choices = [None, *range(1, args.planes + 1), "max", "mean"]
    print(f"{args.slide.name}: {len(np.unique(labels)) - 1} annotated nuclei, a {args.planes}-plane stack, blur "
          f"{args.blur_px:g} px a plane; {cpu_model()}, model "
          f"{loaded.run_info.model['name']} ({loaded.run_info.model['weights_sha256'][:12]})")
    print(f"{'counted':>15} {'cells':>6} {'recall':>7} {'precision':>9} {'F1':>6} {'count error':>12} {'scale':>6} "
          f"{'tiles':>6} {'seconds':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        stack_path = Path(tmp) / "stack.ome.tif"
        meta = {"axes": "ZYX", **({"PhysicalSizeX": mpp, "PhysicalSizeY": mpp} if mpp else {})}
        tifffile.imwrite(stack_path, stack, metadata=meta, tile=(256, 256), compression="zlib")
        for z in choices:
            counter = CellCounter(loaded.protocol, loaded.detector, tissue=loaded.tissue,
                                  model_diameter_px=loaded.model_diameter_px, diameter_px=loaded.diameter_px,
                                  micron_scale=loaded.micron_scale, run_info=loaded.run_info, z=z)
            out = Path(tmp) / f"z_{z}"
            start = time.perf_counter()
            summary = counter.count(args.slide if z is None else stack_path, out)
            seconds = time.perf_counter() - start
            pooled = evaluate(out, args.labels).pooled
            name = "the 2-D image" if z is None else f"plane {z}" if isinstance(z, int) else f"{z} projection"
            error = pooled["count_error"] / pooled["true_count"]
            print(f"{name:>15} {summary['cell_count']:>6} {pooled['recall']:>7.3f} {pooled['precision']:>9.3f} "
                  f"{pooled['f1']:>6.3f} {error:>+11.1%} {summary['scale']['factor']:>6.2f} "
                  f"{summary['tiles_total'] - summary['tiles_skipped']:>6} {seconds:>8.1f}")


if __name__ == "__main__":
    main()
