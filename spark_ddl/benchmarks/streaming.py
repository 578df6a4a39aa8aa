"""Continuous training: where a micro-batch's time goes, against the barrier launch floor, and
freshness (file landed -> version readable) at a processing-time trigger.

    spark-ddl bench streaming --json bench_results/streaming.json

Matrix factorisation (dim 32, Adam, 1 epoch per micro-batch) on synthetic ratings, one Parquet
file of ``--rows`` ratings per micro-batch (``maxFilesPerTrigger=1``), 2 agents on a warm
local[2], all in one run: the floor (a bare barrier job that forms a gloo group and all-reduces
one tensor, see ``bench launch``), ``fit()`` of one micro-batch's rows, ``fit_stream``'s
micro-batches with ``availableNow`` (phases from ``StreamingFit.timings``), then files landing
every ``--trigger-seconds`` + 3.3 s into a stream with a ``--trigger-seconds`` trigger. Also
the ordinary job that agents staying up across micro-batches would need instead of a barrier
job (rows balanced into one Arrow file per agent), for an estimate of what they would save.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spark_ddl import TorchEstimator, get_or_create_session
from spark_ddl.apps.options import parse_with_config
from spark_ddl.benchmarks.common import emit, timed
from spark_ddl.benchmarks.launch import FLOOR, floor_times
from spark_ddl.streaming.versions import VersionStore

PHASES = ("count", "fit_outside_job", "barrier_job", "training", "publish", "total")


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2000, help="ratings per micro-batch (file)")
    p.add_argument("--files", type=int, default=8, help="micro-batches of the availableNow run")
    p.add_argument("--freshness-files", type=int, default=5, help="files landing into the processing-time stream")
    p.add_argument("--trigger-seconds", type=float, default=10.0)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=5, help="floor and fit() timings")
    p.add_argument("--json", default=None, help="write the result here")
    return parse_with_config(p, argv)


def write_ratings(path: Path, rows: int, users: int, items: int, seed: int) -> None:
    """``rows`` synthetic ratings (user long, item long, rating double), written atomically."""
    rng = np.random.default_rng(seed)
    table = pa.table({"user": rng.integers(0, users, rows), "item": rng.integers(0, items, rows),
                      "rating": np.clip(rng.normal(3.5, 1.0, rows), 0.5, 5.0)})
    temporary = path.parent.parent / f".{path.name}"
    pq.write_table(table, temporary)
    os.replace(temporary, path)


def estimator(args: argparse.Namespace) -> TorchEstimator:
    return TorchEstimator(model="spark_ddl.networks:MatrixFactorization",
                          model_kwargs={"users": args.users, "items": args.items, "dim": 32, "mean": 3.5},
                          inputs={"user": "user", "item": "item"}, label_col="rating", loss="mse", optimizer="adam",
                          lr=0.005, batch_size=128, epochs=1, num_workers=2, progress="off", timeout=120)


def handoff_job(folder: str):
    """What resident agents would need instead of a barrier job per micro-batch (not built, see
    docs/performance.md): an ordinary job writing each balanced partition's rows as an Arrow file where
    agent *i* would read it."""

    def write(batches):
        from pyspark import TaskContext

        writer, rows = None, 0
        for batch in batches:
            if writer is None:
                writer = pa.ipc.new_file(f"{folder}/part-{TaskContext.get().partitionId()}.arrow", batch.schema)
            writer.write_batch(batch)
            rows += batch.num_rows
        if writer is not None:
            writer.close()
        yield pa.RecordBatch.from_pydict({"rows": [rows]})

    return write


def median_phases(timings: list[dict[str, float]]) -> dict[str, float]:
    return {phase: statistics.median(t[phase] for t in timings) for phase in PHASES}


def freshness_run(spark, args: argparse.Namespace, root: Path) -> list[float]:
    """Files land every trigger + 3.3 s (so they fall anywhere in the trigger's period); each
    one's freshness is the time from its rename into the watched folder to its version being
    listed in model_dir."""
    watched, model_dir = root / "live", str(root / "live-models")
    watched.mkdir()
    stream_df = spark.readStream.schema("user long, item long, rating double").option("maxFilesPerTrigger", 1) \
        .parquet(str(watched))
    stream = estimator(args).fit_stream(stream_df, model_dir=model_dir, checkpoint_location=str(root / "live-ckpt"),
                                        trigger={"processingTime": f"{args.trigger_seconds:g} seconds"})
    store, landed, readable = VersionStore(model_dir), [], []
    try:
        for k in range(args.freshness_files):
            write_ratings(watched / f"part-{k:04d}.parquet", args.rows, args.users, args.items, seed=100 + k)
            landed.append(time.time())
            deadline = time.time() + args.trigger_seconds + 3.3
            while (store.latest_number() or 0) <= k:
                if stream.error is not None or time.time() > landed[-1] + 600:
                    raise RuntimeError(f"no version for file {k}: {stream.error}")
                time.sleep(0.05)
            readable.append(time.time())
            time.sleep(max(0.0, deadline - time.time()))
    finally:
        stream.stop()
    return [r - t for t, r in zip(landed, readable)]


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Print the table and the JSON result."""
    args = parse_args(argv, prog)
    spark = get_or_create_session(num_workers=2, app_name="spark_ddl-bench-streaming")
    root = Path(tempfile.mkdtemp(prefix="spark_ddl-bench-streaming-"))
    (root / "in").mkdir()
    for k in range(args.files):
        write_ratings(root / "in" / f"part-{k:04d}.parquet", args.rows, args.users, args.items, seed=k)
        os.utime(root / "in" / f"part-{k:04d}.parquet", (1e9 + k, 1e9 + k))

    floor = floor_times(spark, args.repeats, allgather=False)[FLOOR]  # its agents meet through the driver, as fit()'s do
    one_file = spark.read.parquet(str(root / "in" / "part-0000.parquet"))
    fits = []
    timed(lambda: fits.append(estimator(args).fit(one_file)), args.repeats)
    fit_walls = [m.summary["seconds"] for m in fits[1:]]  # the barrier job's wall (timed() warms up first)
    (root / "handoff").mkdir()
    handoff = timed(lambda: one_file.repartition(2).mapInArrow(handoff_job(str(root / "handoff")), "rows long")
                    .collect(), args.repeats)

    stream_df = spark.readStream.schema("user long, item long, rating double").option("maxFilesPerTrigger", 1) \
        .parquet(str(root / "in"))
    started = time.perf_counter()
    stream = estimator(args).fit_stream(stream_df, model_dir=str(root / "models"),
                                        checkpoint_location=str(root / "ckpt"), trigger={"availableNow": True})
    try:
        stream.awaitTermination(1800)
    finally:
        stream.stop()
    stream_seconds = time.perf_counter() - started
    steady = [stream.timings[v] for v in sorted(stream.timings)[1:]]  # the first micro-batch warms up
    phases = median_phases(steady)
    overheads = [t["total"] - t["training"] for t in steady]
    try:
        freshness = freshness_run(spark, args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    # the estimate for resident agents: count, hand the rows over, train, publish (no barrier job,
    # no pre-launch checks and scan per micro-batch)
    handoff_s = statistics.median(handoff)
    resident_s = phases["count"] + handoff_s + phases["training"] + phases["publish"]

    floor_s, overhead_s = statistics.median(floor), statistics.median(overheads)
    print(f"\nContinuous training, {args.rows:,} ratings per micro-batch, 2 agents, local[2] "
          f"(median seconds; micro-batches 2..{args.files} of the availableNow run)\n")
    print(f"{'what':<72} {'median s':>9} {'÷ floor':>8}")
    lines = [("barrier launch floor (bare barrier job + gloo group)", floor_s),
             ("fit() of one micro-batch's rows: its barrier job", statistics.median(fit_walls)),
             ("micro-batch: cache and count the rows", phases["count"]),
             ("micro-batch: fit outside its barrier job (checks, scan, balance)", phases["fit_outside_job"]),
             ("micro-batch: the barrier job", phases["barrier_job"]),
             ("micro-batch:   of which training (the agents' epochs)", phases["training"]),
             ("micro-batch: publish the version", phases["publish"]),
             ("micro-batch: total (start -> version readable)", phases["total"]),
             ("micro-batch: overhead (total - training)", overhead_s),
             ("hand-off job: balanced rows to one Arrow file per agent", handoff_s),
             ("estimate with resident agents: count + hand-off + training + publish", resident_s)]
    for name, value in lines:
        print(f"{name:<72} {value:>9.3f} {value / floor_s:>8.2f}")
    print(f"\nfreshness at a {args.trigger_seconds:g} s trigger (file landed -> version readable), "
          f"{len(freshness)} files: median {statistics.median(freshness):.2f} s, min {min(freshness):.2f} s, "
          f"max {max(freshness):.2f} s")
    ratios = {"overhead_over_floor": overhead_s / floor_s, "barrier_job_over_floor": phases["barrier_job"] / floor_s,
              "training_share_of_total": phases["training"] / phases["total"],
              "freshness_over_trigger": statistics.median(freshness) / args.trigger_seconds,
              "total_over_resident_estimate": phases["total"] / resident_s}
    print("\n" + "  ".join(f"{k} = {v:.2f}" for k, v in ratios.items()))
    emit({"benchmark": "streaming", "rows_per_micro_batch": args.rows, "files": args.files,
          "trigger_seconds": args.trigger_seconds, "floor_s": floor, "fit_barrier_job_s": fit_walls,
          "micro_batches": steady, "median_phases_s": phases,
          "handoff_s": handoff, "resident_estimate_s": resident_s, "overhead_s": overheads, "freshness_s": freshness,
          "stream_seconds": stream_seconds, "ratios": ratios, "master": spark.sparkContext.master}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
