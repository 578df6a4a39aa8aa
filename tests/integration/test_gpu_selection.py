"""GPU selection on a cluster whose executors report a (fake) GPU through Spark's resource
discovery. There is no CUDA here, so the agents must see Spark's GPU address, fall back to
CPU for use_gpu=None, and fail clearly for use_gpu=True."""

from __future__ import annotations

import json
import stat

import pyarrow as pa
import pytest

from spark_ddl import ClusterConfigError, TorchEstimator, TrainingError
from tests.helpers import TinyNet, frame_with_partitions, regression_arrays


@pytest.fixture
def fake_gpu_spark(sessions, tmp_path_factory):
    script = tmp_path_factory.mktemp("gpu") / "discover_gpu.sh"
    script.write_text('#!/usr/bin/env bash\necho \'{"name": "gpu", "addresses": ["0"]}\'\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    conf = {
        "spark.executor.memory": "512m",
        "spark.worker.resource.gpu.amount": "1",
        "spark.worker.resource.gpu.discoveryScript": str(script),
        "spark.executor.resource.gpu.amount": "1",
        "spark.executor.resource.gpu.discoveryScript": str(script),
        "spark.task.resource.gpu.amount": "1",
    }
    return sessions.get("fake-gpu", master="local-cluster[2,1,1024]", conf=conf)


def two_partitions(spark):
    x, y = regression_arrays(32)
    return frame_with_partitions(spark, [(x[:16], y[:16]), (x[16:], y[16:])])


def probe_devices(batches):
    from pyspark import BarrierTaskContext

    from spark_ddl.common.devices import select_device, task_gpu_addresses

    context = BarrierTaskContext.get()
    for _ in batches:
        pass
    addresses = task_gpu_addresses(context)
    plan = select_device(None, addresses, False, 0, context.partitionId())
    record = {"rank": context.partitionId(), "addresses": addresses, "device": plan.device}
    yield pa.RecordBatch.from_pydict({"probe": [json.dumps(record)]})


@pytest.mark.own_session
def test_agents_see_the_gpu_spark_assigned_them(fake_gpu_spark):
    rows = two_partitions(fake_gpu_spark).mapInArrow(probe_devices, "probe string", barrier=True).collect()
    probes = sorted((json.loads(r.probe) for r in rows), key=lambda p: p["rank"])
    assert [p["addresses"] for p in probes] == [["0"], ["0"]]  # one fake GPU per executor
    assert [p["device"] for p in probes] == ["cpu", "cpu"]  # no CUDA here: CPU for use_gpu=None


@pytest.mark.own_session
def test_use_gpu_none_trains_on_cpu_and_true_fails_clearly(fake_gpu_spark):
    frame = two_partitions(fake_gpu_spark)
    model = TorchEstimator(model=TinyNet(), loss="mse", epochs=1, use_gpu=None, timeout=60).fit(frame)
    assert model.summary["device"] == "cpu" and model.summary["backend"] == "gloo"
    with pytest.raises(TrainingError) as info:
        TorchEstimator(model=TinyNet(), loss="mse", epochs=1, use_gpu=True, timeout=60).fit(frame)
    assert "use_gpu=True but torch.cuda.is_available() is False" in str(info.value)
    assert "Spark assigned GPU address(es) ['0']" in str(info.value)


@pytest.mark.cluster
def test_use_gpu_without_gpu_resources_names_the_settings(sessions):
    spark = sessions.get("cluster")
    with pytest.raises(ClusterConfigError) as info:
        TorchEstimator(model=TinyNet(), loss="mse", use_gpu=True).fit(two_partitions(spark))
    assert "spark.executor.resource.gpu.amount=1" in str(info.value)
    assert "spark.task.resource.gpu.amount=1" in str(info.value)
