"""The training loop any of cellseg's networks trains in: AdamW steps under a warm-up + cosine learning-rate
schedule (by steps or by wall time), bf16 autocast where chosen, a time budget per run, checkpoints by steps and by
wall time, `--resume` from them, snapshots every N steps, Ctrl-C that keeps what was learnt, the loss log, a
bundle written at the end of every run, and, where chosen, an exponential moving average of the weights that the
bundles get instead of the last step's.

What differs between networks is a TrainingTask: its batches, its forward pass to loss parts, and how its bundle
is written. cellseg.training.maskrcnn gives one for the cell Mask R-CNN; references/tissue/ one for the tissue U-Net.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..detection import cpu_model, cpu_threads
from ..errors import CellsegError, TrainingInterrupted
from .checkpoint import CHECKPOINT_FILE, TrainingState, load_checkpoint, save_checkpoint
from .log import write_training_log

log = logging.getLogger(__name__)


@dataclass
class LoopSettings:
    """How long, how fast, and how often to save: the loop's part of a training's settings."""

    steps: int = 2000
    lr: float = 3e-4                  # the schedule's peak
    warmup: int = 100                 # steps of linear warm-up to the peak
    final_lr_fraction: float = 0.05   # the cosine ends at this fraction of the peak
    minutes: float | None = None      # stop (with a checkpoint) after this much wall time in this run
    checkpoint_every: int = 50        # steps
    checkpoint_minutes: float | None = None   # and at least this often in wall time (a lease that can end)
    # The learning-rate schedule's length in wall time over all runs (resumes included): the cosine follows
    # whichever of steps and time is further along. For a GPU lease measured in minutes, not steps.
    schedule_minutes: float | None = None
    snapshot_every: int | None = None  # steps between snapshots handed to run_training()'s on_snapshot
    snapshot_minutes: float | None = None   # and at least this often in wall time (a run with a time budget)
    clip_grad_norm: float | None = 10.0   # gradients' total norm clipped to this (None: not clipped)
    # The bundles (snapshots and the run's own) get an exponential moving average of the weights, updated after
    # every step with this decay (0.999: about the last 1,000 steps), instead of the last step's weights: an
    # average lies in a flatter part of the loss surface than any one step (Izmailov et al., UAI 2018), and one
    # snapshot's held-out score no longer swings with the last few hundred crops. None: the last step's weights.
    weight_average_decay: float | None = None

    def __post_init__(self) -> None:
        if self.weight_average_decay is not None and not 0.0 < self.weight_average_decay < 1.0:
            raise CellsegError(f"expected a weight-average decay between 0 and 1 (e.g. 0.999), "
                               f"found {self.weight_average_decay}")

    def learning_rate(self, step: int, wall_s: float) -> float:
        """The rate of step `step` (0-based) after `wall_s` seconds of training over all runs."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(self.steps - self.warmup, 1)
        if self.schedule_minutes:
            t = max(t, wall_s / (self.schedule_minutes * 60))
        floor = self.final_lr_fraction
        return self.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))

    def time_schedule_done(self, step: int, wall_s: float) -> bool:
        """The wall-time schedule has run its course (never during the warm-up)."""
        return bool(self.schedule_minutes and step >= self.warmup and wall_s >= self.schedule_minutes * 60)

    def snapshots(self) -> bool:
        """Whether the run hands snapshots to on_snapshot (by steps, by wall time, or both)."""
        return bool(self.snapshot_every or self.snapshot_minutes)

    def finished(self, step: int, wall_s: float) -> bool:
        """The training is complete: all its steps, or its time schedule, done."""
        return step >= self.steps or bool(self.schedule_minutes and wall_s >= self.schedule_minutes * 60)


