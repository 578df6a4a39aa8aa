"""The agent's entry point: what the driver's barrier ``mapInArrow`` runs for each partition,
and how a failure leaves it (the error travels to the driver inside Spark's exception text).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import Iterator

import pyarrow as pa
import torch.distributed as dist

from spark_ddl.agent.function import run_function
from spark_ddl.agent.heartbeat import Heartbeat, interruptible
from spark_ddl.agent.memory import freeze_startup_objects
from spark_ddl.agent.training import train
from spark_ddl.common.wire import AgentFailure, AgentJob
from spark_ddl.sync.host_reduce import LocalPeerError, abort_local_peers

log = logging.getLogger("spark_ddl.agent")

# Seconds a rank whose error is only a consequence of a peer's failure (a broken collective)
# waits before raising, so that the peer's own error reaches the driver first.
SECONDARY_FAILURE_DELAY = 3.0
# Seconds a failing agent waits for its process group's teardown before reporting its error:
# destroying a gloo group while a peer is inside a collective can block until the timeout,
# and the root cause must reach the driver before the peers' follow-on errors.
FAILURE_TEARDOWN_SECONDS = 2.0


def run_agent(job: AgentJob, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Train on this partition with the other barrier tasks (or run ``spark_ddl.run``'s
    function); rank 0 yields the result rows."""
    from pyspark import BarrierTaskContext

    freeze_startup_objects()
    context = BarrierTaskContext.get()
    rank = context.partitionId()
    attempt, config = job.attempt, job.task.config
    heartbeat = Heartbeat(attempt.monitor_address, attempt.monitor_secret, rank, attempt.heartbeat_interval,
                          config.stall_timeout, placement=[info.address for info in context.getTaskInfos()])
    if config.agent_log_level != "OFF":
        heartbeat.forward_logs(config.agent_log_level)
    result: list[pa.RecordBatch] = []
    with interruptible(heartbeat):  # without a status channel the heartbeat may stop a stalled agent
        heartbeat.start()
        try:
            result = (run_function if job.task.function is not None else train)(job, context, batches, heartbeat)
        except Exception as exc:
            heartbeat.stop()  # no interruption while the failure is reported
            _raise_agent_failure(rank, exc)
        finally:
            heartbeat.stop()
            destroy_group_within(FAILURE_TEARDOWN_SECONDS)  # after leave_group (success) nothing is left
    yield from result


def _is_secondary(exc: BaseException) -> bool:
    """True for errors that only mean a peer went away (broken collective or store)."""
    if isinstance(exc, (LocalPeerError, getattr(dist, "DistError", ()))):
        return True
    text = f"{type(exc).__name__}: {exc}"
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Gloo", "gloo", "Connection closed by peer", "Connection reset", "NCCL")
    )


def _raise_agent_failure(rank: int, exc: BaseException) -> None:
    abort_local_peers(rank)  # agents waiting for this one's gradients in shared memory stop now
    secondary = _is_secondary(exc)
    info = {
        "rank": rank,
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
        "secondary": secondary,
    }
    details = getattr(exc, "details", None)
    if isinstance(details, dict):  # e.g. NonFiniteLossError's epoch, step and ranks
        info["details"] = details
    if secondary:
        destroy_group_within(FAILURE_TEARDOWN_SECONDS)
        time.sleep(SECONDARY_FAILURE_DELAY)
    raise AgentFailure(info) from exc


def destroy_group_within(seconds: float) -> None:
    """Destroy the default process group, if any, waiting at most ``seconds`` for it.

    A teardown that blocks (a peer still inside a collective) goes on in a daemon thread; the
    next agent in this Python worker destroys a group that is still left, and a worker that
    exits takes it along.
    """
    if not dist.is_initialized():
        return
    teardown = threading.Thread(target=dist.destroy_process_group, daemon=True, name="spark-ddl-teardown")
    teardown.start()
    teardown.join(seconds)
    if teardown.is_alive():
        log.warning("the process group's teardown is still blocked after %.0f s; reporting the error first",
                    seconds)
