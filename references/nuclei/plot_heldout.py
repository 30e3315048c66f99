"""The long run's held-out curve: AP50 pooled per modality against training steps (RUN/heldout.csv, written by
train_default_bundle.py --snapshot-every), as RUN/heldout_curve.png, and whether it has been flat. A shipped bundle's
card carries the same curve (validate_bundle.py --write-card --heldout-curve RUN).

    python -m references.nuclei.plot_heldout runs/long [--flat-steps 15000 --flat-ap50 0.005]

Flat: over the last --flat-steps steps no modality's AP50 moved by --flat-ap50 or more (the long run's stopping rule).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from cellseg.errors import CellsegError

# The held-out modalities, in the curve's column order: the first four are the v1-v3 bundles' (DSB2018 and TNBC),
# the last two the datasets added for v4 (Kromp, NuInsSeg; datasets.py).
MODALITIES = ("fluorescence", "stained_tissue", "brightfield_gray", "he_breast", "fluorescence_kromp", "he_nuinsseg")


def read_curve(run: Path) -> list[dict]:
    """RUN/heldout.csv's rows in step order, numbers as numbers (None where a modality was not scored)."""
    path = Path(run) / "heldout.csv"
    if not path.is_file():
        raise CellsegError(f"expected {path} (a run with --snapshot-every), found none")
    with open(path, newline="") as f:
        rows = [{k: (int(v) if k == "step" else float(v) if v else None) for k, v in r.items()}
                for r in csv.DictReader(f)]
    if not rows:
        raise CellsegError(f"expected scored snapshots in {path}, found none")
    return sorted(rows, key=lambda r: r["step"])


def plot_curve(rows: list[dict], png: Path) -> None:
    """AP50 pooled per modality against steps, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m in MODALITIES:
        values = [r.get(m) for r in rows]
        if any(v is not None for v in values):
            ax.plot(steps, values, marker="o", label=m.replace("_", " "))
    ax.set_xlabel("training steps (batch 2)"), ax.set_ylabel("held-out AP50 (pooled)"), ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def flat_ranges(rows: list[dict], flat_steps: int) -> dict[str, float] | None:
    """Each modality's AP50 range (max - min) over the snapshots of the last `flat_steps` steps; None while the curve
    spans fewer steps than that."""
    last = rows[-1]["step"]
    recent = [r for r in rows if r["step"] >= last - flat_steps]
    if last - rows[0]["step"] < flat_steps or len(recent) < 2:
        return None
    return {m: max(r[m] for r in recent) - min(r[m] for r in recent)
            for m in MODALITIES if all(r.get(m) is not None for r in recent)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--flat-steps", type=int, default=15000)
    p.add_argument("--flat-ap50", type=float, default=0.005)
    args = p.parse_args()
    try:
        rows = read_curve(args.run)
    except CellsegError as e:
        raise SystemExit(f"plot_heldout: error: {e}") from None
    plot_curve(rows, args.run / "heldout_curve.png")
    print(f"wrote {args.run / 'heldout_curve.png'} ({len(rows)} snapshots, steps {rows[0]['step']}-{rows[-1]['step']})")
    moves = flat_ranges(rows, args.flat_steps)
    if moves is None:
        print(f"flat: not yet known (fewer than {args.flat_steps} scored steps)")
        return
    flat = all(v < args.flat_ap50 for v in moves.values())
    print(f"flat over the last {args.flat_steps} steps: {flat} (AP50 range per modality: "
          + ", ".join(f"{m} {v:.4f}" for m, v in moves.items()) + ")")


if __name__ == "__main__":
    main()
