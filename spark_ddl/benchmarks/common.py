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
