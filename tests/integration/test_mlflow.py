"""MLflow: the spark_ddl flavor and pyfunc against transform, on a real local tracking store
(sqlite in a temporary directory) and a real local Spark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

mlflow = pytest.importorskip("mlflow")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # nothing leaves this machine

from spark_ddl import ConfigError, TorchEstimator, TorchModel  # noqa: E402
from tests.helpers import TinyNet, TwoTower, ratings_frame  # noqa: E402


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """A sqlite tracking store and registry of this module's own, with artifacts beside it."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("spark_ddl_tests")
    yield uri
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def classifier_frame(sessions):
    spark = sessions.get("local")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(120, 4))
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)
    return spark.createDataFrame([(*map(float, r), int(t)) for r, t in zip(x, y)],
                                 "a double, b double, c double, d double, label long")


@pytest.fixture(scope="module")
def classifier(classifier_frame):
    torch.manual_seed(0)
    return TorchEstimator(model=TinyNet(4, 8, 3), loss="cross_entropy", lr=0.1, epochs=3, batch_size=16,
                          num_workers=2, feature_cols=["a", "b", "c", "d"], label_col="label",
                          seed=1).fit(classifier_frame)


def test_logged_classifier_scores_like_transform_through_pyfunc_and_spark_udf(spark, tracking, classifier,
                                                                               classifier_frame):
    from pyspark.sql import functions as F

    import spark_ddl.mlflow as ddl_mlflow

    with mlflow.start_run() as run:
        info = ddl_mlflow.log_model(classifier, "model", registered_model_name="classifier")
    assert info.run_id == run.info.run_id and info.registered_model_version == 1
    assert set(info.flavors) == {"spark_ddl", "python_function"}
    assert info.flavors["spark_ddl"]["task"] == "multiclass"
    signature = info.signature
    assert signature.inputs.input_names() == ["a", "b", "c", "d"]
    assert [t.name for t in signature.inputs.input_types()] == ["double"] * 4
    assert signature.outputs.input_names() == ["prediction", "probability"]

    expected = classifier.transform(classifier_frame).toPandas()
    want_probability = np.stack([v.toArray() for v in expected["probability"]])

    loaded = ddl_mlflow.load_model("models:/classifier/1")
    assert isinstance(loaded, TorchModel)
    for name, tensor in classifier.get_module().state_dict().items():
        assert torch.equal(loaded.get_module().state_dict()[name], tensor), name

    pyfunc = mlflow.pyfunc.load_model(info.model_uri)
    local = pyfunc.predict(expected[["a", "b", "c", "d"]])
    assert list(local.columns) == ["prediction", "probability"]
    np.testing.assert_array_equal(local["prediction"].to_numpy(), expected["prediction"].to_numpy())
    np.testing.assert_allclose(np.stack(local["probability"]), want_probability, rtol=0, atol=1e-6)

    udf = mlflow.pyfunc.spark_udf(spark, f"runs:/{run.info.run_id}/model")
    scored = classifier_frame.withColumn("mlflow", udf(F.struct("a", "b", "c", "d"))).toPandas()
    np.testing.assert_array_equal(scored["mlflow"].map(lambda r: r["prediction"]).to_numpy(),
                                  expected["prediction"].to_numpy())
    np.testing.assert_allclose(np.stack(scored["mlflow"].map(lambda r: np.asarray(r["probability"]))),
                               want_probability, rtol=0, atol=1e-6)


