"""A count inside a CPU quota (a container's `--cpus`, a Kubernetes or JupyterHub CPU limit): cellseg sized to the
quota (util.usable_cores) against the same code with the quota unread, as every count ran before 2026-11-29 (torch's
threads, the readers, the writer and measuring processes sized to every core the process may be scheduled on).

    sudo python benchmarks/cpu_quota.py [--cpus 1] [--rounds 2] [--slide example_slides/fluo_mosaic.ome.tif]

Needs root and a writable cgroup file system (v1 `cpu` controller or v2): a cgroup `cellseg-quota-bench` is made
with the quota, each count runs in it as a fresh `cellseg count --outputs cells.csv` process (interleaved rounds),
and the cgroup is removed at the end. Printed: each round's wall time and cells, the medians and their ratio, the
CPU, and the machine's load average (a job beside it takes its own share of the other cores, not of the quota).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAME = "cellseg-quota-bench"
UNREAD = """import sys
from cellseg.util import cores
cores.cgroup_cpu_quota = lambda *a, **k: None      # as before 2026-11-29: the quota unread
from cellseg.cli import main
sys.exit(main())
"""


def make_cgroup(cpus: float) -> tuple[Path, str]:
    """(the cgroup's folder, its procs file) with a quota of `cpus` CPUs, v2 where mounted, else v1's cpu."""
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    period = 100_000
    if v2.exists():
        folder = Path("/sys/fs/cgroup") / NAME
        folder.mkdir(exist_ok=True)
        (folder / "cpu.max").write_text(f"{int(cpus * period)} {period}")
    else:
        folder = Path("/sys/fs/cgroup/cpu") / NAME
        folder.mkdir(exist_ok=True)
        (folder / "cpu.cfs_period_us").write_text(str(period))
        (folder / "cpu.cfs_quota_us").write_text(str(int(cpus * period)))
    return folder, str(folder / "cgroup.procs")


def count(slide: Path, out: Path, procs: str, quota_read: bool) -> tuple[float, int]:
    command = ([sys.executable, "-m", "cellseg"] if quota_read else [sys.executable, "-c", UNREAD])
    command += ["count", str(slide), "-o", str(out), "--outputs", "cells.csv"]
    start = time.perf_counter()
    # the child joins the cgroup before it runs anything (so do its own children)
    subprocess.run(command, check=True, capture_output=True,
                   preexec_fn=lambda: Path(procs).write_text(str(os.getpid())))
    wall = time.perf_counter() - start
    return wall, json.loads((out / "summary.json").read_text())["cell_count"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpus", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--slide", type=Path, default=ROOT / "example_slides" / "fluo_mosaic.ome.tif")
    args = parser.parse_args()
    try:
        folder, procs = make_cgroup(args.cpus)
    except OSError as exc:
        sys.exit(f"cpu_quota.py: expected root and a writable cgroup file system, got: {exc}")
    from cellseg.detection import cpu_model
    print(f"CPU {cpu_model()}, {len(os.sched_getaffinity(0))} cores, quota {args.cpus:g} CPUs "
          f"({folder}), load average {os.getloadavg()[0]:.2f}")
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                for quota_read in (False, True):
                    out = Path(tmp) / f"r{r}_{quota_read}"
                    wall, cells = count(args.slide, out, procs, quota_read)
                    times[quota_read].append(wall)
                    print(f"round {r + 1} {'quota read  ' if quota_read else 'quota unread'} {wall:6.1f} s, "
                          f"{cells} cells", flush=True)
    finally:
        time.sleep(0.5)
        folder.rmdir()
    unread, read = statistics.median(times[False]), statistics.median(times[True])
    print(f"median: quota read {read:.1f} s, unread {unread:.1f} s: {unread / read:.2f}x; "
          f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
