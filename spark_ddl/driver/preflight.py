"""Driver-side input checks before any agent starts: one aggregation pass over the training
columns, and one forward pass of the model on a tiny zero batch built from the real inputs'
types and shapes.

Each problem raises a SchemaError/ConfigError that names the column (or input), the count or
value, and the fix. ``check_input=False`` skips the data pass (the agents still refuse nulls
and unequal lengths, only later).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from torch import nn

from spark_ddl.common.batch_format import FLOAT, LABEL_KEY, BatchSpec, InputField, call_model, dummy_batch, tensor_dtype
from spark_ddl.common.objectives import objective
from spark_ddl.common.train_config import TrainConfig
from spark_ddl.common.wire import LABEL
from spark_ddl.driver.capabilities import capabilities
from spark_ddl.driver.columns import ColumnSpec, InputSource
from spark_ddl.driver.data import empty_input_error
from spark_ddl.errors import ConfigError, SchemaError


@dataclass(frozen=True)
class InputFacts:
    """What the aggregation found about one input."""

    null_rows: int  # the value (array, vector, struct or scalar) is null
    bad_rows: int  # an element is null, NaN or infinite
    min_length: int | None = None  # arrays: shortest and longest row
    max_length: int | None = None
    image_sizes: int = 1  # images: distinct (height, width, channels)
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) of the first image


@dataclass(frozen=True)
class InputStats:
    """What one aggregation over the training columns found."""

    rows: int
    inputs: dict[str, InputFacts]
    null_labels: int = 0
    bad_labels: int = 0  # NaN or infinite (for array labels: any element)
    min_label: float | None = None
    max_label: float | None = None
    fractional_labels: int = 0
    ragged: tuple[str, ...] = field(default=())  # named arrays whose rows differ in length


def _not_finite(value: Column) -> Column:
    return value.isNull() | F.isnan(value) | (F.abs(value) == F.lit(float("inf")))


def _has_bad_element(array: Column, floating: bool) -> Column:
    """Whether an array holds a null element (or, ``floating``, a NaN or infinite one).

    No higher-order function (``F.exists``): its lambda variable gets a new name each time it
    is built, so every fit's scan compiled its code afresh (~0.25 s of a 0.45 s scan). Spark
    orders NaN above every number, so ``array_max`` is NaN when any element is."""
    has_null = F.size(F.array_compact(array)) < F.size(array)
    if not floating:
        return has_null
    high, low = F.array_max(array), F.array_min(array)
    return has_null | F.isnan(high) | (high == F.lit(float("inf"))) | (low == F.lit(float("-inf")))


def _count_if(condition: Column) -> Column:
    return F.sum(F.when(condition, 1).otherwise(0))


def _input_aggregates(index: int, input_field: InputField) -> list[Column]:
    column = F.col(input_field.column)
    prefix = f"i{index}_"
    out = [_count_if(column.isNull()).alias(prefix + "null")]
    if input_field.kind == "scalar":
        bad = _not_finite(column) if input_field.dtype == FLOAT else F.lit(False)
        out.append(_count_if(column.isNotNull() & bad).alias(prefix + "bad"))
    elif input_field.kind == "image":
        size = F.concat_ws("x", column["nChannels"], column["height"], column["width"])
        out += [F.countDistinct(size).alias(prefix + "sizes"), F.first(size, ignorenulls=True).alias(prefix + "first"),
                F.lit(0).alias(prefix + "bad")]
    else:
        bad = _has_bad_element(column, floating=input_field.dtype == FLOAT)
        out += [_count_if(column.isNotNull() & bad).alias(prefix + "bad"),
                F.min(F.size(column)).alias(prefix + "min"), F.max(F.size(column)).alias(prefix + "max")]
    return out


def input_stats(training: DataFrame, spec: ColumnSpec) -> InputStats:
    """One Spark job over the projected training columns."""
    aggregates = [F.count(F.lit(1)).alias("rows")]
    for index, input_field in enumerate(spec.batch.inputs):
        aggregates += _input_aggregates(index, input_field)
    if spec.label_col:
        aggregates += _label_aggregates(spec)
    row = training.agg(*aggregates).first().asDict()
    facts = {}
    for index, input_field in enumerate(spec.batch.inputs):
        value = lambda key: row.get(f"i{index}_{key}")  # noqa: E731
        shape = None
        if input_field.kind == "image" and value("first"):
            shape = tuple(int(v) for v in value("first").split("x"))
        facts[input_field.name] = InputFacts(int(value("null") or 0), int(value("bad") or 0), value("min"),
                                             value("max"), int(value("sizes") or 1), shape)
    ragged = tuple(f.name for f in spec.batch.inputs if f.kind == "array" and not spec.batch.positional
                   and f.shape is None and (f.ragged or facts[f.name].min_length != facts[f.name].max_length))
    return InputStats(int(row["rows"]), facts, int(row.get("null_labels") or 0), int(row.get("bad_labels") or 0),
                      row.get("min_label"), row.get("max_label"), int(row.get("fractional") or 0), ragged)


def _label_aggregates(spec: ColumnSpec) -> list[Column]:
    label = F.col(LABEL)
    if spec.label_is_array:
        label_null, label_bad = label.isNull(), _has_bad_element(label, floating=True)
        label_min = label_max = F.lit(None).cast("double")
        fractional = F.lit(0)
    else:
        label_null, label_bad = label.isNull(), label.isNotNull() & _not_finite(label)
        finite = F.when(~_not_finite(label), label)
        label_min, label_max = F.min(finite), F.max(finite)
        fractional = _count_if(~_not_finite(label) & (label != F.floor(label)))
    return [_count_if(label_null).alias("null_labels"), _count_if(label_bad).alias("bad_labels"),
            label_min.alias("min_label"), label_max.alias("max_label"), fractional.alias("fractional")]


_KNOWN_STATS: "OrderedDict[tuple[Any, ...], InputStats]" = OrderedDict()  # of cached inputs, newest last
_KNOWN_STATS_KEPT = 32


def input_stats_of(source: DataFrame, training: DataFrame, spec: ColumnSpec) -> InputStats:
    """``input_stats``, remembered for a cached ``source``: its rows cannot change while it is
    cached, so another fit of it (a hyper-parameter search, a CrossValidator fold) skips the scan."""
    cached = capabilities(source.sparkSession).cached_rows_id(source)
    if cached is None:
        return input_stats(training, spec)
    key = (*cached, training.semanticHash())
    stats = _KNOWN_STATS.get(key)
    if stats is None:
        stats = _KNOWN_STATS[key] = input_stats(training, spec)
        while len(_KNOWN_STATS) > _KNOWN_STATS_KEPT:
            _KNOWN_STATS.popitem(last=False)
    _KNOWN_STATS.move_to_end(key)
    return stats


def check_input(source: DataFrame, training: DataFrame, spec: ColumnSpec, config: TrainConfig,
                template: nn.Module) -> InputStats:
    """Refuse, on the driver, input the agents could not train on; return what was found."""
    stats = input_stats_of(source, training, spec)
    if stats.rows == 0:
        raise empty_input_error()
    for input_field, input_source in zip(spec.batch.inputs, spec.sources):
        _check_input(source, spec, input_field, input_source, stats)
    if spec.label_col:
        _check_labels(spec, config, stats)
    check_model_output(template, config, spec, row_shapes(spec, stats), stats.max_label, stats.ragged)
    return stats


def check_sparse_tables(template: nn.Module, config: TrainConfig) -> None:
    """Tables made with ``nn.Embedding(sparse=True)`` need an optimiser that takes sparse gradients."""
    sparse = [name for name, m in template.named_modules()
              if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
    if sparse and (config.optimizer != "sgd" or config.optimizer_kwargs.get("weight_decay")
                   or config.grad_clip_norm is not None):
        raise ConfigError(
            f"The model's embedding table(s) {sparse} have sparse gradients (sparse=True), which need "
            "optimizer='sgd' without weight_decay and no grad_clip_norm; with these settings create them with "
            "sparse=False (spark_ddl then exchanges large tables' touched rows itself where it can)."
        )


def check_run_input(source: DataFrame, training: DataFrame, spec: ColumnSpec) -> InputStats:
    """``spark_ddl.run``'s checks: the inputs as for a fit, labels only for missing values (the
    function's own loss decides the rest)."""
    stats = input_stats(training, spec)
    if stats.rows == 0:
        raise empty_input_error()
    for input_field, input_source in zip(spec.batch.inputs, spec.sources):
        _check_input(source, spec, input_field, input_source, stats)
    if spec.label_col and (stats.null_labels or stats.bad_labels):
        raise SchemaError(f"Label column {spec.label_col!r} has {stats.null_labels} null and {stats.bad_labels} NaN "
                          f"or infinite value(s) out of {stats.rows} rows. Drop those rows or fill the labels first.")
    return stats