def test_named_id_inputs_score_through_pyfunc_by_registered_version(spark, tracking):
    import spark_ddl.mlflow as ddl_mlflow

    frame = ratings_frame(spark, rows=120)
    torch.manual_seed(0)
    model = TorchEstimator(model=TwoTower(20, 30), inputs={"user": "user", "item": "item"}, label_col="rating",
                           loss="mse", epochs=2, batch_size=16, num_workers=2).fit(frame)
    sample = frame.limit(3).toPandas()[["user", "item"]]
    with mlflow.start_run():
        info = ddl_mlflow.log_model(model, "recs", registered_model_name="recs_mlflow_test", input_example=sample)
    assert info.signature.inputs.input_names() == ["user", "item"]
    assert [t.name for t in info.signature.inputs.input_types()] == ["long", "long"]
    expected = model.transform(frame).toPandas()
    predicted = mlflow.pyfunc.load_model(f"models:/recs_mlflow_test/{info.registered_model_version}").predict(
        expected[["user", "item"]])
    np.testing.assert_allclose(predicted["prediction"].to_numpy(), expected["prediction"].to_numpy(),
                               rtol=1e-6, atol=1e-6)
    assert list(predicted.columns) == ["prediction"]


def test_bad_input_fails_before_anything_is_logged(tracking, classifier_frame, tmp_path):
    from mlflow.exceptions import MlflowException

    import spark_ddl.mlflow as ddl_mlflow

    estimator = TorchEstimator(model=TinyNet(4, 8, 3), loss="cross_entropy", feature_cols=["a", "b", "c", "d"])
    runs_before = len(mlflow.search_runs(search_all_experiments=True))
    with pytest.raises(ConfigError, match="unfitted TorchEstimator.*estimator.fit"):
        ddl_mlflow.log_model(estimator, "model")
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs_before  # no run was started
    assert mlflow.active_run() is None
    with pytest.raises(MlflowException, match="No MLflow model at models:/no_such_model/1"):
        ddl_mlflow.load_model("models:/no_such_model/1")
    from spark_ddl import LatestModel
    from spark_ddl.streaming.fit import StreamingFit
    from spark_ddl.streaming.versions import VersionStore

    stream = StreamingFit(estimator, VersionStore(str(tmp_path / "versions")), 10, None)  # nothing published
    with pytest.raises(ConfigError, match="StreamingFit.*registered_model_name"):
        ddl_mlflow.log_model(stream, "model", registered_model_name="never")
    with pytest.raises(FileNotFoundError, match="No registered model version at models:/no_such_stream@latest"):
        LatestModel("models:/no_such_stream@latest")  # before any job: when it is made
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs_before


