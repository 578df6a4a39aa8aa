"""Which rows each step takes: the epoch order of a shard and the step counts every agent
agrees on (pure functions of the shard sizes, the seed and the epoch)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Callable

import torch

from spark_ddl.common.batch_format import POSITIONAL_KEY, BatchSpec


def epoch_order(rows: int, epoch: int, shuffle: bool, seed: int, rank: int) -> torch.Tensor:
    """Row indices for one epoch of a shard of ``rows`` rows: a fresh seeded permutation, or
    the partition order."""
    if not shuffle:
        return torch.arange(rows)
    generator = torch.Generator().manual_seed(_mix_seed(seed, epoch, rank))
    return torch.randperm(rows, generator=generator)


def _mix_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**63 - 1)


def steps_per_epoch(shard_sizes: list[int], batch_size: int) -> int:
    """Steps every agent runs per epoch: enough for the largest shard to be seen once."""
    return math.ceil(max(shard_sizes, default=0) / batch_size)


def global_batch_sizes(shard_sizes: list[int], batch_size: int, steps: int) -> list[int]:
    """Rows taken by all agents together at each step (shorter shards run out early)."""
    return [
        sum(min(batch_size, max(0, n - step * batch_size)) for n in shard_sizes)
        for step in range(steps)
    ]


def update_groups(batch_totals: list[int], accumulate_steps: int) -> tuple[list[bool], list[int]]:
    """Per micro-step: whether it ends an update (gradients are synchronised and applied),
    and how many rows, over all agents, that update averages over.

    Micro-steps are grouped ``accumulate_steps`` at a time; the epoch's last group may be
    shorter.
    """
    is_sync, update_rows = [], []
    for start in range(0, len(batch_totals), accumulate_steps):
        group = batch_totals[start : start + accumulate_steps]
        is_sync += [False] * (len(group) - 1) + [True]
        update_rows += [sum(group)] * len(group)
    return is_sync, update_rows


class ShardRows(ABC):
    """An agent's rows, in memory (``shard.Shard``) or on local disk (``disk_shard.DiskShard``):
    one column per model input (by the input's name) and the labels, indexable by row."""

    spec: BatchSpec
    columns: dict[str, Any]
    labels: Any

    @property
    def num_rows(self) -> int:
        return int(len(self.labels))

    @property
    def features(self) -> Any:
        """The one-input shorthand's rows."""
        return self.columns[POSITIONAL_KEY]

    @property
    def feature_dim(self) -> int | None:
        """The one-input shorthand's width (None for an empty shard, which cannot know it)."""
        return int(self.features.shape[1]) if self.num_rows else None

    def epoch_order(self, epoch: int, shuffle: bool, seed: int, rank: int) -> torch.Tensor:
        """Row indices for one epoch (the same for rows in memory and on disk)."""
        return epoch_order(self.num_rows, epoch, shuffle, seed, rank)

    @abstractmethod
    def batch_source(self, device: torch.device) -> tuple[Callable[[torch.Tensor], dict[str, torch.Tensor]],
                                                         torch.device]:
        """(fetch, index device): ``fetch(index)`` gives the rows' batch (a dict of named
        tensors, ``"label"`` included) on ``device``."""

    def row_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each fixed-shape input's row shape (where this shard knows it)."""
        return {name: tuple(column.shape[1:]) for name, column in self.columns.items()} if self.num_rows else {}

    def lengths(self) -> dict[str, tuple[int, int]]:
        """(shortest, longest) row of each input read as ragged (none here)."""
        return {}

    def settle(self, spec: BatchSpec, row_shapes: dict[str, tuple[int, ...]]) -> "ShardRows":
        """This shard in the form the agents agreed on (see ``Shard.settle``)."""
        return self

    def data_bytes(self) -> int:
        """Bytes of the inputs' values (what the rows cost in memory, wherever they are kept)."""
        return sum(int(column.nbytes) for column in self.columns.values())

    def close(self) -> None:
        """Release what the rows hold (a disk shard's file)."""
