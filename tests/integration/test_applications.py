"""The three applications (images, text, recommender) end to end through spark-submit on
local[2], at small size (their full-size results are in the README, measured by the same
commands)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spark_ddl import TorchModel

REPO = Path(__file__).resolve().parents[2]


def spark_submit(job: str, *args: str) -> subprocess.CompletedProcess:
    import pyspark

    spark_submit = Path(sys.executable).with_name("spark-submit")
    if not spark_submit.exists():
        spark_submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    return subprocess.run(
        [str(spark_submit), "--master", "local[2]", "--conf", "spark.driver.host=127.0.0.1",
         "--conf", "spark.task.cpus=1", str(REPO / "jobs" / f"{job}.py"), *args],
        capture_output=True, text=True, timeout=400, env=env)


@pytest.mark.own_session
@pytest.mark.timeout(900)
def test_the_three_applications_run_through_spark_submit(tmp_path, sessions):
    sessions.stop()  # each spark-submit starts its own JVM
    runs = {
        "images": ["--epochs", "2", "--sample", "0.4"],
        "text": ["--epochs", "2", "--sample", "0.25", "--vocabulary", "2000"],
        "recommender": ["--epochs", "1", "--sample", "0.25"],
    }
    results = {}
    for job, args in runs.items():
        metrics, output = tmp_path / f"{job}.json", tmp_path / job
        proc = spark_submit(job, *args, "--output", str(output), "--metrics-json", str(metrics))
        assert proc.returncode == 0, f"{job}:\n{proc.stderr[-3000:]}"
        results[job] = json.loads(metrics.read_text())
        assert TorchModel.load(str(output)).history  # saved with a class path: loads without pickle
    assert "held-out accuracy" in proc.stdout or "held-out RMSE" in proc.stdout
    assert results["images"]["accuracy"] > 0.5  # ten classes: chance is 0.1
    assert results["text"]["accuracy"] > 0.55  # two classes
    assert results["recommender"]["rmse"] < results["recommender"]["global_mean_rmse"]


@pytest.mark.own_session
@pytest.mark.timeout(400)
def test_stream_recommender_replays_movielens_through_spark_submit(tmp_path, sessions):
    """Two windows of a 20% sample: two versions, window 1 scored by the version trained on
    window 0 before it trains (prequential), a plot."""
    sessions.stop()
    metrics, plot = tmp_path / "stream.json", tmp_path / "stream.png"
    proc = spark_submit("stream_recommender", "--max-windows", "2", "--frozen-after", "1", "--sample", "0.2",
                        "--epochs", "1", "--output", str(tmp_path / "models"), "--work-dir", str(tmp_path / "work"),
                        "--metrics-json", str(metrics), "--plot", str(plot))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Prequential RMSE per window" in proc.stdout
    results = json.loads(metrics.read_text())
    assert [(w["window"], w["version"]) for w in results["windows"]] == [(1, [1])]
    assert [(v["version"], v["batch_id"]) for v in results["versions"]] == [(1, 0), (2, 1)]
    for window in results["windows"]:
        assert 0.5 < window["continuous"] < 2.0 and 0.5 < window["means"] < 2.0
    assert results["windows"][0]["frozen"] == pytest.approx(results["windows"][0]["continuous"])  # both version 1
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert TorchModel.load_latest(str(tmp_path / "models")).summary["stream_version"]["version"] == 2
