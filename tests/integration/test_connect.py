"""Every public path from a Spark Connect client: ``SparkSession.builder.remote("local[2]")``
(pyspark starts a local Connect server in this process; the client talks to it over gRPC and
has no SparkContext). A classic local[2] session computes the reference results first."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pyspark.sql import functions as F

import spark_ddl
from spark_ddl import ClusterConfigError, TorchEstimator, TorchModel, TrainingError
from spark_ddl.driver.capabilities import capabilities
from spark_ddl.driver.monitor import StallError
from spark_ddl.formats.checkpoint import list_checkpoints
from tests.connect_server import close_client, leave_connect_mode
from tests.helpers import (ExplodingNet, TinyNet, ratings_frame, regression_arrays, stall_in_epoch_two,
                           two_tower_predictions)
from tests.integration.test_run import hand_written_training, who_is_there
from tests.references import FLOAT32_PATHS

pytestmark = [pytest.mark.connect, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
DIGITS = str(REPO / "data" / "digits.parquet")


def small_frame(spark):
    """96 rows; built the same way in both kinds of session, so both split it alike."""
    x, y = regression_arrays(96, features=4, seed=3)
    return spark.createDataFrame([([float(v) for v in row], float(t)) for row, t in zip(x, y)],
                                 "features array<float>, label double")


def small_estimator(**params) -> TorchEstimator:
    torch.manual_seed(7)
    settings = dict(model=TinyNet(), loss="mse", optimizer="sgd", lr=0.05, optimizer_kwargs={"momentum": 0.9},
                    batch_size=8, epochs=3, num_workers=2, timeout=60, seed=11)
    settings.update(params)
    return TorchEstimator(**settings)


def digits_estimator(**params) -> TorchEstimator:
    torch.manual_seed(0)
    return TorchEstimator(model="spark_ddl.networks:MLP", model_kwargs={"in_features": 64, "out_features": 10,
                                                                      "hidden": [64]},
                          loss="cross_entropy", optimizer="adam", lr=0.01, batch_size=32, epochs=5,
                          num_workers=2, feature_cols="features", label_col="label", seed=0, timeout=60, **params)


def held_out_accuracy(model: TorchModel, test) -> float:
    return model.transform(test).select(F.avg((F.col("prediction") == F.col("label")).cast("double"))).first()[0]


def die_once(marker: str):
    """rank 1 exits hard (like a lost executor) in epoch 2, on the first attempt only."""

    def hook(rank: int, epoch: int, step: int, module) -> None:
        if rank == 1 and epoch == 1 and step == 2 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(3)

    return hook


@pytest.fixture(scope="module")
def classic(sessions):
    """What a classic local[2] session gives for the same inputs (then the session is stopped:
    one process holds one kind of session at a time)."""
    spark = sessions.get("local")
    model = small_estimator().fit(small_frame(spark))
    with pytest.raises(ClusterConfigError) as prelaunch:
        small_estimator(num_workers=3).fit(small_frame(spark))
    ran = spark_ddl.run(hand_written_training, small_frame(spark), label_col="label", num_workers=2, batch_size=8,
                        shuffle=False, timeout=60)
    sessions.stop()
    return {"weights": model.get_module().state_dict(), "history": model.history,
            "shards": model.summary["shard_sizes"], "prelaunch": str(prelaunch.value), "run": ran}


@pytest.fixture(scope="module")
def connect(classic):
    from spark_ddl import get_or_create_session

    spark = get_or_create_session(remote="local[2]")
    try:
        assert capabilities(spark).kind == "connect"
        yield spark
    finally:
        spark.stop()
        leave_connect_mode()


def test_fit_and_transform_on_digits(connect, caplog):
    caplog.set_level(logging.INFO, logger="spark_ddl.progress")
    digits = connect.read.parquet(DIGITS)
    train, test = digits.where(F.col("split") == "train"), digits.where(F.col("split") == "test")
    model = digits_estimator(progress="log").fit(train)
    assert held_out_accuracy(model, test) > 0.9
    assert model.summary["world_size"] == 2 and len(model.history) == 5
    scored = model.transform(test)
    assert scored.columns[-2:] == ["prediction", "probability"]
    # a local server's executors reach this client: the status channel works as in a classic session
    progress = [r.getMessage() for r in caplog.records if r.name == "spark_ddl.progress"]
    assert [line.split(",")[0] for line in progress] == [f"epoch {e}/5" for e in range(1, 6)]


def test_same_weights_as_a_classic_session(connect, classic):
    model = small_estimator().fit(small_frame(connect))
    assert model.summary["shard_sizes"] == classic["shards"]
    weights = model.get_module().state_dict()
    for name, expected in classic["weights"].items():
        torch.testing.assert_close(weights[name], expected, rtol=0, atol=1e-6)
    assert [h["train_loss"] for h in model.history] == pytest.approx(
        [h["train_loss"] for h in classic["history"]], abs=1e-6)


def test_spark_ddl_run_with_and_without_a_dataframe(connect, classic):
    assert spark_ddl.run(who_is_there, num_workers=2, timeout=60) == {  # the active (Connect) session
        "rank": 0, "world_size": 2, "rank_sum": 1.0, "local_rank": 0, "steps": 0}
    state, summary = spark_ddl.run(hand_written_training, small_frame(connect), label_col="label", num_workers=2,
                                   batch_size=8, shuffle=False, timeout=60, return_summary=True)
    assert [r["epoch"] for r in summary["history"]] == [1, 2]
    for name, expected in classic["run"].items():  # the user's own loop: as in a classic session
        torch.testing.assert_close(state[name], expected, rtol=0, atol=1e-6)


def test_named_int64_inputs_fit_transform_save_and_load(connect, tmp_path):
    frame = ratings_frame(connect, rows=120)
    model = TorchEstimator(model="tests.helpers:TwoTower", model_kwargs={"users": 20, "items": 30},
                           inputs={"user": "user", "item": "item"}, label_col="rating", loss="mse", lr=0.05,
                           epochs=2, batch_size=16, num_workers=2, timeout=60).fit(frame)
    scored = model.transform(frame).toPandas()  # the inputs travel as one struct column
    np.testing.assert_allclose(scored["prediction"].to_numpy(), two_tower_predictions(model, scored), rtol=1e-5,
                               atol=1e-6)
    model.save(str(tmp_path / "recs"))
    loaded = TorchModel.load(str(tmp_path / "recs"))
    assert loaded.getOrDefault("inputs") == {"user": "user", "item": "item"}
    again = loaded.transform(frame).toPandas()
    np.testing.assert_allclose(again["prediction"].to_numpy(), scored["prediction"].to_numpy(), **FLOAT32_PATHS)


def test_save_then_load_in_a_new_session(connect, tmp_path):
    frame = small_frame(connect)
    model = small_estimator(epochs=1).fit(frame)
    path = str(tmp_path / "model")
    model.save(path)
    assert {"metadata", "weights.safetensors"} <= set(os.listdir(path))  # written on the server's side
    with pytest.raises(FileExistsError, match="already exists"):
        model.save(path)
    fresh = connect.newSession()  # another Connect session on the same server
    try:
        loaded = TorchModel.read().session(fresh).load(path)
        expected = model.transform(frame).select("prediction").toPandas()["prediction"].to_numpy()
        scored = loaded.transform(small_frame(fresh)).select("prediction")
        np.testing.assert_allclose(scored.toPandas()["prediction"].to_numpy(), expected, **FLOAT32_PATHS)
    finally:
        close_client(fresh)


def test_a_failing_agent_raises_its_own_error(connect):
    estimator = TorchEstimator(model=ExplodingNet(), loss="mse", epochs=1, num_workers=2, timeout=30,
                               check_input=False)  # the driver's forward check would catch it first
    with pytest.raises(TrainingError) as info:
        estimator.fit(small_frame(connect))
    error = info.value
    assert isinstance(error, ValueError) and error.remote_type == "ValueError"
    assert "boom: ExplodingNet.forward refuses to run" in str(error)
    assert "in forward" in error.remote_traceback  # the worker's own traceback


def test_a_pre_launch_error_says_what_a_classic_session_says(connect, classic):
    with pytest.raises(ClusterConfigError) as info:
        small_estimator(num_workers=3).fit(small_frame(connect))
    assert str(info.value) == classic["prelaunch"]
    assert "master=local[2], spark.task.cpus=1" in str(info.value)


def test_a_lost_agent_is_retried_from_its_checkpoint_exactly(connect, classic, tmp_path):
    resilient = small_estimator(checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every="3 steps", max_retries=1)
    resilient._fail_hook = die_once(str(tmp_path / "killed"))
    model = resilient.fit(small_frame(connect))
    assert os.path.exists(tmp_path / "killed")  # the agent really died once
    attempts = model.summary["attempts"]
    assert [a["attempt"] for a in attempts] == [1, 2] and "AgentLost" in attempts[0]["error"]
    assert attempts[1]["resumed_from"].endswith(".pt")
    assert list_checkpoints(str(tmp_path / "ckpt"))
    weights = model.get_module().state_dict()
    for name, expected in classic["weights"].items():  # exactly the uninterrupted run's weights
        torch.testing.assert_close(weights[name], expected, rtol=0, atol=1e-6)


def test_a_stall_is_cancelled_through_the_session_and_the_session_recovers(connect, tmp_path):
    # The fit's timeout is far above stall_timeout: the stall path ends it seconds after the stall
    # began (measured from the stall itself, same clock), the timeout path only after 180 s.
    stalling = small_estimator(stall_timeout=4, timeout=180)
    stalling._fail_hook = stall_in_epoch_two(str(tmp_path / "stalled_at"))
    with pytest.raises(StallError) as info:
        stalling.fit(small_frame(connect))
    stalled_for = time.time() - float((tmp_path / "stalled_at").read_text())
    assert 4 <= stalled_for < 90, stalled_for  # stall_timeout, not the timeout (load here adds seconds)
    assert info.value.rank == 1 and "rank 1: epoch 2, step 2: forward pass (model code)" in str(info.value)
    assert len(small_estimator(epochs=1).fit(small_frame(connect)).history) == 1  # interruptTag freed the slots


def test_pipeline_and_cross_validator(connect, tmp_path):
    from pyspark.ml import Pipeline, PipelineModel
    from pyspark.ml.evaluation import RegressionEvaluator
    from pyspark.ml.feature import VectorAssembler
    from pyspark.ml.tuning import CrossValidator, ParamGridBuilder

    x, y = regression_arrays(64, features=3, seed=5)
    frame = connect.createDataFrame([(float(a), float(b), float(c), float(t)) for (a, b, c), t in zip(x, y)],
                                    "a double, b double, c double, label double")
    estimator = small_estimator(model=TinyNet(in_features=3), feature_cols=["vec"], epochs=1)
    pipeline = Pipeline(stages=[VectorAssembler(inputCols=["a", "b", "c"], outputCol="vec"), estimator])
    grid = ParamGridBuilder().addGrid(estimator.lr, [0.001, 0.05]).build()
    tuned = CrossValidator(estimator=pipeline, estimatorParamMaps=grid, numFolds=2, seed=3,
                           evaluator=RegressionEvaluator(metricName="rmse")).fit(frame)
    assert len(tuned.avgMetrics) == 2 and all(np.isfinite(tuned.avgMetrics))
    fitted = tuned.bestModel  # a PipelineModel: the assembler and a TorchModel
    assert isinstance(fitted, PipelineModel) and isinstance(fitted.stages[-1], TorchModel)
    fitted.write().overwrite().save(str(tmp_path / "pipeline"))
    loaded = PipelineModel.load(str(tmp_path / "pipeline"))
    expected = fitted.transform(frame).select("prediction").toPandas()["prediction"].to_numpy()
    np.testing.assert_allclose(loaded.transform(frame).select("prediction").toPandas()["prediction"].to_numpy(),
                               expected, **FLOAT32_PATHS)
