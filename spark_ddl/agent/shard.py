"""Agent-side data: one partition's Arrow batches → named tensors in memory (or on local disk),
and the batches the loops take from them."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import torch

from spark_ddl.agent.disk_shard import open_shard, write_shard
from spark_ddl.agent.sampling import ShardRows
from spark_ddl.common.batch_format import (LABEL_KEY, POSITIONAL_KEY, BatchSpec, InputField, Ragged, as_tensor,
                                           column_values, tensor_dtype)
from spark_ddl.common.wire import FEATURES, LABEL, VALIDATION

ARROW_RELEASE_BYTES = 8 * 2**20  # release Arrow's freed memory after this many bytes of batches
Piece = dict[str, Any]  # column name → np.ndarray rows or Ragged; LABEL_KEY → labels


def default_spec() -> BatchSpec:
    """The one-input shorthand: a float32 matrix in the FEATURES column."""
    return BatchSpec((InputField(POSITIONAL_KEY, FEATURES, "array", "float32"),), positional=True)


def ingest_field(field: InputField, positional: bool) -> InputField:
    """How a column is read before the agents agree on it: named arrays of no fixed shape come
    in as ragged rows (they become fixed if every row of every agent has one length)."""
    if field.kind == "array" and not positional and field.shape is None:
        return replace(field, ragged=True)
    return field


@dataclass
class Shard(ShardRows):
    """The rows of one agent in memory: one tensor (or ``Ragged``) per input, and the labels."""

    spec: BatchSpec
    columns: dict[str, Any]
    labels: torch.Tensor

    @classmethod
    def from_arrow(
        cls, batches: Iterable[pa.RecordBatch], label_dtype: torch.dtype, spill_bytes: int | None = None,
        spec: BatchSpec | None = None,
    ) -> tuple[ShardRows, "Shard"]:
        """The partition's training rows and validation rows (the inputs' wire columns,
        ``LABEL`` and, when present, the boolean ``VALIDATION``).

        With ``spill_bytes``, training rows beyond that many bytes go to a memory-mapped file on
        the executor's disk as they stream in (``disk_shard``); 0 spills everything. Ragged
        inputs stay in memory.
        """
        spec = spec or default_spec()
        validation_parts: list[Piece] = []
        pieces = _training_pieces(batches, spec, label_dtype, validation_parts)
        buffered: list[Piece] = []
        size, disk = 0, None
        for piece in pieces:
            buffered.append(piece)
            size += sum(_nbytes(v) for v in piece.values())
            if spill_bytes is not None and size > spill_bytes and _spillable(piece):
                path = write_shard(itertools.chain(buffered, pieces))
                buffered = []
                dtypes = {f.name: (torch.uint8 if f.kind == "image" else _tensor_dtype(f)) for f in spec.inputs}
                disk = open_shard(path, spec, {**dtypes, LABEL_KEY: label_dtype})
                break
        train = disk if disk is not None else cls._concatenate(buffered, spec, label_dtype)
        return train, cls._concatenate(validation_parts, spec, label_dtype)

    @classmethod
    def _concatenate(cls, parts: list[Piece], spec: BatchSpec, label_dtype: torch.dtype) -> "Shard":
        """One shard from the pieces, emptying ``parts`` as it goes: each piece is freed as soon
        as it is copied, so the peak is about one shard plus one piece, not two shards."""
        names = [f.name for f in spec.inputs] + [LABEL_KEY]
        if not parts:
            empty = {f.name: _empty(ingest_field(f, spec.positional)) for f in spec.inputs}
            return cls(spec, empty, torch.empty((0,), dtype=label_dtype))
        out: dict[str, Any] = {}
        for name in names:
            first = parts[0][name]
            if isinstance(first, Ragged):
                out[name] = Ragged.concatenate([p[name] for p in parts])
                continue
            shapes = {p[name].shape[1:] for p in parts}
            if len(shapes) > 1:
                widths = sorted(int(np.prod(s)) for s in shapes)
                raise ValueError(f"input {name!r} has arrays of unequal lengths (between {widths[0]} and "
                                 f"{widths[-1]}); every row needs the same number of elements")
            rows = sum(len(p[name]) for p in parts)
            out[name] = np.empty((rows, *first.shape[1:]), dtype=first.dtype)
        position = 0
        parts.reverse()  # pop from the end: O(1) and in the original order
        while parts:
            piece = parts.pop()
            count = len(piece[LABEL_KEY])
            for name in names:
                if not isinstance(out[name], Ragged):
                    out[name][position : position + count] = piece[name]
            position += count
            del piece
        pa.default_memory_pool().release_unused()  # Spark's Arrow batches, freed above
        labels = torch.from_numpy(out.pop(LABEL_KEY)).to(label_dtype)
        return cls(spec, {name: _as_torch(value) for name, value in out.items()}, labels)

    def batch_source(self, device: torch.device) -> tuple[Callable[[torch.Tensor], dict[str, torch.Tensor]],
                                                         torch.device]:
        """(fetch, index device): ``fetch(index)`` gives the rows' batch on ``device``. Fixed-shape
        columns move to ``device`` once; ragged ones are padded per batch on the CPU."""
        ragged = any(isinstance(c, Ragged) for c in self.columns.values())
        on_device = {name: (c if isinstance(c, Ragged) else c.to(device)) for name, c in self.columns.items()}
        labels = self.labels.to(device)
        fields = self.spec.inputs

        def fetch(index: torch.Tensor) -> dict[str, torch.Tensor]:
            batch = {}
            for field in fields:
                column = on_device[field.name]
                if isinstance(column, Ragged):
                    padded, mask = column.take(index.cpu(), field.max_length)
                    batch[field.name], batch[field.mask_name] = padded.to(device), mask.to(device)
                else:
                    batch[field.name] = as_tensor(field, column[index])
            if labels.dim() != 2 or labels.shape[1]:  # (n, 0): the model is trained without labels
                batch[LABEL_KEY] = labels[index.to(labels.device)]
            return batch

        return fetch, torch.device("cpu") if ragged else device

    @classmethod
    def of(cls, features: torch.Tensor, labels: torch.Tensor) -> "Shard":
        """A one-input shard (the ``feature_cols`` shorthand) from a feature matrix and labels."""
        return cls(default_spec(), {POSITIONAL_KEY: features}, labels)

    def row_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each fixed-shape input's row shape, where this shard knows it (an empty shard knows
        only its scalars' and declared shapes)."""
        shapes = {}
        for field in self.spec.inputs:
            column = self.columns[field.name]
            if isinstance(column, Ragged):
                continue
            if self.num_rows or field.kind == "scalar":
                shapes[field.name] = tuple(column.shape[1:])
            elif field.shape is not None:
                shapes[field.name] = tuple(field.shape)
        return shapes

    def lengths(self) -> dict[str, tuple[int, int]]:
        """(shortest, longest) row of each ragged input (none for an empty shard)."""
        return {name: (int(c.lengths.min()), int(c.lengths.max())) for name, c in self.columns.items()
                if isinstance(c, Ragged) and len(c)}

    def settle(self, spec: BatchSpec, row_shapes: dict[str, tuple[int, ...]]) -> "Shard":
        """This shard as the agents agreed: ragged inputs of one length everywhere become fixed,
        and an empty shard takes the row shapes its peers reported."""
        columns = {}
        for field in spec.inputs:
            column = self.columns[field.name]
            if isinstance(column, Ragged) and not field.ragged:
                width = int(column.lengths[0]) if len(column) else row_shapes.get(field.name, (0,))[0]
                column = torch.as_tensor(column.values).reshape(len(column), width)
            elif not isinstance(column, Ragged) and not self.num_rows and field.name in row_shapes:
                column = column.new_zeros((0, *row_shapes[field.name]))
            columns[field.name] = column
        return Shard(spec, columns, self.labels)

    def with_feature_dim(self, dim: int) -> "Shard":
        """An empty shard reshaped to the width the other agents reported (one-input shorthand)."""
        return self.settle(self.spec, {POSITIONAL_KEY: (dim,)})


