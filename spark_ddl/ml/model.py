"""``TorchModel``: a trained network with the columns it was trained on; ``transform`` scores a
DataFrame in Arrow batches on the executors."""

from __future__ import annotations

import uuid
from typing import Any, Mapping, Sequence

import torch
from pyspark.ml import Model
from pyspark.ml.util import MLReadable, MLWritable
from pyspark.sql import DataFrame
from torch import nn

from spark_ddl.common.batch_format import POSITIONAL_KEY
from spark_ddl.common.model_source import ModelSource
from spark_ddl.common.objectives import OBJECTIVES, CustomLoss, Objective, Scoring
from spark_ddl.common.train_config import TrainConfig
from spark_ddl.driver.capabilities import capabilities
from spark_ddl.driver.columns import ColumnSpec
from spark_ddl.formats import model_bytes
from spark_ddl.formats.weights_stream import WeightsWriter
from spark_ddl.ml.inference import ScoringPayload, ShippedModule, predict_frame, predict_pandas
from spark_ddl.ml.params import SharedParams
from spark_ddl.ml.persistence import ModelReader, ModelWriter
from spark_ddl.ml.summary import TrainingSummary


class TorchModel(Model, SharedParams, MLWritable, MLReadable):
    """A trained network with the columns it was trained on; ``transform`` scores a DataFrame."""

    def __init__(
        self,
        module: nn.Module | None = None,
        spec: ColumnSpec | None = None,
        config: TrainConfig | dict[str, Any] | None = None,
        source: ModelSource | None = None,
        summary: dict[str, Any] | None = None,
        optimizer_state: bytes | None = None,
        row_shapes: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        """``spec``: the input columns, with the batch spec as trained (which arrays are ragged);
        ``row_shapes``: each fixed-shape input's row shape (by input name; the one-input
        shorthand's is ``"features"``). Both are the model's own facts, saved in its metadata;
        ``summary`` is the training report users read."""
        super().__init__()
        self._module = module
        self._row_shapes = {name: tuple(int(n) for n in shape) for name, shape in (row_shapes or {}).items()}
        self.optimizer_state = optimizer_state  # rank 0's optimiser state (torch.save bytes), for warm starts
        self._spec = spec
        self._config = config.to_json_dict() if isinstance(config, TrainConfig) else dict(config or {})
        self._source = source
        self.summary = TrainingSummary(summary or {})
        self._key = uuid.uuid4().hex
        self._shipped: tuple[Any, str, Any] | None = None  # (session identity, weights version, shipped payload)
        self._local_scorer: tuple[str, nn.Module] | None = None  # (weights version, module) for predict_pandas
        if spec is not None:
            if spec.batch.positional:
                self._set(feature_cols=list(spec.feature_cols))
            else:
                self._set(inputs={f.name: list(s.columns) if s.form == "columns" else s.columns[0]
                                  for f, s in zip(spec.batch.inputs, spec.sources)})
            if spec.label_col:
                self._set(labelCol=spec.label_col)

    # -------------------------------------------------------------- accessors

    def get_module(self) -> nn.Module:
        """The trained torch.nn.Module (rank 0's weights)."""
        assert self._module is not None
        return self._module

    @property
    def model_source(self) -> ModelSource:
        """How the network is rebuilt elsewhere (executors, a later load)."""
        if self._source is None:  # a TorchModel made around a module by hand
            self._source = ModelSource.of_module(self.get_module())
        return self._source

    def optimizer_state_dict(self) -> dict[str, Any] | None:
        """The optimiser state training ended with (rank 0's; read with ``weights_only=True``),
        or None when the model has none (built by hand, or saved before optimiser states were)."""
        return model_bytes.optimizer_state_from_bytes(self.optimizer_state) if self.optimizer_state else None

    @property
    def columns(self) -> ColumnSpec | None:
        """The input columns the model was trained on, and their form."""
        return self._spec

    @property
    def training_config(self) -> dict[str, Any]:
        """The training settings (as JSON values) the model was trained with."""
        return dict(self._config)

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per epoch: epoch, train_loss, samples, seconds, samples_per_s (lock-step strategies that
        time their exchange, i.e. all but DDP: compute_seconds, the slowest agent's seconds outside it;
        paced_compute_seconds, between every two exchanges the slowest agent's, summed); with validation
        val_loss, val_samples, val_seconds (and val_accuracy for classifiers)."""
        return list(self.summary.get("history", []))

    def plot_history(self, path: str) -> str:
        """Write a PNG of the per-epoch loss (and validation accuracy) curves; needs matplotlib."""
        return self.summary.plot(path)

    @property
    def feature_dim(self) -> int | None:
        """Number of input features the network takes (the one-input shorthand's width; None if unknown)."""
        shape = self._row_shapes.get(POSITIONAL_KEY)
        return int(shape[0]) if shape else None

    @property
    def row_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each fixed-shape input's row shape, as the agents found it (ragged inputs have none)."""
        return dict(self._row_shapes)

    @property
    def objective(self) -> Objective:
        """What the network was trained for (spark_ddl.common.objectives): its scoring head; the user's
        own loss scores as regression."""
        loss = self._config.get("loss")
        return OBJECTIVES[loss]() if loss in OBJECTIVES else CustomLoss()

    @property
    def scoring(self) -> Scoring:
        """What ``transform`` adds: the objective's head, per output on array labels."""
        return Scoring(self.objective, bool(self._spec and self._spec.label_is_array))

    @property
    def task(self) -> str:
        """'multiclass', 'binary', 'regression' or 'multi_regression'."""
        return self.scoring.task

    # -------------------------------------------------------------- inference

    def scoring_columns(self, schema: Any) -> ColumnSpec:
        """The model's inputs read from a DataFrame of ``schema`` (checked), ragged as in training."""
        spec = self.column_spec(schema, None)
        if self._spec is not None:  # arrays ragged in training are padded (with their mask) here too
            ragged = [f.name for f in self._spec.batch.inputs if f.ragged]
            spec = spec.with_batch(spec.batch.with_ragged(ragged))
        return spec

    def _transform(self, dataset: DataFrame) -> DataFrame:
        spec = self.scoring_columns(dataset.schema)
        payload, version = self._shipped_payload(dataset.sparkSession)
        return predict_frame(
            dataset, spec, ShippedModule(payload, version), self.scoring,
            self.getOrDefault(self.predictionCol),
            self.getOrDefault(self.probabilityCol) or None,
            self.getOrDefault(self.inference_batch_size),
        )

    def predict_pandas(self, frame: Any) -> Any:
        """What ``transform`` adds (``prediction``, and ``probability`` as a numpy array per row
        for classifiers) for a pandas frame, computed in this process with no Spark job: the
        frame holds the model's input columns as trained (scalars, sequences or Vectors, stacked
        numeric columns). This is what the MLflow pyfunc flavor calls."""
        if self._spec is None:
            raise ValueError("This TorchModel knows no input columns (made by hand without spec=): "
                             "predict_pandas needs them.")
        return predict_pandas(self._local_scoring_module(), frame, self._spec.without_label(), self.scoring,
                              self.getOrDefault(self.inference_batch_size))

    def _local_scoring_module(self) -> nn.Module:
        """The network as an executor builds it to score (from the model source and the weights,
        in eval mode), here on the CPU; built again only when the weights change."""
        version = self._weights_version()
        if self._local_scorer is None or self._local_scorer[0] != version:
            payload = ScoringPayload(self.model_source, WeightsWriter(self.get_module()).to_bytes())
            self._local_scorer = (version, payload.build(torch.device("cpu")))
        return self._local_scorer[1]

    def _weights_version(self) -> str:
        """Changes whenever a tensor of the module is replaced or modified in place."""
        state = self.get_module().state_dict()
        marks = tuple((name, t.data_ptr(), t._version) for name, t in state.items())  # noqa: SLF001
        return f"{self._key}-{hash(marks) & 0xFFFFFFFFFFFF:x}"

    def _shipped_payload(self, spark) -> tuple[Any, str]:
        """The scoring payload as the executors receive it, and its cache key: shipped once per
        session and weights version, not once per transform (a broadcast on a classic session,
        a session artifact on Spark Connect)."""
        caps = capabilities(spark)
        version = self._weights_version()
        cached = self._shipped
        if cached is None or cached[0] != caps.identity() or cached[1] != version:
            # big weights travel as a file where the session can ship one (not a model-sized value
            # built in the driver's memory); the payload then carries a reference
            payload = ScoringPayload(self.model_source, caps.ship_weights(WeightsWriter(self.get_module())))
            self._shipped = cached = (caps.identity(), version, caps.ship(payload))
        return cached[2], version

    # -------------------------------------------------------------- persistence

    def write(self) -> ModelWriter:
        """A writer: ``model.write().overwrite().save(path)``."""
        return ModelWriter(self)

    def save(self, path: str, overwrite: bool = False) -> None:
        """Write the model to ``path`` (local path or any Hadoop URI Spark can write), all or
        nothing; an existing path is an error unless ``overwrite``."""
        writer = self.write()
        if overwrite:
            writer.overwrite()
        writer.save(path)

    @classmethod
    def read(cls) -> ModelReader:
        """A reader: ``TorchModel.read().load(path)`` (what ``PipelineModel.load`` calls)."""
        return ModelReader(cls)

    @classmethod
    def load_latest(cls, model_dir: str, module: nn.Module | None = None, allow_pickle: bool = False) -> "TorchModel":
        """The newest complete version that ``fit_stream`` published under ``model_dir`` (its
        ``summary["stream_version"]`` says which); loading is as ``load``. ``model_dir`` may also
        be ``models:/<name>@latest`` (or ``models:/<name>/<version>``) of a stream registered in
        MLflow (``fit_stream(registered_model_name=...)``): that version."""
        from spark_ddl.streaming.versions import VersionStore

        if model_dir.startswith("models:/"):
            from spark_ddl.mlflow.registered import resolve_model_dir

            directory, tags = resolve_model_dir(model_dir)
            number = int(tags["model_version"])
            store = VersionStore(directory)
            model = cls.load(store.path(number), module=module, allow_pickle=allow_pickle)
            model.summary["stream_version"] = store.record(number) or {"version": number}
            return model

        store = VersionStore(model_dir)
        for _ in range(3):  # the newest may be pruned while we read it: list again
            number = store.latest_number()
            if number is None:
                raise FileNotFoundError(f"{model_dir} holds no published version (fit_stream publishes one per "
                                        "non-empty micro-batch).")
            try:
                model = cls.load(store.path(number), module=module, allow_pickle=allow_pickle)
            except FileNotFoundError:
                continue
            model.summary["stream_version"] = store.record(number) or {"version": number}
            return model
        raise FileNotFoundError(f"{model_dir}: the newest version kept disappearing while it was read")

    @classmethod
    def load(cls, path: str, module: nn.Module | None = None, allow_pickle: bool = False) -> "TorchModel":
        """Load a saved model; runs no pickle unless ``allow_pickle=True``.

        The network comes from ``module`` if given (its weights are replaced), else the saved
        class path, else the saved torch.export program (no training code needed). A model
        trained from a module object that torch.export could not capture needs ``module=`` or
        ``allow_pickle=True`` (only for files you trust).
        """
        return ModelReader(cls, module, allow_pickle).load(path)
