"""``spark_ddl.run``'s executor side: the user's own function, called in every agent once the
process group exists, with a ``FunctionContext`` for the shard's batches, progress reports and
the fast gradient all-reduce."""

from __future__ import annotations

import json
from typing import Any, Iterator

import pyarrow as pa
import torch
import torch.distributed as dist
from torch import nn

from spark_ddl.agent.delivery import deliver
from spark_ddl.agent.heartbeat import Heartbeat
from spark_ddl.agent.loops.common import RECENT_EPOCHS
from spark_ddl.agent.rendezvous import leave_group
from spark_ddl.agent.sampling import global_batch_sizes, steps_per_epoch
from spark_ddl.agent.training import AgentSetup, prepare
from spark_ddl.common.wire import REPORT_PAYLOAD, RESULT_PAYLOAD, AgentJob, AgentReport, encode_value
from spark_ddl.sync.host_reduce import FlatGradientReducer


class FunctionContext:
    """What ``fn(ctx)`` gets in every agent of ``spark_ddl.run``.

    Attributes: ``rank``, ``world_size``, ``local_rank`` (among the agents of this machine),
    ``device`` (this agent's GPU or the CPU), ``steps_per_epoch`` (batches every agent yields
    per epoch) and ``batch_weight`` (see ``batches``).
    """

    def __init__(self, job: AgentJob, setup: AgentSetup, heartbeat: Heartbeat) -> None:
        peers = setup.peers
        self.rank, self.world_size = peers.rendezvous.rank, peers.rendezvous.world_size
        same_host = [r for r, key in enumerate(peers.host_keys) if key == peers.host_keys[self.rank]]
        self.local_rank = same_host.index(self.rank)
        self.device = setup.device
        self._config, self._setup, self._heartbeat = job.task.config, setup, heartbeat
        self._has_data = job.task.batch is not None
        self.steps_per_epoch = steps_per_epoch(peers.shard_sizes, job.task.config.batch_size) if self._has_data else 0
        self._global_rows = global_batch_sizes(peers.shard_sizes, job.task.config.batch_size, self.steps_per_epoch)
        self.batch_weight = 1.0
        self.history: list[dict[str, Any]] = []
        self._reducer: FlatGradientReducer | None = None
        self._reduced: list[nn.Parameter] = []

    def batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """This agent's batches of ``epoch`` (dicts of named tensors, ``"label"`` included when
        there is a label column), ``steps_per_epoch`` of them on every agent, so lock-step code
        cannot hang on uneven shards: once this agent's shard runs out, its batches are empty
        (0 rows). ``batch_weight`` is then this agent's rows × world_size / all agents' rows of
        the step: multiply a batch-mean loss by it and the average of the agents' gradients is
        the mean over every row of the step (1.0 when all shards are full)."""
        if not self._has_data:
            raise ValueError("spark_ddl.run was given no DataFrame: there are no batches to iterate")
        config, shard = self._config, self._setup.shard
        fetch, index_device = shard.batch_source(self.device)
        order = shard.epoch_order(epoch, config.shuffle, config.seed, self.rank).to(index_device)
        for step in range(self.steps_per_epoch):
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            total = self._global_rows[step]
            self.batch_weight = len(index) * self.world_size / total if total else 0.0
            self._heartbeat.set("the user's function", epoch=epoch, step=step)
            yield fetch(index)

    def report(self, **metrics: Any) -> None:
        """Record metrics (e.g. ``epoch=1, loss=0.3``): rank 0's records are the run's history and
        its live progress on the driver."""
        record = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        json.dumps(record)  # a record must be JSON: fail here, in the user's code, if it is not
        self.history.append(record)
        if self.rank == 0:
            first = max(0, len(self.history) - RECENT_EPOCHS)  # report_index: what the driver tells apart
            shown = [dict(r, epoch=r.get("epoch", i + 1), report_index=i + 1)
                     for i, r in enumerate(self.history[first:], first)]
            self._heartbeat.set("the user's function", recent_epochs=shown)

    def allreduce_gradients(self, model: nn.Module) -> None:
        """Average the gradients of ``model``'s trainable parameters over every agent, the way
        the built-in loop does (CPU: one flat buffer through shared memory between agents of a
        machine; otherwise one all-reduce of the flattened gradients). Every agent must call it
        at the same steps."""
        params = [p for p in model.parameters() if p.requires_grad]
        if self.device.type == "cpu" and len({p.dtype for p in params}) == 1:
            if self._reducer is None or self._reduced != params:
                if self._reducer is not None:
                    self._reducer.close()
                grads = [p.grad.clone() if p.grad is not None else None for p in params]
                self._reducer = FlatGradientReducer(params, self._setup.peers.host_keys, self._config.timeout)
                self._reduced = params
                self._restore(grads)
            self._reducer.adopt_gradients()
            self._reducer.average()
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for param in params:
            param.grad = flat[offset : offset + param.numel()].view_as(param).clone()
            offset += param.numel()

    def _restore(self, grads: list[torch.Tensor | None]) -> None:
        with torch.no_grad():
            for param, grad in zip(self._reduced, grads):
                if grad is not None:
                    param.grad.copy_(grad)

    def close(self) -> None:
        if self._reducer is not None:
            self._reducer.close()
            self._reducer = None


def run_function(job: AgentJob, context: Any, batches: Iterator[pa.RecordBatch],
                 heartbeat: Heartbeat) -> list[pa.RecordBatch]:
    """Call the user's function in this agent; rank 0 returns its value (and the history)."""
    from pyspark import cloudpickle

    fn = cloudpickle.loads(job.task.function)
    setup = prepare(job, context, batches, heartbeat, require_rows=job.task.batch is not None)
    ctx = FunctionContext(job, setup, heartbeat)
    try:
        heartbeat.set("the user's function")
        value = fn(ctx)
        heartbeat.set("finishing (leaving the group)", waiting=True)
        leave_group(release=ctx.close)
    finally:
        ctx.close()
        setup.shard.close()
    if ctx.rank != 0:
        return []
    kind, data = encode_value(value)
    summary = {"history": ctx.history, "world_size": ctx.world_size, "shard_sizes": setup.peers.shard_sizes,
               "device": setup.plan.device, "backend": setup.plan.backend,
               "rendezvous": setup.peers.rendezvous.route}
    return deliver(job, {RESULT_PAYLOAD: data, REPORT_PAYLOAD: AgentReport(summary, result_format=kind).encode()})
