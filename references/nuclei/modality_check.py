"""How well a count tells fluorescence from brightfield slides (cellseg/planning/modality.py), on every annotated
image of the training datasets, each opened and planned as `cellseg count` does: its thumbnail, the tissue U-Net's
mask, the tissue pixels in the protocol's model channel (planning.tissue_input), and the look of them.

Prints, per dataset modality, how many images look like fluorescence, brightfield or neither, and the range of
their light_ground; exit status 1 when any image looks like the other modality than its own (a count would warn
wrongly there).

    python -m references.nuclei.modality_check [--data-root ../shared/data] [--every 1]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from cellseg.planning import load_protocol, model_channel, slide_look, tissue_input
from cellseg.planning.modality import PROTOCOL_FOR
from cellseg.planning.plan import THUMBNAIL_SIDE
from cellseg.slides import open_slide
from cellseg.tissue import TissueFinder

from .datasets import DATASET_FOLDERS, PROJECT_DATA_ROOT, THRESHOLD_KEY, read_dataset


def protocol_modality(dataset_modality: str) -> str:
    """fluorescence | brightfield: the protocol modality a dataset modality is counted with (its threshold key's)."""
    return "fluorescence" if THRESHOLD_KEY[dataset_modality] == "fluorescence" else "brightfield"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=PROJECT_DATA_ROOT)
    parser.add_argument("--every", type=int, default=1, help="every k-th image of each dataset (default: all)")
    args = parser.parse_args()
    tissue = TissueFinder("unet")
    looks: dict[str, list] = defaultdict(list)
    wrong = []
    for name, folder in DATASET_FOLDERS.items():
        for image in read_dataset(args.data_root / folder, name)[::args.every]:
            expected = protocol_modality(image.modality)
            protocol = load_protocol(PROTOCOL_FOR[expected])
            with open_slide(image.image_path) as slide:
                thumbnail, _ = slide.read_thumbnail(THUMBNAIL_SIDE)
                mask = tissue.find(slide, expected)
                channel = model_channel(protocol, slide)
                on_tissue, _, gray = tissue_input(thumbnail, channel, mask, slide.info.height, slide.info.width)
            look = slide_look(on_tissue, colour=not gray)
            looks[image.modality].append(look)
            if look.modality not in (None, expected):
                wrong.append(f"{image.key}: {expected}, looks like {look.modality} ({look.describe()})")
    print(f"{'modality':22s} {'images':>6s} {'fluorescence':>12s} {'brightfield':>11s} {'neither':>7s}  "
          f"light_ground min / median / max")
    for modality, items in looks.items():
        ground = np.array([x.light_ground for x in items])
        calls = [x.modality for x in items]
        print(f"{modality:22s} {len(items):6d} {calls.count('fluorescence'):12d} {calls.count('brightfield'):11d} "
              f"{calls.count(None):7d}  {np.nanmin(ground):.3f} / {np.nanmedian(ground):.3f} / {np.nanmax(ground):.3f}"
              f" ({sum(x.colour for x in items)} in colour)")
    for line in wrong:
        print("wrong:", line)
    print(f"{len(wrong)} of {sum(map(len, looks.values()))} images look like the other modality")
    sys.exit(1 if wrong else 0)


if __name__ == "__main__":
    main()
