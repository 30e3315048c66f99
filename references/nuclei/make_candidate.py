"""Keep a trained bundle that does not ship (yet) as a committed candidate, so that a replaced machine loses none of
its training: `references/nuclei/candidates/NAME/` with its float16 weights, model.toml, split.json, its card
(README.md) and, from a long run, the run's held-out curve (heldout.csv) and settings (run.settings: its learning rate,
length, augmentation and split). scripts/train_long.sh starts a new run from the newest committed candidate, with
those settings unless the environment gives others.

    python -m references.nuclei.make_candidate --bundle runs/v4/best --name v4-cpu --run runs/v4
    git add references/nuclei/candidates/v4-cpu && git commit -m "..."    # at most one weights commit a day

A candidate is a bundle: `cellseg count --model references/nuclei/candidates/NAME` counts with it, and a training
started from it (`--init` the folder) continues its lineage in the card.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from cellseg.bundles import load_bundle, update_bundle_scale
from cellseg.errors import CellsegError

from .datasets import PROJECT_DATA_ROOT
from .micron_scale import micron_scales
from .model_card import card_readme

CANDIDATES = Path(__file__).resolve().parent / "candidates"
MAX_WEIGHTS_BYTES = 60_000_000      # every shipped float16 weight file together stays under 60 MB (issue 47)


def make_candidate(bundle_dir: Path, name: str, run: Path | None = None, root: Path = CANDIDATES,
                   data_root: Path | None = PROJECT_DATA_ROOT) -> Path:
    """Copy the bundle in `bundle_dir` to ROOT/NAME as a candidate; returns the folder. Refuses a name in use, weights
    that are not float16 or over MAX_WEIGHTS_BYTES, and a folder that is not a bundle. With its split.json and the
    training data under `data_root`, its scale in µm (micron_scale.py: [scale.brightfield] from its TNBC training
    patients) is written into its model.toml, so that the candidate counts a slide with a pixel size as it would
    ship."""
    bundle = load_bundle(bundle_dir)        # a one-line error for anything that is not a loadable bundle
    if not name or "/" in name or name.startswith("."):
        raise CellsegError(f"expected a candidate name without slashes, found {name!r}")
    target = root / name
    if target.exists():
        raise CellsegError(f"expected a new candidate name, found {target} already there: choose another")
    size = bundle.weights_path.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        raise CellsegError(f"expected weights of at most {MAX_WEIGHTS_BYTES / 1e6:.0f} MB, found {size / 1e6:.1f} MB "
                           f"in {bundle.weights_path}")
    staged = root / f".{name}.tmp"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    for f in ("model.toml", "weights.safetensors", "split.json", "heldout_curve.png"):
        if (bundle_dir / f).is_file():
            shutil.copy2(bundle_dir / f, staged / f)
    if data_root is not None and (staged / "split.json").is_file():
        scales = micron_scales(staged, data_root)      # {} when the data is not there
        if scales:
            update_bundle_scale(staged, scales)
    if run is not None and (run / "heldout.csv").is_file():
        shutil.copy2(run / "heldout.csv", staged / "heldout.csv")
    settings = None if run is None else run.with_name(run.name + ".settings")    # scripts/train_long.sh's RUN.settings
    if settings is not None and settings.is_file():
        # the run's schedule, augmentation and split, which train_long.sh takes up when it starts from the candidate
        # (runs/ gone); not BACKBONE: the candidate is already the network the run trained
        kept = [line for line in settings.read_text().splitlines() if not line.startswith("BACKBONE=")]
        (staged / "run.settings").write_text("\n".join(kept) + "\n")
    card = card_readme(load_bundle(staged))
    if (staged / "heldout.csv").is_file():
        card += heldout_section(staged / "heldout.csv")
    (staged / "README.md").write_text(card, encoding="utf-8")
    staged.rename(target)
    return target


def heldout_section(curve: Path) -> str:
    """The long run's held-out curve (heldout.csv: AP50 pooled per modality on its fixed subset, by step) as a section
    of the candidate's card: a candidate is seldom validated in full, and its card must still say how it scores."""
    import csv
    with open(curve, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return ""
    columns = [c for c in rows[0] if c != "step"]
    lines = ["", "## Held-out curve of its run", "",
             "AP50 pooled (TP/(TP+FP+FN) at IoU 0.5) per modality on the run's fixed held-out subset (the first 24 "
             "held-out images of each modality), by training step (`heldout.csv`; step 0 is the starting bundle):", "",
             "| step | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    lines += ["| " + " | ".join([r["step"]] + [r[c] or "" for c in columns]) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--run", type=Path, default=None, help="the long run the bundle comes from (its heldout.csv)")
    p.add_argument("--data-root", type=Path, default=PROJECT_DATA_ROOT,
                   help="the training data, for the bundle's scale in µm (its TNBC training patients' labels)")
    args = p.parse_args()
    try:
        folder = make_candidate(args.bundle, args.name, args.run, data_root=args.data_root)
    except CellsegError as e:
        sys.exit(f"make_candidate: error: {e}")
    print(f"candidate in {folder}; commit it today unless a weights commit was made today already")


if __name__ == "__main__":
    main()
