"""Deprecated location of :mod:`app.tracking.mlflow_tracker` (moved by issue #35, which layered ``app/`` inside).

``import app.reporting.mlflow_tracker`` keeps working and warns once per process; the old path will be removed in fedsilo 0.15.0
(CHANGELOG.md).
"""

from __future__ import annotations

import warnings
from typing import Any

from app.tracking import mlflow_tracker as _moved

warnings.warn("app.reporting.mlflow_tracker moved to app.tracking.mlflow_tracker "
              "(the old path will be removed in fedsilo 0.15.0, CHANGELOG.md)",
              DeprecationWarning, stacklevel=2)


def __getattr__(name: str) -> Any:
    """Every name of :mod:`app.tracking.mlflow_tracker`, from its new place."""
    return getattr(_moved, name)
