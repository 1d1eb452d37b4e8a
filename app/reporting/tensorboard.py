"""Deprecated location of :mod:`app.tracking.tensorboard` (moved by issue #35, which layered ``app/`` inside).

``import app.reporting.tensorboard`` keeps working and warns once per process; the old path will be removed in fedsilo 0.15.0
(CHANGELOG.md).
"""

from __future__ import annotations

import warnings
from typing import Any

from app.tracking import tensorboard as _moved

warnings.warn("app.reporting.tensorboard moved to app.tracking.tensorboard "
              "(the old path will be removed in fedsilo 0.15.0, CHANGELOG.md)",
              DeprecationWarning, stacklevel=2)


def __getattr__(name: str) -> Any:
    """Every name of :mod:`app.tracking.tensorboard`, from its new place."""
    return getattr(_moved, name)
