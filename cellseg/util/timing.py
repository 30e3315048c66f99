"""Seconds per stage of a count (read, tissue, detect, merge, measure, expand, write), as summary.json reports them.

A module of its own: planning, the pipeline and the Dask tasks time their stages with it, and the summary only
reads the totals, so none of them needs to import another's module for it.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class StageTimer:
    """Seconds spent per stage. Detection runs in its own thread alongside merging, measuring and writing, so the
    stages overlap and their sum can exceed the wall time."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.seconds[stage] += time.perf_counter() - start

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}
