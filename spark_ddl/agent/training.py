"""One agent's training, start to finish: read the shard, meet the peers, build the model and
the strategy, run the loop, check the replicas, leave the group together, and (rank 0) hand
back the result rows."""

from __future__ import annotations

import json
import os
from dataclasses import astuple, dataclass, fields
from typing import Any, Callable, Iterator

import pyarrow as pa
import torch
import torch.distributed as dist

from spark_ddl.agent.heartbeat import Heartbeat
from spark_ddl.agent.loops import LoopContext, LoopResult, make_loop
from spark_ddl.agent.memory import log_memory, map_large_allocations, peak_rss_bytes, reset_peak_rss
from spark_ddl.agent.rendezvous import Rendezvous, environment_fingerprint, init_process_group, leave_group, rendezvous
from spark_ddl.agent.sampling import ShardRows
from spark_ddl.agent.shard import Shard
from spark_ddl.artifact import state_dict_to_bytes
from spark_ddl.checkpoint import read_checkpoint
from spark_ddl.config import TrainConfig
from spark_ddl.devices import DevicePlan, select_device, task_gpu_addresses
from spark_ddl.objectives import label_dtype, make_optimizer
from spark_ddl.sync import StrategyEnv, SyncStrategy, make_strategy
from spark_ddl.sync.base import AsyncStrategy
from spark_ddl.sync.guard import check_replicas
from spark_ddl.sync.host_reduce import host_key
from spark_ddl.wire import AgentJob, output_batches


@dataclass(frozen=True)
class Peers:
    """What the rendezvous established, the same on every rank."""

    rendezvous: Rendezvous
    shard_sizes: list[int]  # training rows per rank
    validation_sizes: list[int]
    feature_dim: int
    host_keys: list[str]


@dataclass(frozen=True)
class RankStats:
    """Facts each rank reports about itself at the end (gathered to rank 0 for the summary)."""

    epochs_run: int
    steps_run: int
    peak_rss_bytes: int
    shard_feature_bytes: int
    rss_before_data_bytes: int

    def gather(self, device: torch.device) -> list["RankStats"]:
        """Collective: every rank's stats, indexed by rank."""
        mine = torch.tensor(astuple(self), dtype=torch.int64, device=device)
        everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, mine)
        return [RankStats(*(int(v) for v in t.tolist())) for t in everyone]


