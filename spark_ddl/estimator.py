"""The public pyspark.ml classes: ``TorchEstimator`` (fit) and ``TorchModel`` (transform)."""

from __future__ import annotations

import copy
import dataclasses
import json
import uuid
from typing import Any, Callable, Sequence

from pyspark import keyword_only
from pyspark.ml import Estimator, Model
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.util import MLReadable, MLWritable
from pyspark.sql import DataFrame
from torch import nn

from spark_ddl import artifact
from spark_ddl.agent import AgentJob
from spark_ddl.config import TrainConfig, classification_kind
from spark_ddl.data import ColumnSpec, normalize_feature_cols, resolve_columns, validation_column
from spark_ddl.errors import ConfigError
from spark_ddl.inference import predict_frame
from spark_ddl.launcher import run_training
from spark_ddl.preflight import check_input
from spark_ddl.summary import TrainingSummary
from spark_ddl.persistence import TorchModelReader, TorchModelWriter, load_module, read_metadata


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
                         probabilityCol="probability", inference_batch_size=4096)

    def setFeatureCols(self, value: str | Sequence[str]):
        """Set the feature column(s)."""
        return self._set(feature_cols=value)

    def setLabelCol(self, value: str):
        """Set the label column."""
        return self._set(label_col=value)

    def setPredictionCol(self, value: str):
        """Set the prediction column name."""
        return self._set(predictionCol=value)

    def setProbabilityCol(self, value: str):
        """Set the probability column name ("" for none)."""
        return self._set(probabilityCol=value)

    def setInferenceBatchSize(self, value: int):
        """Set the number of rows per forward pass in transform()."""
        return self._set(inference_batch_size=value)


