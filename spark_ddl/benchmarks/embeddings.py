"""Embedding tables: all-reducing the dense gradient of a table vs exchanging only the rows a
batch touched (``nn.Embedding(sparse=True)``, see ``spark_ddl.sync.sparse_rows``).

    spark-ddl bench embeddings --json bench_results/embeddings.json

Matrix factorisation (``spark_ddl.networks:MatrixFactorization``, dim 32, SGD with momentum) on
synthetic ratings with uniformly drawn item ids, 2 agents on a warm local[2], for tables of
``--items`` rows: the steady samples/s (the median epoch after the first) of the dense and the
sparse table side by side in one run, medians of ``--repeats``, and the bytes each agent hands
to the exchange per step.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np

from spark_ddl import TorchEstimator, get_or_create_session
from spark_ddl.apps.options import parse_with_config
from spark_ddl.benchmarks.common import emit

DIM = 32


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", default="10000,100000,1000000", help="comma-separated table sizes (rows)")
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--rows", type=int, default=40000, help="ratings")
    p.add_argument("--batch-size", type=int, default=256, help="per agent")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="write the result here")
    return parse_with_config(p, argv)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Print the table and the JSON result."""
    args = parse_args(argv, prog)
    spark = get_or_create_session(num_workers=2, app_name="spark_ddl-bench-embeddings")
    rng = np.random.default_rng(0)
    rows = []
    for items in [int(n) for n in args.items.split(",")]:
        ratings = [(int(u), int(i), float(r)) for u, i, r in
                   zip(rng.integers(0, args.users, args.rows), rng.integers(0, items, args.rows), rng.normal(size=args.rows))]
        frame = spark.createDataFrame(ratings, "user long, item long, rating double").repartition(2).cache()
        frame.count()
        speeds: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for sparse in (False, True):  # side by side, alternating
                model = TorchEstimator(
                    model="spark_ddl.networks:MatrixFactorization",
                    model_kwargs={"users": args.users, "items": items, "dim": DIM, "sparse": sparse},
                    inputs={"user": "user", "item": "item"}, label_col="rating", loss="mse", optimizer="sgd",
                    lr=0.01, optimizer_kwargs={"momentum": 0.9}, batch_size=args.batch_size, epochs=args.epochs,
                    progress="off").fit(frame)
                speeds[sparse].append(statistics.median(h["samples_per_s"] for h in model.history[1:]))
        frame.unpersist()
        dense, sparse = statistics.median(speeds[False]), statistics.median(speeds[True])
        table_bytes = (items + args.users) * (DIM + 1) * 4
        touched_bytes = 2 * args.batch_size * (DIM + 1) * (4 + 8)  # at most: rows and their ids, users and items
        rows.append({"items": items, "dense_samples_per_s": dense, "sparse_samples_per_s": sparse,
                     "sparse_vs_dense": sparse / dense, "dense_bytes_per_step": table_bytes,
                     "sparse_bytes_per_step_at_most": touched_bytes})
    print(f"{'table rows':>10} {'dense samples/s':>16} {'sparse samples/s':>17} {'sparse÷dense':>13} "
          f"{'dense MB/step':>14} {'sparse KB/step':>15}")
    for row in rows:
        print(f"{row['items']:>10,} {row['dense_samples_per_s']:>16,.0f} {row['sparse_samples_per_s']:>17,.0f} "
              f"{row['sparse_vs_dense']:>12.2f}x {row['dense_bytes_per_step'] / 2**20:>14.1f} "
              f"{row['sparse_bytes_per_step_at_most'] / 2**10:>15.1f}")
    emit({"benchmark": "embeddings", "rows": args.rows, "batch_size": args.batch_size, "results": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
