"""``--mlflow [TRACKING_URI]`` on every training command and the jobs that wrap them (parsing
only; tests/integration/test_mlflow.py runs train and recommender with it)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMMANDS = ("train", "images", "text", "recommender", "stream_recommender")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_mlflow_with_or_without_a_tracking_uri(command):
    app = importlib.import_module(f"spark_ddl.apps.{command}")
    assert app.parse_args([]).mlflow is None  # off unless asked for
    assert app.parse_args(["--mlflow"]).mlflow == ""  # MLFLOW_TRACKING_URI, else MLflow's default
    assert app.parse_args(["--mlflow", "sqlite:///runs.db"]).mlflow == "sqlite:///runs.db"
    # its job runs the same main (spark-submit jobs/<command>.py --mlflow ...)
    assert f"from spark_ddl.apps.{command} import main" in (REPO / "jobs" / f"{command}.py").read_text()
