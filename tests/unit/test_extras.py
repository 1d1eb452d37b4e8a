"""Optional extras are optional: without them the default job's code imports and runs, and an option
that needs one stops before anything starts (exit 2) with one line naming it and the install command.

Each check runs a fresh interpreter with ``tests/without_extras`` first on PYTHONPATH, which makes
every extra's modules absent (``phe``, ``gmpy2``, ``tensorboard``, ``mlflow``, ``tenseal``).
``.ci/wheel`` does the same with a real install of the built wheel and no extras.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core import extras

REPO = Path(__file__).resolve().parents[2]
BLOCKER = REPO / "tests" / "without_extras"

#: The only modules that may need an extra to import: the Paillier implementation and the vertical
#: model built on it. Every other module (the ServerApp, the ClientApp, every config schema, the
#: command) must import without any extra.
EXTRA_ONLY = {
    "aggregation.paillier.client", "aggregation.paillier.crypto", "aggregation.paillier.keys",
    "aggregation.paillier.server", "aggregation.paillier.site", "aggregation.paillier.split",
    "aggregation.paillier.strategy", "vertical.hetero_lr", "vertical.paillier_rows", "vertical.secureboost",
}

WALK = """
import importlib, json, pkgutil, sys
failed = {}
for pkg in ("core", "tasks", "aggregation", "privacy", "strategies", "vertical", "app"):
    for info in pkgutil.walk_packages(importlib.import_module(pkg).__path__, pkg + "."):
        if info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except ImportError as err:
            failed[info.name] = str(err)
print(json.dumps(failed))
"""


def run(args: list[str], cwd: Path = REPO, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BLOCKER), str(REPO)])}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_blocker_hides_every_extra() -> None:
    """The check below means something only if the extras really are absent under the blocker."""
    out = run([sys.executable, "-c", "from core import extras; import json; "
               "print(json.dumps({e: extras.missing(e) for e in extras.EXTRAS}))"])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {e: list(m) for e, m in extras.EXTRAS.items()}
    assert extras.missing("paillier") == []  # and the test environment itself has them


def test_only_the_paillier_implementation_needs_an_extra_to_import() -> None:
    out = run([sys.executable, "-c", WALK])
    assert out.returncode == 0, out.stderr[-2000:]
    failed = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(failed) == EXTRA_ONLY, f"modules that import an extra at import time: {sorted(set(failed) - EXTRA_ONLY)}"
    assert all(("phe" in why or "gmpy2" in why) for why in failed.values()), failed


def test_the_default_job_is_checked_without_extras() -> None:
    """What `fedsilo` does before Flower starts (compose, validate, preflight) needs no extra."""
    code = ("from app import config; from app.runtime.preflight import preflight; "
            "cfg = config.compose([]); config.validate(cfg); print(preflight(cfg))")
    out = run([sys.executable, "-c", code])
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize(("argv", "option", "extra"), [
    (["aggregation=paillier"], "aggregation=paillier", "paillier"),
    (["vertical=hetero_lr"], "vertical=hetero_lr", "paillier"),
    (["logger=mlflow"], "logger=mlflow", "mlflow"),
    (["logger=tensorboard"], "logger=tensorboard", "tensorboard"),
    (["keys", "paillier", "--out", "{tmp}/keys"], "fedsilo keys paillier", "paillier"),
    (["predict", "{tmp}", "{tmp}/rows.csv", "--keypair", "{tmp}/pair.json"], "fedsilo predict --keypair", "paillier"),
    (["deploy", "local", "--sites", "2", "aggregation=paillier"], "aggregation=paillier", "paillier"),
])
def test_an_option_whose_extra_is_missing_stops_with_one_line(argv: list[str], option: str, extra: str,
                                                               tmp_path: Path) -> None:
    args = [a.format(tmp=tmp_path) for a in argv]
    out = run([sys.executable, "-m", "app.cli", *args, f"hydra.run.dir={tmp_path}/run"]
              if "=" in args[0] else [sys.executable, "-m", "app.cli", *args], cwd=tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert option in lines[0] and f'pip install "fedsilo[{extra}]"' in lines[0], lines[0]
    assert not (tmp_path / "keys").exists() and not (tmp_path / "run" / "superlink.log").exists()


def test_a_site_without_the_extra_is_told_before_it_joins() -> None:
    """`fedsilo site` checks a Paillier site's setup: the missing extra is one of its reasons."""
    out = run([sys.executable, "-c", "from aggregation.paillier.option import Paillier; "
               "print(Paillier().site_check(None, {'paillier-keypair': '/nonexistent'}))"])
    assert out.returncode == 0, out.stderr
    assert "fedsilo[paillier]" in out.stdout and "aggregation=paillier" in out.stdout, out.stdout


def test_the_extras_named_here_are_pyprojects_extras() -> None:
    """core.extras and pyproject.toml say the same: each extra exists and installs what it names."""
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in extras.EXTRAS:
        assert extra in declared, extra
    assert {"paillier": ["phe", "gmpy2"]}["paillier"] == [d.split("=")[0].split(">")[0] for d in declared["paillier"]]
