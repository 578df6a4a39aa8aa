"""What users see while and after training: live progress, agents' logs, the summary, plots."""

from __future__ import annotations

import logging
import socket

import pytest

from spark_ddl import TorchEstimator
from spark_ddl.driver import launcher
from spark_ddl.driver.monitor import AgentMonitor
from tests.helpers import (TinyNet, assert_a_stalled_agent_stops_itself, frame_with_partitions, regression_arrays,
                           split_by_sizes)


def data(spark):
    return frame_with_partitions(spark, split_by_sizes(*regression_arrays(160, seed=4), [80, 80]))


def warn_once_on_rank_one(rank: int, epoch: int, step: int, module) -> None:
    if rank == 1 and epoch == 0 and step == 0:
        logging.getLogger("tests.user_model").warning("rank %d sees a suspicious batch", rank)


def test_progress_lines_and_agent_logs_reach_the_driver(spark, caplog):
    caplog.set_level(logging.INFO, logger="spark_ddl")
    estimator = TorchEstimator(model=TinyNet(), loss="mse", batch_size=8, epochs=3, timeout=30, progress="log",
                               validation_fraction=0.2)
    estimator._fail_hook = warn_once_on_rank_one
    model = estimator.fit(data(spark))
    progress = [r.getMessage() for r in caplog.records if r.name == "spark_ddl.progress"]
    assert [line.split(",")[0] for line in progress] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all("train_loss" in line and "val_loss" in line and "samples/s" in line and "ETA" in line
               for line in progress)
    agent_lines = [r for r in caplog.records if r.name == "spark_ddl.agents"]
    assert [r.getMessage() for r in agent_lines] == ["[rank 1] tests.user_model: rank 1 sees a suspicious batch"]
    assert agent_lines[0].levelno == logging.WARNING
    assert len(model.history) == 3


def test_async_training_reports_each_epoch_of_the_server(spark, caplog):
    caplog.set_level(logging.INFO, logger="spark_ddl")
    model = TorchEstimator(model=TinyNet(), loss="mse", batch_size=8, epochs=3, timeout=30, progress="log",
                           sync="async", lr=0.02).fit(data(spark))
    progress = [r.getMessage() for r in caplog.records if r.name == "spark_ddl.progress"]
    assert [line.split(",")[0] for line in progress] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    losses = [float(line.split("train_loss ")[1].split(",")[0]) for line in progress]
    assert losses == pytest.approx([h["train_loss"] for h in model.history], abs=1e-4)


def test_summary_table_and_history_plot(spark, tmp_path):
    model = TorchEstimator(model=TinyNet(), loss="mse", batch_size=8, epochs=3, timeout=30, progress="off",
                           validation_fraction=0.2).fit(data(spark))
    table = model.summary.to_pandas()
    assert list(table["epoch"]) == [1, 2, 3]
    assert {"train_loss", "val_loss", "seconds", "samples_per_s", "world_size", "sync", "attempts"} <= set(table.columns)
    assert set(table["world_size"]) == {2} and set(table["sync"]) == {"allreduce"}
    path = model.plot_history(str(tmp_path / "history.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


class _UnreachableMonitor(AgentMonitor):
    """The driver's channel, but the agents are told a port where nobody listens."""

    def __init__(self, host, stall_timeout):
        super().__init__(host, stall_timeout)
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            self.address = ("127.0.0.1", unused.getsockname()[1])


@pytest.fixture
def unreachable_driver(monkeypatch):
    """The agents are told a port of this process where nobody listens (this test's fits only)."""
    monkeypatch.setattr(launcher, "AgentMonitor", _UnreachableMonitor)
    monkeypatch.setattr(launcher, "HOSTS_AGENTS_CANNOT_REACH", set())


def test_a_fit_meets_through_the_driver_and_reports_it(spark):
    model = TorchEstimator(model=TinyNet(), loss="mse", batch_size=8, epochs=1, timeout=30).fit(data(spark))
    assert model.summary["rendezvous"] == "driver" and len(model.summary["attempts"]) == 1


def test_training_goes_on_when_the_channel_fails(spark, unreachable_driver, caplog):
    caplog.set_level(logging.INFO, logger="spark_ddl")
    estimator = TorchEstimator(model=TinyNet(), loss="mse", batch_size=8, epochs=2, timeout=30, progress="log",
                               stall_timeout=30)
    model = estimator.fit(data(spark))
    assert len(model.history) == 2 and model.summary["world_size"] == 2  # the summary came with the artifact
    lines = [r.getMessage() for r in caplog.records if r.name == "spark_ddl.progress"]
    # no live progress: the epochs' lines come from rank 0's summary when the fit ends
    assert [line.split(",")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    # the agents failed to open the driver's rendezvous before reading their rows; the attempt ran
    # again meeting through Spark's allGather, and the next fit goes there at once
    first, second = model.summary["attempts"]
    assert "DriverUnreachableError" in first["error"] and "cannot connect to the driver" in first["error"]
    assert second["error"] is None and model.summary["rendezvous"] == "spark barrier"
    assert any("meet through Spark's barrier rendezvous" in r.getMessage() for r in caplog.records)
    again = estimator.fit(data(spark))
    assert len(again.summary["attempts"]) == 1 and again.summary["rendezvous"] == "spark barrier"


def test_without_a_channel_a_stalled_agent_stops_itself(spark, unreachable_driver, tmp_path):
    """The agents cannot reach the driver (as for a Spark Connect client the executors cannot
    connect to): the stalled agent's own watchdog fails the fit with StallError."""
    assert_a_stalled_agent_stops_itself(data(spark), str(tmp_path / "stalled_at"))


@pytest.mark.parametrize("setting, message", [({"progress": "fancy"}, "progress must be"),
                                              ({"agent_log_level": "LOUD"}, "agent_log_level must be")])
def test_output_settings_are_checked(setting, message):
    from spark_ddl import ConfigError

    with pytest.raises(ConfigError, match=message):
        TorchEstimator(model=TinyNet(), **setting).train_config()