def row_shapes(spec: ColumnSpec, stats: InputStats) -> dict[str, tuple[int, ...]]:
    """Each input's row shape as the data shows it (ragged arrays: their longest row)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for input_field in spec.batch.inputs:
        facts = stats.inputs[input_field.name]
        if input_field.kind == "scalar":
            shapes[input_field.name] = ()
        elif input_field.kind == "image":
            shapes[input_field.name] = facts.image_shape or (1, 1, 1)
        elif input_field.shape is not None:
            shapes[input_field.name] = tuple(input_field.shape)
        else:
            shapes[input_field.name] = (int(facts.max_length or 0),)
    return shapes


def _check_input(source: DataFrame, spec: ColumnSpec, input_field: InputField, input_source: InputSource,
                 stats: InputStats) -> None:
    facts = stats.inputs[input_field.name]
    described = input_source.describe() if spec.batch.positional else (
        f"Input {input_field.name!r} (column {input_source.columns[0]!r})")
    if facts.null_rows or facts.bad_rows:
        detail = _per_column_problems(source, input_source) if input_source.form == "columns" else ""
        raise SchemaError(
            f"{described} hold missing or non-finite values: {facts.null_rows} row(s) with a "
            f"null feature value and {facts.bad_rows} row(s) with a null, NaN or infinite "
            f"element (after conversion to {input_field.dtype}){detail}. Drop or impute them first (e.g. "
            "df.na.drop(), pyspark.ml.feature.Imputer)."
        )
    if input_field.kind == "image":
        if facts.image_sizes > 1:
            sizes = [r[0] for r in source.select(F.concat_ws("x", *(F.col(input_source.columns[0])[k] for k in
                                                                      ("nChannels", "height", "width"))))
                     .distinct().limit(2).collect()]
            raise SchemaError(f"{described} holds images of different sizes (channels x height x width "
                              f"{sizes[0]} and {sizes[1]}, ...). Resize them to one size first.")
        return
    if input_field.kind != "array":
        return
    if input_field.shape is not None and facts.min_length != facts.max_length:
        raise SchemaError(f"{described} holds arrays of unequal length (between {facts.min_length} and "
                          f"{facts.max_length}), which cannot take input_shapes {tuple(input_field.shape)}.")
    if input_field.shape is not None and facts.max_length != math.prod(input_field.shape):
        raise SchemaError(f"{described} holds arrays of {facts.max_length} elements, which cannot take "
                          f"input_shapes {tuple(input_field.shape)} ({math.prod(input_field.shape)} elements).")
    if spec.batch.positional and facts.min_length != facts.max_length:
        raise SchemaError(
            f"{described} hold arrays of unequal length (between {facts.min_length} and "
            f"{facts.max_length}); every row needs the same number of features. Pad, truncate or "
            "filter the rows first (or use inputs= for variable-length arrays: they are padded per batch)."
        )
    if not facts.max_length:
        raise SchemaError(f"{described} hold empty arrays: there are no features to train on.")


def _check_labels(spec: ColumnSpec, config: TrainConfig, stats: InputStats) -> None:
    column = f"Label column {spec.label_col!r}"
    if stats.null_labels or stats.bad_labels:
        raise SchemaError(
            f"{column} has {stats.null_labels} null and {stats.bad_labels} NaN or infinite value(s) "
            f"out of {stats.rows} rows. Drop those rows or fill the labels first."
        )
    objective(config.loss).check_labels(column, stats.min_label, stats.max_label, stats.fractional_labels)


def check_model_output(template: nn.Module, config: TrainConfig, spec: ColumnSpec,
                       shapes: dict[str, tuple[int, ...]], max_label: float | None, ragged: tuple[str, ...] = ()) -> None:
    """Run the model (or ``train_step``) on a zero batch of 2 rows shaped like the real inputs,
    and check the output against the loss and the labels."""
    batch_spec: BatchSpec = spec.batch.with_ragged(ragged)
    batch = dummy_batch(batch_spec, shapes, rows=2)
    was_training = template.training
    template.eval()
    try:
        with torch.no_grad():
            if config.train_step is not None:
                label_dtype = torch.int64 if spec.label_is_integer else tensor_dtype(FLOAT)
                batch[LABEL_KEY] = torch.zeros(2, dtype=label_dtype)
                output = config.train_step(template, batch)
            else:
                output = call_model(template, batch, batch_spec)
    except Exception as exc:
        raise ConfigError(_cannot_run(spec, shapes, config, exc)) from exc
    finally:
        template.train(was_training)
    if config.train_step is not None:
        if not isinstance(output, torch.Tensor) or output.numel() != 1:
            raise ConfigError(f"train_step must return the batch's loss as a scalar tensor; for a batch of 2 it "
                              f"returned {_shape_of(output)}.")
        return
    _check_output(output, config, spec, max_label)


def _cannot_run(spec: ColumnSpec, shapes: dict[str, tuple[int, ...]], config: TrainConfig, exc: Exception) -> str:
    step = "train_step" if config.train_step is not None else "The model"
    if spec.batch.positional:
        width = shapes[spec.batch.inputs[0].name]
        width_text = width[0] if len(width) == 1 else width
        return (f"{step} cannot run on a batch of {width_text} features (the width of "
                f"{spec.sources[0].describe()}): {type(exc).__name__}: {exc}. Make its input size "
                f"{width_text}, or select the feature columns it expects.")
    described = ", ".join(f"{f.name}={list(shapes.get(f.name, ()))}" for f in spec.batch.inputs)
    return (f"{step} cannot run on a batch of the inputs (per-row shapes {described}): "
            f"{type(exc).__name__}: {exc}. Make its forward take these keyword arguments and shapes.")


def _check_output(output: object, config: TrainConfig, spec: ColumnSpec, max_label: float | None) -> None:
    if not isinstance(output, torch.Tensor) or output.dim() == 0 or output.shape[0] != 2:
        raise ConfigError(
            f"The model must return a tensor with one row per input row; for a batch of 2 it returned "
            f"{_shape_of(output)}."
        )
    objective(config.loss).check_output(output, spec.label_is_array, max_label, f"Label column {spec.label_col!r}")


def _per_column_problems(source: DataFrame, input_source: InputSource) -> str:
    """Per-column counts of null/NaN/infinite values (only computed when there are some)."""
    counts = source.agg(*[
        F.sum(F.when(_not_finite(F.col(c).cast("double")), 1).otherwise(0)).alias(c) for c in input_source.columns
    ]).first().asDict()
    bad = {c: int(n) for c, n in counts.items() if n}
    return "; per column: " + ", ".join(f"{c!r}: {n}" for c, n in bad.items()) if bad else ""


def _shape_of(value: object) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
