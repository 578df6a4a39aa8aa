"""Exceptions raised on the driver. Every message says what is wrong and how to fix it."""

from __future__ import annotations

import builtins
import json
import re
from typing import Any


class SparkDDLError(Exception):
    """Base class of every error spark_ddl raises on purpose."""


class ConfigError(SparkDDLError, ValueError):
    """A parameter of the estimator is invalid (raised before any Spark job starts)."""


class SchemaError(SparkDDLError, ValueError):
    """The input DataFrame does not fit the estimator's columns (raised before training)."""


class ClusterConfigError(SparkDDLError):
    """The Spark cluster cannot run the requested barrier job; the message names the setting."""


class TrainingError(SparkDDLError, RuntimeError):
    """An agent failed while training; carries the worker's own exception and traceback.

    Attributes:
        rank: the rank of the agent whose error caused the failure (None if unknown).
        remote_type: the class name of the exception raised on the worker.
        remote_message: its message.
        remote_traceback: the worker-side traceback text.
        retriable: True when an agent was lost or stalled (a resubmission may succeed);
            False for an error the agent's own code raised (it would recur).
    """

    def __init__(
        self,
        message: str,
        rank: int | None = None,
        remote_type: str | None = None,
        remote_message: str | None = None,
        remote_traceback: str | None = None,
        retriable: bool = False,
    ) -> None:
        super().__init__(message)
        self.rank = rank
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        self.retriable = retriable
        self.attempts: list[dict[str, Any]] = []  # every attempt of the fit, set by the driver

    def summary_line(self) -> str:
        """One line: the rank and the error."""
        return f"rank {self.rank}: {self.remote_type}: {self.remote_message}"


# --------------------------------------------------------------------------------------
# Agent failures travel inside Spark's own exception text: the agent raises AgentFailure
# whose first line is a machine-readable marker, the driver finds it and re-raises it as
# a TrainingError (that also subclasses the worker's builtin exception type, so
# ``except ValueError`` still works on the driver).
# --------------------------------------------------------------------------------------

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


_TYPED_ERRORS: dict[str, type] = {}


def training_error_from_spark(exc: BaseException) -> TrainingError | None:
    """Turn Spark's barrier-stage exception into a TrainingError naming the root cause.

    Returns None when the text holds no agent-failure record (the failure happened outside
    the agent, e.g. in Spark itself); the caller then re-raises the original exception.
    """
    text = str(exc)
    records = parse_agent_failures(text)
    primary = [r for r in records if not r.get("secondary")]
    if not primary:
        lost = agent_lost_error(text)
        if lost is not None:
            return lost
    if not records:
        return None
    record = (primary or records)[0]
    remote_type = record.get("type", "Exception")
    message = (
        f"Training failed on agent rank {record.get('rank')}: "
        f"{remote_type}: {record.get('message')}\n\nWorker traceback:\n{record.get('traceback', '')}"
    )
    cls = _typed_training_error(remote_type)
    return cls(
        message,
        rank=record.get("rank"),
        remote_type=remote_type,
        remote_message=record.get("message"),
        remote_traceback=record.get("traceback"),
        retriable=not primary,  # only peers' broken connections: the cause was outside Python
    )


_LOST_SIGNS = ("Python worker exited unexpectedly", "ExecutorLostFailure", "Remote RPC client disassociated",
               "Executor heartbeat timed out", "Python worker exited")
_BARRIER_TASK_RE = re.compile(r"barrier task ResultTask\(\d+, (\d+)\) finished unsuccessfully")


def agent_lost_error(text: str) -> TrainingError | None:
    """A retriable TrainingError when Spark's text says an agent's process or executor died."""
    sign = next((s for s in _LOST_SIGNS if s in text), None)
    if sign is None:
        return None
    task = _BARRIER_TASK_RE.search(text)
    rank = int(task.group(1)) if task else None
    line = next((ln.strip() for ln in text.splitlines() if sign in ln), sign)
    return TrainingError(
        f"Training failed: agent rank {rank if rank is not None else '?'} was lost ({line}). "
        "Its process or executor died without a Python error (killed, out of memory, crashed). "
        "With max_retries and checkpoint_dir the fit resubmits and resumes.",
        rank=rank, remote_type="AgentLost", remote_message=line, retriable=True,
    )


def _typed_training_error(type_name: str) -> type:
    """A TrainingError subclass that also derives from the builtin ``type_name`` if there is one."""
    base = getattr(builtins, type_name, None)
    if not (isinstance(base, type) and issubclass(base, Exception)) or issubclass(
        TrainingError, base
    ):
        return TrainingError
    if type_name not in _TYPED_ERRORS:
        try:
            _TYPED_ERRORS[type_name] = type(f"Training{type_name}", (TrainingError, base), {})
        except TypeError:  # incompatible instance layout (e.g. OSError)
            _TYPED_ERRORS[type_name] = TrainingError
    return _TYPED_ERRORS[type_name]
