"""Keep freed activation memory in the process instead of handing it back to the kernel.

A CPU forward allocates and frees the same multi-MiB activations every layer of every step.
glibc serves allocations above its mmap threshold (dynamic, ≤ 32 MiB) with fresh `mmap`s and
returns freed heap tops with `madvise`/`trim`, so each one is page-faulted in again: on the
development machine a 4096-token prefill spent over a third of its time in elementwise ops
touching fresh pages (`bench engine` prefill 3.1 s → 2.0 s with this). Raising the mmap threshold
to glibc's maximum and the trim threshold far above any step's working set keeps those pages
mapped after the first step — what vLLM's CPU backend gets by preloading tcmalloc, done here with
glibc's own `mallopt`, once per process, when the first engine starts. A serving process reaches
its peak working set on its first large step anyway, so the price (RSS stays at that peak) is paid
regardless. Anywhere but glibc this is a no-op.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3   # glibc <malloc.h>
_MMAP_THRESHOLD_MAX = 32 * 2**20      # glibc rejects more on 64-bit (HEAP_MAX_SIZE / 2)
_TRIM_THRESHOLD = 2**30
_TOP_PAD = 64 * 2**20

_lock = threading.Lock()
_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Apply the malloc settings once per process; True when they took effect."""
    global _applied
    with _lock:
        if _applied is None:
            _applied = _apply()
        return _applied


def _apply() -> bool:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):   # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    results = [mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
               mallopt(_M_TOP_PAD, _TOP_PAD)]
    return all(r == 1 for r in results)
