"""Old import paths of modules that moved, kept working with a warning until their removal.

One table (:data:`MOVED`) and one import hook: ``import app.runtime.checkpoint`` gives the module now at
``app.support.checkpoint`` (the same module object) and warns once per process, naming the new path and the
version that removes the old one (CHANGELOG.md, "Planned for").
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

#: old module -> (new module, the version that removes the old path)
MOVED: dict[str, tuple[str, str]] = {
    **{f"app.runtime.{m}": (f"app.support.{m}", "0.15.0") for m in ("paths", "checkpoint", "traffic", "flower_tuning")},
    **{f"app.reporting.{m}": (f"app.tracking.{m}", "0.15.0") for m in ("trackers", "mlflow_tracker", "tensorboard")},
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old paths of :data:`MOVED` and loads them as the modules at their new paths."""

    def __init__(self) -> None:
        self.specs: dict[str, importlib.machinery.ModuleSpec | None] = {}

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        """A spec for an old path (None for any other module)."""
        return importlib.machinery.ModuleSpec(fullname, self) if fullname in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        """The module at the new path, with a DeprecationWarning naming it."""
        new, removed = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new} (the old path will be removed in fedsilo {removed}, CHANGELOG.md)",
                      DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        self.specs[new] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run (the module was imported at its new path): give it back its own spec."""
        module.__spec__ = self.specs.get(module.__name__, module.__spec__)


def install() -> None:
    """Add the alias finder to the import system (once)."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
