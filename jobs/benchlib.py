"""Shared pieces of the benchmark scripts in jobs/ (timing with a warm-up, medians)."""

from __future__ import annotations

import time
from typing import Callable


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after one untimed warm-up call."""
    fn()  # warm-up: Python workers started, modules imported, caches filled
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times
