"""The training loops: ``lockstep.EpochLoop`` drives a ``LockstepStrategy``,
``asynchronous.AsyncLoop`` an ``AsyncStrategy``. Both implement ``Loop``; ``make_loop``
picks the one that matches the strategy's type."""

from __future__ import annotations

from spark_ddl.agent.loops.asynchronous import AsyncLoop
from spark_ddl.agent.loops.common import Loop, LoopContext, LoopResult
from spark_ddl.agent.loops.lockstep import EpochLoop
from spark_ddl.sync.base import AsyncStrategy, LockstepStrategy

__all__ = ["Loop", "LoopContext", "LoopResult", "EpochLoop", "AsyncLoop", "make_loop"]


def make_loop(context: LoopContext) -> Loop:
    """The loop for ``context.strategy``."""
    if isinstance(context.strategy, AsyncStrategy):
        return AsyncLoop(context)
    if isinstance(context.strategy, LockstepStrategy):
        return EpochLoop(context)
    raise TypeError(f"{type(context.strategy).__name__} is neither a LockstepStrategy nor an AsyncStrategy")
