"""Continuous training from Structured Streaming on local[2]: real file-source streams, one
version per micro-batch, equivalence with a warm-started fit, exactly-once across stops and
failures, LatestModel in a running scoring query, failing micro-batches, retries."""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from spark_ddl import ConfigError, LatestModel, SchemaError, TorchEstimator, TorchModel
from spark_ddl.streaming.versions import VersionStore
from tests.conftest import SESSIONS
from tests.helpers import TinyNet, regression_arrays
from tests.references import (FLOAT32_PATHS, assert_same_optimizer_state, assert_same_state, combined_batch_training,
                              max_relative_difference)

pytestmark = pytest.mark.timeout(400)

ROWS = 24  # per file, i.e. per micro-batch
SCHEMA = "features array<float>, label float"
WAIT = 240.0  # seconds any wait below may take before the test fails (a hang guard, not a timing)


def write_files(folder: Path, count: int, seed: int = 1, bad: int | None = None) -> list[Path]:
    """``count`` Parquet files of ROWS rows each, modified one second apart (the file source
    takes them in that order); file ``bad`` has a NaN label."""
    folder.mkdir(parents=True, exist_ok=True)
    x, y = regression_arrays(ROWS * count, seed=seed)
    paths = []
    for k in range(count):
        labels = y[k * ROWS:(k + 1) * ROWS].copy()
        if k == bad:
            labels[3] = np.nan
        table = pa.table({"features": pa.array([list(r) for r in x[k * ROWS:(k + 1) * ROWS]], pa.list_(pa.float32())),
                          "label": pa.array(labels, pa.float32())})
        path = folder / f"part-{k:03d}.parquet"
        pq.write_table(table, path)
        os.utime(path, (1_000_000_000 + k, 1_000_000_000 + k))
        paths.append(path)
    return paths


def source(spark, folder: Path):
    return spark.readStream.schema(SCHEMA).option("maxFilesPerTrigger", 1).parquet(str(folder))


def estimator(**params) -> TorchEstimator:
    torch.manual_seed(5)
    settings = dict(model=TinyNet(), loss="mse", optimizer="sgd", lr=0.05, optimizer_kwargs={"momentum": 0.9},
                    batch_size=8, epochs=1, shuffle=False, timeout=60)
    settings.update(params)
    return TorchEstimator(**settings)


def wait_until(condition, what: str, seconds: float = WAIT):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {seconds:.0f} s: {what}")


def fail_at(stage: str, batch_id: int):
    """A _stream_hook that stops the driver's micro-batch there, as a kill would: nothing after
    that point happens, so Spark never commits the micro-batch."""

    def hook(at: str, batch: int) -> None:
        if (at, batch) == (stage, batch_id):
            raise RuntimeError(f"test: the driver dies after micro-batch {batch} was {stage}")

    return hook


def momentum_sgd(params):
    """The estimator()'s optimiser in plain torch."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def file_rows(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A micro-batch file's features and labels."""
    table = pq.read_table(path)
    x = np.stack(table.column("features").to_numpy(zero_copy_only=False)).astype(np.float32)
    return x, table.column("label").to_numpy().astype(np.float32)


