"""``spark_ddl.mlflow.autolog()``: every ``TorchEstimator.fit``, ``spark_ddl.run`` and
``fit_stream`` logs into MLflow from the driver.

A fit listener (``spark_ddl.driver.progress``) hears the fit start, each epoch (or each
``report()`` of ``spark_ddl.run``) as rank 0's status report brings it (before the fit ends),
each attempt that failed and is retried, and the end; for a stream, its start, each published
version and its stop. The MLflow calls run on one background thread per fit or stream
(``runlog.RunLog``), so a slow, unreachable or refusing tracking server never holds the fit up:
the fit waits at most ``FLUSH_SECONDS`` at its end for what is queued, a server that is down or
refuses is warned about once, and what could not be logged is said once. The agents never talk
to MLflow.

What a fit's run gets: params (every training setting as declared in ``TrainConfig``, or
``spark_ddl.run``'s settings; the network's class path or the function's, ``num_workers``, the
strategy, the input and label columns); metrics per epoch (every number in the history record,
``step=epoch``; a ``report()`` record at its ``step``, else its ``epoch``, else its number); tags
(``spark_ddl.attempt.<n>.error`` for an attempt that failed and was retried,
``spark_ddl.attempts``); artifacts ``spark_ddl/summary.json`` and ``spark_ddl/history.png`` (the
loss curves); the model (``log_models=True``) as ``model``. Inside a pyspark.ml tuner each fit is
a child run of the tuning's run (``spark_ddl.mlflow.tuning``). A stream's run gets the settings
once, ``stream_rows``, ``stream_train_loss``, ``stream_seconds``, ``stream_train_seconds``,
``stream_freshness``, ``stream_epochs``, ``stream_attempts`` per published version
(``step=version``; its micro-batches' fits log no runs of their own), and ends when the stream
stops.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import mlflow
from mlflow import MlflowClient

from spark_ddl.driver import progress
from spark_ddl.mlflow import tuning
from spark_ddl.mlflow.runlog import FLUSH_SECONDS, RunLog, flat_params, log_history_plot, refusal

log = logging.getLogger("spark_ddl.mlflow")

__all__ = ["FLUSH_SECONDS", "autolog", "last_run_id", "log_to_last_run", "use"]

_STATE: dict[str, Any] = {"listener": None, "last_run_id": None}


def autologging() -> bool:
    """Whether ``autolog()`` is on."""
    return _STATE["listener"] is not None


def last_run_id() -> str | None:
    """The MLflow run the last autologged fit logged into (None: none, or its logging failed)."""
    return _STATE["last_run_id"]


def log_to_last_run(metrics: dict[str, float]) -> str | None:
    """Add ``metrics`` (e.g. a held-out score) to the run of the last autologged fit; returns its
    id (None: there is none). A tracking server's failure is a warning, not an error."""
    run_id = last_run_id()
    if run_id is None:
        return None
    try:
        MlflowClient().log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), int(time.time() * 1000), 0)
                                                  for k, v in metrics.items()])
    except Exception as exc:  # noqa: BLE001 - the fit is done; the tracking server's problem is not ours
        log.warning("MLflow: %s could not be logged to run %s (%s: %s)", sorted(metrics), run_id,
                    type(exc).__name__, exc)
    return run_id


def use(tracking_uri: str | None = None, experiment: str | None = None) -> str:
    """Log to ``tracking_uri`` (None: MLFLOW_TRACKING_URI, else MLflow's default) in
    ``experiment``; returns the tracking URI in use."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    if experiment:
        mlflow.set_experiment(experiment)
    return mlflow.get_tracking_uri()


def autolog(log_models: bool = False, disable: bool = False, silent: bool = False) -> None:
    """From now on (``disable=True``: no longer), every ``TorchEstimator.fit``, ``spark_ddl.run``
    and ``fit_stream`` on this driver logs into the active MLflow run, or into a run of its own
    that ends when the fit (the stream) ends, FAILED when it failed; inside a ``CrossValidator``
    or ``TrainValidationSplit``, into a child run of the tuning's. ``log_models``: also log each
    fit's trained model (``log_model(model, "model")``). ``silent``: no warnings about a
    tracking server that could not be reached or refused."""
    listener = _STATE["listener"]
    if listener is not None:
        progress.remove_listener(listener)
        _STATE["listener"] = None
    if not disable:
        _STATE["listener"] = _AutologListener(log_models, silent)
        progress.add_listener(_STATE["listener"])
        tuning.patch()
    else:
        tuning.unpatch()


def _metrics(record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, metrics) of a history record: an epoch's (step=epoch), or a ``report()`` record's
    (step: its ``step``, else its ``epoch``, else its number)."""
    numbers = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if "report_index" in record:
        numbers.pop("report_index")
        step = numbers.pop("step", None)
        if step is None:
            step = numbers.pop("epoch", float(record["report_index"]))
        return int(step), numbers
    step = numbers.pop("epoch", 0.0)
    return int(step), numbers


