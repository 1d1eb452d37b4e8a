"""Vertical federated learning: parties with the same customers and different columns.

``REGISTRY`` maps ``vertical.name`` to the module holding the model's party steps and coordinator
loop (``trainer()`` -> :class:`vertical.coordinator.Trainer`). Modules are imported on use:
``hetero_lr`` and ``secureboost`` need the ``paillier`` extra (``phe``, ``gmpy2``), ``split_nn`` does not.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from core import extras

REGISTRY: dict[str, str] = {"hetero_lr": "vertical.hetero_lr", "split_nn": "vertical.split_nn",
                            "secureboost": "vertical.secureboost"}
#: vertical.name -> the optional extra its module needs (core.extras).
EXTRA: dict[str, str] = {"hetero_lr": "paillier", "secureboost": "paillier"}


def missing_extra(name: str) -> str | None:
    """Why ``vertical=name`` cannot run here (its extra is not installed; one line), or None."""
    extra = EXTRA.get(name)
    return None if extra is None else extras.message(f"vertical={name}", extra)


def module(name: str) -> ModuleType:
    """The model's module (importing it registers its party steps)."""
    if name not in REGISTRY:
        raise ValueError(f"vertical.name={name!r} is not one of {sorted(REGISTRY)}")
    if name in EXTRA:
        extras.require(f"vertical={name}", EXTRA[name])
    return importlib.import_module(REGISTRY[name])


def trainer(name: str):  # type: ignore[no-untyped-def]
    """The trainer of vertical model ``name``."""
    return module(name).trainer()
