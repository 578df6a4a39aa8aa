"""Batched scoring on the executors: Arrow batches through an Arrow (or pandas) iterator UDF,
the network rebuilt once per Python worker from its ``ModelSource`` and kept in pyspark's
LRU model cache for the next batches and tasks."""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from pyspark.ml.functions import array_to_vector
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.functions import pandas_udf
from torch import nn

try:  # pyspark >= 4.1
    from pyspark.sql.functions import arrow_udf as _arrow_udf
except ImportError:  # pragma: no cover - older pyspark uses the pandas path
    _arrow_udf = None

from spark_ddl.common.batch_format import BatchSpec, Ragged, as_tensor, call_model, column_values
from spark_ddl.common.devices import select_device, task_gpu_addresses
from spark_ddl.common.model_source import ModelSource
from spark_ddl.common.objectives import Scoring
from spark_ddl.driver.columns import ColumnSpec, pandas_input_column, select_input_columns
from spark_ddl.formats.weights_stream import ShippedWeights

_PREDICTION_STRUCT = "__ddl_prediction"
_BUILD_LOCK = threading.Lock()  # one build per model at a time in a Python worker


@dataclass(frozen=True)
class ScoringPayload:
    """What the executors need to score: the network's source and its weights (safetensors
    bytes, or a file shipped with ``SparkContext.addFile`` for big models)."""

    source: ModelSource
    weights: bytes | ShippedWeights

    def build(self, device: torch.device) -> nn.Module:
        weights = self.weights.open if isinstance(self.weights, ShippedWeights) else self.weights
        return self.source.build("score", weights).to(device)


