"""Ready-made networks, importable by class path so saved models rebuild without pickle."""

from __future__ import annotations

from typing import Sequence

from torch import nn


class MLP(nn.Sequential):
    """Fully connected network: in_features → hidden… → out_features, ReLU between layers.

    Use it by class path: ``TorchEstimator(model="spark_ddl.models:MLP",
    model_kwargs={"in_features": 64, "hidden": [128], "out_features": 10})``.
    """

    def __init__(self, in_features: int, out_features: int, hidden: Sequence[int] = (128,),
                 dropout: float = 0.0) -> None:
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)
