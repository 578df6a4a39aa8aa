"""Non-finite losses and gradients, in real gloo groups of spawned processes (no Spark): found
the step they happen and named, raised or skipped on every rank together; the replica check
never blames the synchronisation for NaN parameters."""

from __future__ import annotations

import copy
import math
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spark_ddl import ConfigError
from spark_ddl.agent.heartbeat import Heartbeat
from spark_ddl.agent.loops import LoopContext, make_loop
from spark_ddl.agent.loops.common import cpu_state
from spark_ddl.agent.rendezvous import leave_group
from spark_ddl.agent.shard import Shard
from spark_ddl.common.optimizers import make_optimizer
from spark_ddl.common.train_config import TrainConfig
from spark_ddl.sync import StrategyEnv, make_strategy
from spark_ddl.sync.guard import check_replicas
from tests.references import assert_same_state, local_sgd_reference
from tests.unit import ranks
from tests.unit.test_loops import FEATURES, network, shards


class BadOnce:
    """MSE, except that on ``rank``'s ``call``-th loss the loss (``"loss"``: a NaN term without a
    gradient, so the gradients stay finite) or only the gradient (``"gradient"``: sqrt(0) in the
    graph, finite value, infinite derivative) is not finite."""

    def __init__(self, rank: int, call: int, what: str = "loss") -> None:
        self.rank, self.call, self.what, self.calls = rank, call, what, 0

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(output.reshape(-1), target.reshape(-1))
        self.calls += 1
        if dist.get_rank() != self.rank or self.calls != self.call:
            return loss
        if self.what == "loss":
            return loss + torch.tensor(float("nan"))
        return loss + torch.sqrt(output - output.detach()).sum()  # value unchanged, gradient infinite


def _agent(rank: int, world_size: int, store: str, sizes: list[int], settings: dict, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    config = TrainConfig(num_workers=world_size, shuffle=False, **settings).validate()
    features, labels = shards(sizes)[rank]
    strategy = make_strategy(config, config.sync, StrategyEnv(torch.device("cpu"), sizes, ["host"] * world_size))
    strategy.setup(network(), lambda params: make_optimizer(config.optimizer, params, config.lr, {}, None))
    context = LoopContext(config, strategy, Shard.of(features, labels), Shard.of(torch.empty(0, FEATURES),
                          torch.empty(0)), sizes, rank, world_size, torch.device("cpu"), Heartbeat(None, None, rank))
    try:
        result = make_loop(context).run()
        record = {"error": None, "state": cpu_state(strategy.trained_module.state_dict()),
                  "skipped": result.skipped_updates, "skipped_at": result.skipped_at}
        leave_group(release=strategy.close)
    except Exception as exc:  # noqa: BLE001 - recorded for the test; the process ends at once
        record = {"error": type(exc).__name__, "message": str(exc), "details": getattr(exc, "details", None)}
    torch.save(record, f"{out}/rank{rank}.pt")
    if record["error"] is not None:
        # a failed agent leaves its process group behind (as a failing Spark task does); tearing
        # gloo down at interpreter exit with a peer gone aborts now and then ("terminate called
        # without an active exception"), so this process ends without running destructors
        os._exit(0)


def run(tmp_path: Path, sizes: list[int], **settings) -> list[dict]:
    out = tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}"
    out.mkdir()
    mp.start_processes(_agent, args=(len(sizes), str(out / "store"), sizes, settings, str(out)),
                       nprocs=len(sizes), start_method=ranks.START_METHOD)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(len(sizes))]


def sgd_skipping(sizes: list[int], batch: int, epochs: int, lr: float, skip: int | None) -> dict:
    """One process, plain SGD on the combined batch of every step, except the ``skip``-th update
    (1-based), which is not applied."""
    model, parts, update = copy.deepcopy(network()), shards(sizes), 0
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(epochs):
        for step in range(math.ceil(max(sizes) / batch)):
            window = slice(step * batch, (step + 1) * batch)
            x, y = torch.cat([p[0][window] for p in parts]), torch.cat([p[1][window] for p in parts])
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x).reshape(-1), y).backward()
            update += 1
            if update != skip:
                optimizer.step()
    return model.state_dict()


LOCKSTEP = [pytest.param("allreduce", "flat", id="allreduce-flat"), pytest.param("allreduce", "ddp", id="ddp"),
            pytest.param("parameter_server", "auto", id="parameter_server")]


