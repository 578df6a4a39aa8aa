"""The synchronisation strategies behind `sync=`: same maths where the design says so."""

from __future__ import annotations

import copy

import pytest
import torch

from spark_ddl import TorchEstimator
from tests.helpers import TinyNet, frame_with_partitions, regression_arrays, split_by_sizes
from tests.integration.test_equivalence import max_relative_difference


def fit_with(spark, sync, sizes=(80, 80), optimizer_kwargs=None, **params):
    parts = split_by_sizes(*regression_arrays(sum(sizes), seed=4), sizes)
    torch.manual_seed(2)
    net = TinyNet()
    initial = copy.deepcopy(net)
    settings = dict(model=net, loss="mse", optimizer="sgd", lr=0.05, batch_size=8, epochs=2, shuffle=False,
                    sync=sync, optimizer_kwargs=optimizer_kwargs or {}, timeout=60)
    settings.update(params)
    return TorchEstimator(**settings).fit(frame_with_partitions(spark, parts)), initial


@pytest.mark.parametrize("optimizer_kwargs", [{}, {"momentum": 0.9}])
def test_parameter_server_equals_allreduce(spark, optimizer_kwargs):
    reference, initial = fit_with(spark, "allreduce", optimizer_kwargs=optimizer_kwargs)
    served, _ = fit_with(spark, "parameter_server", optimizer_kwargs=optimizer_kwargs)
    assert max_relative_difference(initial.eval(), reference.get_module()) > 1e-2
    assert max_relative_difference(served.get_module(), reference.get_module()) <= 1e-5  # 20 steps


def test_local_sgd_averaging_every_step_equals_allreduce(spark):
    reference, _ = fit_with(spark, "allreduce")
    local, _ = fit_with(spark, "local_sgd", sync_every=1)
    assert max_relative_difference(local.get_module(), reference.get_module()) <= 1e-5


def test_local_sgd_with_a_longer_period_still_learns(spark):
    model, _ = fit_with(spark, "local_sgd", sync_every=4, epochs=6)
    losses = [h["train_loss"] for h in model.history]
    assert losses[-1] < 0.5 * losses[0]
    assert model.summary.get("sync") == "local_sgd"


@pytest.mark.parametrize("sync", ["parameter_server", "local_sgd"])
def test_strategies_survive_empty_and_uneven_shards(spark, sync):
    model, _ = fit_with(spark, sync, sizes=(0, 45), epochs=2, sync_every=3)
    assert model.summary["shard_sizes"] == [0, 45] and len(model.history) == 2


def test_fp16_compression_stays_close_to_exact_allreduce(spark):
    reference, _ = fit_with(spark, "allreduce")
    compressed, _ = fit_with(spark, "allreduce", compression="fp16")
    difference = max_relative_difference(compressed.get_module(), reference.get_module())
    assert 0 < difference <= 1e-2  # the hook ran (fp16 rounding) and changed little


def test_powersgd_compression_still_learns(spark):
    model, _ = fit_with(spark, "allreduce", compression="powersgd", epochs=6)
    losses = [h["train_loss"] for h in model.history]
    assert losses[-1] < 0.5 * losses[0]


def test_bf16_compression_on_cpu_says_it_needs_nccl(spark):
    from spark_ddl import TrainingError

    with pytest.raises(TrainingError, match="compression='bf16' needs GPUs with NCCL"):
        fit_with(spark, "allreduce", compression="bf16")


def test_compression_needs_allreduce(spark):
    from spark_ddl import ConfigError

    with pytest.raises(ConfigError, match="works with sync='allreduce'"):
        fit_with(spark, "local_sgd", compression="fp16")


@pytest.mark.parametrize("sync", ["allreduce", "parameter_server"])
def test_accumulating_two_batches_of_b_equals_one_batch_of_2b(spark, sync):
    whole, _ = fit_with(spark, sync, batch_size=8, epochs=2)
    accumulated, _ = fit_with(spark, sync, batch_size=4, accumulate_steps=2, epochs=2)
    assert max_relative_difference(accumulated.get_module(), whole.get_module()) <= 1e-5


