"""sync='async': a slow agent does not hold the others back; no hangs, ever."""

from __future__ import annotations

import copy
import os
import time

import pytest
import torch
from pyspark.sql import functions as F

from spark_ddl import ConfigError, NonFiniteLossError, TorchEstimator, TrainingError
from spark_ddl.networks import MLP
from tests.helpers import REPO, TinyNet, frame_with_partitions, regression_arrays, split_by_sizes
from tests.references import combined_batch_sgd, max_relative_difference

pytestmark = pytest.mark.timeout(240)


def rank_one_starts_after_rank_zero_updated(directory: str, updates: int = 3, deadline_s: float = 60.0):
    """Rank 1 refuses to take its first step until rank 0 has made ``updates`` updates (files as
    the signal: both agents run on this machine). Under lock-step training this can never happen:
    rank 0 would wait for rank 1's first gradient, and the hook raises after ``deadline_s``."""
    signal = os.path.join(directory, "rank0-ahead")

    def hook(rank: int, epoch: int, step: int, module) -> None:
        if rank == 0 and step == updates:  # async steps count on across passes over the shard
            open(signal, "w").close()
        elif rank == 1 and step == 0:
            deadline = time.monotonic() + deadline_s
            while not os.path.exists(signal):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rank 0 did not get {updates} updates ahead of rank 1")
                time.sleep(0.01)

    return hook


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


def test_async_agents_do_not_wait_for_a_slow_agent_and_still_learn(spark, tmp_path):
    """Rank 1 is held back until rank 0 has made 3 updates: rank 0 must go ahead alone (within
    the staleness bound), and the run still learns digits. Speed under a straggler (fit seconds,
    updates per agent) is measured by `spark-ddl bench strategies`, not here."""
    digits = spark.read.parquet(str(REPO / "data" / "digits.parquet"))
    train, test = digits.where(F.col("split") == "train"), digits.where(F.col("split") == "test")
    estimator = digits_estimator("async", max_staleness=4)
    estimator._fail_hook = rank_one_starts_after_rank_zero_updated(str(tmp_path))
    model = estimator.fit(train)
    summary = model.summary
    assert (tmp_path / "rank0-ahead").exists()
    assert summary["max_staleness_seen"] <= summary["max_staleness"] == 4
    assert sum(summary["pushes_per_rank"]) == 8 * sum(-(-n // 32) for n in summary["shard_sizes"])  # the budget
    assert len(model.history) == 8
    assert held_out_accuracy(model, test) >= 0.90


def test_one_async_agent_is_plain_sequential_sgd(spark):
    """With one agent there is no staleness: async must equal plain SGD in one process exactly."""
    parts = split_by_sizes(*regression_arrays(90, seed=4), [90])
    torch.manual_seed(2)
    net = TinyNet()
    model = TorchEstimator(model=copy.deepcopy(net), loss="mse", lr=0.05, batch_size=8, epochs=2, num_workers=1,
                           sync="async", shuffle=False, timeout=60).fit(frame_with_partitions(spark, parts))
    reference = combined_batch_sgd(net, parts, batch_size=8, epochs=2, lr=0.05)
    assert max_relative_difference(model.get_module(), reference) <= 1e-6
    assert max_relative_difference(net.eval(), reference) > 1e-2
    assert model.summary["pushes_per_rank"] == [24]  # ceil(90 / 8) x 2 epochs


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
    estimator = TorchEstimator(model=TinyNet(), loss="mse", batch_size=8, epochs=4, sync="async", timeout=300)
    estimator._fail_hook = fail_on_rank(failing_rank)
    started = time.monotonic()
    with pytest.raises(TrainingError) as info:
        estimator.fit(frame_with_partitions(spark, parts))
    assert time.monotonic() - started < 100  # the peers stopped: not through the 300 s timeout
    assert info.value.rank == failing_rank and info.value.remote_type == "KeyError"
    assert f"rank {failing_rank} lost its key in epoch 2" in str(info.value)
    healthy = TorchEstimator(model=TinyNet(), loss="mse", epochs=1, sync="async", timeout=30)
    assert len(healthy.fit(frame_with_partitions(spark, parts)).history) == 1  # session still usable


def poison_rank_one(what: str):
    """At rank 1's 5th update (epoch 1, step 5): its parameters become NaN (``"loss"``), or its
    gradients do while the loss stays finite (``"gradient"``)."""

    def hook(rank: int, epoch: int, step: int, module) -> None:
        if rank == 1 and epoch == 0 and step == 4:
            weight = next(module.parameters())
            if what == "loss":
                with torch.no_grad():
                    weight.fill_(float("nan"))
            else:
                weight.register_hook(lambda grad: grad * float("inf"))

    return hook


@pytest.mark.parametrize("what, found", [("loss", "the loss became nan on rank 1"),
                                         ("gradient", "the gradient became NaN or infinite on rank(s) [1]")],
                         ids=["loss", "gradient"])
def test_a_non_finite_loss_or_gradient_under_async_fails_the_step_naming_the_rank(spark, what, found):
    """docs/fault_tolerance.md's non-finite guard holds under sync='async' too: NonFiniteLossError the step it
    happens, naming epoch, step and rank, before any of it reaches the master parameters."""
    parts = split_by_sizes(*regression_arrays(160, seed=4), [80, 80])
    estimator = TorchEstimator(model=TinyNet(), loss="mse", lr=0.05, batch_size=8, epochs=2, sync="async",
                               timeout=300)
    estimator._fail_hook = poison_rank_one(what)
    with pytest.raises(NonFiniteLossError) as info:
        estimator.fit(frame_with_partitions(spark, parts))
    error = info.value
    assert (error.rank, error.ranks, error.epoch, error.step) == (1, [1], 1, 5), str(error)
    assert found in str(error) and "epoch 1, step 5" in str(error)


@pytest.mark.parametrize("settings, message", [
    ({"max_staleness": 0}, "max_staleness=0 is too small for 2 agents"),
    ({"check_every": 5}, "the replicas differ by design"),
    ({"early_stopping_patience": 2, "validation_fraction": 0.2}, "stop at the same epoch"),
    ({"lr_scheduler": "ReduceLROnPlateau"}, "use an epoch-based scheduler"),
])
def test_async_refuses_settings_it_cannot_honour(settings, message):
    with pytest.raises(ConfigError, match=message):
        TorchEstimator(model=TinyNet(), sync="async", **settings).train_config()
