"""The three applications (images, text, recommender) and the streaming recommender end to end
on local[2], at small size (their full-size results are in docs/applications.md and
docs/streaming.md, measured by the same commands). They run in this process through their jobs' ``main`` on the suite's session: the same
code spark-submit runs (``jobs/<name>.py`` imports the app's ``main``), without a JVM and a Python
start per application; spark-submit itself is proven by ``test_jobs.py``'s run of the main job."""

from __future__ import annotations

import json

import pytest

from spark_ddl import TorchModel
from tests.integration.test_jobs import load_job


@pytest.mark.timeout(900)
def test_the_three_applications_run_from_their_jobs(spark, tmp_path, capsys):
    runs = {
        "images": ["--epochs", "2", "--sample", "0.4", "--skip-baselines"],  # (the baselines' own models: minutes)
        "text": ["--epochs", "2", "--sample", "0.25", "--vocabulary", "2000", "--skip-baselines"],
        "recommender": ["--epochs", "1", "--sample", "0.25"],
    }
    results = {}
    for job, args in runs.items():
        metrics, output = tmp_path / f"{job}.json", tmp_path / job
        assert load_job(job).main([*args, "--output", str(output), "--metrics-json", str(metrics)]) == 0
        results[job] = json.loads(metrics.read_text())
        assert TorchModel.load(str(output)).history  # saved with a class path: loads without pickle
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed and "held-out RMSE" in printed
    assert results["images"]["accuracy"] > 0.5  # ten classes: chance is 0.1
    assert results["text"]["accuracy"] > 0.55  # two classes
    assert results["recommender"]["rmse"] < results["recommender"]["global_mean_rmse"]


@pytest.mark.timeout(400)
def test_stream_recommender_replays_movielens(spark, tmp_path, capsys):
    """Two windows of a 20% sample: two versions, window 1 scored by the version trained on
    window 0 before it trains (prequential), a plot."""
    metrics, plot = tmp_path / "stream.json", tmp_path / "stream.png"
    code = load_job("stream_recommender").main([
        "--max-windows", "2", "--frozen-after", "1", "--sample", "0.2", "--epochs", "1",
        "--output", str(tmp_path / "models"), "--work-dir", str(tmp_path / "work"),
        "--metrics-json", str(metrics), "--plot", str(plot)])
    assert code == 0
    assert "Prequential RMSE per window" in capsys.readouterr().out
    results = json.loads(metrics.read_text())
    assert [(w["window"], w["version"]) for w in results["windows"]] == [(1, [1])]
    assert [(v["version"], v["batch_id"]) for v in results["versions"]] == [(1, 0), (2, 1)]
    for window in results["windows"]:
        assert 0.5 < window["continuous"] < 2.0 and 0.5 < window["means"] < 2.0
    assert results["windows"][0]["frozen"] == pytest.approx(results["windows"][0]["continuous"])  # both version 1
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert TorchModel.load_latest(str(tmp_path / "models")).summary["stream_version"]["version"] == 2
