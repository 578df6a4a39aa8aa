"""Losses and optimisers by name (or as the user's own callables)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_loss(loss: str | LossFn) -> LossFn:
    """The batch-mean loss function for a name in config.LOSSES, or the callable itself."""
    if callable(loss):
        return loss
    if loss == "cross_entropy":
        return nn.CrossEntropyLoss()
    if loss == "mse":
        mse = nn.MSELoss()
        return lambda output, target: mse(output, target.reshape(output.shape))
    if loss == "bce_with_logits":
        bce = nn.BCEWithLogitsLoss()
        return lambda output, target: bce(output, target.reshape(output.shape))
    raise ValueError(f"unknown loss {loss!r}")


def label_dtype(loss: str | LossFn) -> torch.dtype:
    """The dtype the label tensor must have for this loss."""
    return torch.int64 if loss == "cross_entropy" else torch.float32


def make_optimizer(
    name: str, params: Iterable[nn.Parameter], lr: float, kwargs: dict[str, Any]
) -> torch.optim.Optimizer:
    """A torch optimiser by name ("sgd", "adam", "adamw") with extra keyword arguments."""
    classes = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if name not in classes:
        raise ValueError(f"unknown optimizer {name!r}")
    return classes[name](params, lr=lr, **kwargs)


def make_scheduler(
    name: str | None, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any]
) -> Any | None:
    """A torch.optim.lr_scheduler by class name (stepped once per epoch), or None."""
    if name is None:
        return None
    return getattr(torch.optim.lr_scheduler, name)(optimizer, **kwargs)
