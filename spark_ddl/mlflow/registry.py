"""``fit_stream(..., registered_model_name=...)``: each published version becomes a version of
an MLflow registered model, so that ``models:/<name>@latest`` (MLflow's reserved alias for the
highest version) is the newest published version.

Each version is logged (the same files the version store published) into the stream's MLflow
run, registered with the tags ``model_version`` (the store's number), ``batch_id``, ``query_id``
and ``model_dir``, in the order they are published. Exactly once, like the versions themselves:
before registering, the registry is searched for the same ``model_dir`` and ``model_version``;
when the stream starts, the store's newest version is registered if it is not (a crash came
between publishing and registering, or the stream ran without a registered model before).
Only the driver talks to MLflow.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import mlflow
from mlflow import MlflowClient

from spark_ddl.mlflow.flavor import log_model

log = logging.getLogger("spark_ddl.mlflow")

class VersionRegistry:
    """Registers a stream's published versions under ``name`` (driver side)."""

    def __init__(self, name: str, model_dir: str) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"registered_model_name must be a non-empty name, got {name!r}.")
        self.name, self.model_dir = name, model_dir
        self.client = MlflowClient()
        active = mlflow.active_run()
        self.run_id = active.info.run_id if active is not None else None
        self.own_run = active is None  # the stream's own run: ended when the stream stops

    def run(self) -> str:
        """The stream's MLflow run (started now if it is the stream's own)."""
        if self.run_id is None:  # the stream's own run, kept open while it publishes
            self.run_id = _new_run(f"fit_stream {self.name}",
                                   {"spark_ddl.kind": "fit_stream", "spark_ddl.model_dir": self.model_dir})
        return self.run_id

    def registered(self, number: int) -> Any:
        """The registered version holding store version ``number`` of this model_dir, or None."""
        found = self.client.search_model_versions(
            f"name = '{self.name}' and tag.model_version = '{number}'")
        return next((v for v in found if v.tags.get("model_dir") == self.model_dir), None)

    def register(self, model: Any, record: dict[str, Any], files: dict[str, Any] | None = None) -> Any:
        """Register published version ``record["version"]`` (``files``: what the store published),
        unless it is registered already."""
        number = int(record["version"])
        version = self.registered(number)
        if version is None:
            run_id = self.run()
            info = log_model(model, f"version-{number}", registered_model_name=self.name, run_id=run_id,
                             files=files)
            tags = {"model_version": str(number), "batch_id": str(record.get("batch_id")),
                    "query_id": str(record.get("query_id")), "model_dir": self.model_dir}
            for key, value in tags.items():
                self.client.set_model_version_tag(self.name, str(info.registered_model_version), key, value)
            version = self.client.get_model_version(self.name, str(info.registered_model_version))
        return version

    def log_version(self, record: dict[str, Any]) -> None:
        """A published version's numbers (``stream_rows``, ... with ``step=version``) into the
        stream's run, unless autolog logs them there."""
        from spark_ddl.mlflow.autologging import autologging, stream_metrics

        if autologging() or self.run_id is None:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[mlflow.entities.Metric(k, v, now, int(record["version"]))
                                                    for k, v in stream_metrics(record).items()])

    def catch_up(self, store: Any) -> Any:
        """Register the store's newest version if it is not registered yet (None: none there)."""
        number = store.latest_number()
        if number is None or self.registered(number) is not None:
            return None
        from spark_ddl.ml.model import TorchModel

        model = TorchModel.load(store.path(number))
        log.info("registering version %d of %s as %r (it was published but not registered)", number,
                 self.model_dir, self.name)
        return self.register(model, store.record(number) or {"version": number})

    def end(self, error: BaseException | None = None) -> None:
        """The stream stopped: end its own run (FAILED on ``error``); the user's stays open."""
        if self.run_id is not None and self.own_run:
            self.client.set_terminated(self.run_id, "FAILED" if error is not None else "FINISHED")


def _new_run(name: str, tags: dict[str, str]) -> str:
    """A new run as ``mlflow.start_run`` makes it (the current experiment, default tags), started
    in a thread of its own so that it becomes no thread's active run here (MLflow's active run is
    per thread)."""
    out: dict[str, Any] = {}

    def start() -> None:
        try:
            out["id"] = mlflow.start_run(run_name=name, tags=tags).info.run_id
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread below
            out["error"] = exc

    thread = threading.Thread(target=start, name="spark-ddl-mlflow-run")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["id"]
