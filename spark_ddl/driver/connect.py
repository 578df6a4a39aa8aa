"""The driver's capabilities on a Spark Connect session: only ``spark.conf``, DataFrames,
session tags and session artifacts (no SparkContext, RDDs, py4j or broadcast variables)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import tempfile
from typing import Any, Iterator

from spark_ddl.common.wire import ArtifactValue, InlineValue
from spark_ddl.driver.capability_base import DirectoryFiles, SessionCapabilities, is_loopback

log = logging.getLogger("spark_ddl")

# A closure travels inside the query plan, one gRPC message of at most 128 MiB (the client's and
# the server's default); a value whose pickle is larger than this goes as a session artifact.
INLINE_LIMIT_BYTES = 32 * 1024 * 1024
_SPLITS_RE = re.compile(r"Range \(0, 10, step=1, splits=(?:Some\()?(\d+)")


class ConnectCapabilities(SessionCapabilities):
    """A Spark Connect session (``SparkSession.builder.remote(...)``)."""

    kind = "connect"

    def __init__(self, spark: Any) -> None:
        super().__init__(spark)
        self._shipped: set[str] = set()  # artifact names this session already holds
        # an agent's error travels in the exception text: have the server send all of it
        # (true by default; a session conf, so a client may have turned it off)
        if (self.conf("spark.sql.connect.enrichError.enabled", "true") or "").lower() == "false":
            log.info("setting spark.sql.connect.enrichError.enabled=true so agents' errors arrive whole")
            spark.conf.set("spark.sql.connect.enrichError.enabled", "true")

    def conf(self, key: str, default: str | None = None) -> str | None:
        return self.spark.conf.get(key, default)

    def task_slots(self) -> int | None:
        """The default parallelism (the plan of ``range(10)`` shows it without running a job:
        local[N]: N; a cluster: the registered executors' cores) over ``spark.task.cpus``.
        Unknown when ``spark.sql.leafNodeDefaultParallelism`` overrides the split count."""
        if self.conf("spark.sql.leafNodeDefaultParallelism") is not None:
            return None
        plan = self.spark.range(10)._explain_string(mode="simple")  # noqa: SLF001 - a plan RPC, no job
        match = _SPLITS_RE.search(plan)
        if match is None:
            return None
        return int(match.group(1)) // max(1, int(self.conf("spark.task.cpus", "1") or 1))

    def partition_count(self, df: Any) -> int | None:
        return None  # only a job can tell (spark_ddl.driver.data.partition_sizes)

    @contextlib.contextmanager
    def tagged(self, tag: str) -> Iterator[None]:
        self.spark.addTag(tag)  # per thread, like a SparkContext's job tags
        try:
            yield
        finally:
            self.spark.removeTag(tag)

    def cancel(self, tag: str) -> None:
        self.spark.interruptTag(tag)

    def ship(self, obj: Any) -> ArtifactValue:
        """Pickled into a file named by its content hash and uploaded once per session with
        ``addArtifacts(file=True)`` (chunked, any size); executors read it through SparkFiles."""
        from pyspark import cloudpickle

        data = cloudpickle.dumps(obj)
        name = f"spark_ddl-{hashlib.sha256(data).hexdigest()[:40]}.pkl"
        if name not in self._shipped:
            with tempfile.TemporaryDirectory(prefix="spark_ddl-") as folder:
                path = os.path.join(folder, name)
                with open(path, "wb") as out:
                    out.write(data)
                try:
                    self.spark.addArtifacts(path, file=True)
                except Exception as exc:  # artifacts are immutable by name: same name, same content
                    if "ARTIFACT_ALREADY_EXISTS" not in str(exc):
                        raise
            self._shipped.add(name)
        return ArtifactValue(name)

    def inline(self, obj: Any) -> Any:
        """In the closure when it fits in a plan comfortably, else as a session artifact."""
        from pyspark import cloudpickle

        if len(cloudpickle.dumps(obj)) > INLINE_LIMIT_BYTES:
            return self.ship(obj)
        return InlineValue(obj)

    def identity(self) -> Any:
        return ("connect", self.spark.session_id)

    def files(self) -> DirectoryFiles:
        from spark_ddl.driver.server_files import ServerFiles

        return ServerFiles(self.spark)

    def checkpoint_files(self) -> DirectoryFiles:
        return self.files()  # the agents' paths, seen from the server side

    def server_host(self) -> str:
        """The host of the Spark Connect server this client talks to."""
        return self.spark._client._builder.host  # noqa: SLF001 - the sc:// URL's host

    def _default_status_host(self) -> str:
        """A server on this machine (``remote("local[N]")``, ``sc://localhost``): loopback.
        Otherwise this client's address on the interface that routes to the server (a UDP
        socket's connect sends nothing)."""
        host = self.server_host()
        if is_loopback(host):
            return "127.0.0.1"
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((socket.gethostbyname(host), 9))
                return probe.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())