def perturb_rank_one(rank: int, epoch: int, step: int, module) -> None:
    if rank == 1 and epoch == 0 and step == 2:
        with torch.no_grad():
            next(module.parameters()).add_(1e-3)  # a silent corruption of one replica


def test_guard_names_the_rank_whose_parameters_diverged(spark):
    from spark_ddl import TrainingError

    x, y = regression_arrays(160, seed=4)
    frame = frame_with_partitions(spark, [(x[:80], y[:80]), (x[80:], y[80:])])
    estimator = TorchEstimator(model=TinyNet(), loss="mse", batch_size=8, epochs=2, check_every=5, timeout=60)
    estimator._fail_hook = perturb_rank_one
    with pytest.raises(TrainingError) as info:
        estimator.fit(frame)
    assert info.value.remote_type == "ReplicaDivergenceError"
    assert "after update 5: rank(s) [1] differ from rank 0, first in tensor 'layers.0.weight'" in str(info.value)


def test_guard_passes_on_healthy_training(spark):
    model, _ = fit_with(spark, "allreduce", check_every=1)
    assert len(model.history) == 2


@pytest.mark.parametrize("with_batch_norm", [False, True], ids=["mlp", "batch norm"])
def test_flat_allreduce_equals_torch_ddp(any_spark, with_batch_norm):
    """The CPU default (one flat buffer, shared memory between the agents of one machine, also
    across executors) trains the same weights as DDP, batch-norm buffers (rank 0's) included."""
    parts = split_by_sizes(*regression_arrays(160, seed=4), (80, 80))
    torch.manual_seed(2)
    net = (torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
           if with_batch_norm else TinyNet())
    frame = frame_with_partitions(any_spark, parts)
    fits = {impl: TorchEstimator(model=copy.deepcopy(net), loss="mse", lr=0.05, batch_size=8, epochs=2, shuffle=False,
                                 allreduce_impl=impl, timeout=60, optimizer_kwargs={"momentum": 0.9}).fit(frame)
            for impl in ("flat", "ddp")}
    flat, ddp = fits["flat"], fits["ddp"]
    assert flat.summary["allreduce_impl"] == "flat" and flat.summary["shared_memory"]
    assert flat.summary["hosts"] == [2] and ddp.summary["allreduce_impl"] == "ddp"
    assert max_relative_difference(net.eval(), ddp.get_module()) > 1e-2
    assert max_relative_difference(flat.get_module(), ddp.get_module()) <= 1e-5
    if with_batch_norm:
        flat_stats, ddp_stats = flat.get_module()[1].running_mean, ddp.get_module()[1].running_mean
        assert torch.allclose(flat_stats, ddp_stats, rtol=1e-5, atol=1e-6) and flat_stats.abs().sum() > 0


def test_allreduce_impl_flat_with_compression_is_refused_on_the_driver(spark):
    with pytest.raises(Exception, match="allreduce_impl='flat'.*compression='fp16'"):
        TorchEstimator(model=TinyNet(), loss="mse", allreduce_impl="flat", compression="fp16").train_config()


@pytest.mark.parametrize("sync", ["parameter_server", "local_sgd", "async"])
def test_every_strategy_trains_a_batch_norm_model_to_identical_replicas(spark, sync):
    """Buffers (int64 and float) broadcast in the same order on every rank, and the replicas end
    with the same batch-norm statistics (the final replica check would fail otherwise)."""
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    parts = split_by_sizes(*regression_arrays(160, seed=4), (80, 80))
    model = TorchEstimator(model=net, loss="mse", lr=0.02, batch_size=8, epochs=2, sync=sync, sync_every=3,
                           timeout=60).fit(frame_with_partitions(spark, parts))
    statistics = model.get_module()[1]
    assert statistics.running_mean.abs().sum() > 0 and int(statistics.num_batches_tracked) > 0
