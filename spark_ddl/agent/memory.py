"""An agent's memory: its peak resident size (reported in the summary) and glibc's mmap
threshold (low while the shard is built, so that its pieces give their memory back when freed;
high again for training, so that a step's large tensors reuse the heap)."""

from __future__ import annotations

import gc
import logging
import os
from typing import Any

log = logging.getLogger("spark_ddl.agent")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt options
_startup_frozen = False


def freeze_startup_objects() -> None:
    """Once per Python worker: move the objects alive now (torch, pyspark and the project, imported)
    out of the cycle collector's sight. Leaving the group runs a full collection (the process group
    must be freed before it is destroyed); without this it walks the ~200k objects of the imports
    every time: 0.08 s alone, up to 0.7 s with four agents on two cores."""
    global _startup_frozen
    if not _startup_frozen:
        gc.freeze()
        _startup_frozen = True


def reset_peak_rss() -> None:
    """Restart this process's peak-RSS counter (Linux), so a reused Python worker reports this fit's."""
    try:
        with open("/proc/self/clear_refs", "w") as out:
            out.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since ``reset_peak_rss`` (VmHWM; 0 if unknown)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def minor_page_faults() -> int:
    """This process's minor page faults so far (0 where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:
        return 0
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def log_memory(where: str) -> None:
    """At DEBUG level: the current and peak RSS, labelled ``where``."""
    if log.isEnabledFor(logging.DEBUG) and os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status if line.startswith(("VmRSS", "VmHWM")))
        log.debug("memory %s: RSS %s, peak %s", where, fields.get("VmRSS", "?").strip(),
                  fields.get("VmHWM", "?").strip())


def _glibc() -> Any:
    """glibc through ctypes, or None where this process does not run on glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - AttributeError: not glibc
        return libc
    except (OSError, AttributeError):
        return None


def _mallopt(option: int, value: int) -> None:
    libc = _glibc()
    if libc is not None:
        libc.mallopt(option, value)


def release_free_memory() -> None:
    """Give the free memory of glibc's heap and of Arrow's pool back to the system: a reused
    Python worker starts its next fit without what earlier fits freed but kept."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except ImportError:
        pass


def map_large_allocations(threshold: int = 1 << 20) -> None:
    """Have glibc serve allocations above ``threshold`` bytes with their own mmap.

    glibc raises its mmap threshold after large blocks are freed, after which the shard's
    pieces (megabytes each) come from the heap and freeing them does not lower RSS: the
    shard's peak would be two copies instead of one. A fixed threshold keeps each piece's
    memory returnable the moment it is copied into the shard. No-op without glibc. Undo with
    ``reuse_heap_memory`` once the shard is built.
    """
    _mallopt(M_MMAP_THRESHOLD, threshold)  # also turns off glibc's dynamic adjustment


def reuse_heap_memory(threshold: int = 32 << 20) -> None:
    """Serve allocations up to ``threshold`` bytes from the heap and keep up to twice that
    free in it, as glibc's own adjustment would: for training, after the shard is built.

    With the shard's 1 MB threshold a model's gradient of a megabyte or more (one 512×512
    layer) was mapped and unmapped at every step: 256 page faults, ~0.4 ms of kernel time
    per step, a fifth of a step at batch 32. No-op without glibc.
    """
    _mallopt(M_MMAP_THRESHOLD, threshold)
    _mallopt(M_TRIM_THRESHOLD, 2 * threshold)
