"""Autolog inside pyspark.ml tuning: a ``CrossValidator`` or ``TrainValidationSplit`` over a
``TorchEstimator`` (alone or in a ``Pipeline``) is one MLflow run (the active run, else one of
its own, named after the tuner), and each fit it makes (every fold and param map, and the refit
of the best) is a child run of it (``mlflow.parentRunId``), as ``mlflow.pyspark.ml.autolog`` does
for pyspark.ml's own estimators.

Tuners fit in a thread pool, where MLflow's (per-thread) active run is not set: while a tuner
fits, its run is ``parent()`` for every thread of this driver.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

import mlflow

from spark_ddl.mlflow.runlog import refusal

log = logging.getLogger("spark_ddl.mlflow")

_PARENTS: list[tuple[str, str]] = []  # (run id, experiment id) of the tuners fitting now, innermost last
_LOCK = threading.Lock()
_ORIGINALS: dict[type, Any] = {}


def parent() -> tuple[str, str] | None:
    """(run id, experiment id) of the run of the tuner fitting now, or None."""
    with _LOCK:
        return _PARENTS[-1] if _PARENTS else None


def _tunes_torch(tuner: Any) -> bool:
    estimator = tuner.getEstimator()  # (the estimator's module is not imported here: it imports us)
    stages = estimator.getStages() if hasattr(estimator, "getStages") else [estimator]
    return any(f"{c.__module__}.{c.__name__}" == "spark_ddl.ml.estimator.TorchEstimator"
               for stage in stages for c in type(stage).__mro__)


def _tuning_params(tuner: Any) -> dict[str, Any]:
    params = {"tuner": type(tuner).__name__, "estimator": type(tuner.getEstimator()).__name__,
              "param_maps": len(tuner.getEstimatorParamMaps()), "parallelism": tuner.getParallelism()}
    for name in ("numFolds", "trainRatio"):
        if tuner.hasParam(name):
            params[name] = tuner.getOrDefault(name)
    evaluator = tuner.getEvaluator()
    if evaluator.hasParam("metricName"):
        params["evaluator_metric"] = evaluator.getOrDefault("metricName")
    return params


def _log_results(tuner: Any, model: Any) -> None:
    metrics = list(getattr(model, "avgMetrics", None) or getattr(model, "validationMetrics", None) or [])
    if not metrics:
        return
    evaluator = tuner.getEvaluator()
    name = evaluator.getOrDefault("metricName") if evaluator.hasParam("metricName") else "metric"
    for index, value in enumerate(metrics):  # one per param map, in their order
        mlflow.log_metric(f"tuning_{name}", float(value), step=index)
    best = max(metrics) if evaluator.isLargerBetter() else min(metrics)
    mlflow.log_metric(f"best_{name}", float(best))


def _traced_fit(original: Any) -> Any:
    @functools.wraps(original)
    def _fit(self: Any, dataset: Any) -> Any:
        reason = refusal(mlflow.get_tracking_uri())
        if not _tunes_torch(self) or reason is not None:
            return original(self, dataset)  # (each fit warns about a server that refuses)
        own = mlflow.active_run() is None
        try:
            run = mlflow.start_run(run_name=type(self).__name__) if own else mlflow.active_run()
            mlflow.set_tag("spark_ddl.kind", "tuning")
            mlflow.log_params(_tuning_params(self))
        except Exception as exc:  # noqa: BLE001 - the tracking server's problem is not the tuning's
            log.warning("MLflow: no run for this %s (%s: %s); its fits log as runs of their own",
                        type(self).__name__, type(exc).__name__, exc)
            if own and mlflow.active_run() is not None:
                mlflow.end_run("FAILED")
            return original(self, dataset)
        with _LOCK:
            _PARENTS.append((run.info.run_id, run.info.experiment_id))
        try:
            model = original(self, dataset)
        except BaseException:
            _leave(run.info.run_id, own, "FAILED")
            raise
        try:
            _log_results(self, model)
        except Exception as exc:  # noqa: BLE001 - the tuning is done; the tracking server's problem
            log.warning("MLflow: the tuning's metrics could not be logged (%s: %s)", type(exc).__name__, exc)
        _leave(run.info.run_id, own, "FINISHED")
        return model

    return _fit


def _leave(run_id: str, own: bool, status: str) -> None:
    with _LOCK:
        _PARENTS.remove(next(p for p in reversed(_PARENTS) if p[0] == run_id))
    if own:
        mlflow.end_run(status)


def patch() -> None:
    """Trace the tuners' fits (idempotent)."""
    from pyspark.ml.tuning import CrossValidator, TrainValidationSplit

    for tuner in (CrossValidator, TrainValidationSplit):
        if tuner not in _ORIGINALS:
            _ORIGINALS[tuner] = tuner.__dict__["_fit"]
            tuner._fit = _traced_fit(_ORIGINALS[tuner])


def unpatch() -> None:
    for tuner, original in list(_ORIGINALS.items()):
        tuner._fit = original
        del _ORIGINALS[tuner]