def test_without_mlflow_the_import_says_how_to_install_it():
    code = ("import sys; sys.modules['mlflow'] = None\n"
            "try:\n    import spark_ddl.mlflow\nexcept ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ERR spark_ddl.mlflow needs MLflow" in out.stdout and "pip install 'spark_ddl[mlflow]'" in out.stdout, (
        out.stdout + out.stderr)
    # and nothing else in spark_ddl needs it: the package itself imports without MLflow
    code = "import sys; sys.modules['mlflow'] = None\nimport spark_ddl, spark_ddl.ml.model; print('OK')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "OK", out.stderr


# ------------------------------------------------------------------ autolog


def _runs(experiment_name: str = "spark_ddl_tests"):
    return mlflow.search_runs(experiment_names=[experiment_name], output_format="list")


def _regression_estimator(**params) -> TorchEstimator:
    torch.manual_seed(7)
    settings = dict(model=TinyNet(), loss="mse", lr=0.05, batch_size=8, epochs=3, timeout=60, seed=11,
                    num_workers=2)
    settings.update(params)
    return TorchEstimator(**settings)


def _regression_frame(spark):
    from tests.helpers import frame_with_partitions, regression_arrays, split_by_sizes

    return frame_with_partitions(spark, split_by_sizes(*regression_arrays(160, seed=4), (80, 80)))


def test_autolog_logs_settings_and_each_epoch_while_the_fit_runs(spark, tracking, tmp_path):
    import spark_ddl.mlflow as ddl_mlflow
    from tests.helpers import stall_in_epoch_two

    client = mlflow.MlflowClient()
    before = {r.info.run_id for r in _runs()}
    estimator = _regression_estimator(validation_fraction=0.25)
    estimator._fail_hook = stall_in_epoch_two(str(tmp_path / "stalled"), step=1, seconds=4)  # epoch 2 takes 4 s
    ddl_mlflow.autolog()
    try:
        model = estimator.fit(_regression_frame(spark))
    finally:
        ddl_mlflow.autolog(disable=True)
    stall_began_ms = float((tmp_path / "stalled").read_text()) * 1000
    (run,) = [r for r in _runs() if r.info.run_id not in before]
    assert run.info.status == "FINISHED" and mlflow.active_run() is None  # its own run, ended with the fit
    params = run.data.params
    assert params["lr"] == "0.05" and params["epochs"] == "3" and params["batch_size"] == "8"
    assert params["num_workers"] == "2" and params["strategy"] == "allreduce" and params["sync"] == "allreduce"
    assert params["network"] == "tests.helpers.TinyNet" or params["network"].endswith("TinyNet"), params["network"]
    assert params["label_col"] == "label"
    from spark_ddl.common.settings import declared
    from spark_ddl.common.train_config import TrainConfig

    assert set(declared(TrainConfig)) <= set(params)  # every declared setting
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3]
    np.testing.assert_allclose([m.value for m in history], [h["train_loss"] for h in model.history], rtol=1e-6)
    assert {"val_loss", "samples_per_s", "seconds"} <= set(run.data.metrics)
    # epoch 1 reached the driver while epoch 2 was still stalled, not when the fit ended
    assert history[0].timestamp < stall_began_ms + 3000, (history[0].timestamp, stall_began_ms)
    assert run.info.end_time > stall_began_ms + 4000
    summary = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/spark_ddl/summary.json")
    assert summary["history"] == json.loads(json.dumps(model.history))
    assert run.data.tags["spark_ddl.attempts"] == "1"
    plot = mlflow.artifacts.download_artifacts(f"{run.info.artifact_uri}/spark_ddl/history.png", dst_path=str(tmp_path))
    with open(plot, "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(plot) > 5000  # the loss curves

    model_again = _regression_estimator(epochs=1).fit(_regression_frame(spark))  # autolog is off now
    assert model_again.history and {r.info.run_id for r in _runs()} == before | {run.info.run_id}


def test_autolog_logs_into_the_active_run_and_shows_a_retried_attempt(spark, tracking, tmp_path):
    import spark_ddl.mlflow as ddl_mlflow
    from tests.integration.test_fault_tolerance import die_once

    estimator = _regression_estimator(max_retries=1)
    estimator._fail_hook = die_once(str(tmp_path / "killed"))
    ddl_mlflow.autolog(log_models=True)
    try:
        with mlflow.start_run() as active:
            model = estimator.fit(_regression_frame(spark))
            assert mlflow.active_run().info.run_id == active.info.run_id  # still the user's, still open
    finally:
        ddl_mlflow.autolog(disable=True)
    run = mlflow.get_run(active.info.run_id)
    assert [a["attempt"] for a in model.summary["attempts"]] == [1, 2]
    assert "AgentLost" in run.data.tags["spark_ddl.attempt.1.error"]
    assert run.data.tags["spark_ddl.attempts"] == "2"
    assert mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_loss")[-1].step == 3
    logged = ddl_mlflow.load_model(f"runs:/{run.info.run_id}/model")
    for name, tensor in model.get_module().state_dict().items():
        assert torch.equal(logged.get_module().state_dict()[name], tensor), name


def test_a_tracking_server_that_is_down_does_not_fail_or_slow_the_fit(spark, caplog):
    import logging
    import socket

    import spark_ddl.mlflow as ddl_mlflow

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    previous = mlflow.get_tracking_uri()
    frame = _regression_frame(spark)
    _regression_estimator(epochs=1).fit(frame)  # warm: the timing below compares like with like
    started = time.perf_counter()
    _regression_estimator().fit(frame)
    without = time.perf_counter() - started
    mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
    ddl_mlflow.autolog()
    try:
        with caplog.at_level(logging.WARNING, logger="spark_ddl.mlflow"):
            started = time.perf_counter()
            model = _regression_estimator().fit(frame)
            with_down_server = time.perf_counter() - started
    finally:
        ddl_mlflow.autolog(disable=True)
        mlflow.set_tracking_uri(previous)
    assert len(model.history) == 3
    warnings = [r.getMessage() for r in caplog.records if r.name == "spark_ddl.mlflow"]
    assert len(warnings) == 1 and "not reachable" in warnings[0] and str(port) in warnings[0], warnings
    assert with_down_server < without + 5, (with_down_server, without)

    # a server that answers every request with HTTP 500 (MLflow's client would retry each for minutes)
    caplog.clear()
    with _refusing_server() as (url, requests):
        mlflow.set_tracking_uri(url)
        ddl_mlflow.autolog()
        try:
            with caplog.at_level(logging.WARNING, logger="spark_ddl.mlflow"):
                started = time.perf_counter()
                model = _regression_estimator().fit(frame)
                with_refusing_server = time.perf_counter() - started
        finally:
            ddl_mlflow.autolog(disable=True)
            mlflow.set_tracking_uri(previous)
    assert len(model.history) == 3 and requests and all(path == "/health" for path in requests), requests
    warnings = [r.getMessage() for r in caplog.records if r.name == "spark_ddl.mlflow"]
    assert len(warnings) == 1 and "refuses requests: HTTP 500" in warnings[0], warnings
    assert "nothing of it (settings, metrics, summary, plot, model) is logged" in warnings[0]
    assert with_refusing_server < without + 5, (with_refusing_server, without)


class _Refusing:
    """A real HTTP server on a free port that answers 500 to everything (the paths it was asked)."""

    def __enter__(self):
        import http.server
        import threading

        requests = self.requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _refuse(self):
                requests.append(self.path.split("?")[0])
                self.send_response(500)
                self.end_headers()
                self.wfile.write(b"refused")

            do_GET = do_POST = _refuse  # noqa: N815

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}", requests

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _refusing_server() -> _Refusing:
    return _Refusing()


