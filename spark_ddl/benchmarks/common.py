"""Shared pieces of the benchmark scripts (timing with a warm-up, medians)."""

from __future__ import annotations

import json
import time
from pathlib import Path
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


def emit(result: dict, json_path: str | None) -> None:
    """Print the result as one JSON line, and write it (indented) to ``json_path`` if given."""
    print(json.dumps(result))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))


def steady_mean(history: list[dict], key: str = "seconds") -> float | None:
    """The mean of ``key`` over a fit's epochs after the first (every epoch of a one-epoch fit; None
    where no epoch has it). A mean, not a median: where ``sync_every`` does not divide an epoch's
    steps, local SGD's epochs hold different numbers of averages (digits on 2 × 2 agents: 12 steps,
    an average every 8, so epochs of one and of two) and a median picks one kind of epoch."""
    values = [h[key] for h in (history[1:] or history) if h.get(key) is not None]
    return sum(values) / len(values) if values else None
