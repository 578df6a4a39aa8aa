"""The ``spark-ddl`` command: ``train``, ``predict`` and ``bench`` (each with ``--help``).

    spark-ddl train --epochs 15 --output artifacts/digits_mlp          # embedded local Spark
    spark-ddl train --config train.yaml --master spark://host:7077 --workers 8
    spark-ddl predict --model artifacts/digits_mlp --input data/digits.parquet --output scored.parquet
    spark-ddl bench strategies --epochs 10 --json bench_results/strategies.json
    spark-ddl bench network --json bench_results/network.json    # strategies across machines, capped links
    spark-ddl images | spark-ddl text | spark-ddl recommender                # the three applications
    spark-ddl stream-recommender --plot docs/stream_recommender.png           # continuous training
    spark-ddl settings > docs/settings.md                                     # the settings reference
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

BENCHMARKS = ("suite", "launch", "inference", "strategies", "shipping", "embeddings", "streaming", "bigmodels",
              "scale", "imports", "network")


def _train(argv: list[str]) -> int:
    from spark_ddl.apps.train import main

    return main(argv, prog="spark-ddl train")


def _predict(argv: list[str]) -> int:
    from spark_ddl.apps.predict import main

    return main(argv, prog="spark-ddl predict")


def _application(name: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        module = __import__(f"spark_ddl.apps.{name.replace('-', '_')}", fromlist=["main"])
        return module.main(argv, prog=f"spark-ddl {name}")

    return run


def _testbed(argv: list[str]) -> int:
    from spark_ddl.testbed.__main__ import main

    return main(argv, prog="spark-ddl testbed")


def _settings(argv: list[str]) -> int:
    from spark_ddl.apps.settings_reference import main

    argparse.ArgumentParser(prog="spark-ddl settings", description="Print the settings reference "
                            "(docs/settings.md), generated from the settings' declarations.").parse_args(argv)
    return main()


def _bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="spark-ddl bench", description="Run a benchmark: it prints a table and a JSON result.",
        epilog="Each benchmark has its own options: spark-ddl bench NAME --help")
    parser.add_argument("name", choices=BENCHMARKS, help="which benchmark")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options")
    args = parser.parse_args(argv)
    module = __import__(f"spark_ddl.benchmarks.{args.name}", fromlist=["main"])
    return module.main(args.options, prog=f"spark-ddl bench {args.name}")


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "train": (_train, "train an MLP on a Parquet/CSV table and save the model"),
    "predict": (_predict, "score a Parquet/CSV table with a saved model"),
    "bench": (_bench, "run a benchmark (suite, launch, inference, strategies, shipping, embeddings, streaming, "
                      "bigmodels, scale, imports, network)"),
    "images": (_application("images"), "image recognition: digits as PNG files, Spark's image source, a CNN"),
    "text": (_application("text"), "NLP: tweets tokenised on Spark, variable-length token ids, an embedding model"),
    "recommender": (_application("recommender"), "MovieLens ratings, matrix factorisation on integer ids"),
    "testbed": (_testbed, "separate machines on this host (network namespaces, root) with a Spark standalone cluster"),
    "stream-recommender": (_application("stream-recommender"),
                           "MovieLens replayed as a file stream, trained continuously, RMSE per window"),
    "settings": (_settings, "print the settings reference (docs/settings.md) generated from the declarations"),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``spark-ddl`` console script."""
    parser = argparse.ArgumentParser(
        prog="spark-ddl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<8} {help}" for name, (_, help) in COMMANDS.items()))
    parser.add_argument("command", choices=list(COMMANDS), help=", ".join(COMMANDS))
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the command's options (see COMMAND --help)")
    args = parser.parse_args(argv)
    return COMMANDS[args.command][0](args.options)


if __name__ == "__main__":
    sys.exit(main())
