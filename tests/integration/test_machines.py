"""A Spark standalone cluster of separate machines (``spark_ddl.testbed``): each machine its own
network namespace, address, host name and PID namespace, joined by a bridge to this process
(the driver). Real Spark, real sockets: training across machines, crashes, and network
partitions that must end within the fit's own time bounds.

Needs root and iproute2; where they are missing the module skips with the exact reason."""

from __future__ import annotations

import copy
import os
import threading
import time

import numpy as np
import pytest
import torch

from spark_ddl import TorchEstimator, TrainingError
from spark_ddl.driver.reachability import MachineUnreachableError
from spark_ddl.testbed.cluster import MachineCluster, missing_requirements
from tests.helpers import TinyNet, frame_with_partitions, regression_arrays, split_by_sizes
from tests.references import FLOAT32_PATHS, combined_batch_sgd, max_relative_difference

MISSING = missing_requirements()
pytestmark = [pytest.mark.own_session, pytest.mark.machines, pytest.mark.timeout(400),
              pytest.mark.skipif(MISSING is not None, reason=f"separate machines: {MISSING}")]

MACHINES, CORES = 2, 2
STALL = 8.0  # the partition tests' stall_timeout


@pytest.fixture(scope="module")
def cluster(sessions):
    sessions.stop()
    with MachineCluster(machines=MACHINES, cores=CORES, prefix="ddlt") as machines:
        yield machines
        for number in range(1, MACHINES + 1):
            machines.heal(number)  # a driver stopping with an unreachable executor waits for its RPCs
        sessions.stop()


@pytest.fixture
def machines_up(cluster):
    """Every machine up, linked at full rate and its worker registered (an earlier test may have killed one)."""
    for number in range(1, MACHINES + 1):
        cluster.heal(number)
        cluster.limit(number, None)
        if not cluster.is_running(number):
            cluster.revive(number)
    cluster.wait_for_workers(MACHINES)
    return cluster


@pytest.fixture
def spark(machines_up, sessions):
    """The driver's session on the machines, with every machine up, linked and registered."""
    cluster = machines_up
    session = sessions.get("machines", master=cluster.master_url, conf=cluster.spark_conf())
    _wait_for_slots(session, MACHINES * CORES)
    return session


def _wait_for_slots(spark, slots: int, seconds: float = 120.0) -> None:
    jsc = spark.sparkContext._jsc.sc()  # noqa: SLF001
    deadline = time.monotonic() + seconds
    while jsc.maxNumConcurrentTasks(jsc.resourceProfileManager().defaultResourceProfile()) < slots:
        assert time.monotonic() < deadline, f"the cluster did not get back to {slots} slots"
        time.sleep(0.5)


def _estimator(num_workers: int, **settings) -> TorchEstimator:
    torch.manual_seed(11)
    defaults = dict(model=TinyNet(), loss="mse", optimizer="sgd", lr=0.05, batch_size=8, epochs=2,
                    num_workers=num_workers, shuffle=False, seed=0, timeout=60)
    return TorchEstimator(**{**defaults, **settings})


