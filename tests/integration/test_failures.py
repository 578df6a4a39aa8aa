"""A failing agent shows its own error on the driver, promptly; the session stays usable."""

from __future__ import annotations

import time

import numpy as np
import pytest

from spark_ddl import TorchEstimator, TrainingError
from tests.helpers import ExplodingNet, TinyNet, frame_with_partitions, regression_arrays


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
