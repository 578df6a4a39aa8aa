"""Disk-backed shard: the partition's rows in an Arrow IPC file on the executor's local disk,
so an agent can train on a shard larger than its memory budget.

The file holds record batches with one column per model input (a ``fixed_size_list`` of the
input's values, or a scalar column) and the label column, written as the partition streams in
(never the whole shard in memory); the schema's metadata keeps each column's row shape and
dtype. The
file is memory-mapped once to read its layout (where each batch's values start); a
mini-batch then reads its rows with ``pread`` into a small tensor. Rows are not gathered
through the mapping because a page fault on a file mapping maps the whole page-cache folio
(hundreds of KB on ext4 with large folios), so random rows would pull most of the file into
the process's RSS; ``pread`` copies only the row, and the file's pages stay in the OS page
cache, which is not the agent's memory. The rows, their order and hence training are
identical to the in-memory shard.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import uuid
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import torch

from spark_ddl.agent.sampling import ShardRows
from spark_ddl.common.batch_format import LABEL_KEY, BatchSpec, as_tensor


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

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self._row_bytes

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

    def __init__(self, path: str, fd: int, spec: BatchSpec, columns: dict[str, DiskArray], labels: DiskArray) -> None:
        self.path, self._fd = path, fd
        self.spec, self.columns, self.labels = spec, columns, labels

    def batch_source(self, device: torch.device) -> tuple[Callable[[torch.Tensor], dict[str, torch.Tensor]],
                                                         torch.device]:
        """(fetch, index device): rows are read on the CPU, then moved to ``device``."""
        def fetch(index: torch.Tensor) -> dict[str, torch.Tensor]:
            return {name: tensor.to(device) for name, tensor in self.batch(index).items()}

        return fetch, torch.device("cpu")

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows at ``index`` of every input, and their labels (new tensors)."""
        batch = {f.name: as_tensor(f, self.columns[f.name].gather(index)) for f in self.spec.inputs}
        if len(self.labels.shape) != 2 or self.labels.shape[1]:  # (n, 0): trained without labels
            batch[LABEL_KEY] = self.labels.gather(index)
        return batch

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


def _stored(array: np.ndarray) -> np.ndarray:
    return array.astype(np.uint8) if array.dtype == np.bool_ else array  # Arrow packs booleans in bits


def write_shard(pieces: Iterable[dict[str, np.ndarray]], directory: str | None = None) -> str:
    """Stream pieces (column name → rows [n, *row_shape]) into a new Arrow IPC file; return its path."""
    path = os.path.join(directory or cache_directory(), f"spark_ddl-shard-{uuid.uuid4().hex}.arrow")
    writer = sink = schema = None
    try:
        sink = pa.OSFile(path, "wb")
        for piece in pieces:
            if writer is None:
                layout = {name: {"shape": list(rows.shape[1:]), "dtype": str(rows.dtype)} for name, rows in piece.items()}
                fields = []
                for name, rows in piece.items():
                    value_type = pa.from_numpy_dtype(_stored(rows[:0]).dtype)
                    width = math.prod(rows.shape[1:])
                    fields.append((name, pa.list_(value_type, width) if rows.ndim > 1 else value_type))
                schema = pa.schema(fields, metadata={"layout": json.dumps(layout)})
                writer = pa.ipc.new_file(sink, schema)
            columns = []
            for name, rows in piece.items():
                values = pa.array(_stored(rows).reshape(-1))
                columns.append(pa.FixedSizeListArray.from_arrays(values, math.prod(rows.shape[1:]))
                               if rows.ndim > 1 else values)
            writer.write_batch(pa.record_batch(columns, schema=schema))
        if writer is not None:
            writer.close()
        sink.close()
    except BaseException:
        if sink is not None:
            sink.close()
        if os.path.exists(path):
            os.unlink(path)
        raise
    return path


def open_shard(path: str, spec: BatchSpec, dtypes: dict[str, torch.dtype]) -> DiskShard:
    """Open the IPC file written by ``write_shard``: map it once to find where each batch's
    values lie, then keep only a file descriptor for the reads. ``dtypes``: the tensor dtype of
    each column."""
    mapped = pa.memory_map(path, "r")
    try:
        base = mapped.read_buffer(1).address if mapped.size() else 0  # zero-copy: the mapping itself
        mapped.seek(0)
        reader = pa.ipc.open_file(mapped)
        layout = json.loads(reader.schema.metadata[b"layout"])
        names = reader.schema.names
        offsets: dict[str, list[int]] = {name: [] for name in names}
        lengths = []
        for number in range(reader.num_record_batches):
            batch = reader.get_batch(number)
            for name, column in zip(names, batch.columns):
                values = column.values if pa.types.is_fixed_size_list(column.type) else column
                offsets[name].append(_first_value_offset(values, base))
            lengths.append(len(batch))
    finally:
        mapped.close()
    fd = os.open(path, os.O_RDONLY)
    arrays = {}
    for name in names:
        stored = _stored(np.zeros(0, dtype=layout[name]["dtype"])).dtype
        arrays[name] = DiskArray(fd, offsets[name], lengths, tuple(layout[name]["shape"]), stored, dtypes[name])
    labels = arrays.pop(LABEL_KEY)
    return DiskShard(path, fd, spec, arrays, labels)


def _first_value_offset(array: pa.Array, base: int) -> int:
    """File offset of the array's first value (its data buffer lies inside the mapping)."""
    if array.null_count:
        raise ValueError("the shard cache holds no nulls")
    data = array.buffers()[1]
    return data.address - base + array.offset * array.type.bit_width // 8
