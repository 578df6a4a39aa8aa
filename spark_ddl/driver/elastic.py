"""Elastic training: an attempt with fewer agents than ``num_workers`` shards.

The data stay in ``num_workers`` shards (the prepared partitions) whatever the agent count;
with ``k`` agents, agent ``j`` holds the contiguous block of shards ``s`` with
``s * k // num_workers == j``, its rows marked with their shard and position. Every agent runs
each step's batch of each of its shards (the shard's own seeded order, ``batch_size`` rows),
so the global batch and the sample order of every epoch are those of ``num_workers`` agents.
"""

from __future__ import annotations

import logging

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from spark_ddl.common.train_config import TrainConfig
from spark_ddl.common.wire import ROW_COLUMN, SHARD_COLUMN, agent_of_shard
from spark_ddl.driver.capabilities import capabilities
from spark_ddl.driver.data import partition_keys

log = logging.getLogger("spark_ddl")
_AGENT_KEY = "__ddl_agent_key"


def spread_shards(prepared: DataFrame, shards: int, agents: int) -> DataFrame:
    """``prepared`` (``shards`` partitions) as ``agents`` partitions, each holding whole shards,
    its rows ordered by (shard, position in the shard)."""
    keys = partition_keys(prepared.sparkSession, agents)
    key_of_shard = F.array(*[F.lit(keys[agent_of_shard(s, shards, agents)]) for s in range(shards)])
    marked = (prepared.withColumn(SHARD_COLUMN, F.spark_partition_id())
              .withColumn(ROW_COLUMN, F.monotonically_increasing_id()))
    return (marked.withColumn(_AGENT_KEY, F.element_at(key_of_shard, F.col(SHARD_COLUMN) + 1).cast("long"))
            .repartition(agents, _AGENT_KEY).drop(_AGENT_KEY)
            .sortWithinPartitions(SHARD_COLUMN, ROW_COLUMN))


def agents_for_attempt(spark, config: TrainConfig, current: int) -> int:
    """How many agents the next attempt runs: ``num_workers`` when there are slots for them,
    else one per slot if that is at least ``min_workers`` (else ``num_workers``: the attempt
    waits for slots as a non-elastic one does)."""
    if not config.elastic:
        return config.num_workers
    slots = capabilities(spark).task_slots()
    if slots is None:  # the session cannot tell (Spark Connect): ask for all of them
        return config.num_workers
    agents = config.num_workers if slots >= config.num_workers else (
        slots if slots >= config.min_workers else config.num_workers)
    if agents != current:
        log.warning("elastic: %d barrier slot(s) free; continuing with %d agent(s) instead of %d (num_workers=%d, "
                    "min_workers=%d)", slots, agents, current, config.num_workers, config.min_workers)
    return agents
