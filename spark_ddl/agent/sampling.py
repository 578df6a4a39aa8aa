"""Which rows each step takes: the epoch order of a shard and the step counts every agent
agrees on (pure functions of the shard sizes, the seed and the epoch)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Callable

import torch


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
    ``features`` (n, d) and ``labels`` (n,) or (n, k), indexable by row."""

    features: Any
    labels: Any

    @property
    def num_rows(self) -> int:
        return int(self.features.shape[0])

    @property
    def feature_dim(self) -> int | None:
        """None for an empty shard whose width cannot be known from its own rows."""
        return int(self.features.shape[1]) if self.num_rows else None

    def epoch_order(self, epoch: int, shuffle: bool, seed: int, rank: int) -> torch.Tensor:
        """Row indices for one epoch (the same for rows in memory and on disk)."""
        return epoch_order(self.num_rows, epoch, shuffle, seed, rank)

    @abstractmethod
    def batch_source(self, device: torch.device) -> tuple[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                                                         torch.device]:
        """(fetch, index device): ``fetch(index)`` gives the rows' features and labels on ``device``."""

    @abstractmethod
    def with_feature_dim(self, dim: int) -> "ShardRows":
        """This shard, reshaped to the width the other agents reported when it is empty."""

    def close(self) -> None:
        """Release what the rows hold (a disk shard's file)."""
