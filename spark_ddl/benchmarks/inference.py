"""Inference throughput: TorchModel.transform vs an identity mapInArrow over the same
DataFrame (Spark's own Arrow channel: the ceiling) vs a plain torch forward in one process.

    spark-ddl bench inference --rows 200000 --repeats 3 --json bench_results/inference.json

All three run side by side in one warm local[2] session; medians over repeats. Spark work
is forced with the ``noop`` sink, so no result is collected to the driver.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np
import pyarrow as pa
import torch

from spark_ddl import TorchModel, get_or_create_session
from spark_ddl.apps.options import parse_with_config
from spark_ddl.benchmarks.common import emit, timed
from spark_ddl.common.model_source import ModelSource
from spark_ddl.driver.columns import ColumnSpec
from spark_ddl.networks import MLP


def identity(batches):
    yield from batches


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run this benchmark with command-line arguments ``argv``."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--hidden", default="128", help="hidden layer sizes of the MLP")
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parse_with_config(parser, argv)
    spark = get_or_create_session(num_workers=2, app_name="spark_ddl-bench-inference")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.rows, args.features)).astype(np.float32)
    table = pa.table({"features": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), args.features)
                      .cast(pa.list_(pa.float32())), "label": pa.array(rng.integers(0, 10, args.rows))})
    frame = spark.createDataFrame(table.to_pandas()).repartition(args.partitions).cache()
    frame.count()
    torch.manual_seed(0)
    kwargs = {"in_features": args.features, "out_features": 10, "hidden": [int(h) for h in args.hidden.split(",")]}
    module = MLP(**kwargs).eval()
    model = TorchModel(module, spec=ColumnSpec.one_input(("features",), "array", "label"), config={"loss": "cross_entropy"},
                       source=ModelSource(class_path="spark_ddl.networks:MLP", kwargs=kwargs),
                       row_shapes={"features": (args.features,)})

    def noop(df):
        df.write.format("noop").mode("overwrite").save()

    def plain_forward():
        with torch.inference_mode():
            for start in range(0, args.rows, 1024):
                torch.softmax(module(torch.from_numpy(x[start:start + 1024])), dim=1)

    torch.set_num_threads(1)
    results = {
        "identity mapInArrow": timed(lambda: noop(frame.mapInArrow(identity, frame.schema)), args.repeats),
        "TorchModel.transform": timed(lambda: noop(model.transform(frame)), args.repeats),
        "plain torch forward (1 process, 1 thread)": timed(plain_forward, args.repeats),
    }
    rows_per_s = {name: args.rows / statistics.median(times) for name, times in results.items()}
    ceiling = rows_per_s["identity mapInArrow"]
    print(f"\nInference, {args.rows} rows x {args.features} features, MLP hidden={args.hidden}, "
          f"local[2], {args.partitions} partitions, median of {args.repeats}\n")
    print(f"{'what':<44} {'median s':>9} {'rows/s':>10} {'÷ identity':>11}")
    for name, times in results.items():
        print(f"{name:<44} {statistics.median(times):>9.2f} {rows_per_s[name]:>10.0f} "
              f"{rows_per_s[name] / ceiling:>11.2f}")
    out = {"benchmark": "inference", "rows": args.rows, "features": args.features, "hidden": args.hidden,
           "repeats": args.repeats, "times_s": results, "rows_per_s": rows_per_s,
           "transform_over_identity": rows_per_s["TorchModel.transform"] / ceiling}
    emit(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
