"""Model directories on the Spark side of a Spark Connect session.

A Connect client's paths must mean what they mean to the Spark server (pyspark's own ML
writers write a Pipeline's metadata there), so each operation runs as a one-task job: the
files travel as rows of a DataFrame, an executor writes them with ``spark_ddl.formats.storage``
(pyarrow.fs: local paths, ``file://``, ``s3://``, ``gs://``, ``hdfs://``, ``abfs://``) all or
nothing, and reads come back as rows. Checkpoints are written the same way, by the agents.
"""

from __future__ import annotations

import io
import os
from typing import Any, BinaryIO, Callable, Iterator

import pyarrow as pa

from spark_ddl.formats import storage

FILES_DDL = "name string, data binary"
RESULT_DDL = "status string, message string, names array<string>, data binary"


def _result(status: str, message: str = "", names: list[str] | None = None,
            data: bytes | None = None) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {"status": [status], "message": [message], "names": [names], "data": [data]},
        schema=pa.schema([("status", pa.string()), ("message", pa.string()),
                          ("names", pa.list_(pa.string())), ("data", pa.binary())]))


def _write_task(path: str, overwrite: bool) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        files: dict[str, bytes] = {}
        for batch in batches:
            files.update(zip(batch.column("name").to_pylist(), batch.column("data").to_pylist()))
        if not files:  # an empty partition: nothing of this directory arrived here
            return
        try:
            storage.write_directory(path, files, overwrite)
        except FileExistsError as exc:
            yield _result("exists", str(exc))
            return
        yield _result("ok")

    return run


def _read_task(path: str, name: str) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for _ in batches:
            pass
        data = storage.read_file(path, name)
        yield _result("ok" if data is not None else "missing", data=data)

    return run


def _list_task(path: str, name: str) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for _ in batches:
            pass
        yield _result("ok", names=storage.list_directory(path, name))

    return run


class ServerFiles:
    """``DirectoryFiles`` that run on the server side of a Spark Connect session."""

    def __init__(self, spark: Any) -> None:
        self.spark = spark

    @staticmethod
    def _absolute(path: str) -> str:
        """A relative local path means this client's working directory (a local server's too)."""
        return path if "://" in path else os.path.abspath(path)

    def _one_task(self, task: Callable) -> Any:
        rows = self.spark.range(0, 1, 1, 1).mapInArrow(task, RESULT_DDL).collect()
        return rows[0]

    def write_directory(self, path: str, files: dict[str, storage.Content], overwrite: bool) -> None:
        # (files travel as rows: a model's weights are whole bytes in this client's memory here)
        rows = [(name, data if isinstance(data, (bytes, bytearray)) else data.to_bytes()) for name, data in files.items()]
        frame = self.spark.createDataFrame(rows, FILES_DDL)
        rows = frame.coalesce(1).mapInArrow(_write_task(self._absolute(path), overwrite), RESULT_DDL).collect()
        if not rows:
            raise RuntimeError(f"writing {path} on the Spark side returned nothing")
        if rows[0]["status"] == "exists":
            raise FileExistsError(rows[0]["message"])

    def read_file(self, path: str, name: str) -> bytes | None:
        row = self._one_task(_read_task(self._absolute(path), name))
        return bytes(row["data"]) if row["status"] == "ok" else None

    def open_file(self, path: str, name: str) -> BinaryIO | None:
        data = self.read_file(path, name)
        return io.BytesIO(data) if data is not None else None

    def list_directory(self, path: str, name: str = "") -> list[str]:
        return list(self._one_task(_list_task(self._absolute(path), name))["names"] or [])
