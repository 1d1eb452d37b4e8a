"""Docs that cannot drift silently.

- Every repository path written in ``README.md``, ``docs/*.md`` and ``CONTRIBUTING.md`` (in backticks
  or as a link) exists.
- Every ``fedsilo ...`` command line they show parses: a job's overrides compose and validate against
  the typed config, a sub-command exists and answers ``--help``.
- Every figure the README quotes stands on a line that names a results file under
  ``benchmarks/results/``, and that file holds the number.
- The version is one: ``pyproject.toml``'s, the newest release of ``CHANGELOG.md``; a deprecation names a
  version the changelog plans and has not released.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import tomllib
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
TOP = {p.name for p in REPO.iterdir() if not p.name.startswith(".git")} | {".ci"}
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def prose(text: str) -> str:
    """The text without its fenced code blocks."""
    return FENCE.sub("", text)


def candidates(doc: Path) -> list[tuple[str, Path]]:
    """(as written, resolved path) for every backticked or linked repository path in ``doc``."""
    text = prose(doc.read_text())
    found: list[tuple[str, Path]] = []
    for raw in re.findall(r"`([^`\n]+)`", text):
        token = raw.strip()
        if " " in token or "=" in token or "<" in token or "$" in token or "{" in token or token.startswith(("-", "~", "/")):
            continue
        if any(re.fullmatch(r"[A-Z][A-Z_]+(\.\w+)?", part) for part in token.split("/")[1:]):
            continue  # a placeholder: conf/task/NAME.yaml
        token = re.split(r"::|:(?=[A-Za-z_])", token)[0]  # file.py::test, file.py:function
        first = token.split("/")[0]
        if first in TOP and (("/" in token) or first == token and "." in token):
            found.append((raw, REPO / token))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        found.append((target, (doc.parent / target.split("#")[0]).resolve()))
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_path_in_the_docs_exists(doc: Path) -> None:
    written = candidates(doc)
    missing = [raw for raw, path in written if not (list(REPO.glob(str(path.relative_to(REPO))))
                                                    if "*" in str(path) else path.exists())]
    assert not missing, f"{doc.relative_to(REPO)} names paths that do not exist: {missing}"


def test_the_path_check_finds_paths_and_misses() -> None:
    """The check above sees backticked paths, links and file::function forms, and a wrong one fails."""
    sample = REPO / "docs" / "_probe.md"
    text = ("`app/config.py` [x](architecture.md) `tests/unit/test_docs.py::test_x` `app/nope.py` "
            "[y](nope.md) `results.json` `fedsilo task=medical`\n")
    try:
        sample.write_text(text)
        got = {raw: path.exists() for raw, path in candidates(sample)}
    finally:
        sample.unlink()
    assert got == {"app/config.py": True, "architecture.md": True, "tests/unit/test_docs.py::test_x": True,
                   "app/nope.py": False, "nope.md": False}


def commands(doc: Path) -> list[str]:
    """Every ``fedsilo ...`` line of the doc's code blocks, continuations joined, comments dropped."""
    out = []
    for block in FENCE.findall(doc.read_text()):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.strip().removeprefix("$ ")
            if (line.startswith("fedsilo ") or line == "fedsilo") and " | " not in line:  # not a log line
                for part in line.split("&&"):
                    part = part.strip()
                    if part.startswith("fedsilo"):
                        out.append(part.split("  #")[0].split(" # ")[0].strip())
    return out


ALL_COMMANDS = sorted({(str(d.relative_to(REPO)), c) for d in DOCS for c in commands(d)})


def test_the_docs_show_commands() -> None:
    assert len(ALL_COMMANDS) >= 30, ALL_COMMANDS


@pytest.mark.parametrize(("doc", "line"), ALL_COMMANDS)
def test_every_fedsilo_command_in_the_docs_parses(doc: str, line: str) -> None:
    check_command(line)


def check_command(line: str) -> None:
    import importlib

    from app import config
    from app.cli.main import COMMANDS

    args = shlex.split(line)[1:]
    if args[:2] == ["deploy", "local"]:
        args = [a for a in args[2:] if "=" in a]  # the job's overrides; deploy's own flags are --sites, --insecure
    elif args and args[0] in COMMANDS:
        module, function = COMMANDS[args[0]]
        main = getattr(importlib.import_module(module), function)
        words = [a for a in args[1:3] if re.fullmatch(r"[a-z]+", a)]  # nested sub-commands: keys paillier, data schema infer
        for depth in range(len(words), -1, -1):
            with contextlib.redirect_stdout(io.StringIO()) as shown, contextlib.redirect_stderr(io.StringIO()):
                try:
                    main([*words[:depth], "--help"])
                except SystemExit as stop:
                    if stop.code == 0:
                        break
        else:
            pytest.fail(f"`{line}`: `fedsilo {' '.join(args[:1])} --help` fails")
        usage = shown.getvalue()
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", " ".join(args[1:])):
            assert re.search(rf"{flag}(?![\w-])", usage), \
                f"`{line}`: {flag} is not an option of `fedsilo {' '.join(words[:depth])}`"
        args = [a for a in args[1:] if re.fullmatch(r"[a-z_.+]+=[^=]*", a) and not a.startswith("--")]
        if line.split()[1] == "stats":  # a job whose learner is table1
            args = ["learner.name=table1", *args]
    elif args[:1] in (["--version"], ["--help"], ["--cfg"]):
        return
    overrides = [a for a in args if a not in ("--multirun", "-m") and not a.startswith(("hydra.", "+simulation."))]
    overrides = [re.sub(r"=([^,\[]*),.*", r"=\1", o) for o in overrides]  # a sweep: its first value
    assert all("=" in o for o in overrides), f"`{line}`: not Hydra overrides: {overrides}"
    try:
        config.validate(config.compose(overrides))
    except Exception as err:  # noqa: BLE001 - any failure is the message
        pytest.fail(f"`{line}` does not parse: {type(err).__name__}: {err}")


