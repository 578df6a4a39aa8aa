"""Ready-made networks, importable by class path so saved models rebuild without pickle."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class MLP(nn.Sequential):
    """Fully connected network: in_features → hidden… → out_features, ReLU between layers.

    Use it by class path: ``TorchEstimator(model="spark_ddl.networks:MLP",
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


class SmallCNN(nn.Module):
    """Two convolutions, a 2x2 pooling and an MLP head for small square images [B, C, size, size]
    (e.g. the 8x8 digits).

    ``spark_ddl.networks:SmallCNN`` with ``model_kwargs={"channels": 1, "classes": 10, "size": 8}``;
    the input is the model's keyword argument ``image``.
    """

    def __init__(self, channels: int = 1, classes: int = 10, size: int = 8, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Linear(2 * width * (size // 2) ** 2, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image).flatten(1))


class TextClassifier(nn.Module):
    """Token ids → embeddings → mean over the real tokens (the padding mask) → MLP → class logits.

    Inputs: ``tokens`` [B, L] int64 and ``tokens_mask`` [B, L] bool (padded per batch).
    """

    def __init__(self, vocabulary: int, classes: int = 2, dim: int = 32, hidden: int = 32) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, dim, padding_idx=0)
        self.head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, tokens: torch.Tensor, tokens_mask: torch.Tensor) -> torch.Tensor:
        weights = tokens_mask.unsqueeze(2).to(torch.float32)
        pooled = (self.embedding(tokens) * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(pooled)


class MatrixFactorization(nn.Module):
    """rating ≈ global + user bias + item bias + <user vector, item vector> (inputs ``user``,
    ``item``: int64 ids in [0, users) and [0, items)). ``sparse=True`` gives sparse gradients for
    the tables (only the rows a batch touched; needs an optimiser that takes them, e.g. SGD)."""

    def __init__(self, users: int, items: int, dim: int = 32, mean: float = 0.0, sparse: bool = False) -> None:
        super().__init__()
        self.user = nn.Embedding(users, dim, sparse=sparse)
        self.item = nn.Embedding(items, dim, sparse=sparse)
        self.user_bias = nn.Embedding(users, 1, sparse=sparse)
        self.item_bias = nn.Embedding(items, 1, sparse=sparse)
        self.mean = nn.Parameter(torch.tensor([float(mean)]))
        for table in (self.user, self.item):
            nn.init.normal_(table.weight, std=0.01)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        dot = (self.user(user) * self.item(item)).sum(dim=1)
        return (self.mean + self.user_bias(user).squeeze(1) + self.item_bias(item).squeeze(1) + dot).unsqueeze(1)

    def penalty(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """Per-row L2 of the rows a batch used (the usual matrix-factorisation regulariser)."""
        return ((self.user(user) ** 2).sum(1) + (self.item(item) ** 2).sum(1) + self.user_bias(user).squeeze(1) ** 2
                + self.item_bias(item).squeeze(1) ** 2)


class PenalizedMSE:
    """A training step for ``MatrixFactorization``: mean squared error plus ``l2`` times the rows'
    ``penalty`` (use as ``train_step=PenalizedMSE(0.1)``, with ``loss="mse"`` for the task)."""

    def __init__(self, l2: float = 0.1, label: str = "label") -> None:
        self.l2, self.label = l2, label

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        user, item = batch["user"], batch["item"]
        error = model(user=user, item=item).reshape(-1) - batch[self.label].to(torch.float32)
        plain = getattr(model, "module", model)  # under DDP the network is its .module
        return (error ** 2).mean() + self.l2 * plain.penalty(user, item).mean()
