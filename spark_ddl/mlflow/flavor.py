"""The MLflow flavor ``spark_ddl`` (with ``python_function`` beside it).

An MLflow model directory of this flavor::

    MLmodel            flavors: spark_ddl (data: model) and python_function (loader: spark_ddl.mlflow)
    model/             spark_ddl's own saved format: what ``TorchModel.save(path)`` writes
    requirements.txt   python_env.yaml   conda.yaml   (the packages scoring needs, pinned as here)
"""

from __future__ import annotations

import os
import platform
from importlib import metadata as _metadata
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array, SparkMLVector

from spark_ddl._version import __version__
from spark_ddl.errors import ConfigError

FLAVOR_NAME = "spark_ddl"
MODEL_DATA = "model"  # the saved spark_ddl directory inside the MLflow model
# the packages a scorer needs (spark_ddl itself is installed from its checkout or wheel)
_REQUIREMENTS = ("torch", "pyspark", "pandas", "pyarrow", "numpy", "safetensors", "PyYAML", "mlflow-skinny")


def _fitted(model: Any) -> Any:
    from spark_ddl.ml.model import TorchModel

    if isinstance(model, TorchModel):
        return model
    if type(model).__name__ == "TorchEstimator":  # (not imported here: the estimator's fit_stream imports us)
        raise ConfigError("log_model takes a fitted TorchModel, and this is an unfitted TorchEstimator: "
                          "model = estimator.fit(df), then spark_ddl.mlflow.log_model(model, name).")
    if type(model).__name__ == "StreamingFit":
        raise ConfigError("log_model takes a fitted TorchModel, and this is a StreamingFit: to register every "
                          "version it publishes, start it with fit_stream(..., registered_model_name=name); to log "
                          "its newest version, log_model(TorchModel.load_latest(model_dir), name).")
    raise ConfigError(f"log_model takes a fitted spark_ddl TorchModel, got {type(model).__name__}.")


# ------------------------------------------------------------------ signature

_SCALARS = {"byte": DataType.integer, "short": DataType.integer, "integer": DataType.integer,
            "long": DataType.long, "float": DataType.float, "double": DataType.double,
            "boolean": DataType.boolean}


def _mlflow_type(spark_type: Any) -> Any:
    """MLflow's type for a Spark input column type (None: none that a signature can hold)."""
    from pyspark.sql import types as T

    if isinstance(spark_type, T.DecimalType):
        return DataType.double
    if isinstance(spark_type, T.ArrayType):
        element = _mlflow_type(spark_type.elementType)
        return Array(element) if isinstance(element, DataType) else None
    if type(spark_type).__name__ == "VectorUDT":
        return SparkMLVector()
    return _SCALARS.get(spark_type.typeName())


def _input_schema(model: Any) -> Schema | None:
    """The training DataFrame's input columns (as the fit recorded them), or None when unknown
    or when one has a type a signature cannot hold (images)."""
    from pyspark.sql import types as T

    fields = model.summary.get("input_schema")
    if not fields:
        return None
    specs = []
    for field in fields:
        spark_field = T.StructField.fromJson(field)
        kind = _mlflow_type(spark_field.dataType)
        if kind is None:
            return None
        specs.append(ColSpec(kind, spark_field.name))
    return Schema(specs)


def _output_schema(model: Any) -> Schema:
    task = model.task
    prediction = Array(DataType.double) if task == "multi_regression" else DataType.double
    outputs = [ColSpec(prediction, "prediction")]
    if task in ("multiclass", "binary"):
        outputs.append(ColSpec(Array(DataType.double), "probability"))
    return Schema(outputs)


def signature_of(model: Any) -> ModelSignature | None:
    """The model's signature: the training DataFrame's input columns, and the columns
    ``transform`` adds (``prediction`` double, or an array for several targets; ``probability``
    an array of doubles for classifiers). None when the inputs cannot be described (images)."""
    inputs = _input_schema(_fitted(model))
    return ModelSignature(inputs=inputs, outputs=_output_schema(model)) if inputs is not None else None


# ------------------------------------------------------------------ environment files


def _pinned_requirements() -> list[str]:
    lines = []
    for name in _REQUIREMENTS:
        try:
            lines.append(f"{name}=={_metadata.version(name).split('+')[0]}")
        except _metadata.PackageNotFoundError:
            lines.append(name)
    return lines


def _write_environment(path: str) -> tuple[str, str]:
    requirements = _pinned_requirements()
    with open(os.path.join(path, "requirements.txt"), "w") as out:
        out.write("\n".join(requirements) + "\n")
    python = platform.python_version()
    with open(os.path.join(path, "python_env.yaml"), "w") as out:
        yaml.safe_dump({"python": python, "build_dependencies": ["pip"], "dependencies": ["-r requirements.txt"]},
                       out, sort_keys=False)
    with open(os.path.join(path, "conda.yaml"), "w") as out:
        yaml.safe_dump({"name": "spark_ddl_env", "channels": ["conda-forge"],
                        "dependencies": [f"python={python}", "pip", {"pip": requirements}]}, out, sort_keys=False)
    return "conda.yaml", "python_env.yaml"


