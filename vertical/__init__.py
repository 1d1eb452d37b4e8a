"""Vertical federated learning: parties with the same customers and different columns.

``REGISTRY`` maps ``vertical.name`` to the model's coordinator loop (:class:`vertical.coordinator.Trainer`);
importing the model modules registers their party steps with :mod:`vertical.party`.
"""

from __future__ import annotations

from collections.abc import Callable

from vertical import hetero_lr, split_nn
from vertical.coordinator import Trainer

REGISTRY: dict[str, Callable[[], Trainer]] = {"hetero_lr": hetero_lr.trainer, "split_nn": split_nn.trainer}


def trainer(name: str) -> Trainer:
    if name not in REGISTRY:
        raise ValueError(f"vertical.name={name!r} is not one of {sorted(REGISTRY)}")
    return REGISTRY[name]()
