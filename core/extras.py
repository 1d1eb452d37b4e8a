"""Optional extras: which packages each ``pip install "fedsilo[...]"`` extra brings, and one check.

The default install (``pip install fedsilo``) runs every option that needs no extra. An option that
needs one calls :func:`require` before anything starts; if a package is missing the user gets one line
naming the option and the exact command that installs it (the ``fedsilo`` command exits 2 on it). No
module that the default job or an extra-free option imports may import these packages at import time:
``tests/unit/test_extras.py`` runs the default job's imports with every extra blocked.
"""

from __future__ import annotations

import importlib.util

#: extra -> the top-level modules it installs (as imported), in ``pyproject.toml``'s order.
EXTRAS: dict[str, tuple[str, ...]] = {
    "paillier": ("phe", "gmpy2"),
    "tensorboard": ("tensorboard",),
    "mlflow": ("mlflow",),  # its SQLite store needs sqlalchemy and alembic, which Flower installs
}
#: Modules only benchmarks use (``fedsilo[bench]``): never imported by the package.
BENCH_ONLY = ("tenseal",)


class MissingExtra(ImportError):
    """An option's optional extra is not installed; the message is the one line a user sees."""


def install_command(extra: str) -> str:
    """The pip command that installs ``extra``."""
    return f'pip install "fedsilo[{extra}]"'


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here."""
    return [m for m in EXTRAS[extra] if _absent(m)]


def _absent(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a broken install counts as absent
        return True


def message(option: str, extra: str) -> str | None:
    """Why ``option`` cannot run here (one line), or None if its extra is installed."""
    absent = missing(extra)
    if not absent:
        return None
    return (f"{option} needs the optional '{extra}' extra ({', '.join(absent)} not installed): "
            f"{install_command(extra)}")


def require(option: str, extra: str) -> None:
    """Raise :class:`MissingExtra` naming ``option`` and the install command if ``extra`` is missing."""
    why = message(option, extra)
    if why is not None:
        raise MissingExtra(why)


__all__ = ["BENCH_ONLY", "EXTRAS", "MissingExtra", "install_command", "message", "missing", "require"]