def agents_parts(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """A micro-batch file's rows as the 2 agents hold them: one file is one input partition, which
    the driver balances by sending row i to agent i mod 2 (driver/data.py: balance_partitions)."""
    x, y = file_rows(path)
    return [(x[0::2], y[0::2]), (x[1::2], y[1::2])]


def max_difference(a: TorchModel, b: TorchModel) -> float:
    left, right = a.get_module().state_dict(), b.get_module().state_dict()
    assert left.keys() == right.keys()
    return max(float((left[k] - right[k]).abs().max()) for k in left)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three files streamed with availableNow and maxFilesPerTrigger=1, keeping 2 versions."""
    spark = SESSIONS.get("local")
    root = tmp_path_factory.mktemp("stream")
    files = write_files(root / "in", 3)
    lines = []  # the driver's progress lines
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("spark_ddl.stream")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # (setLevel: a plain assignment keeps the logger's cached isEnabledFor)
    stream = estimator().fit_stream(source(spark, root / "in"), model_dir=str(root / "models"),
                                    checkpoint_location=str(root / "checkpoint"), trigger={"availableNow": True},
                                    keep_versions=2)
    try:
        ended = stream.awaitTermination(WAIT)
    finally:
        stream.stop()
        logger.removeHandler(handler)
        logger.setLevel(level)
    return {"root": root, "files": files, "stream": stream, "ended": ended, "model_dir": str(root / "models"),
            "lines": lines}


def test_one_version_per_file_and_available_now_ends_by_itself(spark, trained):
    assert trained["ended"] is True and not trained["stream"].query.isActive
    records = trained["stream"].versions()
    assert [(r["version"], r["batch_id"], r["rows"]) for r in records] == [(1, 0, ROWS), (2, 1, ROWS), (3, 2, ROWS)]
    assert all(r["freshness"] >= r["seconds"] > 0 and np.isfinite(r["train_loss"]) for r in records)
    # one progress line per micro-batch: version, rows, loss, seconds, freshness
    progress = [line for line in trained["lines"] if " -> version " in line]
    assert [line.split(":")[0] for line in progress] == [f"micro-batch {b} -> version {b + 1}" for b in range(3)]
    for line, record in zip(progress, records):
        assert f"{ROWS} rows, train_loss {record['train_loss']:.4f}" in line and f"freshness {record['freshness']:.2f} s" in line
    timings = trained["stream"].timings  # where each micro-batch's time went
    assert sorted(timings) == [1, 2, 3] and all(t["total"] >= t["barrier_job"] >= t["training"] > 0 for t in timings.values())
    assert VersionStore(trained["model_dir"]).numbers() == [2, 3]  # keep_versions=2; the history keeps all
    latest = TorchModel.load_latest(trained["model_dir"])
    assert latest.summary["stream_version"]["version"] == 3 and latest.optimizer_state is not None


def test_version_k_equals_fit_warm_started_from_version_k_minus_1(spark, trained):
    store = VersionStore(trained["model_dir"])
    rows = spark.read.parquet(str(trained["files"][2]))  # micro-batch 2's rows
    refit = estimator(initial_model=store.path(2), progress="off").fit(rows)
    assert max_difference(refit, TorchModel.load(store.path(3))) <= 1e-5
    assert refit.summary["warm_start"]["optimizer_state"]  # momentum continues from version 2


def test_version_k_equals_plain_torch_continuing_version_k_minus_1s_weights_and_momentum(trained):
    """The independent reference: one process, torch.optim.SGD with version 2's momentum buffers
    loaded, over micro-batch 2's rows (the agents' combined batches) gives version 3."""
    store = VersionStore(trained["model_dir"])
    previous, version = TorchModel.load(store.path(2)), TorchModel.load(store.path(3))
    assert version.summary["shard_sizes"] == [ROWS // 2, ROWS // 2]
    parts = agents_parts(trained["files"][2])
    reference, optimizer = combined_batch_training(previous.get_module(), parts, 8, 1, momentum_sgd,
                                                   optimizer_state=previous.optimizer_state_dict())
    assert_same_state(version.get_module().state_dict(), reference.state_dict(), tolerance=1e-5)
    assert_same_optimizer_state(version.optimizer_state_dict(), optimizer.state_dict(), tolerance=1e-5)
    # control: the same step from version 2's weights with a fresh optimiser (no momentum) is far off
    fresh, _ = combined_batch_training(previous.get_module(), parts, 8, 1, momentum_sgd)
    assert max_relative_difference(fresh, reference) > 1e-3


def record_load(log: str):
    def hook(model_dir: str, version: int) -> None:  # runs on the executors
        with open(log, "a") as out:
            out.write(f"{os.getpid()} {version}\n")

    return hook


def test_latest_model_switches_version_in_a_running_scoring_query(spark, trained, tmp_path):
    versions, scoring_dir = Path(trained["model_dir"]), tmp_path / "serving"
    scoring_dir.mkdir()
    shutil.copytree(versions / "v000000002", scoring_dir / "v000000002")
    feed = tmp_path / "feed"
    feed.mkdir()
    latest = LatestModel(str(scoring_dir), refresh_seconds=1)
    latest._on_load = record_load(str(tmp_path / "loads.txt"))
    scored = latest.transform(source(spark, feed))
    query = scored.writeStream.format("memory").queryName("scored_latest").trigger(processingTime="0.5 seconds").start()
    try:
        def versions_seen() -> set[int]:
            return {r[0] for r in spark.sql("select distinct model_version from scored_latest").collect()}

        shutil.copy(trained["files"][0], feed / "a.parquet")
        wait_until(lambda: versions_seen() == {2}, "rows scored with version 2")
        staging = scoring_dir / ".incoming"
        shutil.copytree(versions / "v000000003", staging)
        os.rename(staging, scoring_dir / "v000000003")  # published atomically, as fit_stream does
        time.sleep(1.5)  # longer than refresh_seconds
        shutil.copy(trained["files"][1], feed / "b.parquet")
        wait_until(lambda: 3 in versions_seen(), "rows scored with version 3 by the same query")
        assert query.isActive
        new_rows = spark.sql("select features, prediction from scored_latest where model_version = 3").toPandas()
    finally:
        query.stop()
    expected = TorchModel.load(str(versions / "v000000003")).get_module()(
        torch.tensor(np.stack(new_rows["features"].to_numpy()), dtype=torch.float32)).detach().numpy()[:, 0]
    assert len(new_rows) == ROWS and np.allclose(new_rows["prediction"], expected, atol=1e-6)
    # a batch DataFrame, one task of 6 Arrow batches, each of which lists model_dir (refresh_seconds=0)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "4")
    try:
        eager = LatestModel(str(scoring_dir), refresh_seconds=0)
        eager._on_load = record_load(str(tmp_path / "loads.txt"))
        batch = eager.transform(spark.read.parquet(str(trained["files"][2])).coalesce(1))
        assert [r[0] for r in batch.select("model_version").collect()] == [3] * ROWS
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    loads = (tmp_path / "loads.txt").read_text().split("\n")[:-1]
    assert len(loads) == len(set(loads))  # a Python worker reads a version's weights once, however often it lists
    assert {line.split()[1] for line in loads} == {"2", "3"}


def flip_a_weight_byte(version: Path) -> None:
    """Change one byte of the last tensor's data in place (the file still parses; its checksum
    no longer matches the metadata's)."""
    weights = version / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x40
    weights.write_bytes(bytes(data))


