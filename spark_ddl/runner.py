"""``spark_ddl.run``: your own training function on Spark's barrier agents.

The function runs in every agent with the process group initialised, like
TorchDistributor's, but with spark_ddl's launch (no extra processes), the same pre-launch
checks, failure reporting, stall detection and timeouts as the estimator, and the shard's
batches in the one batch format when a DataFrame is given.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from pyspark.sql import DataFrame

from spark_ddl.common.settings import exposed
from spark_ddl.common.train_config import TrainConfig
from spark_ddl.common.wire import AgentJob, TrainingTask, decode_value
from spark_ddl.driver.columns import resolve_columns
from spark_ddl.driver.launcher import run_training
from spark_ddl.driver.preflight import check_run_input
from spark_ddl.driver.progress import listened_fit
from spark_ddl.errors import ConfigError
from spark_ddl.ml.params import FitSettings, ScoringSettings
from spark_ddl.ml.summary import TrainingSummary

# the TrainConfig settings that mean something for a function of the user's own: marked run=True
RUN_SETTINGS = tuple(exposed(TrainConfig, "run"))


def run(fn: Callable[[Any], Any], df: DataFrame | None = None, *, inputs: Mapping[str, Any] | None = None,
        feature_cols: str | Sequence[str] | None = None, label_col: str | None = None,
        input_shapes: Mapping[str, Sequence[int]] | None = None, input_options: Mapping[str, Any] | None = None,
        check_input: bool | None = None, return_summary: bool = False, **settings: Any) -> Any:
    """Run ``fn(ctx)`` in ``num_workers`` barrier agents and return rank 0's return value.

    ``ctx`` (``spark_ddl.agent.function.FunctionContext``) gives ``rank``, ``world_size``,
    ``local_rank``, ``device``, ``batches(epoch)`` (dict batches of this agent's shard of
    ``df``; the same number on every agent), ``steps_per_epoch``, ``batch_weight``,
    ``report(**metrics)`` (rank 0's records: live progress and the history) and
    ``allreduce_gradients(model)``. Tensors and state dicts come back without pickle.

    ``settings``: any of ``RUN_SETTINGS`` (e.g. ``num_workers=2, batch_size=64, shuffle=True,
    seed=0, timeout=300``). The column arguments mean what the estimator's Params of the same
    names mean, with their defaults (``feature_cols`` "features", ``check_input`` on). With
    ``return_summary`` the result is ``(value, summary)``.
    """
    unknown = sorted(set(settings) - set(RUN_SETTINGS))
    if unknown:
        raise ConfigError(f"spark_ddl.run has no setting(s) {unknown}; its settings are: {', '.join(RUN_SETTINGS)} "
                          "(and inputs, feature_cols, label_col, input_shapes, input_options, check_input).")
    if not callable(fn):
        raise ConfigError(f"spark_ddl.run needs a function fn(ctx), got {type(fn).__name__}.")
    config = TrainConfig(**settings).validate()
    columns, fit = ScoringSettings(), FitSettings()  # the estimator's declarations give the defaults
    check_input = fit.check_input if check_input is None else check_input
    from pyspark import cloudpickle

    try:
        function = cloudpickle.dumps(fn)
    except Exception as exc:
        raise ConfigError(f"The function cannot be serialised to send it to the executors ({type(exc).__name__}: "
                          f"{exc}). Move what it captures (open files, locks, sessions) inside it.") from exc
    if df is None:
        if inputs or feature_cols or label_col:
            raise ConfigError("inputs, feature_cols and label_col choose columns of a DataFrame: pass df too.")
        from spark_ddl.driver.session import get_or_create_session

        spark = get_or_create_session(num_workers=config.num_workers)
        frame, spec = spark.range(0, config.num_workers, 1, config.num_workers), None
    else:
        spec = resolve_columns(df.schema, None if inputs else (feature_cols or columns.feature_cols), label_col, inputs,
                               input_shapes, input_options)
        frame = df
    job = AgentJob(TrainingTask(config, None, spec.batch if spec else None,
                                label_is_integer=bool(spec and spec.label_is_integer), function=function))

    def preflight(training: DataFrame) -> None:
        check_run_input(df, training, spec)

    facts = {"kind": "run", "config": config, "settings": RUN_SETTINGS, "columns": spec.to_json_dict() if spec else {},
             "network": {"class_path": f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"}}
    with listened_fit(facts) as outcome:  # autolog: report()'s records as they arrive, the summary at the end
        result = run_training(frame, spec, job, None, preflight if spec is not None and check_input else None)
        try:
            value = decode_value(result.report.result_format, result.payload("result"))
        finally:
            result.discard()
        summary = TrainingSummary(dict(result.summary, seconds=result.seconds))
        outcome.update(summary=summary)
    return (value, summary) if return_summary else value
