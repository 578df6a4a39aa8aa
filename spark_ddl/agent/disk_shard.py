"""Disk-backed shard: the partition's rows in an Arrow IPC file on the executor's local disk,
so an agent can train on a shard larger than its memory budget.

The file holds record batches with a ``fixed_size_list<float32>`` features column and a
label column, written as the partition streams in (never the whole shard in memory). The
file is memory-mapped once to read its layout (where each batch's values start); a
mini-batch then reads its rows with ``pread`` into a small tensor. Rows are not gathered
through the mapping because a page fault on a file mapping maps the whole page-cache folio
(hundreds of KB on ext4 with large folios), so random rows would pull most of the file into
the process's RSS; ``pread`` copies only the row, and the file's pages stay in the OS page
cache, which is not the agent's memory. The rows, their order and hence training are
identical to the in-memory shard.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from typing import Iterable

import numpy as np
import pyarrow as pa
import torch

from spark_ddl.agent.sampling import ShardRows


class DiskArray:
    """Rows of a 2-D (or 1-D label) array stored in the record batches of an IPC file."""

    def __init__(self, fd: int, offsets: list[int], lengths: list[int], row_shape: tuple[int, ...],
                 numpy_dtype: np.dtype, dtype: torch.dtype) -> None:
        self._fd = fd
        self._offsets = np.asarray(offsets, dtype=np.int64)  # file offset of each batch's first row
        self._starts = np.cumsum([0] + list(lengths))
        self._row_shape, self._numpy_dtype, self.dtype = row_shape, np.dtype(numpy_dtype), dtype
        self._row_bytes = int(np.prod(row_shape, dtype=np.int64)) * self._numpy_dtype.itemsize
        self.shape = (int(self._starts[-1]), *row_shape)

    def __len__(self) -> int:
        return self.shape[0]

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """The rows at ``index`` (any order, repeats allowed) as a new tensor."""
        rows = index.cpu().numpy().astype(np.int64, copy=False)
        out = np.empty((len(rows), *self._row_shape), dtype=self._numpy_dtype)
        if len(rows):
            batch = np.searchsorted(self._starts, rows, side="right") - 1
            positions = self._offsets[batch] + (rows - self._starts[batch]) * self._row_bytes
            # rows that follow each other in the file and in the batch are read with one call
            breaks = np.flatnonzero(np.diff(positions) != self._row_bytes) + 1
            view = memoryview(out.reshape(-1).view(np.uint8))
            size = self._row_bytes
            for first, last in zip([0, *breaks.tolist()], [*breaks.tolist(), len(rows)]):
                wanted = (last - first) * size
                if os.preadv(self._fd, [view[first * size : last * size]], int(positions[first])) != wanted:
                    raise OSError(f"short read from the shard cache file (wanted {wanted} bytes)")
        return torch.from_numpy(out).to(self.dtype)


class DiskShard(ShardRows):
    """An agent's training rows in an Arrow IPC file on local disk (see the module docstring)."""

    def __init__(self, path: str, fd: int, features: DiskArray, labels: DiskArray) -> None:
        self.path, self._fd = path, fd
        self.features, self.labels = features, labels

    def with_feature_dim(self, dim: int) -> "DiskShard":
        return self

    def batch_source(self, device: torch.device):
        """(fetch, index device): rows are read on the CPU, then moved to ``device``."""
        def fetch(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features, labels = self.batch(index)
            return features.to(device), labels.to(device)

        return fetch, torch.device("cpu")

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and labels of the rows at ``index`` (new tensors)."""
        return self.features.gather(index), self.labels.gather(index)

    def close(self) -> None:
        """Close and delete the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def cache_directory() -> str:
    """The executor's local scratch directory (SPARK_LOCAL_DIRS' first entry), else the temp dir."""
    local = os.environ.get("SPARK_LOCAL_DIRS", "").split(",")[0]
    return local if local and os.path.isdir(local) else tempfile.gettempdir()


def write_shard(batches: Iterable[tuple[np.ndarray, np.ndarray]], feature_dim: int, label_type: pa.DataType,
                directory: str | None = None) -> str:
    """Stream (features (n, d) float32, labels) pieces into a new Arrow IPC file; return its path."""
    path = os.path.join(directory or cache_directory(), f"spark_ddl-shard-{uuid.uuid4().hex}.arrow")
    schema = pa.schema([("features", pa.list_(pa.float32(), feature_dim)), ("label", label_type)])
    try:
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for features, labels in batches:
                values = pa.array(features.reshape(-1), type=pa.float32())
                column = pa.FixedSizeListArray.from_arrays(values, feature_dim)
                label_array = (pa.FixedSizeListArray.from_arrays(pa.array(labels.reshape(-1), pa.float32()),
                                                                 labels.shape[1])
                               if labels.ndim == 2 else pa.array(labels, type=label_type))
                writer.write_batch(pa.record_batch([column, label_array], schema=schema))
    except BaseException:
        if os.path.exists(path):
            os.unlink(path)
        raise
    return path


def open_shard(path: str, label_dtype: torch.dtype) -> DiskShard:
    """Open the IPC file written by ``write_shard``: map it once to find where each batch's
    values lie, then keep only a file descriptor for the reads."""
    mapped = pa.memory_map(path, "r")
    try:
        base = mapped.read_buffer(1).address if mapped.size() else 0  # zero-copy: the mapping itself
        mapped.seek(0)
        reader = pa.ipc.open_file(mapped)
        layout: dict[str, list] = {"features": [], "labels": [], "lengths": []}
        feature_width, label_shape, label_numpy = 0, (), np.int64
        for number in range(reader.num_record_batches):
            batch = reader.get_batch(number)
            features, labels = batch.column(0), batch.column(1)
            feature_width = features.type.list_size
            layout["features"].append(_first_value_offset(features.values, base))
            if pa.types.is_fixed_size_list(labels.type):
                label_shape, label_numpy = (labels.type.list_size,), np.float32
                layout["labels"].append(_first_value_offset(labels.values, base))
            else:
                label_numpy = labels.type.to_pandas_dtype()
                layout["labels"].append(_first_value_offset(labels, base))
            layout["lengths"].append(len(batch))
    finally:
        mapped.close()
    fd = os.open(path, os.O_RDONLY)
    features = DiskArray(fd, layout["features"], layout["lengths"], (feature_width,), np.float32, torch.float32)
    labels = DiskArray(fd, layout["labels"], layout["lengths"], label_shape, label_numpy, label_dtype)
    return DiskShard(path, fd, features, labels)


def _first_value_offset(array: pa.Array, base: int) -> int:
    """File offset of the array's first value (its data buffer lies inside the mapping)."""
    if array.null_count:
        raise ValueError("the shard cache holds no nulls")
    data = array.buffers()[1]
    return data.address - base + array.offset * array.type.bit_width // 8