def scoring_device() -> torch.device:
    """GPU when this executor has one (Spark's GPU resource for the task, else device 0)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    from pyspark import TaskContext

    context = TaskContext.get()
    addresses = task_gpu_addresses(context) if context is not None else []
    rank = context.partitionId() if context is not None else 0
    return torch.device(select_device(None, addresses, True, torch.cuda.device_count(), rank).device)


def _task_cpus() -> int:
    """spark.task.cpus of the running task (intra-op threads for torch), 1 outside a task."""
    from pyspark import TaskContext

    context = TaskContext.get()
    return max(1, int(context.cpus() or 1)) if context is not None else 1


class ModuleProvider(Protocol):
    """Where a scoring task gets its network: ``current(device)`` -> (module, version or None)."""

    def current(self, device: torch.device) -> tuple[nn.Module, int | None]: ...


@dataclass(frozen=True)
class ShippedModule:
    """One fixed model: the shipped ``ScoringPayload`` (``payload.value``: a broadcast on a classic
    session, a session artifact on Spark Connect), built once per Python worker per ``key``."""

    payload: Any
    key: str

    def current(self, device: torch.device) -> tuple[nn.Module, int | None]:
        return _cached_module(self.key, self.payload, device), None


def _cached_module(key: str, payload: Any, device: torch.device) -> nn.Module:
    """The network for ``key`` on ``device``, built once per Python worker (pyspark's LRU cache);
    ``payload.value`` (the ``ScoringPayload``) is read only to build it."""
    from pyspark.ml.model_cache import ModelCache

    cache_key = f"spark_ddl:{key}:{device}"
    module = ModelCache.get(cache_key)
    if module is None:
        with _BUILD_LOCK:
            module = ModelCache.get(cache_key)
            if module is None:
                module = payload.value.build(device)
                ModelCache.add(cache_key, module)
    return module


def _forward(module: nn.Module, columns: dict[str, Any], rows: int, spec: BatchSpec, batch_size: int,
             device: torch.device) -> torch.Tensor:
    """Outputs on the CPU, computed ``batch_size`` rows at a time on ``device``."""
    outputs = []
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # read-only Arrow memory
        for start in range(0, rows, batch_size):
            stop = min(rows, start + batch_size)
            batch = {}
            for field in spec.inputs:
                column = columns[field.name]
                if isinstance(column, Ragged):
                    padded, mask = column.take(torch.arange(start, stop), field.max_length)
                    batch[field.name], batch[field.mask_name] = padded.to(device), mask.to(device)
                else:
                    batch[field.name] = as_tensor(field, column[start:stop]).to(device, non_blocking=True)
            outputs.append(call_model(module, batch, spec).to("cpu"))
    return torch.cat(outputs) if outputs else torch.empty(0, 1)


def predict_frame(
    df: DataFrame,
    spec: ColumnSpec,  # the model's inputs as trained (which arrays are ragged), read from df's columns
    provider: ModuleProvider,
    scoring: Scoring,  # the objective's head: what is added, of which type
    prediction_col: str,
    probability_col: str | None,
    batch_size: int,
    version_col: str | None = None,
) -> DataFrame:
    """``df`` with ``prediction_col`` (and ``probability_col`` for classifiers) appended, and
    with ``version_col`` the version (int) of the model that scored each row.

    ``provider`` gives each Arrow batch its network on the executors (``ShippedModule``: built
    once per Python worker from the payload shipped as the session's kind allows; a versioned
    provider may swap weights between batches).
    """
    classification = scoring.objective.classifier
    return_type = scoring.return_type()
    if version_col:
        return_type += ", model_version int"

    batch_spec = spec.batch

    def predict_arrays(arrays: Iterator[pa.Array]) -> Iterator[pa.Array]:
        device = scoring_device()
        torch.set_num_threads(_task_cpus())
        for array in arrays:  # one struct array of the inputs' wire columns
            module, version = provider.current(device)
            out = _predict_arrow(module, array, batch_spec, scoring, batch_size, device)
            if version_col:
                out = pa.StructArray.from_arrays([*out.flatten(), pa.array([version] * len(array), pa.int32())],
                                                 names=[*(f.name for f in out.type), "model_version"])
            yield out

    def predict_series(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        arrays = (pa.StructArray.from_arrays([pa.array(frame[c]) for c in frame.columns], names=list(frame.columns))
                  for frame in batches)
        for array in predict_arrays(arrays):
            yield pd.DataFrame(array.to_pylist(), columns=[f.name for f in array.type])

    if _arrow_udf is not None:  # pyspark >= 4.1: Arrow arrays in and out, no pandas
        # (returning VectorUDT straight from the UDF would skip array_to_vector, ~30 % of a
        # transform, but fails whenever the input is columnar, e.g. a Parquet scan: Spark 4.3's
        # columnar ArrowEvalPython path, spark.sql.execution.arrow.pythonUDF.columnarInput.enabled,
        # cannot turn a UDT result back into columns. So probabilities leave Python as arrays.)
        predict_arrays.__annotations__ = {"arrays": Iterator[pa.Array], "return": Iterator[pa.Array]}
        udf = _arrow_udf(predict_arrays, return_type)
    else:
        predict_series.__annotations__ = {"batches": Iterator[pd.DataFrame], "return": Iterator[pd.DataFrame]}
        udf = pandas_udf(predict_series, return_type)  # type: ignore[call-overload]
    scored = df.withColumn(_PREDICTION_STRUCT, udf(F.struct(*select_input_columns(df, spec))))
    columns: list[Column] = [F.col(c) for c in df.columns]
    columns.append(F.col(f"{_PREDICTION_STRUCT}.prediction").alias(prediction_col))
    if classification and probability_col:
        columns.append(array_to_vector(F.col(f"{_PREDICTION_STRUCT}.probability")).alias(probability_col))
    if version_col:
        columns.append(F.col(f"{_PREDICTION_STRUCT}.model_version").alias(version_col))
    return scored.select(*columns)


def predict_pandas(module: nn.Module, frame: pd.DataFrame, spec: ColumnSpec, scoring: Scoring, batch_size: int,
                   device: torch.device | str = "cpu") -> pd.DataFrame:
    """What ``predict_frame`` adds, computed here in this process on a pandas frame that holds
    the model's source columns: ``prediction`` (and ``probability``, a numpy array per row, for
    classifiers), batched and read through the same wire columns and batch format."""
    device = torch.device(device)
    wire = [pandas_input_column(f, s, frame) for f, s in zip(spec.batch.inputs, spec.sources)]
    names = [f.column for f in spec.batch.inputs]
    if not len(frame):
        return pd.DataFrame({c: pd.Series([], dtype=float if c == "prediction" and not scoring.multi_output
                                          else object) for c in scoring.columns})
    array = pa.StructArray.from_arrays(wire, names=names)
    out = _predict_arrow(module, array, spec.batch, scoring, batch_size, device)
    result = {}
    for name in (f.name for f in out.type):
        column = out.field(name)
        if pa.types.is_list(column.type):
            width = len(column[0]) if len(column) else 0
            matrix = column.flatten().to_numpy().reshape(len(column), width)
            result[name] = list(matrix)
        else:
            result[name] = column.to_numpy()
    return pd.DataFrame(result, index=frame.index)


def _double_lists(matrix: np.ndarray) -> pa.Array:
    rows, width = matrix.shape
    flat = pa.array(np.ascontiguousarray(matrix, dtype=np.float64).reshape(-1))
    return pa.ListArray.from_arrays(pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32)), flat)


def _predict_arrow(module: nn.Module, array: pa.StructArray, spec: BatchSpec, scoring: Scoring, batch_size: int,
                   device: torch.device) -> pa.Array:
    rows = len(array)
    columns = {f.name: column_values(f, array.field(f.column)) for f in spec.inputs}
    out = _forward(module, columns, rows, spec, batch_size, device).reshape(rows, -1)
    prediction, probability = scoring.predict(out)
    arrays = [_double_lists(prediction) if prediction.ndim == 2 else pa.array(prediction)]
    if probability is not None:
        arrays.append(_double_lists(probability))
    return pa.StructArray.from_arrays(arrays, names=list(scoring.columns))
