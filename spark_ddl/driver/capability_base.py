"""The capabilities every session kind offers the driver (see ``spark_ddl.driver.capabilities``,
which picks the implementation for a session), and what the kinds share."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from typing import Any, BinaryIO, Iterator, Protocol

from spark_ddl.common.wire import InlineValue
from spark_ddl.formats import storage

# A Spark conf any session can set at run time (spark.conf.set): the address the agents' status
# channel should use to reach this process, or "none" for no channel (see docs/connect.md).
# Unset: the driver's host (classic) or this client's address (Connect).
STATUS_HOST_CONF = "spark.ddl.statusHost"


class DirectoryFiles(Protocol):
    """Where model directories are written and read (see ``spark_ddl.formats.storage``)."""

    def write_directory(self, path: str, files: dict[str, storage.Content], overwrite: bool) -> None: ...
    def read_file(self, path: str, name: str) -> bytes | None: ...
    def open_file(self, path: str, name: str) -> BinaryIO | None: ...
    def list_directory(self, path: str, name: str = "") -> list[str]: ...


class SessionCapabilities:
    """The driver's view of one SparkSession. Subclasses: ``ClassicCapabilities`` and
    ``spark_ddl.driver.connect.ConnectCapabilities``."""

    kind = "?"
    driver_sees_agent_files = False  # the agents' local paths mean the same here (checkpoint_dir probe)

    def __init__(self, spark: Any) -> None:
        self.spark = spark

    def conf(self, key: str, default: str | None = None) -> str | None:
        """The value of a Spark conf, ``default`` when it is not set."""
        raise NotImplementedError

    def master(self) -> str:
        """The application's master URL (``local[2]``, ``spark://…``, ``yarn``)."""
        return self.conf("spark.master", "unknown") or "unknown"

    def task_slots(self) -> int | None:
        """Barrier tasks the cluster can run at once now; None when it cannot tell."""
        raise NotImplementedError

    def listening_addresses(self) -> dict[str, str]:
        """host -> a host:port known to listen there (an executor's block manager); {} if unknown."""
        return {}

    def remove_executors_on(self, hosts: set[str]) -> list[str]:
        """Remove this application's executors on ``hosts`` (unreachable machines) so that no
        task is offered their slots, keeping the executor target (a machine that comes back
        gets a new one). Returns the removed executors' ids; [] when the session cannot."""
        return []

    def partition_count(self, df: Any) -> int | None:
        """``df``'s number of partitions if known without running a job, else None."""
        raise NotImplementedError

    def cached_rows_id(self, df: Any) -> Any | None:
        """An identity of the cache entry that holds exactly ``df``'s rows (a new one after
        ``unpersist`` and ``cache``); None when ``df`` itself is not cached or the session cannot tell."""
        return None

    @contextlib.contextmanager
    def tagged(self, tag: str) -> Iterator[None]:
        """Jobs started by this thread inside the block carry ``tag`` (for ``cancel``)."""
        raise NotImplementedError
        yield  # pragma: no cover

    def cancel(self, tag: str) -> None:
        """Cancel every running job that carries ``tag``."""
        raise NotImplementedError

    def ship(self, obj: Any) -> Any:
        """``obj`` sent once to the executors for many jobs; they read ``.value``."""
        raise NotImplementedError

    def result_rows_limit(self) -> int | None:
        """The most bytes a payload may bring back as collected rows (None: not known here)."""
        return None

    def ship_weights(self, writer: Any) -> Any:
        """A ``WeightsWriter``'s safetensors for a payload the executors read: the bytes (here:
        any session), or a ``ShippedWeights`` file reference where the session can ship files."""
        return writer.to_bytes()

    def inline(self, obj: Any) -> Any:
        """``obj`` for one job's closure; they read ``.value``."""
        return InlineValue(obj)

    def identity(self) -> Any:
        """Changes when the session behind these capabilities changes (for caches of shipped values)."""
        raise NotImplementedError

    def files(self) -> DirectoryFiles:
        """Model-directory file operations for paths as this session's Spark sees them."""
        raise NotImplementedError

    def checkpoint_files(self) -> DirectoryFiles:
        """How the driver looks into a checkpoint_dir the agents write with pyarrow.fs."""
        return StoreFiles()

    def status_host(self) -> str | None:
        """The address the agents use to reach this process; None: no status channel."""
        configured = (self.conf(STATUS_HOST_CONF) or "").strip()
        if configured.lower() == "none":
            return None
        return configured or self._default_status_host()

    def _default_status_host(self) -> str:
        raise NotImplementedError


class StoreFiles:
    """Model-directory files through ``spark_ddl.formats.storage`` in this process (pyarrow.fs; with
    ``hadoop`` set, Hadoop's FileSystem of that classic SparkContext for URIs)."""

    def __init__(self, hadoop: Any = None) -> None:
        self._hadoop = hadoop

    def store(self, path: str) -> tuple[storage.Store, str]:
        """The store that handles ``path`` here, and the path in its terms."""
        if self._hadoop is not None and "://" in path:
            return storage.HadoopStore(self._hadoop, path), path.rstrip("/")
        return storage.arrow_store_for(path)

    def write_directory(self, path: str, files: dict[str, storage.Content], overwrite: bool) -> None:
        storage.write_directory(path, files, overwrite, self.store(path))

    def read_file(self, path: str, name: str) -> bytes | None:
        return storage.read_file(path, name, self.store(path))

    def open_file(self, path: str, name: str) -> BinaryIO | None:
        return storage.open_file(path, name, self.store(path))

    def list_directory(self, path: str, name: str = "") -> list[str]:
        return storage.list_directory(path, name, self.store(path))


def is_loopback(host: str) -> bool:
    """True for localhost and 127.x / ::1 addresses (and names resolving to them)."""
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False
