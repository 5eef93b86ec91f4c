"""Bounds on the native memory a long-running process keeps for oneDNN's kernels.

oneDNN (PyTorch's CPU kernels for bfloat16 and for the reordered weights of the lean step)
builds a kernel for each matrix shape it meets and caches up to 1024 of them, each holding about
0.5-1 MB. A server meets new shapes for hours (every batch size, every prompt length), so its
resident memory would creep up by hundreds of MB before the caches are full. And glibc's malloc
raises its mmap threshold each time a large block is freed, so later large blocks come from the
heap, and the memory of kernels the caches evict is not given back to the system.

`bound_native_memory()` caps both caches (oneDNN's own and PyTorch's ideep cache) and fixes the
mmap threshold. It must run before the first oneDNN kernel is built: the caches read their
capacity once. Each bound gives way to its environment variable where the user has set it:
ONEDNN_PRIMITIVE_CACHE_CAPACITY, LRU_CACHE_CAPACITY, MALLOC_MMAP_THRESHOLD_.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

KERNEL_CACHE = 256  # kernels per cache: a decode step's working set (~10 shapes per batch size) many times over
MMAP_THRESHOLD = 1 << 20  # bytes: blocks this large and larger are mapped, and unmapped when freed
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def bound_native_memory() -> None:
    """Cap oneDNN's kernel caches at KERNEL_CACHE and fix glibc's mmap threshold at
    MMAP_THRESHOLD, except where the environment says otherwise. No effect outside glibc."""
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(KERNEL_CACHE))
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:  # glibc read it at start-up
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc: its malloc has no such threshold
        pass
