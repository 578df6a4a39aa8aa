"""What crosses between the driver and the agents: the job shipped to every agent, the column
names of the training rows, the schema of the agents' output rows, and the marker that carries
an agent's error inside Spark's exception text.

Both sides import this module; it imports neither side.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

from spark_ddl.config import TrainConfig
from spark_ddl.model_source import ModelSource

# ------------------------------------------------------------------ the training rows

FEATURES = "__ddl_features"  # array<float>: one row's features
LABEL = "__ddl_label"  # double, or array<float> for array labels
VALIDATION = "__ddl_is_validation"  # boolean, present when a validation set is configured


# ------------------------------------------------------------------ the job


@dataclass
class AgentJob:
    """What the driver ships to every agent (pickled with the task closure)."""

    config: TrainConfig
    model: ModelSource
    fail_hook: Callable[[int, int, int, Any], None] | None = None  # tests: run before each step
    final_hook: Callable[[int, Any], None] | None = None  # tests: (rank, module) after the final replica check
    strategy_factory: Callable[[Any], Any] | None = None  # benchmarks: callable(device) -> strategy
    monitor_address: tuple[str, int] | None = None  # the driver's status channel (set per attempt)
    monitor_secret: str | None = None
    heartbeat_interval: float = 1.0


# ------------------------------------------------------------------ the output rows

CHUNK_BYTES = 4 * 1024 * 1024  # no output row carries more than this

OUTPUT_SCHEMA = pa.schema(
    [("kind", pa.string()), ("rank", pa.int32()), ("seq", pa.int32()), ("data", pa.binary())]
)
OUTPUT_DDL = "kind string, rank int, seq int, data binary"


def output_batches(kind: str, rank: int, payload: bytes) -> Iterator[pa.RecordBatch]:
    """``payload`` cut into rows of at most CHUNK_BYTES, as Arrow batches of OUTPUT_SCHEMA."""
    chunks = [payload[i : i + CHUNK_BYTES] for i in range(0, len(payload), CHUNK_BYTES)] or [b""]
    for seq, chunk in enumerate(chunks):
        yield pa.RecordBatch.from_pydict(
            {"kind": [kind], "rank": [rank], "seq": [seq], "data": [chunk]}, schema=OUTPUT_SCHEMA
        )


def reassemble(rows: Iterable[Any], kind: str, rank: int = 0) -> bytes | None:
    """Join the chunks of one (kind, rank) payload in order; None if there were none."""
    parts = sorted((r["seq"], bytes(r["data"])) for r in rows if r["kind"] == kind and r["rank"] == rank)
    if not parts:
        return None
    if [seq for seq, _ in parts] != list(range(len(parts))):
        raise RuntimeError(f"the {kind!r} payload of rank {rank} arrived incomplete")
    return b"".join(data for _, data in parts)


# ------------------------------------------------------------------ agent failures
# An agent's error travels inside Spark's own exception text: the agent raises AgentFailure
# whose first line is a machine-readable marker, the driver finds it and re-raises it as a
# TrainingError (see spark_ddl.driver.failures).

FAILURE_MARKER = "SPARK_DDL_AGENT_FAILURE"
_MARKER_RE = re.compile(re.escape(FAILURE_MARKER) + r" (\{.*?\}) END_SPARK_DDL_AGENT_FAILURE")


class AgentFailure(RuntimeError):
    """Raised inside a barrier task; its text carries the original error to the driver."""

    def __init__(self, info: dict[str, Any]) -> None:
        """``info`` holds rank, type, message, traceback and secondary (a follow-on failure)."""
        payload = json.dumps(info, sort_keys=True)
        super().__init__(
            f"{FAILURE_MARKER} {payload} END_SPARK_DDL_AGENT_FAILURE\n"
            f"rank {info['rank']}: {info['type']}: {info['message']}"
        )


def parse_agent_failures(text: str) -> list[dict[str, Any]]:
    """All agent-failure records found in a Spark exception's text, in order of appearance."""
    found = []
    for match in _MARKER_RE.finditer(text):
        try:
            found.append(json.loads(match.group(1)))
        except json.JSONDecodeError:
            continue
    return found
