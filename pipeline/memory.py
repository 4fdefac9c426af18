"""The allocator policy of xkd's CPU-heavy processes: keep freed memory for reuse instead of handing it back.

The PyAV reader workers allocate the same large buffers for every batch (the float views of a batch of 8 are
~45 MB), and CPU training allocates every step's activations afresh (torch keeps no CPU cache). By default glibc
maps blocks over 32 MB afresh and returns freed memory at the heap's top beyond 128 kB to the kernel, so every
batch or step faults the same pages in again, and the faults cost more than the work: 17 of the 21 ms of
converting a batch's uint8 views to float; on the 2-core demo machine a multiply into a fresh 25 MB tensor took
39 ms, into a reused one 3 ms. With mmap off and trimming only beyond 1 GiB free, the heap serves the same pages again.
"""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # malloc.h


def keep_freed_memory() -> None:
    """Set this process's glibc malloc to serve every size from the heap and keep up to 1 GiB free at its top
    (the `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824` environment settings). Process-wide: call it only
    in a process of xkd's own (a reader worker, a CPU training run). Not glibc: nothing changes."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_MAX, 0)
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)
