"""Deprecated location of the in-process runner: use :mod:`app.runtime.local_grid`.

``from app.local_grid import run_inprocess, LocalGrid`` keeps working (the README documented it
for sweeps before issue #15 grouped ``app/`` by concern) and warns once per process.
"""

from __future__ import annotations

import warnings

from app.runtime.local_grid import LocalGrid, run_inprocess

warnings.warn("app.local_grid moved to app.runtime.local_grid; import run_inprocess and LocalGrid from there "
              "(the old path will be removed in fedsilo 0.14.0, CHANGELOG.md)", DeprecationWarning, stacklevel=2)

__all__ = ["LocalGrid", "run_inprocess"]
