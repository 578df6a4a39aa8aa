"""The async loop: every agent cycles through its own shard at its own pace, handing each
gradient to an ``AsyncStrategy``, until the strategy's budget of updates is spent. No
collective runs until the end, so a slow agent never stalls the others."""

from __future__ import annotations

from typing import Any

from spark_ddl.agent.loops.common import RECENT_EPOCHS, LoopContext, LoopResult, validate
from spark_ddl.sync.base import AsyncStrategy
from spark_ddl.sync.finite import NonFiniteGuard


class AsyncLoop:
    """Pushes a gradient per update and pulls fresh parameters until the strategy stops it."""

    def __init__(self, context: LoopContext) -> None:
        assert isinstance(context.strategy, AsyncStrategy)
        self.context, self.config, self.strategy = context, context.config, context.strategy
        self._reported_epochs = 0
        self.guard = NonFiniteGuard(self.config.on_nonfinite, context.rank, f" (lr={self.config.lr:g})")
        self.strategy.nonfinite = self.guard

    def resume(self, state: dict[str, Any]) -> None:
        raise ValueError("sync='async' does not resume from checkpoints (refused on the driver)")

    def run(self) -> LoopResult:
        context, config, strategy = self.context, self.config, self.strategy
        model, rows = strategy.module, context.train.num_rows
        model.train()
        order, position, local_epoch, step = None, rows, -1, 0
        running = strategy.start()
        while running:
            batches = []
            for _ in range(config.accumulate_steps):  # one update's micro-batches
                if position >= rows:  # next pass over this agent's shard, freshly shuffled
                    local_epoch += 1
                    order = context.train.epoch_order(local_epoch, config.shuffle, config.seed,
                                                      context.rank).to(context.index_device)
                    position = 0
                batches.append(order[position : position + config.batch_size])
                position += len(batches[-1])
            update_rows = sum(len(index) for index in batches)
            loss_sum = 0.0
            for number, index in enumerate(batches):
                context.heartbeat.set("forward pass (model code)", epoch=local_epoch, step=step)
                context.before_step(local_epoch, step)
                self.guard.at(local_epoch, step)
                loss = context.loss(model, context.fetch(index))
                objective = self.guard.checked(loss, loss * (len(index) / update_rows))
                loss_sum += float(loss.detach()) * len(index)
                last = number == len(batches) - 1
                context.heartbeat.set("backward pass, pushing the gradient and pulling parameters" if last
                                      else "backward pass", waiting=last, epoch=local_epoch, step=step)
                strategy.step(objective, last, loss_sum=loss_sum, rows=update_rows)
                step += 1
            running = strategy.running
            self._report_progress()
        context.heartbeat.set("waiting for the other agents to finish", waiting=True, step=None)
        strategy.finish()
        self._report_progress("finishing (final parameters, validation)")  # the last pushes came from peers
        history = strategy.history()
        if config.has_validation:  # the parameters as they were at each epoch's end, on every agent
            epoch = 0
            while strategy.load_epoch_snapshot(epoch):
                record = validate(context, strategy.trained_module)
                if history:
                    history[epoch].update(record)
                epoch += 1
        return LoopResult(history, epochs_run=len(history), steps_run=step)

    def _report_progress(self, phase: str = "forward pass (model code)") -> None:
        """Where the strategy knows the global progress (rank 0): updates by every agent and the
        finished epochs' training loss, for the driver's progress output."""
        progress = self.strategy.progress()
        if progress is None:
            return
        updates, per_epoch = progress
        fields: dict[str, Any] = {}
        if updates // per_epoch > self._reported_epochs:  # an epoch ended: its record goes out
            finished = self.strategy.finished_epochs()
            self._reported_epochs = len(finished)
            fields["recent_epochs"] = finished[-RECENT_EPOCHS:]
        self.context.heartbeat.set(phase, epochs=self.config.epochs, steps_per_epoch=per_epoch,
                                   steps_done=updates, **fields)
