"""Before launch: can this Spark application run the barrier job at all? Fails in seconds,
naming the setting to change (Spark itself would notice only after minutes)."""

from __future__ import annotations

import time

import torch
from pyspark.sql import SparkSession

from spark_ddl.config import TrainConfig
from spark_ddl.errors import ClusterConfigError

EXECUTOR_WAIT_SECONDS = 60.0  # how long to wait for executors to register before failing


def check_cluster(spark: SparkSession, config: TrainConfig) -> None:
    """Fail in seconds, naming the setting to change, if the barrier job cannot run."""
    conf = spark.sparkContext.getConf()
    if conf.get("spark.dynamicAllocation.enabled", "false").strip().lower() == "true":
        raise ClusterConfigError(
            "Barrier execution does not support dynamic allocation: set "
            "spark.dynamicAllocation.enabled=false for this application."
        )
    if config.use_gpu:
        _check_gpu_resources(spark)
    slots = _wait_for_slots(spark, config.num_workers, EXECUTOR_WAIT_SECONDS)
    if slots < config.num_workers:
        master = spark.sparkContext.master
        task_cpus = conf.get("spark.task.cpus", "1")
        raise ClusterConfigError(
            f"num_workers={config.num_workers} needs {config.num_workers} barrier task slots at "
            f"once, but the cluster offers {slots} (master={master}, spark.task.cpus={task_cpus}). "
            f"Lower num_workers to {max(slots, 1)} or fewer, or give Spark more cores: e.g. "
            f"master local[{config.num_workers * int(task_cpus)}], or more executors/"
            "spark.executor.cores."
        )


def max_concurrent_tasks(spark: SparkSession) -> int:
    jsc = spark.sparkContext._jsc.sc()  # noqa: SLF001 - same call xgboost.spark uses
    profile = jsc.resourceProfileManager().defaultResourceProfile()
    return int(jsc.maxNumConcurrentTasks(profile))


def _wait_for_slots(spark: SparkSession, needed: int, wait: float) -> int:
    """Slots available now; in cluster modes, wait a little for executors still starting."""
    slots = max_concurrent_tasks(spark)
    if slots >= needed or _is_local_mode(spark.sparkContext.master):
        return slots
    deadline = time.monotonic() + wait
    while slots < needed and time.monotonic() < deadline:
        time.sleep(0.5)
        slots = max_concurrent_tasks(spark)
    return slots


def _is_local_mode(master: str) -> bool:
    """True for local / local[N] / local[N,F] (one JVM, no executors to wait for)."""
    return master == "local" or master.startswith("local[")


def _check_gpu_resources(spark: SparkSession) -> None:
    conf = spark.sparkContext.getConf()
    if _is_local_mode(spark.sparkContext.master):
        if not torch.cuda.is_available():
            raise ClusterConfigError(
                "use_gpu=True but no GPU is visible to this local Spark (torch.cuda.is_available() "
                "is False). Set use_gpu=None to use a GPU only when there is one, or False for CPU."
            )
        return
    if not conf.get("spark.task.resource.gpu.amount"):
        raise ClusterConfigError(
            "use_gpu=True but the Spark application has no GPU resources configured. Set "
            "spark.executor.resource.gpu.amount=1, spark.task.resource.gpu.amount=1 and "
            "spark.executor.resource.gpu.discoveryScript=<script>, or use_gpu=None/False."
        )
