"""The spark-ddl console script: subcommands, --help, --config files with flags overriding them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spark_ddl import TorchModel, cli

SPARK_DDL = Path(sys.executable).with_name("spark-ddl")


@pytest.mark.parametrize("args, expected", [
    (["--help"], ["train", "predict", "bench", "stream-recommender"]),
    (["train", "--help"], ["--data", "--epochs", "--workers", "--config", "--master", "--plot", "--checkpoint-dir",
                          "--mlflow"]),
    (["predict", "--help"], ["--model", "--input", "--output", "--config"]),
    (["bench", "--help"], ["launch", "inference", "strategies"]),
    (["bench", "strategies", "--help"], ["--epochs", "--straggler-ms", "--json", "--config"]),
    (["bench", "streaming", "--help"], ["--rows", "--trigger-seconds", "--freshness-files", "--json"]),
    (["bench", "scale", "--help"], ["--agents", "--sizes", "--batch-size", "--json"]),
    (["bench", "network", "--help"], ["--rates", "--strategies", "--agents-per-machine", "--prefix", "--json"]),
    (["stream-recommender", "--help"], ["--weeks", "--frozen-after", "--work-dir", "--plot", "--config",
                                        "--mlflow", "--registered-model-name"]),
])
def test_help_of_every_command(args, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    for word in expected:
        assert word in printed, word


def test_the_console_script_is_installed_and_runs():
    """One run of the installed entry point (each command's help is checked in-process above)."""
    assert SPARK_DDL.exists(), "the console script is declared in setup.py and installed by pip"
    out = subprocess.run([str(SPARK_DDL), "train", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--epochs" in out.stdout and "--mlflow" in out.stdout


def test_config_file_with_flags_overriding_it(spark, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("epochs: 7\nhidden: '16'\nprogress: 'off'\nvalidation-fraction: 0\n")
    metrics = tmp_path / "metrics.json"
    assert cli.main(["train", "--config", str(config), "--epochs", "2", "--output", str(tmp_path / "m"),
                     "--metrics-json", str(metrics)]) == 0
    assert len(json.loads(metrics.read_text())["history"]) == 2  # the flag wins over the file's 7
    assert TorchModel.load(str(tmp_path / "m")).get_module()[0].out_features == 16  # from the file


def test_config_file_errors_name_the_problem(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"epochs": 2, "learning_rate": 0.1}))
    with pytest.raises(SystemExit):
        cli.main(["train", "--config", str(bad)])
    assert "unknown option(s) ['learning_rate']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["predict", "--input", "x.parquet", "--output", "y"])
    assert "missing required option(s): --model" in capsys.readouterr().err


def test_benchmark_suite_runs_every_part_and_writes_json(spark, tmp_path):
    """A smoke run on tiny data (no timing is asserted: the numbers are the benchmark's job)."""
    out = tmp_path / "suite.json"
    assert cli.main(["bench", "suite", "--rows", "4000", "--hidden", "32", "--repeats", "1", "--epochs", "2",
                     "--batch-sizes", "64", "--batch-size", "64", "--skip-distributor",
                     "--skip-connect",  # Connect rows stop this process's session
                     "--disk-budget-mb", "2", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert {r["part"] for r in results} == {"launch", "throughput", "ingest", "inference", "memory"}
    assert all(r["value"] > 0 for r in results if r["unit"] != "MB")
    assert any("on disk" in r["what"] for r in results)