# ------------------------------------------------------------------ save, log, load


def save_model(model: Any, path: str, mlflow_model: Model | None = None, signature: ModelSignature | None = None,
               input_example: Any = None, metadata: dict[str, Any] | None = None,
               files: dict[str, Any] | None = None, **_: Any) -> None:
    """Write ``model`` (a fitted ``TorchModel``) as an MLflow model directory at ``path`` (a
    local path that must not exist yet). ``signature``: default ``signature_of(model)``;
    ``files``: the model's saved files when they were made already (``model_files(model)``)."""
    from spark_ddl.formats import storage
    from spark_ddl.ml.persistence import model_files

    model = _fitted(model)
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise MlflowException(f"Path '{path}' already exists and is not empty")
    os.makedirs(path)
    storage.write_directory(os.path.join(path, MODEL_DATA), files if files is not None else model_files(model),
                            overwrite=False)
    mlflow_model = mlflow_model if mlflow_model is not None else Model()
    mlflow_model.signature = signature if signature is not None else signature_of(model)
    if metadata is not None:
        mlflow_model.metadata = metadata
    if input_example is not None:
        from mlflow.models.utils import _save_example  # what MLflow's own flavors call

        _save_example(mlflow_model, input_example, path)
    conda_env, python_env = _write_environment(path)
    pickled = model.model_source.pickled is not None
    mlflow.pyfunc.add_to_model(mlflow_model, loader_module="spark_ddl.mlflow", data=MODEL_DATA,
                               conda_env=conda_env, python_env=python_env)
    mlflow_model.add_flavor(FLAVOR_NAME, data=MODEL_DATA, spark_ddl_version=__version__, task=model.task,
                            network=model.model_source.record().get("class_path") or
                            model.model_source.record().get("class"),
                            needs_pickle=pickled and model.model_source.program is None)
    mlflow_model.save(os.path.join(path, "MLmodel"))


def log_model(model: Any, name: str, registered_model_name: str | None = None, input_example: Any = None,
              signature: ModelSignature | None = None, metadata: dict[str, Any] | None = None,
              **kwargs: Any) -> ModelInfo:
    """Log a fitted ``TorchModel`` as an MLflow model of this flavor in the active run (one is
    started when none is active), optionally registered as a new version of
    ``registered_model_name``; returns MLflow's ``ModelInfo`` (``model_uri``,
    ``registered_model_version``, ...)."""
    _fitted(model)  # before anything is created in the tracking store
    from spark_ddl.mlflow import flavor

    return Model.log(artifact_path=None, name=name, flavor=flavor, registered_model_name=registered_model_name,
                     input_example=input_example, signature=signature, metadata=metadata, model=model, **kwargs)


def _data_dir(model_uri: str, dst_path: str | None = None) -> str:
    from mlflow.artifacts import download_artifacts

    try:
        local = download_artifacts(artifact_uri=model_uri, dst_path=dst_path)
    except MlflowException as exc:
        raise MlflowException(f"No MLflow model at {model_uri}: {exc.message}", error_code=exc.error_code) from exc
    conf = Model.load(os.path.join(local, "MLmodel")).flavors.get(FLAVOR_NAME)
    if conf is None:
        raise MlflowException(f"The MLflow model at {model_uri} has no {FLAVOR_NAME!r} flavor.")
    return os.path.join(local, conf.get("data", MODEL_DATA))


def load_model(model_uri: str, dst_path: str | None = None, module: Any = None,
               allow_pickle: bool = False) -> Any:
    """The ``TorchModel`` logged at ``model_uri`` (``runs:/<id>/<name>``, ``models:/<name>/<version>``,
    ``models:/<name>@<alias>``, a local directory, ...). Loading is as ``TorchModel.load``: no
    pickle unless ``allow_pickle=True`` (only for models you trust), or the network from ``module``."""
    from spark_ddl.ml.model import TorchModel

    return TorchModel.load(_data_dir(model_uri, dst_path), module=module, allow_pickle=allow_pickle)


class _PyFuncModel:
    """What ``mlflow.pyfunc.load_model`` wraps: ``predict(pandas_df)`` gives the columns
    ``transform`` adds, computed in this process (``TorchModel.predict_pandas``)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def get_raw_model(self) -> Any:
        return self.model

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        return self.model.predict_pandas(frame)


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> _PyFuncModel:
    """The python_function loader (``path``: the flavor's data directory). A model that only a
    pickle describes loads with ``model_config={"allow_pickle": True}``, for models you trust."""
    from spark_ddl.ml.model import TorchModel

    allow = bool((model_config or {}).get("allow_pickle", False))
    return _PyFuncModel(TorchModel.load(path, allow_pickle=allow))


__all__ = ["FLAVOR_NAME", "load_model", "log_model", "save_model", "signature_of", "_load_pyfunc"]