class TrainingTask(Protocol):
    """What the loop needs of one kind of network."""

    def batches(self, first_step: int) -> Iterator:
        """Endless training batches, the first for step `first_step` (a resumed run draws on from there); a
        generator is closed when the loop ends."""

    def losses(self, batch) -> dict[str, torch.Tensor]:
        """The forward pass on a batch: the loss parts, whose sum is minimised."""

    def write_bundle(self, folder: Path, state: TrainingState, finished: bool) -> None:
        """Write a bundle of the weights as they stand into `folder` (the run's folder, or a snapshot's)."""


def optimiser_step(model: torch.nn.Module, optim: torch.optim.Optimizer,
                   forward: Callable[[], dict[str, torch.Tensor]], precision: str, step: int = 0,
                   clip_grad_norm: float | None = 10.0) -> tuple[torch.Tensor, dict]:
    """One optimiser step: `forward()` under bf16 autocast when `precision` is 'bf16', its loss parts summed and
    minimised. Returns the total loss and its parts. A non-finite loss stops the training with a one-line error."""
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        losses = forward()
    loss = sum(losses.values())
    if not torch.isfinite(loss):
        raise CellsegError(f"training diverged at step {step} (loss {loss.item()}); lower the learning rate")
    optim.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    optim.step()
    return loss, losses


def run_training(task: TrainingTask, model: torch.nn.Module, optim: torch.optim.Optimizer, settings: LoopSettings,
                 out: Path, *, precision: str = "fp32", resume: bool = False, device: str | torch.device = "cpu",
                 on_snapshot: Callable[[Path, int], bool | None] | None = None,
                 progress: bool = True) -> TrainingState:
    """Train `model` (on `device`, in training mode) in the folder `out` (checked by
    training.check_output_folder), or resume the training saved there; returns where it stopped.

    Stops at settings.steps, at the end of the time schedule, or after settings.minutes in this run. Every run ends
    with a checkpoint, training_log.csv and training_loss.png, and task.write_bundle(out). Ctrl-C ends it the same
    way, and so does SIGTERM (after the step under way: a run in the background ignores Ctrl-C, and `kill` must not
    cost up to 10 minutes of training), then raises TrainingInterrupted. on_snapshot(folder, step): with
    settings.snapshot_every (steps) or snapshot_minutes (wall time), called that often with a bundle in
    out/snapshots/ (e.g. to score it on held-out images; a long run keeps the best), and for a new run once before its
    first step, with the starting weights (step 0); when it returns True the run ends there (early stopping: its
    bundle and checkpoint are written as at any other end). An optimiser's param group with an "lr_scale" takes that share of
    the schedule's rate (e.g. a backbone fine-tuned more slowly than the heads).
    """
    from tqdm import tqdm

    from ..util import progress_interval
    if torch.device(device).type == "cpu":
        cpu_threads()       # within the cores this process may use (a container's CPU limit)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / CHECKPOINT_FILE
    state = TrainingState()
    average = _weight_average(model, settings.weight_average_decay)
    if resume:
        state = load_checkpoint(checkpoint, model, optim, torch.device(device), average)
        log.info("resumed from step %d", state.step)
    started = last_save = last_snapshot = time.monotonic()
    wall0 = state.wall_s
    bar = tqdm(total=settings.steps, initial=state.step, disable=not progress, desc="train", unit="step",
               mininterval=progress_interval())
    interrupted = False
    stop = _StopRequest()
    batches = task.batches(state.step)
    try:
        if on_snapshot is not None and settings.snapshots() and state.step == 0:
            # the starting weights are the curve's first point: what the run is measured against
            _snapshot(task, out, state, on_snapshot, model, average)
            last_snapshot = time.monotonic()
        while state.step < settings.steps:
            if stop.requested:
                interrupted = True
                break
            now = time.monotonic()
            if settings.minutes is not None and now - started > settings.minutes * 60:
                break
            if settings.time_schedule_done(state.step, state.wall_s):
                break
            batch = next(batches)
            rate = settings.learning_rate(state.step, state.wall_s)
            for g in optim.param_groups:   # a group's "lr_scale": its share of the schedule's rate (1 if none)
                g["lr"] = rate * g.get("lr_scale", 1.0)
            loss, losses = optimiser_step(model, optim, lambda: task.losses(batch), precision, state.step,
                                          settings.clip_grad_norm)
            if average is not None:
                average.update_parameters(model)
            state.loss_names = list(losses)
            state.step += 1
            state.wall_s = wall0 + time.monotonic() - started
            state.history.append([state.step, float(loss.detach())] + [float(v.detach()) for v in losses.values()])
            bar.update(1)
            bar.set_postfix(loss=f"{state.history[-1][1]:.3f}")
            if state.step % settings.checkpoint_every == 0 or (
                    settings.checkpoint_minutes and time.monotonic() - last_save > settings.checkpoint_minutes * 60):
                save_checkpoint(checkpoint, model, optim, state, average)
                last_save = time.monotonic()
            if on_snapshot is not None and (
                    (settings.snapshot_every and state.step % settings.snapshot_every == 0)
                    or (settings.snapshot_minutes and time.monotonic() - last_snapshot > settings.snapshot_minutes * 60)):
                save_checkpoint(checkpoint, model, optim, state, average)   # the snapshot's step is never trained again
                last_save = time.monotonic()
                stop_now = _snapshot(task, out, state, on_snapshot, model, average)
                last_snapshot = time.monotonic()
                if stop_now:   # early stopping: the caller has seen enough
                    break
    except KeyboardInterrupt:   # Ctrl-C: keep what was learnt (below), then say how to go on
        interrupted = True
    finally:
        stop.release()
        if hasattr(batches, "close"):
            batches.close()     # stops crop workers
    bar.close()
    save_checkpoint(checkpoint, model, optim, state, average)
    write_training_log(out, state.history, state.loss_names)
    with _averaged_weights_in(model, average):
        task.write_bundle(out, state, finished=settings.finished(state.step, state.wall_s))
    if interrupted:
        raise TrainingInterrupted(f"training interrupted at step {state.step} of {settings.steps}; its checkpoint "
                                  f"and a bundle of it are saved in {out}: the same command with --resume continues "
                                  f"it")
    return state


