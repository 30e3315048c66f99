"""How many cores this process may use: its CPU affinity (a Slurm job's cpuset, `taskset`) and its cgroup's CPU
quota (Docker's `--cpus`, a Kubernetes or JupyterHub CPU limit), whichever is fewer.

Neither the standard library nor torch reads the quota: in a container limited to 4 CPUs on a 64-core server both
see 64, and a count would run 64 torch threads and a process per output in 4 CPUs' worth of time slices, most of
them waiting for the quota's next period.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the system says (else all of them), no more than
    its cgroup's CPU quota (cgroup_cpu_quota)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    return cores if quota is None else max(1, min(cores, math.floor(quota + 0.5)))


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, self_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPUs' worth of time this process's cgroup may use (quota / period: 1.5 for `docker --cpus 1.5`; the
    smallest along its cgroup's ancestors, whose limits hold for it too), or None where none is set or none can be
    read (not Linux, no cgroup file system)."""
    quotas = []
    for folder in _cgroup_folders(root, self_cgroup):
        limit = _read(folder / "cpu.max")                                          # cgroup v2: "QUOTA PERIOD"
        if limit is not None:
            quota, _, period = limit.partition(" ")
            quotas.append(None if quota == "max" else _ratio(quota, period))
            continue
        quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")    # cgroup v1
        if quota is not None and period is not None:
            quotas.append(None if quota.startswith("-") else _ratio(quota, period))
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def _cgroup_folders(root: Path, self_cgroup: Path) -> list[Path]:
    """Where this process's CPU limits may be: its own cgroup's folder (from /proc/self/cgroup; inside a container
    the namespace's root is the container's cgroup) and its ancestors up to the file system's root, for v2 and v1
    (the cpu controller's mount)."""
    folders = []
    text = _read(self_cgroup) or ""
    for line in text.splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":                                       # v2: "0::/user.slice/..."
            mounts = [root]
        elif "cpu" in controllers.split(","):                       # v1: "4:cpu,cpuacct:/docker/..."
            mounts = [root / m for m in ("cpu", "cpu,cpuacct", "cpuacct,cpu")]
        else:
            continue
        parts = [part for part in path.split("/") if part and part != ".."]
        for mount in mounts:
            folders += [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
    folders += [root, root / "cpu", root / "cpu,cpuacct"]
    return list(dict.fromkeys(folders))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = float(quota), float(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None
