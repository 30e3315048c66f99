"""The process's memory: handing what Python and numpy have freed back to the operating system, and per-thread
scratch buffers for hot loops."""

from __future__ import annotations

import threading

import numpy as np

_scratch = threading.local()


def thread_scratch(name: str, size: int, dtype) -> np.ndarray:
    """A 1-D array of `size` elements that this thread reuses for `name`, valid until the thread's next call with
    that name: on our virtual machines fresh memory for a 1 MB block cost more than decoding it into memory used
    before (0.79 against 0.12 ms), the kernel handing out new pages."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get(name)
    if buffer is None or buffer.size < size or buffer.dtype != np.dtype(dtype):
        buffer = buffers[name] = np.empty(size, dtype)
    return buffer[:size]


def release_freed_memory() -> None:
    """Hand memory that Python and numpy have freed back to the OS (glibc's malloc_trim; elsewhere nothing).

    glibc keeps freed heap blocks for reuse, fragmented: the few hundred MB a stage frees (the tissue view,
    whose size follows the slide's) would otherwise stay in the process and sit under the detector's peak,
    which then grows with the slide. Dask does the same for its workers' "unmanaged memory".
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