def _config_param_names() -> tuple[str, ...]:
    """TrainConfig fields that the estimator exposes as Params of the same name (with the
    config's defaults); the rest (has_validation, resume_from) the driver sets itself."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig)
                 if isinstance(getattr(_TorchEstimatorParams, f.name, None), Param))


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
    sync = Param(Params._dummy(), "sync",
                 "synchronisation strategy: 'allreduce' (the default), 'parameter_server', 'local_sgd' or 'async' "
                 "(asynchronous parameter server)",
                 typeConverter=TypeConverters.toString)
    compression = Param(Params._dummy(), "compression",
                        "gradient compression for sync='allreduce': 'none', 'fp16', 'bf16' or 'powersgd' "
                        "(torch DDP communication hooks)", typeConverter=TypeConverters.toString)
    allreduce_impl = Param(Params._dummy(), "allreduce_impl",
                           "sync='allreduce': 'flat' (one gradient buffer averaged after backward, through "
                           "shared memory between agents on one machine; CPU, compression='none'), 'ddp' "
                           "(torch DDP, overlapped with backward) or 'auto' (flat where it applies)",
                           typeConverter=TypeConverters.toString)
    accumulate_steps = Param(Params._dummy(), "accumulate_steps",
                             "micro-batches whose gradients are accumulated, without communication, "
                             "before each update", typeConverter=_identity)
    max_staleness = Param(Params._dummy(), "max_staleness",
                          "async: the most updates a gradient may miss between the parameters it was "
                          "computed on and its application; faster agents wait rather than exceed it "
                          "(None: 2 x (num_workers - 1), at least 4)", typeConverter=_identity)
    checkpoint_dir = Param(Params._dummy(), "checkpoint_dir",
                           "directory (local path or pyarrow.fs URI, reachable from every executor) "
                           "for training checkpoints; None: none", typeConverter=_identity)
    checkpoint_every = Param(Params._dummy(), "checkpoint_every",
                             "checkpoint every N epochs (an int or 'N epochs') or 'N steps' (updates)",
                             typeConverter=_identity)
    keep_checkpoints = Param(Params._dummy(), "keep_checkpoints", "newest checkpoints kept",
                             typeConverter=_identity)
    resume = Param(Params._dummy(), "resume",
                   "continue from the newest checkpoint in checkpoint_dir (fresh start if there is none)",
                   typeConverter=TypeConverters.toBoolean)
    max_retries = Param(Params._dummy(), "max_retries",
                        "resubmit a barrier job that failed because an agent was lost or stalled, up to "
                        "this many times, resuming from the newest checkpoint", typeConverter=_identity)
    stall_timeout = Param(Params._dummy(), "stall_timeout",
                          "fail when no agent completes a step for this many seconds; None: off",
                          typeConverter=_identity)
    progress = Param(Params._dummy(), "progress",
                     "live progress on the driver: 'auto' (a bar on a terminal, log lines otherwise), "
                     "'bar', 'log' or 'off'", typeConverter=TypeConverters.toString)
    agent_log_level = Param(Params._dummy(), "agent_log_level",
                            "agents' log records at this level and above are re-emitted on the driver as "
                            "'[rank N] logger: message' (logger spark_ddl.agents); 'OFF' for none",
                            typeConverter=TypeConverters.toString)
    shard_storage = Param(Params._dummy(), "shard_storage",
                          "where an agent keeps its training rows: 'memory', 'disk' (an Arrow IPC file on "
                          "the executor's local disk, memory-mapped) or 'auto' (disk above "
                          "shard_memory_limit_mb)", typeConverter=TypeConverters.toString)
    shard_memory_limit_mb = Param(Params._dummy(), "shard_memory_limit_mb",
                                  "shard_storage='auto': an agent's training rows beyond this many MB go to disk",
                                  typeConverter=TypeConverters.toFloat)
    check_input = Param(Params._dummy(), "check_input",
                        "scan the input on the driver before training (nulls, NaN/inf, label range, "
                        "feature lengths, model output shape) and fail with a clear error",
                        typeConverter=TypeConverters.toBoolean)
    check_every = Param(Params._dummy(), "check_every",
                        "compare the replicas' parameter checksums every this many updates and fail "
                        "on divergence (0: only at the end of training)", typeConverter=_identity)
    sync_every = Param(Params._dummy(), "sync_every",
                       "local_sgd: average the parameters every this many steps", typeConverter=_identity)
    validation_col = Param(Params._dummy(), "validation_col",
                           "boolean column: true rows are held out for per-epoch validation",
                           typeConverter=_identity)
    validation_fraction = Param(Params._dummy(), "validation_fraction",
                                "fraction of rows held out (seeded) for per-epoch validation; 0 = none",
                                typeConverter=TypeConverters.toFloat)
    early_stopping_patience = Param(Params._dummy(), "early_stopping_patience",
                                    "stop after this many epochs without a better validation loss and "
                                    "restore the best epoch's weights; 0 = off", typeConverter=_identity)
    lr_scheduler = Param(Params._dummy(), "lr_scheduler",
                         "a torch.optim.lr_scheduler class name (e.g. 'StepLR'), stepped every epoch",
                         typeConverter=_identity)
    lr_scheduler_kwargs = Param(Params._dummy(), "lr_scheduler_kwargs",
                                "keyword arguments of the scheduler", typeConverter=_identity)

    def __init__(self) -> None:
        super().__init__()
        defaults = TrainConfig()
        self._setDefault(
            **{name: getattr(defaults, name) for name in _config_param_names()},
            model_kwargs={}, validation_col=None, validation_fraction=0.0, check_input=True,
        )


class TorchEstimator(Estimator, _TorchEstimatorParams):
    """Trains a torch.nn.Module on a DataFrame with data-parallel barrier agents.

    >>> est = TorchEstimator(model=net, loss="cross_entropy", optimizer="sgd", lr=0.1,
    ...                      batch_size=32, epochs=5, num_workers=2,
    ...                      feature_cols=["features"], label_col="label")
    >>> model = est.fit(df)          # a TorchModel; model.history has per-epoch metrics
    """

    _fail_hook: Callable[[int, int, int, nn.Module], None] | None = None  # tests: fault injection
    _strategy_factory: Callable[[Any], Any] | None = None  # benchmarks: a SyncStrategy of their own

    @keyword_only
    def __init__(
        self, *, model: nn.Module | str | None = None, model_kwargs: dict | None = None,
        loss: str | Callable | None = None, optimizer: str | None = None, lr: float | None = None,
        optimizer_kwargs: dict | None = None, batch_size: int | None = None, epochs: int | None = None,
        num_workers: int | None = None, feature_cols: str | Sequence[str] | None = None,
        label_col: str | None = None, shuffle: bool | None = None, seed: int | None = None,
        use_gpu: bool | None = None, timeout: float | None = None, sync: str | None = None,
        predictionCol: str | None = None, probabilityCol: str | None = None,
        inference_batch_size: int | None = None, validation_col: str | None = None,
        validation_fraction: float | None = None, early_stopping_patience: int | None = None,
        lr_scheduler: str | None = None, lr_scheduler_kwargs: dict | None = None,
        sync_every: int | None = None, compression: str | None = None, allreduce_impl: str | None = None,
        accumulate_steps: int | None = None, check_every: int | None = None,
        max_staleness: int | None = None, checkpoint_dir: str | None = None,
        checkpoint_every: int | str | None = None, keep_checkpoints: int | None = None,
        resume: bool | None = None, max_retries: int | None = None, stall_timeout: float | None = None,
        check_input: bool | None = None, progress: str | None = None, agent_log_level: str | None = None,
        shard_storage: str | None = None, shard_memory_limit_mb: float | None = None,
    ) -> None:
        super().__init__()
        nullable = ("use_gpu", "validation_col", "lr_scheduler", "max_staleness", "checkpoint_dir",
                    "stall_timeout")
        self._set(**{k: v for k, v in self._input_kwargs.items() if v is not None or k in nullable})

    @keyword_only
    def setParams(self, **kwargs: Any) -> "TorchEstimator":
        """Set any of the constructor's keyword arguments."""
        return self._set(**self._input_kwargs)

    def train_config(self) -> TrainConfig:
        """The validated TrainConfig the agents receive."""
        g = self.getOrDefault
        settings = {name: g(getattr(self, name)) for name in _config_param_names()}
        for name in ("optimizer_kwargs", "lr_scheduler_kwargs"):
            settings[name] = dict(settings[name] or {})
        return TrainConfig(
            **settings, has_validation=bool(g(self.validation_col) or g(self.validation_fraction)),
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
        job.strategy_factory = self._strategy_factory
        return job, template, arch

    def _fit(self, dataset: DataFrame) -> "TorchModel":
        config = self.train_config()
        spec = resolve_columns(dataset.schema, self.getOrDefault(self.feature_cols),
                               self.getOrDefault(self.label_col))
        validation = validation_column(dataset.schema, self.getOrDefault(self.validation_col),
                                       self.getOrDefault(self.validation_fraction), config.seed)
        job, template, arch = self._agent_job(config)
        def preflight(training: DataFrame) -> None:
            check_input(dataset, training, spec, config, template)

        result = run_training(dataset, spec, job, validation,
                              preflight if self.getOrDefault(self.check_input) else None)
        template.load_state_dict(result.state_dict)
        summary = dict(result.summary, seconds=result.seconds, sync=config.sync)
        model = TorchModel(template, spec=spec, config=config, architecture=arch, summary=summary)
        return self._copyValues(model)


class TorchModel(Model, _TorchSharedParams, MLWritable, MLReadable):
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
        self.summary = TrainingSummary(summary or {})
        self._key = uuid.uuid4().hex
        self._export_bytes: bytes | None = None  # set when the network came from a torch.export program
        self._broadcast: tuple[Any, str, Any] | None = None  # (SparkContext, weights version, Broadcast)
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

    def plot_history(self, path: str) -> str:
        """Write a PNG of the per-epoch loss (and validation accuracy) curves; needs matplotlib."""
        return self.summary.plot(path)

    @property
    def feature_dim(self) -> int | None:
        """Number of input features the network takes (None if unknown)."""
        dim = self.summary.get("feature_dim")
        return int(dim) if dim is not None else None

    @property
    def task(self) -> str:
        """'multiclass', 'binary', 'regression' or 'multi_regression'."""
        kind = classification_kind(self._config.get("loss"))
        if kind is not None:
            return kind
        return "multi_regression" if self._spec and self._spec.label_is_array else "regression"

    # -------------------------------------------------------------- inference

    def _transform(self, dataset: DataFrame) -> DataFrame:
        spec = resolve_columns(dataset.schema, self.getOrDefault(self.feature_cols), None)
        spec = ColumnSpec(spec.feature_cols, None, spec.feature_kind,
                          self._spec.label_is_array if self._spec else False)
        broadcast, version = self._payload_broadcast(dataset.sparkSession.sparkContext)
        return predict_frame(
            dataset, spec, broadcast, version, self.task,
            self.getOrDefault(self.predictionCol),
            self.getOrDefault(self.probabilityCol) or None,
            self.getOrDefault(self.inference_batch_size),
        )

    def _weights_version(self) -> str:
        """Changes whenever a tensor of the module is replaced or modified in place."""
        state = self.get_module().state_dict()
        marks = tuple((name, t.data_ptr(), t._version) for name, t in state.items())  # noqa: SLF001
        return f"{self._key}-{hash(marks) & 0xFFFFFFFFFFFF:x}"

    def _payload_broadcast(self, sc) -> tuple[Any, str]:
        """The executor payload and its cache key, broadcast once per SparkContext and weights
        version (not once per transform)."""
        version = self._weights_version()
        cached = self._broadcast
        if cached is None or cached[0] is not sc or cached[1] != version:
            self._broadcast = cached = (sc, version, sc.broadcast(self._executor_payload()))
        return cached[2], version

    def _executor_payload(self) -> dict[str, Any]:
        """How executors rebuild the network: class path + weights, export program, or the
        cloudpickled module (the same trust domain as training: this driver made it)."""
        module = self.get_module()
        payload: dict[str, Any] = {"class_path": None, "class_kwargs": None, "weights": None,
                                   "export": None, "module_bytes": None}
        if self._architecture.get("kind") == "class_path":
            payload.update(class_path=self._architecture["class_path"],
                           class_kwargs=self._architecture.get("kwargs", {}),
                           weights=artifact.state_dict_to_bytes(module))
        elif self._export_bytes is not None:
            payload.update(export=self._export_bytes)
        else:
            from pyspark import cloudpickle

            payload.update(module_bytes=cloudpickle.dumps(module))
        return payload

    # -------------------------------------------------------------- persistence

    def write(self) -> TorchModelWriter:
        """A writer: ``model.write().overwrite().save(path)``."""
        return TorchModelWriter(self)

    def save(self, path: str, overwrite: bool = False) -> None:
        """Write the model to ``path`` (local path or any Hadoop URI Spark can write), all or
        nothing; an existing path is an error unless ``overwrite``."""
        writer = self.write()
        if overwrite:
            writer.overwrite()
        writer.save(path)

    @classmethod
    def read(cls) -> TorchModelReader:
        """A reader: ``TorchModel.read().load(path)``."""
        return TorchModelReader(cls)

    @classmethod
    def load(cls, path: str, module: nn.Module | None = None, allow_pickle: bool = False) -> "TorchModel":
        """Load a saved model; runs no pickle unless ``allow_pickle=True``.

        The network comes from ``module`` if given (its weights are replaced), else the saved
        class path, else the saved torch.export program (no training code needed). A model
        trained from a module object that torch.export could not capture needs ``module=`` or
        ``allow_pickle=True`` (only for files you trust).
        """
        metadata = read_metadata(path)
        section = metadata["spark_ddl"]
        loaded, exported = load_module(path, section, module, allow_pickle)
        columns = section.get("columns")
        spec = None
        if columns:
            spec = ColumnSpec(tuple(normalize_feature_cols(columns["feature_cols"])), columns["label_col"],
                              columns["feature_kind"], columns.get("label_is_array", False))
        model = cls(loaded, spec=spec, config=section.get("config"), architecture=section.get("architecture"),
                    summary=section.get("summary"))
        model._export_bytes = exported
        model._resetUid(metadata.get("uid", model.uid))
        for name, value in metadata.get("paramMap", {}).items():
            if model.hasParam(name) and value is not None:
                model._set(**{name: value})
        return model
