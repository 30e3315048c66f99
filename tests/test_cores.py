"""The cores a count uses (util.cores): its affinity and its cgroup's CPU quota, which neither the standard library nor
torch reads (a container limited to 4 CPUs of a 64-core server saw 64: 64 torch threads in 4 CPUs' worth of time)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cellseg.util import cores


def cgroup(root: Path, files: dict[str, str], own: str = "0::/\n") -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "self_cgroup").write_text(own)
    return root / "self_cgroup"


@pytest.mark.parametrize("files, own, quota", [
    ({"cpu.max": "400000 100000\n"}, "0::/\n", 4.0),                                      # docker --cpus 4, v2
    ({"cpu.max": "150000 100000\n"}, "0::/\n", 1.5),
    ({"cpu.max": "max 100000\n"}, "0::/\n", None),                                        # no limit
    ({"kubepods/pod1/cpu.max": "200000 100000\n"}, "0::/kubepods/pod1\n", 2.0),           # its own cgroup's folder
    ({"kubepods/pod1/cpu.max": "300000 100000\n", "kubepods/pod1/c1/cpu.max": "max 100000\n"},  # a parent's limit
     "0::/kubepods/pod1/c1\n", 3.0),
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, "4:cpu,cpuacct:/\n", 3.0),   # v1
    ({"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "200000\n", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"},
     "4:cpu,cpuacct:/docker/abc\n", 2.0),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, "4:cpu,cpuacct:/\n", None),
    ({}, "", None),                                                                       # no cgroup file system
    ({"cpu.max": "garbage\n"}, "0::/\n", None),
])
def test_the_cgroup_cpu_quota_is_read_for_v1_and_v2(tmp_path, files, own, quota):
    self_cgroup = cgroup(tmp_path, files, own)
    assert cores.cgroup_cpu_quota(tmp_path, self_cgroup) == quota


def test_usable_cores_is_the_fewer_of_the_affinity_and_the_quota(tmp_path, monkeypatch):
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    monkeypatch.setattr(cores, "cgroup_cpu_quota", lambda: None)
    assert cores.usable_cores() == affinity
    monkeypatch.setattr(cores, "cgroup_cpu_quota", lambda: 0.4)        # a fraction of a core: still one
    assert cores.usable_cores() == 1
    monkeypatch.setattr(cores, "cgroup_cpu_quota", lambda: 1000.0)     # above the affinity: the affinity
    assert cores.usable_cores() == affinity


def test_torch_runs_no_more_threads_than_the_quota_allows(monkeypatch):
    torch = pytest.importorskip("torch")
    from cellseg.detection import streams

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        monkeypatch.setattr(streams, "usable_cores", lambda: 2)
        assert streams.cpu_threads() == 2 and torch.get_num_threads() == 2
        monkeypatch.setattr(streams, "usable_cores", lambda: 16)   # fewer threads asked for than cores: kept
        assert streams.cpu_threads() == 2
    finally:
        torch.set_num_threads(before)
