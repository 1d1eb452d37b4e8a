"""Deprecated location of :mod:`app.support.traffic` (moved by issue #35, which layered ``app/`` inside).

``import app.runtime.traffic`` keeps working and warns once per process; the old path will be removed in fedsilo 0.15.0
(CHANGELOG.md).
"""

from __future__ import annotations

import warnings
from typing import Any

from app.support import traffic as _moved

warnings.warn("app.runtime.traffic moved to app.support.traffic "
              "(the old path will be removed in fedsilo 0.15.0, CHANGELOG.md)",
              DeprecationWarning, stacklevel=2)


def __getattr__(name: str) -> Any:
    """Every name of :mod:`app.support.traffic`, from its new place."""
    return getattr(_moved, name)
