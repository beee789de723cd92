"""glibc's allocator, set for a training step's tensors (`keep_freed_memory`).

A step allocates and frees the same few hundred activation and gradient buffers every time.
By default glibc gives every buffer over its mmap threshold (128 KiB at first, raised as such
buffers are freed, at most 32 MiB) pages of its own with mmap and returns them with munmap,
and trims the heap's top whenever more than 128 KiB is free there; so the next step faults
every page of its buffers back in, each zeroed by the kernel. On the demo's step (mnist32, 2
threads, docs/results.md) that was ~9,000 page faults a step and a tenth of its CPU time in
the kernel. Kept instead, the memory a step frees serves the next one.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3

MMAP_THRESHOLD = 32 * 2**20
"""Only buffers above this get pages of their own (glibc's largest allowed threshold)."""
TRIM_THRESHOLD = 2**30
"""Free memory at the heap's top is returned to the OS only beyond this."""
TOP_PAD = 64 * 2**20
"""Each time the heap grows, it grows by this much more than asked."""


def keep_freed_memory() -> bool:
    """Make this process's glibc keep what a step frees for the next step: buffers up to
    MMAP_THRESHOLD come from the heap, which is trimmed only past TRIM_THRESHOLD. Process-wide
    (every thread's arena) and idempotent; the process keeps its peak memory instead of
    returning it between steps. -> False where there is no glibc mallopt (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
