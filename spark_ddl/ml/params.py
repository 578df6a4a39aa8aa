"""The pyspark.ml Params of ``TorchEstimator`` and ``TorchModel``, generated from the settings'
declarations (``TrainConfig`` and the two small dataclasses below): one Param per setting,
with its documentation, default, and a type converter that checks the value when it is set.

The column settings pyspark already names use pyspark's own shared Params (``labelCol``,
``predictionCol``, ``probabilityCol``, ``seed``, ``validationIndicatorCol``); the snake_case
keyword arguments are accepted as aliases of them, as xgboost.spark does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from pyspark.ml.param import Param, Params
from pyspark.ml.param.shared import HasLabelCol, HasPredictionCol, HasProbabilityCol, HasSeed, HasValidationIndicatorCol

from spark_ddl.common.settings import Setting, check, comma_separated, declared, default_of, setting
from spark_ddl.common.train_config import TrainConfig
from spark_ddl.driver.columns import ColumnSpec, resolve_columns
from spark_ddl.errors import ConfigError


@dataclass
class ScoringSettings:
    """Settings of both the estimator and the model."""

    feature_cols: Any = setting(
        doc="feature column(s): one array<float|double> column, one pyspark.ml Vector column, or a list of "
        "numeric columns", kind=object, default_factory=lambda: ["features"], cli_type=comma_separated)
    inference_batch_size: int = setting(4096, "rows per forward pass in transform()", minimum=1, cli=())
    inputs: dict[str, Any] | None = setting(
        None, "named model inputs: {keyword argument: column, or list of numeric columns}; each batch is "
        "passed as model(**inputs) with the columns' types kept (integers int64, floats float32, booleans, "
        "arrays, Vectors, Spark image structs; variable-length arrays padded per batch with a <name>_mask); "
        "instead of feature_cols", kind=dict, nullable=True, cli=())
    input_shapes: dict[str, Any] = setting(doc="per input: the shape each row's array is reshaped to, e.g. "
                                           "{'image': (1, 8, 8)}", default_factory=dict, cli=())
    input_options: dict[str, Any] = setting(doc="per input: options, e.g. {'tokens': {'max_length': 128}} "
                                            "(truncates variable-length arrays)", default_factory=dict, cli=())


@dataclass
class FitSettings:
    """Settings only the estimator has (besides TrainConfig's)."""

    model: Any = setting(None, "the network: a torch.nn.Module, or 'package.module:Class' built with "
                         "model_kwargs", kind=object, nullable=True, cli=())
    model_kwargs: dict[str, Any] = setting(doc="JSON keyword arguments for a model given as a class path",
                                           default_factory=dict, cli=())
    validation_fraction: float = setting(0.0, "fraction of rows held out (seeded) for per-epoch validation; "
                                         "0 = none", minimum=0)
    initial_model: Any = setting(
        None, "warm start: a TorchModel or the path of a saved one; training continues from its weights and, when it "
        "was trained with the same optimizer, its optimiser state (momentum, Adam's moments; this fit's lr and "
        "optimizer_kwargs apply)", kind=object, nullable=True, cli=())
    check_input: bool = setting(True, "scan the input on the driver before launch (nulls, NaN/inf, label "
                                "range, feature lengths) and run the model on a zero batch", cli=())


# snake_case (and pyspark's singular) spellings accepted for the Params that pyspark names
ALIASES = {
    "label_col": "labelCol",
    "prediction_col": "predictionCol",
    "probability_col": "probabilityCol",
    "validation_col": "validationIndicatorCol",
    "validation_indicator_col": "validationIndicatorCol",
    "featuresCol": "feature_cols",
    "features_col": "feature_cols",
}
COLUMN_DEFAULTS = {"labelCol": "label", "predictionCol": "prediction", "probabilityCol": "probability"}


def _converter(name: str, spec: Setting):
    def convert(value: Any) -> Any:
        check(name, spec, value)
        if spec.kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value

    return convert


def declare_params(cls: type, *settings_classes: type) -> type:
    """Class decorator: a Param on ``cls`` for every declared setting not already there."""
    for settings_class in settings_classes:
        for name, (_, spec) in declared(settings_class).items():
            if spec.param and not hasattr(cls, name):
                setattr(cls, name, Param(Params._dummy(), name, spec.describe(), typeConverter=_converter(name, spec)))
    return cls


def declared_defaults(*settings_classes: type) -> dict[str, Any]:
    """The default of every Param-exposed setting of ``settings_classes``."""
    return {name: default_of(field) for cls in settings_classes
            for name, (field, spec) in declared(cls).items() if spec.param}


def canonical_kwargs(instance: Params, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` with aliases resolved to Param names; unknown names are a ConfigError."""
    out: dict[str, Any] = {}
    for given, value in kwargs.items():
        name = ALIASES.get(given, given)
        if not instance.hasParam(name):
            known = sorted({p.name for p in instance.params} | {a for a, n in ALIASES.items() if instance.hasParam(n)})
            raise ConfigError(f"{type(instance).__name__} has no setting {given!r}; its settings are: "
                              f"{', '.join(known)}.")
        if name in out:
            raise ConfigError(f"{given!r} and another spelling of {name!r} were both given; pass one.")
        out[name] = value
    return out


class SharedParams(HasLabelCol, HasPredictionCol, HasProbabilityCol):
    """Params of both the estimator and the model."""

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(**COLUMN_DEFAULTS, **declared_defaults(ScoringSettings))

    def column_spec(self, schema: Any, label_col: str | None) -> ColumnSpec:
        """The inputs (``inputs`` or ``feature_cols``) and the label, checked against ``schema``."""
        inputs = self.getOrDefault("inputs")
        if inputs and self.isSet("feature_cols"):
            raise ConfigError("Set feature_cols (one input, passed to the model positionally) or inputs (named "
                              "inputs, passed as keyword arguments), not both.")
        return resolve_columns(schema, None if inputs else self.getOrDefault("feature_cols"), label_col, inputs,
                               self.getOrDefault("input_shapes"), self.getOrDefault("input_options"))

    def setInputs(self, value: dict[str, Any]):
        """Set the named inputs ({keyword argument: column})."""
        return self._set(inputs=value)

    def setFeatureCols(self, value: str | Sequence[str]):
        """Set the feature column(s)."""
        return self._set(feature_cols=value)

    def setLabelCol(self, value: str):
        """Set the label column."""
        return self._set(labelCol=value)

    def setPredictionCol(self, value: str):
        """Set the prediction column name."""
        return self._set(predictionCol=value)

    def setProbabilityCol(self, value: str):
        """Set the probability column name ("" for none)."""
        return self._set(probabilityCol=value)

    def setInferenceBatchSize(self, value: int):
        """Set the number of rows per forward pass in transform()."""
        return self._set(inference_batch_size=value)


declare_params(SharedParams, ScoringSettings)


class EstimatorParams(SharedParams, HasSeed, HasValidationIndicatorCol):
    """Every Param of the estimator: the shared ones, its own, and one per TrainConfig setting."""

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(**declared_defaults(FitSettings, TrainConfig))

    def config_param_names(self) -> tuple[str, ...]:
        """The Params that become TrainConfig fields."""
        return tuple(name for name, (_, spec) in declared(TrainConfig).items() if spec.param)


declare_params(EstimatorParams, FitSettings, TrainConfig)
