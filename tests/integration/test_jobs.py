"""jobs/train.py and jobs/predict.py in-process (embedded session); spark-submit runs them on a
standalone cluster in test_standalone_cluster.py."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from pyspark.ml.linalg import VectorUDT

from spark_ddl import TorchModel

REPO = Path(__file__).resolve().parents[2]


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_main_job_reaches_95_percent_on_held_out_digits(spark, tmp_path, capsys):
    metrics = tmp_path / "metrics.json"
    output = tmp_path / "digits_model"
    assert load_job("train").main(["--output", str(output), "--metrics-json", str(metrics)]) == 0
    result = json.loads(metrics.read_text())
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed and "train_loss" in printed
    assert result["test_rows"] == 359
    assert result["accuracy"] >= 0.95, result
    assert len(result["history"]) == 15
    model = TorchModel.load(str(output))  # class-path architecture: no pickle needed
    assert model.get_module()[0].in_features == 64


def test_train_job_help_lists_its_options():
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for option in ("--data", "--feature-cols", "--label-col", "--hidden", "--epochs", "--workers", "--output"):
        assert option in out.stdout


def test_predict_job_scores_parquet_with_a_saved_model(spark, tmp_path, capsys):
    model_dir = tmp_path / "model"
    assert load_job("train").main(["--epochs", "4", "--output", str(model_dir)]) == 0
    output = tmp_path / "scored.parquet"
    assert load_job("predict").main(["--model", str(model_dir), "--input", str(REPO / "data" / "digits.parquet"),
                                     "--output", str(output), "--columns", "id,label,split"]) == 0
    scored = spark.read.parquet(str(output))
    assert scored.columns == ["id", "label", "split", "prediction", "probability"]
    assert scored.count() == 1797
    # the probabilities leave the scoring UDF as ML vectors and survive a Parquet round trip
    assert isinstance(scored.schema["probability"].dataType, VectorUDT)
    first = scored.orderBy("id").first()
    assert len(first.probability) == 10 and abs(sum(first.probability) - 1.0) < 1e-6  # float32 softmax
    assert int(first.probability.argmax()) == int(first.prediction)
    accuracy = scored.filter("split = 'test'").selectExpr("avg(cast(prediction = label as double))").first()[0]
    assert accuracy > 0.9
    assert "scored 1797 rows" in capsys.readouterr().out
    with pytest.raises(Exception, match="already exists"):  # no silent clobbering of outputs
        load_job("predict").main(["--model", str(model_dir), "--input", str(REPO / "data" / "digits.parquet"),
                                  "--output", str(output)])
