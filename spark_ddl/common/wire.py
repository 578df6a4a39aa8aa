"""What crosses between the driver and the agents: the job shipped to every agent, rank 0's
typed answer (AgentReport), how a value travels (inline, a broadcast or a session artifact),
the column names of the training rows, the schema of the agents' output rows, the marker that
carries an agent's error inside Spark's exception text, and how a rank's status reads.

Both sides import this module; it imports neither side.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

from spark_ddl.common.batch_format import POSITIONAL_KEY, BatchSpec
from spark_ddl.common.model_source import ModelSource
from spark_ddl.common.train_config import TrainConfig
from spark_ddl.formats.weights_stream import ShippedWeights

# ------------------------------------------------------------------ the training rows

INPUT_PREFIX = "__ddl_in_"  # the model's inputs: __ddl_in_0, __ddl_in_1, ... (see batch_format)
FEATURES = INPUT_PREFIX + "0"  # the one-input shorthand's column
LABEL = "__ddl_label"  # bigint (integer labels), double, or array<float>
VALIDATION = "__ddl_is_validation"  # boolean, present when a validation set is configured
UNIT = "__ddl_unit"  # spark_ddl.run without inputs: one byte per row, the rows only mark the partitions


def input_column(index: int) -> str:
    """The wire column of the model's ``index``-th input."""
    return f"{INPUT_PREFIX}{index}"


# ------------------------------------------------------------------ the job
# What the driver ships to every agent (pickled with the task closure), in three parts: the
# task (the same for every attempt of a fit), the attempt's facts (set by the launcher per
# attempt) and the test hooks.


@dataclass(frozen=True)
class TrainingTask:
    """What the agents train (or run): the same for every attempt of a fit."""

    config: TrainConfig
    model: ModelSource | None  # None: the agents run ``function`` instead of training a model
    batch: BatchSpec | None  # the model's inputs (None: no data); arrays' raggedness is settled by the agents
    label_is_integer: bool = False  # integer label column (kept int64 for custom losses and steps)
    function: bytes | None = None  # spark_ddl.run: the user's cloudpickled fn(ctx)
    strategy_factory: Callable[[Any], Any] | None = None  # benchmarks: callable(device) -> strategy
    initial_weights: bytes | None = None  # warm start: safetensors loaded before the strategy's setup
    initial_optimizer: bytes | None = None  # warm start: the optimiser state (torch.save), loaded after it
    module_weights: bytes | ShippedWeights | None = None  # the weights an architecture-only model pickle left out


@dataclass(frozen=True)
class AttemptFacts:
    """How one attempt reaches the driver and how many agents it runs (set by the launcher)."""

    monitor_address: tuple[str, int] | None = None  # the driver's status channel (set per attempt)
    monitor_secret: str | None = None
    meet_through_driver: bool = False  # rendezvous through the status channel, not Spark's allGather
    heartbeat_interval: float = 1.0
    stream_results: bool = True  # rank 0 streams big payloads over the status channel (False: rows only)
    result_rows_limit: int | None = None  # the most bytes a payload may carry as result rows (driver's JVM)
    agents: int | None = None  # elastic: this attempt's agent count when below num_workers (then each agent
    # holds several of the num_workers shards, marked by SHARD_COLUMN, and stops at the next epoch boundary)


@dataclass(frozen=True)
class Hooks:
    """Test-only hooks (tests/README.md): fault injection, reading replicas, changing the cluster."""

    fail_hook: Callable[[int, int, int, Any], None] | None = None  # tests: run before each step
    final_hook: Callable[[int, Any], None] | None = None  # tests: (rank, module) after the final replica check
    attempt_hook: Callable[[int, Any], None] | None = None  # tests (driver side): (attempt, SparkContext) first


@dataclass(frozen=True)
class AgentJob:
    """What the driver ships to every agent (pickled with the task closure)."""

    task: TrainingTask
    attempt: AttemptFacts = field(default_factory=AttemptFacts)
    hooks: Hooks = field(default_factory=Hooks)


# ------------------------------------------------------------------ the answer


@dataclass(frozen=True)
class AgentReport:
    """What rank 0 answers (the REPORT_PAYLOAD, JSON): the facts the driver acts on, typed, and
    the summary users read (``TorchModel.summary``, ``spark_ddl.run``'s summary), which holds
    none of them."""

    summary: dict[str, Any] = field(default_factory=dict)  # history, shard sizes, device, strategy facts, ...
    paused_after_epoch: int | None = None  # elastic: the attempt stopped at this epoch boundary (no weights sent)
    batch: BatchSpec | None = None  # the inputs as the agents agreed on them (which arrays are ragged)
    row_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # each fixed-shape input's row shape
    result_format: str | None = None  # spark_ddl.run: how the RESULT_PAYLOAD is encoded (encode_value's kind)

    @property
    def feature_dim(self) -> int | None:
        """The one-input shorthand's width (None: no such input, or ragged)."""
        shape = self.row_shapes.get(POSITIONAL_KEY)
        return int(shape[0]) if shape else None

    def encode(self) -> bytes:
        """The report as JSON bytes (no pickle on the way back)."""
        return json.dumps({
            "summary": self.summary, "paused_after_epoch": self.paused_after_epoch,
            "batch": self.batch.to_json() if self.batch is not None else None,
            "row_shapes": {name: list(shape) for name, shape in self.row_shapes.items()},
            "result_format": self.result_format,
        }).encode()

    @classmethod
    def decode(cls, data: bytes) -> "AgentReport":
        """The report ``encode`` wrote."""
        raw = json.loads(data)
        shapes = raw.get("row_shapes") or {}
        return cls(summary=dict(raw.get("summary") or {}), paused_after_epoch=raw.get("paused_after_epoch"),
                   batch=BatchSpec.from_json(raw["batch"]) if raw.get("batch") is not None else None,
                   row_shapes={name: tuple(int(n) for n in shape) for name, shape in shapes.items()},
                   result_format=raw.get("result_format"))


