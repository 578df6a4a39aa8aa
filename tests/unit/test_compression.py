"""Gradient compression in real gloo process groups of spawned processes (no Spark).

- ``allreduce_impl='ddp'``: torch's DDP communication hooks, here PowerSGD on models big enough
  for several DDP buckets (which used to stall every rank).
- ``allreduce_impl='flat'``: compression of what crosses machines only, each method against a
  reference written here; on one machine no bit changes; the bytes the summary reports.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spark_ddl.agent.rendezvous import leave_group
from spark_ddl.networks import MLP
from spark_ddl.sync.allreduce import AllReduceStrategy
from tests.unit import ranks


def run_with_deadline(worker, args: tuple, nprocs: int, out: Path, deadline_s: float) -> list[dict]:
    """Start ``nprocs`` spawned ranks; each writes ``out/rank{r}.pt``. Ranks still running at the
    deadline are killed (a hang fails the test instead of hanging it)."""
    context = mp.start_processes(worker, args=args, nprocs=nprocs, start_method=ranks.START_METHOD, join=False)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and any(p.is_alive() for p in context.processes):
        time.sleep(0.1)
    stalled = [r for r, p in enumerate(context.processes) if p.is_alive()]
    for process in context.processes:
        process.kill()
        process.join()
    assert not stalled, f"ranks {stalled} still running after {deadline_s:g} s"
    missing = [r for r in range(nprocs) if not (out / f"rank{r}.pt").exists()]
    assert not missing, f"ranks {missing} failed (exit codes {[p.exitcode for p in context.processes]})"
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(nprocs)]


def _ddp_worker(rank: int, world_size: int, store: str, hidden: list[int], compression: str, steps: int,
                out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=30))
    torch.manual_seed(0)
    strategy = AllReduceStrategy(torch.device("cpu"), compression, "ddp")
    strategy.setup(MLP(64, 10, hidden), lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9))
    generator = torch.Generator().manual_seed(100 + rank)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(32, 64, generator=generator), torch.randint(0, 10, (32,), generator=generator)
        loss = torch.nn.functional.cross_entropy(strategy.module(x), y)
        strategy.step(loss)
        losses.append(float(loss.detach()))
    torch.save({"state": strategy.trained_module.state_dict(), "losses": losses}, f"{out}/rank{rank}.pt")
    leave_group(release=strategy.close)


@pytest.mark.parametrize("hidden", [[512, 512], [1024, 1024]], ids=["64-512-512-10", "64-1024-1024-10"])
def test_ddp_powersgd_on_models_of_several_buckets_does_not_stall(tmp_path, hidden):
    # 64-512-512-10 is 300k parameters (1.2 MB): more than DDP's first bucket (1 MiB), so two
    # buckets whose PowerSGD chains used to hold both gloo worker threads from the third step on
    steps = 6
    results = run_with_deadline(_ddp_worker, (2, str(tmp_path / "store"), hidden, "powersgd", steps, str(tmp_path)),
                                2, tmp_path, deadline_s=90)
    assert all(len(r["losses"]) == steps for r in results)
    for name, value in results[0]["state"].items():
        assert torch.isfinite(value).all(), name
        assert torch.equal(value, results[1]["state"][name]), name  # the same update on both replicas


# ------------------------------------------------------------------ allreduce_impl='flat'
#
# Made-up host keys make "machines" of spawned processes on this one host: the agents of a machine
# sum in shared memory, the machines' leaders all-reduce over gloo, compressed. Each test holds the
# reducer's mean against a reference computed here in plain torch from the same gradients.

STEPS = 9
NAN_STEP = 6  # rank 0's gradients hold a NaN at this step (the check must say so; PowerSGD starts afresh)
COMPRESSIONS = ["none", "fp16", "bf16", "powersgd"]


def flat_net() -> torch.nn.Module:
    """Two weight matrices PowerSGD compresses (6x8, 6x6), one it sends whole (3x6: rank 1 saves too
    little), and biases (vectors: always whole)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 6), torch.nn.Linear(6, 3))


SHAPES = [p.shape for p in flat_net().parameters()]
NUMEL = sum(s.numel() for s in SHAPES)


def gradients(rank: int, step: int) -> torch.Tensor:
    """Rank ``rank``'s flat gradient at ``step``."""
    flat = torch.randn(NUMEL, generator=torch.Generator().manual_seed(1000 * step + rank))
    if step == NAN_STEP and rank == 0:
        flat[3] = float("nan")
    return flat


