"""The synchronisation strategies behind `sync=`, on Spark: each against an independent
reference in plain torch (tests/references.py), replicas identical at the end, and the driver
gets rank 0's weights."""

from __future__ import annotations

import copy

import pytest
import torch

from spark_ddl import TorchEstimator
from tests.helpers import TinyNet, frame_with_partitions, regression_arrays, split_by_sizes
from tests.references import (assert_same_state, averaged_independent_sgd, combined_batch_sgd, local_sgd_reference,
                              max_relative_difference)


def fit_with(spark, sync, sizes=(80, 80), optimizer_kwargs=None, **params):
    """(the fitted model, the initial network, the agents' rows)."""
    parts = split_by_sizes(*regression_arrays(sum(sizes), seed=4), sizes)
    torch.manual_seed(2)
    net = TinyNet()
    initial = copy.deepcopy(net)
    settings = dict(model=net, loss="mse", optimizer="sgd", lr=0.05, batch_size=8, epochs=2, shuffle=False,
                    sync=sync, optimizer_kwargs=optimizer_kwargs or {}, timeout=60)
    settings.update(params)
    return TorchEstimator(**settings).fit(frame_with_partitions(spark, parts)), initial, parts


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_parameter_server_equals_one_process_on_the_combined_batch(spark, momentum):
    served, initial, parts = fit_with(spark, "parameter_server", optimizer_kwargs={"momentum": momentum})
    reference = combined_batch_sgd(initial, parts, batch_size=8, epochs=2, lr=0.05, momentum=momentum)
    assert max_relative_difference(initial, reference) > 1e-2  # 20 steps moved the weights
    assert max_relative_difference(served.get_module(), reference) <= 1e-5
    assert served.summary["sync"] == "parameter_server"


def test_local_sgd_equals_independent_runs_averaged_every_k_steps(spark):
    local, initial, parts = fit_with(spark, "local_sgd", sync_every=3)  # 20 updates: averaged after 3, 6, ..., 18, 20
    reference = averaged_independent_sgd(initial, parts, batch_size=8, epochs=2, lr=0.05, every=3)
    assert max_relative_difference(local.get_module(), reference) <= 1e-5
    synchronous = combined_batch_sgd(initial, parts, batch_size=8, epochs=2, lr=0.05)
    assert max_relative_difference(reference, synchronous) > 1e-4  # the period matters: not all-reduce
    assert local.summary["sync"] == "local_sgd"


@pytest.mark.parametrize("sync", ["parameter_server", "local_sgd"])
def test_strategies_survive_empty_and_uneven_shards(spark, sync):
    model, initial, parts = fit_with(spark, sync, sizes=(0, 45), epochs=2, sync_every=3)
    assert model.summary["shard_sizes"] == [0, 45] and len(model.history) == 2
    if sync == "parameter_server":  # the combined batch is agent 1's rows alone
        reference = combined_batch_sgd(initial, parts, batch_size=8, epochs=2, lr=0.05)
    else:  # agent 1 alone moves (its loss weighted by its share of each step's rows, x2), averaged after 3, 6, 9, 12
        reference = local_sgd_reference(initial, parts, batch_size=8, epochs=2, lr=0.05, every=3)
    assert max_relative_difference(initial, reference) > 1e-2  # 12 steps moved the weights
    assert max_relative_difference(model.get_module(), reference) <= 1e-5


def test_fp16_compression_stays_close_to_the_exact_combined_batch(spark):
    compressed, initial, parts = fit_with(spark, "allreduce", compression="fp16", allreduce_impl="ddp")
    reference = combined_batch_sgd(initial, parts, batch_size=8, epochs=2, lr=0.05)
    difference = max_relative_difference(compressed.get_module(), reference)
    assert 1e-6 < difference <= 1e-2  # the hook ran (fp16 rounding: beyond float32's) and changed little
    assert compressed.summary["compression"] == "fp16"


def test_compression_on_one_machine_with_the_flat_exchange_changes_nothing(spark):
    plain, _, _ = fit_with(spark, "allreduce")
    compressed, _, _ = fit_with(spark, "allreduce", compression="fp16")  # auto: flat on CPU
    assert compressed.summary["allreduce_impl"] == "flat" and compressed.summary["compression"] == "none"
    assert compressed.summary["machines"] == [[0, 1]] and compressed.summary["bytes_across_machines_per_step"] == 0
    assert max_relative_difference(compressed.get_module(), plain.get_module()) == 0.0  # no byte crossed machines


