"""The version store of fit_stream, without Spark: versions appear whole or not at all, the
history and the exactly-once lookup survive pruning, a crashed publish leaves nothing readable."""

from __future__ import annotations

import pytest

from spark_ddl.formats import storage
from spark_ddl.streaming.versions import VersionStore

FILES = {"weights.safetensors": b"w" * 100, "metadata/part-00000": b"{}"}


def publish(store: VersionStore, batch_id: int, query_id: str = "q1", keep: int = 10) -> dict:
    return store.publish(FILES, {"batch_id": batch_id, "query_id": query_id, "rows": 3}, keep)


def test_versions_history_and_pruning(tmp_path):
    store = VersionStore(str(tmp_path / "models"))
    assert store.numbers() == [] and store.latest_number() is None and store.history() == []
    records = [publish(store, batch, keep=2) for batch in range(3)]
    assert [r["version"] for r in records] == [1, 2, 3]
    assert store.numbers() == [2, 3]  # keep=2
    assert [(r["version"], r["batch_id"]) for r in store.history()] == [(1, 0), (2, 1), (3, 2)]
    assert store.record(3)["batch_id"] == 2 and store.record(1) is None
    assert (tmp_path / "models" / "v000000003" / "weights.safetensors").read_bytes() == FILES["weights.safetensors"]


def test_exactly_once_lookup_is_per_streaming_query(tmp_path):
    store = VersionStore(str(tmp_path / "models"))
    publish(store, 0, "q1")
    publish(store, 1, "q1")
    publish(store, 0, "q2")  # another query (another checkpoint) continues the same model
    assert store.published("q1", 1)["version"] == 2  # replayed: already in version 2
    assert store.published("q1", 0)["version"] == 2  # an older micro-batch is in it too
    assert store.published("q1", 2) is None  # new
    assert store.published("q2", 0)["version"] == 3 and store.published("q2", 1) is None
    assert store.published("q3", 0) is None


def test_a_publish_that_dies_midway_leaves_no_version_and_its_leftovers_are_removed(tmp_path, monkeypatch):
    store = VersionStore(str(tmp_path / "models"))
    publish(store, 0)
    real_write = storage.ArrowStore.write

    def dying_write(self, path, data):
        if path.endswith("version.json"):  # the last file of the version
            raise OSError("disk gone")
        real_write(self, path, data)

    monkeypatch.setattr(storage.ArrowStore, "write", dying_write)
    with pytest.raises(OSError, match="disk gone"):
        publish(store, 1)
    monkeypatch.setattr(storage.ArrowStore, "write", real_write)
    assert store.numbers() == [1] and store.latest_number() == 1  # "latest" never moved
    # a driver killed while writing leaves its staging directory: never read, removed on restart
    staging = tmp_path / "models" / "v000000002.tmp-0123456789ab"
    staging.mkdir()
    (staging / "weights.safetensors").write_bytes(b"half")
    assert store.numbers() == [1]
    assert store.clean_leftovers() == ["v000000002.tmp-0123456789ab"] and not staging.exists()
    assert publish(store, 1)["version"] == 2 and store.numbers() == [1, 2]
