"""Average the weights of fine-tunes of one bundle (a uniform model soup, Wortsman et al., ICML 2022).

Fine-tunes of one start (other data mixes, other seeds), each at a snapshot where its last steps left it, average
to weights that keep most of what each of them lost (docs/training.md: the soup of four 5,000-step fine-tunes of
v3). The new bundle takes the first bundle's thresholds, scale and split until it is validated:

    python -m references.nuclei.average_bundles --out runs/soup4 runs/v4_paste/scored/step0005000 \
        runs/v3mix_ctl/scored/step0005000 runs/v4_nokromp/scored/step0005000 runs/v4_nonuin/scored/step0005000
    python -m references.nuclei.validate_bundle --bundle runs/soup4 --out runs/val_soup4 --per-modality 24
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from cellseg.bundles import average_bundles
from cellseg.errors import CellsegError


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundles", nargs="+", help="two or more bundles of one architecture (folders or shipped names)")
    p.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    p.add_argument("--name", default=None, help="the new bundle's name (default: the folder's)")
    args = p.parse_args()
    command = "python -m references.nuclei.average_bundles " + shlex.join(sys.argv[1:])
    try:
        bundle = average_bundles(args.bundles, args.out, name=args.name or args.out.name, reproduce=command)
    except CellsegError as e:
        sys.exit(f"average_bundles: error: {e}")
    print(f"{bundle.path}: the mean of {len(args.bundles)} bundles (sha256 {bundle.weights_sha256[:12]})")


if __name__ == "__main__":
    main()