# ------------------------------------------------------------------ how a value travels
# The driver's session capabilities (spark_ddl.driver.capabilities) choose one per session kind;
# executors read ``.value`` and never need to know which.


@dataclass(frozen=True)
class InlineValue:
    """A value pickled into the job's closure."""

    obj: Any

    @property
    def value(self) -> Any:
        return self.obj


@dataclass(frozen=True)
class BroadcastValue:
    """A value in a Spark broadcast variable (classic sessions)."""

    broadcast: Any  # pyspark.Broadcast

    @property
    def value(self) -> Any:
        return self.broadcast.value


@dataclass(frozen=True)
class ArtifactValue:
    """A pickled value uploaded with ``spark.addArtifacts(file=True)`` (Spark Connect):
    executors read it from their session's files directory."""

    name: str

    @property
    def value(self) -> Any:
        from pyspark import SparkFiles

        with open(SparkFiles.get(self.name), "rb") as stream:
            return pickle.load(stream)


# ------------------------------------------------------------------ the output rows

SHARD_COLUMN = "__ddl_shard"  # elastic: the shard (of num_workers) a row belongs to
ROW_COLUMN = "__ddl_row"  # elastic: the row's position in its shard



def agent_of_shard(shard: int, shards: int, agents: int) -> int:
    """Elastic: the agent that holds ``shard`` (contiguous blocks of shards per agent)."""
    return shard * agents // shards


CHUNK_BYTES = 4 * 1024 * 1024  # no output row carries more than this
ROWS_HEAP_FACTOR = 8  # driver JVM heap a payload costs when it comes back as collected rows (measured)

OUTPUT_SCHEMA = pa.schema(
    [("kind", pa.string()), ("rank", pa.int32()), ("seq", pa.int32()), ("data", pa.binary())]
)
OUTPUT_DDL = "kind string, rank int, seq int, data binary"
# The payloads (the ``kind`` column) rank 0 sends back: spark_ddl.agent.delivery sends, FitResult holds them
REPORT_PAYLOAD = "report"  # AgentReport.encode(): the summary and the facts the driver acts on (always sent)
WEIGHTS_PAYLOAD = "weights"  # the trained weights (spark_ddl.formats.weights_stream' streamed safetensors)
OPTIMIZER_PAYLOAD = "optimizer"  # rank 0's optimizer state, for a warm start
RESULT_PAYLOAD = "result"  # spark_ddl.run: the function's return value (encode_value)
# what rank 0 may stream over the status channel (the optimizer too: Adam's state is twice the weights)
STREAMED_PAYLOADS = (WEIGHTS_PAYLOAD, OPTIMIZER_PAYLOAD, RESULT_PAYLOAD)


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


# ------------------------------------------------------------------ a rank's status

STALLED = "AgentStalled"  # the error type an agent reports when it stopped itself after a stall
DRIVER_UNREACHABLE = "DriverUnreachableError"  # an agent could not open the driver's rendezvous


def describe(status: dict[str, Any]) -> str:
    """'epoch 2, step 5: computing the step (forward/backward)' and the like."""
    where = []
    if status.get("epoch") is not None:
        where.append(f"epoch {int(status['epoch']) + 1}")
    if status.get("step") is not None:
        where.append(f"step {int(status['step']) + 1}")
    phase = status.get("phase") or "unknown"
    return (", ".join(where) + ": " if where else "") + str(phase)


# ------------------------------------------------------------------ return values (spark_ddl.run)


def encode_value(value: Any) -> tuple[str, bytes]:
    """(format, bytes) of a function's return value: tensors and state dicts as safetensors,
    plain data as JSON, anything else as a cloudpickle (it comes from the user's own function,
    which the driver shipped)."""
    import torch
    from safetensors.torch import save as save_safetensors

    def plain(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to("cpu").contiguous().clone()

    if value is None:
        return "none", b""
    if isinstance(value, torch.Tensor):
        return "tensor", save_safetensors({"value": plain(value)})
    if isinstance(value, dict) and value and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in value.items()):
        return "state_dict", save_safetensors({k: plain(v) for k, v in value.items()})
    try:
        return "json", json.dumps(value).encode()
    except (TypeError, ValueError):
        from pyspark import cloudpickle

        return "pickle", cloudpickle.dumps(value)


def decode_value(kind: str, data: bytes) -> Any:
    """The value ``encode_value`` encoded (a pickle only when the function returned one)."""
    if kind == "none":
        return None
    if kind in ("tensor", "state_dict"):
        from safetensors.torch import load as load_safetensors

        tensors = load_safetensors(data)
        return tensors["value"] if kind == "tensor" else tensors
    if kind == "json":
        return json.loads(data)
    return pickle.loads(data)


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
