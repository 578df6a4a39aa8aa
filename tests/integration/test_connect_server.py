"""A Spark Connect server in its own process (pyspark's ``sbin/start-connect-server.sh``,
``--master local[2]``), the client in the test process or in the ``spark-ddl`` command."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pyspark.sql import functions as F

import spark_ddl
from spark_ddl import ClusterConfigError, ConfigError, TorchEstimator, TorchModel, TrainingError
from spark_ddl.formats.checkpoint import list_checkpoints
from tests.connect_server import connect_server, leave_connect_mode
from tests.helpers import ExplodingNet, TinyNet, assert_a_stalled_agent_stops_itself, regression_arrays
from tests.integration.test_run import who_is_there

pytestmark = [pytest.mark.connect, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
DIGITS = str(REPO / "data" / "digits.parquet")
SPARK_DDL = Path(sys.executable).with_name("spark-ddl")


@pytest.fixture(scope="module")
def server(sessions, tmp_path_factory):
    sessions.stop()  # one kind of session per process at a time
    with connect_server(tmp_path_factory.mktemp("connect-server")) as url:
        yield url


@pytest.fixture
def client(server):
    """A new Connect session on the module's server for each test."""
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.remote(server).create()
    try:
        yield spark
    finally:
        spark.stop()
        leave_connect_mode()


def regression_frame(spark):
    x, y = regression_arrays(96, features=4, seed=3)
    return spark.createDataFrame([([float(v) for v in row], float(t)) for row, t in zip(x, y)],
                                 "features array<float>, label double")


def test_fit_transform_save_and_load_in_a_new_session(server, tmp_path):
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.remote(server).create()
    try:
        digits = spark.read.parquet(DIGITS)
        train, test = digits.where(F.col("split") == "train"), digits.where(F.col("split") == "test")
        torch.manual_seed(0)
        model = TorchEstimator(model="spark_ddl.networks:MLP", model_kwargs={"in_features": 64, "out_features": 10,
                                                                          "hidden": [64]},
                               loss="cross_entropy", optimizer="adam", lr=0.01, batch_size=32, epochs=5,
                               feature_cols="features", label_col="label", seed=0, timeout=60).fit(train)
        accuracy = model.transform(test).select(F.avg((F.col("prediction") == F.col("label")).cast("double")))
        first = accuracy.first()[0]
        assert first > 0.9
        model.save(str(tmp_path / "model"))
    finally:
        spark.stop()
    fresh = SparkSession.builder.remote(server).create()  # a new client session: nothing of the first one left
    try:
        loaded = TorchModel.load(str(tmp_path / "model"))
        again = loaded.transform(fresh.read.parquet(DIGITS).where(F.col("split") == "test"))
        assert again.select(F.avg((F.col("prediction") == F.col("label")).cast("double"))).first()[0] == first
    finally:
        fresh.stop()
        leave_connect_mode()


def test_a_failing_agent_raises_its_own_error(client):
    estimator = TorchEstimator(model=ExplodingNet(), loss="mse", epochs=1, num_workers=2, timeout=30,
                               check_input=False)
    with pytest.raises(TrainingError) as info:
        estimator.fit(regression_frame(client))
    assert isinstance(info.value, ValueError) and "boom: ExplodingNet.forward" in str(info.value)
    assert "in forward" in info.value.remote_traceback


def test_spark_ddl_run_and_the_pre_launch_check(client):
    assert spark_ddl.run(who_is_there, num_workers=2, timeout=60) == {  # the active session: this client's
        "rank": 0, "world_size": 2, "rank_sum": 1.0, "local_rank": 0, "steps": 0}
    with pytest.raises(ClusterConfigError) as info:
        spark_ddl.run(who_is_there, regression_frame(client), label_col="label", num_workers=3, timeout=60)
    assert str(info.value) == (  # word for word what a classic local[2] session says (test_connect.py compares)
        "num_workers=3 needs 3 barrier task slots at once, but the cluster offers 2 (master=local[2], "
        "spark.task.cpus=1). Lower num_workers to 2 or fewer, or give Spark more cores: e.g. master local[3], "
        "or more executors/spark.executor.cores.")


def test_checkpoints_and_a_new_fit_that_resumes_them(client, tmp_path):
    """The driver's checks of checkpoint_dir run as jobs on the server's side; the agents resume."""
    frame, checkpoints = regression_frame(client), str(tmp_path / "ckpt")

    def estimator(**params) -> TorchEstimator:
        torch.manual_seed(7)
        return TorchEstimator(**{"model": TinyNet(), "loss": "mse", "batch_size": 8, "timeout": 60, "seed": 11,
                                 "checkpoint_dir": checkpoints, **params})

    first = estimator(epochs=1).fit(frame)
    assert list_checkpoints(checkpoints)
    with pytest.raises(ConfigError, match="Pass resume=True"):  # never overwrites another run's checkpoints
        estimator(epochs=2).fit(frame)
    resumed = estimator(epochs=2, resume=True).fit(frame)
    assert resumed.summary["attempts"][0]["resumed_from"].endswith(".pt")
    assert resumed.summary["steps_run_per_rank"] == first.summary["steps_run_per_rank"]  # epoch 2 only
    uninterrupted = estimator(epochs=2, checkpoint_dir=None).fit(frame)  # the same path: the same bits
    left, right = resumed.get_module().state_dict(), uninterrupted.get_module().state_dict()
    assert left.keys() == right.keys() and all(torch.equal(left[n], right[n]) for n in right)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in uninterrupted.history]


def test_without_a_status_channel_progress_comes_at_the_end_and_a_stalled_agent_stops_itself(client, caplog,
                                                                                             tmp_path):
    client.conf.set("spark.ddl.statusHost", "none")  # as when the executors cannot reach this client
    caplog.set_level(logging.INFO, logger="spark_ddl.progress")
    torch.manual_seed(7)
    quiet = TorchEstimator(model=TinyNet(), loss="mse", batch_size=8, epochs=2, timeout=60, progress="log")
    assert len(quiet.fit(regression_frame(client)).history) == 2
    progress = [r.getMessage() for r in caplog.records if r.name == "spark_ddl.progress"]
    assert [line.split(",")[0] for line in progress] == ["epoch 1/2", "epoch 2/2"]  # from rank 0's summary
    assert_a_stalled_agent_stops_itself(regression_frame(client), str(tmp_path / "stalled_at"))


def test_the_command_line_trains_and_scores_through_the_server(server, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("SPARK_CONNECT_MODE_ENABLED", "SPARK_LOCAL_REMOTE")}
    model, scored = tmp_path / "model", tmp_path / "scored.parquet"
    train = subprocess.run([str(SPARK_DDL), "train", "--remote", server, "--output", str(model)],
                           capture_output=True, text=True, timeout=400, env=env)
    assert train.returncode == 0, train.stderr[-3000:]
    accuracy = float(re.search(r"held-out accuracy: ([0-9.]+)", train.stdout).group(1))
    assert accuracy >= 0.95, train.stdout  # as the classic command reaches
    predict = subprocess.run([str(SPARK_DDL), "predict", "--remote", server, "--model", str(model),
                              "--input", DIGITS, "--output", str(scored)],
                             capture_output=True, text=True, timeout=300, env=env)
    assert predict.returncode == 0, predict.stderr[-3000:]
    assert "scored 1797 rows" in predict.stdout
    import pyarrow.parquet as pq

    table = pq.read_table(scored)
    assert table.num_rows == 1797 and "prediction" in table.column_names
