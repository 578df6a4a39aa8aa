"""The bookkeeping of the asynchronous parameter server (no communication here).

Work sharing: an epoch is a budget of pushes on the server (each agent's steps per epoch,
summed). A fast agent cycles through its shard and does more of the pushes than a slow one,
which is why async finishes sooner than the synchronous strategies when one agent lags.

Staleness: a gradient computed on parameters of version ``v`` and applied at version ``V``
has staleness ``V - v``. The server hands out fresh parameters ("grants" a step) only while
every agent still computing could not see more than ``max_staleness`` other updates land
before its own; an agent that would exceed the bound waits. So every applied gradient has
staleness <= ``max_staleness`` (recorded in the summary), and the agent with the oldest
parameters never waits, so the scheme cannot deadlock.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from typing import Any

import torch
from torch import nn

from spark_ddl.sync.base import OptimizerFactory, flatten, unflatten

HELLO, PUSH, DONE = 0.0, 1.0, 2.0  # the kinds of message an agent sends
HEADER = 3  # kind, loss_sum, rows


class AsyncServer:
    """Master parameters, optimiser and the grant bookkeeping (lives on rank 0)."""

    def __init__(self, module: nn.Module, make_optimizer: OptimizerFactory, world_size: int,
                 pushes_per_epoch: int, epochs: int, max_staleness: int, keep_snapshots: bool,
                 make_scheduler: Any) -> None:
        self.master = copy.deepcopy(module).to("cpu")
        self.params = [p for p in self.master.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params)
        self.scheduler = make_scheduler(self.optimizer) if make_scheduler else None
        self.max_staleness = max_staleness
        self.pushes_per_epoch = pushes_per_epoch
        self.budget = pushes_per_epoch * epochs
        self.keep_snapshots = keep_snapshots
        self.version = 0  # updates applied
        self.granted = 0  # steps handed out (never more than the budget)
        self.computing: dict[int, int] = {}  # rank -> version its current step started from
        self.waiting: deque[int] = deque()
        self.finished: set[int] = set()
        self.pushes = [0] * world_size
        self.max_staleness_seen = 0
        self.epochs: list[dict[str, Any]] = []
        self.snapshots: list[torch.Tensor] = []
        self._new_epoch()

    def _new_epoch(self) -> None:
        self.epochs.append({"lr": self.optimizer.param_groups[0]["lr"], "loss_sum": 0.0, "samples": 0,
                            "started": time.perf_counter()})

    def flat_parameters(self) -> torch.Tensor:
        return flatten([p.detach() for p in self.params])

    def receive(self, rank: int, kind: float, loss_sum: float, rows: int,
                gradient: torch.Tensor | None) -> None:
        """Apply one message from ``rank``; afterwards call ``grants``."""
        if kind == DONE:
            self.finished.add(rank)
            return
        if kind == PUSH:
            started_from = self.computing.pop(rank)
            staleness = self.version - started_from
            self.max_staleness_seen = max(self.max_staleness_seen, staleness)
            for param, grad in zip(self.params, unflatten(gradient, self.params)):
                param.grad = grad
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.version += 1
            self.pushes[rank] += 1
            epoch = self.epochs[-1]
            epoch["loss_sum"] += loss_sum
            epoch["samples"] += rows
            if self.version % self.pushes_per_epoch == 0:
                epoch["seconds"] = time.perf_counter() - epoch["started"]
                if self.keep_snapshots:
                    self.snapshots.append(self.flat_parameters().clone())
                if self.scheduler is not None:
                    self.scheduler.step()
                if self.version < self.budget:
                    self._new_epoch()
        self.waiting.append(rank)

    def grants(self) -> list[tuple[int, bool]]:
        """(rank, go) for every waiting agent that may now start a step (go) or must stop."""
        decided = []
        for rank in list(self.waiting):
            if self.granted >= self.budget:
                decided.append((rank, False))
            elif self._may_start(rank):
                self.computing[rank] = self.version
                self.granted += 1
                decided.append((rank, True))
            else:
                continue
            self.waiting.remove(rank)
            if not decided[-1][1]:
                self.finished.add(rank)
        return decided

    def _may_start(self, rank: int) -> bool:
        # After granting, each computing agent may see the others' pushes land before its own.
        others = len(self.computing)
        return all(self.version - started + others <= self.max_staleness
                   for started in self.computing.values()) and others <= self.max_staleness

    def history(self) -> list[dict[str, Any]]:
        records = []
        for number, epoch in enumerate(self.epochs, start=1):
            seconds = epoch.get("seconds", time.perf_counter() - epoch["started"])
            samples = epoch["samples"]
            records.append({"epoch": number, "lr": epoch["lr"],
                            "train_loss": epoch["loss_sum"] / max(samples, 1), "samples": samples,
                            "seconds": seconds, "samples_per_s": samples / seconds if seconds > 0 else None})
        return records
