"""glibc's allocator, set for a training step's tensors (`keep_freed_memory`).

A step allocates and frees the same few hundred activation and gradient buffers every time.
By default glibc gives every buffer over its mmap threshold (128 KiB at first, raised as such
buffers are freed, at most 32 MiB) pages of its own with mmap and returns them with munmap,
and trims the heap's top whenever more than 128 KiB is free there; so every step faults the
pages of its buffers back in, each zeroed by the kernel. Measured with 2 threads
(docs/results.md): at celeba64 ~450,000 page faults and 1.2-1.6 s of kernel time a step; at
mnist32 ~7,000 faults a step. Kept instead, the memory a step frees serves the next one.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4

TRIM_THRESHOLD = 2**30
"""Free memory at the top of a heap is returned to the OS only beyond this."""

ONE_ARENA = {"MALLOC_ARENA_MAX": "1"}
"""The environment a training worker starts with. Ray Train runs the loop in a thread of its
own, and glibc gives such a thread an arena of 64 MiB heaps, from which a larger buffer (at
celeba64 some are) gets pages of its own from mmap even with mmap off: 169,000 page faults a
step still. With one arena every thread allocates from the main heap. glibc reads it when the
process starts, so it goes into the workers' runtime environment (`train.build_trainer`)."""


def keep_freed_memory() -> bool:
    """Make this process's glibc keep what a step frees for the next step: no buffer gets
    pages of its own (mmap) that its free would return, and a heap is trimmed only past
    TRIM_THRESHOLD. Process-wide (every thread's arena) and idempotent. The process keeps its
    peak memory (celeba64: 2.3 GB resident against 1.8) instead of returning it between steps.
    -> False where there is no glibc mallopt (macOS, musl)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return all(mallopt(param, value) == 1 for param, value in settings)