def test_a_deleted_experiment_refuses_the_run_and_the_fit_goes_on(spark, tracking, caplog):
    import logging

    import spark_ddl.mlflow as ddl_mlflow

    client = mlflow.MlflowClient()
    mlflow.set_experiment("doomed")
    client.delete_experiment(client.get_experiment_by_name("doomed").experiment_id)  # after it was chosen
    ddl_mlflow.autolog()
    try:
        with caplog.at_level(logging.WARNING, logger="spark_ddl.mlflow"):
            model = _regression_estimator(epochs=2).fit(_regression_frame(spark))
    finally:
        ddl_mlflow.autolog(disable=True)
        mlflow.set_experiment("spark_ddl_tests")
    assert len(model.history) == 2
    warnings = [r.getMessage() for r in caplog.records if r.name == "spark_ddl.mlflow"]
    assert len(warnings) == 1, warnings
    assert "failed (starting the run: MlflowException" in warnings[0], warnings[0]
    assert "could not be made: starting the run, epoch 1, epoch 2, the summary, the history plot, ending the run" \
        in warnings[0], warnings[0]
    assert ddl_mlflow.last_run_id() is None


# ------------------------------------------------------------------ registry (fit_stream)


def test_fit_stream_registers_each_version_once_and_latest_is_the_newest(spark, tracking, tmp_path, caplog):
    from spark_ddl import LatestModel
    from tests.integration.test_streaming import WAIT, estimator, source, write_files

    client = mlflow.MlflowClient()
    write_files(tmp_path / "in", 3)
    paths = {"model_dir": str(tmp_path / "models"), "checkpoint_location": str(tmp_path / "ckpt")}

    def run():
        stream = estimator().fit_stream(source(spark, tmp_path / "in"), **paths, trigger={"availableNow": True},
                                        registered_model_name="stream_recs")
        assert stream.awaitTermination(WAIT) is True
        return stream

    first = run()
    assert [r["version"] for r in first.versions()] == [1, 2, 3]
    run()  # a restart over the same input: nothing new to train, nothing registered again
    versions = sorted(client.search_model_versions("name = 'stream_recs'"), key=lambda v: int(v.version))
    assert [(v.tags["model_version"], v.tags["batch_id"]) for v in versions] == [("1", "0"), ("2", "1"), ("3", "2")]
    assert client.get_model_version_by_alias("stream_recs", "latest").tags["model_version"] == "3"
    assert all(v.tags["model_dir"] == paths["model_dir"] and v.run_id == versions[0].run_id for v in versions)
    history = client.get_metric_history(versions[0].run_id, "stream_rows")
    assert [(m.step, m.value) for m in history] == [(1, 24), (2, 24), (3, 24)]

    write_files(tmp_path / "more", 1, seed=9)
    os.replace(tmp_path / "more" / "part-000.parquet", tmp_path / "in" / "part-003.parquet")
    run()
    latest = client.get_model_version_by_alias("stream_recs", "latest")
    assert latest.tags["model_version"] == "4" and latest.tags["batch_id"] == "3"
    assert len(client.search_model_versions("name = 'stream_recs'")) == 4

    by_alias = TorchModel.load_latest("models:/stream_recs@latest")
    by_dir = TorchModel.load_latest(paths["model_dir"])
    assert by_alias.summary["stream_version"]["version"] == 4 == by_dir.summary["stream_version"]["version"]
    for name, tensor in by_dir.get_module().state_dict().items():
        assert torch.equal(by_alias.get_module().state_dict()[name], tensor), name
    registered = spark_ddl_mlflow().load_model("models:/stream_recs@latest")  # the registry's own copy
    for name, tensor in by_dir.get_module().state_dict().items():
        assert torch.equal(registered.get_module().state_dict()[name], tensor), name
    frame = spark.read.parquet(str(tmp_path / "in"))
    scored = LatestModel("models:/stream_recs@latest").transform(frame).toPandas()
    assert set(scored["model_version"]) == {4}
    np.testing.assert_allclose(scored["prediction"].to_numpy(),
                               by_dir.transform(frame).toPandas()["prediction"].to_numpy(), rtol=1e-6)
    assert not [r for r in caplog.records if "could not be registered" in r.getMessage()]
    with pytest.raises(FileNotFoundError, match="No registered model version at models:/no_such_stream@latest"):
        TorchModel.load_latest("models:/no_such_stream@latest")