def _flat_worker(rank: int, world_size: int, store: str, host_keys: list[str], directory: str, out: str) -> None:
    from spark_ddl.sync.host_reduce import FlatGradientReducer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    results: dict = {}
    for compression in COMPRESSIONS:
        reducer = FlatGradientReducer(flat_net().parameters(), host_keys, directory=directory, compression=compression)
        runs: dict = {"means": [], "finite": [], "own": [], "payload": [], "sent": []}
        for step in range(STEPS):
            reducer.flat.copy_(gradients(rank, step))  # what backward would have written into the views
            runs["finite"].append(reducer.average(check_finite=True))
            runs["own"].append(reducer.own_gradients_finite)
            runs["means"].append(reducer.flat.clone())
            runs["payload"].append(reducer.payload_bytes)
            runs["sent"].append(reducer.bytes_across_machines)
            reducer.zero()
        runs.update(compression=reducer.compression, machines=reducer.machines.hosts, shared=reducer.shared_memory)
        results[compression] = runs
        reducer.close()
    # the strategy's summary after one real step (loss = sum(p * g): the gradient is g)
    strategy = AllReduceStrategy(torch.device("cpu"), "fp16", "auto", host_keys)
    strategy.setup(flat_net(), lambda params: torch.optim.SGD(params, lr=0.1))
    loss = torch.dot(torch.cat([p.reshape(-1) for p in strategy.module.parameters()]), gradients(rank, 0))
    strategy.step(loss)
    results["summary"] = strategy.summary()
    torch.save(results, f"{out}/rank{rank}.pt")
    leave_group(release=strategy.close)


def run_flat(tmp_path: Path, host_keys: list[str], shared: bool = True) -> list[dict]:
    directory = str(tmp_path) if shared else str(tmp_path / "missing")
    return run_with_deadline(_flat_worker, (len(host_keys), str(tmp_path / "store"), host_keys, directory,
                                            str(tmp_path)), len(host_keys), tmp_path, deadline_s=120)


def machine_sums(host_keys: list[str], step: int) -> list[torch.Tensor]:
    """Each machine's fp32 sum of its agents' gradients, in rank order (as the shared file sums them)."""
    sums: dict[str, torch.Tensor] = {}
    for rank, key in enumerate(host_keys):
        sums[key] = gradients(rank, step) if key not in sums else sums[key] + gradients(rank, step)
    return list(sums.values())


