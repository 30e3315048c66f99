"""A training's folder and its checkpoint: what lets a run stop (time budget, Ctrl-C, a lease that ends) and
`--resume` later where it left off, on any network the training loop (training/loop.py) drives.

checkpoint.pt holds tensors and plain numbers only (read with weights_only=True: never unpickled code):
{"model": state dict, "optim": optimiser state, "step": int, "history": [[step, loss, *parts], ...],
"wall_s": float, "loss_names": [str, ...]}, and "average" (the moving average's state dict) when the run keeps
one. Checkpoints written before this module existed have the same keys.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import OutputError

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class TrainingState:
    """Where a training stands: what a checkpoint holds beside the weights and the optimiser."""

    step: int = 0
    history: list[list[float]] = field(default_factory=list)   # one row a step: step, total loss, its parts
    wall_s: float = 0.0                                          # training time over all runs (resumes included)
    loss_names: list[str] = field(default_factory=list)         # the parts' names (columns of training_log.csv)


def check_output_folder(out: Path, resume: bool) -> None:
    """A training writes into a new or empty folder, or continues the one saved there (--resume): an existing
    bundle or anything else the user keeps there is never overwritten."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"expected --out to be a folder for the bundle, found a file at {out}")
    if resume:
        if not (out / CHECKPOINT_FILE).is_file():
            raise OutputError(f"expected a training to resume in {out} (its {CHECKPOINT_FILE}), found none; "
                              f"drop --resume to start a new training in a new or empty folder")
    elif out.is_dir() and any(out.iterdir()):
        n = sum(1 for _ in out.iterdir())
        raise OutputError(f"expected --out to be a new or empty folder, found {out} holding {n} entries (a bundle or "
                          f"an earlier training?); choose another folder, or pass --resume to continue the "
                          f"training saved there")


def save_checkpoint(path: Path, model: torch.nn.Module, optim: torch.optim.Optimizer, state: TrainingState,
                    average: torch.nn.Module | None = None) -> None:
    """Write the checkpoint through a temporary file: a run killed while saving keeps the previous one. `average`:
    the run's moving average of the weights (training.loop), when it keeps one."""
    tmp = path.with_suffix(".tmp")
    content = {"model": model.state_dict(), "optim": optim.state_dict(), "step": state.step,
               "history": state.history, "wall_s": state.wall_s, "loss_names": state.loss_names}
    if average is not None:
        content["average"] = average.state_dict()
    torch.save(content, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: torch.nn.Module, optim: torch.optim.Optimizer,
                    device: torch.device, average: torch.nn.Module | None = None) -> TrainingState:
    """Load a checkpoint's weights into `model` and `optim` (already on `device`), and its moving average into
    `average` when given (a checkpoint without one, from a run that kept none, starts it afresh at the next step);
    return where it stood."""
    ckpt = torch.load(path, map_location=device, weights_only=True)   # never unpickle arbitrary objects
    model.load_state_dict(ckpt["model"])
    optim.load_state_dict(ckpt["optim"])
    if average is not None and "average" in ckpt:
        average.load_state_dict(ckpt["average"])
    elif average is not None:
        log.info("%s has no moving average of the weights: it starts from this step's", path)
    # loss_names: absent from the first checkpoints (training_log.csv then names the parts by position)
    return TrainingState(step=int(ckpt["step"]), history=list(ckpt["history"]), wall_s=float(ckpt["wall_s"]),
                         loss_names=list(ckpt.get("loss_names", [])))
