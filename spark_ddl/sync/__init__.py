"""Synchronisation strategies, one module each; the registry maps each name to its class.

The registry is the one place a strategy's name is known: the ``sync`` setting's choices and
documentation (so the estimator's Param, the CLI and validation), and the agents' choice of
strategy all read it.
"""

from __future__ import annotations

from spark_ddl.errors import ConfigError
from spark_ddl.sync.allreduce import AllReduceStrategy
from spark_ddl.sync.async_parameter_server import AsyncParameterServerStrategy
from spark_ddl.sync.base import AsyncStrategy, LockstepStrategy, StrategyEnv, StrategySettings, SyncStrategy
from spark_ddl.sync.local_sgd import LocalSGDStrategy
from spark_ddl.sync.parameter_server import ParameterServerStrategy

STRATEGIES: dict[str, type[SyncStrategy]] = {
    cls.name: cls
    for cls in (AllReduceStrategy, ParameterServerStrategy, LocalSGDStrategy, AsyncParameterServerStrategy)
}

__all__ = ["STRATEGIES", "SyncStrategy", "LockstepStrategy", "AsyncStrategy", "StrategyEnv", "StrategySettings",
           "strategy_class", "strategy_descriptions", "elastic_strategies", "make_strategy"]


def strategy_descriptions() -> dict[str, str]:
    """Each strategy's name and one-line description, in the registry's order."""
    return {name: cls.description for name, cls in STRATEGIES.items()}


def elastic_strategies() -> tuple[str, ...]:
    """The strategies whose replicas stay identical: fewer agents can continue their shards."""
    return tuple(name for name, cls in STRATEGIES.items() if cls.replicas_identical)


def strategy_class(name: str) -> type[SyncStrategy]:
    """The class registered under ``name``."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"sync must be one of {', '.join(STRATEGIES)}, got {name!r}.") from None


def make_strategy(settings: StrategySettings, name: str, env: StrategyEnv) -> SyncStrategy:
    """The strategy ``name`` for one agent."""
    return strategy_class(name).create(settings, env)
