"""The flat gradient reducer in real gloo process groups of spawned processes (no Spark)."""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spark_ddl.agent.rendezvous import leave_group
from spark_ddl.sync.host_reduce import SPIN_BARRIER, FlatGradientReducer, HostLayout, LocalPeerError, abort_local_peers
from tests.unit import ranks


def test_host_layout_groups_ranks_by_machine_in_rank_order():
    layout = HostLayout.from_keys(["b", "a", "b", "c", "a"], rank=4)
    assert layout.hosts == [[0, 2], [1, 4], [3]]
    assert layout.local_ranks == [1, 4] and layout.local_index == 1 and layout.leaders == [0, 1, 3]
    assert HostLayout.one_per_host(3, 1).hosts == [[0], [1], [2]]


def _worker(rank: int, world_size: int, store_path: str, host_keys: list[str], directory: str,
            per_rank_directory: bool, spin: bool, outcome) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    module = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    if per_rank_directory:  # ranks that claim one machine but do not share its file system
        directory = os.path.join(directory, str(rank))
        os.makedirs(directory, exist_ok=True)
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("spark_ddl.sync.host_reduce").addHandler(handler)
    reducer = FlatGradientReducer(module.parameters(), host_keys, directory=directory, spin=spin)
    params = list(module.parameters())
    results = []
    for step in range(3):
        # integer-valued gradients (exact in float32), accumulated over two backward passes
        for micro in range(2):
            for i, p in enumerate(params):
                p.grad.add_(torch.full_like(p, float((rank + 1) * (step + 1) + i + micro)))
        reducer.average()
        results.append([p.grad.clone() for p in params])
        views_intact = all(p.grad.untyped_storage().data_ptr() == reducer.flat.untyped_storage().data_ptr()
                           for p in params)
        reducer.zero()
        assert all(float(p.grad.abs().sum()) == 0.0 for p in params)
    ok = views_intact
    for step, grads in enumerate(results):
        for i, g in enumerate(grads):
            expected = sum(2 * ((r + 1) * (step + 1) + i) + 1 for r in range(world_size)) / world_size
            ok = ok and bool(torch.all(g == expected))
    outcome[rank] = 1 if ok else 0
    outcome[world_size + rank] = len(warnings)
    if rank == 0:
        outcome[2 * world_size] = 1 if reducer.shared_memory else 0
    reducer.close()
    leave_group()


def run_ranks(tmp_path, host_keys: list[str], directory: str, per_rank_directory: bool = False,
              spin: bool = SPIN_BARRIER) -> tuple[list[int], bool, int]:
    """(whether each rank's averages were right, whether shared memory was used, warnings logged)."""
    world_size = len(host_keys)
    outcome = mp.get_context(ranks.START_METHOD).Array("i", [-1] * (2 * world_size + 1))
    mp.start_processes(_worker, args=(world_size, str(tmp_path / "store"), host_keys, directory,
                                      per_rank_directory, spin, outcome),
                       nprocs=world_size, start_method=ranks.START_METHOD)
    values = list(outcome)
    return values[:world_size], values[-1] == 1, sum(values[world_size:2 * world_size])


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
@pytest.mark.parametrize("spin", [SPIN_BARRIER, False], ids=["default barrier", "gloo barrier"])
def test_agents_on_one_machine_average_through_shared_memory(tmp_path, spin):
    correct, shared, warnings = run_ranks(tmp_path, ["m"] * 3, "/dev/shm", spin=spin)
    assert correct == [1, 1, 1] and shared and warnings == 0
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("spark-ddl-grad-")]  # unlinked


def test_two_machines_combine_their_local_sums_over_gloo(tmp_path):
    correct, shared, warnings = run_ranks(tmp_path, ["m1", "m1", "m2"], str(tmp_path))
    assert correct == [1, 1, 1] and shared and warnings == 0
    assert not [f for f in os.listdir(tmp_path) if f.startswith("spark-ddl-grad-")]


def test_without_a_shared_file_every_agent_uses_gloo(tmp_path):
    correct, shared, warnings = run_ranks(tmp_path, ["m"] * 3, str(tmp_path / "missing"))
    assert correct == [1, 1, 1] and not shared and warnings == 1  # the leader could not create it


def test_agents_that_do_not_see_their_leaders_file_fall_back_to_gloo(tmp_path):
    correct, shared, warnings = run_ranks(tmp_path, ["m"] * 3, str(tmp_path), per_rank_directory=True)
    assert correct == [1, 1, 1] and not shared and warnings == 2  # each member could not open it


def _failing_worker(rank: int, store_path: str, directory: str, how: str, outcome) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=3,
                            timeout=timedelta(seconds=300))
    module = torch.nn.Linear(4, 2)
    reducer = FlatGradientReducer(module.parameters(), ["m"] * 3, timeout=300, directory=directory)
    reducer.average()  # one good step
    if rank == 2:
        if how == "exited":
            os._exit(3)
        abort_local_peers(rank)  # what the agent does before it reports its own error
        deadline = time.monotonic() + 120  # alive (a failed agent, not an exited one) until both peers stopped
        while time.monotonic() < deadline and not all(outcome[3 + r] >= 0 for r in (0, 1)):
            time.sleep(0.05)
        return
    started = time.monotonic()
    try:
        reducer.average()
    except LocalPeerError as error:
        outcome[rank] = time.monotonic() - started
        outcome[3 + rank] = 1.0 if ("rank 2" in str(error) and how in str(error)) else 0.0


