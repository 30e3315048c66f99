"""Interpolate the weights of a bundle and its fine-tune: (1 - alpha) x START + alpha x TUNED (WiSE-FT).

A fine-tune on new data (here: TNBC H&E, stain and focus augmentation) gains there but forgets part of what the
start model knew (here: grayscale brightfield, which the new split holds out whole). Interpolated weights keep
most of both; choose alpha on the held-out groups, then write the card:

    python -m references.nuclei.interpolate_bundles --start cellseg/models/nuclei --tuned runs/ft5 --alpha 0.3 \
        --out runs/wise30
    python -m references.nuclei.validate_bundle --bundle runs/wise30 --out runs/val_wise30 --write-card
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from cellseg.bundles import interpolate_bundles
from cellseg.errors import CellsegError


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--start", required=True, help="the bundle the fine-tune started from (a folder or shipped name)")
    p.add_argument("--tuned", required=True, help="the fine-tuned bundle")
    p.add_argument("--alpha", type=float, required=True, help="weight of TUNED, 0-1")
    p.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    p.add_argument("--name", default=None, help="the new bundle's name (default: the folder's)")
    args = p.parse_args()
    command = "python -m references.nuclei.interpolate_bundles " + shlex.join(sys.argv[1:])
    try:
        bundle = interpolate_bundles(args.start, args.tuned, args.alpha, args.out, name=args.name or args.out.name,
                                     reproduce=command)
    except CellsegError as e:
        sys.exit(f"interpolate_bundles: error: {e}")
    print(f"{bundle.path}: {1 - args.alpha:g} x {args.start} + {args.alpha:g} x {args.tuned} "
          f"(sha256 {bundle.weights_sha256[:12]})")


if __name__ == "__main__":
    main()
