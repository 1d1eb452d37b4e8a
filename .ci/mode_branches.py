"""Count the places that branch on the aggregation or privacy option outside that option's own package.

A *branch on a mode* is an ``if``/``elif``/``while``/conditional expression/``assert``/
comprehension filter/``match`` whose test mentions an option by name: an ``isinstance``
check against an option's config class (``SecAggConfig``, ``PaillierConfig``,
``DPSGDConfig``, ``CentralDPConfig``), a comparison with ``.aggregation.name`` or
``.privacy.name`` or with an option's name as a string, a strategy flag (``.secure``,
``.encrypted``), or a wire-format sniff (``"ct" in ...``, ``is_encrypted(...)``).

Files inside an option's own package (where the option is defined) are not counted; the
composition root is reported apart. Usage: ``python .ci/mode_branches.py [--list] [ROOT]``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

OPTION_CLASSES = {"SecAggConfig", "PaillierConfig", "DPSGDConfig", "CentralDPConfig", "PlainConfig", "NoPrivacyConfig"}
OPTION_NAMES = {"plain", "secagg", "paillier", "dpsgd", "central"}
FLAGS = {"secure", "encrypted"}
#: Record keys that only one option writes: testing for them is a branch on that option.
OPTION_RECORDS = {"privacy", "privacy_central", "secagg", "ct"}
#: Option packages (old and new layouts): a branch inside is the option's own business.
OWN = ("strategies/secagg/", "strategies/paillier/", "aggregation/", "privacy/dpsgd", "privacy/central")
#: app/site_guard.py is the site's side of app/config.py's rules between axes: a site's policy lists the
#: options it allows per axis, so its check names the chosen option of each axis (no behaviour branches on one).
COMPOSITION_ROOT = ("app/config.py", "app/composition.py", "app/site_guard.py")
PACKAGES = ("app", "strategies", "privacy", "tasks", "aggregation", "core", "learners", "vertical")


def _mentions_mode(test: ast.AST) -> bool:
    for node in ast.walk(test):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "isinstance" and len(node.args) == 2:
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                names |= {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
                if names & OPTION_CLASSES:
                    return True
            if node.func.id == "is_encrypted":
                return True
        if isinstance(node, ast.Attribute) and node.attr in FLAGS:
            return True
        if isinstance(node, ast.Name) and node.id == "encrypted":  # a local flag copied from a strategy
            return True
        if isinstance(node, ast.Attribute) and node.attr == "name" and isinstance(node.value, ast.Attribute) \
                and node.value.attr in ("aggregation", "privacy"):
            return True
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            consts = [c.value for c in sides if isinstance(c, ast.Constant)]
            consts += [e.value for c in sides if isinstance(c, (ast.Tuple, ast.List, ast.Set))
                       for e in c.elts if isinstance(e, ast.Constant)]
            if any(isinstance(c, str) and c in OPTION_NAMES for c in consts):
                return True
            if any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops) and isinstance(node.left, ast.Constant) \
                    and node.left.value in OPTION_RECORDS:
                return True
    return False


def branches(path: Path) -> list[int]:
    """Line numbers of the mode branches in one file."""
    tree = ast.parse(path.read_text(), str(path))
    lines = []
    for node in ast.walk(tree):
        tests: list[ast.AST] = []
        if isinstance(node, (ast.If, ast.While, ast.IfExp, ast.Assert)):
            tests = [node.test]
        elif isinstance(node, ast.comprehension):
            tests = list(node.ifs)
        elif isinstance(node, ast.Match):
            tests = [node.subject]
        elif isinstance(node, ast.BoolOp):
            continue
        if any(_mentions_mode(t) for t in tests):
            lines.append(node.lineno)
    return sorted(set(lines))


def main(argv: list[str]) -> int:
    show = "--list" in argv
    args = [a for a in argv if not a.startswith("--")]
    root = Path(args[0]) if args else Path(__file__).resolve().parents[1]
    outside: dict[str, list[int]] = {}
    rooted: dict[str, list[int]] = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")) if (root / pkg).is_dir() else []:
            rel = path.relative_to(root).as_posix()
            if rel.startswith(OWN):
                continue
            found = branches(path)
            if found:
                (rooted if rel in COMPOSITION_ROOT else outside)[rel] = found
    total_out = sum(len(v) for v in outside.values())
    total_root = sum(len(v) for v in rooted.values())
    for _title, group in (("outside the composition root", outside), ("in the composition root", rooted)):
        for rel, found in group.items():
            print(f"{rel}: {len(found)}" + (f"  (lines {', '.join(map(str, found))})" if show else ""))
    print(f"mode branches outside the options' own packages: {total_out + total_root} "
          f"({total_root} in the composition root, {total_out} elsewhere)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