@pytest.mark.skipif(not (os.path.isdir("/dev/shm") and SPIN_BARRIER), reason="the spin barrier's checks")
@pytest.mark.parametrize("how", ["exited", "failed"])
def test_waiting_agents_stop_soon_when_a_local_peer_exits_or_fails(tmp_path, how):
    outcome = mp.get_context(ranks.START_METHOD).Array("d", [-1.0] * 6)
    context = mp.start_processes(_failing_worker, args=(str(tmp_path / "store"), "/dev/shm", how, outcome),
                                 nprocs=3, start_method=ranks.START_METHOD, join=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(outcome[3 + r] >= 0 for r in (0, 1)):  # written last
        time.sleep(0.1)
    for process in context.processes:
        process.kill()
        process.join()
    waited, named = list(outcome[:2]), list(outcome[3:5])
    assert all(w >= 0 for w in waited), waited  # both stopped within the 60 s deadline: not the 300 s timeout
    assert named == [1.0, 1.0]  # with LocalPeerError naming rank 2 and what happened to it


def _random_worker(rank: int, world_size: int, store_path: str, host_keys: list[str], directory: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    module = torch.nn.Sequential(torch.nn.Linear(31, 17), torch.nn.Linear(17, 5))
    reducer = FlatGradientReducer(module.parameters(), host_keys, directory=directory)
    torch.manual_seed(rank)
    for p in module.parameters():
        p.grad.copy_(torch.randn_like(p))
    reducer.average()
    torch.save(reducer.flat.clone(), os.path.join(out_dir, f"rank{rank}.pt"))
    if rank == 0:  # a replaced .grad is refused, not silently left out of the average
        module[0].weight.grad = None
        try:
            reducer.average()
        except RuntimeError as error:
            open(os.path.join(out_dir, "refused.txt"), "w").write(str(error))
    reducer.close()  # local only; leave_group's barrier orders it after rank 0's refused call
    reducer.close()  # a second close is a no-op
    leave_group()  # not a bare exit: gloo can abort a process that exits with its group alive


def test_mixed_machines_give_every_rank_the_same_bits(tmp_path):
    """One machine with two agents and one with one: random (inexact) gradients, world size 3 —
    every rank must hold bit-identical averages, or the replicas drift apart."""
    mp.start_processes(_random_worker, args=(3, str(tmp_path / "store"), ["m1", "m1", "m2"], str(tmp_path),
                                             str(tmp_path)), nprocs=3, start_method=ranks.START_METHOD)
    averaged = [torch.load(tmp_path / f"rank{r}.pt") for r in range(3)]
    assert torch.equal(averaged[0], averaged[1]) and torch.equal(averaged[0], averaged[2])
    gradients = []
    for r in range(3):  # what each rank drew
        torch.manual_seed(r)
        gradients.append(torch.cat([torch.randn(shape).reshape(-1) for shape in [(17, 31), (17,), (5, 17), (5,)]]))
    assert torch.allclose(averaged[0], sum(gradients) / 3, atol=1e-6)
    assert "zero_grad" in (tmp_path / "refused.txt").read_text()


def _checking_worker(rank: int, store_path: str, host_keys: list[str], directory: str, outcome) -> None:
    world_size = len(host_keys)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    module = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    reducer = FlatGradientReducer(module.parameters(), host_keys, directory=directory)
    poison = [{}, {1: (-1, float("nan"))}, {0: (0, float("inf")), 2: (0, float("-inf"))},
              {r: (0, 3e38) for r in range(world_size)}]  # the last: finite gradients whose sum overflows
    for step, where in enumerate(poison):
        reducer.flat.copy_(torch.arange(reducer.numel, dtype=torch.float32) * (rank + 1))
        if rank in where:
            index, value = where[rank]
            reducer.flat[index] = value
        finite = reducer.average(check_finite=True)
        outcome[step * 2 * world_size + rank] = int(finite)
        outcome[step * 2 * world_size + world_size + rank] = int(reducer.own_gradients_finite)
        reducer.zero()
    reducer.close()
    leave_group()


@pytest.mark.parametrize("host_keys, shared", [(["m"] * 3, True), (["m1", "m1", "m2"], True), (["m"] * 3, False)],
                         ids=["one machine", "two machines", "gloo only"])
def test_a_checked_average_says_whether_the_mean_and_each_ranks_own_gradients_were_finite(tmp_path, host_keys,
                                                                                          shared):
    world_size = len(host_keys)
    outcome = mp.get_context(ranks.START_METHOD).Array("i", [-1] * (4 * 2 * world_size))
    directory = str(tmp_path) if shared else str(tmp_path / "missing")
    mp.start_processes(_checking_worker, args=(str(tmp_path / "store"), host_keys, directory, outcome),
                       nprocs=world_size, start_method=ranks.START_METHOD)
    values = list(outcome)
    steps = [(values[s * 2 * world_size:s * 2 * world_size + world_size],
              values[s * 2 * world_size + world_size:(s + 1) * 2 * world_size]) for s in range(4)]
    assert steps[0] == ([1, 1, 1], [1, 1, 1])  # (the mean finite on each rank, each rank's own gradients finite)
    assert steps[1] == ([0, 0, 0], [1, 0, 1])  # rank 1's NaN
    assert steps[2] == ([0, 0, 0], [0, 1, 0])  # ranks 0 and 2's infinities
    assert steps[3] == ([0, 0, 0], [1, 1, 1])  # every gradient finite, their sum not
