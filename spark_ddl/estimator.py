"""The public pyspark.ml classes: ``TorchEstimator`` (fit) and ``TorchModel`` (transform)."""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import uuid
from typing import Any, Callable, Sequence

import pyspark
import torch
from pyspark import keyword_only
from pyspark.ml import Estimator, Model
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.sql import DataFrame
from torch import nn

import spark_ddl
from spark_ddl import artifact
from spark_ddl.agent import AgentJob
from spark_ddl.config import TrainConfig
from spark_ddl.data import ColumnSpec, normalize_feature_cols, resolve_columns
from spark_ddl.errors import ConfigError
from spark_ddl.inference import predict_frame
from spark_ddl.launcher import run_training


def _identity(value: Any) -> Any:
    return value


class _TorchSharedParams(Params):
    """Params shared by the estimator and the model."""

    feature_cols = Param(
        Params._dummy(), "feature_cols",
        "feature column(s): one array<float|double> column, one pyspark.ml Vector column, "
        "or a list of numeric columns", typeConverter=_identity,
    )
    label_col = Param(Params._dummy(), "label_col", "label column", typeConverter=TypeConverters.toString)
    predictionCol = Param(Params._dummy(), "predictionCol", "prediction column name",
                          typeConverter=TypeConverters.toString)
    probabilityCol = Param(Params._dummy(), "probabilityCol",
                           "class-probability column name (classifiers only)",
                           typeConverter=TypeConverters.toString)
    inference_batch_size = Param(Params._dummy(), "inference_batch_size",
                                 "rows per forward pass in transform()", typeConverter=TypeConverters.toInt)

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(feature_cols=["features"], label_col="label", predictionCol="prediction",
                         probabilityCol="probability", inference_batch_size=1024)


class _TorchEstimatorParams(_TorchSharedParams):
    model = Param(Params._dummy(), "model",
                  "the network: a torch.nn.Module, or 'package.module:Class' built with model_kwargs",
                  typeConverter=_identity)
    model_kwargs = Param(Params._dummy(), "model_kwargs",
                         "JSON keyword arguments for a model given as a class path", typeConverter=_identity)
    loss = Param(Params._dummy(), "loss",
                 "'cross_entropy', 'mse', 'bce_with_logits' or a callable(output, target) -> mean loss",
                 typeConverter=_identity)
    optimizer = Param(Params._dummy(), "optimizer", "'sgd', 'adam' or 'adamw'",
                      typeConverter=TypeConverters.toString)
    lr = Param(Params._dummy(), "lr", "learning rate", typeConverter=TypeConverters.toFloat)
    optimizer_kwargs = Param(Params._dummy(), "optimizer_kwargs",
                             "extra keyword arguments of the optimiser (e.g. momentum)", typeConverter=_identity)
    batch_size = Param(Params._dummy(), "batch_size", "mini-batch size per agent", typeConverter=_identity)
    epochs = Param(Params._dummy(), "epochs", "number of passes over the data", typeConverter=_identity)
    num_workers = Param(Params._dummy(), "num_workers", "number of agents (barrier tasks)",
                        typeConverter=_identity)
    shuffle = Param(Params._dummy(), "shuffle", "reshuffle each agent's shard every epoch",
                    typeConverter=TypeConverters.toBoolean)
    seed = Param(Params._dummy(), "seed", "random seed (shuffling, dropout)", typeConverter=_identity)
    use_gpu = Param(Params._dummy(), "use_gpu",
                    "None: GPU when the executors have one; True: require a GPU; False: CPU",
                    typeConverter=_identity)
    timeout = Param(Params._dummy(), "timeout",
                    "seconds any collective or rendezvous may wait before failing", typeConverter=_identity)
    sync = Param(Params._dummy(), "sync", "synchronisation strategy: 'allreduce'",
                 typeConverter=TypeConverters.toString)

    def __init__(self) -> None:
        super().__init__()
        defaults = TrainConfig()
        self._setDefault(
            model_kwargs={}, loss=defaults.loss, optimizer=defaults.optimizer, lr=defaults.lr,
            optimizer_kwargs={}, batch_size=defaults.batch_size, epochs=defaults.epochs,
            num_workers=defaults.num_workers, shuffle=defaults.shuffle, seed=defaults.seed,
            use_gpu=defaults.use_gpu, timeout=defaults.timeout, sync=defaults.sync,
        )


