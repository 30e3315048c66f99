"""Pack the recipe's training images for a machine that cannot read ../shared/data (a lent GPU machine).

Only the split's training images travel (JPEG q95 without chroma subsampling; labels as they are), with the split:
the held-out images are scored later, here, through the full pipeline (validate_bundle.py).

    python -m references.nuclei.pack_training_data --out .carry/train_data [--split runs/split.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cellseg.errors import CellsegError

from .datasets import PROJECT_DATA_ROOT
from .recipe import load_split, pack_training_data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=PROJECT_DATA_ROOT)
    p.add_argument("--split", type=Path, default=None, help="default: a new split, as the recipe makes it")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quality", type=int, default=95)
    args = p.parse_args()
    try:
        split = load_split(args.data_root, args.split)
        size = pack_training_data(args.data_root, split, args.out, args.quality)
    except CellsegError as e:
        sys.exit(f"pack_training_data: error: {e}")
    print(f"{len(split.train)} training images, {size / 1e6:.1f} MB, in {args.out}")


if __name__ == "__main__":
    main()
