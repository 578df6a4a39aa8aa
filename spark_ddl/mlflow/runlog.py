"""One autologged fit's (or stream's) MLflow calls, made in order on a background thread so that
a slow, unreachable or refusing tracking server never holds the driver up; and what they log
(params from the settings' declarations, the history plot)."""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable

import mlflow
from mlflow import MlflowClient

from spark_ddl.common.settings import declared

log = logging.getLogger("spark_ddl.mlflow")

FLUSH_SECONDS = 30.0  # at most this long at a fit's end for the queued calls to reach the server
CONNECT_SECONDS = 1.0  # an http(s) tracking server that does not answer this fast is down
PARAM_VALUE_MAX = 6000  # MLflow's limit on a param value


def flat_params(facts: dict[str, Any]) -> dict[str, str]:
    """Every setting of the fit (``facts["settings"]``: the names, else every declared one) as
    set, the network's class path (or the function's), the input columns and the strategy."""
    config = facts["config"]
    values = config.to_json_dict()
    params: dict[str, Any] = {name: values[name] for name in facts.get("settings") or declared(config)}
    network = facts.get("network") or {}
    params["network"] = network.get("class_path") or network.get("class") or network.get("kind")
    columns = facts.get("columns") or {}
    params["input_columns"] = [list(cols) for cols, _ in columns.get("sources", [])]
    params["label_col"] = columns.get("label_col")
    if facts.get("kind") != "run":
        params["strategy"] = config.sync
    out = {}
    for key, value in params.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        out[key] = text[:PARAM_VALUE_MAX]
    return out


def refusal(uri: str) -> str | None:
    """Why an http(s) tracking server will not take this fit's logs (None: it answers, or the
    store is not a server): no connection within ``CONNECT_SECONDS``, or an HTTP 5xx to a plain
    GET of its ``/health`` (MLflow's client would retry a 5xx for minutes)."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return None
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=CONNECT_SECONDS):
            pass
    except OSError as exc:
        return f"not reachable: {type(exc).__name__}: {exc}"
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=2 * CONNECT_SECONDS):
            return None
    except urllib.error.HTTPError as exc:
        return f"it refuses requests: HTTP {exc.code} {exc.reason}" if exc.code >= 500 else None
    except OSError as exc:
        return f"it does not answer: {type(exc).__name__}: {exc}"


def log_history_plot(client: MlflowClient, run_id: str, summary: Any) -> None:
    """The loss curves (``TrainingSummary.plot``, matplotlib) as ``spark_ddl/history.png``."""
    from spark_ddl.ml.summary import TrainingSummary

    summary = summary if isinstance(summary, TrainingSummary) else TrainingSummary(dict(summary))
    if not summary.history or not all("train_loss" in h and "epoch" in h for h in summary.history):
        return
    with tempfile.TemporaryDirectory(prefix="spark-ddl-plot-") as tmp:
        path = summary.plot(os.path.join(tmp, "history.png"))
        client.log_artifact(run_id, path, "spark_ddl")


class RunLog:
    """One fit's (or stream's) MLflow calls, run in order on a background thread.

    ``run_id`` None: the first call starts a run of its own (``start(...)``), ended by ``end``.
    After a call fails, the rest are dropped and said once, in the one warning of ``finish``.
    """

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

    def refuse(self, reason: str, what: str) -> None:
        """The server will not take anything: log nothing, and say so once (``what``: of what)."""
        self.failed, self.warned = reason, True
        if not self.silent:
            log.warning("MLflow tracking server %s: %s; %s goes on, and nothing of it (settings, metrics, "
                        "summary, plot, model) is logged there", self.uri, reason, what)

    def put(self, what: str, call: Callable[[], Any]) -> None:
        self.calls.put((what, call))

    def start(self, params: dict[str, str], tags: dict[str, str], parent: tuple[str, str] | None = None,
              run_name: str | None = None) -> None:
        """Start the run (unless it is the user's) and log ``params`` and ``tags`` into it;
        ``parent``: (run id, experiment id) of the run this one is a child of."""

        def call() -> None:
            if self.run_id is None:  # this thread's own run (MLflow's active run is per thread)
                if parent is not None:
                    self.run_id = mlflow.start_run(experiment_id=parent[1], parent_run_id=parent[0], nested=True,
                                                   run_name=run_name).info.run_id
                else:
                    self.run_id = mlflow.start_run(run_name=run_name).info.run_id
            self.client.log_batch(self.run_id, params=[mlflow.entities.Param(k, v) for k, v in params.items()],
                                  tags=[mlflow.entities.RunTag(k, v) for k, v in tags.items()])

        self.put("starting the run", call)

    def metrics(self, what: str, values: dict[str, float], step: int, now_ms: int) -> None:
        self.put(what, lambda: self.client.log_batch(self.run_id, metrics=[
            mlflow.entities.Metric(k, v, now_ms, step) for k, v in values.items()]))

    def end(self, failed: bool) -> None:
        """End the run if it is this log's own (FAILED when ``failed``)."""
        if self.own_run:
            self.put("ending the run", lambda: self.client.set_terminated(
                self.run_id, "FAILED" if failed else "FINISHED"))

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

    def finish(self, what: str = "the fit") -> None:
        """Wait (at most FLUSH_SECONDS) for the queued calls; one warning if some failed."""
        self.calls.put(None)
        self.thread.join(FLUSH_SECONDS)
        if self.silent or self.warned:
            return
        if self.thread.is_alive():
            log.warning("MLflow tracking at %s did not take the logs of %s within %.0f s; it ends without "
                        "waiting (what is still queued may not arrive)", self.uri, what, FLUSH_SECONDS)
        elif self.failed is not None:
            log.warning("MLflow tracking at %s failed (%s); %s went on, and %d logging call(s) of it could "
                        "not be made: %s", self.uri, self.failed, what, len(self.dropped), ", ".join(self.dropped))
