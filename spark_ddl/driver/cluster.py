"""Before launch: can this Spark application run the barrier job at all? Fails in seconds,
naming the setting to change (Spark itself would notice only after minutes). Classic and
Spark Connect sessions give the same messages (``spark_ddl.driver.capabilities``)."""

from __future__ import annotations

import time

import torch
from pyspark.sql import SparkSession

from spark_ddl.common.train_config import TrainConfig
from spark_ddl.driver.capabilities import SessionCapabilities, capabilities
from spark_ddl.errors import ClusterConfigError

EXECUTOR_WAIT_SECONDS = 60.0  # how long to wait for executors to register before failing


def check_cluster(spark: SparkSession, config: TrainConfig) -> None:
    """Fail in seconds, naming the setting to change, if the barrier job cannot run."""
    caps = capabilities(spark)
    if (caps.conf("spark.dynamicAllocation.enabled", "false") or "").strip().lower() == "true":
        raise ClusterConfigError(
            "Barrier execution does not support dynamic allocation: set "
            "spark.dynamicAllocation.enabled=false for this application."
        )
    if config.use_gpu:
        _check_gpu_resources(caps)
    needed = config.min_workers if config.elastic else config.num_workers  # elastic starts on what there is
    slots = _wait_for_slots(caps, needed, min(EXECUTOR_WAIT_SECONDS, config.timeout))  # within the fit's bound
    if slots is not None and slots < needed:
        master, name = caps.master(), "min_workers" if config.elastic else "num_workers"
        task_cpus = caps.conf("spark.task.cpus", "1") or "1"
        raise ClusterConfigError(
            f"{name}={needed} needs {needed} barrier task slots at "
            f"once, but the cluster offers {slots} (master={master}, spark.task.cpus={task_cpus}). "
            f"Lower {name} to {max(slots, 1)} or fewer, or give Spark more cores: e.g. "
            f"master local[{config.num_workers * int(task_cpus)}], or more executors/"
            "spark.executor.cores."
        )


def _wait_for_slots(caps: SessionCapabilities, needed: int, wait: float) -> int | None:
    """Slots available now; in cluster modes, wait a little for executors still starting.
    None when the session cannot tell (Spark's own check then applies)."""
    slots = caps.task_slots()
    if slots is None or slots >= needed or _is_local_mode(caps.master()):
        return slots
    deadline = time.monotonic() + wait
    while slots is not None and slots < needed and time.monotonic() < deadline:
        time.sleep(0.5)
        slots = caps.task_slots()
    return slots


def _is_local_mode(master: str) -> bool:
    """True for local / local[N] / local[N,F] (one JVM, no executors to wait for)."""
    return master == "local" or master.startswith("local[")


def _check_gpu_resources(caps: SessionCapabilities) -> None:
    if _is_local_mode(caps.master()):
        if not torch.cuda.is_available():
            raise ClusterConfigError(
                "use_gpu=True but no GPU is visible to this local Spark (torch.cuda.is_available() "
                "is False). Set use_gpu=None to use a GPU only when there is one, or False for CPU."
            )
        return
    if not caps.conf("spark.task.resource.gpu.amount"):
        raise ClusterConfigError(
            "use_gpu=True but the Spark application has no GPU resources configured. Set "
            "spark.executor.resource.gpu.amount=1, spark.task.resource.gpu.amount=1 and "
            "spark.executor.resource.gpu.discoveryScript=<script>, or use_gpu=None/False."
        )
