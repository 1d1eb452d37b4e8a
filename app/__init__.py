"""fedsilo's Flower app: the ServerApp and ClientApp, the ``fedsilo`` command and what they run."""

from __future__ import annotations

from app import _moved

_moved.install()  # old import paths of moved modules keep working, with a warning (app/_moved.py)


def version() -> str:
    """The version of fedsilo. It lives in one place, ``[project] version`` of ``pyproject.toml``: read from
    the checkout when fedsilo runs from one (an editable install's metadata keeps the version it was
    installed at), else from the installed package's metadata. CHANGELOG.md lists what each holds."""
    import tomllib
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.is_file():
        project = tomllib.loads(pyproject.read_text()).get("project", {})
        if project.get("name") == "fedsilo":
            return str(project["version"])
    try:
        return installed("fedsilo")
    except PackageNotFoundError:
        return "unknown"
