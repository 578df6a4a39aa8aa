"""Train an MLP classifier on a Parquet/CSV file with spark_ddl and save the model.

    python jobs/train.py                                  # digits, 2 agents, embedded local Spark
    spark-submit --master spark://host:7077 jobs/train.py --data hdfs:///d.parquet --workers 8
    python jobs/train.py --remote sc://host:15002 --data /data/d.parquet   # a Spark Connect server

Prints the per-epoch training loss and the held-out accuracy (rows whose --split-col equals
"test"; without a split column 20 % are held out at random), and writes the model directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the checkout (data/, jobs/)

from pyspark.sql import functions as F

from spark_ddl import TorchEstimator
from spark_ddl.apps.options import (add_mlflow_argument, add_session_arguments, command_settings, mlflow_from_args,
                                    parse_with_config, session_from_args, setting_values, setup_logging)
from spark_ddl.common.settings import add_arguments
from spark_ddl.ml.params import COLUMN_DEFAULTS

# What this command trains: its own defaults for a few settings (every other flag comes from the
# declarations of the settings marked cli=("train", ...) and keeps their defaults).
COMMAND_DEFAULTS = {"epochs": 15, "lr": 0.02, "validation_fraction": 0.1}


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO / "data" / "digits.parquet"), help="Parquet or CSV path/URI")
    p.add_argument("--label-col", default=COLUMN_DEFAULTS["labelCol"], help="integer class label column")
    p.add_argument("--split-col", default="split", help="column with 'train'/'test' (optional)")
    p.add_argument("--hidden", default="128", help="comma-separated hidden layer sizes, e.g. 256,128")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (added to --optimizer-kwargs)")
    p.add_argument("--output", default=str(REPO / "artifacts" / "digits_mlp"), help="model directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model at --output")
    add_session_arguments(p, "local[workers]")
    p.add_argument("--plot", default=None, help="write the loss/accuracy curves to this PNG (needs matplotlib)")
    p.add_argument("--metrics-json", default=None, help="also write history + accuracy here")
    add_mlflow_argument(p)
    training = p.add_argument_group("settings (TorchEstimator's)")
    add_arguments(training, command_settings(), "train", COMMAND_DEFAULTS)
    return parse_with_config(p, argv)


def read_table(spark, path: str):
    if path.endswith(".csv"):
        return spark.read.csv(path, header=True, inferSchema=True)
    return spark.read.parquet(path)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the train command with command-line arguments ``argv``."""
    args = parse_args(argv, prog)
    setup_logging()
    spark = session_from_args(args, "spark_ddl-train", args.num_workers)
    df = read_table(spark, args.data)
    settings = setting_values(args, "train")
    feature_cols = settings["feature_cols"]
    if args.split_col in df.columns:
        train = df.filter(F.col(args.split_col) != "test")
        test = df.filter(F.col(args.split_col) == "test")
    else:
        train, test = df.randomSplit([0.8, 0.2], seed=args.seed)
    if len(feature_cols) == 1:
        first = df.select(feature_cols[0]).first()
        value = first[0] if first else None
        in_features = len(value) if hasattr(value, "__len__") else 1
    else:
        in_features = len(feature_cols)
    num_classes = int(df.agg(F.max(args.label_col)).first()[0]) + 1
    hidden = [int(h) for h in args.hidden.split(",") if h.strip()]
    if args.optimizer == "sgd":
        settings["optimizer_kwargs"] = {"momentum": args.momentum, **settings["optimizer_kwargs"]}
    estimator = TorchEstimator(
        model="spark_ddl.networks:MLP",
        model_kwargs={"in_features": in_features, "out_features": num_classes, "hidden": hidden},
        loss="cross_entropy", label_col=args.label_col, **settings,
    )
    tracking = mlflow_from_args(args, "spark-ddl train")
    started = time.perf_counter()
    try:
        model = estimator.fit(train)
    finally:
        if tracking is not None:
            tracking.autolog(disable=True)
    fit_seconds = time.perf_counter() - started
    print(f"\ntrained {args.epochs} epochs on {model.summary['world_size']} agents "
          f"(shards {model.summary['shard_sizes']}, {model.summary['device']}) in {fit_seconds:.1f} s")
    print(model.summary.to_pandas()[[c for c in ("epoch", "train_loss", "val_loss", "val_accuracy", "seconds",
                                                 "samples_per_s") if c in model.history[0]]]
          .to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if args.plot:
        print(f"history plot written to {model.plot_history(args.plot)}")

    scored = model.transform(test)
    accuracy, rows = scored.select(
        F.avg((F.col("prediction") == F.col(args.label_col)).cast("double")), F.count(F.lit(1))
    ).first()
    print(f"held-out accuracy: {accuracy:.4f} on {rows} rows")
    run_id = tracking.log_to_last_run({"test_accuracy": accuracy}) if tracking is not None else None
    if run_id is not None:
        print(f"MLflow run {run_id} at {tracking.use()}")
    model.save(args.output, overwrite=args.overwrite)
    print(f"model written to {args.output}")
    if args.metrics_json:
        Path(args.metrics_json).write_text(json.dumps(
            {"accuracy": accuracy, "test_rows": rows, "fit_seconds": fit_seconds,
             "history": model.history, "output": args.output}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
