"""Embedding tables with sparse gradients (``nn.Embedding(sparse=True)``): only the rows a batch
touched travel. Every agent all-gathers the others' (row ids, rows) and sums them the same way,
so the replicas stay identical; the optimiser (SGD, Adagrad) updates only those rows.

A dense table's gradient is the whole table every step, however few rows a batch used: its
all-reduce and the optimiser's update cost grow with the table, the sparse exchange with the
batch (see docs/performance.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

AUTO_SPARSE_BYTES = 16 * 2**20  # 'auto': tables from this size on (the measured crossover is ~13 MB)


def sparse_policy(settings: Any) -> str:
    """'always', 'large' (tables of AUTO_SPARSE_BYTES and more) or 'never': what ``sparse_embeddings``
    means for these settings. Sparse gradients need an optimiser that takes them (SGD) and no
    step that reads the whole gradient (weight decay, clipping)."""
    allowed = (settings.optimizer == "sgd" and not settings.optimizer_kwargs.get("weight_decay")
               and settings.grad_clip_norm is None)
    if settings.sparse_embeddings == "never" or not allowed:
        return "never"
    return "always" if settings.sparse_embeddings == "always" else "large"


def make_tables_sparse(module: nn.Module, policy: str) -> None:
    """Switch the module's dense embedding tables to sparse gradients as ``policy`` says (the
    values of every update are the same; only the gradient's form and exchange change)."""
    if policy == "never":
        return
    for table in module.modules():
        if isinstance(table, (nn.Embedding, nn.EmbeddingBag)) and not table.sparse:
            size = table.weight.numel() * table.weight.element_size()
            if policy == "always" or size >= AUTO_SPARSE_BYTES:
                table.sparse = True


def sparse_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trainable tables whose gradients are sparse (embeddings created with ``sparse=True``)."""
    return [m.weight for m in module.modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and m.weight.requires_grad]


def dense_gradient(param: nn.Parameter) -> torch.Tensor:
    """The parameter's gradient as a dense tensor (zeros when it has none)."""
    if param.grad is None:
        return torch.zeros_like(param)
    return param.grad.to_dense() if param.grad.is_sparse else param.grad


def average_sparse_gradient(param: nn.Parameter) -> None:
    """Collective: replace ``param.grad`` (sparse, or None for no touched rows) by the mean over
    all ranks, as a coalesced sparse tensor identical on every rank."""
    world = dist.get_world_size()
    grad = param.grad.coalesce() if param.grad is not None else torch.sparse_coo_tensor(
        torch.zeros((1, 0), dtype=torch.int64), torch.zeros((0, *param.shape[1:]), dtype=param.dtype), param.shape)
    indices, values = grad.indices()[0], grad.values()
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(indices)], dtype=torch.int64))
    longest = max(int(c) for c in counts)
    padded_indices = torch.zeros(longest, dtype=torch.int64)
    padded_indices[: len(indices)] = indices
    padded_values = torch.zeros((longest, *param.shape[1:]), dtype=param.dtype)
    padded_values[: len(values)] = values
    all_indices = [torch.empty_like(padded_indices) for _ in range(world)]
    all_values = [torch.empty_like(padded_values) for _ in range(world)]
    dist.all_gather(all_indices, padded_indices)
    dist.all_gather(all_values, padded_values)
    rows = torch.cat([i[: int(n)] for i, n in zip(all_indices, counts)])
    sums = torch.cat([v[: int(n)] for v, n in zip(all_values, counts)])
    total = torch.sparse_coo_tensor(rows.unsqueeze(0), sums, param.shape).coalesce()
    param.grad = torch.sparse_coo_tensor(total.indices(), total.values() / world, param.shape).coalesce()