def _snapshot(task: TrainingTask, out: Path, state: TrainingState, on_snapshot: Callable[[Path, int], bool | None],
              model: torch.nn.Module, average: torch.optim.swa_utils.AveragedModel | None) -> bool:
    snapshot = out / "snapshots" / f"step{state.step:07d}"
    with _averaged_weights_in(model, average):
        task.write_bundle(snapshot, state, finished=False)
    return bool(on_snapshot(snapshot, state.step))


def _weight_average(model: torch.nn.Module, decay: float | None) -> torch.optim.swa_utils.AveragedModel | None:
    """torch's exponential moving average of `model`'s parameters and buffers (None without a decay); it starts
    as a copy of the weights at its first update."""
    if decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


@contextlib.contextmanager
def _averaged_weights_in(model: torch.nn.Module, average: torch.optim.swa_utils.AveragedModel | None):
    """`model` holds the averaged weights inside the block (for a task writing its bundle from the model), its
    own after it. Before the average's first update (a new run's step 0) it holds its own throughout."""
    if average is None or int(average.n_averaged) == 0:
        yield
        return
    own = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(average.module.state_dict())
    try:
        yield
    finally:
        model.load_state_dict(own)


class _StopRequest:
    """SIGTERM asks the loop to stop after the step under way; the previous handler comes back on release()."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():     # signal handlers live in the main thread
            self._previous = signal.signal(signal.SIGTERM, self._request)

    def _request(self, signum, frame) -> None:
        self.requested = True

    def release(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def hardware_description(device: torch.device) -> str:
    """The GPU's name, or the CPU's and the threads torch uses: for a bundle's card."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"CPU {cpu_model()}, {n} torch thread{'s' if n != 1 else ''}"
