"""The async server's grant rule, driven through random interleavings (no process group)."""

from __future__ import annotations

import random

import pytest
import torch

from spark_ddl.sync.async_server import DONE, HELLO, PUSH, AsyncServer


def make_server(world_size: int, max_staleness: int, pushes_per_epoch: int, epochs: int) -> AsyncServer:
    module = torch.nn.Linear(3, 1)
    return AsyncServer(module, lambda params: torch.optim.SGD(params, lr=0.1), world_size, pushes_per_epoch,
                   epochs, max_staleness, keep_snapshots=True, make_scheduler=None)


@pytest.mark.parametrize("world_size, max_staleness, seed", [(2, 1, 0), (3, 2, 1), (4, 3, 2), (4, 8, 3)])
def test_random_interleavings_keep_the_bound_spend_the_budget_and_never_deadlock(world_size, max_staleness, seed):
    rng = random.Random(seed)
    server = make_server(world_size, max_staleness, pushes_per_epoch=7, epochs=5)
    numel = sum(p.numel() for p in server.params)
    stopped: set[int] = set()

    def deliver(rank: int, kind: float) -> None:
        gradient = torch.randn(numel) if kind == PUSH else None
        server.receive(rank, kind, 1.0, 4, gradient)
        stopped.update(r for r, go in server.grants() if not go)

    for rank in range(world_size):
        deliver(rank, HELLO)
    while len(stopped) < world_size:
        running = sorted(server.computing)
        assert running, f"every agent waits: deadlock ({server.waiting})"
        deliver(rng.choice(running), PUSH)  # a random computing agent finishes its step
        assert server.max_staleness_seen <= max_staleness
    assert server.version == 35 and sum(server.pushes) == 35
    assert len(server.snapshots) == 5 and len(server.history()) == 5
    assert all(h["samples"] == 7 * 4 for h in server.history())


def test_an_agent_without_rows_leaves_without_holding_anyone_back():
    server = make_server(2, 1, pushes_per_epoch=3, epochs=1)
    server.receive(1, DONE, 0.0, 0, None)
    server.receive(0, HELLO, 0.0, 0, None)
    assert server.grants() == [(0, True)]
    for _ in range(3):
        server.receive(0, PUSH, 1.0, 4, torch.zeros(4))
        decisions = server.grants()
    assert decisions == [(0, False)] and server.finished == {0, 1}


def test_a_fast_agent_waits_once_it_would_exceed_the_bound():
    server = make_server(2, 2, pushes_per_epoch=100, epochs=1)
    server.receive(0, HELLO, 0.0, 0, None)
    server.receive(1, HELLO, 0.0, 0, None)
    assert server.grants() == [(0, True), (1, True)]
    for expected in ([(0, True)], []):  # agent 1 is still on version 0
        server.receive(0, PUSH, 1.0, 4, torch.zeros(4))
        assert server.grants() == expected
    server.receive(1, PUSH, 1.0, 4, torch.zeros(4))  # the slow agent's gradient, 2 updates stale
    assert server.max_staleness_seen == 2
    assert server.grants() == [(0, True), (1, True)]
