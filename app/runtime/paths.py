"""Deprecated location of :mod:`app.support.paths` (moved by issue #35, which layered ``app/`` inside).

``import app.runtime.paths`` keeps working and warns once per process; the old path will be removed in fedsilo 0.15.0
(CHANGELOG.md).
"""

from __future__ import annotations

import warnings
from typing import Any

from app.support import paths as _moved

warnings.warn("app.runtime.paths moved to app.support.paths "
              "(the old path will be removed in fedsilo 0.15.0, CHANGELOG.md)",
              DeprecationWarning, stacklevel=2)


def __getattr__(name: str) -> Any:
    """Every name of :mod:`app.support.paths`, from its new place."""
    return getattr(_moved, name)
