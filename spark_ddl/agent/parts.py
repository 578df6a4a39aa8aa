"""Elastic: which of the ``num_workers`` shards an agent holds, and where each one's training
rows lie in its shard (the rows arrive sorted by shard; see ``spark_ddl.driver.elastic``)."""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

from spark_ddl.common.wire import SHARD_COLUMN, VALIDATION, agent_of_shard

Part = tuple[int, int, int]  # (shard, first row in this agent's training rows, rows)


class ShardCounter:
    """Counts each shard's training rows in the batches passing through ``count``."""

    def __init__(self) -> None:
        self.rows: Counter[int] = Counter()

    def count(self, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            shards = batch.column(batch.schema.get_field_index(SHARD_COLUMN)).to_numpy(zero_copy_only=False)
            index = batch.schema.get_field_index(VALIDATION)
            if index >= 0:
                held_out = batch.column(index).fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
                shards = shards[~held_out]
            for shard, rows in zip(*np.unique(shards, return_counts=True)):
                self.rows[int(shard)] += int(rows)
            yield batch

    def parts(self, rank: int, shards: int, agents: int) -> list[Part]:
        """This agent's shards in row order, with their offsets and sizes (empty ones too)."""
        mine = [s for s in range(shards) if agent_of_shard(s, shards, agents) == rank]
        stray = set(self.rows) - set(mine)
        if stray:
            raise RuntimeError(f"agent {rank} of {agents} received rows of shards {sorted(stray)}, not its own {mine}")
        parts, offset = [], 0
        for shard in mine:
            parts.append((shard, offset, self.rows.get(shard, 0)))
            offset += self.rows.get(shard, 0)
        return parts


def shard_sizes(all_parts: Iterable[Iterable[Part]], shards: int) -> list[int]:
    """Training rows per shard, in shard order, from every agent's parts."""
    sizes: dict[int, int] = {}
    for parts in all_parts:
        for shard, _, rows in parts:
            sizes[int(shard)] = int(rows)
    if sorted(sizes) != list(range(shards)):
        raise RuntimeError(f"the agents hold shards {sorted(sizes)}, not 0..{shards - 1}")
    return [sizes[s] for s in range(shards)]
