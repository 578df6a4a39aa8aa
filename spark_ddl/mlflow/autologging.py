"""``spark_ddl.mlflow.autolog()``: every ``TorchEstimator.fit`` logs into MLflow from the driver.

A fit listener (``spark_ddl.driver.progress``) hears the fit start, each epoch as rank 0's status
report brings it (before the fit ends), each attempt that failed and is retried, and the end.
The MLflow calls run on one background thread per fit, so a slow or unreachable tracking server
never holds the fit up: the fit waits at most ``FLUSH_SECONDS`` at its end for what is queued,
a server that is down or refuses a request is warned about once, and what could not be logged
is said once. The agents never talk to MLflow.

What a run gets: params (every training setting as declared in ``TrainConfig``, the network's
class path, ``num_workers``, the strategy, the input and label columns); metrics per epoch
(every number in the history record, ``step=epoch``); tags (``spark_ddl.attempt.<n>.error``
for an attempt that failed and was retried, ``spark_ddl.attempts``); the summary as
``spark_ddl/summary.json``; the model (``log_models=True``) as ``model``.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
import urllib.parse
from typing import Any, Callable

import mlflow
from mlflow import MlflowClient

from spark_ddl.driver import progress
from spark_ddl.settings import declared

log = logging.getLogger("spark_ddl.mlflow")

FLUSH_SECONDS = 30.0  # at most this long at a fit's end for the queued calls to reach the server
CONNECT_SECONDS = 1.0  # an http(s) tracking server that does not accept a connection this fast is down
PARAM_VALUE_MAX = 6000  # MLflow's limit on a param value

_STATE: dict[str, Any] = {"listener": None, "last_run_id": None}


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
    """From now on (``disable=True``: no longer), every ``TorchEstimator.fit`` on this driver logs
    into the active MLflow run, or into a run of its own that ends when the fit ends (FAILED when
    the fit failed). ``log_models``: also log the trained model (``log_model(model, "model")``).
    ``silent``: no warnings about a tracking server that could not be reached."""
    listener = _STATE["listener"]
    if listener is not None:
        progress.remove_listener(listener)
        _STATE["listener"] = None
    if not disable:
        _STATE["listener"] = _AutologListener(log_models, silent)
        progress.add_listener(_STATE["listener"])


def _flat_params(facts: dict[str, Any]) -> dict[str, str]:
    config = facts["config"]
    params: dict[str, Any] = {}
    for name in declared(config):  # every setting, from its one declaration
        params[name] = config.to_json_dict()[name]
    network = facts.get("network") or {}
    params["network"] = network.get("class_path") or network.get("class") or network.get("kind")
    columns = facts.get("columns") or {}
    params["input_columns"] = [list(cols) for cols, _ in columns.get("sources", [])]
    params["label_col"] = columns.get("label_col")
    params["strategy"] = config.sync
    out = {}
    for key, value in params.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        out[key] = text[:PARAM_VALUE_MAX]
    return out


def _unreachable(uri: str) -> str | None:
    """Why an http(s) tracking server cannot be reached (None: it accepts connections, or the
    store is not a server)."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return None
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=CONNECT_SECONDS):
            return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


class _FitLog:
    """One fit's MLflow calls, run in order on a background thread."""

    def __init__(self, uri: str, run_id: str | None, silent: bool) -> None:
        self.uri, self.run_id, self.silent = uri, run_id, silent
        self.own_run = run_id is None
        self.client = MlflowClient(tracking_uri=uri)
        self.calls: queue.Queue = queue.Queue()
        self.failed: str | None = None
        self.dropped: list[str] = []  # what could not be logged
        self.warned = False  # the one warning of this fit was given already
        self.thread = threading.Thread(target=self._work, daemon=True, name="spark-ddl-mlflow")
        self.thread.start()

    def put(self, what: str, call: Callable[[], Any]) -> None:
        self.calls.put((what, call))

    def _work(self) -> None:
        while True:
            item = self.calls.get()
            if item is None:
                return
            what, call = item
            if self.failed is not None:
                self.dropped.append(what)
                continue
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - the tracking server's problem is not the fit's
                self.failed = f"{what}: {type(exc).__name__}: {str(exc)[:300]}"
                self.dropped.append(what)

    def finish(self) -> None:
        """Wait (at most FLUSH_SECONDS) for the queued calls; one warning if some failed."""
        self.calls.put(None)
        self.thread.join(FLUSH_SECONDS)
        if self.silent or self.warned:
            return
        if self.thread.is_alive():
            log.warning("MLflow tracking at %s did not take this fit's logs within %.0f s; the fit ends without "
                        "waiting (what is still queued may not arrive)", self.uri, FLUSH_SECONDS)
        elif self.failed is not None:
            log.warning("MLflow tracking at %s failed (%s); the fit went on, and %d logging call(s) of it could "
                        "not be made: %s", self.uri, self.failed, len(self.dropped), ", ".join(self.dropped))


