"""Batch scoring: load a saved TorchModel (or a PipelineModel that ends in one), score a
Parquet/CSV input and write Parquet.

    python jobs/predict.py --model artifacts/digits_mlp --input data/digits.parquet --output out.parquet
    spark-submit --master spark://host:7077 jobs/predict.py --model hdfs:///m --input hdfs:///in --output hdfs:///out
    python jobs/predict.py --remote sc://host:15002 --model /m --input /in.parquet --output /out.parquet
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from spark_ddl import TorchModel
from spark_ddl.driver.capabilities import directory_files
from spark_ddl.apps.options import add_session_arguments, parse_with_config, session_from_args


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="saved TorchModel or PipelineModel directory/URI")
    p.add_argument("--input", help="Parquet or CSV (header) path/URI to score")
    p.add_argument("--output", help="Parquet output path/URI")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--columns", default=None,
                   help="comma-separated input columns to keep beside the predictions (default: all)")
    add_session_arguments(p, "local[2]")
    return parse_with_config(p, argv, required=("model", "input", "output"))


def load_any_model(path: str):
    """A TorchModel, or a PipelineModel when the directory holds one."""
    files = directory_files()
    names = [n for n in files.list_directory(path, "metadata") if n.startswith("part-")]
    raw = files.read_file(path, f"metadata/{names[0]}") if names else None
    if raw is None:
        raise SystemExit(f"{path} holds no saved model (no metadata/part-*)")
    class_name = json.loads(raw.splitlines()[0])["class"]
    if class_name.endswith("PipelineModel"):
        from pyspark.ml import PipelineModel

        return PipelineModel.load(path)
    return TorchModel.load(path)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the predict command with command-line arguments ``argv``."""
    args = parse_args(argv, prog)
    spark = session_from_args(args, "spark_ddl-predict")
    model = load_any_model(args.model)
    frame = (spark.read.csv(args.input, header=True, inferSchema=True) if args.input.endswith(".csv")
             else spark.read.parquet(args.input))
    scored = model.transform(frame)
    if args.columns:
        keep = [c.strip() for c in args.columns.split(",") if c.strip()]
        extra = [c for c in scored.columns if c not in frame.columns]
        scored = scored.select(*keep, *extra)
    started = time.perf_counter()
    scored.write.mode("overwrite" if args.overwrite else "error").parquet(args.output)
    rows = spark.read.parquet(args.output).count()
    print(f"scored {rows} rows in {time.perf_counter() - started:.1f} s -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
