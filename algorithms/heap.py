"""Keep freed CPU memory in the process heap while reconstruction runs (glibc only).

Why: every reconstruction iteration allocates and frees the same few dozen activation-sized tensors (on
MobileNetV2 at batch 32, 150 MB each). glibc serves anything above its mmap threshold (at most 32 MB) with a fresh
mmap and unmaps it on free, so each allocation pays a page fault and kernel zeroing per 4 KB page: on the first
MobileNetV2 units that was 37 % of the process's CPU time, spent in the kernel
(benchmarks/results/reconstruction_speed_mobilenet_v2.md). With mmap off and a high trim threshold the same memory
is reused from the heap and the page faults disappear; the peak grows only by fragmentation (6 % on MobileNetV2).
The setting is process-wide, so it is scoped: glibc's defaults come back on exit, and the heap is trimmed then and
after every unit, so the resident memory recorded per unit stays honest.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform
from contextlib import contextmanager
from functools import lru_cache

# glibc's mallopt parameters and defaults (malloc.h; defaults of malloc/malloc.c)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
RETAIN_TRIM_THRESHOLD = 2 ** 31 - 1  # mallopt takes an int


_depth = [0]  # open retained_heap scopes


@lru_cache(maxsize=1)
def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def trim() -> None:
    """Return the heap's free pages to the OS (no-op off glibc or outside `retained_heap`)."""
    libc = _glibc()
    if libc is not None and _depth[0] > 0:
        libc.malloc_trim(0)


@contextmanager
def retained_heap(enabled: bool = True):
    """Inside: glibc keeps freed memory for reuse instead of unmapping it. Yields whether that is in effect."""
    libc = _glibc() if enabled else None
    if libc is None or _depth[0] > 0:  # nested: the outer scope owns the setting
        yield libc is not None
        return
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, RETAIN_TRIM_THRESHOLD)):
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        yield False
        return
    _depth[0] += 1
    try:
        yield True
    finally:
        _depth[0] -= 1
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
