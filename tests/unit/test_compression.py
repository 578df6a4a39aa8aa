"""Gradient compression in real gloo process groups of spawned processes (no Spark).

- ``allreduce_impl='ddp'``: torch's DDP communication hooks, here PowerSGD on models big enough
  for several DDP buckets (which used to stall every rank).
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spark_ddl.agent.rendezvous import leave_group
from spark_ddl.models import MLP
from spark_ddl.sync.allreduce import AllReduceStrategy


def run_with_deadline(worker, args: tuple, nprocs: int, out: Path, deadline_s: float) -> list[dict]:
    """Start ``nprocs`` spawned ranks; each writes ``out/rank{r}.pt``. Ranks still running at the
    deadline are killed (a hang fails the test instead of hanging it)."""
    context = mp.start_processes(worker, args=args, nprocs=nprocs, start_method="spawn", join=False)
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