@pytest.mark.parametrize("line", ["fedsilo task=medcal", "fedsilo num_rounds=ten", "fedsilo keys rsa --out k",
                                  "fedsilo predict RUN rows.csv --key k", "fedsilo task.learning_rate=0.1"])
def test_a_broken_command_is_caught(line: str) -> None:
    with pytest.raises(BaseException):  # noqa: B017 - pytest.fail raises its own Failed
        check_command(line)


# ---- figures ------------------------------------------------------------------------------------

RESULTS = re.compile(r"`(benchmarks/results/[\w./-]+)`")
NUMBER = re.compile(r"(?<![\w.])(\d+\.\d+)(?![\w.]*\d)")
NOT_FIGURES = re.compile(r"(GPL|LGPL|Apache)-\d\.\d|Python 3\.1\d|3\.11|3\.12|Flower(\]\([^)]*\))? \d\.\d+"
                         r"|\d+\.\d+\.\d+|torch==\S+|1\.1\]")


def figures(text: str) -> list[tuple[str, list[str], list[str]]]:
    """(line, its decimal numbers, the results files it names) for each prose line with a figure."""
    out = []
    for line in prose(text).splitlines():
        clean = NOT_FIGURES.sub("", RESULTS.sub("", line))
        nums = NUMBER.findall(clean)
        if nums:
            out.append((line, nums, RESULTS.findall(line)))
    return out


def holds(content: str, number: str) -> bool:
    if re.search(rf"(?<![\d.]){re.escape(number)}", content):
        return True
    places = Decimal(number).as_tuple().exponent
    for raw in re.findall(r"-?\d+\.\d+(?:[eE]-?\d+)?", content):
        value = Decimal(raw)
        if any(value.quantize(Decimal(1).scaleb(places), rounding=r) == Decimal(number)
               for r in (ROUND_HALF_UP, ROUND_HALF_EVEN)):
            return True
    return False


def check_figures(text: str) -> list[str]:
    problems = []
    for line, nums, files in figures(text):
        if not files:
            problems.append(f"figures {nums} name no results file: {line[:120]}")
            continue
        contents = "".join((REPO / f).read_text() for f in files if (REPO / f).is_file())
        problems += [f"{n} is not in {files}: {line[:120]}" for n in nums if not holds(contents, n)]
    return problems


def test_every_readme_figure_is_in_the_results_file_it_names() -> None:
    text = (REPO / "README.md").read_text()
    assert len(figures(text)) >= 5
    assert check_figures(text) == []


def test_the_figure_check_catches_a_wrong_or_unsourced_figure() -> None:
    good = "| DP | 1.18x a plain epoch (`benchmarks/results/dp.md`) |"
    assert check_figures(good) == []
    assert check_figures(good.replace("1.18x", "1.87x"))  # a number the file does not hold
    assert check_figures("secure aggregation at 1.51x plain at 50 sites")  # no results file named


# ---- version --------------------------------------------------------------------------------------

def test_one_version_pyproject_changelog_and_command() -> None:
    from app import version

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    changelog = (REPO / "CHANGELOG.md").read_text()
    released = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - (\d{4}-\d\d-\d\d)$", changelog, re.M)
    assert released and released[0][0] == declared, (declared, released[:2])
    versions = [tuple(int(x) for x in v.split(".")) for v, _ in released]
    assert versions == sorted(versions, reverse=True)  # newest first
    assert [d for _, d in released] == sorted((d for _, d in released), reverse=True)
    assert version() == declared
    assert "in progress" not in changelog and "in progress" not in (REPO / "README.md").read_text()


def test_deprecations_name_a_planned_version() -> None:
    """A deprecation's removal version is after the current one and planned in the changelog."""
    declared = tuple(int(x) for x in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"].split("."))
    unreleased = (REPO / "CHANGELOG.md").read_text().split("## [Unreleased]")[1].split("\n## [")[0]
    seen = 0
    for path in REPO.glob("*/**/*.py"):
        if "tests" in path.parts or "benchmarks" in path.parts:
            continue
        for match in re.finditer(r"removed in fedsilo (\d+\.\d+(?:\.\d+)?)", path.read_text()):
            seen += 1
            removal = tuple(int(x) for x in match.group(1).split("."))
            assert removal > declared, f"{path.relative_to(REPO)}: removal in {match.group(1)} is not in the future"
            assert f"Planned for {match.group(1)}" in unreleased, f"{match.group(1)} is not planned in CHANGELOG.md"
    assert seen >= 1
