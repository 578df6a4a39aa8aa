"""The bad-input table: each row a clear error on the driver, before any agent starts."""

from __future__ import annotations

import threading

import pytest

from spark_ddl import ClusterConfigError, ConfigError, SchemaError, TorchEstimator
from spark_ddl.driver import launcher
from tests.helpers import TinyNet

GOOD_ROWS = [([0.5, 1.0, -1.0, 2.0], 1.0)] * 6
SCHEMA = "features array<double>, label double"
GOOD_ROWS_INT = [([1, 2, 3, 4], 1.0)] * 6


class LockedNet(TinyNet):
    """Holds a lock: cannot be pickled to the executors."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()


CASES = {
    "null feature value": (GOOD_ROWS + [([0.5, None, 1.0, 2.0], 1.0)], SCHEMA, {},
                           SchemaError, "1 row(s) with a null, NaN or infinite element"),
    "null feature array": (GOOD_ROWS + [(None, 1.0)] * 2, SCHEMA, {},
                           SchemaError, "2 row(s) with a null feature value"),
    "NaN feature": (GOOD_ROWS + [([float("nan"), 1.0, 1.0, 2.0], 1.0)] * 3, SCHEMA, {},
                    SchemaError, "3 row(s) with a null, NaN or infinite element"),
    "infinite feature": (GOOD_ROWS + [([float("inf"), 1.0, 1.0, 2.0], 1.0)], SCHEMA, {},
                         SchemaError, "Feature column 'features' hold missing or non-finite values"),
    "negative infinite feature": (GOOD_ROWS + [([0.5, float("-inf"), 1.0, 2.0], 1.0)], SCHEMA, {},
                                  SchemaError, "1 row(s) with a null, NaN or infinite element"),
    "null element of an integer array": (GOOD_ROWS_INT + [([1, None, 3, 4], 1.0)], "features array<int>, label double",
                                         {}, SchemaError, "1 row(s) with a null, NaN or infinite element"),
    "infinite element of an array label": ([([0.5, 1.0, -1.0, 2.0], [1.0, 0.0])] * 6 + [([0.5, 1.0, -1.0, 2.0],
                                            [float("-inf"), 1.0])], "features array<double>, label array<double>",
                                           {"model": TinyNet(out_features=2)}, SchemaError,
                                           "has 0 null and 1 NaN or infinite value(s)"),
    "NaN in one of several columns": ([(1.0, 2.0, float("nan"), 1.0)] * 2 + [(1.0, 2.0, 3.0, 1.0)] * 4,
                                      "a double, b double, c double, label double",
                                      {"feature_cols": ["a", "b", "c"], "model": TinyNet(in_features=3)},
                                      SchemaError, "per column: 'c': 2"),
    "null label": (GOOD_ROWS + [([0.5, 1.0, 1.0, 2.0], None)], SCHEMA, {},
                   SchemaError, "Label column 'label' has 1 null and 0 NaN or infinite value(s) out of 7 rows"),
    "NaN label": (GOOD_ROWS + [([0.5, 1.0, 1.0, 2.0], float("nan"))], SCHEMA, {},
                  SchemaError, "has 0 null and 1 NaN or infinite value(s)"),
    "class label too large": (GOOD_ROWS + [([0.5, 1.0, 1.0, 2.0], 3.0)], SCHEMA,
                              {"loss": "cross_entropy", "model": TinyNet(out_features=3)},
                              SchemaError, "has class 3, but the model outputs 3 classes (labels must be in [0, 3))"),
    "negative class label": (GOOD_ROWS + [([0.5, 1.0, 1.0, 2.0], -1.0)], SCHEMA,
                             {"loss": "cross_entropy", "model": TinyNet(out_features=3)},
                             SchemaError, "has negative class -1"),
    "fractional class label": (GOOD_ROWS + [([0.5, 1.0, 1.0, 2.0], 0.5)], SCHEMA,
                               {"loss": "cross_entropy", "model": TinyNet(out_features=3)},
                               SchemaError, "1 non-integer value(s); loss='cross_entropy' needs class indices"),
    "binary target outside [0, 1]": (GOOD_ROWS + [([0.5, 1.0, 1.0, 2.0], 2.0)], SCHEMA, {"loss": "bce_with_logits"},
                                     SchemaError, "needs targets in [0, 1]"),
    "feature arrays of unequal length": (GOOD_ROWS + [([0.5, 1.0], 1.0)], SCHEMA, {},
                                         SchemaError, "arrays of unequal length (between 2 and 4)"),
    "empty DataFrame": ([], SCHEMA, {}, SchemaError, "The training DataFrame is empty"),
    "string feature column": ([("a", 1.0)], "features string, label double", {},
                              SchemaError, "Feature column 'features' has type string, which is not numeric"),
    "unsupported column type": ([({"a": 1.0}, 1.0)], "features map<string,double>, label double", {},
                                SchemaError, "has type map<string,double>, which is not numeric"),
    "model input does not fit the features": (GOOD_ROWS, SCHEMA, {"model": TinyNet(in_features=3)},
                                              ConfigError, "cannot run on a batch of 4 features"),
    "model output does not fit cross_entropy": (GOOD_ROWS, SCHEMA, {"loss": "cross_entropy"},
                                                ConfigError, "needs the model to return (batch, num_classes) logits"),
    "model output does not fit mse": (GOOD_ROWS, SCHEMA, {"model": TinyNet(out_features=3)},
                                      ConfigError, "loss='mse' with a scalar label needs one output per row"),
    "model that cannot be serialised": (GOOD_ROWS, SCHEMA, {"model": LockedNet()},
                                        ConfigError, "The model cannot be serialised"),
    "dynamic allocation enabled": (GOOD_ROWS, SCHEMA, {"__dynamic_allocation": True},
                                   ClusterConfigError, "spark.dynamicAllocation.enabled=false"),
    "GPUs requested without GPU resources": (GOOD_ROWS, SCHEMA, {"use_gpu": True},
                                             ClusterConfigError, "use_gpu=True but no GPU is visible"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_on_the_driver_before_training(spark, monkeypatch, case):
    def launched(*args, **kwargs):
        raise AssertionError("the barrier training job was launched")

    monkeypatch.setattr(launcher, "_run_barrier_job", launched)
    rows, schema, params, error_type, message = CASES[case]
    params = dict(params)
    dynamic = params.pop("__dynamic_allocation", False)
    frame = spark.createDataFrame(rows, schema)
    estimator = TorchEstimator(**{"model": TinyNet(), "loss": "mse", "timeout": 30, **params})
    conf = spark.sparkContext._conf  # noqa: SLF001 - the driver-side conf the check reads
    if dynamic:
        conf.set("spark.dynamicAllocation.enabled", "true")
    try:
        with pytest.raises(error_type) as info:
            estimator.fit(frame)
    finally:
        conf.set("spark.dynamicAllocation.enabled", "false")
    assert message in str(info.value)


def test_check_input_false_skips_the_scan_and_the_agents_still_refuse(spark):
    from spark_ddl import TrainingError

    frame = spark.createDataFrame(GOOD_ROWS + [([0.5, 1.0], 1.0)], SCHEMA).repartition(2)
    with pytest.raises(TrainingError, match="unequal lengths"):
        TorchEstimator(model=TinyNet(), loss="mse", timeout=90, check_input=False).fit(frame)
