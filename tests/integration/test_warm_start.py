"""Warm start: ``fit(initial_model=m)`` continues m's weights and its optimiser state, so one
epoch after a one-epoch fit equals a two-epoch fit (Adam's moments and step count continue)."""

from __future__ import annotations

import pytest
import torch

from spark_ddl import ConfigError, TorchEstimator, TorchModel
from tests.helpers import SparkJobs, TinyNet, frame_with_partitions, regression_arrays, split_by_sizes

pytestmark = pytest.mark.timeout(300)


def estimator(**params) -> TorchEstimator:
    torch.manual_seed(3)
    settings = dict(model=TinyNet(), loss="mse", optimizer="adam", lr=0.01, batch_size=8, epochs=1, shuffle=False,
                    timeout=60, progress="off")
    settings.update(params)
    return TorchEstimator(**settings)


def max_difference(a: TorchModel, b: TorchModel) -> float:
    left, right = a.get_module().state_dict(), b.get_module().state_dict()
    assert left.keys() == right.keys()
    return max(float((left[k] - right[k]).abs().max()) for k in left)


def test_a_warm_started_epoch_continues_the_optimiser(spark, tmp_path):
    data = frame_with_partitions(spark, split_by_sizes(*regression_arrays(48, seed=5), (24, 24)))
    two_epochs = estimator(epochs=2).fit(data)
    first = estimator().fit(data)
    assert set(first.optimizer_state_dict()["state"]) == set(range(4))  # Adam's moments of 4 tensors
    warm = estimator(initial_model=first).fit(data)
    assert max_difference(warm, two_epochs) <= 1e-6
    assert warm.summary["warm_start"] == {"from": "TorchModel", "optimizer_state": True, "note": "carried"}

    first.save(str(tmp_path / "first"))  # the optimiser state is saved with the model
    from_path = estimator(initial_model=str(tmp_path / "first")).fit(data)
    assert max_difference(from_path, warm) == 0.0
    assert TorchModel.load(str(tmp_path / "first")).optimizer_state == first.optimizer_state

    weights_only = first.copy()  # control: without the optimiser state the result differs
    weights_only.optimizer_state = None
    fresh_optimiser = estimator(initial_model=weights_only).fit(data)
    assert fresh_optimiser.summary["warm_start"]["optimizer_state"] is False
    assert max_difference(fresh_optimiser, two_epochs) > 1e-4


def test_an_initial_model_that_does_not_fit_is_refused_before_any_job(spark, tmp_path):
    data = frame_with_partitions(spark, split_by_sizes(*regression_arrays(16, seed=5), (8, 8)))
    other = TorchModel(TinyNet(hidden=16))
    with SparkJobs(spark) as jobs:
        with pytest.raises(ConfigError, match="does not fit the estimator's model.*same architecture"):
            estimator(initial_model=other).fit(data)
        with pytest.raises(ConfigError, match="is not a saved spark_ddl model"):
            estimator(initial_model=str(tmp_path / "nothing")).fit(data)
    assert jobs.count == 0


def test_a_saved_model_whose_weights_do_not_match_their_checksum_is_refused(spark, tmp_path):
    """One byte of the saved weights changed (the file still parses): TorchModel.load and a warm
    start from the path refuse it, naming the file; the untouched copy loads."""
    torch.manual_seed(3)
    TorchModel(TinyNet()).save(str(tmp_path / "m"))
    weights = tmp_path / "m" / "weights.safetensors"
    original = weights.read_bytes()
    assert TorchModel.load(str(tmp_path / "m"), module=TinyNet()) is not None  # control: as saved, it loads
    tampered = bytearray(original)
    tampered[-1] ^= 0x40  # the last tensor's last byte
    weights.write_bytes(bytes(tampered))
    with pytest.raises(ValueError, match="weights.safetensors does not match the checksum in its metadata"):
        TorchModel.load(str(tmp_path / "m"), module=TinyNet())
    data = frame_with_partitions(spark, split_by_sizes(*regression_arrays(16, seed=5), (8, 8)))
    with SparkJobs(spark) as jobs:
        with pytest.raises(ConfigError, match="does not match the checksum in its metadata"):
            estimator(initial_model=str(tmp_path / "m")).fit(data)
    assert jobs.count == 0
