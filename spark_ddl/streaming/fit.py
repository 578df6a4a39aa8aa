"""``TorchEstimator.fit_stream``: Structured Streaming's ``foreachBatch`` around a warm-started
``fit``. Every non-empty micro-batch trains the current model (weights and optimiser state) with
barrier agents, exactly as ``fit(initial_model=previous version)`` would, then publishes the next
version into the ``VersionStore``.

Exactly once: each version records the streaming query's id and the micro-batch id it came
from. A micro-batch that Spark replays after a restart or a crash (its commit was not written)
is found in the store and skipped; one that failed before its version was published is trained
again from the previous version. A failing micro-batch fails the query with the fit's own error
and leaves the published versions as they were.

Runs on classic SparkSessions: over Spark Connect, ``foreachBatch`` runs the function in a
server-side Python process, away from this driver's state (refused with the way out).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any

from pyspark.sql import DataFrame

from spark_ddl.driver import progress
from spark_ddl.errors import ConfigError
from spark_ddl.ml.persistence import model_files, read_metadata
from spark_ddl.ml.warm_start import resolve_initial_model
from spark_ddl.streaming.versions import VersionStore

log = logging.getLogger("spark_ddl.stream")

TRIGGERS = ("processingTime", "availableNow", "once")
QUERY_ID_WAIT_SECONDS = 120.0  # how long the first micro-batch waits for start() to return the query


def trigger_options(trigger: Any) -> dict[str, Any] | None:
    """The keyword arguments of ``DataStreamWriter.trigger`` for ``trigger`` (None: Spark's
    default, a micro-batch as soon as the previous one ends)."""
    if trigger is None:
        return None
    if isinstance(trigger, str):
        trigger = {"processingTime": trigger}
    if not isinstance(trigger, dict) or len(trigger) != 1 or next(iter(trigger)) not in TRIGGERS:
        hint = " (continuous processing has no micro-batches to train on)" if isinstance(trigger, dict) and \
            "continuous" in trigger else ""
        raise ConfigError(f"trigger must be one of {{'processingTime': '30 seconds'}}, {{'availableNow': True}}, "
                          f"{{'once': True}} or None, got {trigger!r}{hint}.")
    return dict(trigger)


def check_classic(df: DataFrame) -> None:
    """Refuse a Spark Connect DataFrame, naming why and the way out."""
    if type(df).__module__.startswith("pyspark.sql.connect"):
        raise ConfigError(
            "fit_stream needs a classic SparkSession: over Spark Connect, foreachBatch runs each micro-batch's "
            "function in a Python process on the Connect server (which needs spark_ddl and the Connect client "
            "installed there) and away from this client's stream state. Run the training stream as a classic "
            "application (spark-submit, or SparkSession.builder.master(...) without remote); LatestModel "
            "scoring does not need foreachBatch.")


class StreamingFit:
    """A running continuous training (what ``fit_stream`` returns).

    ``query`` is the pyspark ``StreamingQuery``; ``awaitTermination(timeout)`` raises the
    micro-batch's own error (``TrainingError``, ``SchemaError``, ...) when one failed the query;
    ``versions()`` is the history of published versions.
    """

    def __init__(self, estimator: Any, store: VersionStore, keep_versions: int, initial: Any,
                 elastic_dir: str | None = None) -> None:
        self._estimator, self.store, self._keep = estimator, store, keep_versions
        # elastic (min_workers): each micro-batch's fit checkpoints here, in a directory of its own
        self._elastic_dir = elastic_dir
        self._current = initial  # a TorchModel, a saved model's path, or None (the model's own weights)
        self._ready = threading.Event()
        self._query_id: str | None = None
        self.query: Any = None
        self.error: BaseException | None = None  # the error that failed the query, if one did
        self._freshness: dict[int, float] = {}
        self.timings: dict[int, dict[str, float]] = {}  # per version published here: seconds per phase
        self.registry: Any = None  # spark_ddl.mlflow's VersionRegistry with registered_model_name
        self.key = uuid.uuid4().hex  # the fit listeners' name for this stream
        self._ended = False  # the listeners and the registry were told the stream stopped
        self._end_lock = threading.Lock()
        self._watcher: Any = None  # the StreamingQueryListener that tells when the query ends

    # -------------------------------------------------------------- the public surface

    def awaitTermination(self, timeout: float | None = None) -> bool | None:  # noqa: N802 - pyspark's name
        """Wait for the query to end (at most ``timeout`` seconds: returns whether it ended);
        raises the error of a micro-batch that failed it."""
        try:
            ended = self.query.awaitTermination(timeout) if timeout is not None else self.query.awaitTermination()
        except Exception as exc:
            self._finish(self.error or exc)
            if self.error is not None:
                raise self.error from None
            raise
        if ended or ended is None:
            self._finish(self.error)
        return ended

    def stop(self) -> None:
        """Stop the query (a micro-batch in progress finishes and publishes first); the stream's
        MLflow run (autolog, registered_model_name) ends."""
        self.query.stop()
        self._finish(self.error)

    def versions(self) -> list[dict[str, Any]]:
        """Every published version's record, oldest first: version, batch_id, rows, train_loss,
        seconds (micro-batch start to trained model), created (epoch seconds), and freshness
        (start to readable) for the versions this process published."""
        return [dict(r, freshness=self._freshness[r["version"]]) if r["version"] in self._freshness else r
                for r in self.store.history()]

    # -------------------------------------------------------------- per micro-batch (foreachBatch)

    def _started(self, query: Any) -> None:
        self.query, self._query_id = query, query.id
        self._ready.set()

    def _watch(self, spark: Any) -> None:
        """Tell the listeners and the registry when the query ends, however it ends (stop(), a
        failed micro-batch, an availableNow trigger that is done)."""
        from pyspark.sql.streaming import StreamingQueryListener

        stream = self

        class _Ended(StreamingQueryListener):
            def onQueryStarted(self, event: Any) -> None:  # noqa: N802 - pyspark's names
                pass

            def onQueryProgress(self, event: Any) -> None:  # noqa: N802
                pass

            def onQueryIdle(self, event: Any) -> None:  # noqa: N802
                pass

            def onQueryTerminated(self, event: Any) -> None:  # noqa: N802
                if stream._query_id is not None and str(event.id) == str(stream._query_id):
                    stream._finish(stream.error, from_listener=True)

        self._watcher = (spark, _Ended())
        spark.streams.addListener(self._watcher[1])

    def _finish(self, error: BaseException | None, from_listener: bool = False) -> None:
        """Once: the stream stopped (the listeners end its MLflow run, FAILED on ``error``)."""
        with self._end_lock:
            if self._ended:
                return
            self._ended = True
        if self.registry is not None:
            try:
                self.registry.end(error)
            except Exception as exc:  # noqa: BLE001 - the stream is over either way
                log.warning("the MLflow run of %r could not be ended: %s: %s", self.registry.name,
                            type(exc).__name__, exc)
        progress.notify("stream_stopped", self.key, error)
        if self._watcher is not None:
            spark, watcher = self._watcher
            if from_listener:  # not from inside the listener's own callback
                threading.Thread(target=spark.streams.removeListener, args=(watcher,), daemon=True).start()
            else:
                spark.streams.removeListener(watcher)

    def process(self, df: DataFrame, batch_id: int) -> None:
        """Train micro-batch ``batch_id`` and publish the next version (foreachBatch's function)."""
        started = time.time()
        if not self._ready.wait(QUERY_ID_WAIT_SECONDS):
            raise RuntimeError("fit_stream: the streaming query did not start")
        try:
            with progress.part_of_stream(self.key):  # its fit logs no MLflow run of its own
                self._train_and_publish(df, int(batch_id), started)
        except BaseException as exc:
            self.error = exc
            log.error("micro-batch %d failed, the query stops (published versions are kept): %s", batch_id, exc)
            raise

    def _train_and_publish(self, df: DataFrame, batch_id: int, started: float) -> None:
        done = self.store.published(self._query_id, batch_id)
        if done is not None:
            log.info("micro-batch %d is already in version %d (replayed after a restart): skipped",
                     batch_id, done["version"])
            return
        estimator, hook = self._estimator, getattr(self._estimator, "_stream_hook", None)
        checkpoints: str | None = None
        df = df.persist()  # read by the input scan, the partition balancing and the agents
        try:
            rows = df.count()
            if rows == 0:
                log.info("micro-batch %d is empty: nothing published", batch_id)
                return
            counted = time.time()
            extra = {estimator.initial_model: self._current}
            if not estimator.isSet(estimator.progress):
                extra[estimator.progress] = "off"  # one line per micro-batch instead
            checkpoints = None
            if self._elastic_dir is not None:  # a shrunk attempt continues from these (deleted afterwards)
                checkpoints = f"{self._elastic_dir}/batch-{batch_id}-{uuid.uuid4().hex[:8]}"
                extra[estimator.checkpoint_dir] = checkpoints
            model = estimator.copy(extra).fit(df)
        finally:
            df.unpersist()
            if checkpoints is not None:
                _delete_directory(checkpoints)
        trained = time.time()
        if hook is not None:
            hook("trained", batch_id)
        history = model.history
        record = {"batch_id": batch_id, "query_id": self._query_id, "rows": rows,
                  "train_loss": history[-1]["train_loss"] if history else None, "epochs": len(history),
                  "seconds": round(trained - started, 3),
                  "train_seconds": round(sum(h.get("seconds") or 0.0 for h in history), 3),
                  "attempts": len(model.summary.get("attempts", [])) or 1}
        files = model_files(model, export_program=model.model_source.class_path is None)
        record = self.store.publish(files, record, self._keep)
        if self.registry is not None:
            try:
                self.registry.register(model, record, files)
            except Exception as exc:  # noqa: BLE001 - the version is published; the registry lags behind
                log.warning("version %d is published but could not be registered as %r in MLflow: %s: %s",
                            record["version"], self.registry.name, type(exc).__name__, exc)
        freshness = time.time() - started
        self._freshness[record["version"]] = round(freshness, 3)
        self._tell(dict(record, freshness=round(freshness, 3)))
        # where a micro-batch's time goes: caching and counting its rows, the fit before its
        # barrier job (checks, input scan, partition balancing), the barrier job, publishing
        self.timings[record["version"]] = {
            "count": counted - started, "fit_outside_job": trained - counted - model.summary["seconds"],
            "barrier_job": model.summary["seconds"], "training": record["train_seconds"],
            "publish": freshness - (trained - started), "total": freshness}
        self._current = model
        log.info("micro-batch %d -> version %d: %d rows, train_loss %.4f, %.2f s (training %.2f s), freshness %.2f s",
                 batch_id, record["version"], rows, record["train_loss"] or float("nan"), record["seconds"],
                 record["train_seconds"], self._freshness[record["version"]])
        if hook is not None:
            hook("published", batch_id)

    def _tell(self, record: dict[str, Any]) -> None:
        """A published version's numbers to the listeners (autolog) and the registry's run."""
        progress.notify("version_published", self.key, record)
        if self.registry is not None:
            try:
                self.registry.log_version(record)
            except Exception as exc:  # noqa: BLE001 - the version is published and registered
                log.warning("version %d's numbers could not be logged in MLflow: %s: %s", record["version"],
                            type(exc).__name__, exc)


def start_stream(estimator: Any, stream_df: DataFrame, model_dir: str, checkpoint_location: str, trigger: Any,
                 initial_model: Any, keep_versions: int, query_name: str | None,
                 registered_model_name: str | None = None) -> StreamingFit:
    """Check everything a micro-batch's fit would check that does not need rows, on the driver,
    then start the query."""
    if not getattr(stream_df, "isStreaming", False):
        raise ConfigError("fit_stream trains from a streaming DataFrame (spark.readStream...); for a bounded "
                          "DataFrame use fit(df).")
    check_classic(stream_df)
    if not isinstance(keep_versions, int) or isinstance(keep_versions, bool) or keep_versions < 1:
        raise ConfigError(f"keep_versions must be an integer >= 1, got {keep_versions!r}.")
    for name, value in (("model_dir", model_dir), ("checkpoint_location", checkpoint_location)):
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{name} must be a path or URI, got {value!r}.")
    options = trigger_options(trigger)
    elastic_dir = None
    min_workers = estimator.getOrDefault(estimator.min_workers)
    if min_workers is not None and min_workers != estimator.getOrDefault(estimator.num_workers) and \
            estimator.getOrDefault(estimator.checkpoint_dir) is None:
        # elastic micro-batches: each fit checkpoints under checkpoint_location, in a directory of its own
        elastic_dir = checkpoint_location.rstrip("/") + "/elastic-fits"
        config = estimator.copy({estimator.checkpoint_dir: elastic_dir}).train_config()
    else:
        config = estimator.train_config()
    if (config.checkpoint_dir is not None and elastic_dir is None) or config.resume:
        raise ConfigError("checkpoint_dir/resume are per fit; fit_stream keeps its progress in model_dir and "
                          "checkpoint_location, and max_retries retrains a failed micro-batch from the previous "
                          "version. Leave checkpoint_dir unset.")
    spec = estimator.column_spec(stream_df.schema, estimator.getLabelCol() or None)
    if spec.label_col is None and config.train_step is None:
        raise ConfigError("A built-in loss needs labels: set label_col, or give train_step=callable(model, batch).")
    source, template = estimator.model_source()
    store = VersionStore(model_dir)
    _check_model_dir(model_dir)
    for name in store.clean_leftovers():
        log.warning("removed %s/%s: a version a crashed driver did not finish publishing", model_dir, name)
    newest = store.latest_number()
    if newest is not None:
        initial = store.path(newest)
        if initial_model is not None:
            log.info("model_dir %s holds version %d: continuing from it (initial_model is used only for an empty "
                     "model_dir)", model_dir, newest)
    else:
        initial = initial_model if initial_model is not None else estimator.getOrDefault(estimator.initial_model)
    resolve_initial_model(initial, template, config)  # refuse a model that does not fit before starting
    stream = StreamingFit(estimator, store, keep_versions, initial, elastic_dir)
    if registered_model_name is not None:  # MLflow only when asked for (the "mlflow" extra)
        from spark_ddl.mlflow.registry import VersionRegistry

        where = model_dir if "://" in model_dir else os.path.abspath(model_dir)
        stream.registry = VersionRegistry(registered_model_name, where)
        stream.registry.catch_up(store)
    if progress.listening() or stream.registry is not None:
        stream._watch(stream_df.sparkSession)  # noqa: SLF001
        where = model_dir if "://" in model_dir else os.path.abspath(model_dir)
        progress.notify("stream_started", stream.key, {
            "kind": "fit_stream", "config": config, "network": source.record(), "columns": spec.to_json_dict(),
            "model_dir": where, "query_name": query_name,
            # autolog logs into the registry's run
            "run_id": stream.registry.run() if stream.registry is not None and progress.listening() else None})
    writer = stream_df.writeStream.foreachBatch(stream.process).option("checkpointLocation", checkpoint_location)
    if query_name:
        writer = writer.queryName(query_name)
    if options:
        writer = writer.trigger(**options)
    try:
        stream._started(writer.start())  # noqa: SLF001
    except BaseException as exc:
        stream._finish(exc)  # noqa: SLF001
        raise
    return stream


def _delete_directory(uri: str) -> None:
    """Best effort: a micro-batch's own checkpoint directory, once its version is published."""
    try:
        import pyarrow.fs as pafs

        filesystem, path = pafs.FileSystem.from_uri(uri if "://" in uri else "file://" + os.path.abspath(uri))
        filesystem.delete_dir(path)
    except Exception as exc:  # noqa: BLE001 - leftovers cost space, not correctness
        log.debug("could not delete %s: %s", uri, exc)


def _check_model_dir(model_dir: str) -> None:
    try:
        read_metadata(model_dir)
    except (FileNotFoundError, ValueError):
        return
    raise ConfigError(f"model_dir {model_dir} is a saved model, not a directory of versions: pass an empty or new "
                      "directory (to start from that model, pass it as initial_model).")