def cast_reference(sums: list[torch.Tensor], world_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Each machine's share of the mean cast to ``dtype``, summed in ``dtype`` (two machines: one rounding,
    whatever the order), cast back."""
    low = [(s / world_size).to(dtype) for s in sums]
    assert len(low) == 2
    return (low[0] + low[1]).float()


def _normalised(column: torch.Tensor) -> torch.Tensor:
    return column / (column.norm() + 1e-8)


def powersgd_reference(host_keys: list[str], error_feedback: bool = True) -> list[torch.Tensor]:
    """Rank-1 PowerSGD over the machines, written out: two plain steps, then per compressible matrix
    M_m (this machine's share plus its error) P = sum_m M_m q, normalised; Q = mean_m M_m^T P; each
    machine's estimate P Q^T; vectors and small matrices averaged whole. The error a machine keeps
    is its input minus the estimate, added to its next input. q: random (torch's seeds) at the
    first compressed step, after that the last Q (warm start). A non-finite result starts afresh."""
    machines = len(dict.fromkeys(host_keys))
    world_size = len(host_keys)
    seeds = np.random.RandomState(0)  # PowerSGDState(random_seed=0)
    errors = [torch.zeros(NUMEL) for _ in range(machines)]
    qs: list[torch.Tensor] | None = None
    means = []
    for step in range(STEPS):
        inputs = [s * (machines / world_size) for s in machine_sums(host_keys, step)]
        if step < 2:
            means.append(sum(x / machines for x in inputs))
            continue
        if error_feedback:
            inputs = [x + e for x, e in zip(inputs, errors)]
        views = [list(torch.split(x, [s.numel() for s in SHAPES])) for x in inputs]
        compress = [len(s) == 2 and (s[0] + s[1]) * 2 < s[0] * s[1] for s in SHAPES]
        if qs is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seeds.randint(1_000_000_000))
                qs = [_normalised(torch.randn(1, s[1], 1)[0]) if c else None for s, c in zip(SHAPES, compress)]
        else:
            qs = [_normalised(q) if q is not None else None for q in qs]
        mean_parts = []
        for i, (shape, c) in enumerate(zip(SHAPES, compress)):
            parts = [v[i] for v in views]
            if not c:
                mean_parts.append(sum(parts) / machines)
                continue
            p = _normalised(sum(m.view(shape) @ qs[i] for m in parts))
            q = sum(m.view(shape).T @ p for m in parts) / machines
            qs[i] = q
            mean_parts.append((p @ q.T).reshape(-1))
        mean = torch.cat(mean_parts)
        errors = [x - mean for x in inputs]
        means.append(mean)
        if not bool(torch.isfinite(mean).all()):
            errors, qs = [torch.zeros(NUMEL) for _ in range(machines)], None
    return means


def assert_finite_checks(run: dict, rank: int) -> None:
    assert run["finite"] == [step != NAN_STEP for step in range(STEPS)]
    assert run["own"] == [not (step == NAN_STEP and rank == 0) for step in range(STEPS)]


TWO_MACHINES = {"2machines_1agent": ["m1", "m2"], "2machines_2agents": ["m1", "m1", "m2", "m2"]}


@pytest.mark.parametrize("host_keys", TWO_MACHINES.values(), ids=TWO_MACHINES.keys())
def test_compression_between_machines_equals_its_reference(tmp_path, host_keys):
    world_size = len(host_keys)
    results = run_flat(tmp_path, host_keys)
    for rank, result in enumerate(results):
        for compression in COMPRESSIONS:
            run = result[compression]
            assert run["compression"] == compression and run["shared"] == (world_size > 2)
            assert_finite_checks(run, rank)
            for step in range(STEPS):  # every rank: the same bits as rank 0
                mine, rank0 = run["means"][step], results[0][compression]["means"][step]
                assert torch.equal(mine.nan_to_num(7.0), rank0.nan_to_num(7.0))
    for step in range(STEPS):
        sums = machine_sums(host_keys, step)
        plain = (sums[0] + sums[1]) / world_size
        got = {c: results[0][c]["means"][step] for c in COMPRESSIONS}
        if step == NAN_STEP:
            assert all(torch.isnan(m[3]) for m in got.values())
            continue
        assert torch.equal(got["none"], plain)
        assert torch.equal(got["fp16"], cast_reference(sums, world_size, torch.float16))
        assert torch.equal(got["bf16"], cast_reference(sums, world_size, torch.bfloat16))
        assert not torch.equal(got["fp16"], plain) and not torch.equal(got["bf16"], got["fp16"])  # rounded: ran
    reference = powersgd_reference(host_keys)
    without_feedback = powersgd_reference(host_keys, error_feedback=False)
    for step in range(STEPS):
        got = results[0]["powersgd"]["means"][step]
        if step == NAN_STEP:
            assert not torch.isfinite(got).all()
            continue
        torch.testing.assert_close(got, reference[step], rtol=1e-5, atol=1e-6)
        if step < 2:  # two plain steps first
            torch.testing.assert_close(got, (machine_sums(host_keys, step)[0] + machine_sums(host_keys, step)[1])
                                       / world_size, rtol=1e-5, atol=1e-6)
    # the residual the estimate left out comes back at the next step (and after the NaN, afresh)
    assert (reference[3] - without_feedback[3]).abs().max() > 1e-2
    assert (results[0]["powersgd"]["means"][3] - without_feedback[3]).abs().max() > 1e-2


@pytest.mark.parametrize("shared", [True, False], ids=["shared memory", "gloo only"])
def test_on_one_machine_compression_changes_no_bit(tmp_path, shared):
    results = run_flat(tmp_path, ["m", "m"], shared=shared)
    for result in results:
        for compression in COMPRESSIONS:
            run = result[compression]
            assert run["compression"] == "none" and run["machines"] == [[0, 1]] and run["shared"] == shared
            assert run["sent"] == [0] * STEPS
            for step in range(STEPS):
                assert torch.equal(run["means"][step].nan_to_num(7.0), result["none"]["means"][step].nan_to_num(7.0))
        assert result["summary"]["compression"] == "none" and result["summary"]["bytes_across_machines_per_step"] == 0


def test_the_summary_counts_the_bytes_that_crossed_machines(tmp_path):
    host_keys = ["m1", "m1", "m2", "m2"]
    results = run_flat(tmp_path, host_keys)
    compressed_numel = sum((s[0] + s[1]) if len(s) == 2 and (s[0] + s[1]) * 2 < s[0] * s[1] else s.numel()
                           for s in SHAPES)  # P (n) and Q (m) of rank 1 per compressed matrix, the rest whole
    expected = {"none": [NUMEL * 4] * STEPS, "fp16": [NUMEL * 2] * STEPS, "bf16": [NUMEL * 2] * STEPS,
                "powersgd": [NUMEL * 4] * 2 + [compressed_numel * 4] * (STEPS - 2)}
    for rank, result in enumerate(results):
        leader = rank in (0, 2)
        for compression, payload in expected.items():
            run = result[compression]
            assert run["payload"] == (payload if leader else [0] * STEPS), (rank, compression)
            assert run["sent"] == run["payload"]  # a ring of two leaders: each sends the payload once
    assert compressed_numel < NUMEL
    summary = results[0]["summary"]
    assert summary["allreduce_impl"] == "flat" and summary["compression"] == "fp16"
    assert summary["machines"] == [[0, 1], [2, 3]] and summary["hosts"] == [2, 2]
    assert summary["bytes_across_machines_per_step"] == NUMEL * 2  # fp16: half of float32's NUMEL * 4
