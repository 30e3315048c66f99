"""Pack the recipe's training images for a machine that cannot read ../shared/data (a lent GPU machine).

Only the split's training images travel (JPEG q95 without chroma subsampling; labels as they are), with the split:
the held-out images are scored later, here, through the full pipeline (validate_bundle.py).

    python -m references.nuclei.pack_training_data --out .carry/train_data [--split runs/split.json]
    python -m references.nuclei.pack_training_data --parts .carry/train_data --part-mib 20   # into carriable parts
    python -m references.nuclei.pack_training_data --check runs/gpu_data                     # every part arrived?

A device call carries at most 64 MiB with the tracked tree (~43 MiB): a pack larger than what is left travels in
parts over several calls (`--parts`: .carry/train_part1, 2, ... beside the pack, each with the list of every file of
the whole pack), and scripts/gpu_train.sh gathers them on the machine until `--check` finds the pack whole.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cellseg.errors import CellsegError

from .datasets import PROJECT_DATA_ROOT
from .recipe import load_split, pack_training_data

LISTING = "pack_files.txt"      # every file of the whole pack and its size, in each part


def pack_parts(pack: Path, part_bytes: int) -> list[Path]:
    """Split the pack into folders PACK/../train_part1, 2, ... of at most `part_bytes` each (hard links, no copies):
    the first holds the manifests and split.json, every part the listing of the whole pack."""
    files = sorted((p for p in pack.rglob("*") if p.is_file()), key=lambda p: (p.suffix not in (".csv", ".json"), p))
    listing = "".join(f"{p.relative_to(pack)}\t{p.stat().st_size}\n" for p in files)
    parts: list[list[Path]] = [[]]
    size = 0
    for p in files:
        if p.stat().st_size > part_bytes:
            raise CellsegError(f"expected every packed file under {part_bytes / 2**20:.0f} MiB, found {p} larger")
        if size + p.stat().st_size > part_bytes - len(listing):
            parts.append([])
            size = 0
        parts[-1].append(p)
        size += p.stat().st_size
    folders = []
    for k, members in enumerate(parts, start=1):
        folder = pack.parent / f"train_part{k}"
        if folder.exists():
            raise CellsegError(f"expected no {folder} (an earlier split of a pack?): remove it first")
        for p in members:
            (folder / p.relative_to(pack)).parent.mkdir(parents=True, exist_ok=True)
            os.link(p, folder / p.relative_to(pack))
        (folder / LISTING).write_text(listing, encoding="utf-8")
        folders.append(folder)
    return folders


def missing_files(folder: Path) -> list[str]:
    """The files of the pack's listing that `folder` (parts gathered into one) lacks or holds at another size."""
    listing = folder / LISTING
    if not listing.is_file():
        return [LISTING]
    missing = []
    for line in listing.read_text(encoding="utf-8").splitlines():
        name, size = line.rsplit("\t", 1)
        if not (folder / name).is_file() or (folder / name).stat().st_size != int(size):
            missing.append(name)
    return missing


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=PROJECT_DATA_ROOT)
    p.add_argument("--split", type=Path, default=None, help="default: a new split, as the recipe makes it")
    p.add_argument("--out", type=Path)
    p.add_argument("--quality", type=int, default=95)
    p.add_argument("--parts", type=Path, help="split this pack into carriable parts beside it (--part-mib each)")
    p.add_argument("--part-mib", type=float, default=20.0)
    p.add_argument("--check", type=Path, help="exit 0 when the parts gathered in this folder make the whole pack")
    args = p.parse_args()
    if args.check:
        missing = missing_files(args.check)
        if missing:
            sys.exit(f"{args.check}: {len(missing)} files of the pack still to come (e.g. {missing[0]})")
        print(f"{args.check}: the whole pack is here")
        return
    if args.parts:
        try:
            folders = pack_parts(args.parts, int(args.part_mib * 2**20))
        except CellsegError as e:
            sys.exit(f"pack_training_data: error: {e}")
        print(" ".join(str(f) for f in folders))
        return
    if args.out is None:
        p.error("expected --out (or --parts, --check)")
    try:
        split = load_split(args.data_root, args.split)
        size = pack_training_data(args.data_root, split, args.out, args.quality)
    except CellsegError as e:
        sys.exit(f"pack_training_data: error: {e}")
    print(f"{len(split.train)} training images, {size / 1e6:.1f} MB, in {args.out}")


if __name__ == "__main__":
    main()
