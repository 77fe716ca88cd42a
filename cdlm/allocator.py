"""Host memory of a long run: freed large CPU tensors go back to the operating system (docs/runs.md, "Memory").

glibc's ``malloc`` serves a request below its mmap threshold from a heap it rarely shrinks, and raises that threshold
(up to 32 MB) every time it frees a mapped block. A training step allocates and frees about a gigabyte of
activations of a dozen sizes, so after a few steps they all come from the heap, whose free holes never line up with
the next step's requests: the quickstart's resident memory sat at 1.5-1.9 GB (peak 2.0-2.2 GB) for a working set
whose true peak is 1.3 GB. Fixing the threshold at 4 MB maps every large tensor on its own and unmaps it when freed,
so the resident memory returns to the same floor after every step. The price is the page faults of fresh mappings:
the float32 quickstart on a 2-core VM took 17.6-18.7 instead of 14.5 minutes; GPU training allocates little host memory
and does not notice.
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
THRESHOLD_BYTES = 4 << 20


def release_freed_memory(threshold: int = THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process; whether it applied (False off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # musl and others: no libc.so.6 / no mallopt
        return False
