"""Spark sessions for the tests: one at a time, switched between masters as needed.

Tests that ask for ``spark`` run on local[2]; tests that ask for ``any_spark`` run once on
local[2] and once on local-cluster[2,1,1024] (separate executor JVMs). Tests are ordered so
that each master starts once. Spark Connect tests (marker ``connect``) run last: once a Connect
session has started, pyspark builds Connect columns in the whole process, so they stop the
classic session first and put the process back when done (``tests/connect_server.py``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Executors import test helpers (pickled by reference) from the repo root.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p
)
os.environ["PYSPARK_PYTHON"] = sys.executable
# Every JVM the suite starts (sessions, executors, standalone daemons, the machines', spark-submit,
# Connect servers) lives for seconds on tiny data: C1 alone and the serial collector spend a
# quarter less CPU on 2 cores than C2's compiler threads would (tests/README.md). A value set
# by whoever runs the suite is kept.
os.environ.setdefault("JAVA_TOOL_OPTIONS", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")

MASTERS = {
    "local": ("local[2]", {}),
    "cluster": ("local-cluster[2,1,1024]", {"spark.executor.memory": "512m"}),
}


class _Sessions:
    """At most one SparkSession alive; asking for another master stops the current one."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.session = None

    def get(self, name: str, master: str | None = None, conf: dict | None = None):
        if self.name != name:
            self.stop()
            from spark_ddl import get_or_create_session

            default_master, default_conf = MASTERS.get(name, (master, {}))
            self.session = get_or_create_session(
                master=master or default_master, extra_conf={**default_conf, **(conf or {})}
            )
            self.name = name
        return self.session

    def stop(self) -> None:
        if self.session is not None:
            self.session.stop()
            self.session, self.name = None, None


SESSIONS = _Sessions()


@pytest.fixture(scope="session", autouse=True)
def _stop_sessions_at_exit():
    yield
    SESSIONS.stop()


@pytest.fixture
def spark():
    """A local[2] SparkSession."""
    return SESSIONS.get("local")


@pytest.fixture(params=["local", pytest.param("cluster", marks=pytest.mark.cluster)])
def any_spark(request):
    """The test runs on local[2] and on local-cluster[2,1,1024]."""
    return SESSIONS.get(request.param)


@pytest.fixture
def cluster_spark():
    """A local-cluster[2,1,1024] SparkSession only (where local[2] would repeat another test)."""
    return SESSIONS.get("cluster")


@pytest.fixture(scope="session")
def sessions():
    """The session switcher itself, for tests that need a specially configured Spark."""
    return SESSIONS


def _master_order(item) -> float:
    callspec = getattr(item, "callspec", None)
    if ((callspec is not None and callspec.params.get("any_spark") == "cluster") or item.get_closest_marker("cluster")
            or "cluster_spark" in getattr(item, "fixturenames", ())):
        return 2  # every local-cluster test together: that master starts once
    if item.get_closest_marker("connect"):
        return 4
    if item.get_closest_marker("machines"):
        return 3.5  # the namespace machines' cluster starts once, after the other special sessions
    if item.get_closest_marker("own_session"):
        return 3
    if "spark" in getattr(item, "fixturenames", ()) or "any_spark" in getattr(item, "fixturenames", ()):
        return 1
    return 0


def pytest_collection_modifyitems(config, items):
    items.sort(key=_master_order)  # stable: unit, local[2], local-cluster, special sessions, Connect


def pytest_configure(config):
    config.addinivalue_line("markers", "own_session: starts its own specially configured Spark")
    config.addinivalue_line("markers", "connect: a Spark Connect client in the test process (runs last)")
