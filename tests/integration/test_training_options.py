"""Validation sets, early stopping decided for all ranks together, learning-rate schedulers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spark_ddl import ConfigError, SchemaError, TorchEstimator
from tests.helpers import SparkJobs, TinyNet


@pytest.fixture
def noisy_classes(spark):
    """Random labels: a big network memorises the 80 training rows and overfits at once."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(200, 16)).astype(np.float32)
    y = rng.integers(0, 4, size=200)
    is_validation = np.arange(200) >= 80
    rows = [(list(map(float, f)), int(t), bool(v)) for f, t, v in zip(x, y, is_validation)]
    frame = spark.createDataFrame(rows, "features array<double>, label long, is_val boolean")
    return frame, x[is_validation], y[is_validation]


def test_early_stopping_stops_every_rank_and_restores_the_best_weights(noisy_classes):
    frame, val_x, val_y = noisy_classes
    torch.manual_seed(0)
    estimator = TorchEstimator(model=TinyNet(16, 256, 4), loss="cross_entropy", optimizer="adam", lr=0.01,
                               batch_size=8, epochs=50, validation_col="is_val", early_stopping_patience=2)
    model = estimator.fit(frame)
    history, summary = model.history, model.summary
    assert summary["stopped_early"] and len(history) < 50
    assert summary["epochs_run_per_rank"] == [len(history)] * 2  # every rank stopped at the same epoch
    losses = [h["val_loss"] for h in history]
    best = int(np.argmin(losses)) + 1
    assert summary["best_epoch"] == best and len(history) == best + 2
    with torch.no_grad():
        output = model.get_module()(torch.from_numpy(val_x))
        returned_loss = torch.nn.functional.cross_entropy(output, torch.from_numpy(val_y)).item()
    assert returned_loss == pytest.approx(losses[best - 1], rel=1e-5)  # the best epoch's weights
    assert returned_loss < losses[-1]
    assert all(0.0 <= h["val_accuracy"] <= 1.0 and h["val_samples"] == 120 for h in history)


def test_validation_fraction_holds_out_a_seeded_share(noisy_classes):
    frame, _, _ = noisy_classes
    params = dict(model=TinyNet(16, 8, 4), loss="cross_entropy", epochs=2, validation_fraction=0.25, seed=5)
    first = TorchEstimator(**params).fit(frame).summary
    second = TorchEstimator(**params).fit(frame).summary
    held_out = sum(first["validation_sizes"])
    assert 20 < held_out < 80 and held_out + sum(first["shard_sizes"]) == 200
    assert first["validation_sizes"] == second["validation_sizes"]  # seeded
    assert "val_loss" in first["history"][0] and "val_accuracy" in first["history"][0]


def test_step_lr_scheduler_halves_the_rate_every_epoch(noisy_classes):
    frame, _, _ = noisy_classes
    model = TorchEstimator(model=TinyNet(16, 8, 4), loss="cross_entropy", lr=0.4, epochs=4,
                           lr_scheduler="StepLR", lr_scheduler_kwargs={"step_size": 1, "gamma": 0.5}).fit(frame)
    assert [h["lr"] for h in model.history] == pytest.approx([0.4, 0.2, 0.1, 0.05])


@pytest.mark.parametrize("params, error_type, message", [
    ({"early_stopping_patience": 2}, ConfigError, "early_stopping_patience needs a validation set"),
    ({"validation_col": "is_val", "validation_fraction": 0.2}, ConfigError, "not both"),
    ({"validation_col": "nope"}, SchemaError, "validation_col 'nope' not found"),
    ({"validation_fraction": 1.5}, ConfigError, "validation_fraction must be in (0, 1)"),
    ({"lr_scheduler": "NoSuchLR"}, ConfigError, "lr_scheduler must name a class in torch.optim.lr_scheduler"),
])
def test_bad_training_options_fail_on_the_driver(spark, noisy_classes, params, error_type, message):
    frame, _, _ = noisy_classes
    with SparkJobs(spark) as jobs, pytest.raises(error_type) as info:
        TorchEstimator(**{"model": TinyNet(16, 8, 4), "loss": "cross_entropy", **params}).fit(frame)
    assert type(info.value) is error_type and message in str(info.value)
    assert jobs.count == 0  # refused before any Spark job