def train(job: AgentJob, context: Any, batches: Iterator[pa.RecordBatch], heartbeat: Heartbeat) -> list[pa.RecordBatch]:
    """Train this partition with the other barrier tasks; rank 0 returns the result rows."""
    config, rank = job.config, context.partitionId()
    threads = max(1, int(context.cpus() or 1))
    torch.set_num_threads(threads)
    torch.manual_seed(config.seed + rank)
    plan = select_device(config.use_gpu, task_gpu_addresses(context), torch.cuda.is_available(),
                         torch.cuda.device_count() if torch.cuda.is_available() else 0, local_rank=rank)
    device = torch.device(plan.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    heartbeat.set("reading the partition")
    map_large_allocations()
    reset_peak_rss()
    rss_before_data = peak_rss_bytes()
    log_memory("before reading the partition")
    shard, validation = Shard.from_arrow(batches, label_dtype(config.loss), config.spill_bytes)
    try:
        heartbeat.set("rendezvous with the other agents", waiting=True)
        peers = meet_peers(config, context, shard, validation, plan)
        shard, validation = shard.with_feature_dim(peers.feature_dim), validation.with_feature_dim(peers.feature_dim)
        log_memory("after reading the partition")
        init_process_group(peers.rendezvous, plan.backend, config.timeout)
        heartbeat.set("building the model and the sync strategy")
        strategy = build_strategy(job, device, peers)
        log_memory("after the process group, model and strategy")
        loop_context = LoopContext(config, strategy, shard, validation, peers.shard_sizes, rank,
                                   peers.rendezvous.world_size, device, heartbeat, job.fail_hook)
        loop = make_loop(loop_context)
        if config.resume_from is not None:
            heartbeat.set("loading the checkpoint", waiting=rank != 0)
            loop.resume(load_checkpoint_everywhere(config.resume_from, rank))
        result = loop.run()  # ends with strategy.finish()
        heartbeat.set("finishing (final checks, leaving the group)", waiting=True)
        log_memory("after training")
        stats = RankStats(result.epochs_run, result.steps_run, peak_rss_bytes(), shard.num_rows * (shard.feature_dim or 0) * 4,
                          rss_before_data)
        return finish(strategy, result, stats, peers, plan, threads, shard, device, job.final_hook)
    finally:
        shard.close()  # a disk shard's file goes with it


def meet_peers(config: TrainConfig, context: Any, shard: ShardRows, validation: ShardRows,
               plan: DevicePlan) -> Peers:
    """The rendezvous, and the checks every rank makes on what the others hold."""
    info = {
        "rows": shard.num_rows,
        "validation_rows": validation.num_rows,
        "feature_dim": shard.feature_dim or validation.feature_dim,
        "host": os.uname().nodename,
        "host_key": host_key(),
        "device": plan.device,
        "fingerprint": environment_fingerprint(plan.backend),
    }
    rdv = rendezvous(context, info, config.timeout)
    if rdv.world_size != config.num_workers:
        raise RuntimeError(
            f"Spark ran {rdv.world_size} barrier task(s) but num_workers={config.num_workers}: the "
            "input's partitions changed between planning and execution (e.g. adaptive query "
            "execution coalesced them). Repartition the input to num_workers partitions."
        )
    sizes = [int(p["rows"]) for p in rdv.peers]
    dims = {p["feature_dim"] for p in rdv.peers if p["feature_dim"] is not None}
    if sum(sizes) == 0:
        raise ValueError("the training DataFrame is empty: every partition has 0 training rows")
    if config.has_validation and not any(p["validation_rows"] for p in rdv.peers):
        raise ValueError("the validation set is empty: no row is marked for validation")
    if len(dims) > 1:
        raise ValueError(f"agents hold feature arrays of different lengths: {sorted(dims)}")
    return Peers(rdv, sizes, [int(p["validation_rows"]) for p in rdv.peers], dims.pop(),
                 [p["host_key"] for p in rdv.peers])


def build_strategy(job: AgentJob, device: torch.device, peers: Peers) -> SyncStrategy:
    """The network (rebuilt from the job's model source) wrapped in its set-up strategy."""
    config = job.config
    module = job.model.build("train").to(device)
    if job.strategy_factory is not None:
        strategy = job.strategy_factory(device)
    else:
        strategy = make_strategy(config, config.sync, StrategyEnv(device, peers.shard_sizes, peers.host_keys))
    strategy.setup(module, lambda params: make_optimizer(config.optimizer, params, config.lr, config.optimizer_kwargs,
                                                         config.grad_clip_norm))
    return strategy


def finish(strategy: SyncStrategy, result: LoopResult, stats: RankStats, peers: Peers, plan: DevicePlan,
           threads: int, shard: ShardRows, device: torch.device,
           final_hook: Callable[[int, Any], None] | None = None) -> list[pa.RecordBatch]:
    """Final checks and facts (collective), leave the group together, then rank 0's result rows.
    ``final_hook`` (tests only) sees every rank's module after the replica check."""
    check_replicas(strategy.trained_module, device, "at the end of training")
    rank = peers.rendezvous.rank
    if final_hook is not None:
        final_hook(rank, strategy.trained_module)
    per_rank = stats.gather(device)
    if result.best_state is not None:  # early stopping: rank 0 returns the best epoch's weights
        strategy.trained_module.load_state_dict(result.best_state)
    weights = state_dict_to_bytes(strategy.trained_module) if rank == 0 else b""
    strategy_summary = strategy.summary()
    leave_group(release=strategy.close)
    if rank != 0:
        return []
    summary = {
        "history": result.history, "world_size": peers.rendezvous.world_size, "shard_sizes": peers.shard_sizes,
        "validation_sizes": peers.validation_sizes, "feature_dim": peers.feature_dim,
        "device": plan.device, "backend": plan.backend, "threads_per_agent": threads,
        "best_epoch": result.best_epoch,
        "shard_storage": "memory" if isinstance(shard, Shard) else "disk",
        "stopped_early": result.stopped_early,
        **{f"{f.name}_per_rank": [getattr(s, f.name) for s in per_rank] for f in fields(RankStats)},
        **strategy_summary,
    }
    if isinstance(strategy, AsyncStrategy):
        del summary["epochs_run_per_rank"]  # async agents share the epochs: there is no per-rank count
    return [
        *output_batches("summary", 0, json.dumps(summary).encode()),
        *output_batches("weights", 0, weights),
    ]


def load_checkpoint_everywhere(path: str, rank: int) -> dict[str, Any]:
    """Collective: rank 0 reads the checkpoint and every rank receives it (no shared
    filesystem needed for reading)."""
    holder = [read_checkpoint(path) if rank == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
