"""The training loops and strategies in real gloo process groups of spawned processes (no
Spark), each against an independent reference written here in plain torch."""

from __future__ import annotations

import math
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spark_ddl.agent.heartbeat import Heartbeat
from spark_ddl.agent.loops import LoopContext, make_loop
from spark_ddl.agent.loops.common import cpu_state
from spark_ddl.agent.rendezvous import leave_group
from spark_ddl.agent.shard import Shard
from spark_ddl.common.batch_format import BatchSpec, InputField
from spark_ddl.common.optimizers import make_optimizer
from spark_ddl.common.train_config import TrainConfig
from spark_ddl.formats.checkpoint import list_checkpoints, read_checkpoint
from spark_ddl.sync import StrategyEnv, make_strategy
from tests.references import assert_same_state, averaged_independent_sgd, combined_batch_sgd
from tests.unit import ranks

FEATURES = 4


def data(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, FEATURES)).astype(np.float32)
    y = (x @ rng.normal(size=FEATURES) + 0.1 * rng.normal(size=rows)).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(y)


def network() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def shards(sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = data(sum(sizes))
    bounds = np.cumsum([0, *sizes])
    return [(x[lo:hi], y[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]


class IdRegression(torch.nn.Module):
    """An embedding table looked up by integer ids (a recommender's shape of gradient)."""

    def __init__(self, sparse: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Embedding(50, 3, sparse=sparse)
        self.head = torch.nn.Linear(3, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.table(ids))


def id_shards(sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 50, (sum(sizes),), generator=generator)
    labels = (ids % 7).to(torch.float32) / 7
    bounds = np.cumsum([0, *sizes])
    return [(ids[lo:hi], labels[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _agent(rank: int, world_size: int, store: str, sizes: list[int], settings: dict, out: str,
           resume_from: str | None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    sparse = settings.pop("sparse_ids", None)
    host_keys = settings.pop("host_keys", None) or ["one-host"] * world_size
    nudge = settings.pop("nudge", None)  # (rank, amount): that rank's first weight starts off by amount
    config = TrainConfig(num_workers=world_size, loss="mse", shuffle=False, **settings).validate()
    if sparse is None:
        features, labels = shards(sizes)[rank]
        train = Shard.of(features, labels)
        validation = Shard.of(torch.empty(0, FEATURES), torch.empty(0))
        model = network()
    else:
        spec = BatchSpec((InputField("ids", "ids", "scalar", "int64"),), positional=False)
        ids, labels = id_shards(sizes)[rank]
        train = Shard(spec, {"ids": ids}, labels)
        validation = Shard(spec, {"ids": ids[:0]}, labels[:0])
        model = IdRegression(sparse)
    if nudge is not None and rank == nudge[0]:
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] += nudge[1]
    strategy = make_strategy(config, config.sync, StrategyEnv(torch.device("cpu"), sizes, host_keys))
    strategy.setup(model, lambda params: make_optimizer(config.optimizer, params, config.lr,
                                                        config.optimizer_kwargs, config.grad_clip_norm))
    context = LoopContext(config, strategy, train, validation, sizes, rank, world_size, torch.device("cpu"),
                          Heartbeat(None, None, rank))
    loop = make_loop(context)
    if resume_from is not None:
        loop.resume(read_checkpoint(resume_from))
    result = loop.run()
    torch.save({"state": cpu_state(strategy.trained_module.state_dict()), "history": result.history,
                "steps_run": result.steps_run, "summary": strategy.summary(),
                "initial_broadcast": strategy.initial_broadcast}, f"{out}/rank{rank}.pt")
    leave_group(release=strategy.close)


def run_agents(tmp_path: Path, sizes: list[int], resume_from: str | None = None, **settings) -> list[dict]:
    """Every rank's final state, history and step count."""
    out = tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}"
    out.mkdir()
    mp.start_processes(_agent, args=(len(sizes), str(out / "store"), sizes, settings, str(out), resume_from),
                       nprocs=len(sizes), start_method=ranks.START_METHOD)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(len(sizes))]


def plain_sgd(sizes: list[int], batch_size: int, epochs: int, lr: float, momentum: float = 0.0,
              clip: float | None = None) -> dict:
    """One process: each step trains on the rows every agent would take at that step, together."""
    return combined_batch_sgd(network(), shards(sizes), batch_size, epochs, lr, momentum, clip).state_dict()


def independent_sgd_averaged(sizes: list[int], batch_size: int, epochs: int, lr: float, every: int) -> dict:
    """K processes, each plain SGD on its own shard; parameters averaged every ``every`` steps
    and at the end."""
    return averaged_independent_sgd(network(), shards(sizes), batch_size, epochs, lr, every).state_dict()


def assert_states_close(actual: dict, expected: dict, tolerance: float = 1e-5) -> None:
    assert_same_state(actual, expected, tolerance)


@pytest.mark.parametrize("sync, allreduce_impl", [("allreduce", "flat"), ("allreduce", "ddp"),
                                                  ("parameter_server", "auto")])
def test_synchronous_strategies_equal_one_process_on_the_combined_batch(tmp_path, sync, allreduce_impl):
    sizes, batch, epochs = [37, 61], 8, 2  # uneven: agent 0 runs out of rows before agent 1
    ranks = run_agents(tmp_path, sizes, sync=sync, allreduce_impl=allreduce_impl, batch_size=batch,
                       epochs=epochs, lr=0.05, optimizer_kwargs={"momentum": 0.9})
    expected = plain_sgd(sizes, batch, epochs, lr=0.05, momentum=0.9)
    for rank in ranks:
        assert_states_close(rank["state"], expected)
    assert [h["samples"] for h in ranks[0]["history"]] == [98, 98]
    assert ranks[0]["steps_run"] == ranks[1]["steps_run"] == epochs * math.ceil(61 / batch)
    # the slowest agent's seconds outside the exchange; DDP exchanges inside backward: not timed
    for record, other in zip(ranks[0]["history"], ranks[1]["history"]):
        if allreduce_impl == "ddp":
            assert "compute_seconds" not in record and "paced_compute_seconds" not in record
        else:
            assert 0 < record["compute_seconds"] < record["seconds"] + 0.5
            # between every two exchanges the slowest agent's: at least the slowest agent's total, the
            # same number on every rank
            assert record["compute_seconds"] - 1e-3 <= record["paced_compute_seconds"] < record["seconds"] + 0.5
            assert record["paced_compute_seconds"] == other["paced_compute_seconds"]


@pytest.mark.parametrize("sync", ["allreduce", "parameter_server"])
def test_gradient_clipping_applies_to_the_averaged_gradient_on_every_rank(tmp_path, sync):
    sizes, batch, epochs, clip = [24, 40], 8, 2, 0.05
    ranks = run_agents(tmp_path, sizes, sync=sync, batch_size=batch, epochs=epochs, lr=0.1, grad_clip_norm=clip)
    expected = plain_sgd(sizes, batch, epochs, lr=0.1, clip=clip)
    for rank in ranks:
        assert_states_close(rank["state"], expected)
    unclipped = plain_sgd(sizes, batch, epochs, lr=0.1)
    assert not all(torch.allclose(expected[n], unclipped[n], atol=1e-4) for n in expected)  # the clip bound


@pytest.mark.parametrize("sync", ["allreduce", "parameter_server"])
def test_sparse_embedding_gradients_train_exactly_like_dense_ones(tmp_path, sync):
    sizes, batch, epochs = [24, 40], 8, 2
    settings = dict(sync=sync, batch_size=batch, epochs=epochs, lr=0.2, optimizer_kwargs={"momentum": 0.9})
    sparse = run_agents(tmp_path, sizes, sparse_ids=True, **settings)
    model = IdRegression(sparse=False)  # one process, the combined batches, dense gradients
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    parts = id_shards(sizes)
    for _ in range(epochs):
        for step in range(math.ceil(max(sizes) / batch)):
            window = slice(step * batch, (step + 1) * batch)
            ids, y = torch.cat([p[0][window] for p in parts]), torch.cat([p[1][window] for p in parts])
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(ids).reshape(-1), y).backward()
            optimizer.step()
    for rank in sparse:
        assert_states_close(rank["state"], model.state_dict())


@pytest.mark.parametrize("sync", ["allreduce", "parameter_server"])
def test_accumulating_k_micro_batches_of_b_equals_one_process_on_batches_of_k_b(tmp_path, sync):
    sizes, batch, k, epochs = [24, 40], 4, 2, 2
    ranks = run_agents(tmp_path, sizes, sync=sync, batch_size=batch, accumulate_steps=k, epochs=epochs, lr=0.05,
                       optimizer_kwargs={"momentum": 0.9})
    expected = plain_sgd(sizes, k * batch, epochs, lr=0.05, momentum=0.9)
    for rank in ranks:
        assert_states_close(rank["state"], expected)
    assert ranks[0]["steps_run"] == epochs * math.ceil(40 / batch)  # micro-steps, not updates
    not_accumulated = plain_sgd(sizes, batch, epochs, lr=0.05, momentum=0.9)
    assert not all(torch.allclose(expected[n], not_accumulated[n], atol=1e-4) for n in expected)


def test_local_sgd_equals_independent_runs_averaged_every_k_steps(tmp_path):
    sizes, batch, epochs, every = [40, 40], 8, 2, 3  # 10 updates: averages after 3, 6, 9 and at the end
    ranks = run_agents(tmp_path, sizes, sync="local_sgd", sync_every=every, batch_size=batch, epochs=epochs,
                       lr=0.05)
    expected = independent_sgd_averaged(sizes, batch, epochs, lr=0.05, every=every)
    for rank in ranks:
        assert_states_close(rank["state"], expected)
    # and it differs from all-reduce (the test could not pass by averaging every step)
    synchronous = plain_sgd(sizes, batch, epochs, lr=0.05)
    assert not all(torch.allclose(expected[n], synchronous[n], atol=1e-4) for n in expected)


def test_local_sgd_averages_through_each_machine_and_sends_one_model_between_machines(tmp_path):
    # 4 agents on 2 made-up machines, placed as Spark placed them on the testbed ({0, 2} and {1, 3}):
    # each machine sums its agents' parameters in shared memory, its leader exchanges one model
    sizes, batch, epochs, every = [24, 24, 24, 24], 8, 2, 2  # 6 updates: averages after 2, 4, 6
    ranks = run_agents(tmp_path, sizes, sync="local_sgd", sync_every=every, batch_size=batch, epochs=epochs,
                       lr=0.05, host_keys=["machine-a", "machine-b", "machine-a", "machine-b"])
    expected = independent_sgd_averaged(sizes, batch, epochs, lr=0.05, every=every)
    for rank in ranks:
        assert_states_close(rank["state"], expected)
    summary = ranks[0]["summary"]
    assert summary["average_impl"] == "flat" and summary["machines"] == [[0, 2], [1, 3]]
    assert summary["hosts"] == [2, 2] and summary["shared_memory"] is True
    model_bytes = 4 * sum(p.numel() for p in network().parameters())
    # two machines' leaders: each sends the model once per average (a ring all-reduce of two)
    assert summary["bytes_across_machines_per_average"] == model_bytes
    assert summary["bytes_across_machines_per_step"] == model_bytes / every
    assert ranks[1]["summary"]["bytes_across_machines_per_average"] == model_bytes  # machine b's leader
    assert ranks[2]["summary"]["bytes_across_machines_per_average"] == 0  # not a leader: nothing crosses


def fp16_local_sgd_reference(sizes: list[int], batch_size: int, epochs: int, lr: float, every: int,
                             machines: list[list[int]], low: torch.dtype) -> dict:
    """Independent SGD per shard; every ``every`` updates (and at the end) each replica's change since
    the last average is summed per machine in float32, each machine's share of the mean cast to
    ``low``, the two shares summed in ``low`` and cast back, and added to the last average."""
    parts = shards(sizes)
    models = [network() for _ in parts]
    optimizers = [torch.optim.SGD(m.parameters(), lr=lr) for m in models]
    anchors = [p.detach().clone() for p in models[0].parameters()]
    world = len(parts)

    def average() -> None:
        with torch.no_grad():
            for index, tensors in enumerate(zip(*(m.parameters() for m in models))):
                deltas = [t - anchors[index] for t in tensors]
                sums = [sum(deltas[r] for r in machine) for machine in machines]
                shares = [(total * (1.0 / world)).to(low) for total in sums]
                anchors[index] = anchors[index] + (shares[0] + shares[1]).float()
                for t in tensors:
                    t.copy_(anchors[index])

    steps = math.ceil(sizes[0] / batch_size)
    for update in range(1, epochs * steps + 1):
        window = slice(((update - 1) % steps) * batch_size, ((update - 1) % steps + 1) * batch_size)
        for model, optimizer, (x, y) in zip(models, optimizers, parts):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x[window]).reshape(-1), y[window]).backward()
            optimizer.step()
        if update % every == 0:
            average()
    if (epochs * steps) % every:
        average()
    return models[0].state_dict()


@pytest.mark.parametrize("compression, low", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_compressed_local_sgd_sends_the_changes_in_half_precision_between_machines(tmp_path, compression, low):
    # 4 agents on 2 made-up machines: the changes since the last average are summed in shared memory at
    # full precision, and only the machines' shares of their mean cross in 16 bits
    sizes, batch, epochs, every = [24, 24, 24, 24], 8, 3, 2  # 9 updates: averages after 2, 4, 6, 8, at the end
    keys = ["machine-a", "machine-b", "machine-a", "machine-b"]
    ranks = run_agents(tmp_path, sizes, sync="local_sgd", sync_every=every, batch_size=batch, epochs=epochs,
                       lr=0.05, host_keys=keys, compression=compression)
    expected = fp16_local_sgd_reference(sizes, batch, epochs, 0.05, every, [[0, 2], [1, 3]], low)
    for rank in ranks:
        assert_same_state(rank["state"], ranks[0]["state"])  # every replica: the same bits
        assert_states_close(rank["state"], expected, 1e-6)
    exact = independent_sgd_averaged(sizes, batch, epochs, lr=0.05, every=every)
    # the rounding really happened (the exact average is further from it than the tolerance above)
    assert max((ranks[0]["state"][n] - exact[n]).abs().max().item() for n in exact) > 1e-5
    summary = ranks[0]["summary"]
    assert summary["compression"] == compression and summary["average_impl"] == "flat"
    model_bytes = 4 * sum(p.numel() for p in network().parameters())
    assert summary["bytes_across_machines_per_average"] == model_bytes // 2  # half of the float32 model


def test_compressed_local_sgd_resumes_from_the_last_average(tmp_path):
    sizes, batch, every = [24, 24], 8, 2  # 3 updates an epoch: epoch 1 ends between two averages
    settings = dict(sync="local_sgd", sync_every=every, batch_size=batch, lr=0.05, compression="fp16",
                    host_keys=["machine-a", "machine-b"])
    whole = run_agents(tmp_path, sizes, epochs=3, **settings)
    checkpoints = tmp_path / "checkpoints"
    run_agents(tmp_path, sizes, epochs=1, checkpoint_dir=str(checkpoints), **settings)  # "dies" after epoch 1
    (first,) = list_checkpoints(str(checkpoints))[-1:]
    resumed = run_agents(tmp_path, sizes, resume_from=f"{checkpoints}/{first}", epochs=3,
                         checkpoint_dir=str(checkpoints), resume=True, **settings)
    for rank in range(2):  # the anchor (the last average) came back too: the same bits
        assert_same_state(resumed[rank]["state"], whole[rank]["state"])


@pytest.mark.parametrize("allreduce_impl", ["flat", "ddp"])
def test_replicas_that_start_apart_take_rank_0s_weights(tmp_path, allreduce_impl):
    sizes, batch, epochs = [40, 40], 8, 2
    expected = plain_sgd(sizes, batch, epochs, lr=0.05)  # from network(): rank 0's weights
    apart = run_agents(tmp_path, sizes, allreduce_impl=allreduce_impl, batch_size=batch, epochs=epochs, lr=0.05,
                       nudge=(1, 0.5))
    for rank in apart:
        assert rank["initial_broadcast"] is True
        assert_states_close(rank["state"], expected)
    alike = run_agents(tmp_path, sizes, allreduce_impl=allreduce_impl, batch_size=batch, epochs=epochs, lr=0.05)
    assert [rank["initial_broadcast"] for rank in alike] == [False, False]  # built equal: only compared
    for rank in alike:
        assert_states_close(rank["state"], expected)


def _identical_worker(rank: int, store: str, outcome) -> None:
    from spark_ddl.sync.guard import state_is_identical

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    answers = []
    for change in (None, "ulp", "nan", "buffer"):
        model = torch.nn.BatchNorm1d(3)  # parameters and buffers (an integer one too)
        with torch.no_grad():
            model.weight.copy_(torch.tensor([0.25, -1.5, 3.0]))
            if rank == 1 and change == "ulp":
                model.weight[1] = torch.nextafter(model.weight[1], torch.tensor(0.0))
            if change == "nan":
                model.bias[0] = float("nan")  # on both ranks: NaN is never equal
            if rank == 1 and change == "buffer":
                model.num_batches_tracked += 1
        answers.append(state_is_identical(model, torch.device("cpu")))
    outcome[rank] = answers
    dist.destroy_process_group()


def test_the_initial_comparison_tells_one_ulp_nan_and_integer_buffers_apart(tmp_path):
    with mp.Manager() as manager:
        outcome = manager.dict()
        mp.start_processes(_identical_worker, args=(str(tmp_path / "store"), outcome), nprocs=2,
                           start_method=ranks.START_METHOD)
        assert outcome[0] == outcome[1] == [True, False, False, False]


def test_the_exchange_timer_counts_only_its_block_and_not_where_it_is_off():
    from spark_ddl.sync.parameter_server import ParameterServerStrategy

    strategy = ParameterServerStrategy(torch.device("cpu"))
    with strategy.timed_exchange():
        time.sleep(0.05)
    time.sleep(0.05)
    assert 0.05 <= strategy.exchange_seconds < 0.09
    strategy.exchange_seconds = None  # a strategy whose exchange cannot be timed (DDP's, inside backward)
    with strategy.timed_exchange():
        pass
    assert strategy.exchange_seconds is None


def test_one_async_agent_is_plain_sequential_sgd(tmp_path):
    sizes, batch, epochs = [45], 8, 3
    (rank,) = run_agents(tmp_path, sizes, sync="async", batch_size=batch, epochs=epochs, lr=0.05)
    assert_states_close(rank["state"], plain_sgd(sizes, batch, epochs, lr=0.05))
    assert [h["samples"] for h in rank["history"]] == [45, 45, 45]


def test_async_agents_share_the_budget_and_end_identical(tmp_path):
    sizes, batch, epochs = [30, 50], 8, 2
    ranks = run_agents(tmp_path, sizes, sync="async", batch_size=batch, epochs=epochs, lr=0.01)
    assert_states_close(ranks[0]["state"], ranks[1]["state"], tolerance=0)
    budget = epochs * (math.ceil(30 / batch) + math.ceil(50 / batch))
    assert ranks[0]["steps_run"] + ranks[1]["steps_run"] == budget  # every granted step ran once
    assert sum(h["samples"] for h in ranks[0]["history"]) > 0


def test_a_resumed_lockstep_run_runs_only_the_remaining_steps_and_ends_where_an_uninterrupted_one_does(tmp_path):
    sizes, batch, epochs = [24, 24], 8, 3
    settings = dict(batch_size=batch, lr=0.05, optimizer_kwargs={"momentum": 0.9})
    uninterrupted = run_agents(tmp_path, sizes, epochs=epochs, **settings)
    checkpoints = tmp_path / "checkpoints"
    run_agents(tmp_path, sizes, epochs=1, checkpoint_dir=str(checkpoints), **settings)  # "dies" after epoch 1
    (first,) = list_checkpoints(str(checkpoints))[-1:]
    resumed = run_agents(tmp_path, sizes, resume_from=f"{checkpoints}/{first}", epochs=epochs,
                         checkpoint_dir=str(checkpoints), resume=True, **settings)
    assert_states_close(resumed[0]["state"], uninterrupted[0]["state"], tolerance=0)
    assert resumed[0]["steps_run"] == (epochs - 1) * (24 // batch)  # not a silent restart from scratch
    assert [h["train_loss"] for h in resumed[0]["history"]] == [h["train_loss"] for h in uninterrupted[0]["history"]]
