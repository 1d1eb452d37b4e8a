"""Structure figures of issue #35, measured from the code (``python .ci/structure.py [--repo DIR]``).

Prints, for the checkout at ``--repo`` (default: this one):

* ``app_upward_imports``: imports inside ``app/`` that point up the layer order of ``app/``
  (the second import-linter contract of pyproject.toml: a module imports only from layers below its own);
* ``import_cycles``: strongly connected groups of modules (imports inside functions count);
* ``task_switches``: ``getattr(task...)`` / ``isinstance(..., <a concrete task or its site type>)`` in ``app/``;
* ``server_main_lines`` and ``longest_handler_lines``: lines of ``app/server_app.py::main`` and of the
  longest message handler of ``app/client_app.py``;
* with ``--calls``: calls of ``app.config.num_sites`` (and of the task class's own count, which lists a
  natural split's folder) per round of a 5-site run (``task=finance``, in process): the difference
  between a 3-round and a 1-round run, halved.

Run it on an older commit (``git worktree add /tmp/old <sha>``; ``--repo /tmp/old``) for the figures before.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import tomllib
from pathlib import Path

#: app/'s layers, top first, as pyproject.toml's contract names them (read from there when it has one).
SWITCH = re.compile(r"getattr\((task|task_cls|tasks\.get)\b|isinstance\([^)]*\b(TabularTask|ImagesTask|RawSite|SiteData|"
                    r"PooledTask|FederatedTask)\b")
HANDLERS = ("train", "query", "evaluate", "personal_query", "sum_query", "vocab_query", "vertical_query",
            "gather_query", "program_query")


def modules(root: Path, package: str) -> dict[str, Path]:
    out = {}
    for p in (root / package).rglob("*.py"):
        name = ".".join(p.relative_to(root).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of ``known`` that ``path`` imports (anywhere, not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] in (
                "app", "core", "tasks", "aggregation", "privacy", "strategies", "learners", "vertical"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in known:
                    out.add(full)
                elif node.module in known:
                    out.add(node.module)
    return out


def with_parents(module: str, deps: set[str], known: dict[str, Path]) -> set[str]:
    """Importing a.b.c from outside package a.b runs a/b/__init__ first: for cycles those edges are real
    (a module inside a.b importing its sibling does not: its package is imported already)."""
    out = set(deps)
    for m in deps:
        parts = m.split(".")
        for i in range(2, len(parts)):
            parent = ".".join(parts[:i])
            if parent in known and not module.startswith(parent + "."):
                out.add(parent)
    return out


def app_layers(root: Path) -> list[list[str]]:
    conf = tomllib.loads((root / "pyproject.toml").read_text()).get("tool", {}).get("importlinter", {})
    for c in conf.get("contracts", []):
        if c.get("type") == "layers" and all(x.strip().startswith("app.") for layer in c["layers"] for x in layer.split("|")):
            return [[x.strip() for x in layer.split("|")] for layer in c["layers"]]
    return []


def layer_of(module: str, layers: list[list[str]]) -> int | None:
    for i, layer in enumerate(layers):
        if any(module == m or module.startswith(m + ".") for m in layer):
            return i
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan (the graph is small: recursion is fine)
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def function_lines(path: Path, names: tuple[str, ...]) -> dict[str, int]:
    tree = ast.parse(path.read_text())
    return {n.name: n.end_lineno - n.lineno + 1 for n in tree.body  # type: ignore[operator]
            if isinstance(n, ast.FunctionDef) and n.name in names}


def measure(root: Path, layers: list[list[str]]) -> dict[str, object]:
    known: dict[str, Path] = {}
    for pkg in ("core", "tasks", "aggregation", "privacy", "strategies", "learners", "vertical", "app"):
        known.update(modules(root, pkg))
    graph = {m: imports(p, known) - {m} for m, p in known.items()}
    # a module importing a package runs its __init__: the edge to the package counts (a cycle through it is real)
    upward = []
    for m, deps in graph.items():
        if not m.startswith("app."):
            continue
        mine = layer_of(m, layers)
        for d in deps:
            theirs = layer_of(d, layers)
            if mine is not None and theirs is not None and theirs < mine:
                upward.append(f"{m} -> {d}")
    switches = [f"{p.relative_to(root)}:{i}" for m, p in known.items() if m.startswith("app")
                for i, line in enumerate(p.read_text().splitlines(), 1) if SWITCH.search(line)]
    handlers = function_lines(root / "app" / "client_app.py", HANDLERS)
    found = cycles({m: with_parents(m, d, known) - {m} for m, d in graph.items()})
    return {"app_upward_imports": len(upward), "upward": sorted(upward), "import_cycles": len(found),
            "cycles": found, "task_switches": len(switches), "switches": switches,
            "server_main_lines": function_lines(root / "app" / "server_app.py", ("main",)).get("main"),
            "longest_handler_lines": max(handlers.values()) if handlers else None, "handlers": handlers}


CALLS = """
import sys, tempfile
from pathlib import Path
from app import config
import tasks
from app.runtime.local_grid import run_inprocess
counts = {"config.num_sites": 0, "task.num_sites": 0}
real, task_cls = config.num_sites, tasks.get("finance")
real_task = task_cls.num_sites.__func__
def counted(cfg):
    counts["config.num_sites"] += 1
    return real(cfg)
def counted_task(cls, *a, **k):
    counts["task.num_sites"] += 1
    return real_task(cls, *a, **k)
config.num_sites = counted
task_cls.num_sites = classmethod(counted_task)
with tempfile.TemporaryDirectory() as d:
    run_inprocess(["task=finance", "num_sites=5", f"num_rounds={sys.argv[1]}", "report=false", "checkpoint=false",
                   f"seed={sys.argv[2]}"], Path(d))
print(counts["config.num_sites"], counts["task.num_sites"])
"""


def calls_per_round(root: Path) -> dict[str, float]:
    """Calls of the site count per round of a 5-site run (see the module docstring)."""
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(root)}
    got = []
    for rounds, seed in ((1, 11), (3, 11)):  # an unseen seed: the config is composed afresh in the process
        out = subprocess.run([sys.executable, "-c", CALLS, str(rounds), str(seed)], cwd=root, env=env, check=True,
                             capture_output=True, text=True).stdout.split()
        got.append((int(out[-2]), int(out[-1])))
    return {"num_sites_calls_per_round": (got[1][0] - got[0][0]) / 2,
            "task_count_calls_per_round": (got[1][1] - got[0][1]) / 2,
            "num_sites_calls_1_round_run": got[0][0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--layers-from", default=str(Path(__file__).resolve().parents[1]),
                    help="the checkout whose app/ layer contract is applied (default: this one)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--calls", action="store_true", help="also run a 5-site job to count num_sites calls per round")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if app/ has an upward import, a cycle or a switch on a concrete task (.ci/checks)")
    args = ap.parse_args()
    out = measure(Path(args.repo), app_layers(Path(args.layers_from)))
    if args.calls:
        out.update(calls_per_round(Path(args.repo)))
    if args.json:
        print(json.dumps(out, indent=1))
        return
    for k, v in out.items():
        if not isinstance(v, (list, dict)):
            print(f"{k}: {v}")
    for k in ("upward", "cycles", "switches"):
        for item in out[k]:  # type: ignore[attr-defined]
            print(f"  {k}: {item}")
    if args.check and any(out[k] for k in ("app_upward_imports", "import_cycles", "task_switches")):
        sys.exit("structure: app/ must have no upward import, no import cycle and no switch on a concrete task")


if __name__ == "__main__":
    main()
