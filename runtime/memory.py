"""Keep freed memory in the process (glibc malloc tuning), for the CLI's long CPU jobs.

By default glibc serves large allocations with mmap and unmaps them on free, and trims the heap top;
every new activation tensor then page-faults fresh pages, which on the VMs we measured cost as much as
the matmuls themselves (Wanda 2:4 on the default model: 70 s -> 39 s with this). Called explicitly by
the CLI; never on import.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to the maximum; True when applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    applied = bool(mallopt(_M_MMAP_THRESHOLD, _INT_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
    if not applied:
        log.debug("mallopt refused the thresholds; memory behaviour unchanged")
    return applied
