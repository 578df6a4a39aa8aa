"""A failing agent shows its own error on the driver, promptly; the session stays usable."""

from __future__ import annotations

import time

import numpy as np
import pytest

from spark_ddl import ConfigError, NonFiniteLossError, TorchEstimator, TrainingError
from tests.helpers import ExplodingNet, SparkJobs, TinyNet, frame_with_partitions, regression_arrays


def two_partitions(spark, rows=64):
    x, y = regression_arrays(rows)
    half = rows // 2
    return frame_with_partitions(spark, [(x[:half], y[:half]), (x[half:], y[half:])])


def fail_on_rank_one(rank: int, epoch: int, step: int, module) -> None:
    if rank == 1 and epoch == 1 and step == 2:
        raise KeyError("rank one lost its key at epoch 2, step 3")


def test_forward_error_reaches_driver_with_its_type_and_message(any_spark):
    estimator = TorchEstimator(model=ExplodingNet(), loss="mse", epochs=1, num_workers=2, timeout=300,
                               check_input=False)  # the driver's forward check would catch it first
    started = time.monotonic()
    with pytest.raises(TrainingError) as info:
        estimator.fit(two_partitions(any_spark))
    assert time.monotonic() - started < 100  # the peer stopped at once, not through the 300 s timeout
    error = info.value
    assert isinstance(error, ValueError)  # the worker's exception type, usable in `except`
    assert error.remote_type == "ValueError"
    assert "boom: ExplodingNet.forward refuses to run" in str(error)
    assert "in forward" in error.remote_traceback  # the worker's own traceback


def test_root_cause_on_one_rank_wins_over_its_peers_broken_collective(spark):
    estimator = TorchEstimator(model=TinyNet(), loss="mse", batch_size=4, epochs=3, num_workers=2,
                               timeout=30)
    estimator._fail_hook = fail_on_rank_one
    with pytest.raises(TrainingError) as info:
        estimator.fit(two_partitions(spark))
    assert info.value.rank == 1
    assert info.value.remote_type == "KeyError"
    assert "rank one lost its key at epoch 2, step 3" in str(info.value)


def test_session_is_usable_after_a_failure(spark):
    with pytest.raises(TrainingError):
        TorchEstimator(model=ExplodingNet(), loss="mse", epochs=1, timeout=30,
                       check_input=False).fit(two_partitions(spark))
    model = TorchEstimator(model=TinyNet(), loss="mse", epochs=2, timeout=30).fit(two_partitions(spark))
    assert len(model.history) == 2 and np.isfinite(model.history[-1]["train_loss"])


def test_a_diverging_run_fails_with_non_finite_loss_error_naming_where_not_a_replica_divergence(spark):
    """lr=1e30: the loss overflows in the step after the first update; before, the final replica
    check blamed the synchronisation (NaN != NaN)."""
    estimator = TorchEstimator(model=TinyNet(), loss="mse", batch_size=8, epochs=3, lr=1e30, timeout=60)
    started = time.monotonic()
    with pytest.raises(NonFiniteLossError) as info:
        estimator.fit(two_partitions(spark))
    assert time.monotonic() - started < 50  # the step it happened, not through a timeout
    error = info.value
    assert isinstance(error, TrainingError) and not error.retriable
    assert (error.epoch, error.step) == (1, 2) and error.ranks and error.rank == error.ranks[0]
    assert "non-finite loss at epoch 1, step 2" in str(error) and "(lr=1e+30)" in str(error)
    assert "grad_clip_norm" in str(error) and "not a synchronisation fault" in str(error)


def test_a_checkpoint_dir_the_driver_cannot_create_is_refused_before_any_job(spark, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    estimator = TorchEstimator(model=TinyNet(), loss="mse", epochs=1, checkpoint_dir=str(blocker / "ckpt"))
    data = two_partitions(spark)
    with SparkJobs(spark) as jobs, pytest.raises(ConfigError) as info:
        estimator.fit(data)
    assert jobs.count == 0
    assert f"checkpoint_dir {blocker / 'ckpt'} cannot be created or written from the driver" in str(info.value)
