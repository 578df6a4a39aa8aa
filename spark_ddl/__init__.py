"""spark_ddl: data-parallel PyTorch training on Spark DataFrames.

    from spark_ddl import TorchEstimator, TorchModel
    model = TorchEstimator(model=net, epochs=5, num_workers=2).fit(df)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spark_ddl import _moved
from spark_ddl._version import __version__
from spark_ddl.errors import (ClusterConfigError, ConfigError, NonFiniteLossError, SchemaError, SparkDDLError,
                              TrainingError)

_moved.install()  # saved pipelines, class paths and pickles name the modules' old paths

if TYPE_CHECKING:
    from spark_ddl.driver.session import get_or_create_session
    from spark_ddl.ml.estimator import TorchEstimator
    from spark_ddl.ml.model import TorchModel
    from spark_ddl.ml.persistence import allow_pickle
    from spark_ddl.runner import run
    from spark_ddl.streaming.latest import LatestModel

# Imported on first use: the agents import this package too, and pyspark.ml would bring
# pandas and scipy into every executor's Python worker (~70 MB each) for nothing.
_LAZY = {"TorchEstimator": "spark_ddl.ml.estimator", "TorchModel": "spark_ddl.ml.model",
         "get_or_create_session": "spark_ddl.driver.session", "allow_pickle": "spark_ddl.ml.persistence",
         "run": "spark_ddl.runner", "LatestModel": "spark_ddl.streaming.latest"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'spark_ddl' has no attribute {name!r}")


__all__ = [
    "TorchEstimator",
    "TorchModel",
    "LatestModel",
    "get_or_create_session",
    "allow_pickle",
    "run",
    "SparkDDLError",
    "ConfigError",
    "SchemaError",
    "ClusterConfigError",
    "TrainingError",
    "NonFiniteLossError",
]
