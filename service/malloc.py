"""glibc's allocator set up for a long-running inference process.

With glibc's defaults the service's resident memory creeps up under a mixed workload and does not come back: after
a large block is freed, glibc raises its mmap threshold (up to 32 MiB), so later tensors of a few MiB (latents,
activations, PCM of 1-10 s clips in batches of 1-16) are carved from the heap arenas instead of being mapped, and
the holes they leave between longer-lived objects cannot be returned to the system. Every thread that allocates may
also get its own arena (up to 8 per core). Fixing the mmap threshold (which turns off its growth), a trim threshold
and two arenas keeps large buffers mapped and given back when freed. On a 2-core CPU with the three embedded models,
30 rounds of 1-12 concurrent 1-10 s requests took the process from 956 to 1232 MiB with glibc's defaults and from
937 to 1057 MiB with these settings, flat after the twelfth round (``benchmarks/results/soak-cpu.md`` has the
30-minute soak).

Settings an operator has put in the environment (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``MALLOC_ARENA_MAX`` or ``GLIBC_TUNABLES``) win; on a C library other than glibc nothing is changed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("tta.malloc")

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MMAP_THRESHOLD = 256 * 1024  # blocks this size and larger are mapped and unmapped on their own
TRIM_THRESHOLD = 1024 * 1024  # free memory at the top of the heap beyond this goes back to the system
ARENA_MAX = 2

_ENV = {M_MMAP_THRESHOLD: "MALLOC_MMAP_THRESHOLD_", M_TRIM_THRESHOLD: "MALLOC_TRIM_THRESHOLD_",
        M_ARENA_MAX: "MALLOC_ARENA_MAX"}


def _libc():
    if not hasattr(os, "confstr"):
        return None
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return None
    except (ValueError, OSError):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def tune(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD,
         arena_max: int = ARENA_MAX) -> dict[str, int]:
    """Apply the settings above through ``mallopt`` where the environment does not set them already; returns what
    was applied (empty when the C library is not glibc or the operator tuned glibc through ``GLIBC_TUNABLES``)."""
    libc = _libc()
    if libc is None or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return {}
    applied = {}
    for param, value in ((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold),
                         (M_ARENA_MAX, arena_max)):
        name = _ENV[param]
        if name in os.environ:
            continue
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(int(value))) == 1:
            applied[name] = int(value)
        else:
            log.warning("glibc refused mallopt %s=%d", name, value)
    if applied:
        log.info("glibc malloc: %s", ", ".join(f"{k}{v}" for k, v in applied.items()))
    return applied