def test_a_stream_registered_later_registers_its_newest_version_when_it_starts(spark, tracking, tmp_path):
    from tests.integration.test_streaming import WAIT, estimator, source, write_files

    write_files(tmp_path / "in", 2)
    paths = {"model_dir": str(tmp_path / "models"), "checkpoint_location": str(tmp_path / "ckpt")}
    unregistered = estimator().fit_stream(source(spark, tmp_path / "in"), **paths, trigger={"availableNow": True})
    assert unregistered.awaitTermination(WAIT) is True
    with pytest.raises(ValueError, match="registered_model_name must be a non-empty name"):
        estimator().fit_stream(source(spark, tmp_path / "in"), **paths, registered_model_name=" ")
    stream = estimator().fit_stream(source(spark, tmp_path / "in"), **paths, trigger={"availableNow": True},
                                    registered_model_name="stream_later")
    assert stream.awaitTermination(WAIT) is True
    (version,) = mlflow.MlflowClient().search_model_versions("name = 'stream_later'")
    assert version.tags["model_version"] == "2" and version.tags["batch_id"] == "1"


def spark_ddl_mlflow():
    import spark_ddl.mlflow

    return spark_ddl.mlflow


# ------------------------------------------------------------------ a real tracking server and model server


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(command: list[str], log_path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(log_path, "wb")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",  # its tools (uvicorn) on PATH
                                 "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]),
                                 **(env or {})})


