"""The process's memory: handing what Python and numpy have freed back to the operating system."""

from __future__ import annotations


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
