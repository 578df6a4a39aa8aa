"""Shipping a large model's weights for scoring: ``TorchModel.transform`` of a model of about
``--mb`` MB, first call (the weights travel) and second call (cached), in a classic local[2]
session (a broadcast variable) and then from a Spark Connect client (a session artifact).

    spark-ddl bench shipping --mb 200 --json bench_results/shipping.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from pyspark.sql import functions as F

from spark_ddl import TorchModel, get_or_create_session
from spark_ddl.apps.options import parse_with_config
from spark_ddl.benchmarks.common import emit
from spark_ddl.driver.columns import ColumnSpec


def big_model(megabytes: float, features: int = 64) -> TorchModel:
    """An MLP features→w→w→10 whose float32 weights take about ``megabytes`` MB."""
    width = max(16, int((megabytes * 2**20 / 4) ** 0.5))  # the middle layer dominates
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(features, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                 torch.nn.ReLU(), torch.nn.Linear(width, 10))
    return TorchModel(module, spec=ColumnSpec(("features",), None, "array"), config={"loss": "cross_entropy"},
                      row_shapes={"features": (features,)})


def time_transforms(spark, model: TorchModel, rows: int, repeats: int) -> list[float]:
    frame = spark.range(rows, numPartitions=2).select(
        F.array(*[F.rand(i).cast("float") for i in range(64)]).alias("features")).cache()
    frame.count()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.transform(frame).write.format("noop").mode("overwrite").save()
        times.append(time.perf_counter() - started)
    frame.unpersist()
    return times


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run this benchmark with command-line arguments ``argv``."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=200.0, help="size of the model's weights")
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3, help="transforms per session (the first ships)")
    parser.add_argument("--json", default=None)
    args = parse_with_config(parser, argv)
    model = big_model(args.mb)
    size_mb = sum(t.numel() * t.element_size() for t in model.get_module().state_dict().values()) / 2**20
    results = {}
    spark = get_or_create_session(num_workers=2, app_name="spark_ddl-bench-shipping",
                                  extra_conf={"spark.driver.memory": "4g"})
    results["classic (broadcast)"] = time_transforms(spark, model, args.rows, args.repeats)
    spark.stop()
    spark = get_or_create_session(num_workers=2, app_name="spark_ddl-bench-shipping", remote="local[2]",
                                  extra_conf={"spark.driver.memory": "4g"})
    try:
        results["Spark Connect (session artifact)"] = time_transforms(spark, model, args.rows, args.repeats)
    finally:
        spark.stop()
        for key in ("SPARK_CONNECT_MODE_ENABLED", "SPARK_LOCAL_REMOTE", "SPARK_REMOTE", "SPARK_CONNECT_AUTHENTICATE_TOKEN"):
            os.environ.pop(key, None)
    print(f"\nTorchModel.transform of {args.rows} rows, weights {size_mb:.0f} MB, local[2] (seconds)\n")
    print(f"{'session':<34} {'first (ships)':>14} {'later (median)':>15}")
    summary = {}
    for name, times in results.items():
        later = statistics.median(times[1:]) if len(times) > 1 else float("nan")
        summary[name] = {"first_s": times[0], "later_median_s": later, "times_s": times}
        print(f"{name:<34} {times[0]:>14.2f} {later:>15.2f}")
    emit({"benchmark": "shipping", "weights_mb": size_mb, "rows": args.rows, "results": summary}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
