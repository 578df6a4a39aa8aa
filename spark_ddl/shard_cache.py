"""Disk-backed shard: the partition's rows in an Arrow IPC file on the executor's local disk,
memory-mapped, so an agent can train on a shard larger than its memory budget.

The file holds record batches with a ``fixed_size_list<float32>`` features column and a
label column, written as the partition streams in (never the whole shard in memory). Reads
go through one ``mmap`` of the file, wrapped zero-copy by pyarrow; a mini-batch gathers its
rows from the mapped pages into a small tensor. Mapped pages count towards the process's RSS
while resident, so after every ``release_every`` gathered bytes the mapping is told to drop
them (``madvise(MADV_DONTNEED)``: the data stays in the OS page cache, which is not the
agent's memory). The rows, their order and hence training are identical to the in-memory
shard.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import uuid
from typing import Iterable

import numpy as np
import pyarrow as pa
import torch

RELEASE_EVERY_BYTES = 64 * 2**20  # drop mapped pages after gathering this much


class DiskArray:
    """Rows of a 2-D float32 (or label) array stored across the record batches of an IPC file."""

    def __init__(self, chunks: list[np.ndarray], dtype: torch.dtype) -> None:
        self._chunks = chunks  # zero-copy views into the mapping, one per record batch
        self._starts = np.cumsum([0] + [len(c) for c in chunks])
        self.dtype = dtype
        self.shape = (int(self._starts[-1]), *chunks[0].shape[1:]) if chunks else (0,)

    def __len__(self) -> int:
        return self.shape[0]

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The rows at ``index`` (any order, repeats allowed) as a new tensor, and bytes read."""
        rows = index.cpu().numpy()
        out = np.empty((len(rows), *self.shape[1:]), dtype=self._chunks[0].dtype)
        chunk_of = np.searchsorted(self._starts, rows, side="right") - 1
        for chunk in np.unique(chunk_of):
            picked = chunk_of == chunk
            out[picked] = self._chunks[chunk][rows[picked] - self._starts[chunk]]
        return torch.from_numpy(out).to(self.dtype), out.nbytes


class DiskShard:
    """An agent's training rows in a memory-mapped Arrow IPC file (see the module docstring)."""

    def __init__(self, path: str, features: DiskArray, labels: DiskArray, handle, mapping: mmap.mmap) -> None:
        self.path = path
        self.features, self.labels = features, labels
        self._handle, self._mapping = handle, mapping
        self._since_release = 0

    @property
    def num_rows(self) -> int:
        return len(self.features)

    @property
    def feature_dim(self) -> int | None:
        return int(self.features.shape[1]) if self.num_rows else None

    def epoch_order(self, epoch: int, shuffle: bool, seed: int, rank: int) -> torch.Tensor:
        """The same row order as the in-memory shard would use."""
        from spark_ddl.shard import epoch_order

        return epoch_order(self.num_rows, epoch, shuffle, seed, rank)

    def with_feature_dim(self, dim: int) -> "DiskShard":
        return self

    def batch_source(self, device: torch.device):
        """(fetch, index device): rows are gathered on the CPU, then moved to ``device``."""
        def fetch(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features, labels = self.batch(index)
            return features.to(device), labels.to(device)

        return fetch, torch.device("cpu")

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and labels of the rows at ``index`` (new tensors, not views of the file)."""
        features, read = self.features.gather(index)
        labels, read_labels = self.labels.gather(index)
        self._since_release += read + read_labels
        if self._since_release >= RELEASE_EVERY_BYTES:
            self.release_pages()
        return features, labels

    def release_pages(self) -> None:
        """Drop the mapping's resident pages from this process (they stay in the page cache)."""
        if hasattr(self._mapping, "madvise"):
            self._mapping.madvise(mmap.MADV_DONTNEED)
        self._since_release = 0

    def close(self) -> None:
        """Unmap and delete the file."""
        self.features = self.labels = None  # the views into the mapping go first
        try:
            self._mapping.close()
        except BufferError:  # a view is still alive somewhere; the OS unmaps at exit
            pass
        self._handle.close()
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
    """Map the IPC file written by ``write_shard``."""
    handle = open(path, "rb")
    size = os.fstat(handle.fileno()).st_size
    mapping = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_READ)
    reader = pa.ipc.open_file(pa.py_buffer(mapping))
    features, labels = [], []
    for number in range(reader.num_record_batches):
        batch = reader.get_batch(number)
        column = batch.column(0)
        width = column.type.list_size
        features.append(column.values.to_numpy(zero_copy_only=True).reshape(len(column), width))
        label = batch.column(1)
        if pa.types.is_fixed_size_list(label.type):
            labels.append(label.values.to_numpy(zero_copy_only=True).reshape(len(label), label.type.list_size))
        else:
            labels.append(label.to_numpy(zero_copy_only=True))
    return DiskShard(path, DiskArray(features, torch.float32), DiskArray(labels, label_dtype), handle, mapping)