class _AutologListener:
    """The fit listener of ``autolog``: each call is on the thread that runs the fit (the
    driver's, a tuner's pool thread, a stream's micro-batch thread); the MLflow calls happen on
    the fit's own ``RunLog`` thread."""

    def __init__(self, log_models: bool, silent: bool) -> None:
        self.log_models, self.silent = log_models, silent
        self._local = threading.local()  # per thread, a stack: a fit inside a fit logs to its own
        self.streams: dict[str, RunLog] = {}

    def _stack(self) -> list[RunLog | None]:
        if not hasattr(self._local, "fits"):
            self._local.fits = []
        return self._local.fits

    def _current(self) -> RunLog | None:
        stack = self._stack()
        return stack[-1] if stack else None

    def fit_started(self, facts: dict[str, Any]) -> None:
        if facts.get("stream") is not None:  # a micro-batch's fit: the stream's run has its version
            self._stack().append(None)
            return
        uri = mlflow.get_tracking_uri()
        parent, active = tuning.parent(), mlflow.active_run()
        fit = RunLog(uri, active.info.run_id if active is not None and parent is None else None, self.silent)
        self._stack().append(fit)
        reason = refusal(uri)
        if reason is not None:
            fit.refuse(reason, "this fit")
            return
        fit.start(flat_params(facts), {"spark_ddl.kind": str(facts.get("kind"))}, parent=parent)

    def epoch_finished(self, record: dict[str, Any]) -> None:
        fit = self._current()
        if fit is not None:
            step, metrics = _metrics(record)
            fit.metrics(f"{'report' if 'report_index' in record else 'epoch'} {step}", metrics, step,
                        int(time.time() * 1000))

    def attempt_failed(self, record: dict[str, Any]) -> None:
        fit = self._current()
        if fit is None:
            return
        number = int(record.get("attempt", 0))
        error = str(record.get("error"))[:5000]
        fit.put(f"attempt {number}", lambda: fit.client.set_tag(fit.run_id, f"spark_ddl.attempt.{number}.error",
                                                                 error))

    def fit_finished(self, outcome: dict[str, Any], error: BaseException | None) -> None:
        stack = self._stack()
        fit = stack.pop() if stack else None
        if fit is None:
            return
        summary, model = outcome.get("summary"), outcome.get("model")
        if summary is not None:
            attempts = str(len(summary.get("attempts") or []))
            document = json.loads(json.dumps(dict(summary), default=str))
            fit.put("the summary", lambda: (fit.client.set_tag(fit.run_id, "spark_ddl.attempts", attempts),
                                           fit.client.log_dict(fit.run_id, document, "spark_ddl/summary.json")))
            fit.put("the history plot", lambda: _plot(fit, summary))
        if error is not None:
            text = f"{type(error).__name__}: {error}"[:5000]
            fit.put("the error", lambda: fit.client.set_tag(fit.run_id, "spark_ddl.error", text))
        if model is not None and self.log_models:
            from spark_ddl.mlflow.flavor import log_model

            fit.put("the model", lambda: log_model(model, "model", run_id=fit.run_id))
        fit.end(failed=error is not None)
        fit.finish()
        _STATE["last_run_id"] = fit.run_id if fit.failed is None and not fit.thread.is_alive() else None

    # ------------------------------------------------------------------ fit_stream

    def stream_started(self, key: str, facts: dict[str, Any]) -> None:
        uri = mlflow.get_tracking_uri()
        active = mlflow.active_run()
        stream = RunLog(uri, facts.get("run_id") or (active.info.run_id if active is not None else None), self.silent)
        self.streams[key] = stream
        reason = refusal(uri)
        if reason is not None:
            stream.refuse(reason, "the stream")
            return
        stream.start(flat_params(facts), {"spark_ddl.kind": "fit_stream", "spark_ddl.model_dir": facts["model_dir"]},
                     run_name=f"fit_stream {facts.get('query_name') or facts['model_dir']}")

    def version_published(self, key: str, record: dict[str, Any]) -> None:
        stream = self.streams.get(key)
        if stream is not None:
            step = int(record["version"])
            stream.metrics(f"version {step}", stream_metrics(record), step, int(time.time() * 1000))

    def stream_stopped(self, key: str, error: BaseException | None) -> None:
        stream = self.streams.pop(key, None)
        if stream is None:
            return
        if error is not None:
            text = f"{type(error).__name__}: {error}"[:5000]
            stream.put("the error", lambda: stream.client.set_tag(stream.run_id, "spark_ddl.error", text))
        stream.end(failed=error is not None)
        stream.finish("the stream")


STREAM_METRICS = ("rows", "train_loss", "seconds", "train_seconds", "freshness", "epochs", "attempts")


def stream_metrics(record: dict[str, Any]) -> dict[str, float]:
    """A published version's numbers, as the stream's run logs them (``stream_<name>``)."""
    return {f"stream_{k}": float(record[k]) for k in STREAM_METRICS
            if isinstance(record.get(k), (int, float)) and not isinstance(record.get(k), bool)}


def _plot(fit: RunLog, summary: Any) -> None:
    try:
        log_history_plot(fit.client, fit.run_id, summary)
    except ImportError as exc:  # matplotlib missing: not the tracking server's failure
        log.debug("no history plot: %s", exc)