def publish_when_loaded(staged: str, final: str, log: str):
    """A LatestModel ``_on_load`` hook (executors): record each version loaded, and at the first
    load rename the staged version into the scoring directory, as fit_stream publishes."""

    def hook(model_dir: str, version: int) -> None:
        with open(log, "a") as out:
            out.write(f"{version}\n")
        if os.path.exists(staged):
            os.rename(staged, final)

    return hook


def test_latest_model_refuses_a_version_whose_checksum_does_not_verify(spark, trained, tmp_path):
    versions, scoring_dir = Path(trained["model_dir"]), tmp_path / "serving"
    scoring_dir.mkdir()
    shutil.copytree(versions / "v000000002", scoring_dir / "v000000002")
    shutil.copytree(versions / "v000000003", tmp_path / "tampered")
    flip_a_weight_byte(tmp_path / "tampered")
    # one task, 6 Arrow batches, each listing model_dir (refresh_seconds=0): the first batch loads
    # version 2, which publishes the tampered version 3; the next five list it and must refuse it
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "4")
    try:
        latest = LatestModel(str(scoring_dir), refresh_seconds=0)
        latest._on_load = publish_when_loaded(str(tmp_path / "tampered"), str(scoring_dir / "v000000003"),
                                              str(tmp_path / "loads.txt"))
        scored = latest.transform(spark.read.parquet(str(trained["files"][2])).coalesce(1)).toPandas()
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    assert (scoring_dir / "v000000003").exists()  # it was there to be listed
    assert (tmp_path / "loads.txt").read_text().split() == ["2"]
    assert scored["model_version"].tolist() == [2] * ROWS
    with torch.no_grad():
        expected = TorchModel.load(str(versions / "v000000002")).get_module()(
            torch.tensor(np.stack(scored["features"].to_numpy()), dtype=torch.float32)).numpy()[:, 0]
    np.testing.assert_allclose(scored["prediction"], expected, **FLOAT32_PATHS)
    # the driver's reader refuses it too (LatestModel.transform, load_latest)
    with pytest.raises(ValueError, match="weights.safetensors does not match the checksum in its metadata"):
        TorchModel.load_latest(str(scoring_dir))


