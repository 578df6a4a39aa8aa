"""The version store of a continuously trained model: ``model_dir/v000000001``, ``v000000002``,
... each a complete saved ``TorchModel`` plus ``version.json`` (its micro-batch) and
``history.json`` (every version's record so far).

Publishing writes a version beside its final name and renames it into place (see
``storage.write_directory``), so a directory with a version's name is complete and "latest" —
the highest such number — moves only once the version is whole. Leftover staging directories
of a crashed publish (``v....tmp-*``) are never read. Readers that lose a race with pruning
(the version they listed was deleted) list again.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from spark_ddl.formats import storage

VERSION_RE = re.compile(r"^v(\d{9})$")
LEFTOVER_RE = re.compile(r"^v\d{9}\.(tmp|old)-[0-9a-f]+$")  # a crashed publish's staging (or retired) directory
RECORD_FILE = "version.json"
HISTORY_FILE = "history.json"
HISTORY_LIMIT = 10_000  # records carried from version to version


def _driver_store(path: str) -> tuple[storage.Store, str]:
    """On the driver: URIs through Hadoop's FileSystem while a classic SparkContext runs in this
    process (every scheme Spark is configured for), else pyarrow.fs."""
    from pyspark import SparkContext

    from spark_ddl.driver.capability_base import StoreFiles

    return StoreFiles(hadoop=SparkContext._active_spark_context).store(path)  # noqa: SLF001


def version_name(number: int) -> str:
    return f"v{number:09d}"


class VersionStore:
    """The versions under ``model_dir`` (local path or URI). ``executor=True`` reads through
    pyarrow's filesystems (no JVM needed), as scoring executors do."""

    def __init__(self, model_dir: str, executor: bool = False) -> None:
        self.model_dir = model_dir.rstrip("/")
        self._store, self._root = (storage.arrow_store_for if executor else _driver_store)(self.model_dir)

    # -------------------------------------------------------------- reading

    def numbers(self) -> list[int]:
        """The complete versions, oldest first ([] when there is none or no directory)."""
        if not self._store.exists(self._root):
            return []
        return sorted(int(m.group(1)) for m in map(VERSION_RE.match, self._store.list(self._root)) if m)

    def latest_number(self) -> int | None:
        """The newest complete version, or None."""
        numbers = self.numbers()
        return numbers[-1] if numbers else None

    def path(self, number: int) -> str:
        """The directory of version ``number`` (a saved TorchModel)."""
        return f"{self.model_dir}/{version_name(number)}"

    def read(self, number: int, name: str) -> bytes | None:
        """A file of version ``number`` (None when absent, e.g. pruned meanwhile)."""
        path = f"{self._root}/{version_name(number)}/{name}"
        try:
            return self._store.read(path) if self._store.exists(path) else None
        except Exception:  # noqa: BLE001 - deleted between the check and the read (pyarrow or Hadoop error)
            return None

    def record(self, number: int) -> dict[str, Any] | None:
        """Version ``number``'s own record (its micro-batch, rows, loss, ...)."""
        data = self.read(number, RECORD_FILE)
        return json.loads(data) if data is not None else None

    def history(self) -> list[dict[str, Any]]:
        """Every published version's record, oldest first (as the newest version carries it)."""
        for _ in range(3):  # the newest may be pruned while we read it: list again
            newest = self.latest_number()
            if newest is None:
                return []
            data = self.read(newest, HISTORY_FILE)
            if data is not None:
                return json.loads(data)
        raise RuntimeError(f"{self.model_dir}: could not read the newest version's history (pruned while reading?)")

    def published(self, query_id: str, batch_id: int) -> dict[str, Any] | None:
        """The record of the version that already holds micro-batch ``batch_id`` of the
        streaming query ``query_id``, or of a later one of it (a replayed micro-batch), else None."""
        for record in reversed(self.history()):
            if record.get("query_id") == query_id:
                return record if int(record["batch_id"]) >= batch_id else None
        return None

    # -------------------------------------------------------------- writing (the driver)

    def publish(self, files: dict[str, bytes], record: dict[str, Any], keep: int) -> dict[str, Any]:
        """Write the next version (``files`` of a saved model, plus its record and the carried
        history) all or nothing, then prune to the newest ``keep``. Returns the record."""
        history = self.history()
        number = (self.latest_number() or 0) + 1
        record = dict(record, version=number, created=time.time())
        history = (history + [record])[-HISTORY_LIMIT:]
        files = dict(files, **{HISTORY_FILE: json.dumps(history).encode(), RECORD_FILE: json.dumps(record).encode()})
        storage.write_directory(self.path(number), files, overwrite=False,
                                store=(self._store, f"{self._root}/{version_name(number)}"))
        self.prune(keep)
        return record

    def clean_leftovers(self) -> list[str]:
        """Delete the staging directories of publishes that crashed (none is ever read); the
        driver calls this before it starts publishing. Returns their names."""
        if not self._store.exists(self._root):
            return []
        leftovers = [name for name in self._store.list(self._root) if LEFTOVER_RE.match(name)]
        for name in leftovers:
            self._store.delete(f"{self._root}/{name}")
        return leftovers

    def prune(self, keep: int) -> None:
        """Delete all but the newest ``keep`` versions (oldest first)."""
        for number in self.numbers()[:-keep]:
            self._store.delete(f"{self._root}/{version_name(number)}")