class TorchEstimator(Estimator, _TorchEstimatorParams):
    """Trains a torch.nn.Module on a DataFrame with data-parallel barrier agents.

    >>> est = TorchEstimator(model=net, loss="cross_entropy", optimizer="sgd", lr=0.1,
    ...                      batch_size=32, epochs=5, num_workers=2,
    ...                      feature_cols=["features"], label_col="label")
    >>> model = est.fit(df)          # a TorchModel; model.history has per-epoch metrics
    """

    _fail_hook: Callable[[int, int, int], None] | None = None  # tests: fault injection

    @keyword_only
    def __init__(
        self, *, model: nn.Module | str | None = None, model_kwargs: dict | None = None,
        loss: str | Callable | None = None, optimizer: str | None = None, lr: float | None = None,
        optimizer_kwargs: dict | None = None, batch_size: int | None = None, epochs: int | None = None,
        num_workers: int | None = None, feature_cols: str | Sequence[str] | None = None,
        label_col: str | None = None, shuffle: bool | None = None, seed: int | None = None,
        use_gpu: bool | None = None, timeout: float | None = None, sync: str | None = None,
        predictionCol: str | None = None, probabilityCol: str | None = None,
        inference_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self._set(**{k: v for k, v in self._input_kwargs.items() if v is not None or k == "use_gpu"})

    @keyword_only
    def setParams(self, **kwargs: Any) -> "TorchEstimator":
        """Set any of the constructor's keyword arguments."""
        return self._set(**self._input_kwargs)

    def train_config(self) -> TrainConfig:
        """The validated TrainConfig the agents receive."""
        g = self.getOrDefault
        return TrainConfig(
            loss=g(self.loss), optimizer=g(self.optimizer), lr=g(self.lr),
            optimizer_kwargs=dict(g(self.optimizer_kwargs) or {}), batch_size=g(self.batch_size),
            epochs=g(self.epochs), num_workers=g(self.num_workers), shuffle=g(self.shuffle),
            seed=g(self.seed), use_gpu=g(self.use_gpu), timeout=g(self.timeout), sync=g(self.sync),
        ).validate()

    def _agent_job(self, config: TrainConfig) -> tuple[AgentJob, nn.Module, dict[str, Any]]:
        """The job for the agents, a local template module, and the architecture record."""
        if not self.isSet(self.model):
            raise ConfigError("model is not set: pass model=<torch.nn.Module> or 'package.module:Class'.")
        model = self.getOrDefault(self.model)
        kwargs = dict(self.getOrDefault(self.model_kwargs) or {})
        if isinstance(model, str):
            try:
                json.dumps(kwargs)
            except TypeError as exc:
                raise ConfigError(f"model_kwargs must be JSON-serialisable: {exc}") from exc
            template = artifact.build_from_class_path(model, kwargs)
            job = AgentJob(config, class_path=model, class_kwargs=kwargs)
            arch = {"kind": "class_path", "class_path": model, "kwargs": kwargs}
        elif isinstance(model, nn.Module):
            from pyspark import cloudpickle

            try:
                module_bytes = cloudpickle.dumps(model)
            except Exception as exc:
                raise ConfigError(
                    f"The model cannot be serialised to send it to the executors "
                    f"({type(exc).__name__}: {exc}). Remove unpicklable attributes (open files, "
                    "locks, CUDA streams) or pass model='package.module:Class'."
                ) from exc
            template = copy.deepcopy(model)
            job = AgentJob(config, module_bytes=module_bytes)
            arch = {"kind": "pickle", "class": f"{type(model).__module__}.{type(model).__qualname__}"}
        else:
            raise ConfigError(
                f"model must be a torch.nn.Module or 'package.module:Class', got {type(model).__name__}."
            )
        job.fail_hook = self._fail_hook
        return job, template, arch

    def _fit(self, dataset: DataFrame) -> "TorchModel":
        config = self.train_config()
        spec = resolve_columns(dataset.schema, self.getOrDefault(self.feature_cols),
                               self.getOrDefault(self.label_col))
        job, template, arch = self._agent_job(config)
        result = run_training(dataset, spec, job)
        template.load_state_dict(result.state_dict)
        summary = dict(result.summary, seconds=result.seconds, sync=config.sync)
        model = TorchModel(template, spec=spec, config=config, architecture=arch, summary=summary)
        return self._copyValues(model)


class TorchModel(Model, _TorchSharedParams):
    """A trained network with the columns it was trained on; ``transform`` scores a DataFrame."""

    def __init__(
        self,
        module: nn.Module | None = None,
        spec: ColumnSpec | None = None,
        config: TrainConfig | dict[str, Any] | None = None,
        architecture: dict[str, Any] | None = None,
        summary: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self._module = module
        self._spec = spec
        self._config = config.to_json_dict() if isinstance(config, TrainConfig) else dict(config or {})
        self._architecture = architecture or {"kind": "unknown"}
        self.summary: dict[str, Any] = summary or {}
        self._key = uuid.uuid4().hex
        if spec is not None:
            self._set(feature_cols=list(spec.feature_cols), label_col=spec.label_col)

    # -------------------------------------------------------------- accessors

    def get_module(self) -> nn.Module:
        """The trained torch.nn.Module (rank 0's weights)."""
        assert self._module is not None
        return self._module

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per epoch: epoch, train_loss, samples, seconds, samples_per_s."""
        return list(self.summary.get("history", []))

    @property
    def task(self) -> str:
        """'multiclass', 'binary', 'regression' or 'multi_regression'."""
        loss = self._config.get("loss")
        if loss == "cross_entropy":
            return "multiclass"
        if loss == "bce_with_logits":
            return "binary"
        return "multi_regression" if self._spec and self._spec.label_is_array else "regression"

    # -------------------------------------------------------------- inference

    def _transform(self, dataset: DataFrame) -> DataFrame:
        spec = resolve_columns(dataset.schema, self.getOrDefault(self.feature_cols), None)
        spec = ColumnSpec(spec.feature_cols, None, spec.feature_kind,
                          self._spec.label_is_array if self._spec else False)
        return predict_frame(
            dataset, spec, self._executor_payload(), self._key, self.task,
            self.getOrDefault(self.predictionCol),
            self.getOrDefault(self.probabilityCol) or None,
            self.getOrDefault(self.inference_batch_size),
        )

    def _executor_payload(self) -> dict[str, Any]:
        module = self.get_module()
        if self._architecture.get("kind") == "class_path":
            return {"class_path": self._architecture["class_path"],
                    "class_kwargs": self._architecture.get("kwargs", {}),
                    "weights": artifact.state_dict_to_bytes(module), "module_bytes": None}
        from pyspark import cloudpickle

        return {"class_path": None, "class_kwargs": None, "weights": None,
                "module_bytes": cloudpickle.dumps(module)}

    # -------------------------------------------------------------- persistence

    def save(self, path: str, overwrite: bool = False) -> None:
        """Write the model to ``path`` (local path or Hadoop/pyarrow URI), all or nothing.

        Files: weights.safetensors, metadata.json, and module.cloudpickle only when the
        architecture was given as a module object (loading that needs ``allow_pickle=True``).
        """
        module = self.get_module()
        weights = artifact.state_dict_to_bytes(module)
        metadata = {
            "format_version": artifact.FORMAT_VERSION,
            "class": "spark_ddl.TorchModel",
            "columns": self._spec.to_json_dict() if self._spec else None,
            "params": {
                "predictionCol": self.getOrDefault(self.predictionCol),
                "probabilityCol": self.getOrDefault(self.probabilityCol),
                "inference_batch_size": self.getOrDefault(self.inference_batch_size),
            },
            "config": self._config,
            "architecture": self._architecture,
            "summary": self.summary,
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
            "versions": {"spark_ddl": spark_ddl.__version__, "torch": torch.__version__,
                         "pyspark": pyspark.__version__, "python": platform.python_version()},
        }
        files = {artifact.WEIGHTS_FILE: weights,
                 artifact.METADATA_FILE: json.dumps(metadata, indent=2, default=str).encode()}
        if self._architecture.get("kind") == "pickle":
            from pyspark import cloudpickle

            files[artifact.PICKLED_MODULE_FILE] = cloudpickle.dumps(module)
        artifact.write_model_dir(path, files, overwrite=overwrite)

    @classmethod
    def load(cls, path: str, module: nn.Module | None = None, allow_pickle: bool = False) -> "TorchModel":
        """Load a saved model without running pickle.

        The architecture comes from ``module`` if given (its weights are replaced), else from
        the saved class path. A model saved from a module object can only be rebuilt by
        unpickling, which needs ``allow_pickle=True`` (only for files you trust).
        """
        metadata = artifact.read_metadata(path)
        weights = artifact.read_model_file(path, artifact.WEIGHTS_FILE)
        if weights is None:
            raise FileNotFoundError(f"{path} has no {artifact.WEIGHTS_FILE}")
        if hashlib.sha256(weights).hexdigest() != metadata.get("weights_sha256"):
            raise ValueError(f"{path}/{artifact.WEIGHTS_FILE} does not match its metadata checksum")
        arch = metadata.get("architecture", {})
        if module is None and arch.get("kind") == "class_path":
            module = artifact.build_from_class_path(arch["class_path"], arch.get("kwargs"))
        elif module is None and arch.get("kind") == "pickle":
            if not allow_pickle:
                raise ConfigError(
                    f"The model at {path} was trained from a module object ({arch.get('class')}), "
                    "so its architecture is stored only as a pickle, and unpickling can run "
                    "arbitrary code. Pass module=<an instance of that architecture>, or "
                    "allow_pickle=True if you trust the files."
                )
            from pyspark import cloudpickle

            raw = artifact.read_model_file(path, artifact.PICKLED_MODULE_FILE)
            if raw is None:
                raise FileNotFoundError(f"{path} has no {artifact.PICKLED_MODULE_FILE}")
            module = cloudpickle.loads(raw)
        elif module is None:
            raise ConfigError(f"{path} does not describe its architecture; pass module=...")
        module.load_state_dict(artifact.state_dict_from_bytes(weights))
        columns = metadata.get("columns")
        spec = None
        if columns:
            spec = ColumnSpec(tuple(normalize_feature_cols(columns["feature_cols"])), columns["label_col"],
                              columns["feature_kind"], columns.get("label_is_array", False))
        model = cls(module, spec=spec, config=metadata.get("config"), architecture=arch,
                    summary=metadata.get("summary"))
        model._set(**{k: v for k, v in metadata.get("params", {}).items() if v is not None})
        return model
