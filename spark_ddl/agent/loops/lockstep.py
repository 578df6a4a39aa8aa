"""The lock-step loop: every agent runs the same steps together, epoch by epoch, with a
``LockstepStrategy`` owning the gradients. Also writes and resumes from checkpoints."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.distributed as dist

from spark_ddl.agent.loops.common import RECENT_EPOCHS, EarlyStopping, LoopContext, LoopResult, cpu_state, validate
from spark_ddl.agent.sampling import epoch_order, global_batch_sizes, steps_per_epoch, update_groups
from spark_ddl.common.optimizers import make_scheduler
from spark_ddl.formats.checkpoint import write_checkpoint
from spark_ddl.sync.base import LockstepStrategy
from spark_ddl.sync.finite import NonFiniteGuard
from spark_ddl.sync.guard import check_replicas

log = logging.getLogger("spark_ddl.agent")


class EpochLoop:
    """The per-epoch work every agent does in lock-step with the others."""

    def __init__(self, context: LoopContext) -> None:
        assert isinstance(context.strategy, LockstepStrategy)
        self.context, self.config, self.strategy = context, context.config, context.strategy
        config, sizes = self.config, context.shard_sizes
        self.steps = steps_per_epoch(sizes, config.batch_size)
        self.is_sync_step, self.update_rows = update_groups(
            global_batch_sizes(sizes, config.batch_size, self.steps), config.accumulate_steps
        )
        self.scheduler = make_scheduler(config.lr_scheduler, self.strategy.optimizer, config.lr_scheduler_kwargs)
        self.updates = 0
        patience = config.early_stopping_patience
        self.stopper = EarlyStopping(patience, keep_weights=context.rank == 0) if patience else None
        self.every = config.checkpoint_interval
        context.heartbeat.set("starting the epochs", steps_per_epoch=self.steps, epochs=config.epochs)
        self.history: list[dict[str, Any]] = []
        self.start_epoch, self.start_step, self.start_loss_sum = 0, 0, 0.0
        self.steps_run = 0
        self.checkpointed: tuple[int, int] | None = None  # (epoch, step) of this attempt's newest checkpoint
        self.guard = NonFiniteGuard(config.on_nonfinite, context.rank, f" (lr={config.lr:g})",
                                    self.strategy.trained_module)
        self.strategy.nonfinite = self.guard

    def run(self) -> LoopResult:
        context, history, paused = self.context, self.history, None
        for epoch in range(self.start_epoch, self.config.epochs):
            record = {"epoch": epoch + 1, "lr": self.strategy.optimizer.param_groups[0]["lr"]}
            resuming = epoch == self.start_epoch
            record.update(self._train_epoch(epoch, self.start_step if resuming else 0,
                                            self.start_loss_sum if resuming else 0.0))
            if self.config.has_validation:
                context.heartbeat.set("validation", epoch=epoch, step=None)
                record.update(validate(context, self.strategy.trained_module))
            history.append(record)
            if context.rank == 0:  # the driver's live progress shows the newest epochs
                context.heartbeat.set("end of epoch", waiting=True, recent_epochs=history[-RECENT_EPOCHS:])
            self._step_scheduler(record)
            if self.stopper is not None and self.stopper.update(
                epoch + 1, record["val_loss"], self.strategy.trained_module, context.device
            ):
                break
            if self.every is not None and self.every.unit == "epochs" and (epoch + 1) % self.every.count == 0:
                self._checkpoint(epoch + 1, 0, 0.0)
            if context.pause_at_epoch_boundary and epoch + 1 < self.config.epochs:
                if self.checkpointed != (epoch + 1, 0):
                    self._checkpoint(epoch + 1, 0, 0.0)
                paused = epoch + 1  # the driver continues from here, with num_workers agents if it can
                break
        self.strategy.finish()
        stopper = self.stopper
        return LoopResult(history, epochs_run=len(history), steps_run=self.steps_run,
                          skipped_updates=self.guard.skipped, skipped_at=self.guard.skipped_at,
                          best_epoch=stopper.best_epoch if stopper else None,
                          best_state=stopper.best_state if stopper else None,
                          stopped_early=bool(stopper and stopper.stopped), paused_after_epoch=paused)

    def _step_scheduler(self, record: dict[str, Any]) -> None:
        if self.scheduler is None:
            return
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(record.get("val_loss", record["train_loss"]))
        else:
            self.scheduler.step()

    def _train_epoch(self, epoch: int, first_step: int = 0, loss_so_far: float = 0.0) -> dict[str, Any]:
        context, config, strategy = self.context, self.config, self.strategy
        model, heartbeat, world_size = strategy.module, context.heartbeat, context.world_size
        model.train()
        started, exchanged = time.perf_counter(), strategy.exchange_seconds
        paced = None if exchanged is None else PacedCompute(strategy, started, max(self.steps - first_step, 1))
        # one seeded order per shard this agent runs (its own; elastic: several), so that the
        # global batch and sample order are those of num_workers agents whatever the agent count
        orders = [offset + epoch_order(rows, epoch, config.shuffle, config.seed, shard)
                  for shard, offset, rows in context.parts]
        orders = [order.to(context.index_device) for order in orders]
        loss_sum = loss_so_far  # float64, summed on the host: the guard reads every loss anyway
        for step in range(first_step, self.steps):
            heartbeat.set("forward pass (model code)", epoch=epoch, step=step, updates=self.updates)
            if step == first_step or self.is_sync_step[step - 1]:
                self.guard.begin_update(epoch, step)
            context.before_step(epoch, step)
            indexes = [order[step * config.batch_size : (step + 1) * config.batch_size] for order in orders]
            sync = self.is_sync_step[step]
            with strategy.micro_step(sync):
                objective = None
                for index in indexes:
                    local_rows = int(index.numel())
                    if not local_rows:
                        continue
                    loss = context.loss(model, context.fetch(index))
                    # Weight so that the all-reduce *average* equals the mean over all rows of
                    # the update (every agent, every accumulated micro-step), also when shards
                    # are uneven and this agent's batch is short or empty.
                    part = self.guard.checked(loss, loss * (local_rows * world_size / self.update_rows[step]))
                    if self.guard.last_finite:
                        loss_sum += self.guard.last_value * local_rows
                    objective = part if objective is None else objective + part
                if objective is None:
                    objective = context.zero_loss(model)  # still joins the collective with zero gradient
                heartbeat.set("backward pass and gradient synchronisation", waiting=sync, epoch=epoch, step=step,
                              updates=self.updates)
                strategy.step(objective, sync)
            self.steps_run += 1
            if sync:
                self._after_update(epoch, step, loss_sum)
            if paced is not None:
                paced.after_step(step - first_step, last=step == self.steps - 1)
        heartbeat.set("end of epoch: summing the loss over agents", waiting=True, epoch=epoch, step=None)
        mine = float(sum(rows for _, _, rows in context.parts))
        # and in slot 2 + rank, this rank's seconds outside the exchange (where the strategy times it)
        totals = torch.zeros(2 + world_size, dtype=torch.float64, device=context.device)
        totals[0], totals[1] = loss_sum, mine
        if exchanged is not None:
            totals[2 + context.rank] = time.perf_counter() - started - (strategy.exchange_seconds - exchanged)
        dist.all_reduce(totals)
        seconds = time.perf_counter() - started
        samples = int(totals[1].item())
        record = {"train_loss": float(totals[0].item() / max(samples, 1)), "samples": samples,
                  "seconds": seconds, "samples_per_s": samples / seconds if seconds > 0 else None}
        if exchanged is not None:  # the slowest agent's computation: every exchange waits for it
            record["compute_seconds"] = float(totals[2:].max().item())
        if paced is not None:
            record["paced_compute_seconds"] = paced.total(context.device)
        return record

    def _after_update(self, epoch: int, step: int, loss_sum: float) -> None:
        self.updates += 1
        check_every = self.config.check_every
        if check_every and self.strategy.replicas_identical and self.updates % check_every == 0:
            check_replicas(self.strategy.trained_module, self.context.device, f"after update {self.updates}")
        if self.every is not None and self.every.unit == "steps" and self.updates % self.every.count == 0:
            self._checkpoint(epoch, step + 1, loss_sum)

    # -------------------------------------------------------------- checkpoints

    def _checkpoint(self, epoch: int, step: int, loss_sum: float) -> None:
        """Collective: gather what each rank must keep; rank 0 writes the checkpoint."""
        context, strategy, config = self.context, self.strategy, self.config
        self.checkpointed = (epoch, step)
        context.heartbeat.set("writing a checkpoint" if context.rank == 0 else "waiting for rank 0's checkpoint",
                              waiting=context.rank != 0)
        mine: dict[str, Any] = {"rng": torch.get_rng_state(), "loss_sum": float(loss_sum),
                                "strategy": strategy.state_dict()}
        if context.device.type == "cuda":
            mine["cuda_rng"] = torch.cuda.get_rng_state(context.device)
        if not strategy.replicas_identical:
            mine["model"] = cpu_state(strategy.trained_module.state_dict())
            mine["optimizer"] = strategy.optimizer.state_dict()
        gathered: list[Any] | None = [None] * context.world_size if context.rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if context.rank != 0:
            return
        state = {
            "settings": config.resume_record(), "shard_sizes": context.shard_sizes,
            "epoch": epoch, "step": step, "updates": self.updates, "history": self.history,
            "ranks": gathered,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "stopper": self.stopper.state_dict() if self.stopper is not None else None,
        }
        if strategy.replicas_identical:
            state["model"] = cpu_state(strategy.trained_module.state_dict())
            state["optimizer"] = strategy.optimizer.state_dict()
        path = write_checkpoint(config.checkpoint_dir, state, self.updates, config.keep_checkpoints)
        log.info("checkpoint written: %s (epoch %d, step %d)", path, epoch + 1, step)

    def resume(self, state: dict[str, Any]) -> None:
        """Continue exactly where the checkpoint ``state`` left off (every rank calls this)."""
        context, strategy = self.context, self.strategy
        if state["shard_sizes"] != context.shard_sizes:
            raise ValueError(
                f"the checkpoint was written for shards of {state['shard_sizes']} rows but this "
                f"fit's agents hold {context.shard_sizes}: the input data changed. Resume with the same "
                "DataFrame, or start a new run in an empty checkpoint_dir."
            )
        ranks = state["ranks"]
        if len(ranks) == context.world_size:
            mine = ranks[context.rank]
        else:  # elastic: written by another number of agents (replicas identical: one model and optimiser)
            mine = dict(ranks[min(context.rank, len(ranks) - 1)],
                        loss_sum=sum(r["loss_sum"] for r in ranks) if context.rank == 0 else 0.0)
            log.info("resuming a checkpoint of %d agents with %d", len(ranks), context.world_size)
        strategy.trained_module.load_state_dict(mine.get("model") or state["model"])
        strategy.optimizer.load_state_dict(mine.get("optimizer") or state["optimizer"])
        strategy.load_state_dict(mine["strategy"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.stopper is not None and state["stopper"] is not None:
            self.stopper.load_state_dict(state["stopper"])
        torch.set_rng_state(mine["rng"])
        if context.device.type == "cuda" and mine.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(mine["cuda_rng"], context.device)
        self.history = list(state["history"])
        self.start_epoch, self.start_step = int(state["epoch"]), int(state["step"])
        self.start_loss_sum, self.updates = float(mine["loss_sum"]), int(state["updates"])


class PacedCompute:
    """The computation a lock-step epoch waits for: between every two exchanges, the slowest agent's
    seconds outside the exchange, summed (``paced_compute_seconds``; at least ``compute_seconds``,
    the slowest agent's total, which lets the agents' per-step jitter count as exchange). Each agent
    writes its computation since the last exchange into the slot of the step that exchanged (every
    agent exchanges at the same steps); one MAX all-reduce over the epoch's steps at its end."""

    def __init__(self, strategy: Any, started: float, steps: int) -> None:
        self._strategy = strategy
        self._since, self._exchange_seconds, self._exchanges = started, strategy.exchange_seconds, strategy.exchanges
        self._slots = torch.zeros(steps, dtype=torch.float64)

    def after_step(self, slot: int, last: bool) -> None:
        """Close the segment if the step exchanged (or is the epoch's last: the epoch's end waits)."""
        strategy = self._strategy
        if strategy.exchanges == self._exchanges and not last:
            return
        now = time.perf_counter()
        self._slots[slot] += now - self._since - (strategy.exchange_seconds - self._exchange_seconds)
        self._since, self._exchange_seconds, self._exchanges = now, strategy.exchange_seconds, strategy.exchanges

    def total(self, device: torch.device) -> float:
        """Collective: the sum over segments of the slowest agent's computation."""
        slots = self._slots.to(device)
        dist.all_reduce(slots, op=dist.ReduceOp.MAX)
        return float(slots.sum().item())
