"""Checkpoints, retry with exact resume, and resuming an interrupted run."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from spark_ddl import ConfigError, TorchEstimator, TrainingError
from spark_ddl.driver.monitor import StallError
from spark_ddl.formats.checkpoint import list_checkpoints, read_checkpoint
from tests.helpers import TinyNet, frame_with_partitions, regression_arrays, split_by_sizes, stall_in_epoch_two
from tests.tamper import Payload, torch_saved

pytestmark = pytest.mark.timeout(300)


def die_once(marker: str, rank_to_kill: int = 1):
    """Hard exit (no Python error, like a lost executor) in epoch 2, first attempt only."""

    def hook(rank: int, epoch: int, step: int, module) -> None:
        if rank == rank_to_kill and epoch == 1 and step == 5 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(3)

    return hook


def frame(spark, sizes=(80, 80)):
    return frame_with_partitions(spark, split_by_sizes(*regression_arrays(sum(sizes), seed=4), sizes))


def estimator(**params) -> TorchEstimator:
    torch.manual_seed(7)
    settings = dict(model=TinyNet(), loss="mse", optimizer="sgd", lr=0.05, optimizer_kwargs={"momentum": 0.9},
                    batch_size=8, epochs=3, timeout=60, seed=11)  # shuffled every epoch
    settings.update(params)
    return TorchEstimator(**settings)


def assert_same_weights(a, b) -> None:
    left, right = a.get_module().state_dict(), b.get_module().state_dict()
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


# 80 rows per agent, batch 8: 10 steps an epoch, 30 in all; the agent dies before step 6 of
# epoch 2, after 15 updates, and the fit resumes from the newest checkpoint: mid-epoch (u15;
# for local_sgd, averaging every 4 updates, also mid-period) or at the end of epoch 1 (u10).
# It must run only the remaining steps and end with the uninterrupted run's bits. allreduce on
# both masters (local[2]: the lost Python worker shares its executor JVM with the survivor); the
# other strategies on local-cluster only, where a lost executor is its own JVM (each kill costs a
# fresh Python worker's torch import, ~5 s: a local[2] repeat would test the same retry again).
def test_killed_agent_is_retried_and_resumes_exactly(any_spark, tmp_path):
    _killed_and_resumed(any_spark, tmp_path, "allreduce", "3 steps", 1, 15)


@pytest.mark.parametrize("sync, every, killed_rank, resumed_at", [
    pytest.param("parameter_server", 1, 0, 10, id="parameter_server-epoch-boundary"),
    pytest.param("local_sgd", "5 steps", 0, 15, id="local_sgd-mid-epoch"),
])
def test_killed_agent_of_each_strategy_is_retried_and_resumes_exactly(cluster_spark, tmp_path, sync, every,
                                                                       killed_rank, resumed_at):
    _killed_and_resumed(cluster_spark, tmp_path, sync, every, killed_rank, resumed_at)


def _killed_and_resumed(spark, tmp_path, sync: str, every, killed_rank: int, resumed_at: int) -> None:
    reference = estimator(sync=sync, sync_every=4).fit(frame(spark))
    resilient = estimator(sync=sync, sync_every=4, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=every,
                          max_retries=2)
    resilient._fail_hook = die_once(str(tmp_path / "killed"), rank_to_kill=killed_rank)
    model = resilient.fit(frame(spark))
    assert os.path.exists(tmp_path / "killed")  # the agent really died once
    attempts = model.summary["attempts"]
    assert [a["attempt"] for a in attempts] == [1, 2]
    assert attempts[0]["rank"] == killed_rank and "AgentLost: " in attempts[0]["error"] and attempts[0]["retriable"]
    assert attempts[1]["resumed_from"].endswith(f"checkpoint-u{resumed_at:09d}.pt") and attempts[1]["error"] is None
    assert model.summary["steps_run_per_rank"] == [30 - resumed_at] * 2  # only the rest: not a restart
    assert_same_weights(model, reference)  # exactly, on CPU
    assert [h["train_loss"] for h in model.history] == [h["train_loss"] for h in reference.history]
    assert len(list_checkpoints(str(tmp_path / "ckpt"))) == 2  # keep_checkpoints


def test_a_new_fit_with_resume_continues_an_interrupted_run(spark, tmp_path):
    data, checkpoints = frame(spark), str(tmp_path / "ckpt")
    reference = estimator(epochs=4).fit(data)
    interrupted = estimator(epochs=4, checkpoint_dir=checkpoints)  # max_retries=0: the fit fails
    interrupted._fail_hook = die_once(str(tmp_path / "killed"))
    with pytest.raises(TrainingError, match="was lost") as info:
        interrupted.fit(data)
    assert info.value.retriable and len(info.value.attempts) == 1
    assert read_checkpoint(f"{checkpoints}/{list_checkpoints(checkpoints)[-1]}")["epoch"] == 1
    with pytest.raises(ConfigError, match="Pass resume=True"):  # never overwrite another run's checkpoints
        estimator(epochs=4, checkpoint_dir=checkpoints).fit(data)
    with pytest.raises(ConfigError, match="batch_size: checkpoint 8, this fit 16"):
        estimator(epochs=4, checkpoint_dir=checkpoints, resume=True, batch_size=16).fit(data)
    resumed = estimator(epochs=4, checkpoint_dir=checkpoints, resume=True).fit(data)
    assert resumed.summary["attempts"][0]["resumed_from"].endswith("checkpoint-u000000010.pt")
    assert resumed.summary["steps_run_per_rank"] == [30, 30]  # epochs 2-4 only
    assert_same_weights(resumed, reference)


def test_a_pickle_planted_in_a_checkpoint_is_refused_by_the_resuming_agent(spark, tmp_path):
    """A checkpoint replaced by a pickle payload beside a matching sidecar: the driver's check
    passes, rank 0 reads the file with weights_only=True, the fit fails and the payload never runs."""
    checkpoints, marker = tmp_path / "ckpt", tmp_path / "pwned"
    checkpoints.mkdir()
    resuming = estimator(checkpoint_dir=str(checkpoints), resume=True)
    facts = {"settings": resuming.train_config().resume_record(), "epoch": 1, "step": 0, "shard_sizes": [80, 80]}
    (checkpoints / "checkpoint-u000000010.json").write_text(json.dumps(facts, default=str))
    (checkpoints / "checkpoint-u000000010.pt").write_bytes(torch_saved({"format": 1, "model": Payload(marker)}))
    with pytest.raises(TrainingError) as info:
        resuming.fit(frame(spark))
    assert info.value.rank == 0 and info.value.remote_type == "UnpicklingError", info.value
    assert not info.value.retriable and not marker.exists()


def test_a_python_error_is_not_retried(spark, tmp_path):
    def raise_in_epoch_two(rank, epoch, step, module):
        if rank == 1 and epoch == 1:
            raise KeyError("deterministic bug")

    failing = estimator(checkpoint_dir=str(tmp_path / "c"), max_retries=3)
    failing._fail_hook = raise_in_epoch_two
    with pytest.raises(TrainingError, match="deterministic bug") as info:
        failing.fit(frame(spark))
    assert not info.value.retriable and len(info.value.attempts) == 1


@pytest.mark.parametrize("settings, message", [
    ({"checkpoint_every": "3 hours"}, "checkpoint_every must be"),
    ({"resume": True}, "resume=True needs checkpoint_dir"),
    ({"checkpoint_dir": "/tmp/x", "sync": "async"}, "sync='async' is not reproducible"),
    ({"max_retries": -1}, "max_retries must be >= 0"),
    ({"stall_timeout": 0}, "stall_timeout must be a positive number"),
])
def test_fault_tolerance_settings_are_checked(settings, message):
    with pytest.raises(ConfigError, match=message):
        TorchEstimator(model=TinyNet(), **settings).train_config()


def test_a_stalled_agent_fails_the_fit_within_stall_timeout_naming_it(spark, tmp_path):
    data, marker = frame(spark), tmp_path / "stalled_at"
    stalling = estimator(stall_timeout=4)
    stalling._fail_hook = stall_in_epoch_two(str(marker), step=2, seconds=3600)
    with pytest.raises(StallError) as info:
        stalling.fit(data)
    stalled_for = time.time() - float(marker.read_text())
    # not before stall_timeout (less the moment between the status and the marker), and through
    # the stall detector, well before the 60 s collective timeout
    assert 4 - 0.5 <= stalled_for < 30, stalled_for
    error = info.value
    assert error.rank == 1 and error.retriable
    assert "rank 1: epoch 2, step 3: forward pass (model code)" in str(error)
    assert "rank 0: epoch 2, step 3: backward pass and gradient synchronisation" in str(error)
    # the session recovers at once (fresh Python workers replace the cancelled ones; their first
    # model build can take seconds on a loaded machine, so no tight stall_timeout here)
    model = estimator(stall_timeout=120).fit(data)
    assert len(model.history) == 3
