"""End to end on a real Spark standalone cluster (master + 2 workers on 127.0.0.1):
spark-submit jobs/train.py with 2 agents, check the saved model, score with jobs/predict.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from spark_ddl import TorchModel
from tests.helpers import REPO

sys.path.insert(0, str(REPO / "jobs"))
import standalone_cluster  # noqa: E402


def spark_submit(master: str, script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable,
               SPARK_LOCAL_IP="127.0.0.1")
    command = [str(standalone_cluster.spark_home() / "bin" / "spark-submit"), "--master", master,
               "--conf", "spark.driver.host=127.0.0.1", "--conf", "spark.executor.cores=1",
               "--conf", "spark.executor.memory=768m", "--conf", "spark.task.cpus=1",
               str(REPO / "jobs" / script), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.own_session
@pytest.mark.timeout(600)
def test_train_and_predict_jobs_on_a_standalone_cluster(tmp_path, sessions):
    sessions.stop()  # the cluster and spark-submit bring their own JVMs
    state = tmp_path / "cluster"
    master = standalone_cluster.start(state, workers=2, cores=1, memory="1g", timeout=120)
    try:
        model_dir, scored = tmp_path / "model", tmp_path / "scored.parquet"
        train = spark_submit(master, "train.py", "--workers", "2", "--epochs", "4", "--hidden", "64",
                             "--output", str(model_dir))
        assert train.returncode == 0, train.stderr[-4000:]
        assert "trained 4 epochs on 2 agents" in train.stdout
        accuracy = float(train.stdout.split("held-out accuracy: ")[1].split()[0])
        assert accuracy > 0.9
        assert (model_dir / "weights.safetensors").exists() and (model_dir / "metadata" / "part-00000").exists()
        assert len(TorchModel.load(str(model_dir)).history) == 4
        predict = spark_submit(master, "predict.py", "--model", str(model_dir),
                               "--input", str(REPO / "data" / "digits.parquet"), "--output", str(scored),
                               "--columns", "id,label")
        assert predict.returncode == 0, predict.stderr[-4000:]
        assert "scored 1797 rows" in predict.stdout
        assert any(Path(scored).glob("part-*.parquet"))
        executor_logs = list((state / "work").rglob("stderr"))
        assert len({p.parent.name for p in executor_logs}) >= 2  # executors really ran on the workers
    finally:
        standalone_cluster.stop(state)
    assert not list(state.glob("*.pid"))