def _stop(process: subprocess.Popen) -> None:
    import signal

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)  # the server and the workers it started
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(20)


def _wait_http(url: str, process: subprocess.Popen, log_path, seconds: float = 180) -> None:
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds:.0f} s: {log_path.read_text()[-3000:]}")


def test_a_tracking_server_with_sqlite_and_a_model_server_answer_like_transform(spark, tmp_path):
    import json as json_module
    import urllib.request

    import spark_ddl.mlflow as ddl_mlflow

    bin_dir = os.path.dirname(sys.executable)
    port = _free_port()
    server_log = tmp_path / "server.log"
    server = _start([os.path.join(bin_dir, "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                     "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                     "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"], server_log,
                    # no job runner: its store is a tempfile.mkdtemp(dir="/dev/shm") the server never removes
                    env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    serving = None
    previous = mlflow.get_tracking_uri()
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", server, server_log)
        uri = f"http://127.0.0.1:{port}"
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("served")
        frame = ratings_frame(spark, rows=120)
        torch.manual_seed(0)
        ddl_mlflow.autolog(log_models=True)
        try:
            model = TorchEstimator(model=TwoTower(20, 30), inputs={"user": "user", "item": "item"},
                                   label_col="rating", loss="mse", epochs=2, batch_size=16, num_workers=2).fit(frame)
        finally:
            ddl_mlflow.autolog(disable=True)
        (run,) = mlflow.search_runs(experiment_names=["served"], output_format="list")
        assert run.info.status == "FINISHED" and run.data.params["network"].endswith("TwoTower")
        assert [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
        version = mlflow.register_model(f"runs:/{run.info.run_id}/model", "served_recs")

        serve_port = _free_port()
        serving_log = tmp_path / "serving.log"
        serving = _start([os.path.join(bin_dir, "mlflow"), "models", "serve", "-m", "models:/served_recs@latest",
                          "--env-manager", "local", "-h", "127.0.0.1", "-p", str(serve_port)], serving_log,
                         env={"MLFLOW_TRACKING_URI": uri})
        _wait_http(f"http://127.0.0.1:{serve_port}/ping", serving, serving_log)
        expected = model.transform(frame).toPandas()
        pairs = expected[["user", "item"]]
        request = urllib.request.Request(
            f"http://127.0.0.1:{serve_port}/invocations", headers={"Content-Type": "application/json"},
            data=json_module.dumps({"dataframe_split": pairs.to_dict(orient="split", index=False)}).encode())
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json_module.loads(response.read())
        served = np.array([row["prediction"] for row in answer["predictions"]])
        np.testing.assert_allclose(served, expected["prediction"].to_numpy(), rtol=1e-6, atol=1e-6)
        assert version.version == "1"
    finally:
        mlflow.set_tracking_uri(previous)
        if serving is not None:
            _stop(serving)
        _stop(server)
    assert server.returncode is not None and (serving is None or serving.returncode is not None)


def _back_to(tracking: str) -> None:
    """This module's store and experiment again (a command chose its own of both)."""
    mlflow.set_tracking_uri(tracking)
    mlflow.set_experiment("spark_ddl_tests")


def test_train_command_with_mlflow_logs_a_run_with_the_model(spark, tracking, tmp_path, capsys):
    from spark_ddl import cli

    uri = f"sqlite:///{tmp_path}/cli.db"
    try:
        assert cli.main(["train", "--epochs", "2", "--hidden", "16", "--progress", "off", "--output",
                         str(tmp_path / "m"), "--mlflow", uri]) == 0
        out = capsys.readouterr().out
        client = mlflow.MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("spark-ddl train").experiment_id])
    finally:
        _back_to(tracking)
    assert f"MLflow run {run.info.run_id} at {uri}" in out
    assert run.info.status == "FINISHED" and run.data.params["network"] == "spark_ddl.networks:MLP"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    assert 0 < run.data.metrics["test_accuracy"] <= 1
    mlflow.set_tracking_uri(uri)
    try:
        logged = spark_ddl_mlflow().load_model(f"runs:/{run.info.run_id}/model")
    finally:
        _back_to(tracking)
    saved = TorchModel.load(str(tmp_path / "m"))
    for name, tensor in saved.get_module().state_dict().items():
        assert torch.equal(logged.get_module().state_dict()[name], tensor), name


# ------------------------------------------------------------------ autolog: spark_ddl.run, fit_stream, tuning


def _reporting(ctx):
    import time as time_module

    ctx.report(epoch=1, step=10, loss=1.0)
    time_module.sleep(3)  # the first record reaches the driver while the function runs
    ctx.report(epoch=1, step=20, loss=0.5)  # the same epoch again: told apart by its step
    ctx.report(loss=0.25)  # neither: its number (3)
    return ctx.rank


def test_autolog_logs_what_run_reports_with_its_step_while_it_runs(spark, tracking):
    import spark_ddl
    import spark_ddl.mlflow as ddl_mlflow

    client = mlflow.MlflowClient()
    before = {r.info.run_id for r in _runs()}
    ddl_mlflow.autolog()
    try:
        assert spark_ddl.run(_reporting, num_workers=2, timeout=60) == 0
    finally:
        ddl_mlflow.autolog(disable=True)
    (run,) = [r for r in _runs() if r.info.run_id not in before]
    assert run.info.status == "FINISHED" and run.data.tags["spark_ddl.kind"] == "run"
    assert run.data.params["num_workers"] == "2" and run.data.params["network"].endswith("_reporting")
    assert "lr" not in run.data.params  # spark_ddl.run's settings only
    loss = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in loss] == [(3, 0.25), (10, 1.0), (20, 0.5)]
    assert loss[1].timestamp < loss[2].timestamp - 2000, loss  # step 10 arrived before the function ended
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "epoch")] == [(10, 1.0), (20, 1.0)]
    summary = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/spark_ddl/summary.json")
    assert [h["loss"] for h in summary["history"]] == [1.0, 0.5, 0.25]


