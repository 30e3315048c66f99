"""The long run's held-out curve: AP50 pooled per modality against training steps (RUN/heldout.csv, written by
train_default_bundle.py --snapshot-every), as RUN/heldout_curve.png for the model card, and whether it has been flat.

    python -m references.nuclei.plot_heldout runs/long [--flat-steps 15000 --flat-ap50 0.005]

Flat: over the last --flat-steps steps no modality's AP50 moved by --flat-ap50 or more (the long run's stopping rule).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

MODALITIES = ("fluorescence", "stained_tissue", "brightfield_gray", "he_breast")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--flat-steps", type=int, default=15000)
    p.add_argument("--flat-ap50", type=float, default=0.005)
    args = p.parse_args()
    path = args.run / "heldout.csv"
    if not path.is_file():
        raise SystemExit(f"plot_heldout: error: expected {path} (a run with --snapshot-every), found none")
    rows = sorted(csv.DictReader(open(path, newline="")), key=lambda r: int(r["step"]))
    if not rows:
        raise SystemExit(f"plot_heldout: error: expected scored snapshots in {path}, found none")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m in MODALITIES:
        values = [float(r[m]) if r[m] else None for r in rows]
        if any(v is not None for v in values):
            ax.plot(steps, values, marker="o", label=m.replace("_", " "))
    ax.set_xlabel("training steps (batch 2)"), ax.set_ylabel("held-out AP50 (pooled)"), ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.run / "heldout_curve.png", dpi=100)
    print(f"wrote {args.run / 'heldout_curve.png'} ({len(rows)} snapshots, steps {steps[0]}-{steps[-1]})")
    recent = [r for r in rows if int(r["step"]) >= steps[-1] - args.flat_steps]
    if steps[-1] - steps[0] < args.flat_steps or len(recent) < 2:
        print(f"flat: not yet known (fewer than {args.flat_steps} scored steps)")
        return
    moves = {m: max(float(r[m]) for r in recent if r[m]) - min(float(r[m]) for r in recent if r[m])
             for m in MODALITIES if all(r[m] for r in recent)}
    flat = all(v < args.flat_ap50 for v in moves.values())
    print(f"flat over the last {args.flat_steps} steps: {flat} (AP50 range per modality: "
          + ", ".join(f"{m} {v:.4f}" for m, v in moves.items()) + ")")


if __name__ == "__main__":
    main()
