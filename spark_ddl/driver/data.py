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


def balance_partitions(df: DataFrame, num_partitions: int, known_count: int | None = None) -> DataFrame:
    """Exactly ``num_partitions`` partitions whose sizes differ by at most one row.

    An input that already has ``num_partitions`` partitions is returned unchanged (partition i
    becomes rank i). ``known_count``: the input's partition count when the session knows it
    without a job (classic), else one job counts the rows of every partition (Spark Connect
    has no ``getNumPartitions``). Otherwise every row gets a global index (per-partition counts
    plus the row's position inside its partition), row ``i`` is sent to partition ``i mod n``,
    and the hash key for each target partition is chosen so that Spark's hash partitioner
    places it exactly there.
    """
    if known_count == num_partitions:
        return df
    sizes = partition_sizes(df)
    if len(sizes) == num_partitions:
        return df
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += size
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


def _count_partition(batches):
    """One row per partition, empty ones included: (partition id, rows)."""
    import pyarrow as pa
    from pyspark import TaskContext

    rows = sum(batch.num_rows for batch in batches)
    yield pa.RecordBatch.from_pydict({"p": [TaskContext.get().partitionId()], "n": [rows]})


def partition_sizes(df: DataFrame) -> list[int]:
    """Rows in each of ``df``'s partitions, in partition order (one job; no RDD API needed)."""
    rows = df.select(F.lit(True).alias("row"))  # same partitions; no column needs reading
    counted = dict(rows.mapInArrow(_count_partition, "p long, n long").collect())
    return [int(counted.get(p, 0)) for p in range(max(counted, default=-1) + 1)]


_KEYS_FOUND: dict[int, list[int]] = {}  # Spark's hash is fixed: the keys for n partitions never change


def partition_keys(spark, num_partitions: int) -> list[int]:
    """For each partition r, a long key that Spark's HashPartitioning sends to partition r.

    HashPartitioning computes pmod(murmur3_hash(key, seed=42), n), which is what SQL's
    ``hash()`` computes, so Spark itself tells us where each candidate key goes (one small job
    the first time a process balances over ``num_partitions``).
    """
    if num_partitions not in _KEYS_FOUND:
        _KEYS_FOUND[num_partitions] = _find_partition_keys(spark, num_partitions)
    return list(_KEYS_FOUND[num_partitions])


def _find_partition_keys(spark, num_partitions: int) -> list[int]:
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
