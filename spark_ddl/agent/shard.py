"""Agent-side data: one partition's Arrow batches → in-memory tensors, and the epoch order."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from spark_ddl.agent.disk_shard import open_shard, write_shard
from spark_ddl.agent.sampling import ShardRows
from spark_ddl.wire import FEATURES, LABEL, VALIDATION


@dataclass
class Shard(ShardRows):
    """The rows of one agent in memory: features (n, d) float32 and labels (n,) or (n, k)."""

    features: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_arrow(
        cls, batches: Iterable[pa.RecordBatch], label_dtype: torch.dtype, spill_bytes: int | None = None,
    ) -> tuple[ShardRows, "Shard"]:
        """The partition's training rows and validation rows (columns ``FEATURES``,
        ``LABEL`` and, when present, the boolean ``VALIDATION``).

        With ``spill_bytes``, training rows beyond that many bytes go to a memory-mapped file on
        the executor's disk as they stream in (``disk_shard``); 0 spills everything.
        """
        validation_parts: list[tuple[np.ndarray, np.ndarray]] = []
        pieces = _training_pieces(batches, label_dtype, validation_parts)
        buffered: list[tuple[np.ndarray, np.ndarray]] = []
        size, disk = 0, None
        for piece in pieces:
            buffered.append(piece)
            size += piece[0].nbytes + piece[1].nbytes
            if spill_bytes is not None and size > spill_bytes:
                width = piece[0].shape[1]
                path = write_shard(itertools.chain(buffered, pieces), width, _label_arrow_type(label_dtype))
                buffered = []
                disk = open_shard(path, label_dtype)
                break
        train = disk if disk is not None else cls._concatenate(buffered, label_dtype)
        return train, cls._concatenate(validation_parts, label_dtype)

    @classmethod
    def _concatenate(cls, parts: list[tuple[np.ndarray, np.ndarray]], label_dtype: torch.dtype) -> "Shard":
        """One tensor pair from the pieces, emptying ``parts`` as it goes: each piece is freed as
        soon as it is copied, so the peak is about one shard plus one piece, not two shards."""
        if not parts:
            return cls(torch.empty((0, 0), dtype=torch.float32), torch.empty((0,), dtype=label_dtype))
        rows = sum(len(f) for f, _ in parts)
        features = np.empty((rows, *parts[0][0].shape[1:]), dtype=np.float32)
        labels = np.empty((rows, *parts[0][1].shape[1:]), dtype=parts[0][1].dtype)
        position = 0
        parts.reverse()  # pop from the end: O(1) and in the original order
        while parts:
            piece_features, piece_labels = parts.pop()
            features[position : position + len(piece_features)] = piece_features
            labels[position : position + len(piece_labels)] = piece_labels
            position += len(piece_features)
            del piece_features, piece_labels
        pa.default_memory_pool().release_unused()  # Spark's Arrow batches, freed above
        return cls(torch.from_numpy(features), torch.from_numpy(labels).to(label_dtype))

    def batch_source(self, device: torch.device) -> tuple[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                                                         torch.device]:
        """(fetch, index device): ``fetch(index)`` gives the rows' features and labels on ``device``."""
        features, labels = self.features.to(device), self.labels.to(device)
        return (lambda index: (features[index], labels[index])), device

    def with_feature_dim(self, dim: int) -> "Shard":
        """An empty shard reshaped to the width the other agents reported."""
        if self.features.shape[1:] == (dim,):
            return self
        return Shard(torch.empty((0, dim), dtype=torch.float32), self.labels)


ARROW_RELEASE_BYTES = 8 * 2**20  # release Arrow's freed memory after this many bytes of batches


def _training_pieces(batches: Iterable[pa.RecordBatch], label_dtype: torch.dtype,
                     validation_parts: list[tuple[np.ndarray, np.ndarray]]
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(features (n, d) float32, labels) of each batch's training rows; validation rows are
    appended to ``validation_parts`` on the way."""
    width: int | None = None
    label_numpy = np.int64 if label_dtype == torch.int64 else np.float32
    since_release = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        feats = batch.column(batch.schema.get_field_index(FEATURES))
        width = _check_list_width(feats, FEATURES, width)
        # Own copies, so the Arrow batch (Spark's buffers) can go now, not when the shard is built.
        features = np.array(_flat_values(feats, np.float32).reshape(batch.num_rows, width), copy=True)
        labels = np.array(_label_values(batch.column(batch.schema.get_field_index(LABEL))), dtype=label_numpy)
        index = batch.schema.get_field_index(VALIDATION)
        held_out = (batch.column(index).fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
                    if index >= 0 else None)
        since_release += features.nbytes
        del feats, batch
        if since_release > ARROW_RELEASE_BYTES:  # give the freed Arrow memory back to the OS
            pa.default_memory_pool().release_unused()
            since_release = 0
        if held_out is None:
            yield features, labels
            continue
        if held_out.any():
            validation_parts.append((features[held_out], labels[held_out]))
        if not held_out.all():
            yield features[~held_out], labels[~held_out]


def _label_arrow_type(label_dtype: torch.dtype) -> pa.DataType:
    return pa.int64() if label_dtype == torch.int64 else pa.float32()


def _check_list_width(column: pa.Array, name: str, width: int | None) -> int:
    if column.null_count:
        raise ValueError(f"{column.null_count} null value(s) in feature column {name}")
    lengths = pc.list_value_length(column)
    lo, hi = pc.min(lengths).as_py(), pc.max(lengths).as_py()
    expected = lo if width is None else width
    if lo != hi or lo != expected:
        raise ValueError(
            f"feature arrays have unequal lengths (between {min(lo, expected)} and "
            f"{max(hi, expected)}); every row needs the same number of features"
        )
    return int(lo)


def _flat_values(column: pa.Array, dtype: type) -> np.ndarray:
    return column.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def _label_values(column: pa.Array) -> np.ndarray:
    if column.null_count:
        raise ValueError(f"{column.null_count} null label(s)")
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        width = _check_list_width(column, LABEL, None)
        return _flat_values(column, np.float32).reshape(len(column), width)
    return column.to_numpy(zero_copy_only=False)
