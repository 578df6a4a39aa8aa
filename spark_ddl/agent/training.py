"""One agent's training, start to finish: read the shard, meet the peers, build the model and
the strategy, run the loop, check the replicas, leave the group together, and (rank 0) hand
back the result rows."""

from __future__ import annotations

import os
from dataclasses import astuple, dataclass, fields
from typing import Any, Callable, Iterator

import pyarrow as pa
import torch
import torch.distributed as dist

from spark_ddl.agent.delivery import deliver
from spark_ddl.agent.heartbeat import Heartbeat
from spark_ddl.agent.loops import LoopContext, LoopResult, make_loop
from spark_ddl.agent.memory import (log_memory, map_large_allocations, minor_page_faults, peak_rss_bytes,
                                    release_free_memory, reset_peak_rss, reuse_heap_memory)
from spark_ddl.agent.parts import Part, ShardCounter, shard_sizes
from spark_ddl.agent.rendezvous import (DriverRendezvous, Rendezvous, environment_fingerprint, init_process_group,
                                        leave_group, rendezvous)
from spark_ddl.agent.sampling import ShardRows
from spark_ddl.agent.shard import Shard
from spark_ddl.common.batch_format import BatchSpec
from spark_ddl.common.devices import DevicePlan, select_device, task_gpu_addresses
from spark_ddl.common.objectives import label_dtype_for
from spark_ddl.common.optimizers import load_optimizer_state, make_optimizer
from spark_ddl.common.train_config import TrainConfig
from spark_ddl.common.wire import OPTIMIZER_PAYLOAD, REPORT_PAYLOAD, WEIGHTS_PAYLOAD, AgentJob, AgentReport
from spark_ddl.formats.checkpoint import read_checkpoint
from spark_ddl.formats.model_bytes import optimizer_state_from_bytes, optimizer_state_to_bytes, state_dict_from_bytes
from spark_ddl.formats.weights_stream import ShippedWeights, WeightsWriter
from spark_ddl.sync import StrategyEnv, SyncStrategy, make_strategy
from spark_ddl.sync.base import AsyncStrategy
from spark_ddl.sync.guard import check_replicas
from spark_ddl.sync.host_reduce import host_key


@dataclass(frozen=True)
class Peers:
    """What the rendezvous established, the same on every rank."""

    rendezvous: Rendezvous
    shard_sizes: list[int]  # training rows per rank
    validation_sizes: list[int]
    batch: BatchSpec  # the inputs as the agents agreed on them (which arrays are ragged)
    row_shapes: dict[str, tuple[int, ...]]  # each fixed-shape input's row shape
    host_keys: list[str]
    parts: list[Part] | None = None  # this agent's shards (elastic) or None: its own partition only


@dataclass
class AgentSetup:
    """One agent, ready to train: its device, its rows, and its peers (process group joined)."""

    plan: DevicePlan
    device: torch.device
    threads: int
    shard: ShardRows
    validation: ShardRows
    peers: Peers
    rss_before_data: int


@dataclass(frozen=True)
class RankStats:
    """Facts each rank reports about itself at the end (gathered to rank 0 for the summary)."""

    epochs_run: int
    steps_run: int
    peak_rss_bytes: int
    shard_feature_bytes: int
    rss_before_data_bytes: int
    skipped_updates: int  # non-finite updates skipped (on_nonfinite='skip')
    training_page_faults: int  # minor page faults while the loop ran (a steady step should cause none)

    def gather(self, device: torch.device) -> list["RankStats"]:
        """Collective: every rank's stats, indexed by rank."""
        mine = torch.tensor(astuple(self), dtype=torch.int64, device=device)
        everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, mine)
        return [RankStats(*(int(v) for v in t.tolist())) for t in everyone]


