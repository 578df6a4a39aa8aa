"""Driver-side data preparation: column checks, conversion to one array<float> feature column,
and balancing the rows into exactly one partition per agent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark_ddl.errors import ConfigError, SchemaError
from spark_ddl.wire import FEATURES, LABEL, VALIDATION


def _is_vector(data_type: T.DataType) -> bool:
    from pyspark.ml.linalg import VectorUDT

    return isinstance(data_type, VectorUDT)


_PARTITION_KEY = "__ddl_partition_key"

_NUMERIC = (T.ByteType, T.ShortType, T.IntegerType, T.LongType, T.FloatType, T.DoubleType, T.DecimalType)


@dataclass(frozen=True)
class ColumnSpec:
    """Which input columns hold the features and the label, and how they are stored."""

    feature_cols: tuple[str, ...]
    label_col: str | None
    feature_kind: str  # "array" | "vector" | "columns"
    label_is_array: bool = False

    def to_json_dict(self) -> dict:
        return {
            "feature_cols": list(self.feature_cols),
            "label_col": self.label_col,
            "feature_kind": self.feature_kind,
            "label_is_array": self.label_is_array,
        }


def normalize_feature_cols(feature_cols: str | Sequence[str]) -> tuple[str, ...]:
    """Accept one column name or a list of them."""
    cols = (feature_cols,) if isinstance(feature_cols, str) else tuple(feature_cols or ())
    if not cols or not all(isinstance(c, str) and c for c in cols):
        raise ConfigError(
            f"feature_cols must be a column name or a non-empty list of names, got {feature_cols!r}."
        )
    return cols


def resolve_columns(
    schema: T.StructType, feature_cols: str | Sequence[str], label_col: str | None
) -> ColumnSpec:
    """Check that the columns exist and have usable types; say how to fix them if not."""
    cols = normalize_feature_cols(feature_cols)
    fields = {f.name: f for f in schema.fields}
    wanted = list(cols) + ([label_col] if label_col else [])
    missing = [c for c in wanted if c not in fields]
    if missing:
        raise SchemaError(
            f"Column(s) {missing} not found in the DataFrame; available columns: "
            f"{sorted(fields)}. Set feature_cols/label_col to existing columns."
        )
    if len(cols) == 1 and _is_numeric_array(fields[cols[0]].dataType):
        kind = "array"
    elif len(cols) == 1 and _is_vector(fields[cols[0]].dataType):
        kind = "vector"
    else:
        kind = "columns"
        for c in cols:
            dtype = fields[c].dataType
            if not isinstance(dtype, _NUMERIC):
                hint = (
                    "a list of feature columns must all be numeric scalars; assemble arrays or "
                    "vectors with VectorAssembler first"
                    if len(cols) > 1
                    else "use a numeric column, an array of numbers or a pyspark.ml Vector"
                )
                raise SchemaError(
                    f"Feature column {c!r} has type {dtype.simpleString()}, which is not numeric: "
                    f"{hint} (e.g. index strings with StringIndexer, or cast the column)."
                )
    label_is_array = False
    if label_col:
        ltype = fields[label_col].dataType
        label_is_array = _is_numeric_array(ltype)
        if not (isinstance(ltype, _NUMERIC) or label_is_array):
            raise SchemaError(
                f"Label column {label_col!r} has type {ltype.simpleString()}; it must be numeric "
                f"(or an array of numbers). Index string labels with StringIndexer first."
            )
    return ColumnSpec(cols, label_col, kind, label_is_array)


def _is_numeric_array(dtype: T.DataType) -> bool:
    return isinstance(dtype, T.ArrayType) and isinstance(dtype.elementType, _NUMERIC)


def features_column(spec: ColumnSpec) -> Column:
    """An array<float> column holding the features, whatever their input form."""
    if spec.feature_kind == "array":
        return F.col(spec.feature_cols[0]).cast("array<float>")
    if spec.feature_kind == "vector":
        from pyspark.ml.functions import vector_to_array

        return vector_to_array(F.col(spec.feature_cols[0]), "float32")
    return F.array(*[F.col(c).cast("float") for c in spec.feature_cols])


def label_column(spec: ColumnSpec) -> Column:
    """The label as double (scalar) or array<float>."""
    assert spec.label_col is not None
    return F.col(spec.label_col).cast("array<float>" if spec.label_is_array else "double")


def validation_column(
    schema: T.StructType, validation_col: str | None, validation_fraction: float, seed: int
) -> Column | None:
    """A boolean column marking validation rows, or None when there is no validation set."""
    if validation_col and validation_fraction:
        raise ConfigError("Set validation_col or validation_fraction, not both.")
    if validation_col:
        fields = {f.name: f for f in schema.fields}
        if validation_col not in fields:
            raise SchemaError(
                f"validation_col {validation_col!r} not found; available columns: {sorted(fields)}."
            )
        dtype = fields[validation_col].dataType
        if not isinstance(dtype, (T.BooleanType, *_NUMERIC)):
            raise SchemaError(
                f"validation_col {validation_col!r} has type {dtype.simpleString()}; it must be "
                "boolean (true = validation row)."
            )
        return F.coalesce(F.col(validation_col).cast("boolean"), F.lit(False))
    if validation_fraction:
        if not 0.0 < validation_fraction < 1.0:
            raise ConfigError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
        return F.rand(seed) < F.lit(validation_fraction)
    return None


def empty_input_error() -> SchemaError:
    """The driver's error for a training DataFrame without rows."""
    return SchemaError("The training DataFrame is empty (0 rows): there is nothing to train on.")


def select_training_columns(df: DataFrame, spec: ColumnSpec, validation: Column | None = None) -> DataFrame:
    """Project the input to exactly the columns the agents read."""
    columns = [features_column(spec).alias(FEATURES), label_column(spec).alias(LABEL)]
    if validation is not None:
        columns.append(validation.alias(VALIDATION))
    return df.select(*columns)


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
