"""Each setting is declared once: the Param, the keyword argument, the CLI flags, spark_ddl.run's
settings and the check all come from the declaration and the marks on it (no Spark)."""

from __future__ import annotations

import importlib

import pytest

import spark_ddl
from spark_ddl import ConfigError, TorchEstimator
from spark_ddl.apps.options import command_settings, setting_values
from spark_ddl.apps.train import parse_args
from spark_ddl.common.settings import declared, default_of
from spark_ddl.common.train_config import TrainConfig
from spark_ddl.runner import RUN_SETTINGS
from spark_ddl.sync import STRATEGIES

APPLICATIONS = ("images", "text", "recommender", "stream_recommender")  # the commands whose flags are "apps"


def user_settings() -> list[str]:
    return [name for name, (_, spec) in declared(TrainConfig).items() if spec.param]


def test_every_training_setting_is_a_param_a_keyword_argument_and_a_flag():
    estimator = TorchEstimator()
    args = parse_args([])
    for name in user_settings():
        assert estimator.hasParam(name), name
        assert estimator.getOrDefault(name) == getattr(TrainConfig(), name), name
        spec = declared(TrainConfig)[name][1]
        assert hasattr(args, name) == ("train" in spec.cli), f"spark-ddl train and {name}'s cli mark disagree"
        if not spec.cli:  # callables (and the loss, fixed by each command's task) come from no command line
            assert spec.callable_ok
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


def parser_of(module_name: str, monkeypatch):
    """The argparse parser a command's parse_args builds (before parsing)."""
    module = importlib.import_module(f"spark_ddl.apps.{module_name}")
    monkeypatch.setattr(module, "parse_with_config", lambda parser, argv, *rest, **kw: parser)
    return module, module.parse_args([])


@pytest.mark.parametrize("module_name", ["train", *APPLICATIONS])
def test_each_command_has_a_flag_exactly_for_the_settings_marked_for_it(module_name, monkeypatch):
    command = "train" if module_name == "train" else "apps"
    module, parser = parser_of(module_name, monkeypatch)
    actions = {action.dest: action for action in parser._actions}
    overrides = module.COMMAND_DEFAULTS
    for name, (field, spec) in command_settings().items():
        marked = spec.param and command in spec.cli
        assert (name in actions) == marked, f"{module_name}: a flag for {name} but cli={spec.cli}"
        if not marked:
            continue
        action = actions[name]
        assert f"--{name.replace('_', '-')}" in action.option_strings
        assert set(spec.cli_aliases) <= set(action.option_strings)
        assert action.default == overrides.get(name, default_of(field)), name
        assert (action.choices or []) == list(spec.allowed()), name
        assert spec.doc.split(":")[0].replace("%", "%%") in action.help, name
        if name in overrides:  # the command's own default is the one its --help shows
            assert overrides[name] != default_of(field) and f"(default: {overrides[name]!r})" in action.help
    spellings = {flag: name for name, (_, spec) in command_settings().items()
                 for flag in (f"--{name.replace('_', '-')}", *spec.cli_aliases)}
    for flag, action in parser._option_string_actions.items():  # no hand-written flag shadows a setting's
        assert spellings.get(flag, action.dest) == action.dest, f"{module_name}: {flag} is not {spellings[flag]}'s"
    for flag in ("--workers", "--epochs", "--batch-size", "--lr", "--seed"):  # names the jobs and docs use
        assert flag in parser._option_string_actions


@pytest.mark.parametrize("module_name", APPLICATIONS)
def test_application_flags_reach_the_estimator(module_name):
    module = importlib.import_module(f"spark_ddl.apps.{module_name}")
    args = module.parse_args(["--workers", "3", "--seed", "7", "--epochs", "2"])
    values = setting_values(args, "apps")
    assert values["num_workers"] == 3 and values["seed"] == 7 and values["epochs"] == 2
    assert set(values) == {n for n, (_, spec) in command_settings().items() if "apps" in spec.cli}
    TrainConfig(**values).validate()


def test_spark_ddl_run_accepts_exactly_the_settings_marked_run():
    marked = tuple(name for name, (_, spec) in declared(TrainConfig).items() if spec.run)
    assert RUN_SETTINGS == marked and set(marked) <= set(TrainConfig.__dataclass_fields__)
    assert {"num_workers", "batch_size", "seed", "timeout"} <= set(RUN_SETTINGS)
    unmarked = next(name for name, (_, spec) in declared(TrainConfig).items() if spec.param and not spec.run)
    with pytest.raises(ConfigError, match=f"has no setting\\(s\\) \\['{unmarked}'\\]"):
        spark_ddl.run(lambda ctx: None, **{unmarked: getattr(TrainConfig(), unmarked)})


def test_a_config_file_may_name_an_option_by_a_flag_alias(tmp_path):
    config = tmp_path / "app.json"
    config.write_text('{"workers": 3, "batch-size": 16}')
    args = importlib.import_module("spark_ddl.apps.images").parse_args(["--config", str(config)])
    assert (args.num_workers, args.batch_size) == (3, 16)
    assert parse_args(["--config", str(config)]).num_workers == 3
