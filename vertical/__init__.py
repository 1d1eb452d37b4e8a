"""Vertical federated learning: parties with the same customers and different columns.

``REGISTRY`` maps ``vertical.name`` to the module holding the model's party steps and coordinator
loop (``trainer()`` -> :class:`vertical.coordinator.Trainer`). Modules are imported on use:
``hetero_lr`` needs the ``paillier`` extra (``phe``, ``gmpy2``), ``split_nn`` does not.
"""

from __future__ import annotations

import importlib
from types import ModuleType

REGISTRY: dict[str, str] = {"hetero_lr": "vertical.hetero_lr", "split_nn": "vertical.split_nn"}


def module(name: str) -> ModuleType:
    """The model's module (importing it registers its party steps)."""
    if name not in REGISTRY:
        raise ValueError(f"vertical.name={name!r} is not one of {sorted(REGISTRY)}")
    try:
        return importlib.import_module(REGISTRY[name])
    except ImportError as err:
        raise ImportError(f"vertical={name} needs the paillier extra: pip install 'fedsilo[paillier]' ({err})") from err


def trainer(name: str):  # type: ignore[no-untyped-def]
    return module(name).trainer()
