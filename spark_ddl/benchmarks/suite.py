"""The performance suite: launch overhead, training throughput over batch sizes, ingest,
inference and memory, side by side in one warm local[2] session, each against its reference,
with medians.

    spark-ddl bench suite --json bench_results/suite.json
    spark-ddl bench suite --rows 100000 --repeats 2 --batch-sizes 128 --skip-distributor   # quicker

Targets (issue "Performance II"): launch ≤ 1.25× the floor and ≥ 5× faster than
TorchDistributor; 2 agents ≥ 1.3×, 1.5×, 1.75×, 1.75× one plain single-thread process at batch
32, 64, 128, 256 per agent; ingest ≥ 0.8× and inference ≥ 0.9× the identity mapInArrow; peak
RSS per agent ≤ 1.5 × shard bytes + model + 300 MB in memory mode, and under the budget with
the disk cache for a shard 3× that budget. The scale curves (agents, model sizes) are
``spark-ddl bench scale``. Last, unless ``--skip-connect``, the launch rows' fit() and
TorchDistributor.run are timed again from a Spark Connect client of a local server (which ends
the classic session).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pyspark.sql import DataFrame

from spark_ddl import TorchEstimator, TorchModel, get_or_create_session
from spark_ddl.apps.options import parse_with_config
from spark_ddl.benchmarks.common import emit, timed
from spark_ddl.benchmarks.imports import import_costs
from spark_ddl.benchmarks.launch import (CONNECT_DISTRIBUTOR, CONNECT_FIT, FLOOR, FLOOR_ALLGATHER, allreduce_once,
                                         connect_launch_times, floor_times)
from spark_ddl.benchmarks.throughput import (CURVE_TARGETS, bare_ddp_samples_per_s, batch_size_curve, mlp_estimator,
                                             steady_samples_per_s, synthetic)
from spark_ddl.common.model_source import ModelSource
from spark_ddl.driver.columns import ColumnSpec, select_training_columns
from spark_ddl.networks import MLP

MB = 2**20


@dataclass
class Table:
    """The suite's result rows: a value, its reference ratio and target verdict."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, part: str, what: str, value: float, unit: str, reference: float | None = None,
            target: str | None = None, ok: bool | None = None) -> None:
        self.rows.append({"part": part, "what": what, "value": value, "unit": unit,
                          "ratio": value / reference if reference else None, "target": target, "ok": ok})

    def print(self) -> None:
        print(f"{'part':<11} {'what':<56} {'value':>12} {'unit':<10} {'ratio':>6}  target")
        for r in self.rows:
            ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else ""
            verdict = "" if r["ok"] is None else ("  ok" if r["ok"] else "  MISSED")
            print(f"{r['part']:<11} {r['what']:<56} {r['value']:>12,.2f} {r['unit']:<10} {ratio:>6}  "
                  f"{r['target'] or ''}{verdict}")


def identity(batches):
    yield from batches


def ingest_only(batches):
    """What an agent does with its partition before training: Arrow batches → tensors."""
    import pyarrow as pa

    from spark_ddl.agent.shard import Shard

    started = time.perf_counter()
    train, _ = Shard.from_arrow(batches, torch.int64)
    seconds = time.perf_counter() - started
    yield pa.RecordBatch.from_pydict({"rows": [train.num_rows], "seconds": [seconds]})


def noop(frame: DataFrame) -> None:
    frame.write.format("noop").mode("overwrite").save()


def launch_part(spark, table: Table, repeats: int, distributor: bool) -> float:
    """The floor, a trivial fit and TorchDistributor; returns the fit's median seconds."""
    tiny = spark.createDataFrame([([float(i), 1.0, 2.0, 3.0], float(i % 2)) for i in range(16)],
                                 "features array<float>, label double").repartition(2).cache()
    tiny.count()
    estimator = TorchEstimator(model=torch.nn.Linear(4, 1), loss="mse", epochs=1, batch_size=8, timeout=60,
                               progress="off")
    floors = {name: statistics.median(times) for name, times in floor_times(spark, repeats).items()}
    floor = floors[FLOOR]
    fit_s = statistics.median(timed(lambda: estimator.fit(tiny), repeats))
    table.add("launch", FLOOR + " (agents meet through the driver, as fit()'s do)", floor, "s")
    table.add("launch", FLOOR_ALLGATHER + " (answers at the next whole second)", floors[FLOOR_ALLGATHER], "s")
    table.add("launch", "fit() of a trivial model", fit_s, "s", floor, "≤ 1.25× floor", fit_s <= 1.25 * floor)
    if distributor:
        from pyspark.ml.torch.distributor import TorchDistributor

        runner = TorchDistributor(num_processes=2, local_mode=False, use_gpu=False)
        dist_s = statistics.median(timed(lambda: runner.run(allreduce_once), max(1, repeats - 1)))
        table.add("launch", "TorchDistributor.run of one all-reduce", dist_s, "s", fit_s, "≥ 5× fit()",
                  dist_s >= 5 * fit_s)
    estimator.fit(tiny)  # the throughput part's Python workers have paid their one-off imports
    return fit_s


