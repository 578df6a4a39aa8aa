"""Turning Spark's exception for a failed barrier job into the agent's own error."""

from __future__ import annotations

import builtins
import re

from spark_ddl.common.wire import STALLED, parse_agent_failures
from spark_ddl.driver.monitor import StallError
from spark_ddl.errors import NonFiniteLossError, TrainingError

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
    if remote_type == STALLED:
        return StallError(
            f"Training stalled: {record.get('message')}.\nThe agent stopped itself (it had no status "
            "channel to this process, so it watched for stalls on the executor) and the job failed. If "
            "steps can legitimately take this long, raise stall_timeout.",
            rank=record.get("rank"), remote_type="Stall", remote_message=record.get("message"),
            remote_traceback=record.get("traceback"), retriable=True)
    message = (
        f"Training failed on agent rank {record.get('rank')}: "
        f"{remote_type}: {record.get('message')}\n\nWorker traceback:\n{record.get('traceback', '')}"
    )
    if remote_type == NonFiniteLossError.__name__:  # the agents' own error type, with where it happened
        details = record.get("details") or {}
        ranks = [int(r) for r in details.get("ranks") or []]
        return NonFiniteLossError(
            f"Training failed on agent rank {record.get('rank')}: {remote_type}: {record.get('message')}",
            rank=ranks[0] if ranks else record.get("rank"), epoch=details.get("epoch"), step=details.get("step"),
            ranks=ranks, remote_type=remote_type, remote_message=record.get("message"),
            remote_traceback=record.get("traceback"), retriable=False,
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
            typed = type(f"Training{type_name}", (TrainingError, base), {})
            typed("probe")  # constructible from a message (ExceptionGroup is not)
            _TYPED_ERRORS[type_name] = typed
        except TypeError:  # an incompatible instance layout or constructor
            _TYPED_ERRORS[type_name] = TrainingError
    return _TYPED_ERRORS[type_name]