def test_autolog_logs_each_stream_version_into_one_run_that_ends_with_the_stream(spark, tracking, tmp_path):
    import spark_ddl.mlflow as ddl_mlflow
    from tests.integration.test_streaming import WAIT, estimator, source, wait_until, write_files

    client = mlflow.MlflowClient()
    write_files(tmp_path / "in", 2)
    before = {r.info.run_id for r in _runs()}
    ddl_mlflow.autolog()
    try:
        stream = estimator().fit_stream(source(spark, tmp_path / "in"), model_dir=str(tmp_path / "models"),
                                        checkpoint_location=str(tmp_path / "ckpt"), trigger={"availableNow": True},
                                        registered_model_name="autologged_stream")
        wait_until(lambda: not stream.query.isActive, "the availableNow stream ends by itself", WAIT)
        # nobody called stop() or awaitTermination(): the query's end ends the run
        run_id = client.search_model_versions("name = 'autologged_stream'")[0].run_id
        wait_until(lambda: client.get_run(run_id).info.status == "FINISHED", "the stream's run ends", 60)
    finally:
        ddl_mlflow.autolog(disable=True)
    assert [r.info.run_id for r in _runs() if r.info.run_id not in before] == [run_id]  # no run per micro-batch
    run = client.get_run(run_id)
    assert run.data.tags["spark_ddl.kind"] == "fit_stream" and run.data.params["lr"] == "0.05"
    assert run.data.params["network"].endswith("TinyNet")
    versions = stream.versions()
    for name in ("rows", "train_loss", "seconds", "freshness"):
        history = client.get_metric_history(run_id, f"stream_{name}")  # once each: autolog's, not the registry's
        assert [(m.step, m.value) for m in history] == [(v["version"], pytest.approx(v[name])) for v in versions]
    assert sorted(int(v.tags["model_version"]) for v in client.search_model_versions(
        "name = 'autologged_stream'")) == [1, 2]
    stream.stop()  # after the end: nothing more to do
    assert client.get_run(run_id).info.status == "FINISHED"


