"""Local training and evaluation loops over pre-batched tensors.

Tabular batches are sliced straight out of one tensor with a seeded permutation: a
``DataLoader(TensorDataset)`` spends more time collating small rows than training on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from typing_extensions import override

from tasks.data import Split
from tasks.metrics import summary_for

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
#: An extra term of the local objective, e.g. FedProx's proximal term: model -> scalar.
Penalty = Callable[[nn.Module], torch.Tensor]


@dataclass(frozen=True)
class LocalTrainConfig:
    """Hyper-parameters of one site's local training in one round."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "sgd"
    loss: str = "binary"     # binary (BCE on one logit) | multiclass (cross-entropy) | regression (squared error)


LOSSES = ("binary", "multiclass", "regression")


class ClassLoss(nn.Module):
    """Cross-entropy with the class index carried as a float label (as every Split stores labels)."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    @override
    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, y.long(), reduction=self.reduction)


def loss_fn(kind: str, reduction: str = "mean") -> nn.Module:
    """The training loss of a label kind (``LocalTrainConfig.loss``)."""
    if kind == "multiclass":
        return ClassLoss(reduction)
    if kind == "regression":
        return nn.MSELoss(reduction=reduction)
    if kind != "binary":
        raise ValueError(f"loss {kind!r} is not one of {list(LOSSES)}")
    return nn.BCEWithLogitsLoss(reduction=reduction)


def make_optimizer(model: nn.Module, cfg: LocalTrainConfig) -> torch.optim.Optimizer:
    """SGD (with momentum) or Adam over the model's parameters."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: LocalTrainConfig,
    generator: torch.Generator,
    augment: Augment | None = None,
    penalty: Penalty | None = None,
    max_steps: int | None = None,
) -> dict[str, float]:
    """Train ``model`` in place for ``cfg.epochs`` epochs; return the mean loss and step count.

    ``penalty(model)`` is added to every mini-batch loss (the reported ``train_loss`` is
    the data loss alone). ``max_steps`` stops early after that many optimiser steps (a
    straggler's partial work). The shuffle order and any augmentation draw only from
    ``generator``, so a site's update is a pure function of (weights, data, config, seed).
    """
    model.train()
    optimizer = make_optimizer(model, cfg)
    criterion = loss_fn(cfg.loss)
    n = x.shape[0]
    total, seen, steps = 0.0, 0, 0
    budget = steps_per_epoch(n, cfg.batch_size) * cfg.epochs if max_steps is None else max_steps
    for _ in range(cfg.epochs):
        if steps >= budget:
            break
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, cfg.batch_size):
            if steps >= budget:
                break
            idx = order[start : start + cfg.batch_size]
            xb, yb = x[idx], y[idx]
            if augment is not None:
                xb = augment(xb, generator)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(xb), yb)
            objective = loss if penalty is None else loss + penalty(model)
            objective.backward()
            optimizer.step()
            total += float(loss.detach()) * idx.numel()
            seen += idx.numel()
            steps += 1
    return {"train_loss": total / max(1, seen), "local_steps": float(steps)}


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimiser steps in one pass over ``n`` rows."""
    return -(-n // batch_size)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 8192,
            kind: str = "binary") -> tuple[np.ndarray, float]:
    """Return (scores, mean loss) for a whole split: the probability of class 1 (binary), the
    class probabilities (multiclass, rows x classes) or the predictions (regression)."""
    model.eval()
    if x.shape[0] == 0:
        return np.zeros(0), float("nan")
    out = torch.cat([model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
    loss = loss_fn(kind)(out, y).item()
    if kind == "multiclass":
        scores = torch.softmax(out, dim=-1)
    elif kind == "regression":
        scores = out
    else:
        scores = torch.sigmoid(out)
    return scores.numpy().astype(np.float64), float(loss)


def held_out_scores(kind: str, model: torch.nn.Module, rows: Split) -> dict[str, float]:
    """Loss, accuracy and (binary) AUC of ``model`` on ``rows`` of label kind ``kind``; finite values only."""
    scores, loss = predict(model, rows.x, rows.y, kind=kind)
    y = rows.y.numpy()
    out = {"loss": float(loss)}
    if kind == "binary":
        s = summary_for("binary", y, scores, loss)
        out["accuracy"] = (s["tp"] + s["tn"]) / max(1.0, float(len(y)))
        if s["auc_weight"] > 0:
            out["auc"] = s["auc"]
    elif kind == "multiclass":
        out["accuracy"] = float(np.mean(np.argmax(scores, axis=1) == y)) if len(y) else float("nan")
    return {k: v for k, v in out.items() if np.isfinite(v)}
