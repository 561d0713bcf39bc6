"""Process-wide settings the command line applies before any work: how the C allocator treats large blocks.

On glibc (Linux), every allocation above 32 MB is mapped from the kernel afresh
and unmapped when freed, so each large temporary tensor (a correlation volume,
a 12-channel MIND warp) pays for page faults and for the kernel zeroing its
pages. Measured on 2 cores with the ``cpu`` network on a 160×192×224 pair: 25 s
wall time, of which 19 s system time; with large blocks served from the heap
and freed memory kept for reuse, 15 s and 3 s (peak memory 2.4 → 3.1 GB).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

#: glibc ``mallopt`` parameters (``malloc.h``).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: Set to ``0`` to leave the allocator as the C library configures it.
ENVIRONMENT_SWITCH = "RWCNET_KEEP_FREED_MEMORY"


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    """The C library, loaded once; None where it cannot be found or loaded."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def keep_freed_memory(trim_threshold_bytes: int = 1 << 30) -> bool:
    """Serve large blocks from the heap and return freed memory to the system only above ``trim_threshold_bytes``.

    Applies to the whole process and to later allocations only. Returns whether it took effect:
    ``False`` when the C library is not glibc (macOS, Windows, musl) or when the environment
    variable ``RWCNET_KEEP_FREED_MEMORY`` is ``0``.
    """
    if os.environ.get(ENVIRONMENT_SWITCH, "1") == "0":
        return False
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    threshold = min(int(trim_threshold_bytes), 2**31 - 1)
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold))


def release_freed_memory() -> bool:
    """Return the heap's free pages to the system (glibc ``malloc_trim(0)``); ``False`` where unavailable.

    Called between the stages of a registration: with :func:`keep_freed_memory` the network's
    freed temporaries (about 1 GB) would otherwise stay resident while instance optimisation
    allocates its own. Returns whether memory was released.
    """
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))