def test_inside_a_cross_validator_each_fit_is_a_child_run_of_the_tuning_run(spark, tracking):
    from pyspark.ml.evaluation import RegressionEvaluator
    from pyspark.ml.tuning import CrossValidator, ParamGridBuilder

    import spark_ddl.mlflow as ddl_mlflow

    client = mlflow.MlflowClient()
    before = {r.info.run_id for r in _runs()}
    estimator = _regression_estimator(epochs=1, num_workers=1)
    grid = ParamGridBuilder().addGrid(estimator.lr, [0.01, 0.05]).build()
    tuner = CrossValidator(estimator=estimator, estimatorParamMaps=grid, numFolds=2, seed=3,
                           evaluator=RegressionEvaluator(metricName="rmse", labelCol="label"))
    ddl_mlflow.autolog()
    try:
        tuned = tuner.fit(_regression_frame(spark))
    finally:
        ddl_mlflow.autolog(disable=True)
    new = [r for r in _runs() if r.info.run_id not in before]
    (parent,) = [r for r in new if r.data.tags.get("spark_ddl.kind") == "tuning"]
    children = [r for r in new if r is not parent]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "CrossValidator"
    assert parent.data.params["numFolds"] == "2" and parent.data.params["param_maps"] == "2"
    assert len(children) == 5  # 2 folds x 2 param maps, and the refit of the best
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id and c.info.status == "FINISHED"
               and c.data.tags["spark_ddl.kind"] == "fit" for c in children)
    lrs = sorted(c.data.params["lr"] for c in children)
    assert lrs.count("0.01") >= 2 and lrs.count("0.05") >= 2, lrs
    metrics = client.get_metric_history(parent.info.run_id, "tuning_rmse")
    np.testing.assert_allclose([m.value for m in sorted(metrics, key=lambda m: m.step)], tuned.avgMetrics)
    assert parent.data.metrics["best_rmse"] == pytest.approx(min(tuned.avgMetrics))


def test_the_recommender_job_with_mlflow_logs_its_fit_scores_and_model(spark, tracking, tmp_path, capsys):
    from tests.integration.test_jobs import load_job

    uri = f"sqlite:///{tmp_path}/apps.db"
    try:  # the job spark-submit runs (jobs/recommender.py wraps the app's main)
        assert load_job("recommender").main(["--epochs", "1", "--sample", "0.05", "--output", str(tmp_path / "m"),
                                             "--metrics-json", str(tmp_path / "m.json"), "--mlflow", uri]) == 0
        client = mlflow.MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("spark-ddl recommender").experiment_id])
        mlflow.set_tracking_uri(uri)
        logged = spark_ddl_mlflow().load_model(f"runs:/{run.info.run_id}/model")
    finally:
        _back_to(tracking)
    assert f"MLflow run {run.info.run_id} at {uri}" in capsys.readouterr().out
    results = json.loads((tmp_path / "m.json").read_text())
    assert run.info.status == "FINISHED" and run.data.params["network"] == "spark_ddl.networks:MatrixFactorization"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1]
    assert run.data.metrics["rmse"] == pytest.approx(results["rmse"])
    assert run.data.metrics["baseline_rmse"] == pytest.approx(results["baseline_rmse"])
    saved = TorchModel.load(str(tmp_path / "m"))
    for name, tensor in saved.get_module().state_dict().items():
        assert torch.equal(logged.get_module().state_dict()[name], tensor), name