def test_stops_and_driver_deaths_never_train_a_micro_batch_twice_or_lose_one(spark, tmp_path):
    write_files(tmp_path / "in", 5)
    paths = {"model_dir": str(tmp_path / "models"), "checkpoint_location": str(tmp_path / "checkpoint")}
    est = estimator()
    first = est.fit_stream(source(spark, tmp_path / "in"), **paths, trigger={"processingTime": "1 second"})
    try:
        wait_until(first.versions, "a first version")
    finally:
        first.stop()  # a micro-batch in progress finishes first
    done = len(first.versions())
    assert 1 <= done <= 2

    def run(hook):
        est._stream_hook = hook
        return est.fit_stream(source(spark, tmp_path / "in"), **paths, trigger={"availableNow": True})

    for stage, published in (("trained", done), ("published", done + 1)):  # the driver dies there
        stream = run(fail_at(stage, done))
        with pytest.raises(RuntimeError, match=f"dies after micro-batch {done} was {stage}"):
            stream.awaitTermination(WAIT)
        assert [r["batch_id"] for r in stream.versions()] == list(range(published))
    last = run(None)
    assert last.awaitTermination(WAIT) is True
    records = last.versions()
    # Every file's rows once, in order. A stop that lands while Spark plans the next micro-batch
    # can leave the file source's own log one entry ahead of the offset log; the restart then
    # runs that micro-batch with two files (Spark's batching, no row lost or repeated) - once at
    # most, since the failures above happen after the offsets were written.
    files_per_batch = [r["rows"] // ROWS for r in records]
    assert [r["rows"] for r in records] == [ROWS * n for n in files_per_batch]
    assert sum(files_per_batch) == 5 and set(files_per_batch) <= {1, 2} and files_per_batch.count(2) <= 1
    assert [(r["version"], r["batch_id"]) for r in records] == [(k + 1, k) for k in range(len(records))]
    assert len({r["query_id"] for r in records}) == 1  # one query throughout (its checkpoint)
    # the weights: an uninterrupted run of those micro-batches in plain torch (momentum carried
    # throughout) from the estimator's initial weights; a restart from anything but the newest
    # version, or a micro-batch trained twice or skipped, ends elsewhere
    torch.manual_seed(5)
    reference, optimizer = TinyNet(), None  # estimator()'s initial weights
    files = iter(sorted((tmp_path / "in").glob("*.parquet")))
    for count in files_per_batch:
        batch = [next(files) for _ in range(count)]
        # one file: the driver deals its rows to the 2 agents; two files: two input partitions
        # of 24 rows, one agent each, kept as they are (balance_partitions)
        parts = agents_parts(batch[0]) if count == 1 else [file_rows(path) for path in batch]
        state = optimizer.state_dict() if optimizer is not None else None
        reference, optimizer = combined_batch_training(reference, parts, 8, 1, momentum_sgd, optimizer_state=state)
    final = TorchModel.load_latest(paths["model_dir"])
    assert_same_state(final.get_module().state_dict(), reference.state_dict(), tolerance=1e-5)


def test_trigger_once_an_initial_model_seeding_the_stream_and_an_empty_micro_batch(spark, tmp_path):
    """trigger once: one micro-batch of every file there (maxFilesPerTrigger notwithstanding), then
    the query ends; version 1 continues initial_model's weights (plain torch: one step per epoch on
    all 48 rows, whatever the agents' split); a restart over a new empty file runs micro-batch 1
    with no rows and publishes nothing."""
    write_files(tmp_path / "in", 2)
    paths = {"model_dir": str(tmp_path / "models"), "checkpoint_location": str(tmp_path / "checkpoint")}
    torch.manual_seed(8)
    seed = TinyNet()
    est = estimator(batch_size=2 * ROWS, epochs=2)
    stream = est.fit_stream(source(spark, tmp_path / "in"), **paths, trigger={"once": True},
                            initial_model=TorchModel(copy.deepcopy(seed)))
    assert stream.awaitTermination(WAIT) is True
    assert [(r["version"], r["batch_id"], r["rows"]) for r in stream.versions()] == [(1, 0, 2 * ROWS)]
    everything = [regression_arrays(2 * ROWS, seed=1)]
    reference, _ = combined_batch_training(seed, everything, 2 * ROWS, 2, momentum_sgd)
    version = TorchModel.load_latest(paths["model_dir"])
    assert_same_state(version.get_module().state_dict(), reference.state_dict(), tolerance=1e-5)
    torch.manual_seed(5)  # control: from the estimator's own initial weights it ends elsewhere
    unseeded, _ = combined_batch_training(TinyNet(), everything, 2 * ROWS, 2, momentum_sgd)
    assert max_relative_difference(unseeded, reference) > 1e-3

    empty = pa.table({"features": pa.array([], pa.list_(pa.float32())), "label": pa.array([], pa.float32())})
    pq.write_table(empty, tmp_path / "in" / "part-002.parquet")
    again = est.fit_stream(source(spark, tmp_path / "in"), **paths, trigger={"once": True})
    assert again.awaitTermination(WAIT) is True
    assert (again.query.lastProgress["batchId"], again.query.lastProgress["numInputRows"]) == (1, 0)  # Spark ran it
    assert [r["version"] for r in again.versions()] == [1] and VersionStore(paths["model_dir"]).numbers() == [1]


def test_a_bad_micro_batch_fails_the_query_with_the_error_and_keeps_the_versions(spark, tmp_path):
    write_files(tmp_path / "in", 3, bad=1)
    model_dir = str(tmp_path / "models")
    stream = estimator().fit_stream(source(spark, tmp_path / "in"), model_dir=model_dir,
                                    checkpoint_location=str(tmp_path / "checkpoint"), trigger={"availableNow": True})
    with pytest.raises(SchemaError, match="NaN"):
        stream.awaitTermination(WAIT)
    assert not stream.query.isActive and isinstance(stream.error, SchemaError)
    assert [r["batch_id"] for r in stream.versions()] == [0]
    assert TorchModel.load_latest(model_dir).summary["stream_version"]["batch_id"] == 0


def die_in_first_attempt(marker: str):
    def hook(rank: int, epoch: int, step: int, module) -> None:  # an agent's process dies, once
        if rank == 1 and step == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(3)

    return hook


def test_max_retries_apply_to_each_micro_batch(spark, tmp_path):
    write_files(tmp_path / "in", 2)
    est = estimator(max_retries=1)
    est._fail_hook = die_in_first_attempt(str(tmp_path / "died"))
    stream = est.fit_stream(source(spark, tmp_path / "in"), model_dir=str(tmp_path / "models"),
                            checkpoint_location=str(tmp_path / "checkpoint"), trigger={"availableNow": True})
    assert stream.awaitTermination(WAIT) is True
    assert (tmp_path / "died").exists()
    assert [(r["batch_id"], r["attempts"]) for r in stream.versions()] == [(0, 2), (1, 1)]


def test_streaming_frames_go_to_fit_stream_and_bad_settings_are_refused_before_starting(spark, tmp_path):
    write_files(tmp_path / "in", 1)
    stream_df, paths = source(spark, tmp_path / "in"), {"model_dir": str(tmp_path / "m"),
                                                         "checkpoint_location": str(tmp_path / "c")}
    with pytest.raises(ConfigError, match=r"streaming: use est\.fit_stream"):
        estimator().fit(stream_df)
    with pytest.raises(ConfigError, match=r"for a bounded DataFrame use fit\(df\)"):
        estimator().fit_stream(spark.read.parquet(str(tmp_path / "in")), **paths)
    refusals = [
        (estimator(checkpoint_dir=str(tmp_path / "x")), {}, "Leave checkpoint_dir unset"),
        (estimator(), {"trigger": {"continuous": "1 second"}}, "continuous processing"),
        (estimator(), {"keep_versions": 0}, "keep_versions must be an integer >= 1"),
        (estimator(), {"initial_model": TorchModel(TinyNet(hidden=16))}, "does not fit the estimator's model"),
        (estimator(feature_cols=["nope"]), {}, "nope"),
    ]
    for est, options, message in refusals:
        with pytest.raises((ConfigError, SchemaError), match=message):
            est.fit_stream(stream_df, **paths, **options)
    assert spark.streams.active == [] and not (tmp_path / "m").exists()
