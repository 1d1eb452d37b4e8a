"""fedsilo's Flower app: the ServerApp and ClientApp, the ``fedsilo`` command and what they run."""

from __future__ import annotations


def version() -> str:
    """fedsilo's version. It lives in one place, ``[project] version`` of ``pyproject.toml``; an
    installation reads it from its package metadata (CHANGELOG.md lists what each version holds)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("fedsilo")
    except PackageNotFoundError:  # a checkout run without installing it
        import tomllib
        from pathlib import Path

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
