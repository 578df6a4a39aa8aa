"""Live training progress on the driver, from rank 0's status reports.

On a terminal: a tqdm bar over all steps (epoch, loss of the last epoch, samples/s, ETA).
Otherwise: one log line per finished epoch (logger ``spark_ddl.progress``). ``progress="off"``
shows nothing.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from typing import Any, Iterator

log = logging.getLogger("spark_ddl.progress")

# ------------------------------------------------------------------ fit listeners
#
# Objects told about each fit on the driver (e.g. ``spark_ddl.mlflow.autolog``), each method
# optional: ``fit_started(facts)`` (``facts["kind"]``: "fit" or "run"; ``facts["stream"]``: the
# key of the stream a micro-batch's fit belongs to, else None), ``epoch_finished(record)``
# (rank 0's history record, or a record ``report()`` made in ``spark_ddl.run``, with its 1-based
# ``report_index``; as soon as the status channel brings it, else when the fit ends),
# ``attempt_failed(record)`` (an attempt that failed and is retried), ``fit_finished(outcome,
# error)``; for ``fit_stream``: ``stream_started(key, facts)``, ``version_published(key,
# record)``, ``stream_stopped(key, error)``. A listener that raises is logged and never fails
# the fit. The events of one fit come on the thread that runs it.
_LISTENERS: list[Any] = []
_LOCAL = threading.local()  # the stream whose micro-batch this thread fits


def listening() -> bool:
    """Whether any listener is installed (events cost nothing otherwise)."""
    return bool(_LISTENERS)


def add_listener(listener: Any) -> None:
    if listener not in _LISTENERS:
        _LISTENERS.append(listener)


def remove_listener(listener: Any) -> None:
    if listener in _LISTENERS:
        _LISTENERS.remove(listener)


def notify(event: str, *args: Any) -> None:
    """Call ``event`` on every listener that has it; a listener's error is only logged."""
    for listener in list(_LISTENERS):
        method = getattr(listener, event, None)
        if method is None:
            continue
        try:
            method(*args)
        except Exception as exc:  # noqa: BLE001 - a listener never fails a fit
            log.warning("fit listener %s.%s failed: %s: %s", type(listener).__name__, event, type(exc).__name__, exc)


@contextlib.contextmanager
def part_of_stream(key: str) -> Iterator[None]:
    """The fits this thread starts inside belong to stream ``key`` (``facts["stream"]``)."""
    previous = getattr(_LOCAL, "stream", None)
    _LOCAL.stream = key
    try:
        yield
    finally:
        _LOCAL.stream = previous


@contextlib.contextmanager
def listened_fit(facts: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Tell the listeners a fit starts (``facts``) and how it ended: the caller puts what the
    fit produced (``summary``, ``model``) into the yielded dict."""
    if not _LISTENERS:
        yield {}
        return
    notify("fit_started", dict(facts, stream=getattr(_LOCAL, "stream", None)))
    outcome: dict[str, Any] = {}
    try:
        yield outcome
    except BaseException as exc:
        notify("fit_finished", outcome, exc)
        raise
    notify("fit_finished", outcome, None)


class ProgressReporter:
    """Turns rank 0's status (epoch, step, steps_per_epoch, recent_epochs) into progress output."""

    def __init__(self, mode: str = "auto", stream=None) -> None:
        stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(stream, "isatty", lambda: False)() else "log"
        self.mode, self._stream = mode, stream
        self._bar = None
        self._shown_epochs = 0
        self._told: set[tuple[str, int]] = set()  # records the fit listeners were told (also with mode "off")
        self.lines: list[str] = []  # what the log mode reported (kept for the summary and tests)

    def _tell(self, records: Any) -> None:
        for record in records or []:
            if not isinstance(record, dict):
                continue
            # report() records (spark_ddl.run) by their index: epochs may repeat or be absent
            key = ("report", int(record["report_index"])) if "report_index" in record else \
                ("epoch", int(record.get("epoch", 0)))
            if key not in self._told and key[1] > 0:
                self._told.add(key)
                notify("epoch_finished", dict(record))

    def update(self, status: dict[str, Any]) -> None:
        if status and _LISTENERS:
            self._tell(status.get("recent_epochs"))
        if self.mode == "off" or not status:
            return
        epochs, steps = status.get("epochs"), status.get("steps_per_epoch")
        for record in status.get("recent_epochs") or []:
            if isinstance(record, dict) and int(record.get("epoch", 0)) > self._shown_epochs:
                self._shown_epochs = int(record["epoch"])
                self._epoch_done(record, epochs)
        if self.mode == "bar" and epochs and steps:
            self._advance_bar(status, int(epochs), int(steps))

    def catch_up(self, history: list[dict[str, Any]], epochs: Any) -> None:
        """Show the finished epochs that no status report showed (e.g. without a status
        channel, where rank 0's summary is the first news of them)."""
        if _LISTENERS:
            self._tell(_indexed(history) if self._reports(history) else history)
        if self.mode == "off":
            return
        for record in history:
            if isinstance(record, dict) and int(record.get("epoch", 0)) > self._shown_epochs:
                self._shown_epochs = int(record["epoch"])
                self._epoch_done(record, epochs, log_always=self._bar is None)

    def _reports(self, history: list[dict[str, Any]]) -> bool:
        """Whether ``history`` is report() records (spark_ddl.run) rather than epochs."""
        epochs = [r.get("epoch") for r in history if isinstance(r, dict)]
        return any(kind == "report" for kind, _ in self._told) or None in epochs or \
            any(not isinstance(b, (int, float)) or b <= a for a, b in zip(epochs, epochs[1:]))

    def _epoch_done(self, record: dict[str, Any], epochs: Any, log_always: bool = False) -> None:
        parts = [f"epoch {record['epoch']}/{epochs or '?'}", f"train_loss {record.get('train_loss', float('nan')):.4f}"]
        if "val_loss" in record:
            parts.append(f"val_loss {record['val_loss']:.4f}")
        if "val_accuracy" in record:
            parts.append(f"val_accuracy {record['val_accuracy']:.4f}")
        if record.get("seconds") is not None:
            parts.append(f"{record['seconds']:.2f} s")
        if record.get("samples_per_s"):
            parts.append(f"{record['samples_per_s']:,.0f} samples/s")
        if epochs and record.get("seconds"):
            parts.append(f"ETA {max(0, int(epochs) - int(record['epoch'])) * record['seconds']:.0f} s")
        line = ", ".join(parts)
        self.lines.append(line)
        if self.mode == "log" or log_always:
            log.info("%s", line)
        elif self._bar is not None:
            self._bar.set_postfix_str(line.split(", ", 1)[1], refresh=False)

    def _advance_bar(self, status: dict[str, Any], epochs: int, steps: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=epochs * steps, unit="step", file=self._stream, dynamic_ncols=True,
                             desc="training")
        done = status.get("steps_done")  # async: updates by all agents together
        if done is None:
            epoch, step = status.get("epoch"), status.get("step")
            if epoch is None:
                return
            done = int(epoch) * steps + (int(step) if step is not None else steps)
        if int(done) > self._bar.n:
            self._bar.update(int(done) - self._bar.n)

    def close(self, finished: bool) -> None:
        if self._bar is not None:
            if finished:
                self._bar.update(self._bar.total - self._bar.n)
            self._bar.close()
            self._bar = None


def _indexed(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """report() records as the live status shows them: ``epoch`` (as reported, else the
    1-based index) and ``report_index``."""
    return [dict(r, epoch=r.get("epoch", i + 1), report_index=i + 1) for i, r in enumerate(history)
            if isinstance(r, dict)]
