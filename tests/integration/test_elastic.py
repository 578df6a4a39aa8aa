"""Elastic training (min_workers): an executor lost for good, the fit continues from the newest
checkpoint with the agents there are slots for, grows back when the executor returns, and ends
at the uninterrupted run's weights (the same global batch and sample order throughout)."""

from __future__ import annotations

import os
import time

import pytest
import torch

from spark_ddl import ClusterConfigError, ConfigError, TorchEstimator
from tests.helpers import SparkJobs, TinyNet, regression_arrays, split_by_sizes
from tests.integration.test_fault_tolerance import die_once, estimator, frame
from tests.references import combined_batch_sgd, max_relative_difference

pytestmark = pytest.mark.timeout(300)


def _executor_ids(sc) -> list[str]:
    ids = sc._jsc.sc().getExecutorIds()  # noqa: SLF001 - a Scala Seq
    return [ids.apply(i) for i in range(ids.size())]


def _wait_for_executors(sc, count: int, seconds: float = 90.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if len(_executor_ids(sc)) == count and sc._jsc.sc().maxNumConcurrentTasks(  # noqa: SLF001
                sc._jsc.sc().resourceProfileManager().defaultResourceProfile()) == count:  # noqa: SLF001
            return
        time.sleep(0.25)
    raise AssertionError(f"expected {count} executors, have {_executor_ids(sc)}")


@pytest.mark.cluster
def test_an_executor_lost_for_good_shrinks_the_fit_and_its_return_grows_it_back_to_the_same_weights(
        sessions, tmp_path):
    spark = sessions.get("cluster")
    sc = spark.sparkContext
    _wait_for_executors(sc, 2)
    reference = estimator().fit(frame(spark))  # 2 agents, 3 epochs of 10 steps, uninterrupted

    def take_and_give_back(attempt: int, context) -> None:
        if attempt == 2:  # the machine is gone for good: its executor is killed and not replaced
            assert context._jsc.sc().killExecutor(_executor_ids(context)[-1])  # noqa: SLF001
            _wait_for_executors(context, 1)
        elif attempt == 3:  # ... and comes back
            jvm = context._jvm  # noqa: SLF001
            no_locality = jvm.org.apache.spark.api.python.PythonUtils.toScalaMap(jvm.java.util.HashMap())
            assert context._jsc.sc().requestTotalExecutors(2, 0, no_locality)  # noqa: SLF001
            _wait_for_executors(context, 2)

    elastic = estimator(checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=1, max_retries=1, min_workers=1)
    elastic._fail_hook = die_once(str(tmp_path / "killed"))  # rank 1 dies in epoch 2 (first attempt only)
    elastic._attempt_hook = take_and_give_back
    model = elastic.fit(frame(spark))

    assert os.path.exists(tmp_path / "killed")
    attempts = model.summary["attempts"]
    assert [a["agents"] for a in attempts] == [2, 1, 2]
    assert "AgentLost" in attempts[0]["error"]
    assert attempts[1]["resized"] == [2, 1] and attempts[1]["resumed_from"].endswith("u000000010.pt")
    assert attempts[1]["paused_after_epoch"] == 2  # one agent ran epoch 2 on both shards, then checked for slots
    assert attempts[2]["resized"] == [1, 2] and attempts[2]["resumed_from"].endswith("u000000020.pt")
    assert model.summary["world_size"] == 2 and model.summary["steps_run_per_rank"] == [10, 10]
    assert [h["samples"] for h in model.history] == [160, 160, 160]
    for name, value in reference.get_module().state_dict().items():
        torch.testing.assert_close(model.get_module().state_dict()[name], value, rtol=1e-5, atol=1e-5, msg=name)
    for ours, theirs in zip(model.history, reference.history):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)


@pytest.mark.cluster
def test_parameter_server_continues_on_fewer_agents_and_grows_back_to_the_same_weights(sessions, tmp_path):
    """docs/fault_tolerance.md: elastic continuation with sync="parameter_server" too. The executor is gone before
    the fit starts: one agent runs epoch 1 over both shards (rank 0 is then the server of one),
    the executor returns, two agents run epoch 2 — the weights of plain torch on the combined
    batches (SGD with momentum, shards in order), which the uninterrupted 2-agent run equals."""
    spark = sessions.get("cluster")
    sc = spark.sparkContext
    _wait_for_executors(sc, 2)
    torch.manual_seed(7)  # what estimator() builds
    reference = combined_batch_sgd(TinyNet(), split_by_sizes(*regression_arrays(160, seed=4), [80, 80]),
                                   batch_size=8, epochs=2, lr=0.05, momentum=0.9)

    def take_then_give_back(attempt: int, context) -> None:
        if attempt == 1:
            assert context._jsc.sc().killExecutor(_executor_ids(context)[-1])  # noqa: SLF001
            _wait_for_executors(context, 1)
        elif attempt == 2:
            jvm = context._jvm  # noqa: SLF001
            no_locality = jvm.org.apache.spark.api.python.PythonUtils.toScalaMap(jvm.java.util.HashMap())
            assert context._jsc.sc().requestTotalExecutors(2, 0, no_locality)  # noqa: SLF001
            _wait_for_executors(context, 2)

    elastic = estimator(sync="parameter_server", epochs=2, shuffle=False, checkpoint_dir=str(tmp_path / "ckpt"),
                        checkpoint_every=1, max_retries=1, min_workers=1)
    elastic._attempt_hook = take_then_give_back
    model = elastic.fit(frame(spark))

    attempts = model.summary["attempts"]
    assert [a["agents"] for a in attempts] == [1, 2] and attempts[0]["resized"] == [2, 1]
    assert attempts[0]["paused_after_epoch"] == 1 and attempts[1]["resized"] == [1, 2]
    assert attempts[1]["resumed_from"].endswith("u000000010.pt")
    assert model.summary["world_size"] == 2 and [h["samples"] for h in model.history] == [160, 160]
    assert max_relative_difference(model.get_module(), reference) <= 1e-5


@pytest.mark.parametrize("settings, message", [
    (dict(min_workers=3), "above num_workers"),
    (dict(min_workers=1), "needs sync in"),  # no checkpoint_dir, no retries
    (dict(min_workers=1, sync="local_sgd", checkpoint_dir="/tmp/x", max_retries=1), "needs sync in"),
])
def test_elastic_settings_are_checked(settings, message):
    with pytest.raises(ConfigError, match=message):
        TorchEstimator(model=TinyNet(), **settings).train_config()


@pytest.mark.timeout(120)  # a fit that (wrongly) waited for the slots would hang here
def test_fewer_slots_than_min_workers_is_refused_before_any_job_naming_min_workers(spark, tmp_path):
    """local[2] has 2 barrier slots: min_workers=3 (of 4) cannot start, and says so before launch."""
    elastic = estimator(num_workers=4, min_workers=3, checkpoint_dir=str(tmp_path / "ckpt"), max_retries=1)
    with SparkJobs(spark) as jobs, pytest.raises(ClusterConfigError) as info:
        elastic.fit(frame(spark))
    assert "min_workers=3 needs 3 barrier task slots" in str(info.value) and "offers 2" in str(info.value)
    assert jobs.count == 0
