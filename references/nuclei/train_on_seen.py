"""Write a split that also trains on the held-out images of one modality that an earlier stage of the lineage
trained on (datasets.Split.train_on_seen), for a fine-tune that wins back what the lineage forgot:

    python -m references.nuclei.train_on_seen --split runs/long/split.json \
        --seen references/nuclei/splits/stage12.json --modality brightfield_gray --out runs/gray_split.json
    RUN=runs/gray INIT=runs/long/scored/step0030000 SPLIT=runs/gray_split.json LR=2e-5 STEPS=5000 \
        bash scripts/train_long.sh

The images every stage of the lineage trained on stay the same, so `validate_bundle --seen` still reports honest
figures on the images no stage saw; the moved images' figures are flattered, for the fine-tune as for its lineage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cellseg.errors import CellsegError

from .datasets import THRESHOLD_KEY, Split, seen_images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", type=Path, required=True, help="the split the lineage's last stage used")
    p.add_argument("--seen", type=Path, action="append", required=True,
                   help="a split.json whose 'train' images an earlier stage trained on (repeatable)")
    p.add_argument("--modality", required=True, choices=sorted(THRESHOLD_KEY))
    p.add_argument("--out", type=Path, required=True, help="the new split.json (not overwritten)")
    args = p.parse_args()
    try:
        if args.out.exists():
            raise CellsegError(f"expected a new file for --out, found {args.out} already there")
        split = Split.from_json(json.loads(args.split.read_text(encoding="utf-8")))
        moved = split.train_on_seen(seen_images(args.seen), args.modality)
    except (CellsegError, OSError, ValueError, KeyError) as e:
        sys.exit(f"train_on_seen: error: {e}")
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(moved.to_json(), indent=1), encoding="utf-8")
    tmp.replace(args.out)
    print(f"{args.out}: {len(moved.train) - len(split.train)} held-out {args.modality} images moved to training; "
          f"{len(moved.val)} held out")


if __name__ == "__main__":
    main()
