"""``TorchEstimator``: the pyspark.ml estimator that trains a torch.nn.Module on a DataFrame."""

from __future__ import annotations

from typing import Any, Callable

from pyspark import keyword_only
from pyspark.ml import Estimator
from pyspark.ml.util import MLReadable, MLWritable
from pyspark.sql import DataFrame
from torch import nn

from spark_ddl.common.model_source import ModelSource
from spark_ddl.common.settings import declared
from spark_ddl.common.train_config import TrainConfig
from spark_ddl.common.wire import OPTIMIZER_PAYLOAD, AgentJob, AttemptFacts, Hooks, TrainingTask
from spark_ddl.driver.capabilities import capabilities
from spark_ddl.driver.columns import validation_column
from spark_ddl.driver.launcher import run_training
from spark_ddl.driver.preflight import check_input, check_sparse_tables
from spark_ddl.driver.progress import listened_fit
from spark_ddl.errors import ConfigError
from spark_ddl.formats.weights_stream import WeightsWriter
from spark_ddl.ml.model import TorchModel
from spark_ddl.ml.params import EstimatorParams, canonical_kwargs
from spark_ddl.ml.persistence import EstimatorReader, EstimatorWriter
from spark_ddl.ml.warm_start import resolve_initial_model


class TorchEstimator(Estimator, EstimatorParams, MLWritable, MLReadable):
    """Trains a torch.nn.Module on a DataFrame with data-parallel barrier agents.

    >>> est = TorchEstimator(model=net, loss="cross_entropy", optimizer="sgd", lr=0.1,
    ...                      batch_size=32, epochs=5, num_workers=2,
    ...                      feature_cols=["features"], label_col="label")
    >>> model = est.fit(df)          # a TorchModel; model.history has per-epoch metrics

    Every keyword argument is a Param (``explainParams()`` lists them with their defaults);
    pyspark's camelCase names (``labelCol``, ``featuresCol``, ``validationIndicatorCol``) and
    the snake_case ones (``label_col``, ``validation_col``) are both accepted.
    """

    _fail_hook: Callable[[int, int, int, nn.Module], None] | None = None  # tests: fault injection
    # tests only: (rank, module) on every rank after the final replica check, before rank 0's
    # weights are serialised (lets a test see each replica, or make them differ on purpose)
    _final_hook: Callable[[int, nn.Module], None] | None = None
    _strategy_factory: Callable[[Any], Any] | None = None  # benchmarks: a strategy of their own
    # tests only: (stage, batch_id) in fit_stream after a micro-batch's training ("trained") and
    # after its version is published ("published"), before Spark commits it (kills the driver there)
    _stream_hook: Callable[[str, int], None] | None = None
    _attempt_hook: Callable[[int, Any], None] | None = None  # tests: (attempt, SparkContext) on the driver first
    _stream_results: bool = True  # tests, benchmarks: False sends the weights as result rows (the fallback)

    @keyword_only
    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self._set(**canonical_kwargs(self, self._input_kwargs))

    @keyword_only
    def setParams(self, **kwargs: Any) -> "TorchEstimator":
        """Set any of the constructor's keyword arguments."""
        return self._set(**canonical_kwargs(self, self._input_kwargs))

    def train_config(self) -> TrainConfig:
        """The validated TrainConfig the agents receive."""
        settings = {name: self.getOrDefault(name) for name in self.config_param_names()}
        for name, (_, spec) in declared(TrainConfig).items():
            if spec.kind is dict and settings.get(name) is not None:
                settings[name] = dict(settings[name])
        return TrainConfig(**settings, has_validation=self._validation_requested()).validate()

    def _validation_requested(self) -> bool:
        return bool(self._validation_col() or self.getOrDefault(self.validation_fraction))

    def _validation_col(self) -> str | None:
        return self.getOrDefault(self.validationIndicatorCol) if self.isDefined(self.validationIndicatorCol) else None

    def model_source(self) -> tuple[ModelSource, nn.Module]:
        """How the agents rebuild the network, and a local copy of it (the driver's template)."""
        if self.getOrDefault(self.model) is None:
            raise ConfigError("model is not set: pass model=<torch.nn.Module> or 'package.module:Class'.")
        return ModelSource.of(self.getOrDefault(self.model), self.getOrDefault(self.model_kwargs))

    def _fit(self, dataset: DataFrame) -> TorchModel:
        if dataset.isStreaming:
            raise ConfigError("fit() trains on a bounded DataFrame and this one is streaming: use "
                              "est.fit_stream(stream_df, model_dir=..., checkpoint_location=...) to train continuously.")
        config = self.train_config()
        spec = self.column_spec(dataset.schema, self.getLabelCol() or None)
        if spec.label_col is None and config.train_step is None:
            raise ConfigError("A built-in loss needs labels: set label_col, or give train_step=callable(model, batch).")
        validation = validation_column(dataset.schema, self._validation_col(),
                                       self.getOrDefault(self.validation_fraction), config.seed)
        source, template = self.model_source()
        check_sparse_tables(template, config)
        warm = resolve_initial_model(self.getOrDefault(self.initial_model), template, config)
        # an architecture-only pickle (a big module object) needs its weights shipped beside it
        module_weights = (capabilities(dataset.sparkSession).ship_weights(WeightsWriter(template))
                          if source.stripped else None)
        task = TrainingTask(config, source, spec.batch, label_is_integer=spec.label_is_integer,
                            strategy_factory=self._strategy_factory, module_weights=module_weights,
                            initial_weights=warm.weights if warm else None,
                            initial_optimizer=warm.optimizer if warm else None)
        job = AgentJob(task, AttemptFacts(stream_results=self._stream_results),
                       Hooks(fail_hook=self._fail_hook, final_hook=self._final_hook, attempt_hook=self._attempt_hook))

        def preflight(training: DataFrame) -> None:
            check_input(dataset, training, spec, config, template)

        facts = {"kind": "fit", "config": config, "network": source.record(), "columns": spec.to_json_dict()}
        with listened_fit(facts) as outcome:
            model = self._train(dataset, spec, job, validation, preflight, config, template, source, warm)
            outcome.update(summary=model.summary, model=model)
        return model

    def _train(self, dataset, spec, job, validation, preflight, config, template, source, warm) -> TorchModel:
        result = run_training(dataset, spec, job, validation,
                              preflight if self.getOrDefault(self.check_input) else None)
        try:
            result.load_weights_into(template)  # in place, a chunk at a time: no second copy of the model
            optimizer_state = result.payload(OPTIMIZER_PAYLOAD) or None  # rank 0's: what a warm start continues
        finally:
            result.discard()
        summary = dict(result.summary, seconds=result.seconds, sync=config.sync,
                       input_schema=[dataset.schema[c].jsonValue() for c in dict.fromkeys(spec.feature_cols)])
        if warm is not None:
            summary["warm_start"] = warm.summary()
        trained = spec.with_batch(result.report.batch)  # raggedness as the agents agreed on it
        model = TorchModel(template, spec=trained, config=config, source=source, summary=summary,
                           optimizer_state=optimizer_state, row_shapes=result.report.row_shapes)
        return self._copyValues(model)

    def fit_stream(self, stream_df: DataFrame, model_dir: str, checkpoint_location: str, trigger: Any = None,
                   initial_model: Any = None, keep_versions: int = 10, query_name: str | None = None,
                   registered_model_name: str | None = None) -> Any:
        """Train continuously from a streaming DataFrame; returns a running ``StreamingFit``.

        Every non-empty micro-batch is trained as ``fit(initial_model=previous version)`` would
        (weights and optimiser state continue) and published as the next version under
        ``model_dir`` (``TorchModel.load_latest``, ``spark_ddl.LatestModel``). ``trigger``:
        ``{"processingTime": "30 seconds"}``, ``{"availableNow": True}``, ``{"once": True}`` or
        None. ``initial_model`` (a TorchModel or saved path) seeds an empty ``model_dir``; a
        restart with the same ``checkpoint_location`` continues from the newest version and
        never trains a micro-batch twice. ``keep_versions``: newest versions kept.
        ``registered_model_name``: each published version also becomes a version of this MLflow
        registered model (tags ``model_version``, ``batch_id``) and the alias ``latest`` moves to
        it (``pip install 'spark_ddl[mlflow]'``; see ``spark_ddl.mlflow.registry``).
        """
        from spark_ddl.streaming.fit import start_stream

        return start_stream(self, stream_df, model_dir, checkpoint_location, trigger, initial_model, keep_versions,
                            query_name, registered_model_name)

    # -------------------------------------------------------------- persistence

    def write(self) -> EstimatorWriter:
        """A writer: ``estimator.write().overwrite().save(path)`` (a module object and callable
        settings are saved as pickles; loading them needs ``allow_pickle``)."""
        return EstimatorWriter(self)

    @classmethod
    def read(cls) -> EstimatorReader:
        """A reader (what ``Pipeline.load`` and ``CrossValidator.load`` call)."""
        return EstimatorReader(cls)

    @classmethod
    def load(cls, path: str, allow_pickle: bool = False) -> "TorchEstimator":
        """Load a saved estimator; runs no pickle unless ``allow_pickle=True`` (or inside
        ``with spark_ddl.allow_pickle():``)."""
        return EstimatorReader(cls, allow_pickle).load(path)
