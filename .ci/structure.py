"""Structure figures of issue #35, measured from the code (``python .ci/structure.py [--repo DIR]``).

Prints, for the checkout at ``--repo`` (default: this one):

* ``app_upward_imports``: imports inside ``app/`` that point up the layer order of ``app/``
  (the second import-linter contract of pyproject.toml: a module imports only from layers below its own);
* ``import_cycles``: strongly connected groups of modules (imports inside functions count);
* ``task_switches``: ``getattr(task...)`` / ``isinstance(..., <a concrete task or its site type>)`` in ``app/``;
* ``server_main_lines`` and ``longest_handler_lines``: lines of ``app/server_app.py::main`` and of the
  longest message handler of ``app/client_app.py``.

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
            "gather_query")


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
                "app", "core", "tasks", "aggregation", "privacy", "strategies", "vertical"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in known:
                    out.add(full)
                elif node.module in known:
                    out.add(node.module)
    return out


def with_parents(deps: set[str], known: dict[str, Path]) -> set[str]:
    """Importing a.b.c runs a/b/__init__ first: for cycles those edges are real."""
    out = set(deps)
    for m in deps:
        parts = m.split(".")
        out.update(".".join(parts[:i]) for i in range(2, len(parts)) if ".".join(parts[:i]) in known)
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
    for pkg in ("core", "tasks", "aggregation", "privacy", "strategies", "vertical", "app"):
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
    found = cycles({m: with_parents(d, known) - {m} for m, d in graph.items()})
    return {"app_upward_imports": len(upward), "upward": sorted(upward), "import_cycles": len(found),
            "cycles": found, "task_switches": len(switches), "switches": switches,
            "server_main_lines": function_lines(root / "app" / "server_app.py", ("main",)).get("main"),
            "longest_handler_lines": max(handlers.values()) if handlers else None, "handlers": handlers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--layers-from", default=str(Path(__file__).resolve().parents[1]),
                    help="the checkout whose app/ layer contract is applied (default: this one)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = measure(Path(args.repo), app_layers(Path(args.layers_from)))
    if args.json:
        print(json.dumps(out, indent=1))
        return
    for k, v in out.items():
        if not isinstance(v, (list, dict)):
            print(f"{k}: {v}")
    for k in ("upward", "cycles", "switches"):
        for item in out[k]:  # type: ignore[attr-defined]
            print(f"  {k}: {item}")


if __name__ == "__main__":
    main()
