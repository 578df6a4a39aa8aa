"""Driver-side data preparation: balancing the rows into exactly one partition per agent (the
columns themselves are resolved and projected in ``columns``)."""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from spark_ddl.errors import SchemaError

_PARTITION_KEY = "__ddl_partition_key"


def empty_input_error() -> SchemaError:
    """The driver's error for a training DataFrame without rows."""
    return SchemaError("The training DataFrame is empty (0 rows): there is nothing to train on.")


# --------------------------------------------------------------------------------------
# Partition balancing
# --------------------------------------------------------------------------------------


def balance_partitions(df: DataFrame, num_partitions: int) -> DataFrame:
    """Exactly ``num_partitions`` partitions whose sizes differ by at most one row.

    An input that already has ``num_partitions`` partitions is returned unchanged (partition i
    becomes rank i). Otherwise every row gets a global index (per-partition counts plus the
    row's position inside its partition), row ``i`` is sent to partition ``i mod n``, and the
    hash key for each target partition is chosen so that Spark's hash partitioner places it
    exactly there.
    """
    if df.rdd.getNumPartitions() == num_partitions:
        return df
    counts = dict(
        df.select(F.spark_partition_id().alias("p")).groupBy("p").count().collect()
    )
    offsets, total = [], 0
    for pid in range(max(counts, default=-1) + 1):
        offsets.append(total)
        total += counts.get(pid, 0)
    if total == 0:
        raise empty_input_error()
    keys = partition_keys(df.sparkSession, num_partitions)
    position = F.monotonically_increasing_id().bitwiseAND((1 << 33) - 1)  # row within partition
    offset = F.element_at(F.array(*[F.lit(o) for o in offsets]), F.spark_partition_id() + 1)
    target = F.pmod(offset + position, F.lit(num_partitions))
    key = F.element_at(F.array(*[F.lit(k) for k in keys]), (target + 1).cast("int"))
    return (
        df.withColumn(_PARTITION_KEY, key.cast("long"))
        .repartition(num_partitions, _PARTITION_KEY)
        .drop(_PARTITION_KEY)
    )


def partition_keys(spark, num_partitions: int) -> list[int]:
    """For each partition r, a long key that Spark's HashPartitioning sends to partition r.

    HashPartitioning computes pmod(murmur3_hash(key, seed=42), n), which is what SQL's
    ``hash()`` computes, so Spark itself tells us where each candidate key goes.
    """
    found: dict[int, int] = {}
    span = 32 * num_partitions
    start = 0
    while len(found) < num_partitions:
        rows = (
            spark.range(start, start + span)
            .select("id", F.pmod(F.hash("id"), F.lit(num_partitions)).alias("target"))
            .collect()
        )
        for key, target in rows:
            found.setdefault(int(target), int(key))
        start += span
        if start > 1_000_000 * num_partitions:  # cannot happen with a sane hash function
            raise RuntimeError("could not find a hash key for every partition")
    return [found[r] for r in range(num_partitions)]
