"""Models. Each returns one logit (or value) per example, or one logit per class (``outputs > 1``).

No BatchNorm anywhere: per-sample-gradient DP (Opacus) cannot use it, so the CNN uses
GroupNorm, which Opacus' ``ModuleValidator`` accepts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from typing_extensions import override


class LogisticRegression(nn.Module):
    """``sigmoid(w.x + b)``, as in FLamby's Fed-Heart-Disease baseline."""

    def __init__(self, num_features: int, outputs: int = 1) -> None:
        super().__init__()
        self.linear = nn.Linear(num_features, outputs)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return out.squeeze(-1) if out.shape[-1] == 1 else out


class MLP(nn.Module):
    """Fully connected ReLU network with optional dropout."""

    def __init__(self, num_features: int, hidden: Sequence[int], dropout: float = 0.0, outputs: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = num_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, outputs))
        self.net = nn.Sequential(*layers)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out.squeeze(-1) if out.shape[-1] == 1 else out


class SmallCNN(nn.Module):
    """Two conv blocks (conv, GroupNorm, ReLU, max-pool) and a small classifier (28x28 grey input by default)."""

    def __init__(self, channels: Sequence[int] = (16, 32), hidden: int = 64, dropout: float = 0.0,
                 in_channels: int = 1, size: int = 28, outputs: int = 1) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.GroupNorm(4, c1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.GroupNorm(4, c2), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = size // 4
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * side * side, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, outputs)
        )

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.features(x))
        return out.squeeze(-1) if out.shape[-1] == 1 else out
