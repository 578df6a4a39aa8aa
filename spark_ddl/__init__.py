"""spark_ddl: data-parallel PyTorch training on Spark DataFrames.

    from spark_ddl import TorchEstimator, TorchModel
    model = TorchEstimator(model=net, epochs=5, num_workers=2).fit(df)
"""

__version__ = "0.1.0"

from spark_ddl.errors import (  # noqa: E402
    ClusterConfigError,
    ConfigError,
    SchemaError,
    SparkDDLError,
    TrainingError,
)
from spark_ddl.estimator import TorchEstimator, TorchModel  # noqa: E402
from spark_ddl.session import get_or_create_session  # noqa: E402

__all__ = [
    "TorchEstimator",
    "TorchModel",
    "get_or_create_session",
    "SparkDDLError",
    "ConfigError",
    "SchemaError",
    "ClusterConfigError",
    "TrainingError",
]