class _AutologListener:
    def __init__(self, log_models: bool, silent: bool) -> None:
        self.log_models, self.silent = log_models, silent
        self.fits: list[_FitLog] = []  # a stack: a fit inside a fit (tuning) logs to its own

    # each call below is on the driver thread; the MLflow calls happen on the fit's thread

    def fit_started(self, facts: dict[str, Any]) -> None:
        uri = mlflow.get_tracking_uri()
        active = mlflow.active_run()
        reason = _unreachable(uri)
        fit = _FitLog(uri, active.info.run_id if active is not None else None, self.silent)
        self.fits.append(fit)
        if reason is not None:
            fit.failed, fit.warned = f"connecting: {reason}", True
            if not self.silent:
                log.warning("MLflow tracking server %s is not reachable (%s); this fit goes on, and nothing of it "
                            "(settings, per-epoch metrics, summary, model) is logged there", uri, reason)
            return
        params = _flat_params(facts)

        def start() -> None:
            if fit.run_id is None:  # this thread's own run (MLflow's active run is per thread): the
                # experiment, run name and default tags as mlflow.start_run gives them
                fit.run_id = mlflow.start_run().info.run_id
            entities = [mlflow.entities.Param(k, v) for k, v in params.items()]
            fit.client.log_batch(fit.run_id, params=entities, tags=[
                mlflow.entities.RunTag("spark_ddl.kind", str(facts.get("kind")))])

        fit.put("starting the run", start)

    def epoch_finished(self, record: dict[str, Any]) -> None:
        if not self.fits:
            return
        fit = self.fits[-1]
        step = int(record.get("epoch", 0))
        now = int(time.time() * 1000)
        metrics = {k: float(v) for k, v in record.items()
                   if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        fit.put(f"epoch {step}", lambda: fit.client.log_batch(fit.run_id, metrics=[
            mlflow.entities.Metric(k, v, now, step) for k, v in metrics.items()]))

    def attempt_failed(self, record: dict[str, Any]) -> None:
        if not self.fits:
            return
        fit = self.fits[-1]
        number = int(record.get("attempt", 0))
        error = str(record.get("error"))[:5000]
        fit.put(f"attempt {number}", lambda: fit.client.set_tag(fit.run_id, f"spark_ddl.attempt.{number}.error",
                                                                 error))

    def fit_finished(self, outcome: dict[str, Any], error: BaseException | None) -> None:
        if not self.fits:
            return
        fit = self.fits.pop()
        summary = outcome.get("summary")
        model = outcome.get("model")

        def end() -> None:
            if summary is not None:
                attempts = summary.get("attempts") or []
                fit.client.set_tag(fit.run_id, "spark_ddl.attempts", str(len(attempts)))
                fit.client.log_dict(fit.run_id, json.loads(json.dumps(dict(summary), default=str)),
                                    "spark_ddl/summary.json")
            if error is not None:
                fit.client.set_tag(fit.run_id, "spark_ddl.error", f"{type(error).__name__}: {error}"[:5000])
            if model is not None and self.log_models:
                from spark_ddl.mlflow.flavor import log_model

                log_model(model, "model", run_id=fit.run_id)
            if fit.own_run:
                fit.client.set_terminated(fit.run_id, "FAILED" if error is not None else "FINISHED")

        fit.put("ending the fit", end)
        fit.finish()
        _STATE["last_run_id"] = fit.run_id if fit.failed is None and not fit.thread.is_alive() else None

