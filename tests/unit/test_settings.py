"""Each setting is declared once: the Param, the keyword argument, the CLI flag and the check all
come from the declaration (no Spark)."""

from __future__ import annotations

import pytest

from spark_ddl import ConfigError, TorchEstimator
from spark_ddl.apps.train import parse_args
from spark_ddl.config import TrainConfig
from spark_ddl.settings import declared
from spark_ddl.sync import STRATEGIES


def user_settings() -> list[str]:
    return [name for name, (_, spec) in declared(TrainConfig).items() if spec.param]


def test_every_training_setting_is_a_param_a_keyword_argument_and_a_flag():
    estimator = TorchEstimator()
    args = parse_args([])
    for name in user_settings():
        assert estimator.hasParam(name), name
        assert estimator.getOrDefault(name) == getattr(TrainConfig(), name), name
        spec = declared(TrainConfig)[name][1]
        if name != "loss" and spec.cli:  # the train command trains a classifier: its loss is fixed
            assert hasattr(args, name), f"spark-ddl train has no flag for {name}"
        if not spec.cli:  # callables cannot come from a command line
            assert spec.callable_ok and not hasattr(args, name)
    assert not estimator.hasParam("resume_from") and not estimator.hasParam("has_validation")


def test_flags_parse_into_the_settings_types():
    args = parse_args(["--sync", "local_sgd", "--sync-every", "4", "--no-shuffle", "--stall-timeout", "12.5",
                       "--max-staleness", "none", "--optimizer-kwargs", '{"momentum": 0.5}', "--workers", "3",
                       "--checkpoint-every", "500 steps", "--use-gpu", "false"])
    assert (args.sync, args.sync_every, args.shuffle, args.stall_timeout) == ("local_sgd", 4, False, 12.5)
    assert args.max_staleness is None and args.optimizer_kwargs == {"momentum": 0.5} and args.num_workers == 3
    assert args.checkpoint_every == "500 steps" and args.use_gpu is False
    assert args.compression == "none" and args.epochs == 15  # a choice named "none"; the command's own default
    with pytest.raises(SystemExit):
        parse_args(["--sync", "gossip"])


def test_the_strategy_registry_is_what_the_param_doc_and_the_choices_read():
    doc = TorchEstimator().getParam("sync").doc
    for name, cls in STRATEGIES.items():
        assert f"'{name}'" in doc and cls.description in doc
        assert cls.name == name
    with pytest.raises(ConfigError, match="sync must be one of " + ", ".join(STRATEGIES)):
        TorchEstimator(sync="gossip")


def test_values_are_checked_when_set_and_named_in_the_error():
    with pytest.raises(ConfigError, match="batch_size must be an integer"):
        TorchEstimator(batch_size=2.5)
    with pytest.raises(ConfigError, match="stall_timeout must be a positive number of seconds or None"):
        TorchEstimator().setParams(stall_timeout=-1)
    estimator = TorchEstimator(lr=1, use_gpu=None, stall_timeout=None)
    assert estimator.getOrDefault("lr") == 1.0 and isinstance(estimator.getOrDefault("lr"), float)


def test_pyspark_and_snake_case_names_are_one_setting():
    estimator = TorchEstimator(label_col="y", featuresCol="v", validation_col="is_val", prediction_col="p")
    assert estimator.getLabelCol() == "y" and estimator.getOrDefault("feature_cols") == "v"
    assert estimator.getValidationIndicatorCol() == "is_val" and estimator.getPredictionCol() == "p"
    assert TorchEstimator(labelCol="z").getLabelCol() == "z"
    with pytest.raises(ConfigError, match="both given"):
        TorchEstimator(label_col="y", labelCol="z")
    with pytest.raises(ConfigError, match="has no setting 'learning_rate'"):
        TorchEstimator(learning_rate=0.1)


def test_resume_checks_compare_exactly_the_settings_declared_so():
    record = TrainConfig().resume_record()
    declared_so = [n for n, (_, spec) in declared(TrainConfig).items() if spec.resume_checked]
    assert list(record) == declared_so
    assert {"lr", "batch_size", "num_workers", "sync", "seed"} <= set(record)
    assert "epochs" not in record and "timeout" not in record  # a resumed run may train longer, wait longer
