"""Training from the widget: `cellseg train` in a child process, its progress read from its output, cancel by SIGTERM.

No Qt: the widget calls `run_training` in a napari thread worker with a progress callback and a threading.Event;
tests call it directly. Why a process and not the library call in a thread: the training loop stops cleanly on
SIGTERM (after the step under way, saving its checkpoint and a bundle: cellseg.training.loop), which a thread
cannot be sent; a training's memory and torch threads go away with it; and the command line is the training's
public, stable entry point (fine-tuning the protocol's or the given bundle by default, with its held-out check and
its refusal, exit 1, of a fine-tune that does not beat its start: docs/finetune.md).

Progress: the command's progress bars (tqdm, on stderr) are parsed as they come: `train` is the training steps;
other bars (held-out counts) and log lines are reported as they are.
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cellseg.errors import CellsegError

log = logging.getLogger(__name__)

# (what: a bar's name or a log line, done, total); total 0 for a line without a count
TrainProgress = Callable[[str, int, int], None]

# a tqdm bar: "train:  50%|█████     | 10/20 [00:05<00:05,  2.00step/s, loss=1.234]"
_BAR = re.compile(r"(?P<desc>[A-Za-z][\w .-]*?):\s*(?P<pct>\d+)%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)"
                  r"(?:\s*\[[^\]]*\])?")
NOT_BETTER = "does NOT beat"
STOP_GRACE_S = 120.0        # after SIGTERM: the step under way, the checkpoint and the bundle; then it is killed


@dataclass
class TrainRequest:
    """What the widget asks for: `cellseg train --data DATA --out OUT -p PROTOCOL [--init INIT] ...`.

    init: a bundle folder or shipped name to fine-tune (None: the protocol's bundle, the command's default).
    extra: more command-line arguments, e.g. ["--crop", "64", "--batch-size", "1"].
    """

    data: Path
    out: Path
    protocol: str = "fluorescence-nuclei"
    init: str | None = None
    steps: int | None = None
    minutes: float | None = None
    device: str = "auto"
    mpp: float | None = None
    extra: list[str] = field(default_factory=list)


@dataclass
class TrainOutcome:
    """How a training ended. status: 'better' (a bundle to count with), 'not better' (a bundle that did not beat
    its start on the held-out images: kept in `bundle` for a look, not recommended), 'cancelled', 'failed'."""

    status: str
    bundle: Path | None
    message: str
    output: list[str] = field(default_factory=list)     # the command's output lines (progress bars left out)
    command: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.bundle is not None and self.status in ("better", "not better")


def train_command(request: TrainRequest) -> list[str]:
    """The `cellseg train` command line of a request (run with this Python: the napari's environment)."""
    cmd = [sys.executable, "-m", "cellseg", "-v", "train", "--data", str(request.data), "--out", str(request.out),
           "-p", request.protocol, "--device", request.device]
    if request.init:
        cmd += ["--init", str(request.init)]
    if request.steps:
        cmd += ["--steps", str(int(request.steps))]
    if request.minutes:
        cmd += ["--minutes", f"{float(request.minutes):g}"]
    if request.mpp:
        cmd += ["--mpp", f"{float(request.mpp):g}"]
    return cmd + [str(a) for a in request.extra]


class OutputReader:
    """Splits a command's output (chunks of text) into progress bar updates and lines: tqdm redraws with '\\r'."""

    def __init__(self, progress: TrainProgress | None = None):
        self.progress = progress
        self.lines: list[str] = []
        self._pending = ""

    def feed(self, text: str) -> None:
        parts = re.split(r"[\r\n]", self._pending + text)
        self._pending = parts.pop()
        for part in parts:
            self._line(part)

    def close(self) -> None:
        if self._pending:
            self._line(self._pending)
        self._pending = ""

    def _line(self, line: str) -> None:
        line = line.strip()
        if not line:
            return
        bar = _BAR.match(line)
        if bar:
            if self.progress is not None:
                self.progress(bar["desc"].strip(), int(bar["n"]), int(bar["total"]))
            self._line(line[bar.end():])      # what was written after a bar that did not end its line
            return
        self.lines.append(line)
        if self.progress is not None:
            self.progress(line, 0, 0)


def run_process(command: list[str], progress: TrainProgress | None = None, cancel: threading.Event | None = None,
                env: dict | None = None, grace_s: float = STOP_GRACE_S) -> tuple[int, list[str], bool]:
    """Run `command`, feeding its output (stdout and stderr together) to an OutputReader; when `cancel` is set,
    SIGTERM (and after `grace_s`, a kill). Returns (exit code, output lines, whether it was cancelled)."""
    reader = OutputReader(progress)
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=environment)
    cancelled = threading.Event()

    def watch() -> None:
        while proc.poll() is None:
            if cancel.wait(0.2):
                cancelled.set()
                log.info("stopping the training (SIGTERM to process %d)", proc.pid)
                proc.terminate()                  # SIGTERM: the loop saves and stops after the step under way
                try:
                    proc.wait(grace_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                return

    watcher = threading.Thread(target=watch, name="cellseg-train-cancel", daemon=True)
    if cancel is not None:
        watcher.start()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")   # a chunk may end inside a character
    try:
        fd = proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            reader.feed(decoder.decode(chunk))
    finally:
        proc.stdout.close()
        code = proc.wait()
        if watcher.is_alive():
            watcher.join()
        reader.close()
    return code, reader.lines, cancelled.is_set()


def run_training(request: TrainRequest, progress: TrainProgress | None = None,
                 cancel: threading.Event | None = None) -> TrainOutcome:
    """Run `cellseg train` for `request` and say how it ended (never raises for a training that failed: the
    outcome's message is the command's one-line error)."""
    if Path(request.out).exists() and any(Path(request.out).iterdir()):
        raise CellsegError(f"expected a new or empty folder for the trained bundle, {request.out} holds files")
    command = train_command(request)
    log.info("running %s", " ".join(command))
    code, lines, cancelled = run_process(command, progress, cancel)
    out = Path(request.out)
    bundle = out if (out / "model.toml").is_file() else None
    errors = [line.removeprefix("cellseg: error: ") for line in lines if line.startswith("cellseg: error:")]
    if cancelled:
        message = "training cancelled" + (f": {errors[-1]}" if errors else "")
        if (out / "checkpoint.pt").is_file():
            # the command line's "the same command with --resume" means nothing here: the widget has no resume
            said = message.split("; its checkpoint")[0]
            message = (f"{said}; its checkpoint is saved in {out}: `{shlex.join(['cellseg', *command[4:], '--resume'])}`"
                       f" in a terminal continues it")
        return TrainOutcome("cancelled", None, message, lines, command)
    if code == 0 and bundle is not None:
        written = [line for line in lines if line.startswith("bundle written to")]
        return TrainOutcome("better", bundle, written[-1] if written else f"bundle written to {bundle}", lines,
                            command)
    refusal = [line for line in lines if NOT_BETTER in line]
    if code == 1 and bundle is not None and refusal:
        return TrainOutcome("not better", bundle, refusal[-1].removeprefix("cellseg: error: "), lines, command)
    message = errors[-1] if errors else (lines[-1] if lines else f"cellseg train exited with {code}")
    return TrainOutcome("failed", None, message, lines, command)


def next_free(folder: Path) -> Path:
    """`folder` when it is new or empty, else folder-2, folder-3, ..."""
    folder = Path(folder)
    candidate, k = folder, 1
    while candidate.exists() and any(candidate.iterdir()):
        k += 1
        candidate = folder.with_name(f"{folder.name}-{k}")
    return candidate