@pytest.mark.parametrize("agents", [2, 4])
def test_agents_on_two_machines_equal_one_process_on_the_combined_batch(spark, agents):
    sizes = [40] * agents
    parts = split_by_sizes(*regression_arrays(sum(sizes), seed=3), sizes)
    estimator = _estimator(agents)
    initial = copy.deepcopy(estimator.getOrDefault("model"))
    trained = estimator.fit(frame_with_partitions(spark, parts))
    reference = combined_batch_sgd(initial, parts, 8, 2, 0.05)
    assert max_relative_difference(initial, reference) > 1e-2  # training moved the weights
    assert max_relative_difference(trained.get_module(), reference) <= 1e-5
    summary = trained.summary
    assert summary["hosts"] == [agents // 2, agents // 2]  # ranks per machine, as the agents saw them
    assert sorted(map(len, summary["machines"])) == [agents // 2] * 2  # which ranks shared a machine
    assert sorted(r for machine in summary["machines"] for r in machine) == list(range(agents))
    parameters = sum(p.numel() for p in initial.parameters())
    assert summary["bytes_across_machines_per_step"] == 4 * parameters  # the float32 gradient, once per step
    assert summary["initial_broadcast"] is False  # one pickled module: equal replicas, compared only


def test_compression_between_machines_cuts_the_bytes_that_cross_them(spark):
    sizes = [40, 40]
    parts = split_by_sizes(*regression_arrays(sum(sizes), seed=3), sizes)
    frame = frame_with_partitions(spark, parts)
    crossed, weights = {}, {}
    for compression in ("none", "fp16", "powersgd"):
        model = _estimator(2, compression=compression).fit(frame)
        assert model.summary["compression"] == compression and model.summary["hosts"] == [1, 1]
        crossed[compression] = model.summary["bytes_across_machines_per_step"]
        weights[compression] = model.get_module()
    assert crossed["fp16"] * 2 == crossed["none"]
    assert crossed["powersgd"] < crossed["none"]
    assert max_relative_difference(weights["fp16"], weights["none"]) <= 1e-2  # fp16 rounding, no more
    # local SGD: the change since the last average crosses in fp16, half a float32 model per average
    model = _estimator(2, sync="local_sgd", sync_every=2, compression="fp16").fit(frame)
    parameters = sum(p.numel() for p in weights["none"].parameters())
    assert model.summary["compression"] == "fp16" and model.summary["average_impl"] == "flat"
    assert model.summary["bytes_across_machines_per_average"] == 2 * parameters


def _cut_when_started(cluster, marker: str, number: int) -> dict[str, float]:
    """Cut machine ``number``'s link once ``marker`` exists (written by an agent's hook); the
    returned dict gets the monotonic time of the cut as ``"at"``."""
    when: dict[str, float] = {}

    def cut() -> None:
        deadline = time.monotonic() + 120
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        cluster.cut(number)
        when["at"] = time.monotonic()

    threading.Thread(target=cut, daemon=True).start()
    return when


def mark_epoch_two(marker: str):
    """A ``_fail_hook``: rank 0 writes ``marker`` at epoch 2, step 2 (then every step is slowed a
    little, so that the link is cut while the agents train)."""
    def hook(rank: int, epoch: int, step: int, module) -> None:
        import time as clock

        if rank == 0 and epoch == 1 and step == 2 and not os.path.exists(marker):
            with open(marker, "w") as out:
                out.write("cut")
            clock.sleep(2)
        clock.sleep(0.02)

    return hook


def _partition_fit(cluster, spark, tmp_path, **settings):
    """4 agents (2 per machine), 3 epochs; the machine of rank 3 loses its link in epoch 2."""
    sizes = [40] * 4
    frame = frame_with_partitions(spark, split_by_sizes(*regression_arrays(160, seed=3), sizes))
    estimator = _estimator(4, epochs=3, stall_timeout=STALL, max_retries=2,
                           checkpoint_dir=str(tmp_path / "checkpoints"), **settings)
    marker = str(tmp_path / "cut")
    estimator._fail_hook = mark_epoch_two(marker)
    return estimator, frame, _cut_when_started(cluster, marker, 2)  # rank 0 may be on either machine


def test_a_partition_with_min_workers_finishes_on_the_machine_that_answers(cluster, spark, tmp_path):
    estimator, frame, cut = _partition_fit(cluster, spark, tmp_path, min_workers=2)
    model = estimator.fit(frame)
    seconds = time.monotonic() - cut["at"]
    print(f"partition, min_workers: finished {seconds:.1f} s after the cut")  # for the notes (pytest -s)
    attempts = model.summary["attempts"]
    assert "Stall" in attempts[0]["error"]
    assert attempts[1]["unreachable"] and cluster.address(2) in attempts[1]["unreachable"][0]
    assert attempts[1]["agents"] == 2 and attempts[1]["resized"] == [4, 2]
    assert [h["epoch"] for h in model.history] == [1, 2, 3]
    assert seconds < STALL + 60, seconds  # from the cut to the end of the fit, on the machine that answers


def test_a_partition_without_min_workers_fails_naming_the_machine(cluster, spark, tmp_path):
    estimator, frame, cut = _partition_fit(cluster, spark, tmp_path)
    with pytest.raises(MachineUnreachableError) as info:
        estimator.fit(frame)
    seconds = time.monotonic() - cut["at"]
    print(f"partition, no min_workers: failed {seconds:.1f} s after the cut")  # for the notes (pytest -s)
    message = str(info.value)
    assert cluster.address(2) in message and "set min_workers" in message
    assert [m.host for m in info.value.machines] == [cluster.address(2)]
    assert seconds < STALL + 60, seconds


def test_a_partition_that_heals_before_the_retry_gets_its_machine_back(cluster, spark, tmp_path):
    estimator, frame, _ = _partition_fit(cluster, spark, tmp_path)

    def heal_first(attempt: int, context) -> None:
        if attempt == 2:
            cluster.heal(2)

    estimator._attempt_hook = heal_first
    model = estimator.fit(frame)
    attempts = model.summary["attempts"]
    assert "Stall" in attempts[0]["error"] and "unreachable" not in attempts[1]
    assert model.summary["world_size"] == 4 and model.summary["hosts"] == [2, 2]
    assert [h["epoch"] for h in model.history] == [1, 2, 3]


def test_a_machine_crash_with_min_workers_finishes_on_the_survivor_and_without_fails_clearly(
        cluster, spark, tmp_path, monkeypatch):
    # The crashed machine still answers on the network (its processes died, not its link), so the
    # retry without min_workers waits SLOT_WAIT_SECONDS (30 s) for a replacement executor before it
    # names the machine: the same path with a 3 s wait here.
    monkeypatch.setattr("spark_ddl.driver.launcher.SLOT_WAIT_SECONDS", 3.0)
    sizes = [40] * 4
    frame = frame_with_partitions(spark, split_by_sizes(*regression_arrays(160, seed=3), sizes))
    for elastic in (True, False):
        marker = tmp_path / f"crash-{elastic}"
        estimator = _estimator(4, epochs=3, stall_timeout=STALL, max_retries=2,
                               checkpoint_dir=str(tmp_path / f"checkpoints-{elastic}"),
                               **({"min_workers": 2} if elastic else {}))
        estimator._fail_hook = mark_epoch_two(str(marker))

        def crash() -> None:
            deadline = time.monotonic() + 120
            while not marker.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            cluster.kill(2)

        threading.Thread(target=crash, daemon=True).start()
        started = time.monotonic()
        if elastic:
            model = estimator.fit(frame)
            attempts = model.summary["attempts"]
            assert attempts[0]["error"] and attempts[1]["agents"] == 2
            assert [h["epoch"] for h in model.history] == [1, 2, 3]
        else:
            with pytest.raises(TrainingError) as info:
                estimator.fit(frame)
            assert cluster.address(2) in str(info.value) and "min_workers" in str(info.value)
        assert time.monotonic() - started < 120
        cluster.revive(2)
        _wait_for_slots(spark, MACHINES * CORES)


def test_a_model_over_128mb_trained_across_machines_comes_back_and_scores_on_them(spark):
    from tests.integration.test_big_models import mlp, rows_frame

    frame, x = rows_frame(spark, 128)
    net = mlp(4096)  # 135 MB of float32 parameters
    before = net[0].weight.detach().clone()
    model = TorchEstimator(model=net, loss="cross_entropy", lr=0.01, batch_size=32, epochs=1, num_workers=2,
                           timeout=120).fit(frame)
    assert model.summary["hosts"] == [1, 1] and model.summary["result_route"]["weights"] == "stream"
    trained = model.get_module()
    assert not torch.equal(trained[0].weight, before)  # the trained weights came back from rank 0's machine
    scored = model.transform(frame).select("prediction").collect()  # scored by executors on the machines
    with torch.no_grad():
        expected = trained(torch.from_numpy(x)).argmax(dim=1).double().numpy()
    assert [r.prediction for r in scored] == list(expected)


def test_fit_stream_keeps_publishing_versions_after_a_machine_is_lost(cluster, spark, tmp_path):
    from tests.integration.test_streaming import WAIT, estimator, source, wait_until, write_files

    write_files(tmp_path / "in", 4)
    est = estimator(num_workers=4, min_workers=2, max_retries=1)  # its checkpoints: under checkpoint_location
    stream = est.fit_stream(source(spark, tmp_path / "in"), model_dir=str(tmp_path / "models"),
                            checkpoint_location=str(tmp_path / "checkpoint"),
                            trigger={"processingTime": "1 second"})
    try:
        wait_until(lambda: len(stream.versions()) >= 1, "the first version")
        cluster.kill(2)  # machine 2 crashes between micro-batches
        wait_until(lambda: len(stream.versions()) >= 4, "every micro-batch published after the crash", WAIT)
    finally:
        stream.stop()
    versions = stream.versions()
    assert [r["batch_id"] for r in versions] == [0, 1, 2, 3]  # none lost, none twice
    assert not list((tmp_path / "checkpoint" / "elastic-fits").glob("*"))  # each fit's checkpoints removed


def test_a_connect_server_whose_cluster_is_the_machines_trains_and_scores(machines_up, sessions, tmp_path):
    from pyspark.sql import SparkSession

    from tests.connect_server import connect_server, leave_connect_mode

    cluster = machines_up  # the stream test before this one crashed machine 2

    sessions.stop()  # the classic application holds the machines' cores; the server is another application
    conf = {k: v for k, v in cluster.spark_conf().items() if k != "spark.master"}
    with connect_server(tmp_path, master=cluster.master_url, conf=conf) as url:
        deadline = time.monotonic() + 120
        while cluster.granted_cores() < MACHINES * CORES:  # the server's executors on both machines
            assert time.monotonic() < deadline, (f"the Connect server did not get both machines' executors: "
                                                 f"{cluster.granted_cores()} cores granted, "
                                                 f"{cluster.alive_workers()} workers alive")
            time.sleep(0.5)
        spark = SparkSession.builder.remote(url).create()
        try:
            # the client's own address on the machines' network: the agents' status channel comes here
            spark.conf.set("spark.ddl.statusHost", cluster.network.driver_address)
            x, y = regression_arrays(160, seed=3)
            frame = spark.createDataFrame([([float(v) for v in row], float(t)) for row, t in zip(x, y)],
                                          "features array<float>, label float")
            model = _estimator(2, epochs=4).fit(frame)
            assert model.summary["hosts"] == [1, 1] and model.summary["rendezvous"] == "driver"
            losses = [h["train_loss"] for h in model.history]
            assert losses[-1] < losses[0]
            scored = model.transform(frame).select("features", "prediction").toPandas()  # on the machines
            with torch.no_grad():
                expected = model.get_module()(torch.from_numpy(np.stack(scored["features"]).astype(np.float32)))
            np.testing.assert_allclose(scored["prediction"].to_numpy(), expected.reshape(-1).numpy(),
                                       **FLOAT32_PATHS)
        finally:
            spark.stop()
            leave_connect_mode()
