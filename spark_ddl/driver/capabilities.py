"""What the driver may do with a SparkSession, decided once by the session's kind.

A classic session (a SparkContext and its JVM in this process) and a Spark Connect session (a
gRPC client: no SparkContext, no RDDs, no py4j) offer the rest of the driver the same
capabilities: conf lookup, the master, barrier task slots, partition counts, job tags and
cancellation, shipping a value to the executors, the address the agents reach this process at,
and model-directory files. Classic keeps what is better there (broadcast variables, the
SparkContext's job tags, Hadoop's FileSystem for URIs); Connect uses only ``spark.conf``,
DataFrames and session artifacts (``spark_ddl/driver/connect.py``).

    caps = capabilities(df.sparkSession)     # chosen once per session object
    caps.conf("spark.task.cpus", "1"); caps.task_slots(); caps.ship(payload).value  # on executors
"""

from __future__ import annotations

import contextlib
import logging
import socket
from typing import Any, Iterator

from spark_ddl.common.wire import ROWS_HEAP_FACTOR, BroadcastValue
from spark_ddl.driver.capability_base import STATUS_HOST_CONF, DirectoryFiles, SessionCapabilities, StoreFiles

log = logging.getLogger("spark_ddl")

__all__ = ["STATUS_HOST_CONF", "DirectoryFiles", "SessionCapabilities", "ClassicCapabilities", "capabilities",
           "directory_files", "is_connect_session", "active_session"]


class ClassicCapabilities(SessionCapabilities):
    """A classic session: the SparkContext's conf, slots, job tags, broadcasts and Hadoop FS."""

    kind = "classic"
    driver_sees_agent_files = True

    def __init__(self, spark: Any) -> None:
        super().__init__(spark)
        self.sc = spark.sparkContext

    def conf(self, key: str, default: str | None = None) -> str | None:
        # the context's own conf: getConf() copies every entry through py4j first (~25 ms a call)
        return self.sc._conf.get(key, default)  # noqa: SLF001

    def master(self) -> str:
        return self.sc.master

    def task_slots(self) -> int | None:
        jsc = self.sc._jsc.sc()  # noqa: SLF001 - the call xgboost.spark uses
        return int(jsc.maxNumConcurrentTasks(jsc.resourceProfileManager().defaultResourceProfile()))

    def listening_addresses(self) -> dict[str, str]:
        try:
            infos = self.sc._jsc.sc().statusTracker().getExecutorInfos()  # noqa: SLF001
            return {str(info.host()): f"{info.host()}:{info.port()}" for info in infos}  # block managers
        except Exception:  # noqa: BLE001 - the placement's own addresses are probed instead
            return {}

    def remove_executors_on(self, hosts: set[str]) -> list[str]:
        sc = self.sc._jsc.sc()  # noqa: SLF001
        try:
            executors = sc.statusStore().executorList(True)  # the active ones
            ids = [executors.apply(i).id() for i in range(executors.size())
                   if executors.apply(i).id() != "driver" and executors.apply(i).hostPort().rsplit(":", 1)[0] in hosts]
            if not ids:
                return []
            jvm = self.sc._jvm  # noqa: SLF001
            listed = jvm.java.util.ArrayList()
            for executor_id in ids:
                listed.add(executor_id)
            # adjustTargetNumExecutors=False, countFailures=False, force=True (as SparkContext.killExecutors,
            # but keeping the target)
            removed = sc.schedulerBackend().killExecutors(jvm.org.apache.spark.api.python.PythonUtils.toSeq(listed),
                                                          False, False, True)
            return [removed.apply(i) for i in range(removed.size())]
        except Exception as exc:  # noqa: BLE001 - local mode (no executors to remove) or other internals
            log.debug("cannot remove executors on %s: %s", sorted(hosts), exc)
            return []

    def partition_count(self, df: Any) -> int | None:
        # the plan's RDD, without pyspark's Python RDD around it (df.rdd costs ~3x as much)
        return int(df._jdf.queryExecution().toRdd().getNumPartitions())  # noqa: SLF001

    def cached_rows_id(self, df: Any) -> Any | None:
        try:
            entry = self.spark._jsparkSession.sharedState().cacheManager().lookupCachedData(df._jdf)  # noqa: SLF001
            if not entry.isDefined():
                return None
            # the cached RDD's id: never reused within an application
            rdd_id = entry.get().cachedRepresentation().cacheBuilder().cachedColumnBuffers().id()
        except Exception:  # noqa: BLE001 - a Spark without these internals: no reuse, the scan runs
            return None
        return self.sc.applicationId, int(rdd_id)

    @contextlib.contextmanager
    def tagged(self, tag: str) -> Iterator[None]:
        self.sc.addJobTag(tag)  # per thread
        try:
            yield
        finally:
            self.sc.removeJobTag(tag)

    def cancel(self, tag: str) -> None:
        self.sc.cancelJobsWithTag(tag)

    def ship(self, obj: Any) -> Any:
        return BroadcastValue(self.sc.broadcast(obj))

    def result_rows_limit(self) -> int | None:
        """The driver JVM's heap over ``ROWS_HEAP_FACTOR`` (what collecting rows costs there), and
        at most spark.driver.maxResultSize."""
        try:
            heap = int(self.sc._jvm.java.lang.Runtime.getRuntime().maxMemory())  # noqa: SLF001
            max_result = int(self.sc._jsc.sc().conf().getSizeAsBytes("spark.driver.maxResultSize", "1g"))  # noqa: SLF001
        except Exception:  # noqa: BLE001 - no JVM answer: no limit known
            return None
        limit = heap // ROWS_HEAP_FACTOR
        return min(limit, max_result) if max_result > 0 else limit

    def ship_weights(self, writer: Any) -> Any:
        from spark_ddl.driver.shipping import INLINE_BYTES, ship_weights

        # big weights go as a file Spark's file server streams to each executor once (a broadcast
        # would build the whole serialised value in the driver's heap first)
        return ship_weights(self.sc, writer) if writer.size > INLINE_BYTES else writer.to_bytes()

    def identity(self) -> Any:
        return self.sc

    def files(self) -> DirectoryFiles:
        return StoreFiles(hadoop=self.sc)

    def _default_status_host(self) -> str:
        return self.conf("spark.driver.host") or socket.gethostbyname(socket.gethostname())


def is_connect_session(spark: Any) -> bool:
    """True for a Spark Connect session (``SparkSession.builder.remote(...)``); needs no grpc."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


_CACHE: dict[int, SessionCapabilities] = {}


def capabilities(spark: Any) -> SessionCapabilities:
    """The capabilities of ``spark``, chosen once per session object by its kind."""
    cached = _CACHE.get(id(spark))
    if cached is not None and cached.spark is spark:
        return cached
    if is_connect_session(spark):
        from spark_ddl.driver.connect import ConnectCapabilities

        cached = ConnectCapabilities(spark)
    else:
        cached = ClassicCapabilities(spark)
    _CACHE[id(spark)] = cached
    return cached


def active_session() -> Any:
    """This thread's active SparkSession (classic or Connect), or None; never starts one."""
    from pyspark.sql import SparkSession

    return SparkSession.getActiveSession()


def directory_files(spark: Any = None) -> DirectoryFiles:
    """Model-directory files for ``spark`` (default: the active session); without a session,
    pyarrow.fs in this process."""
    spark = spark if spark is not None else active_session()
    return capabilities(spark).files() if spark is not None else StoreFiles()