def _spillable(piece: Piece) -> bool:
    """Ragged rows and label-less shards stay in memory (the file holds fixed-size rows)."""
    return not any(isinstance(v, Ragged) for v in piece.values()) and piece[LABEL_KEY].shape[1:] != (0,)


def _tensor_dtype(field: InputField) -> torch.dtype:
    return tensor_dtype(field.dtype)


def _empty(field: InputField) -> Any:
    if field.ragged:
        return Ragged(torch.zeros(0, dtype=_tensor_dtype(field)), torch.zeros(1, dtype=torch.int64))
    shape = (0, 0, 0) if field.kind == "image" else ((0,) if field.kind == "array" else ())
    return torch.zeros((0, *(field.shape or shape)), dtype=torch.uint8 if field.kind == "image" else _tensor_dtype(field))


def _as_torch(value: Any) -> Any:
    if isinstance(value, Ragged):
        return Ragged(torch.from_numpy(np.asarray(value.values)), torch.from_numpy(np.asarray(value.offsets)))
    return torch.from_numpy(value)


def _nbytes(value: Any) -> int:
    return value.values.nbytes + value.offsets.nbytes if isinstance(value, Ragged) else value.nbytes


def _training_pieces(batches: Iterable[pa.RecordBatch], spec: BatchSpec, label_dtype: torch.dtype,
                     validation_parts: list[Piece]) -> Iterator[Piece]:
    """Each batch's training rows as a piece (own numpy copies, so Spark's Arrow buffers can
    go at once); validation rows are appended to ``validation_parts`` on the way."""
    label_numpy = np.int64 if label_dtype == torch.int64 else np.float32
    fields = [ingest_field(f, spec.positional) for f in spec.inputs]
    since_release = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        piece: Piece = {}
        for field in fields:
            values = column_values(field, batch.column(batch.schema.get_field_index(field.column)))
            piece[field.name] = values if isinstance(values, Ragged) else np.array(values, copy=True)
        label_index = batch.schema.get_field_index(LABEL)
        piece[LABEL_KEY] = (np.array(_label_values(batch.column(label_index)), dtype=label_numpy) if label_index >= 0
                            else np.zeros((batch.num_rows, 0), dtype=label_numpy))  # no label column: (n, 0)
        index = batch.schema.get_field_index(VALIDATION)
        held_out = (batch.column(index).fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
                    if index >= 0 else None)
        since_release += sum(_nbytes(v) for v in piece.values())
        del batch
        if since_release > ARROW_RELEASE_BYTES:  # give the freed Arrow memory back to the OS
            pa.default_memory_pool().release_unused()
            since_release = 0
        if held_out is None:
            yield piece
            continue
        if held_out.any():
            validation_parts.append({k: _rows(v, held_out) for k, v in piece.items()})
        if not held_out.all():
            yield {k: _rows(v, ~held_out) for k, v in piece.items()}


def _rows(value: Any, keep: np.ndarray) -> Any:
    return value.select(keep) if isinstance(value, Ragged) else value[keep]


def _label_values(column: pa.Array) -> np.ndarray:
    if column.null_count:
        raise ValueError(f"{column.null_count} null label(s)")
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        lengths = np.diff(column.offsets.to_numpy())
        if len(lengths) and lengths.min() != lengths.max():
            raise ValueError(f"label arrays have unequal lengths (between {lengths.min()} and {lengths.max()})")
        width = int(lengths[0]) if len(lengths) else 0
        return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), width)
    return column.to_numpy(zero_copy_only=False)
