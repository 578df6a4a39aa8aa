"""sync='async': a slow agent does not hold the others back; no hangs, ever."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from pyspark.sql import functions as F

from spark_ddl import ConfigError, TorchEstimator, TrainingError
from spark_ddl.models import MLP
from tests.helpers import REPO, TinyNet, frame_with_partitions, regression_arrays, split_by_sizes
from tests.integration.test_equivalence import max_relative_difference

pytestmark = pytest.mark.timeout(240)


def slow_rank_one(rank: int, epoch: int, step: int, module) -> None:
    if rank == 1:
        time.sleep(0.03)


def fail_on_rank(rank_to_fail: int):
    def hook(rank: int, epoch: int, step: int, module) -> None:
        if rank == rank_to_fail and epoch == 1 and step >= 3:
            raise KeyError(f"rank {rank} lost its key in epoch 2")

    return hook


def digits_estimator(sync: str, **params) -> TorchEstimator:
    torch.manual_seed(0)
    settings = dict(model=MLP(64, 10, [64]), loss="cross_entropy", optimizer="sgd", lr=0.02,
                    batch_size=32, epochs=8, num_workers=2, sync=sync, feature_cols="features",
                    label_col="label", timeout=60, seed=3)
    settings.update(params)
    return TorchEstimator(**settings)


def held_out_accuracy(model, test) -> float:
    scored = model.transform(test)
    return scored.where(F.col("prediction") == F.col("label")).count() / test.count()


def test_async_with_a_slow_agent_finishes_sooner_and_still_learns(spark):
    digits = spark.read.parquet(str(REPO / "data" / "digits.parquet")).cache()
    train, test = digits.where(F.col("split") == "train"), digits.where(F.col("split") == "test")
    seconds, models = {}, {}
    for sync in ("allreduce", "async"):  # side by side, same slowed agent
        estimator = digits_estimator(sync)
        estimator._fail_hook = slow_rank_one
        estimator.fit(train.limit(64))  # warm the Python workers, so both timings compare
        started = time.perf_counter()
        models[sync] = estimator.fit(train)
        seconds[sync] = time.perf_counter() - started
    summary = models["async"].summary
    print("fit seconds", seconds, "pushes per rank", summary["pushes_per_rank"])
    assert seconds["async"] < 0.7 * seconds["allreduce"], (seconds, summary["pushes_per_rank"])
    # the fast agent did most of the work, within the staleness bound
    assert summary["pushes_per_rank"][0] > 1.5 * summary["pushes_per_rank"][1]
    assert summary["max_staleness_seen"] <= summary["max_staleness"] == 4  # the default for 2 agents
    assert len(models["async"].history) == 8
    assert held_out_accuracy(models["async"], test) >= 0.90
    digits.unpersist()


def test_one_async_agent_is_plain_sequential_sgd(spark):
    """With one agent there is no staleness: async must equal the synchronous run exactly."""
    parts = split_by_sizes(*regression_arrays(90, seed=4), [90])
    frame = frame_with_partitions(spark, parts)
    torch.manual_seed(2)
    net = TinyNet()
    results = {}
    for sync in ("allreduce", "async"):
        results[sync] = TorchEstimator(model=copy.deepcopy(net), loss="mse", lr=0.05, batch_size=8, epochs=2,
                                       num_workers=1, sync=sync, timeout=60).fit(frame)
    assert max_relative_difference(results["async"].get_module(), results["allreduce"].get_module()) <= 1e-6
    assert max_relative_difference(net.eval(), results["async"].get_module()) > 1e-2
    assert results["async"].summary["pushes_per_rank"] == [24]  # ceil(90 / 8) x 2 epochs


@pytest.mark.parametrize("sizes", [(37, 61), (0, 45), (45, 0)])
def test_async_with_uneven_or_empty_shards_shuts_down_cleanly(spark, sizes):
    parts = split_by_sizes(*regression_arrays(sum(sizes), seed=4), sizes)
    model = TorchEstimator(model=TinyNet(), loss="mse", lr=0.05, batch_size=8, epochs=3, sync="async",
                           timeout=30, max_staleness=1).fit(frame_with_partitions(spark, parts))
    pushes = model.summary["pushes_per_rank"]
    assert sum(pushes) == 3 * sum(-(-n // 8) for n in sizes)  # the whole budget, no more
    assert [p for p, n in zip(pushes, sizes) if n == 0] == [0] * sizes.count(0)
    assert model.summary["max_staleness_seen"] <= 1
    losses = [h["train_loss"] for h in model.history]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_async_reports_per_epoch_validation_of_the_master(any_spark):
    parts = split_by_sizes(*regression_arrays(160, seed=4), [80, 80])
    model = TorchEstimator(model=TinyNet(), loss="mse", lr=0.05, batch_size=8, epochs=3, sync="async",
                           timeout=30, validation_fraction=0.25, lr_scheduler="StepLR",
                           lr_scheduler_kwargs={"step_size": 1, "gamma": 0.5}
                           ).fit(frame_with_partitions(any_spark, parts))
    assert [h["epoch"] for h in model.history] == [1, 2, 3]
    assert [h["lr"] for h in model.history] == [0.05, 0.025, 0.0125]  # the server's scheduler
    assert all(h["val_samples"] == sum(model.summary["validation_sizes"]) for h in model.history)
    assert model.history[-1]["val_loss"] < model.history[0]["val_loss"]


@pytest.mark.parametrize("failing_rank", [1, 0])
def test_an_agent_failing_mid_run_reaches_the_driver_promptly(spark, failing_rank):
    parts = split_by_sizes(*regression_arrays(160, seed=4), [80, 80])
    estimator = TorchEstimator(model=TinyNet(), loss="mse", batch_size=8, epochs=4, sync="async", timeout=60)
    estimator._fail_hook = fail_on_rank(failing_rank)
    started = time.monotonic()
    with pytest.raises(TrainingError) as info:
        estimator.fit(frame_with_partitions(spark, parts))
    assert time.monotonic() - started < 45  # well before the 60 s timeout
    assert info.value.rank == failing_rank and info.value.remote_type == "KeyError"
    assert f"rank {failing_rank} lost its key in epoch 2" in str(info.value)
    healthy = TorchEstimator(model=TinyNet(), loss="mse", epochs=1, sync="async", timeout=30)
    assert len(healthy.fit(frame_with_partitions(spark, parts)).history) == 1  # session still usable


@pytest.mark.parametrize("settings, message", [
    ({"max_staleness": 0}, "max_staleness=0 is too small for 2 agents"),
    ({"check_every": 5}, "the replicas differ by design"),
    ({"early_stopping_patience": 2, "validation_fraction": 0.2}, "stop at the same epoch"),
    ({"lr_scheduler": "ReduceLROnPlateau"}, "use an epoch-based scheduler"),
])
def test_async_refuses_settings_it_cannot_honour(settings, message):
    with pytest.raises(ConfigError, match=message):
        TorchEstimator(model=TinyNet(), sync="async", **settings).train_config()
