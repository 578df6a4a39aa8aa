"""Driver-side input checks before any agent starts: one aggregation pass over the training
columns, and one forward pass of the model on a tiny zero batch.

Each problem raises a SchemaError/ConfigError that names the column, the count or value,
and the fix. ``check_input=False`` skips the data pass (the agents still refuse nulls and
unequal feature lengths, only later).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from torch import nn

from spark_ddl.config import TrainConfig
from spark_ddl.driver.data import ColumnSpec, empty_input_error
from spark_ddl.errors import ConfigError, SchemaError
from spark_ddl.wire import FEATURES, LABEL


@dataclass(frozen=True)
class InputStats:
    """What one aggregation over the training columns found."""

    rows: int
    null_feature_rows: int  # the feature value (array/vector/any of the columns) is null
    bad_feature_rows: int  # an element is null, NaN or infinite
    min_length: int | None
    max_length: int | None
    null_labels: int
    bad_labels: int  # NaN or infinite (for array labels: any element)
    min_label: float | None
    max_label: float | None
    fractional_labels: int


def _not_finite(value) -> F.Column:
    return value.isNull() | F.isnan(value) | (F.abs(value) == F.lit(float("inf")))


def input_stats(training: DataFrame, spec: ColumnSpec) -> InputStats:
    """One Spark job over the projected training columns (FEATURES, LABEL)."""
    features, label = F.col(FEATURES), F.col(LABEL)
    count_if = lambda condition: F.sum(F.when(condition, 1).otherwise(0))  # noqa: E731
    if spec.label_is_array:
        label_null, label_bad = label.isNull(), F.exists(label, _not_finite)
        label_min = label_max = F.lit(None).cast("double")
        fractional = F.lit(0)
    else:
        label_null, label_bad = label.isNull(), label.isNotNull() & _not_finite(label)
        finite = F.when(~_not_finite(label), label)
        label_min, label_max = F.min(finite), F.max(finite)
        fractional = count_if(~_not_finite(label) & (label != F.floor(label)))
    row = training.agg(
        F.count(F.lit(1)).alias("rows"),
        count_if(features.isNull()).alias("null_features"),
        count_if(features.isNotNull() & F.exists(features, _not_finite)).alias("bad_features"),
        F.min(F.size(features)).alias("min_length"), F.max(F.size(features)).alias("max_length"),
        count_if(label_null).alias("null_labels"), count_if(label_bad).alias("bad_labels"),
        label_min.alias("min_label"), label_max.alias("max_label"), fractional.alias("fractional"),
    ).first()
    return InputStats(int(row.rows), int(row.null_features or 0), int(row.bad_features or 0),
                      row.min_length, row.max_length, int(row.null_labels or 0), int(row.bad_labels or 0),
                      row.min_label, row.max_label, int(row.fractional or 0))


def check_input(source: DataFrame, training: DataFrame, spec: ColumnSpec, config: TrainConfig,
                template: nn.Module) -> InputStats:
    """Refuse, on the driver, input the agents could not train on; return what was found."""
    stats = input_stats(training, spec)
    if stats.rows == 0:
        raise empty_input_error()
    _check_features(source, spec, stats)
    _check_labels(spec, config, stats)
    check_model_output(template, config, spec, int(stats.max_length), stats.max_label)
    return stats


def _check_features(source: DataFrame, spec: ColumnSpec, stats: InputStats) -> None:
    described = _describe_features(spec)
    if stats.null_feature_rows or stats.bad_feature_rows:
        detail = _per_column_problems(source, spec) if spec.feature_kind == "columns" else ""
        raise SchemaError(
            f"{described} hold missing or non-finite values: {stats.null_feature_rows} row(s) with a "
            f"null feature value and {stats.bad_feature_rows} row(s) with a null, NaN or infinite "
            f"element (after conversion to float32){detail}. Drop or impute them first (e.g. "
            "df.na.drop(), pyspark.ml.feature.Imputer)."
        )
    if stats.min_length != stats.max_length:
        raise SchemaError(
            f"{described} hold arrays of unequal length (between {stats.min_length} and "
            f"{stats.max_length}); every row needs the same number of features. Pad, truncate or "
            "filter the rows first."
        )
    if not stats.max_length:
        raise SchemaError(f"{described} hold empty arrays: there are no features to train on.")


def _check_labels(spec: ColumnSpec, config: TrainConfig, stats: InputStats) -> None:
    column = f"Label column {spec.label_col!r}"
    if stats.null_labels or stats.bad_labels:
        raise SchemaError(
            f"{column} has {stats.null_labels} null and {stats.bad_labels} NaN or infinite value(s) "
            f"out of {stats.rows} rows. Drop those rows or fill the labels first."
        )
    if config.loss == "cross_entropy" and stats.fractional_labels:
        raise SchemaError(
            f"{column} has {stats.fractional_labels} non-integer value(s); loss='cross_entropy' needs "
            "class indices 0, 1, …, num_classes-1 (index string labels with StringIndexer)."
        )
    if config.loss == "bce_with_logits" and stats.min_label is not None and (
        stats.min_label < 0 or stats.max_label > 1
    ):
        raise SchemaError(
            f"{column} has values between {stats.min_label:g} and {stats.max_label:g}; "
            "loss='bce_with_logits' needs targets in [0, 1]."
        )
    if config.loss == "cross_entropy" and stats.min_label is not None and stats.min_label < 0:
        raise SchemaError(
            f"{column} has negative class {stats.min_label:g}; loss='cross_entropy' needs class indices "
            "in [0, num_classes)."
        )


def check_model_output(template: nn.Module, config: TrainConfig, spec: ColumnSpec, feature_dim: int,
                       max_label: float | None) -> None:
    """Forward a zero batch of 2 rows and check the output against the loss and the labels."""
    probe = torch.zeros(2, feature_dim)
    was_training = template.training
    template.eval()
    try:
        with torch.no_grad():
            output = template(probe)
    except Exception as exc:
        raise ConfigError(
            f"The model cannot run on a batch of {feature_dim} features (the width of "
            f"{_describe_features(spec)}): {type(exc).__name__}: {exc}. Make its input size "
            f"{feature_dim}, or select the feature columns it expects."
        ) from exc
    finally:
        template.train(was_training)
    if not isinstance(output, torch.Tensor) or output.dim() == 0 or output.shape[0] != 2:
        raise ConfigError(
            f"The model must return a tensor with one row per input row; for a batch of 2 it returned "
            f"{_shape_of(output)}."
        )
    per_row = math.prod(output.shape[1:])
    if config.loss == "cross_entropy":
        if output.dim() != 2 or output.shape[1] < 2:
            raise ConfigError(
                f"loss='cross_entropy' needs the model to return (batch, num_classes) logits with "
                f"num_classes >= 2; it returns {_shape_of(output)} for a batch of 2."
            )
        if max_label is not None and max_label >= output.shape[1]:
            raise SchemaError(
                f"Label column {spec.label_col!r} has class {max_label:g}, but the model outputs "
                f"{output.shape[1]} classes (labels must be in [0, {output.shape[1]})). Widen the "
                "model's last layer or re-index the labels."
            )
    elif config.loss in ("mse", "bce_with_logits") and not spec.label_is_array and per_row != 1:
        raise ConfigError(
            f"loss={config.loss!r} with a scalar label needs one output per row; the model returns "
            f"{_shape_of(output)} for a batch of 2. Give it one output, or use array labels of that width."
        )


def _describe_features(spec: ColumnSpec) -> str:
    if spec.feature_kind == "columns":
        return f"Feature columns {list(spec.feature_cols)}"
    return f"Feature column {spec.feature_cols[0]!r}"


def _per_column_problems(source: DataFrame, spec: ColumnSpec) -> str:
    """Per-column counts of null/NaN/infinite values (only computed when there are some)."""
    counts = source.agg(*[
        F.sum(F.when(_not_finite(F.col(c).cast("double")), 1).otherwise(0)).alias(c) for c in spec.feature_cols
    ]).first().asDict()
    bad = {c: int(n) for c, n in counts.items() if n}
    return "; per column: " + ", ".join(f"{c!r}: {n}" for c, n in bad.items()) if bad else ""


def _shape_of(value) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
