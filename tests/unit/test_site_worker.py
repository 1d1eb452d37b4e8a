"""The pieces that make a deployed round fast (issue #19): the SuperNode's idle wait, Flower's
object-pull backoff, and the worker's check that a run's FAB is the installed fedsilo."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest

from app.runtime import site_worker, supernode
from app.support import flower_tuning

REPO = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 6))


def test_idle_wait_starts_short_after_a_message_and_backs_off_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(supernode, "_time", clock)
    t = supernode._CappedSleep(cap=1.0)
    t.sleep(0.5)  # Flower waiting for the ClientApp's reply: a message is being handled
    for _ in range(20):
        t.sleep(3)  # Flower's idle wait after an empty pull
    t.sleep(0.5)
    t.sleep(3)
    assert clock.slept[0] == supernode.FIRST_IDLE
    idle = clock.slept[1:21]
    assert idle[0] == supernode.FIRST_IDLE and idle[1] == pytest.approx(supernode.FIRST_IDLE * supernode.BACKOFF)
    assert all(b >= a for a, b in zip(idle, idle[1:])) and max(idle) == 1.0 and idle[-1] == 1.0
    assert clock.slept[21:] == [supernode.FIRST_IDLE, supernode.FIRST_IDLE]  # reset by the next message
    monkeypatch.undo()
    import time

    assert supernode._CappedSleep(1.0).monotonic is time.monotonic  # the rest of the time module is the real one


def test_poll_interval_is_validated_with_the_variable_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(supernode.POLL_ENV, "0.5")
    assert supernode.poll_interval() == 0.5
    for bad in ("fast", "0", "10"):
        monkeypatch.setenv(supernode.POLL_ENV, bad)
        with pytest.raises(SystemExit, match=f"{supernode.POLL_ENV}='{bad}': must be a number of seconds"):
            supernode.poll_interval()


def test_flags_are_read_and_dropped_in_both_spellings() -> None:
    argv = ["--insecure", "--isolation", "subprocess", "--port=9100", "--node-config", "x=1"]
    assert supernode._flag(argv, "--port") == "9100" and supernode._flag(argv, "--isolation") == "subprocess"
    assert supernode._drop(argv, "--isolation") == ["--insecure", "--port=9100", "--node-config", "x=1"]
    assert supernode._drop(argv, "--port") == ["--insecure", "--isolation", "subprocess", "--node-config", "x=1"]


def test_object_pulls_retry_after_20_ms_and_keep_flowers_other_limits() -> None:
    from flwr.supercore.inflatable import inflatable_utils as iu

    fns = (iu.pull_objects, iu.pull_and_inflate_object_from_tree)
    before = [dict(f.__kwdefaults__ or {}) for f in fns]
    try:
        flower_tuning.fast_object_pulls()
        for f, old in zip(fns, before):
            now: dict[str, Any] = f.__kwdefaults__ or {}
            assert old["initial_backoff"] == 1 and now["initial_backoff"] == flower_tuning.FIRST_BACKOFF
            assert {k: v for k, v in now.items() if k != "initial_backoff"} == \
                {k: v for k, v in old.items() if k != "initial_backoff"}
    finally:
        for f, old in zip(fns, before):
            f.__kwdefaults__ = old


@pytest.mark.slow  # three FAB builds of the repository (about 4 s)
def test_the_worker_recognises_the_installed_fedsilo_fab_and_nothing_else(tmp_path: Path) -> None:
    """A run's FAB runs in the worker's process only when it is this checkout byte for byte:
    Flower's own FAB build of the repo gives the same hash; one changed line gives another."""
    from flwr.cli.build import build_fab_from_disk

    own = site_worker.own_fab_hash(REPO)
    assert own == hashlib.sha256(build_fab_from_disk(REPO)).hexdigest()
    copy = tmp_path / "fedsilo"
    fab_kinds = {".py", ".toml", ".md", ".yaml", ".json"}  # what a FAB may hold besides LICENSE; data are left behind

    def skip(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n in {".git", "outputs", "__pycache__"} or n.endswith(("_cache", ".egg-info"))
                or (Path(folder, n).is_file() and Path(n).suffix not in {*fab_kinds, ""})}  # LICENSE, .gitignore kept

    shutil.copytree(REPO, copy, ignore=skip)
    assert site_worker.own_fab_hash(copy) == own
    target = copy / "app" / "client_app.py"
    target.write_text(target.read_text() + "\n# a site's local edit\n")
    assert site_worker.own_fab_hash(copy) != own


def test_the_worker_loads_the_clientapp_the_pyproject_names() -> None:
    from app.client_app import app

    assert site_worker.load_client_app(REPO) is app


def test_deploy_local_takes_its_output_folder_from_hydra_run_dir_or_refuses(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """``fedsilo deploy local ... hydra.run.dir=DIR`` writes to DIR (as ``--out DIR``); Hydra settings
    that cannot apply, and two different folders, are refused with exit 2 and the reason."""
    from app.runtime import deploy

    out, rest = deploy.output_folder(None, ["task=medical", f"hydra.run.dir={tmp_path / 'run'}"])
    assert out == tmp_path / "run" and rest == ["task=medical"]
    assert deploy.output_folder(tmp_path, [f"hydra.run.dir={tmp_path}"])[0] == tmp_path
    assert deploy.output_folder(None, ["task=medical"])[0].parts[:2] == ("outputs", "deploy")
    assert deploy.main(["--sites", "2", "--out", str(tmp_path / "a"), f"hydra.run.dir={tmp_path / 'b'}"]) == 2
    assert "name different output folders" in capsys.readouterr().err
    assert deploy.main(["--sites", "2", "hydra.job.chdir=true", "task=medical"]) == 2
    assert "hydra.job.chdir=true: of Hydra's settings only hydra.run.dir" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
