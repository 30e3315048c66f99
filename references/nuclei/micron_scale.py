"""A nuclei bundle's scale in µm (issue 51), computed from the labels of its training images whose pixel size is known,
and written into its model.toml as [scale.<modality>] (bundles.update_bundle_scale).

Of the shipped bundle's training data only TNBC has a magnification: 40x scans (Naylor et al. 2019; its README in
../shared/data/tnbc-train). The dataset gives the magnification, not the pixel size; 0.25 µm/px is what 40x
whole-slide scanners give (0.23-0.26 µm/px), so the scale in µm is good to about 5 %. Its training-side patients
(split.json groups of modality he_breast with side "train") give the median nucleus diameter, in px and so in µm, and
become the scale of the protocol modality brightfield (he-nuclei): a brightfield slide with a pixel size is resampled
to 0.25 µm/px (planning.decide_scale). DSB2018 records no pixel size (its images come from many microscopes at unknown
magnifications; the example slides' 0.5 µm/px is nominal), so fluorescence gets none: a fluorescence count measures
its nuclei instead.

    python -m references.nuclei.micron_scale [--bundle cellseg/models/nuclei] [--data-root ../shared/data] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .datasets import PROJECT_DATA_ROOT, TNBC_MODALITY

TNBC_MPP = 0.25      # µm per px of a 40x scan
# the pixel sizes of the datasets that have one: dataset folder, its split modality, its µm/px, the protocol modality
KNOWN_PIXEL_SIZES = [("tnbc-train", TNBC_MODALITY, TNBC_MPP, "brightfield",
                      "TNBC (Naylor et al. 2019), 40x scans; 0.25 µm/px, a 40x scanner's, assumed (the dataset gives "
                      "the magnification only)")]


def median_diameter_px(label_files: list[Path]) -> tuple[float, int]:
    """The median equivalent-circle diameter of every labelled nucleus of `label_files` (px; as the bundle's
    nucleus_diameter_px is measured, training.data.median_diameter_px), and how many there are."""
    import tifffile
    diameters = []
    for path in label_files:
        areas = np.bincount(tifffile.imread(path).ravel())[1:]
        diameters.append(2 * np.sqrt(areas[areas > 0] / np.pi))
    values = np.concatenate(diameters) if diameters else np.zeros(0)
    return (float(np.median(values)) if values.size else 0.0), int(values.size)


def micron_scales(bundle: Path, data_root: Path) -> dict:
    """Protocol modality -> bundles.MicronScale, from the training side of the bundle's split.json (none from a
    dataset that is not under `data_root`)."""
    from cellseg.bundles import MicronScale
    split = json.loads((bundle / "split.json").read_text())
    scales = {}
    for folder, split_modality, mpp, modality, source in KNOWN_PIXEL_SIZES:
        if not (data_root / folder).is_dir():      # that dataset is not here: no scale from it
            continue
        keys = [key for group in split["groups"].values()
                if group["modality"] == split_modality and group["side"] == "train" for key in group["images"]]
        files = [data_root / folder / "labels" / f"{key.split('/', 1)[1]}.tif" for key in keys]
        diameter, n = median_diameter_px(files)
        if n:
            scales[modality] = MicronScale(mpp, diameter, f"{source}: median of the {n} nuclei of its {len(files)} "
                                                          f"training images")
    return scales


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=Path("cellseg/models/nuclei"))
    p.add_argument("--data-root", type=Path, default=PROJECT_DATA_ROOT)
    p.add_argument("--dry-run", action="store_true", help="Print the scales; leave model.toml as it is.")
    args = p.parse_args()
    scales = micron_scales(args.bundle, args.data_root)
    for modality, scale in scales.items():
        print(f"{modality}: {scale.nucleus_diameter_px:.2f} px at {scale.mpp} µm/px = "
              f"{scale.nucleus_diameter_um:.2f} µm ({scale.source})")
    if not args.dry_run:
        from cellseg.bundles import update_bundle_scale
        update_bundle_scale(args.bundle, scales)
        print(f"written to {args.bundle / 'model.toml'}")


if __name__ == "__main__":
    main()
