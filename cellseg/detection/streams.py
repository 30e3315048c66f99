"""Forward passes side by side on a CPU: `ForwardStreams` runs a detector's batches in a few threads at once, each
thread's torch operations on its share of the cores.

Why: one forward pass on all cores leaves cores idle wherever the network is not one big convolution (RPN
proposals and NMS, box decoding, RoIAlign, pasting masks, Python between the operations). Two passes of one tile,
each on half of the cores, keep both busy: on a 2-core AMD EPYC (Zen 3), 8 tiles of the example mosaic took
6.1-6.2 s this way against 7.3-8.5 s as one pass of 4 tiles on both cores, with the same detections (scores within
4e-6, every mask pixel equal). `docs/performance.md` has the end-to-end figures.

torch keeps the intra-op thread count per thread (OpenMP), but a thread that has not yet run a torch operation
starts with the count last set by any thread: each stream sets its own and runs one operation to fix it, then the
caller sets its own count back, so threads started later get the caller's count, not a stream's.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import torch

from ..util import usable_cores

_pools: dict[tuple[int, int, int], ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def cpu_threads() -> int:
    """torch's intra-op threads for work on the CPU, brought down first to the cores this process may use
    (util.usable_cores: torch reads no cgroup CPU quota, so in a container limited to 4 CPUs of a 64-core server it
    would run 64 threads, most of them waiting for the quota's next period)."""
    cores = usable_cores()
    if torch.get_num_threads() > cores:
        torch.set_num_threads(cores)
    return torch.get_num_threads()


def cpu_stream_count(threads: int) -> int:
    """How many forward passes run side by side on `threads` cores: two wherever there are two cores to share."""
    return 2 if threads >= 2 else 1


class ForwardStreams:
    """`streams` threads, each running torch operations on `threads_each` intra-op threads. One pool per process
    and configuration, shared by every detector that asks for it (a forked child builds its own)."""

    def __init__(self, streams: int, threads_each: int):
        if streams < 1 or threads_each < 1:
            raise ValueError(f"expected at least 1 stream of at least 1 thread, got {streams} x {threads_each}")
        self.streams, self.threads_each = streams, threads_each
        key = (os.getpid(), streams, threads_each)
        with _pools_lock:
            if key not in _pools:
                _pools[key] = _start_pool(streams, threads_each)
            self._pool = _pools[key]

    def map(self, work: Callable, items: Iterable) -> list:
        """[work(item) for item in items], the items spread over the streams; results in order; an error in any
        is raised here."""
        return list(self._pool.map(work, items))


def _start_pool(streams: int, threads_each: int) -> ThreadPoolExecutor:
    callers_threads = torch.get_num_threads()
    started = threading.Barrier(streams + 1)

    def set_threads() -> None:
        torch.set_num_threads(threads_each)
        torch.get_num_threads()     # first torch call of this thread: fixes its count before the caller resets it

    pool = ThreadPoolExecutor(streams, thread_name_prefix="cellseg-forward", initializer=set_threads)
    for _ in range(streams):       # each waits for all: so every thread of the pool is started and set
        pool.submit(started.wait)
    started.wait()
    torch.set_num_threads(callers_threads)
    return pool
