"""Average the weights of fine-tunes of one bundle (a uniform model soup, Wortsman et al., ICML 2022).

Fine-tunes of one start (other data mixes, other seeds), each at a snapshot where its last steps left it, average
to weights that keep most of what each of them lost (docs/training.md: the soup of four 5,000-step fine-tunes of
v3). The new bundle takes the first bundle's thresholds, scale and split until it is validated, or with
--settings-of BUNDLE that bundle's thresholds and count size (its [inference] and [scale]): e.g. the shipped bundle a
run's snapshots were fine-tuned from, so that the soup is scored as it would ship:

    python -m references.nuclei.average_bundles --out runs/soup4 runs/v4_paste/scored/step0005000 \
        runs/v3mix_ctl/scored/step0005000 runs/v4_nokromp/scored/step0005000 runs/v4_nonuin/scored/step0005000
    python -m references.nuclei.validate_bundle --bundle runs/soup4 --out runs/val_soup4 --per-modality 24
    python -m references.nuclei.average_bundles --out runs/soup_run --settings-of cellseg/models/nuclei \
        runs/run/scored/step0003000 runs/run/scored/step0004500
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from cellseg.bundles import average_bundles, load_bundle
from cellseg.errors import CellsegError
from cellseg.training.maskrcnn import bundle_settings, keep_bundle_settings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundles", nargs="+", help="two or more bundles of one architecture (folders or shipped names)")
    p.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    p.add_argument("--name", default=None, help="the new bundle's name (default: the folder's)")
    p.add_argument("--settings-of", default=None, metavar="BUNDLE",
                   help="the new bundle takes this bundle's [inference] and [scale] (score and mask thresholds, count "
                        "size) instead of the first bundle's")
    args = p.parse_args()
    command = "python -m references.nuclei.average_bundles " + shlex.join(sys.argv[1:])
    try:
        settings = kept = None
        if args.settings_of:     # read before anything is written: a wrong bundle leaves no half-made soup
            kept = load_bundle(args.settings_of)
            settings = bundle_settings(kept.path)
        bundle = average_bundles(args.bundles, args.out, name=args.name or args.out.name, reproduce=command)
        if settings is not None:
            keep_bundle_settings(bundle.path, settings,
                                 count_size_why=f"bundle {kept.name}'s ({kept.weights_sha256[:12]}), given by "
                                                f"--settings-of, not the {bundle.nucleus_diameter_px:.1f} px of its "
                                                f"ingredients")
            bundle = load_bundle(bundle.path)
    except CellsegError as e:
        sys.exit(f"average_bundles: error: {e}")
    print(f"{bundle.path}: the mean of {len(args.bundles)} bundles (sha256 {bundle.weights_sha256[:12]})")


if __name__ == "__main__":
    main()
