"""Driver side of training: check the cluster, prepare the data, run the barrier job and
reassemble rank 0's result. Everything that depends on the session's kind (classic or Spark
Connect) goes through ``spark_ddl.driver.capabilities``."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

import torch
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from spark_ddl.agent.entry import run_agent
from spark_ddl.common.train_config import TrainConfig
from spark_ddl.common.wire import (DRIVER_UNREACHABLE, OUTPUT_DDL, REPORT_PAYLOAD, UNIT, WEIGHTS_PAYLOAD, AgentJob,
                                   AgentReport, reassemble)
from spark_ddl.driver.attempts import AttemptPolicy, LaunchWatch
from spark_ddl.driver.capabilities import DirectoryFiles, SessionCapabilities, capabilities
from spark_ddl.driver.cluster import check_cluster
from spark_ddl.driver.columns import ColumnSpec, select_training_columns
from spark_ddl.driver.data import balance_partitions, empty_input_error
from spark_ddl.driver.elastic import agents_for_attempt, spread_shards
from spark_ddl.driver.failures import training_error_from_spark
from spark_ddl.driver.monitor import AgentMonitor
from spark_ddl.driver.progress import ProgressReporter, notify
from spark_ddl.driver.reachability import LostMachine, lost_machines, ranks_to_probe, unreachable_error
from spark_ddl.errors import ConfigError, TrainingError
from spark_ddl.formats.checkpoint import incompatibilities, newest_checkpoint, read_checkpoint_facts, unwritable_reason
from spark_ddl.formats.model_bytes import state_dict_from_bytes
from spark_ddl.formats.weights_stream import load_into_module

log = logging.getLogger("spark_ddl")

MONITOR_POLL_SECONDS = 0.25  # how often the driver looks at the agents' status
CANCEL_WAIT_SECONDS = 60.0  # how long a cancelled job may take to stop its tasks
FENCE_SECONDS = 30.0  # how long a cancelled attempt's reachable agents may take to exit
SLOT_WAIT_SECONDS = 30.0  # after a machine was lost, a retry waits this long (at most timeout) for its slots
SILENCE_WARNING_SECONDS = 30.0  # no agent reached the status channel this long after launch: say so
# Status-channel hosts some agent could not connect to: fits of this process then meet through
# Spark's barrier allGather (see spark_ddl.driver.peer_directory).
HOSTS_AGENTS_CANNOT_REACH: set[str] = set()


@dataclass
class FitResult:
    """Rank 0's report and payloads (the weights, or a function's return value), as received
    on the driver: small ones in memory, streamed ones in local files (``discard`` deletes them)."""

    report: AgentReport  # the facts the driver acts on, and the summary users read
    seconds: float
    payloads: dict[str, bytes]
    files: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def summary(self) -> dict[str, Any]:
        """What users read (the driver adds ``attempts`` and ``result_route`` to it)."""
        return self.report.summary

    def open(self, kind: str) -> BinaryIO:
        """A payload as a binary stream (read from its file when it was streamed)."""
        if kind in self.files:
            return open(self.files[kind], "rb")
        return io.BytesIO(self.payloads[kind])

    def payload(self, kind: str, default: bytes = b"") -> bytes:
        """A payload's bytes, whole (for values that are used whole anyway)."""
        if kind not in self.files and kind not in self.payloads:
            return default
        with self.open(kind) as stream:
            return stream.read()

    def load_weights_into(self, module: torch.nn.Module) -> torch.nn.Module:
        """Read the trained weights into ``module``'s own tensors, one chunk at a time."""
        with self.open(WEIGHTS_PAYLOAD) as stream:
            return load_into_module(module, stream, "the trained weights")

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights as new tensors (a model-sized copy; ``load_weights_into`` is not)."""
        return state_dict_from_bytes(self.payload(WEIGHTS_PAYLOAD))

    def discard(self) -> None:
        """Delete the files of streamed payloads."""
        for path in self.files.values():
            with contextlib.suppress(OSError):
                os.unlink(path)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(path))  # the spool directory, once empty
        self.files = {}


def run_training(
    df: DataFrame, spec: ColumnSpec | None, job: AgentJob, validation: Column | None = None,
    preflight: Callable[[DataFrame], None] | None = None,
) -> FitResult:
    """Launch one barrier task per agent over ``df`` and return rank 0's result.

    ``spec`` says which columns the agents read (None: none, e.g. ``spark_ddl.run`` without a
    DataFrame). ``validation`` is a boolean column marking validation rows (None: no validation set).
    ``preflight`` checks the projected training columns after the cluster checks and before
    anything is launched (the estimator's input scan).
    A job that fails because an agent was lost or stalled is resubmitted up to
    ``max_retries`` times, each attempt resuming from the newest checkpoint; the summary's
    ``attempts`` records every attempt and why it failed. With ``min_workers`` (elastic), a retry
    runs one agent per free slot when there are fewer than ``num_workers`` (see
    ``spark_ddl.driver.elastic``); such an attempt stops at the next epoch boundary, and the next
    one grows back when the slots have returned.
    """
    spark = df.sparkSession
    caps = capabilities(spark)
    config = job.task.config
    if config.checkpoint_dir and "://" not in config.checkpoint_dir:  # the agents' cwd may differ
        config = dataclasses.replace(config, checkpoint_dir=os.path.abspath(config.checkpoint_dir))
    check_cluster(spark, config)
    checkpoints = caps.checkpoint_files()
    first_resume = check_checkpoint_dir(config, checkpoints, probe=caps.driver_sees_agent_files)
    training = (select_training_columns(df, spec, validation) if spec is not None
                else df.select(F.lit(0).cast("byte").alias(UNIT)))  # rows only mark the partitions
    if preflight is not None:
        preflight(training)
    prepared = balance_partitions(training, config.num_workers, caps.partition_count(training))
    attempts: list[dict[str, Any]] = []
    policy = AttemptPolicy(config.max_retries, config.epochs)
    agents, elastic = config.num_workers, config.elastic and job.task.function is None
    failed: TrainingError | None = None  # the previous attempt's error, when it failed
    for attempt in itertools.count(1):
        resume_from = first_resume if attempt == 1 else (
            newest_checkpoint(config.checkpoint_dir, checkpoints) if config.checkpoint_dir else None)
        if job.hooks.attempt_hook is not None:
            job.hooks.attempt_hook(attempt, spark.sparkContext)
        record: dict[str, Any] = {"attempt": attempt, "resumed_from": resume_from}
        if failed is not None:  # who answers now decides who takes part
            _leave_out_lost_machines(failed, caps, config, elastic, record, attempts)
        if elastic:
            previous, agents = agents, agents_for_attempt(spark, config, agents)
            record["agents"] = agents
            if agents != previous:
                record["resized"] = [previous, agents]
        shrunk = agents < config.num_workers
        attempt_job = dataclasses.replace(
            job, task=dataclasses.replace(job.task, config=dataclasses.replace(config, resume_from=resume_from)),
            attempt=dataclasses.replace(job.attempt, agents=agents if shrunk else None),
            hooks=dataclasses.replace(job.hooks, attempt_hook=None))
        failed = None
        try:
            result = _run_barrier_job(spread_shards(prepared, config.num_workers, agents) if shrunk else prepared,
                                      attempt_job, caps)
        except TrainingError as error:
            host = caps.status_host() if error.remote_type == DRIVER_UNREACHABLE else None
            if host is not None and host not in HOSTS_AGENTS_CANNOT_REACH and policy.rerun_after_driver_unreachable():
                HOSTS_AGENTS_CANNOT_REACH.add(host)
                attempts.append(dict(record, error=error.summary_line(), rank=error.rank, retriable=True))
                log.warning("the agents cannot reach this process (%s): this and later fits of this process meet "
                            "through Spark's barrier rendezvous instead (about 1 s more per fit), with no live "
                            "progress; set spark.driver.host (or spark.ddl.statusHost) to an address the executors "
                            "can connect to", error.remote_message)
                continue
            attempts.append(dict(record, error=error.summary_line(), rank=error.rank, retriable=error.retriable))
            error.attempts = attempts
            if not policy.rerun_after_failure(error):
                # an agent lost or stalled, not the agents' own error: was it a machine that went silent?
                lost = [m for m in _lost_machines(error, caps) if m.silent] if error.retriable else []
                if lost:
                    attempts[-1]["unreachable"] = [m.describe() for m in lost]
                    raise _unreachable(lost, error, caps, config, attempts) from None
                raise
            notify("attempt_failed", dict(attempts[-1]))
            log.warning("training attempt %d failed (%s); retrying (%d of %d)%s", attempt,
                        error.summary_line(), policy.failures, config.max_retries,
                        " from the newest checkpoint" if config.checkpoint_dir else " from scratch")
            failed = error
            continue
        if result.report.paused_after_epoch is not None:  # a shrunk attempt reached an epoch boundary
            attempts.append(dict(record, error=None, paused_after_epoch=result.report.paused_after_epoch))
            result.discard()
            policy.rerun_after_pause()
            continue
        attempts.append(dict(record, error=None))
        result.summary["attempts"] = attempts
        return result


def _leave_out_lost_machines(failed: TrainingError, caps: SessionCapabilities, config: TrainConfig, elastic: bool,
                             record: dict[str, Any], attempts: list[dict[str, Any]]) -> None:
    """Before a retry: the machines of ranks that went silent in the failed attempt are probed;
    those that do not answer are named in ``record`` and their executors removed from the
    application. If the slots left are too few (num_workers, or min_workers when elastic) and
    do not come back within ``SLOT_WAIT_SECONDS``, the fit fails here naming those machines."""
    lost = _lost_machines(failed, caps)
    silent = [m for m in lost if m.silent]
    if silent:
        record["unreachable"] = [m.describe() for m in silent]
        record["removed_executors"] = caps.remove_executors_on({m.host for m in silent})
        log.warning("no answer from %s: the retry runs without %s", "; ".join(m.describe() for m in silent),
                    "them" if len(silent) > 1 else "it")
    if not lost:
        return
    needed = config.min_workers if elastic else config.num_workers
    # a machine that answers may get its executor back soon (a restarted worker); a silent one will not
    deadline = time.monotonic() + (0 if elastic or silent else min(config.timeout, SLOT_WAIT_SECONDS))
    slots = caps.task_slots()
    while slots is not None and slots < needed and time.monotonic() < deadline:
        time.sleep(0.5)
        slots = caps.task_slots()
    if slots is not None and slots < needed:
        attempts.append(dict(record, error=f"not started: {slots} slot(s) on the machines that answer, {needed} needed"))
        raise _unreachable(silent or lost, failed, caps, config, attempts) from None


def _lost_machines(failed: TrainingError, caps: SessionCapabilities) -> list[LostMachine]:
    """The machines of the ranks that went silent in the attempt that ended with ``failed``, and of
    the rank whose executor Spark reported lost (its status connection may not have closed yet
    when Spark's report arrives), probed."""
    placement, silent_ranks = getattr(failed, "silence", (None, []))
    ranks = ranks_to_probe(silent_ranks, failed)
    if not placement or not ranks:
        return []
    return lost_machines(placement, ranks, listening=caps.listening_addresses())


def _unreachable(lost: list[LostMachine], cause: TrainingError, caps: SessionCapabilities, config: TrainConfig,
                 attempts: list[dict[str, Any]]) -> TrainingError:
    error = unreachable_error(lost, cause, caps.conf("spark.network.timeout", "120s") or "120s", config.elastic)
    error.attempts = attempts
    return error


def check_checkpoint_dir(config: TrainConfig, files: DirectoryFiles | None = None, probe: bool = True) -> str | None:
    """Before launch: refuse a checkpoint_dir the driver cannot write (``probe``: when the driver
    sees the agents' filesystem), never overwrite another run's checkpoints; on resume, check that
    the newest checkpoint was written with the same settings. Returns the checkpoint to resume.
    ``files``: how the driver sees the agents' checkpoint_dir (default: pyarrow.fs here)."""
    if config.checkpoint_dir is None:
        return None
    if probe:
        reason = unwritable_reason(config.checkpoint_dir)
        if reason is not None:
            raise ConfigError(
                f"checkpoint_dir {config.checkpoint_dir} cannot be created or written from the driver ({reason}). "
                "Choose a directory that the driver and every executor can create and write (a shared filesystem "
                "or an object-store URI), or fix its permissions."
            )
    newest = newest_checkpoint(config.checkpoint_dir, files)
    if newest is None:
        return None
    if not config.resume:
        raise ConfigError(
            f"checkpoint_dir {config.checkpoint_dir} already holds checkpoints of a run "
            f"({newest.rsplit('/', 1)[-1]}). Pass resume=True to continue that run, or choose an "
            "empty directory for a new one."
        )
    saved = read_checkpoint_facts(newest, files)
    differences = incompatibilities(saved["settings"], config.resume_record())
    if differences:
        raise ConfigError(
            f"cannot resume from {newest}: it was written with other settings ("
            + "; ".join(differences) + "). Use the run's settings, or an empty checkpoint_dir."
        )
    if saved["epoch"] >= config.epochs and saved["step"] == 0:
        log.info("checkpoint %s already finished epoch %d of %d", newest, saved["epoch"], config.epochs)
    return newest


def _fence(monitor: AgentMonitor, agents: int, silent: list[int]) -> None:
    """After a cancel, before any retry: wait until the cancelled attempt's agents that answer
    have exited. Its silent agents (a partition) cannot finish another collective without them,
    so they cannot train on, or write checkpoints, beside the next attempt once the link heals."""
    left = monitor.wait_for_exit([r for r in range(agents) if r not in silent], FENCE_SECONDS)
    if left:
        log.warning("rank(s) %s of the cancelled attempt still run after %.0f s", left, FENCE_SECONDS)


def _silence_seconds(job: AgentJob) -> float:
    """A rank not heard from this long has gone silent (its heartbeat runs every heartbeat_interval)."""
    return max(5.0, 5 * job.attempt.heartbeat_interval)


def _run_barrier_job(prepared: DataFrame, job: AgentJob, caps: SessionCapabilities) -> FitResult:
    """One attempt: the barrier job over the prepared partitions, collected on the driver
    while the agents' status channel is watched for stalls."""
    config = job.task.config
    monitor = AgentMonitor(caps.status_host(), config.stall_timeout)
    meet_here = monitor.address is not None and caps.status_host() not in HOSTS_AGENTS_CANNOT_REACH
    job = dataclasses.replace(job, attempt=dataclasses.replace(
        job.attempt, monitor_address=monitor.address, monitor_secret=monitor.secret, meet_through_driver=meet_here,
        heartbeat_interval=min(1.0, config.stall_timeout / 4) if config.stall_timeout else 1.0,
        result_rows_limit=caps.result_rows_limit()))
    shipped = caps.inline(job)  # a Connect plan has a size limit: a large job goes as an artifact

    def agent(batches):
        return run_agent(shipped.value, batches)

    output = prepared.mapInArrow(agent, OUTPUT_DDL, barrier=True)
    tag = f"spark_ddl-fit-{uuid.uuid4().hex[:12]}"
    outcome: dict[str, Any] = {}

    def collect() -> None:  # job tags are per thread: set it in the thread that runs the job
        with caps.tagged(tag):
            try:
                outcome["rows"] = output.collect()
            except BaseException as exc:  # noqa: BLE001 - handed to the driver thread below
                outcome["error"] = exc

    started = time.perf_counter()
    runner = threading.Thread(target=collect, daemon=True, name=f"spark-ddl-{tag}")
    runner.start()
    reporter = ProgressReporter(config.progress)
    silence_noted = monitor.address is None
    agents = job.attempt.agents or config.num_workers
    launch = LaunchWatch(agents, config.timeout, caps.task_slots) if monitor.address is not None else None
    try:
        while runner.is_alive():
            runner.join(MONITOR_POLL_SECONDS)
            reporter.update(monitor.status_of(0))
            problem = launch.problem(monitor.missing_ranks(agents), monitor.placement) if launch else None
            if problem is not None and runner.is_alive():
                launch = None
                log.error("%s", problem)
                caps.cancel(tag)
                runner.join(CANCEL_WAIT_SECONDS)
                problem.silence = (monitor.placement, monitor.missing_ranks(agents))
                _fence(monitor, agents, problem.silence[1])
                raise problem
            if not silence_noted and not monitor.heard_from_any() and \
                    time.perf_counter() - started > SILENCE_WARNING_SECONDS:
                silence_noted = True
                log.warning("no agent has reached the status channel at %s:%d yet (executors that cannot "
                            "connect to this process train on without it): progress is shown when the fit "
                            "ends, and with stall_timeout the agents watch for stalls themselves", *monitor.address)
            stall = monitor.stall_error(agents)
            if stall is not None and runner.is_alive():
                log.error("%s", stall)
                caps.cancel(tag)
                runner.join(CANCEL_WAIT_SECONDS)
                stall.silence = (monitor.placement, monitor.silent_ranks(agents, _silence_seconds(job)))
                _fence(monitor, agents, stall.silence[1])
                raise stall
    except KeyboardInterrupt:
        caps.cancel(tag)
        raise
    finally:
        files = monitor.take_uploads() if "rows" in outcome else {}
        monitor.close()
        reporter.update(monitor.status_of(0))  # the agents' last reports arrived before they finished
        if "rows" not in outcome:
            reporter.close(finished=False)
    if "error" in outcome:
        exc = outcome["error"]
        error = training_error_from_spark(exc)
        if error is None:
            raise exc
        error.spark_exception = exc  # Spark's own (long) exception, for debugging
        error.silence = (monitor.placement, monitor.silent_ranks(agents, _silence_seconds(job)))
        raise error from None
    rows = outcome["rows"]
    seconds = time.perf_counter() - started
    if not rows:  # Spark optimised the job away: only happens for an input with no rows
        reporter.close(finished=False)
        raise empty_input_error()
    payloads = {kind: reassemble(rows, kind) for kind in {r["kind"] for r in rows}}
    report_bytes = payloads.pop(REPORT_PAYLOAD, None)
    result = FitResult(AgentReport.decode(report_bytes) if report_bytes is not None else AgentReport(),
                       seconds, payloads, files)
    paused = result.report.paused_after_epoch is not None  # elastic: an epoch boundary, no weights yet
    if report_bytes is None or not (payloads or files or paused):
        result.discard()
        reporter.close(finished=False)
        raise RuntimeError("the job finished but rank 0 returned no result")
    result.summary["result_route"] = {kind: "stream" if kind in files else "rows" for kind in (*files, *payloads)}
    reporter.catch_up(result.summary.get("history") or [], config.epochs)  # epochs no status report showed
    reporter.close(finished=True)
    return result
