"""The embedded local Spark session the package starts when none exists, or a Spark Connect
session (``remote="sc://host:port"`` or ``"local[N]"``)."""

from __future__ import annotations

import os
import sys
import warnings

from pyspark.sql import SparkSession


def local_spark_conf(num_workers: int = 2) -> dict[str, str]:
    """Settings for a local session in which ``num_workers`` agents train side by side."""
    return {
        "spark.master": f"local[{num_workers}]",
        "spark.task.cpus": "1",
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.shuffle.partitions": str(max(2, num_workers)),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.python.worker.reuse": "true",
        "spark.python.worker.faulthandler.enabled": "true",  # a crashed worker shows its Python stack
        # barrier allGather must not wait a year when a task never arrives
        "spark.barrier.sync.timeout": "600s",
    }


def get_or_create_session(
    master: str | None = None,
    num_workers: int = 2,
    app_name: str = "spark_ddl",
    extra_conf: dict[str, str] | None = None,
    remote: str | None = None,
) -> SparkSession:
    """The active SparkSession; under spark-submit the session it configured; otherwise a new
    embedded one (``local[num_workers]`` unless ``master`` says otherwise) whose executors
    run this very Python interpreter.

    ``remote``: a Spark Connect session instead (needs the ``connect`` extra): ``"sc://host:port"``
    connects to a running Spark Connect server (its executors run the server's Python);
    ``"local[N]"`` starts a local server in this process, configured like the embedded session.
    """
    if remote is not None:
        return _connect_session(remote, num_workers, app_name, extra_conf or {})
    active = SparkSession.getActiveSession()
    if active is not None and master is None:
        return active
    if master is None and "PYSPARK_GATEWAY_PORT" in os.environ:  # launched by spark-submit
        return SparkSession.builder.appName(app_name).getOrCreate()
    _use_this_python(master is None or master.startswith("local"))
    conf = local_spark_conf(num_workers)
    if master is not None:
        conf["spark.master"] = master
        if not master.startswith("local"):  # a real cluster must reach the driver by its address
            del conf["spark.driver.host"], conf["spark.driver.bindAddress"]
    conf.update(extra_conf or {})
    builder = SparkSession.builder.appName(app_name)
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def _use_this_python(loopback: bool) -> None:
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if loopback:
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # one machine: stay on loopback


def _connect_session(remote: str, num_workers: int, app_name: str, extra_conf: dict[str, str]) -> SparkSession:
    """A Spark Connect session: a local server in this process for ``local[...]`` (static
    settings apply to it), else a client of the server at ``sc://...`` (session settings only)."""
    try:
        import grpc  # noqa: F401 - pyspark's Connect client needs it
    except ImportError as exc:
        raise ImportError(
            "A Spark Connect session needs pyspark's Connect client: pip install 'spark_ddl[connect]' "
            "(grpcio, grpcio-status, googleapis-common-protos, zstandard)."
        ) from exc
    conf = dict(extra_conf)
    if remote.startswith("local"):
        _use_this_python(True)  # the local server's executors inherit this environment
        conf = {**{k: v for k, v in local_spark_conf(num_workers).items() if k != "spark.master"}, **conf}
    builder = SparkSession.builder.remote(remote).appName(app_name)
    for key, value in conf.items():
        builder = builder.config(key, value)
    with warnings.catch_warnings():  # static settings reach a local server, yet the client warns it could not set them
        warnings.filterwarnings("ignore", message="Failed to set")
        return builder.getOrCreate()
