"""Image recognition: the digits as PNG files, read with Spark's image data source, a small CNN
trained on the image structs, against a logistic-regression baseline on the same pixels.

    python jobs/images.py                       # embedded local Spark, 2 agents
    spark-submit --master spark://host:7077 jobs/images.py --images hdfs:///digits_png --workers 8
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import pandas as pd
from pyspark.sql import functions as F

from spark_ddl import TorchEstimator
from spark_ddl.apps.datasets import REPO, digits_as_png
from spark_ddl.apps.options import (add_skip_baselines, application_parser, mlflow_tracking, parse_with_config,
                                    save_results, session_from_args, setting_values, setup_logging)

# this command's own defaults of settings that are flags of every application (the others: as declared)
COMMAND_DEFAULTS = {"epochs": 10, "lr": 0.005}


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = application_parser(prog, __doc__, str(REPO / "artifacts" / "digits_cnn"), COMMAND_DEFAULTS)
    p.add_argument("--images", default=None, help="directory of split=*/label=*/*.png (default: the digits, "
                   "written to artifacts/digits_png on first use)")
    add_skip_baselines(p)
    return parse_with_config(p, argv)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Train the CNN on the image structs and compare it with logistic regression on the pixels."""
    args = parse_args(argv, prog)
    setup_logging()
    spark = session_from_args(args, "spark_ddl-images", args.num_workers)
    root = args.images or digits_as_png(REPO / "artifacts" / "digits_png")
    images = spark.read.format("image").load(root)  # columns: image (struct), split, label (from the path)
    train = images.filter(F.col("split") == "train")
    if args.sample < 1.0:
        train = train.sample(fraction=args.sample, seed=args.seed)
    test = images.filter(F.col("split") == "test")
    classes, size, channels = (int(v) for v in images.agg(F.max("label"), F.max("image.height"),
                                                          F.max("image.nChannels")).first())
    estimator = TorchEstimator(model="spark_ddl.networks:SmallCNN",
                               model_kwargs={"channels": channels, "classes": classes + 1, "size": size},
                               inputs={"image": "image"}, label_col="label", loss="cross_entropy", optimizer="adam",
                               progress="log", **setting_values(args, "apps"))
    started = time.perf_counter()
    with mlflow_tracking(args, "spark-ddl images"):
        model = estimator.fit(train)
    seconds = time.perf_counter() - started
    accuracy = accuracy_of(model.transform(test))
    baseline = None if args.skip_baselines else logistic_regression_baseline(train, test)
    print(f"\nSmallCNN on {model.summary['world_size']} agents, {args.epochs} epochs in {seconds:.1f} s")
    shown = "skipped" if baseline is None else f"{baseline:.4f}"
    print(f"held-out accuracy: CNN {accuracy:.4f} | logistic regression on the pixels {shown} "
          f"({test.count()} test images)")
    save_results(model, args, {"accuracy": accuracy, "baseline_accuracy": baseline, "fit_seconds": seconds})
    return 0


def _pixels(data: pd.Series) -> pd.Series:
    return data.map(lambda raw: np.frombuffer(raw, dtype=np.uint8).astype(np.float64))


def accuracy_of(scored) -> float:
    return float(scored.select(F.avg((F.col("prediction") == F.col("label")).cast("double"))).first()[0])


def logistic_regression_baseline(train, test) -> float:
    """pyspark.ml's multinomial logistic regression on the same images' pixels."""
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.functions import array_to_vector

    to_pixels = F.pandas_udf(_pixels, "array<double>")

    def pixels(frame):
        return frame.select(array_to_vector(to_pixels(F.col("image.data"))).alias("features"),
                            F.col("label").cast("double").alias("label"))

    fitted = LogisticRegression(maxIter=200, regParam=0.001).fit(pixels(train))
    return accuracy_of(fitted.transform(pixels(test)))


if __name__ == "__main__":
    sys.exit(main())