@pytest.mark.parametrize("sync, impl", [*LOCKSTEP, pytest.param("local_sgd", "auto", id="local_sgd")])
def test_a_nan_loss_on_one_rank_fails_the_step_it_happens_naming_epoch_step_and_rank(tmp_path, sync, impl):
    # 24 rows a rank, batch 8: 3 steps an epoch; rank 1's 5th loss is epoch 2, step 2
    ranks = run(tmp_path, [24, 24], sync=sync, allreduce_impl=impl, sync_every=2, batch_size=8, epochs=3, lr=0.05,
                loss=BadOnce(rank=1, call=5))
    failed = ranks[1]
    assert failed["error"] == "NonFiniteLossError", failed
    assert failed["details"] == {"epoch": 2, "step": 2, "ranks": [1]}
    assert "epoch 2, step 2" in failed["message"] and "nan on rank 1" in failed["message"]
    assert "Lower the learning rate (lr=0.05)" in failed["message"] and "grad_clip_norm" in failed["message"]
    if sync != "local_sgd":  # the exchange carried it: every rank stops at the same step, naming rank 1
        assert ranks[0]["error"] == "NonFiniteLossError" and ranks[0]["details"] == failed["details"]


@pytest.mark.parametrize("sync, impl", LOCKSTEP)
def test_skip_leaves_out_that_update_on_every_rank(tmp_path, sync, impl):
    sizes, batch, epochs = [24, 24], 8, 2
    ranks = run(tmp_path, sizes, sync=sync, allreduce_impl=impl, batch_size=batch, epochs=epochs, lr=0.05,
                on_nonfinite="skip", loss=BadOnce(rank=1, call=5))
    expected = sgd_skipping(sizes, batch, epochs, 0.05, skip=5)
    for rank in ranks:
        assert rank["error"] is None, rank
        assert rank["skipped"] == 1 and rank["skipped_at"] == [{"epoch": 2, "step": 2, "ranks": [1]}]
        assert_same_state(rank["state"], expected, 1e-5)
    unskipped = sgd_skipping(sizes, batch, epochs, 0.05, skip=None)  # the skip is what made the difference
    assert not all(torch.allclose(expected[n], unskipped[n], atol=1e-4) for n in expected)


def test_local_sgd_skips_only_the_agent_whose_own_update_was_not_finite(tmp_path):
    ranks = run(tmp_path, [24, 24], sync="local_sgd", sync_every=2, batch_size=8, epochs=2, lr=0.05,
                on_nonfinite="skip", loss=BadOnce(rank=1, call=5))
    assert [r["skipped"] for r in ranks] == [0, 1]
    assert_same_state(ranks[0]["state"], ranks[1]["state"], 0)  # averaged at the end
    # plain torch: independent SGD per agent, rank 1 alone leaving out its 5th update, averaged
    # after updates 2, 4 and 6
    expected = local_sgd_reference(network(), shards([24, 24]), 8, 2, 0.05, every=2, skip={1: 5}).state_dict()
    assert_same_state(ranks[0]["state"], expected, 1e-5)
    unskipped = local_sgd_reference(network(), shards([24, 24]), 8, 2, 0.05, every=2).state_dict()
    assert not all(torch.allclose(expected[n], unskipped[n], atol=1e-4) for n in expected)  # the skip mattered


@pytest.mark.parametrize("sync, impl, named", [("allreduce", "flat", [1]), ("parameter_server", "auto", [1]),
                                               ("allreduce", "ddp", [])])  # DDP exchanges inside backward
def test_a_non_finite_gradient_of_a_finite_loss_is_caught_before_the_update(tmp_path, sync, impl, named):
    ranks = run(tmp_path, [24, 24], sync=sync, allreduce_impl=impl, batch_size=8, epochs=1, lr=0.05,
                loss=BadOnce(rank=1, call=2, what="gradient"))
    for rank in ranks:
        assert rank["error"] == "NonFiniteLossError", rank
        assert rank["details"] == {"epoch": 1, "step": 2, "ranks": named}
    expected = "gradient became NaN or infinite on rank(s) [1]" if named else "averaged gradient became NaN"
    assert expected in ranks[0]["message"]


def _replicas(rank: int, store: str, poison: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    model = network()
    if rank == 1:
        with torch.no_grad():
            model[0].weight[0, 0] = float("nan") if poison == "nan" else 123.0
    try:
        check_replicas(model, torch.device("cpu"), "at the end of training")
        error = None
    except Exception as exc:  # noqa: BLE001
        error = (type(exc).__name__, str(exc))
    torch.save(error, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("poison, error, text", [
    ("nan", "NonFiniteLossError", "not a synchronisation fault"),
    ("value", "ReplicaDivergenceError", "The synchronisation is broken"),  # control: real divergence
])
def test_the_replica_check_blames_nan_parameters_on_divergence_not_on_synchronisation(tmp_path, poison, error, text):
    mp.start_processes(_replicas, args=(str(tmp_path / "store"), poison, str(tmp_path)), nprocs=2,
                       start_method=ranks.START_METHOD)
    for rank in range(2):
        name, message = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert name == error and text in message and "'0.weight'" in message


@pytest.mark.parametrize("settings, message", [
    ({"on_nonfinite": "ignore"}, "on_nonfinite must be one of"),
    ({"on_nonfinite": "skip", "sync": "async"}, "on_nonfinite='skip' needs the agents to agree"),
])
def test_on_nonfinite_is_checked(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**settings).validate()