def prepare(job: AgentJob, context: Any, batches: Iterator[pa.RecordBatch], heartbeat: Heartbeat,
            require_rows: bool = True) -> AgentSetup:
    """Device, shard, rendezvous and process group: everything before the model. The caller
    closes ``setup.shard`` when done. A job without a batch spec reads no rows (its partitions
    only place the agents)."""
    config, rank = job.task.config, context.partitionId()
    torch.set_num_threads(max(1, int(context.cpus() or 1)))
    torch.manual_seed(config.seed + rank)
    plan = select_device(config.use_gpu, task_gpu_addresses(context), torch.cuda.is_available(),
                         torch.cuda.device_count() if torch.cuda.is_available() else 0, local_rank=rank)
    # opened first: an agent that cannot reach the driver fails before it reads its partition
    attempt = job.attempt
    via = DriverRendezvous(attempt.monitor_address, attempt.monitor_secret, context, config.timeout) \
        if attempt.meet_through_driver and attempt.monitor_address is not None else None
    try:
        return _prepare(job, context, batches, heartbeat, require_rows, plan, via)
    finally:
        if via is not None:
            via.close()


def _prepare(job: AgentJob, context: Any, batches: Iterator[pa.RecordBatch], heartbeat: Heartbeat,
             require_rows: bool, plan: DevicePlan, via: DriverRendezvous | None) -> AgentSetup:
    task, agents, rank = job.task, job.attempt.agents, context.partitionId()
    config = task.config
    device = torch.device(plan.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    heartbeat.set("reading the partition")
    release_free_memory()
    map_large_allocations()
    reset_peak_rss()
    rss_before_data = peak_rss_bytes()
    log_memory("before reading the partition")
    custom = config.train_step is not None or task.function is not None  # the user's code takes the labels as they are
    dtype = label_dtype_for(config.loss, task.label_is_integer, custom_step=custom)
    counter = ShardCounter() if agents is not None else None
    if counter is not None:
        batches = counter.count(batches)
    if task.batch is None:
        for _ in batches:  # rows that only mark the partition
            pass
        shard = validation = Shard.of(torch.zeros(0, 0), torch.zeros(0))
    else:
        shard, validation = Shard.from_arrow(batches, dtype, config.spill_bytes, task.batch)
    try:
        heartbeat.set("rendezvous with the other agents", waiting=True)
        parts = counter.parts(rank, config.num_workers, agents) if counter is not None else None
        peers = meet_peers(config, task.batch or shard.spec, context, shard, validation, plan, require_rows, parts,
                           agents, via)
        shard = shard.settle(peers.batch, peers.row_shapes)
        validation = validation.settle(peers.batch, peers.row_shapes)
        log_memory("after reading the partition")
        reuse_heap_memory()  # the shard is built: training's allocations come from the heap again
        init_process_group(peers.rendezvous, plan.backend, config.timeout)
    except BaseException:
        shard.close()
        raise
    return AgentSetup(plan, device, torch.get_num_threads(), shard, validation, peers, rss_before_data)


def train(job: AgentJob, context: Any, batches: Iterator[pa.RecordBatch], heartbeat: Heartbeat) -> list[pa.RecordBatch]:
    """Train this partition with the other barrier tasks; rank 0 returns the result rows."""
    config, rank = job.task.config, context.partitionId()
    setup = prepare(job, context, batches, heartbeat)
    try:
        heartbeat.set("building the model and the sync strategy")
        strategy = build_strategy(job, setup.device, setup.peers)
        log_memory("after the process group, model and strategy")
        loop_context = LoopContext(config, strategy, setup.shard, setup.validation, setup.peers.shard_sizes, rank,
                                   setup.peers.rendezvous.world_size, setup.device, heartbeat, job.hooks.fail_hook,
                                   batch=setup.peers.batch, row_shapes=setup.peers.row_shapes,
                                   parts=setup.peers.parts, pause_at_epoch_boundary=job.attempt.agents is not None)
        loop = make_loop(loop_context)
        if config.resume_from is not None:
            heartbeat.set("loading the checkpoint", waiting=rank != 0)
            loop.resume(load_checkpoint_everywhere(config.resume_from, rank))
        faults_before = minor_page_faults()
        result = loop.run()  # ends with strategy.finish()
        training_faults = minor_page_faults() - faults_before
        heartbeat.set("finishing (final checks, leaving the group)", waiting=True)
        log_memory("after training")
        stats = RankStats(result.epochs_run, result.steps_run, peak_rss_bytes(), setup.shard.data_bytes(),
                          setup.rss_before_data, result.skipped_updates, training_faults)
        return finish(job, strategy, result, stats, setup, job.hooks.final_hook)
    finally:
        setup.shard.close()  # a disk shard's file goes with it


def meet_peers(config: TrainConfig, spec: BatchSpec, context: Any, shard: ShardRows, validation: ShardRows,
               plan: DevicePlan, require_rows: bool = True, parts: list[Part] | None = None,
               agents: int | None = None, via: DriverRendezvous | None = None) -> Peers:
    """The rendezvous, and what every rank settles from what the others hold: the row counts,
    each input's row shape, and which arrays are ragged (rows of more than one length)."""
    info = {
        "rows": shard.num_rows,
        "validation_rows": validation.num_rows,
        "row_shapes": {**validation.row_shapes(), **shard.row_shapes()},
        "lengths": _merged_lengths(shard.lengths(), validation.lengths()),
        "host": os.uname().nodename,
        "host_key": host_key(),
        "device": plan.device,
        "fingerprint": environment_fingerprint(plan.backend),
        "parts": parts,
    }
    rdv = rendezvous(context, info, config.timeout, via)
    if rdv.world_size != (config.num_workers if parts is None else agents):
        raise RuntimeError(
            f"Spark ran {rdv.world_size} barrier task(s) but num_workers={config.num_workers}: the "
            "input's partitions changed between planning and execution (e.g. adaptive query "
            "execution coalesced them). Repartition the input to num_workers partitions."
        )
    sizes = ([int(p["rows"]) for p in rdv.peers] if parts is None
             else shard_sizes([p["parts"] for p in rdv.peers], config.num_workers))  # elastic: per shard
    if sum(sizes) == 0 and require_rows:
        raise ValueError("the training DataFrame is empty: every partition has 0 training rows")
    if config.has_validation and not any(p["validation_rows"] for p in rdv.peers):
        raise ValueError("the validation set is empty: no row is marked for validation")
    shapes: dict[str, tuple[int, ...]] = {}
    for field in spec.inputs:
        seen = sorted({tuple(p["row_shapes"][field.name]) for p in rdv.peers if field.name in p["row_shapes"]})
        if len(seen) > 1:
            what = "feature arrays of different lengths" if spec.positional else f"{field.name!r} rows of different shapes"
            raise ValueError(f"agents hold {what}: {[list(s) if len(s) != 1 else s[0] for s in seen]}")
        if seen:
            shapes[field.name] = seen[0]
    lengths = _merged_lengths(*(p["lengths"] for p in rdv.peers))
    varying = [name for name, (low, high) in lengths.items() if low != high]
    for name, (low, _) in lengths.items():
        if name not in varying and not spec.field(name).ragged:
            shapes[name] = (low,)  # one length everywhere: a fixed-shape input after all
    return Peers(rdv, sizes, [int(p["validation_rows"]) for p in rdv.peers], spec.with_ragged(varying), shapes,
                 [p["host_key"] for p in rdv.peers], parts)


def _merged_lengths(*many: dict[str, Any]) -> dict[str, tuple[int, int]]:
    merged: dict[str, tuple[int, int]] = {}
    for lengths in many:
        for name, (low, high) in lengths.items():
            old = merged.get(name, (low, high))
            merged[name] = (min(old[0], low), max(old[1], high))
    return merged


def build_strategy(job: AgentJob, device: torch.device, peers: Peers) -> SyncStrategy:
    """The network (rebuilt from the job's model source) wrapped in its set-up strategy; a warm
    start loads its weights before the setup (which makes the replicas equal) and its optimiser
    state after it (the optimiser exists only then)."""
    task = job.task
    config = task.config
    weights = task.module_weights  # an architecture-only pickle's weights (bytes, or a shipped file)
    # every rank builds with the fit's seed, so the replicas usually start equal and the setup only
    # compares them; each rank's own random stream (seed + rank: dropout, sampling) goes on after
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(config.seed)
        module = task.model.build("train", weights.open if isinstance(weights, ShippedWeights) else weights)
    if task.initial_weights is not None:
        module.load_state_dict(state_dict_from_bytes(task.initial_weights))
    module = module.to(device)
    if task.strategy_factory is not None:
        strategy = task.strategy_factory(device)
    else:
        strategy = make_strategy(config, config.sync, StrategyEnv(device, peers.shard_sizes, peers.host_keys))
    strategy.setup(module, lambda params: make_optimizer(config.optimizer, params, config.lr, config.optimizer_kwargs,
                                                         config.grad_clip_norm))
    if task.initial_optimizer is not None:
        load_optimizer_state(strategy.optimizer, optimizer_state_from_bytes(task.initial_optimizer))
    return strategy


def finish(job: AgentJob, strategy: SyncStrategy, result: LoopResult, stats: RankStats, setup: AgentSetup,
           final_hook: Callable[[int, Any], None] | None = None) -> list[pa.RecordBatch]:
    """Final checks and facts (collective), leave the group together, then rank 0's result rows.
    ``final_hook`` (tests only) sees every rank's module after the replica check."""
    device, peers = setup.device, setup.peers
    check_replicas(strategy.trained_module, device, "at the end of training")
    rank = peers.rendezvous.rank
    if final_hook is not None:
        final_hook(rank, strategy.trained_module)
    per_rank = stats.gather(device)
    if result.best_state is not None:  # early stopping: rank 0 returns the best epoch's weights
        strategy.trained_module.load_state_dict(result.best_state)
    module = strategy.trained_module
    optimizer = optimizer_state_to_bytes(strategy.optimizer.state_dict()) if rank == 0 else b""
    strategy_summary = strategy.summary()
    leave_group(release=strategy.close)
    if rank != 0:
        return []
    if result.paused_after_epoch is not None:  # elastic: the driver continues with another agent count
        return deliver(job, {REPORT_PAYLOAD: AgentReport(paused_after_epoch=result.paused_after_epoch).encode()})
    summary = {
        "history": result.history, "world_size": peers.rendezvous.world_size, "shard_sizes": peers.shard_sizes,
        "rendezvous": peers.rendezvous.route, "validation_sizes": peers.validation_sizes,
        "device": setup.plan.device, "backend": setup.plan.backend, "threads_per_agent": setup.threads,
        "best_epoch": result.best_epoch, "initial_broadcast": strategy.initial_broadcast,
        "shard_storage": "memory" if isinstance(setup.shard, Shard) else "disk",
        "stopped_early": result.stopped_early, "skipped_updates": result.skipped_at,
        **{f"{f.name}_per_rank": [getattr(s, f.name) for s in per_rank] for f in fields(RankStats)},
        **strategy_summary,
    }
    if isinstance(strategy, AsyncStrategy):
        del summary["epochs_run_per_rank"]  # async agents share the epochs: there is no per-rank count
    # rank 0's optimiser goes too: what a warm start continues
    return deliver(job, {WEIGHTS_PAYLOAD: WeightsWriter(module), OPTIMIZER_PAYLOAD: optimizer,
                         REPORT_PAYLOAD: AgentReport(summary, batch=peers.batch, row_shapes=peers.row_shapes).encode()})


def load_checkpoint_everywhere(path: str, rank: int) -> dict[str, Any]:
    """Collective: rank 0 reads the checkpoint and every rank receives it (no shared
    filesystem needed for reading)."""
    holder = [read_checkpoint(path) if rank == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
