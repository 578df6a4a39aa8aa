"""How often a fit runs its barrier job, and how long an attempt may wait to start.

A fit runs attempts until one finishes. After one that did not, ``AttemptPolicy`` says whether
to run again:

- the agents could not reach the driver's status channel: once, meeting through Spark instead
  (not a failure);
- an elastic attempt paused at an epoch boundary to look for slots: always (not a failure; at
  most one pause per epoch);
- a retriable failure (an agent lost or stalled, a launch that did not get its agents): up to
  ``max_retries`` times;
- anything else: never.

``LaunchWatch`` bounds the start of one attempt: every agent must connect to the driver within
``timeout`` seconds, and a barrier stage that needs more slots than the cluster has stops
waiting after ``SLOT_GRACE_SECONDS`` instead of Spark's own check (which retries for about
ten minutes by default). Who may take part in the next attempt is ``spark_ddl.driver.reachability``'s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from spark_ddl.errors import TrainingError

SLOT_GRACE_SECONDS = 10.0  # a barrier stage short of slots this long (while agents are missing) is given up


class LaunchError(TrainingError):
    """An attempt's agents did not all start: the barrier stage could not get its slots, or
    tasks were placed on executors that never started them (retriable)."""


@dataclass
class AttemptPolicy:
    """Counts a fit's attempts and says whether another may run."""

    max_retries: int
    epochs: int
    failures: int = 0
    pauses: int = 0
    fell_back: bool = False  # the agents could not reach the driver once already

    def rerun_after_driver_unreachable(self) -> bool:
        """The agents could not reach the driver: run again (through Spark) the first time only."""
        if self.fell_back:
            return False
        self.fell_back = True
        return True

    def rerun_after_pause(self) -> None:
        """An elastic attempt paused at an epoch boundary: always run on (at most one pause per epoch)."""
        self.pauses += 1
        if self.pauses > self.epochs:
            raise RuntimeError(f"{self.pauses} elastic pauses for {self.epochs} epochs: the attempts make no progress")

    def rerun_after_failure(self, error: TrainingError) -> bool:
        """Whether the fit runs again after ``error`` (counted against ``max_retries``)."""
        self.failures += 1
        return error.retriable and self.failures <= self.max_retries


class LaunchWatch:
    """Watches one attempt's start: ``problem()`` is None while waiting is still in bounds."""

    def __init__(self, agents: int, timeout: float, slots: Callable[[], int | None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.agents, self.timeout, self._slots, self._clock = agents, timeout, slots, clock
        self.started_at = clock()
        self._short_since: float | None = None

    def problem(self, missing: list[int], placement: list[str] | None) -> LaunchError | None:
        """A LaunchError when the attempt should stop waiting for ``missing`` ranks, else None."""
        if not missing:
            self._short_since = None
            return None
        now = self._clock()
        slots = self._slots()
        if slots is not None and slots < self.agents:
            self._short_since = self._short_since if self._short_since is not None else now
            if now - self._short_since >= SLOT_GRACE_SECONDS:
                return LaunchError(
                    f"The barrier stage needs {self.agents} task slots at once, but the cluster has had {slots} "
                    f"for {now - self._short_since:.0f} s (an executor was lost): rank(s) {missing} never started. "
                    "With min_workers the fit continues on the slots there are; otherwise give the application "
                    "its executors back.",
                    rank=missing[0], remote_type="Launch", remote_message=f"{slots} of {self.agents} slots",
                    retriable=True)
        else:
            self._short_since = None
        if now - self.started_at < self.timeout:
            return None
        where = ""
        if placement:
            where = " (placed on " + ", ".join(f"rank {r}: {placement[r]}" for r in missing if r < len(placement)) + ")"
        return LaunchError(
            f"Rank(s) {missing} did not start within timeout={self.timeout:g} s{where}: their executors did not "
            "run the tasks, or cannot reach the driver. Check that those machines are up and reachable, or raise "
            "timeout if executors take longer to start.",
            rank=missing[0], remote_type="Launch", remote_message=f"rank(s) {missing} never started",
            retriable=True)
