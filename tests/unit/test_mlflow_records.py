"""What autolog hears from the driver's status channel (``ProgressReporter`` -> fit listeners) and
how a record becomes MLflow metrics: epochs once each, ``report()`` records of ``spark_ddl.run``
by their number (epochs may repeat or be absent), and the step each is logged at."""

from __future__ import annotations

from spark_ddl.driver import progress
from spark_ddl.driver.progress import ProgressReporter


class Heard:
    """A fit listener that keeps what it was told."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def epoch_finished(self, record: dict) -> None:
        self.records.append(record)


def _listening(fn):
    heard = Heard()
    progress.add_listener(heard)
    try:
        fn()
    finally:
        progress.remove_listener(heard)
    return heard.records


def test_epochs_are_told_once_whether_live_or_at_the_end():
    reporter = ProgressReporter("off")
    history = [{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": 0.4}, {"epoch": 3, "train_loss": 0.3}]

    def fit():
        reporter.update({"recent_epochs": history[:1]})
        reporter.update({"recent_epochs": history[:2]})  # the window repeats epoch 1
        reporter.catch_up(history, 3)  # rank 0's summary: epoch 3 only is news

    assert [r["epoch"] for r in _listening(fit)] == [1, 2, 3]


def test_report_records_are_told_by_their_number_even_when_their_epoch_repeats():
    reporter = ProgressReporter("off")
    history = [{"epoch": 1, "step": 10, "loss": 1.0}, {"epoch": 1, "step": 20, "loss": 0.5}, {"loss": 0.25}]
    shown = [dict(r, epoch=r.get("epoch", i + 1), report_index=i + 1) for i, r in enumerate(history)]

    def run():
        reporter.update({"recent_epochs": shown[:1]})  # live: the first record only
        reporter.catch_up(history, 1)  # the function's history at its end: records 2 and 3

    assert [(r["report_index"], r["loss"]) for r in _listening(run)] == [(1, 1.0), (2, 0.5), (3, 0.25)]


def test_without_a_status_channel_report_records_still_arrive_each_once():
    reporter = ProgressReporter("off")
    history = [{"loss": 1.0}, {"loss": 0.5}]
    assert [(r["epoch"], r["report_index"]) for r in _listening(lambda: reporter.catch_up(history, 1))] == \
        [(1, 1), (2, 2)]


def test_the_step_a_record_is_logged_at():
    import pytest

    pytest.importorskip("mlflow")
    from spark_ddl.mlflow.autologging import _metrics

    assert _metrics({"epoch": 2, "train_loss": 0.5, "val_accuracy": 0.9, "note": "x", "ok": True}) == \
        (2, {"train_loss": 0.5, "val_accuracy": 0.9})
    assert _metrics({"epoch": 1, "step": 20, "loss": 0.5, "report_index": 2}) == (20, {"epoch": 1.0, "loss": 0.5})
    assert _metrics({"epoch": 3, "loss": 0.25, "report_index": 3}) == (3, {"loss": 0.25})
