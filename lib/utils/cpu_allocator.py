"""Keep freed tensor memory in the process on the CPU (``CPU_ALLOCATOR retain``).

By default glibc serves every allocation above its mmap threshold (128 KiB at start, raised dynamically) with
a fresh ``mmap`` and gives it back with ``munmap`` when freed; it also trims the top of the heap when more than
128 KiB is free there. An eager DEQ cell allocates and frees many activation-sized tensors per f evaluation
(MDEQ-TINY at batch 32: 15 MB each), so each one comes back as fresh pages and is page-faulted and zeroed by the
kernel on first write. Measured on the development machine (2 cores): one MDEQ-TINY cell evaluation takes
28 ms with the heap kept against 41 ms without (a third of its time in page faults), a train step
at F_THRES 22 2.1 s against 2.3 s (``benchmarks/compare_original.py``).

``retain`` raises the mmap threshold to glibc's maximum (32 MiB on 64-bit) and turns trimming off, so freed
blocks up to that size stay in the heap and are reused without faults (the same role a caching allocator plays on
CUDA). The price: the process keeps its peak heap, as CUDA's allocator keeps its cache. Other C libraries
(macOS, musl) have no ``mallopt``: there it does nothing and returns False.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers, from glibc's <malloc.h>
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (4 MiB · sizeof(long))
TRIM_OFF = 2**31 - 1  # mallopt takes an int: the largest "free top of heap" before trimming, i.e. never

_retained = False


def retain_freed_memory() -> bool:
    """Tell glibc to keep freed blocks up to 32 MiB for reuse; True if it took effect (idempotent)."""
    global _retained
    if _retained:
        return True
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _retained = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                              TRIM_OFF))
    return _retained


def configure_cpu_allocator(mode: str) -> bool:
    """Apply the ``CPU_ALLOCATOR`` config value (``retain`` or ``system``); True if the heap is now kept."""
    if mode not in ("retain", "system"):
        raise ValueError(f"CPU_ALLOCATOR must be 'retain' or 'system', got {mode!r}")
    return retain_freed_memory() if mode == "retain" else _retained
