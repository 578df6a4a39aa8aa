"""Independent references in plain PyTorch: what each synchronisation strategy must equal.

Nothing here imports spark_ddl. A test trains the same initial network on the same rows with
these loops and compares the result with what the strategy produced (``shuffle=False``:
agent i's step s takes rows [s*b, (s+1)*b) of its shard).
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

Part = tuple  # (features, labels) of one agent's shard, numpy arrays or tensors

# Two code paths computing the same float32 result (Arrow vs pandas scoring, another batch size,
# Connect vs classic, a saved and reloaded model) may differ in the last bits: float32 keeps ~7
# significant digits and a different summation order moves the last one or two. Compare such
# results with these tolerances (~80 ulps, plus an absolute floor for values near zero), never
# with assert_allclose's default rtol=1e-7, which is one ulp and fails at random.
FLOAT32_PATHS = {"rtol": 1e-5, "atol": 1e-6}


def _tensors(parts: Sequence[Part]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.as_tensor(np.asarray(x, dtype=np.float32)), torch.as_tensor(np.asarray(y, dtype=np.float32)))
            for x, y in parts]


def _mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x).reshape(-1), y.reshape(-1))


def steps_per_epoch(parts: Sequence[Part], batch_size: int) -> int:
    """Lock-step agents all run enough steps for the largest shard."""
    return max(math.ceil(len(x) / batch_size) for x, _ in parts)


def combined_batch_sgd(module: nn.Module, parts: Sequence[Part], batch_size: int, epochs: int, lr: float,
                       momentum: float = 0.0, clip: float | None = None) -> nn.Module:
    """One process, ``torch.optim.SGD``: step s trains on every agent's rows of step s together
    (what all-reduce, the parameter server and gradient accumulation must equal). A copy of
    ``module`` is trained and returned."""
    model, shards = copy.deepcopy(module).train(), _tensors(parts)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    for _ in range(epochs):
        for step in range(steps_per_epoch(parts, batch_size)):
            window = slice(step * batch_size, (step + 1) * batch_size)
            x = torch.cat([px[window] for px, _ in shards])
            y = torch.cat([py[window] for _, py in shards])
            optimizer.zero_grad()
            _mse(model, x, y).backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
    return model


def averaged_independent_sgd(module: nn.Module, parts: Sequence[Part], batch_size: int, epochs: int, lr: float,
                             every: int) -> nn.Module:
    """K processes, each plain SGD on its own shard; parameters averaged every ``every`` updates
    and at the end (what ``local_sgd`` must equal). Returns the averaged model. Shards of equal
    size, a multiple of ``batch_size`` (the lock-step loop weights an agent's loss by its share
    of each update's rows, which is 1 only then)."""
    assert len({len(x) for x, _ in parts}) == 1 and len(parts[0][0]) % batch_size == 0
    return local_sgd_reference(module, parts, batch_size, epochs, lr, every)  # every row weight is 1 here


def assert_same_state(actual: dict, expected: dict, tolerance: float = 0.0) -> None:
    """Same keys, then every tensor within ``tolerance`` (relative and absolute; 0: same bits)."""
    assert set(actual) == set(expected), (sorted(actual), sorted(expected))
    for name in expected:
        if tolerance == 0:
            assert torch.equal(actual[name], expected[name]), name
        else:
            torch.testing.assert_close(actual[name], expected[name], rtol=tolerance, atol=tolerance, msg=name)


def max_relative_difference(a: nn.Module, b: nn.Module) -> float:
    """Largest |a - b| / max|b| over the tensors of two modules with the same state_dict keys."""
    left, right = a.state_dict(), b.state_dict()
    assert set(left) == set(right), (sorted(left), sorted(right))
    worst = 0.0
    for name, pb in right.items():
        pa = left[name]
        scale = pb.abs().max().item() or 1.0
        worst = max(worst, (pa.double() - pb.double()).abs().max().item() / scale)
    return worst


# Batch-mean losses written from torch.nn.functional (labels arrive as float32 arrays).
LOSSES = {
    "mse": lambda output, y: nn.functional.mse_loss(output.reshape(-1), y.reshape(-1)),
    "cross_entropy": lambda output, y: nn.functional.cross_entropy(output, y.long()),
    "bce_with_logits": lambda output, y: nn.functional.binary_cross_entropy_with_logits(output.reshape(-1),
                                                                                       y.reshape(-1)),
}


def combined_batch_training(module: nn.Module, parts: Sequence[Part], batch_size: int, epochs: int,
                            optimizer, loss: str = "mse", clip: float | None = None,
                            optimizer_state: dict | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``combined_batch_sgd`` with any optimiser and loss: one process, step s on every agent's rows
    of step s together, the loss the mean over those rows (what the lock-step loop's row weighting
    must give on uneven shards). ``optimizer``: ``callable(params) -> torch.optim.Optimizer``;
    ``loss``: a key of LOSSES; ``clip``: ``clip_grad_norm_`` of the combined gradient before each
    step; ``optimizer_state``: a saved state to continue (momentum, Adam's moments and step
    counts) under this run's hyper-parameters. Returns copies of the trained model and its optimiser."""
    model, shards = copy.deepcopy(module).train(), _tensors(parts)
    opt = optimizer(model.parameters())
    if optimizer_state is not None:
        mine = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
        opt.load_state_dict(copy.deepcopy(optimizer_state))
        for group, settings in zip(opt.param_groups, mine):
            group.update(settings)
    for _ in range(epochs):
        for step in range(steps_per_epoch(parts, batch_size)):
            window = slice(step * batch_size, (step + 1) * batch_size)
            x = torch.cat([px[window] for px, _ in shards])
            y = torch.cat([py[window] for _, py in shards])
            opt.zero_grad()
            LOSSES[loss](model(x), y).backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
    return model, opt


def assert_same_optimizer_state(actual: dict, expected: dict, tolerance: float) -> None:
    """Two ``optimizer.state_dict()``s: the same parameters, the same entries (momentum buffers,
    moments, step counts), every tensor within ``tolerance``."""
    assert sorted(actual["state"]) == sorted(expected["state"])
    for index, entries in expected["state"].items():
        assert set(actual["state"][index]) == set(entries), index
        for name, value in entries.items():
            torch.testing.assert_close(torch.as_tensor(actual["state"][index][name]), torch.as_tensor(value),
                                       rtol=tolerance, atol=tolerance, msg=f"{index}.{name}")


def local_sgd_reference(module: nn.Module, parts: Sequence[Part], batch_size: int, epochs: int, lr: float,
                        every: int, skip: dict[int, int] | None = None) -> nn.Module:
    """``averaged_independent_sgd`` on shards of any size: K processes, each plain SGD on its own
    rows, agent i's batch loss weighted by ``rows_i * K / rows of the step over all agents`` (the
    lock-step loop's row weighting; an agent without rows at a step takes a zero gradient);
    ``skip``: {agent: its n-th update (1-based)} not applied by that agent alone (its own
    non-finite update); parameters averaged every ``every`` updates and at the end."""
    shards, skip = _tensors(parts), skip or {}
    models = [copy.deepcopy(module).train() for _ in shards]
    optimizers = [torch.optim.SGD(m.parameters(), lr=lr) for m in models]

    def average() -> None:
        with torch.no_grad():
            for tensors in zip(*(m.parameters() for m in models)):
                mean = torch.stack(list(tensors)).mean(dim=0)
                for t in tensors:
                    t.copy_(mean)

    updates = 0
    for _ in range(epochs):
        for step in range(steps_per_epoch(parts, batch_size)):
            window = slice(step * batch_size, (step + 1) * batch_size)
            total = sum(len(x[window]) for x, _ in shards)
            updates += 1
            for agent, (model, optimizer, (x, y)) in enumerate(zip(models, optimizers, shards)):
                optimizer.zero_grad()
                rows = len(x[window])
                if rows:
                    (_mse(model, x[window], y[window]) * (rows * len(shards) / total)).backward()
                if skip.get(agent) != updates:
                    optimizer.step()
            if updates % every == 0:
                average()
    if updates % every:
        average()
    return models[0]
