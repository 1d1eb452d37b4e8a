"""Deprecated location of :mod:`app.support.flower_tuning` (moved by issue #35, which layered ``app/`` inside).

``import app.runtime.flower_tuning`` keeps working and warns once per process; the old path will be removed in fedsilo 0.15.0
(CHANGELOG.md).
"""

from __future__ import annotations

import warnings
from typing import Any

from app.support import flower_tuning as _moved

warnings.warn("app.runtime.flower_tuning moved to app.support.flower_tuning "
              "(the old path will be removed in fedsilo 0.15.0, CHANGELOG.md)",
              DeprecationWarning, stacklevel=2)


def __getattr__(name: str) -> Any:
    """Every name of :mod:`app.support.flower_tuning`, from its new place."""
    return getattr(_moved, name)
