"""What both loops share: their inputs (``LoopContext``), their result (``LoopResult``), the
``Loop`` protocol, validation over every agent's held-out rows, and early stopping."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import torch
import torch.distributed as dist
from torch import nn

from spark_ddl.agent.heartbeat import Heartbeat
from spark_ddl.agent.sampling import ShardRows
from spark_ddl.common.batch_format import LABEL_KEY, BatchSpec, call_model, dummy_batch
from spark_ddl.common.objectives import LossFn, objective
from spark_ddl.common.train_config import TrainConfig
from spark_ddl.sync.base import SyncStrategy

RECENT_EPOCHS = 32  # epoch records rank 0's heartbeat carries to the driver


@dataclass
class LoopContext:
    """Everything a loop works with on one agent."""

    config: TrainConfig
    strategy: SyncStrategy  # set up: replicas identical, optimiser built
    train: ShardRows
    validation: ShardRows
    shard_sizes: list[int]  # training rows per rank, as agreed at the rendezvous
    rank: int
    world_size: int
    device: torch.device
    heartbeat: Heartbeat
    fail_hook: Callable[[int, int, int, nn.Module], None] | None = None  # tests: before each step
    batch: BatchSpec | None = None  # the model's inputs (None: the one-input shorthand)
    row_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # fixed inputs' row shapes
    parts: list[tuple[int, int, int]] | None = None  # (shard, offset, rows) of the shards this agent runs
    pause_at_epoch_boundary: bool = False  # elastic, fewer agents: checkpoint and stop after the next epoch
    loss_fn: LossFn = field(init=False)
    fetch: Callable[[torch.Tensor], dict[str, torch.Tensor]] = field(init=False)  # the training rows' batches
    index_device: torch.device = field(init=False)  # where ``fetch`` wants its row indices

    def __post_init__(self) -> None:
        self.loss_fn = objective(self.config.loss).loss()
        if self.batch is None:
            self.batch = self.train.spec
        self.fetch, self.index_device = self.train.batch_source(self.device)
        if self.parts is None:  # its own partition is the shard of its rank
            self.parts = [(self.rank, 0, self.train.num_rows)]

    def before_step(self, epoch: int, step: int) -> None:
        """Run the test hook, if any (fault injection)."""
        if self.fail_hook is not None:
            self.fail_hook(self.rank, epoch, step, self.strategy.trained_module)

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The batch-mean loss: the user's ``train_step(model, batch)``, or the built-in loss of
        the model's output against ``batch["label"]``."""
        if self.config.train_step is not None:
            return self.config.train_step(model, batch)
        return self.loss_fn(call_model(model, batch, self.batch), batch[LABEL_KEY])

    def zero_loss(self, model: nn.Module) -> torch.Tensor:
        """A loss of 0 whose backward reaches every parameter, for an agent whose shard has no
        rows at this step: it still joins the step's collectives (with zero gradients). The
        model runs in eval mode on two zero rows, so batch-norm statistics do not move."""
        if self.train.num_rows:  # a real row (twice) keeps the user's step away from meaningless input
            batch = self.fetch(torch.zeros(2, dtype=torch.int64, device=self.index_device))
        else:
            batch = dummy_batch(self.batch, self.row_shapes, rows=2, device=self.device)
            labels = self.train.labels
            batch[LABEL_KEY] = torch.zeros((2, *labels.shape[1:]), dtype=labels.dtype, device=self.device)
        was_training = model.training
        model.eval()
        try:
            loss = self.loss(model, batch)
        finally:
            model.train(was_training)
        return loss * 0.0


@dataclass
class LoopResult:
    """What a loop hands back after its strategy finished."""

    history: list[dict[str, Any]]  # one record per epoch (rank 0's are the result; a resumed run's too)
    epochs_run: int  # epochs in this rank's history
    steps_run: int  # micro-steps this rank ran in this attempt (a resumed run counts only its own)
    best_epoch: int | None = None  # early stopping: the epoch whose weights are the result
    best_state: dict[str, torch.Tensor] | None = None  # rank 0: those weights (applied after the checks)
    stopped_early: bool = False
    skipped_updates: int = 0  # updates skipped for a non-finite loss or gradient (on_nonfinite='skip')
    skipped_at: list[dict[str, Any]] = field(default_factory=list)  # where (the first 100)
    paused_after_epoch: int | None = None  # elastic: stopped at this epoch boundary (checkpoint written)


class Loop(Protocol):
    """A training loop over one agent's shard."""

    def resume(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's state (collective on every rank)."""

    def run(self) -> LoopResult:
        """Train until the epochs (or the strategy's budget) are done; ends with ``strategy.finish()``."""


def validate(context: LoopContext, module: nn.Module) -> dict[str, Any]:
    """Collective: the loss (and accuracy for classifiers, and the user's ``eval_step``
    metrics) over every agent's validation rows, weighted by rows; ``val_seconds``: how long it took."""
    started = time.perf_counter()
    config, validation, device = context.config, context.validation, context.device
    goal = objective(config.loss)
    classifier = goal.classifier and config.train_step is None  # train_step: the loss is the user's
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*rows, correct, rows
    metrics: dict[str, float] = {}
    chunk = max(config.batch_size, 1024)
    fetch, index_device = validation.batch_source(device)
    module.eval()
    with torch.no_grad():
        for start in range(0, validation.num_rows, chunk):
            index = torch.arange(start, min(start + chunk, validation.num_rows), device=index_device)
            batch, rows = fetch(index), len(index)
            sums[0] += context.loss(module, batch).double() * rows
            if classifier:
                sums[1] += goal.correct(call_model(module, batch, context.batch), batch[LABEL_KEY])
            sums[2] += rows
            if config.eval_step is not None:
                for name, value in config.eval_step(module, batch).items():
                    metrics[name] = metrics.get(name, 0.0) + float(value) * rows
    module.train()
    dist.all_reduce(sums)
    record = {"val_loss": float(sums[0] / sums[2]), "val_samples": int(sums[2])}
    if classifier:
        record["val_accuracy"] = float(sums[1] / sums[2])
    if config.eval_step is not None:  # every rank's sums, whatever keys each one saw
        everyone: list[dict[str, float]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(everyone, metrics)
        for name in sorted({key for sums_of_rank in everyone for key in sums_of_rank}):
            record[f"val_{name}"] = sum(m.get(name, 0.0) for m in everyone) / float(sums[2])
    record["val_seconds"] = time.perf_counter() - started
    return record


class EarlyStopping:
    """Tracks the best validation loss; rank 0 keeps the best weights and decides for all."""

    def __init__(self, patience: int, keep_weights: bool) -> None:
        self.patience = patience
        self.keep_weights = keep_weights
        self.best_loss = float("inf")
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stopped = False

    def update(self, epoch: int, val_loss: float, module: nn.Module, device: torch.device) -> bool:
        """Record this epoch; return True (the same on every rank) when training must stop."""
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch = val_loss, epoch
            if self.keep_weights:
                self.best_state = cpu_state(module.state_dict())
        stop = self.best_epoch is not None and epoch - self.best_epoch >= self.patience
        decision = torch.tensor([1 if stop else 0], device=device)
        dist.broadcast(decision, src=0)  # rank 0's decision holds for all ranks
        self.stopped = bool(decision.item())
        return self.stopped

    def state_dict(self) -> dict[str, Any]:
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch, "best_state": self.best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_loss, self.best_epoch = float(state["best_loss"]), state["best_epoch"]
        self.best_state = state["best_state"] if self.keep_weights else None


def cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of a state dict on the CPU."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}
