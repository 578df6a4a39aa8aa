"""Clear driver-side errors, raised before any Spark job is launched."""

from __future__ import annotations

import pytest

from spark_ddl import ClusterConfigError, ConfigError, SchemaError, TorchEstimator, TrainingError
from tests.helpers import SparkJobs, TinyNet, frame_with_partitions


@pytest.fixture
def frame(spark):
    return spark.createDataFrame(
        [([1.0, 2.0, 3.0, 4.0], 1.0, "a", 1.0)] * 8, "features array<double>, label double, name string, x double"
    )


def fit_without_jobs(spark, frame, **params):
    """Call fit; return the error and how many Spark jobs the application ran meanwhile."""
    with SparkJobs(spark) as jobs, pytest.raises(Exception) as info:
        TorchEstimator(**{"model": TinyNet(), "loss": "mse", **params}).fit(frame)
    return info.value, jobs.count


def test_the_job_counter_sees_jobs_started_in_other_threads(spark, frame):
    """The counter these tests rely on: fit() runs its barrier job in a thread of its own."""
    import threading

    with SparkJobs(spark) as jobs:
        worker = threading.Thread(target=frame.count)
        worker.start()
        worker.join(60)
    assert jobs.count >= 1


@pytest.mark.parametrize(
    "params, error_type, expected",
    [
        ({"feature_cols": ["pixels"]}, SchemaError, "Column(s) ['pixels'] not found"),
        ({"label_col": "target"}, SchemaError, "Column(s) ['target'] not found"),
        ({"feature_cols": ["name"]}, SchemaError, "Feature column 'name' has type string, which is not numeric"),
        ({"feature_cols": ["x", "name"]}, SchemaError, "Feature column 'name' has type string"),
        ({"label_col": "name"}, SchemaError, "Label column 'name' has type string"),
        ({"num_workers": 0}, ConfigError, "num_workers must be >= 1, got 0"),
        ({"batch_size": 0}, ConfigError, "batch_size must be >= 1, got 0"),
        ({"epochs": -1}, ConfigError, "epochs must be >= 1"),
        ({"optimizer": "lbfgs"}, ConfigError, "optimizer must be one of sgd, adam, adamw"),
        ({"loss": "hinge"}, ConfigError, "loss must be one of cross_entropy, mse, bce_with_logits"),
        ({"num_workers": 3}, ClusterConfigError, "num_workers=3 needs 3 barrier task slots at once, but the cluster offers 2"),
        ({"use_gpu": True}, ClusterConfigError, "use_gpu=True but no GPU is visible"),
    ],
)
def test_bad_settings_fail_on_the_driver_before_any_job(spark, frame, params, error_type, expected):
    error, jobs = fit_without_jobs(spark, frame, **params)
    assert isinstance(error, error_type), repr(error)
    assert expected in str(error)
    assert jobs == 0


def test_too_many_workers_names_the_setting_to_change(spark, frame):
    error, _ = fit_without_jobs(spark, frame, num_workers=3)
    assert "local[3]" in str(error) and "spark.task.cpus=1" in str(error)


def test_dynamic_allocation_is_refused(spark, frame):
    conf = spark.sparkContext._conf  # noqa: SLF001 - the driver-side conf the check reads
    conf.set("spark.dynamicAllocation.enabled", "true")
    try:
        error, jobs = fit_without_jobs(spark, frame)
    finally:
        conf.set("spark.dynamicAllocation.enabled", "false")
    assert isinstance(error, ClusterConfigError)
    assert "spark.dynamicAllocation.enabled=false" in str(error)
    assert jobs == 0


def test_model_must_be_set_or_a_module(spark, frame):
    with pytest.raises(ConfigError, match="model is not set"):
        TorchEstimator(loss="mse").fit(frame)
    with pytest.raises(ConfigError, match="model must be a torch.nn.Module"):
        TorchEstimator(model=42, loss="mse").fit(frame)


def test_empty_dataframe_is_refused_with_a_clear_message(spark):
    empty = spark.createDataFrame([], "features array<double>, label double").repartition(3)
    with pytest.raises(SchemaError, match="The training DataFrame is empty"):
        TorchEstimator(model=TinyNet(), loss="mse").fit(empty)
    already_split = spark.createDataFrame([], "features array<double>, label double").repartition(2)
    with pytest.raises(SchemaError, match="The training DataFrame is empty"):  # Spark skips the job
        TorchEstimator(model=TinyNet(), loss="mse", timeout=30).fit(already_split)
    import numpy as np

    nothing = (np.empty((0, 4), dtype=np.float32), np.empty((0,), dtype=np.float32))
    two_empty_partitions = frame_with_partitions(spark, [nothing, nothing])
    with pytest.raises(SchemaError, match="The training DataFrame is empty"):  # the driver's input scan
        TorchEstimator(model=TinyNet(), loss="mse", timeout=30).fit(two_empty_partitions)
    with pytest.raises(TrainingError, match="the training DataFrame is empty"):  # without it: the agents
        TorchEstimator(model=TinyNet(), loss="mse", timeout=30, check_input=False).fit(two_empty_partitions)

