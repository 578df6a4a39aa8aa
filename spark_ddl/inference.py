"""Batched scoring on the executors: Arrow batches through a pandas iterator UDF, the model
rebuilt once per Python worker and reused for every batch."""

from __future__ import annotations

import threading
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from pyspark.ml.functions import array_to_vector
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.functions import pandas_udf
from torch import nn

from spark_ddl.artifact import build_from_class_path, load_export_program, state_dict_from_bytes
from spark_ddl.data import ColumnSpec, features_column

_PREDICTION_STRUCT = "__ddl_prediction"
_CACHE: dict[str, nn.Module] = {}  # model key -> module, per Python worker
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 4


def _cached_module(key: str, payload: dict[str, Any]) -> nn.Module:
    with _CACHE_LOCK:
        module = _CACHE.get(key)
        if module is None:
            if payload["export"] is not None:
                module = load_export_program(payload["export"])  # captured in eval mode
            else:
                if payload["class_path"] is not None:
                    module = build_from_class_path(payload["class_path"], payload["class_kwargs"])
                    module.load_state_dict(state_dict_from_bytes(payload["weights"]))
                else:
                    from pyspark import cloudpickle

                    module = cloudpickle.loads(payload["module_bytes"])
                module.eval()
            while len(_CACHE) >= _CACHE_SIZE:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = module
        return module


def _forward(module: nn.Module, features: np.ndarray, batch_size: int) -> torch.Tensor:
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(features), batch_size):
            outputs.append(module(torch.from_numpy(features[start : start + batch_size])))
    return torch.cat(outputs) if outputs else torch.empty(0)


def predict_frame(
    df: DataFrame,
    spec: ColumnSpec,
    payload: dict[str, Any],
    model_key: str,
    task: str,  # "multiclass" | "binary" | "regression" | "multi_regression"
    prediction_col: str,
    probability_col: str | None,
    batch_size: int,
) -> DataFrame:
    """``df`` with ``prediction_col`` (and ``probability_col`` for classifiers) appended."""
    broadcast = df.sparkSession.sparkContext.broadcast(payload)
    classification = task in ("multiclass", "binary")
    if classification:
        return_type = "prediction double, probability array<double>"
    elif task == "multi_regression":
        return_type = "prediction array<double>"
    else:
        return_type = "prediction double"

    @pandas_udf(return_type)  # type: ignore[call-overload]
    def predict(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        module = _cached_module(model_key, broadcast.value)
        torch.set_num_threads(1)
        for series in batches:
            if len(series):
                features = np.stack(series.to_numpy()).astype(np.float32, copy=False)
            else:
                features = np.empty((0, 0), dtype=np.float32)
            out = _forward(module, features, batch_size).double() if len(series) else None
            yield _to_frame(out, task, len(series))

    scored = df.withColumn(_PREDICTION_STRUCT, predict(features_column(spec)))
    columns: list[Column] = [F.col(c) for c in df.columns]
    columns.append(F.col(f"{_PREDICTION_STRUCT}.prediction").alias(prediction_col))
    if classification and probability_col:
        columns.append(array_to_vector(F.col(f"{_PREDICTION_STRUCT}.probability")).alias(probability_col))
    return scored.select(*columns)


def _to_frame(out: torch.Tensor | None, task: str, rows: int) -> pd.DataFrame:
    if out is None:
        cols = {"prediction": []}
        if task in ("multiclass", "binary"):
            cols["probability"] = []
        return pd.DataFrame(cols)
    if task == "multiclass":
        probability = torch.softmax(out.reshape(rows, -1), dim=1)
        return pd.DataFrame({
            "prediction": probability.argmax(dim=1).double().numpy(),
            "probability": list(probability.numpy()),
        })
    if task == "binary":
        positive = torch.sigmoid(out.reshape(rows))
        probability = torch.stack([1 - positive, positive], dim=1)
        return pd.DataFrame({
            "prediction": (positive > 0.5).double().numpy(),
            "probability": list(probability.numpy()),
        })
    if task == "multi_regression":
        return pd.DataFrame({"prediction": list(out.reshape(rows, -1).numpy())})
    return pd.DataFrame({"prediction": out.reshape(rows).numpy()})