def connect_part(table: Table, repeats: int, distributor: bool, classic_fit_s: float) -> None:
    """The launch rows again from a Spark Connect client of a local server."""
    connect = connect_launch_times(repeats, distributor)
    connect_fit = statistics.median(connect[CONNECT_FIT])
    table.add("launch", "fit() from a Spark Connect client (local server)", connect_fit, "s", classic_fit_s,
              "(÷ classic fit)")
    if CONNECT_DISTRIBUTOR in connect:
        table.add("launch", "TorchDistributor.run over Spark Connect", statistics.median(connect[CONNECT_DISTRIBUTOR]),
                  "s", connect_fit, "(÷ Connect fit)")


def throughput_part(data: DataFrame, table: Table, args: argparse.Namespace, hidden: list[int]) -> dict:
    """The batch-size curve (flat and DDP against plain), bare DDP and local SGD at the suite's
    batch size, and the memory rows of one fit; returns the curve and that fit's summary."""
    curve, models = batch_size_curve(data, args.rows, args.features, hidden, args.batch_sizes, args.repeats)
    for point in curve:
        batch, plain = point["batch_size"], point["plain_samples_per_s"]
        target = CURVE_TARGETS.get(batch)
        table.add("throughput", f"batch {batch}: plain PyTorch, 1 process × 1 thread", plain, "samples/s")
        table.add("throughput", f"batch {batch}: fit(), 2 agents (allreduce, flat)", point["flat_samples_per_s"],
                  "samples/s", plain, f"≥ {target}× plain" if target else None,
                  point["flat_ratio"] >= target if target else None)
        table.add("throughput", f"batch {batch}: fit(), 2 agents (allreduce, torch DDP)", point["ddp_samples_per_s"],
                  "samples/s", plain)
    batch, plain = args.batch_size, curve[-1]["plain_samples_per_s"] if curve else None
    bare = bare_ddp_samples_per_s(args.rows // 2, args.features, hidden, batch)
    table.add("throughput", f"batch {batch}: bare torch DDP/gloo, 2 processes, no Spark", bare, "samples/s",
              plain if curve and curve[-1]["batch_size"] == batch else None)
    local_sgd = mlp_estimator(args.features, hidden, batch, args.epochs, sync="local_sgd", sync_every=8).fit(data)
    table.add("throughput", f"batch {batch}: fit(), 2 agents (local_sgd, sync_every=8)",
              steady_samples_per_s(local_sgd), "samples/s")
    model = models.get(batch) or mlp_estimator(args.features, hidden, batch, args.epochs).fit(data)
    memory_rows(table, model)
    return {"curve": curve, "summary": model.summary}


def memory_rows(table: Table, model: TorchModel) -> None:
    """Peak RSS of each agent of ``model``'s fit against its shard, and its RSS before data."""
    model_bytes = sum(p.numel() * 4 for p in model.get_module().parameters())
    summary = model.summary
    for rank, (rss, shard, before) in enumerate(zip(summary["peak_rss_bytes_per_rank"],
                                                    summary["shard_feature_bytes_per_rank"],
                                                    summary["rss_before_data_bytes_per_rank"])):
        allowed = 1.5 * shard + model_bytes + 300 * MB
        table.add("memory", f"agent {rank}: peak RSS (shard {shard / MB:.0f} MB in memory)", rss / MB, "MB",
                  allowed / MB, "≤ 1.5×shard + model + 300 MB", rss <= allowed)
        table.add("memory", f"agent {rank}: RSS before its data (imports, reused worker)", before / MB, "MB",
                  300, "≤ 300 MB", before <= 300 * MB)
        table.add("memory", f"agent {rank}: peak growth over that", (rss - before) / MB, "MB",
                  (1.5 * shard + model_bytes) / MB, "≤ 1.5×shard + model", rss - before <= 1.5 * shard + model_bytes)


def ingest_part(data: DataFrame, table: Table, args: argparse.Namespace) -> float:
    """Arrow batches → agent tensors against the identity mapInArrow; returns the identity's seconds."""
    prepared = select_training_columns(data, ColumnSpec.one_input(("features",), "array", "label"))
    feature_mb = args.rows * args.features * 4 / MB
    identity_s = statistics.median(timed(lambda: noop(data.mapInArrow(identity, data.schema)), args.repeats))
    ingest_s = statistics.median(timed(
        lambda: prepared.mapInArrow(ingest_only, "rows long, seconds double", barrier=True).collect(), args.repeats))
    table.add("ingest", "identity mapInArrow", feature_mb / identity_s, "MB/s")
    table.add("ingest", "DataFrame → agent tensors", feature_mb / ingest_s, "MB/s", feature_mb / identity_s,
              "≥ 0.8× identity", ingest_s <= identity_s / 0.8)
    return identity_s


def inference_part(data: DataFrame, table: Table, args: argparse.Namespace, identity_s: float) -> None:
    """TorchModel.transform against the identity mapInArrow and a plain forward."""
    torch.manual_seed(0)
    kwargs = {"in_features": args.features, "out_features": 10,
              "hidden": [int(h) for h in args.inference_hidden.split(",")]}
    scorer = TorchModel(MLP(**kwargs).eval(), spec=ColumnSpec.one_input(("features",), "array", "label"),
                        config={"loss": "cross_entropy"},
                        source=ModelSource(class_path="spark_ddl.networks:MLP", kwargs=kwargs),
                        row_shapes={"features": (args.features,)})
    scored_s = statistics.median(timed(lambda: noop(scorer.transform(data)), args.repeats))
    x = np.random.default_rng(0).random((min(args.rows, 100_000), args.features), dtype=np.float32)

    def plain_forward() -> None:
        with torch.inference_mode():
            for start in range(0, len(x), 1024):
                torch.softmax(scorer.get_module()(torch.from_numpy(x[start:start + 1024])), dim=1)

    torch.set_num_threads(1)
    forward_s = statistics.median(timed(plain_forward, args.repeats)) * args.rows / len(x)
    table.add("inference", "identity mapInArrow", args.rows / identity_s, "rows/s")
    table.add("inference", f"TorchModel.transform (MLP {args.features}→{args.inference_hidden}→10)",
              args.rows / scored_s, "rows/s", args.rows / identity_s, "≥ 0.9× identity", scored_s <= identity_s / 0.9)
    table.add("inference", "plain torch forward, 1 process × 1 thread", args.rows / forward_s, "rows/s")


def disk_part(spark, table: Table, args: argparse.Namespace) -> None:
    """Peak memory growth of agents whose shards are 3× their budget, kept on disk."""
    budget = args.disk_budget_mb * MB
    rows_per_agent = int(3 * budget / (args.features * 4))
    big = synthetic(spark, 2 * rows_per_agent, args.features, 10, 2, seed=1)
    model = mlp_estimator(args.features, [32], 1024, 1, timeout=1200, shard_storage="disk").fit(big)
    summary = model.summary
    for rank, (rss, shard, before) in enumerate(zip(summary["peak_rss_bytes_per_rank"],
                                                    summary["shard_feature_bytes_per_rank"],
                                                    summary["rss_before_data_bytes_per_rank"])):
        table.add("memory", f"agent {rank}: peak growth, shard {shard / MB:.0f} MB on disk", (rss - before) / MB,
                  "MB", budget / MB, f"< budget {budget / MB:.0f} MB", rss - before < budget)


def parse(argv: list[str] | None, prog: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000, help="synthetic rows for throughput/ingest/inference")
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--hidden", default="512,512", help="MLP hidden sizes (64→512→512→10)")
    parser.add_argument("--batch-sizes", default="32,64,128,256", help="per agent: the throughput curve")
    parser.add_argument("--batch-size", type=int, default=256, help="per agent: bare DDP, local SGD, memory")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-distributor", action="store_true", help="leave TorchDistributor out (slow)")
    parser.add_argument("--skip-connect", action="store_true", help="leave the Spark Connect launch rows out")
    parser.add_argument("--inference-hidden", default="128", help="MLP hidden sizes of the scored model")
    parser.add_argument("--disk-budget-mb", type=float, default=256.0,
                        help="memory budget per agent for the disk-cache run (its shard is 3× this); 0 skips it")
    parser.add_argument("--json", default=None)
    args = parse_with_config(parser, argv)
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b]
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the suite with command-line arguments ``argv``."""
    args = parse(argv, prog)
    hidden = [int(h) for h in args.hidden.split(",")]
    spark = get_or_create_session(num_workers=2, app_name="spark_ddl-bench-suite")
    table = Table()
    fit_s = launch_part(spark, table, args.repeats, not args.skip_distributor)
    data = synthetic(spark, args.rows, args.features, 10, 2).cache()
    data.count()
    throughput = throughput_part(data, table, args, hidden)
    identity_s = ingest_part(data, table, args)
    inference_part(data, table, args, identity_s)
    data.unpersist()
    if args.disk_budget_mb:
        disk_part(spark, table, args)
    for step in import_costs():  # what the RSS before data is made of
        table.add("memory", f"fresh interpreter + {step['step']}", step["added_bytes"] / MB, "MB")
    if not args.skip_connect:  # last: it stops the classic session (one kind per process)
        connect_part(table, args.repeats, not args.skip_distributor, fit_s)
    print(f"\nPerformance suite: local[2], 1 thread per agent, {args.rows} rows × {args.features} features, "
          f"MLP {args.features}→{args.hidden}→10, medians of {args.repeats}\n")
    table.print()
    emit({"benchmark": "suite", "rows": args.rows, "features": args.features, "hidden": args.hidden,
          "batch_sizes": args.batch_sizes, "batch_size": args.batch_size, "repeats": args.repeats,
          "curve": throughput["curve"], "results": table.rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
