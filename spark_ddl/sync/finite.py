"""Non-finite losses and gradients, found the step they happen.

The loop tells the guard where it is (epoch, step) and hands it every local loss. A rank whose
loss is NaN or infinite poisons its own gradient (multiplies its objective by NaN), so the
exchange carries the fact to every rank at no extra cost: the averaged gradient is then not
finite everywhere. Each strategy asks ``resolve`` between the exchange and the update, with the
same answer on every rank, and either raises ``NonFiniteLossError`` (``on_nonfinite="raise"``)
or skips the update on every rank (``"skip"``). Only on that rare path do the ranks gather who
saw what, so that the error names them. Strategies without an exchange (local SGD between
averages, an async agent) decide alone (``collective=False``).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from spark_ddl.errors import NonFiniteLossError

log = logging.getLogger("spark_ddl.agent")

POISON = float("nan")
MAX_RECORDED_SKIPS = 100  # skipped updates listed in the summary (all are counted)


def finite_flag(tensors: Iterable[torch.Tensor | None]) -> torch.Tensor:
    """A 0-dim bool tensor: no element of ``tensors`` (dense or sparse; None ignored) is NaN or
    infinite."""
    checks = []
    for tensor in tensors:
        if tensor is None:
            continue
        values = tensor.coalesce().values() if tensor.is_sparse else tensor
        # a NaN or infinity anywhere makes the sum non-finite: one read, no model-sized mask. Only
        # a non-finite sum (or one that overflowed from finite values) is looked at element-wise.
        if values.is_floating_point() and bool(torch.isfinite(values.sum())):
            continue
        checks.append(torch.isfinite(values).all().cpu())
    return torch.stack(checks).all() if checks else torch.tensor(True)


def all_finite(tensors: Iterable[torch.Tensor | None]) -> bool:
    """True when no element of ``tensors`` (dense or sparse; None ignored) is NaN or infinite."""
    present = [tensor for tensor in tensors if tensor is not None]
    return not present or bool(finite_flag(present))


class NonFiniteGuard:
    """One agent's watch over its losses and the gradients it is about to apply."""

    def __init__(self, mode: str, rank: int, hint: str = "", module: nn.Module | None = None) -> None:
        if mode not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {mode!r}")
        self.mode, self.rank, self.hint = mode, rank, hint
        self.module = module  # skip: its floating buffers are restored when an update is skipped
        self.epoch: int | None = None
        self.step: int | None = None
        self.bad_loss: float | None = None  # this rank's non-finite loss in the current update
        self.last_finite = True  # the last loss ``checked`` saw was finite
        self.last_value = 0.0  # and its value
        self._local_gradients: torch.Tensor | bool | None = None  # this rank's own gradient was finite (lazy)
        self.skipped = 0
        self.skipped_at: list[dict[str, int | None]] = []
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def begin_update(self, epoch: int, step: int) -> None:
        """A new update starts at (0-based) ``epoch``, ``step``."""
        self.epoch, self.step, self.bad_loss, self._local_gradients = epoch, step, None, None
        if self.mode == "skip" and self.module is not None:
            self._buffers = [(b, b.detach().clone()) for b in self.module.buffers() if b.is_floating_point()]

    def at(self, epoch: int, step: int) -> None:
        """Where the next check happens, without starting an update (async agents)."""
        self.epoch, self.step = epoch, step

    def checked(self, loss: torch.Tensor, objective: torch.Tensor) -> torch.Tensor:
        """``objective`` unchanged when ``loss`` is finite, else poisoned (every gradient it
        reaches becomes NaN, so the exchange tells every rank)."""
        value = float(loss.detach())
        self.last_value = value
        self.last_finite = math.isfinite(value)
        if self.last_finite:
            return objective
        self.bad_loss = value
        return objective * POISON

    def note_local_gradients(self, tensors: Iterable[torch.Tensor | None]) -> None:
        """This rank's own gradients before the exchange (read only if the update is refused,
        to name the rank they came from)."""
        self._local_gradients = finite_flag(tensors)

    def note_local_finite(self, finite: bool) -> None:
        """The same, already known (the exchange checked this rank's gradients on its way)."""
        self._local_gradients = finite

    def resolve(self, finite: bool, collective: bool = True) -> bool:
        """Whether to apply the update whose gradients were found ``finite`` or not.

        ``collective``: every rank calls this with the same ``finite`` (after an exchange); the
        ranks then gather who had a non-finite loss. Raises ``NonFiniteLossError`` in raise
        mode; in skip mode returns False and restores the floating buffers.
        """
        if finite:
            return True
        bad_gradient = self._local_gradients is not None and not bool(self._local_gradients)
        reports: dict[int, list[Any]] = {self.rank: [self.bad_loss, bad_gradient]}
        if collective and dist.is_initialized():
            everyone: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, reports[self.rank])
            reports = dict(enumerate(everyone))
        losses = {rank: loss for rank, (loss, _) in reports.items() if loss is not None}
        gradients = [rank for rank, (loss, bad) in reports.items() if bad and loss is None]
        where = f"epoch {self.epoch + 1 if self.epoch is not None else '?'}, step {self.step + 1 if self.step is not None else '?'}"
        parts = [f"the loss became {v} on rank {r}" for r, v in sorted(losses.items())]
        if gradients:
            parts.append(f"the gradient became NaN or infinite on rank(s) {gradients} (finite loss)")
        if not parts:
            origin = "the averaged gradient" if collective else f"rank {self.rank}'s gradient"
            parts.append(f"{origin} became NaN or infinite (every loss was finite)")
        what = "; ".join(parts)
        culprits = sorted([*losses, *gradients])
        if self.mode == "skip":
            self.skipped += 1
            if len(self.skipped_at) < MAX_RECORDED_SKIPS:
                self.skipped_at.append({"epoch": None if self.epoch is None else self.epoch + 1,
                                        "step": None if self.step is None else self.step + 1,
                                        "ranks": culprits})
            with torch.no_grad():
                for buffer, saved in self._buffers:
                    buffer.copy_(saved)
            if self.rank == 0 or not collective:
                log.warning("skipped the update at %s: %s (on_nonfinite='skip')", where, what)
            return False
        ranks = culprits
        raise NonFiniteLossError(
            f"non-finite loss at {where}: {what}. Training diverged; this is not a synchronisation fault. "
            f"Lower the learning rate{self.hint}, or set grad_clip_norm (e.g. 1.0) to bound every update, "
            "or on_nonfinite='skip' to skip such updates on every agent.",
            rank=ranks[0] if ranks else self.rank,
            epoch=None if self.epoch is None else self.epoch + 1,
            step=None if self.step is None else self.step + 1, ranks=ranks,
        )
