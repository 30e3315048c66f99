"""A training's loss history as a table and a figure beside its bundle: training_log.csv (step, loss, its parts)
and training_loss.png (the loss and its running mean)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def write_training_log(out: Path, history: list, loss_names: list[str]) -> None:
    """`history`: one row a step (step, total loss, its parts); nothing is written for a run without steps."""
    if not history:
        return
    # A checkpoint from before loss names were stored: name the parts by position.
    names = loss_names or [f"loss_part{k}" for k in range(len(history[0]) - 2)]
    with open(out / "training_log.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss"] + names)
        w.writerows(history)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    h = np.asarray([row[:2] for row in history])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(h[:, 0], h[:, 1], alpha=0.3, label="loss")
    k = max(1, len(h) // 50)
    ax.plot(h[k - 1:, 0], np.convolve(h[:, 1], np.ones(k) / k, mode="valid"), label=f"mean of {k}")
    ax.set_xlabel("step"), ax.set_ylabel("total loss"), ax.legend()
    fig.tight_layout()
    fig.savefig(out / "training_loss.png", dpi=100)
    plt.close(fig)
