"""Where fedsilo finds its data and writes its results.

Data files never travel inside the Flower App Bundle (it ships only code and config), so
every process resolves the data folder itself, in this order:

1. the ``data_dir`` config key (the ``fedsilo`` command always sets it);
2. the ``FEDSILO_DATA_DIR`` environment variable;
3. ``tasks/data`` next to this source tree (a checkout);
4. ``tasks/data`` in the source tree of the installed ``fedsilo`` distribution (an
   editable install, found through its PEP 610 ``direct_url.json``); this is what a
   ``flwr run .`` user gets, whose app code runs from ``$FLWR_HOME/apps``.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

DATA_SUBDIR = Path("tasks") / "data"


def has_data(path: Path) -> bool:
    """True if ``path`` holds every file of at least one task (``Task.data_files``).

    Data files are never shipped in a FAB (it holds only code and text), so this tells a
    real data folder from the FAB copy of ``tasks/data`` that has only its Markdown.
    """
    import tasks

    return any(t.data_files and all((path / f).is_file() for f in t.data_files) for t in tasks.REGISTRY.values())


def _installed_source_tree() -> Path | None:
    try:
        text = metadata.distribution("fedsilo").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return None
    if not text:
        return None
    url = json.loads(text).get("url", "")
    return Path(unquote(urlparse(url).path)) if url.startswith("file://") else None


def resolve_data_dir(configured: str | None) -> Path:
    """The folder holding the data sets; FileNotFoundError listing what was tried."""
    if configured:
        path = Path(configured).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"data_dir={configured!r} is not a directory")
        return path.resolve()
    candidates: list[tuple[str, Path]] = []
    if os.environ.get("FEDSILO_DATA_DIR"):
        candidates.append(("FEDSILO_DATA_DIR", Path(os.environ["FEDSILO_DATA_DIR"])))
    candidates.append(("source tree", Path(__file__).resolve().parents[2] / DATA_SUBDIR))
    tree = _installed_source_tree()
    if tree is not None:
        candidates.append(("installed fedsilo", tree / DATA_SUBDIR))
    for _, path in candidates:
        if has_data(path):
            return path.resolve()
    tried = ", ".join(f"{label}: {path}" for label, path in candidates)
    raise FileNotFoundError(f"fedsilo data not found; set data_dir=... (tried {tried})")


def default_output_dir(run_id: int) -> Path:
    """Where a run started without ``output-dir`` (e.g. plain ``flwr run .``) writes."""
    return Path.home() / ".fedsilo" / "runs" / f"run-{run_id}"
