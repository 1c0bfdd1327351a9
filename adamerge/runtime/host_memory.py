"""Keep freed host memory for reuse, so a CPU step does not page-fault its activations in afresh.

glibc's malloc serves every block above its mmap threshold (32 MB at most) with a fresh ``mmap`` and hands
it back with ``munmap`` on free. A one-pass AdaMerging step on CPU allocates gigabytes of such blocks
(ViT-B/32, 8 × 16 images: MLP activations of 79 MB each), so each step page-faults them in again and the
kernel zeroes them (``results/bench_vit_b32/bench.md`` measures what that costs). Serving large blocks from the heap and never trimming it lets every
step reuse the previous step's pages. PyTorch's own advice for CPU runs is the same idea with
jemalloc/tcmalloc preloaded; this needs neither.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt(3) parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_applied = False


def keep_freed_host_memory() -> bool:
    """Make this process's malloc keep freed memory (process-wide; the CPU allocator is process-wide).

    Returns whether it is in effect: it is only possible with glibc. The process's resident memory then
    stays at its peak instead of shrinking between steps, which is what a training loop reuses anyway.
    """
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # No mmap for allocations (the heap serves them); -1 turns trimming of the heap's top off (mallopt(3)).
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
    _applied = ok
    return ok


def keep_freed_host_memory_on(device: str, enabled: bool = True) -> bool:
    """The project's policy: keep freed memory when a run computes on the CPU (a GPU's own allocator
    caches already) and the config has not turned it off; returns whether it is in effect."""
    return bool(enabled) and device == "cpu" and keep_freed_host_memory()
