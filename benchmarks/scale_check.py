"""Scale: the same image at half the resolution must give the same count once nuclei are resampled to the
model's training size (not part of the test suite).

Downscales a slide by 2 (2 x 2 block mean, pixel size doubled: a 20x scan of a 40x one), then counts:
the original as is; the half-size copy as is (no resampling: nuclei reach the model at half their size); the
half-size copy with `--diameter auto` (nuclei measured on the busiest tiles, tiles resampled); and the
half-size copy with `--diameter D/2`, D the diameter measured on the original. Prints counts, the count
difference to the original and, with NAME_labels.tif beside the slide, F1 against the ground truth
(downscaled by nearest neighbour for the half-size copy). Goal (issue 3): within 5 % of the original.

    python benchmarks/scale_check.py [--slide example_slides/fluo_mosaic.ome.tif] [--protocol fluorescence-nuclei]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slide", type=Path, default=ROOT / "example_slides" / "fluo_mosaic.ome.tif")
    p.add_argument("--protocol", default="fluorescence-nuclei")
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    import tifffile

    from cellseg.bundles import load_bundle
    from cellseg.cli import result_stem
    from cellseg.evaluation import load_image_masks, match, pair_iou
    from cellseg.geometry import Box
    from cellseg.planning import NetworkInput, load_protocol, measure_diameter, measure_range, select_channels
    from cellseg.run import CellCounter
    from cellseg.slides import open_slide

    protocol = load_protocol(args.protocol).replace(tissue_method="none")   # detection is what is measured here
    counter = CellCounter.load(protocol, args.device)
    detector, bundle = counter.detector, load_bundle(protocol.model)
    gt_path = args.slide.parent / f"{result_stem(args.slide)}_labels.tif"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with open_slide(args.slide) as slide:
            info = slide.info
            pixels = slide.read_region(Box(0, 0, info.height, info.width))
            thumb, factor = slide.read_thumbnail(2048)
            measured = measure_diameter(slide, detector,
                                        NetworkInput(None, measure_range(select_channels(thumb, None))),
                                        protocol, thumb, factor)
        h, w = info.height // 2 * 2, info.width // 2 * 2
        half = pixels[:h, :w].reshape(h // 2, 2, w // 2, 2, -1).mean(axis=(1, 3)).round().astype(pixels.dtype)
        mpp = (info.mpp or 0.5) * 2
        small = tmp / "half.ome.tif"
        meta = {"axes": "YX" if half.shape[-1] == 1 else "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}
        tifffile.imwrite(small, half[..., 0] if half.shape[-1] == 1 else half, metadata=meta, tile=(256, 256),
                         compression="zlib")
        gt = gt_half = None
        if gt_path.is_file():
            gt_labels = tifffile.imread(gt_path)
            gt = next(iter(load_image_masks(gt_path).values()))
            tifffile.imwrite(tmp / "half_labels.tif", np.ascontiguousarray(gt_labels[:h:2, :w:2]))
            gt_half = next(iter(load_image_masks(tmp / "half_labels.tif").values()))

        runs = [("original, as is", args.slide, None, gt), ("half size, as is", small, None, gt_half),
                ("half size, --diameter auto", small, "auto", gt_half)]
        if measured:
            runs.append((f"half size, --diameter {measured[0] / 2:.1f}", small, measured[0] / 2, gt_half))
        print(f"slide {args.slide.name} ({info.height} x {info.width}); model {bundle.name}, trained on nuclei of "
              f"{bundle.nucleus_diameter_px:.1f} px; measured on the original: "
              f"{f'{measured[0]:.1f} px ({measured[1]} nuclei)' if measured else 'too few nuclei'}")
        print(f"{'run':>34} {'cells':>6} {'vs original':>12} {'F1 vs GT':>9} {'scale':>6}")
        reference = None
        for name, path, diameter, truth in runs:
            out = tmp / name.replace(" ", "_").replace(",", "").replace("-", "")
            summary = CellCounter(protocol, detector, tissue=counter.tissue, model_diameter_px=bundle.nucleus_diameter_px,
                                  diameter_px=diameter).count(path, out)
            n = summary["cell_count"]
            reference = reference if reference is not None else n
            f1 = "-"
            if truth is not None:
                pred = next(iter(load_image_masks(out).values()))
                f1 = f"{match(pred, truth, 0.5, ious=pair_iou(pred, truth)).f1:.3f}"
            print(f"{name:>34} {n:>6} {100 * (n - reference) / max(reference, 1):>+11.1f}% {f1:>9} "
                  f"{summary['scale']['factor']:>6.2f}")


if __name__ == "__main__":
    main()
