"""Exceptions raised on the driver. Every message says what is wrong and how to fix it."""

from __future__ import annotations

from typing import Any


class SparkDDLError(Exception):
    """Base class of every error spark_ddl raises on purpose."""


class ConfigError(SparkDDLError, ValueError):
    """A parameter of the estimator is invalid (raised before any Spark job starts)."""


class SchemaError(SparkDDLError, ValueError):
    """The input DataFrame does not fit the estimator's columns (raised before training)."""


class ClusterConfigError(SparkDDLError):
    """The Spark cluster cannot run the requested barrier job; the message names the setting."""


class TrainingError(SparkDDLError, RuntimeError):
    """An agent failed while training; carries the worker's own exception and traceback.

    Attributes:
        rank: the rank of the agent whose error caused the failure (None if unknown).
        remote_type: the class name of the exception raised on the worker.
        remote_message: its message.
        remote_traceback: the worker-side traceback text.
        retriable: True when an agent was lost or stalled (a resubmission may succeed);
            False for an error the agent's own code raised (it would recur).
    """

    def __init__(
        self,
        message: str,
        rank: int | None = None,
        remote_type: str | None = None,
        remote_message: str | None = None,
        remote_traceback: str | None = None,
        retriable: bool = False,
    ) -> None:
        super().__init__(message)
        self.rank = rank
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        self.retriable = retriable
        self.attempts: list[dict[str, Any]] = []  # every attempt of the fit, set by the driver

    def summary_line(self) -> str:
        """One line: the rank and the error."""
        return f"rank {self.rank}: {self.remote_type}: {self.remote_message}"


class NonFiniteLossError(TrainingError):
    """The loss or the gradient became NaN or infinite (raised by the agents the step it
    happens; on the driver it is the agents' ``TrainingError``).

    Attributes (besides ``TrainingError``'s): ``epoch`` and ``step`` (1-based, None if unknown)
    and ``ranks``, the agents whose own loss or gradient was not finite (empty when only the
    combined gradient was, e.g. an overflow in the sum).
    """

    def __init__(self, message: str, rank: int | None = None, epoch: int | None = None, step: int | None = None,
                 ranks: list[int] | None = None, **kwargs: Any) -> None:
        super().__init__(message, rank=rank, **kwargs)
        self.epoch, self.step, self.ranks = epoch, step, list(ranks or [])

    @property
    def details(self) -> dict[str, Any]:
        """What travels with the error from an agent to the driver."""
        return {"epoch": self.epoch, "step": self.step, "ranks": self.ranks}