def test_powersgd_compression_still_learns(spark):
    model, _, _ = fit_with(spark, "allreduce", compression="powersgd", allreduce_impl="ddp", epochs=6)
    losses = [h["train_loss"] for h in model.history]
    assert losses[-1] < 0.5 * losses[0]


def test_bf16_compression_with_ddp_on_cpu_says_it_needs_nccl(spark):
    from spark_ddl import TrainingError

    with pytest.raises(TrainingError, match="compression='bf16' with allreduce_impl='ddp' needs GPUs with NCCL"):
        fit_with(spark, "allreduce", compression="bf16", allreduce_impl="ddp")


def test_compression_needs_allreduce_or_local_sgd_casts(spark):
    from spark_ddl import ConfigError

    with pytest.raises(ConfigError, match="works with sync='allreduce'"):
        fit_with(spark, "parameter_server", compression="fp16")
    with pytest.raises(ConfigError, match="does not apply to sync='local_sgd'.*'fp16' or 'bf16'"):
        fit_with(spark, "local_sgd", compression="powersgd")


@pytest.mark.parametrize("sync", ["allreduce", "parameter_server"])
def test_accumulating_two_batches_of_b_equals_one_process_on_batches_of_2b(spark, sync):
    accumulated, initial, parts = fit_with(spark, sync, batch_size=4, accumulate_steps=2, epochs=2)
    reference = combined_batch_sgd(initial, parts, batch_size=8, epochs=2, lr=0.05)
    assert max_relative_difference(accumulated.get_module(), reference) <= 1e-5
    assert accumulated.summary["steps_run_per_rank"] == [40, 40]  # micro-steps: 2 x 80 rows / 4


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
    model, _, _ = fit_with(spark, "allreduce", check_every=1)
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


def test_allreduce_impl_flat_takes_compression_but_refuses_gpus_on_the_driver(spark):
    TorchEstimator(model=TinyNet(), loss="mse", allreduce_impl="flat", compression="powersgd").train_config()
    with pytest.raises(Exception, match="allreduce_impl='flat'.*use_gpu=True"):
        TorchEstimator(model=TinyNet(), loss="mse", allreduce_impl="flat", use_gpu=True).train_config()


def record_then_offset(directory: str):
    """Final hook (tests only, after the final replica check): save this rank's state, then add
    rank + 1 to its floating tensors, so that the replicas the driver could pick from differ."""

    def hook(rank: int, module) -> None:
        torch.save({k: v.detach().clone() for k, v in module.state_dict().items()}, f"{directory}/rank{rank}.pt")
        with torch.no_grad():
            for value in module.state_dict().values():
                if value.is_floating_point():
                    value.add_(rank + 1)

    return hook


@pytest.mark.parametrize("sync", ["allreduce", "parameter_server", "local_sgd", "async"])
def test_replicas_end_identical_buffers_included_and_the_driver_gets_rank_0s(spark, tmp_path, sync):
    """Each rank's batch-norm model as it ends training, compared directly: parameters and
    buffers (running statistics; for the lock-step strategies the int64 batch counter too) are
    the same bits on both ranks. The hook then offsets rank r by r + 1: the driver must return
    rank 0's weights (+1), not rank 1's."""
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    parts = split_by_sizes(*regression_arrays(160, seed=4), (80, 80))
    estimator = TorchEstimator(model=net, loss="mse", lr=0.02, batch_size=8, epochs=2, sync=sync, sync_every=3,
                               timeout=60)
    estimator._final_hook = record_then_offset(str(tmp_path))
    model = estimator.fit(frame_with_partitions(spark, parts))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["1.running_mean"].abs().sum() > 0 and int(rank0["1.num_batches_tracked"]) > 0  # trained
    returned = model.get_module().state_dict()
    if sync == "async":  # each agent counts the batches it ran itself; the statistics are averaged
        counter = "1.num_batches_tracked"
        counts = [int(rank0.pop(counter)), int(rank1.pop(counter))]
        assert counts == model.summary["pushes_per_rank"] and int(returned.pop(counter)) == counts[0]
    assert_same_state(rank1, rank0)  # same bits, buffers included
    offset = {k: v + 1 if v.is_floating_point() else v for k, v in rank0.items()}
    assert_same_state(returned, offset)  # rank 0's, after its own offset
