"""An agent's memory: its peak resident size (reported in the summary) and glibc's mmap
threshold (so that the shard's pieces give their memory back when freed)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("spark_ddl.agent")


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


def log_memory(where: str) -> None:
    """At DEBUG level: the current and peak RSS, labelled ``where``."""
    if log.isEnabledFor(logging.DEBUG) and os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status if line.startswith(("VmRSS", "VmHWM")))
        log.debug("memory %s: RSS %s, peak %s", where, fields.get("VmRSS", "?").strip(),
                  fields.get("VmHWM", "?").strip())


def map_large_allocations(threshold: int = 1 << 20) -> None:
    """Have glibc serve allocations above ``threshold`` bytes with their own mmap.

    glibc raises its mmap threshold after large blocks are freed, after which the shard's
    pieces (megabytes each) come from the heap and freeing them does not lower RSS: the
    shard's peak would be two copies instead of one. A fixed threshold keeps each piece's
    memory returnable the moment it is copied into the shard. No-op without glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD (also turns off its dynamic adjustment)
    except (OSError, AttributeError):
        pass
