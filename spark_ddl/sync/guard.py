"""Consistency guard for the synchronous strategies: replicas must hold identical parameters.

Every agent computes two float64 checksums per tensor (plain and position-weighted sums) in
the same deterministic way, all-gathers them, and compares with rank 0. Identical tensors give
identical bits; any difference names the ranks and the first tensor that differs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from spark_ddl.errors import NonFiniteLossError


class ReplicaDivergenceError(RuntimeError):
    """Agents that should hold the same parameters do not."""


CHECKSUM_CHUNK = 1 << 22  # elements per piece: the checksums of a big tensor cost no big temporaries


def _checksums(tensor: torch.Tensor) -> torch.Tensor:
    """(plain sum, position-weighted sum) in float64, computed piece by piece."""
    flat = tensor.detach().reshape(-1)
    total = torch.zeros(2, dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), CHECKSUM_CHUNK):
        piece = flat[start : start + CHECKSUM_CHUNK].double()
        weights = torch.arange(start + 1, start + piece.numel() + 1, dtype=torch.float64, device=flat.device)
        total += torch.stack([piece.sum(), (piece * weights).sum()])
    return total


def tensor_checksums(module: nn.Module, device: torch.device) -> tuple[list[str], torch.Tensor]:
    """Names of the module's parameters and floating buffers, and (2 x n) float64 checksums."""
    names, sums = [], []
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if not tensor.is_floating_point():
            continue
        names.append(name)
        sums.append(_checksums(tensor))
    stacked = torch.stack(sums, dim=1) if sums else torch.zeros(2, 0, dtype=torch.float64)
    return names, stacked.to(device)


def state_is_identical(module: nn.Module, device: torch.device) -> bool:
    """Collective: whether every rank holds the same parameters and buffers (the same checksums; one
    all-reduce of a few numbers per tensor). Every rank gets the same answer; NaN anywhere: False."""
    sums = [_checksums(t) for t in list(module.parameters()) + list(module.buffers())]
    if not sums:
        return True
    local = torch.cat(sums).to(device)
    extremes = torch.cat([local, -local])  # the maximum of -x is minus the minimum of x
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    highest, lowest = extremes[: local.numel()], -extremes[local.numel():]
    return bool(torch.isfinite(extremes).all()) and torch.equal(highest, lowest)


def check_replicas(module: nn.Module, device: torch.device, where: str) -> None:
    """Raise ReplicaDivergenceError on every rank if any replica differs from rank 0's, or
    NonFiniteLossError if any replica holds NaN or infinite values (training diverged: NaN is
    never equal to itself, and that is not the synchronisation's fault)."""
    names, local = tensor_checksums(module, device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    broken = [rank for rank, sums in enumerate(gathered) if not bool(torch.isfinite(sums).all())]
    if broken:
        columns = (~torch.isfinite(gathered[broken[0]])).any(dim=0).nonzero()
        first = names[int(columns[0])] if len(columns) else "?"
        raise NonFiniteLossError(
            f"parameters are NaN or infinite {where} on rank(s) {broken}, first in tensor {first!r}: training "
            "diverged; this is not a synchronisation fault. Lower the learning rate, or set grad_clip_norm "
            "(e.g. 1.0) to bound every update.", rank=broken[0], ranks=broken,
        )
    reference = gathered[0]
    diverged = [rank for rank, sums in enumerate(gathered) if not torch.equal(sums, reference)]
    if diverged:
        columns = (gathered[diverged[0]] != reference).any(dim=0).nonzero()
        first = names[int(columns[0])] if len(columns) else "?"
        raise ReplicaDivergenceError(
            f"replicas diverged {where}: rank(s) {diverged} differ from rank 0, first in tensor "
            f"{first!r}. The synchronisation is broken (e.g. non-deterministic parameter updates, "
            "a module that changes its own weights outside the optimiser, or a faulty device)."
        )
