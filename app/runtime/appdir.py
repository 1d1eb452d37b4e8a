"""The folder ``flwr run`` builds fedsilo's Flower App Bundle (FAB) from, however fedsilo was installed.

From a source checkout (``pip install -e .``) it is the checkout itself: its ``pyproject.toml``
names the ServerApp and ClientApp (``[tool.flwr.app]``). An installed wheel has no checkout; it
carries that ``pyproject.toml`` as ``app/runtime/flower_app.toml`` (``[tool.hatch...force-include]``)
and :func:`app_dir` assembles, once per content, a folder of it and the packages' files that a FAB
holds (``.py``, ``.toml``, ``.md``, ``.yaml``, ``.json``) under the cache folder
(``$FEDSILO_CACHE_DIR``, default ``~/.cache/fedsilo``; a temporary folder if the cache is off). The
folder's name is the digest of its content, so every process of one install, the ``fedsilo`` command
and a site's worker alike, builds the same FAB and gets the same FAB hash.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from functools import cache
from pathlib import Path

#: The installed packages' root: the checkout, or site-packages for a wheel.
ROOT = Path(__file__).resolve().parents[2]
#: The wheel's copy of the checkout's pyproject.toml.
BUNDLED = Path(__file__).with_name("flower_app.toml")
#: What a FAB is made of (Flower's own rule: these suffixes, at most 10 MB).
PACKAGES = ("aggregation", "app", "conf", "core", "privacy", "strategies", "tasks", "vertical")
SUFFIXES = (".py", ".toml", ".md", ".yaml", ".json")


class AppDirError(RuntimeError):
    """Neither a checkout nor an installed wheel's app files were found."""


def is_checkout(root: Path = ROOT) -> bool:
    """Whether ``root`` is a source checkout (it has ``pyproject.toml``) rather than an installed wheel."""
    return (root / "pyproject.toml").is_file()


def _files(root: Path) -> list[Path]:
    files = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES and "__pycache__" not in path.parts:
                files.append(path)
    return files


@cache  # a wheel's folder is found by hashing every file: once per process is enough
def app_dir(root: Path = ROOT) -> Path:
    """The Flower app folder of this installation (see the module docstring)."""
    if is_checkout(root):
        return root
    bundled = root / "app" / "runtime" / BUNDLED.name
    if not bundled.is_file():
        raise AppDirError(f"fedsilo's Flower app files are not installed at {root} (neither a pyproject.toml nor "
                          f"{bundled}): reinstall fedsilo (pip install fedsilo, or pip install -e . in a checkout)")
    files = _files(root)
    digest = hashlib.sha256(bundled.read_bytes())
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    from tasks import cache

    base = cache.directory() or Path(tempfile.gettempdir()) / f"fedsilo-{os.getuid()}"
    target = base / "app" / digest.hexdigest()[:24]
    if (target / "pyproject.toml").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".assembling-", dir=target.parent))
    for path in files:
        dest = staging / path.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    shutil.copyfile(bundled, staging / "pyproject.toml")  # last: its presence marks a complete folder
    try:
        staging.rename(target)
    except OSError:  # another process assembled the same content first
        shutil.rmtree(staging, ignore_errors=True)
    return target


__all__ = ["AppDirError", "app_dir", "is_checkout"]
