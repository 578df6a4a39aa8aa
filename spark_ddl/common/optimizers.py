"""Optimisers and learning-rate schedulers by name, and continuing an optimiser from saved state."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn


def make_optimizer(
    name: str, params: Iterable[nn.Parameter], lr: float, kwargs: dict[str, Any],
    grad_clip_norm: float | None = None,
) -> torch.optim.Optimizer:
    """A torch optimiser by name ("sgd", "adam", "adamw") with extra keyword arguments.

    With ``grad_clip_norm``, every ``step()`` first clips the total norm of the gradients it is
    about to apply: strategies step after the gradients are exchanged, so every rank clips
    the same averaged gradient the same way.
    """
    classes = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if name not in classes:
        raise ValueError(f"unknown optimizer {name!r}")
    optimizer = classes[name](params, lr=lr, **kwargs)
    if grad_clip_norm is not None:
        def clip(optimizer: torch.optim.Optimizer, args: Any, step_kwargs: Any) -> None:
            grads = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, grad_clip_norm)

        optimizer.register_step_pre_hook(clip)
    return optimizer


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Continue ``optimizer`` from a saved ``state`` (momentum buffers, Adam's moments and step
    counts) while keeping its own hyper-parameters (lr, betas, weight decay: this fit's settings).

    Raises ValueError naming the mismatch when ``state`` was made for other parameters.
    """
    groups, saved = optimizer.param_groups, state["param_groups"]
    if len(groups) != len(saved) or any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved)):
        raise ValueError(
            f"the optimiser state holds {[len(s['params']) for s in saved]} parameters per group, this model's "
            f"optimiser {[len(g['params']) for g in groups]}: it was saved for another architecture")
    params = [p for g in groups for p in g["params"]]
    index = {i: p for i, p in enumerate(params)}
    for key, entry in state["state"].items():
        param = index.get(key)
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() and param is not None and value.shape != param.shape:
                raise ValueError(f"the optimiser state's {name!r} of parameter {key} has shape {tuple(value.shape)}, "
                                 f"the parameter {tuple(param.shape)}: it was saved for another architecture")
    mine = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    optimizer.load_state_dict({"state": state["state"],
                               "param_groups": [dict(s, **m) for s, m in zip(saved, mine)]})


def make_scheduler(
    name: str | None, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any]
) -> Any | None:
    """A torch.optim.lr_scheduler by class name (stepped once per epoch), or None."""
    if name is None:
        return None
    return getattr(torch.optim.lr_scheduler, name)(optimizer, **kwargs)
