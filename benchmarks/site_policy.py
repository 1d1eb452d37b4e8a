"""Issue #33's cost: the same jobs before and after the sites' own checks, side by side.

The site's guard (its policy, the run config read as data), the DP and Paillier bookkeeping and the
reply checks run on every message. This runs the default job, a secure-aggregation job and a Paillier
job (own tables, so the authenticated pooled metrics are exercised) with ``fedsilo`` in Flower's
simulation engine, from a checkout of the commit before the issue (``--before``, a git worktree) and
from this one, alternately, same seed; it compares their final numbers (equal where no behaviour
changed) and their seconds per round (``results.json``'s ``timing.round_seconds``, rounds 2 onward).
Writes ``benchmarks/results/site_policy.json`` and ``site_policy.md``. Run it with the machine to itself.

    python benchmarks/site_policy.py                  # 3 repetitions, before = ead2861
    python benchmarks/site_policy.py --repeats 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BEFORE = "ead2861"  # main before issue #33
HEART = ["task=tabular", "learner.name=torch", f"task.schema={REPO}/tasks/data/schemas/heart.yaml",
         f"task.data={REPO}/tasks/data/uci_heart_disease/sites", "partition=natural", "task.model=logreg"]


def jobs(keys: tuple[Path, Path]) -> dict[str, list[str]]:
    return {
        "default (finance, plain)": [],
        "secagg (finance)": ["aggregation=secagg"],
        "paillier (own tables, heart)": [*HEART, "num_rounds=5", "aggregation=paillier",
                                         f"aggregation.public_key={keys[1]}", f"aggregation.keypair={keys[0]}"],
    }


def run(tree: Path, overrides: list[str], out: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "app.cli.main", *overrides, "seed=0", "report=false",
                           f"hydra.run.dir={out}"], cwd=tree, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: {overrides}: {proc.stderr[-3000:]}")
    res = json.loads((out / "results.json").read_text())
    rounds = res["timing"]["round_seconds"][1:]
    return {"final": res["final"], "round_seconds": statistics.median(rounds), "wall": time.monotonic() - t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE, help="the commit to compare with (default: before issue #33)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from aggregation.paillier import keys as paillier_keys

    with tempfile.TemporaryDirectory(prefix="fedsilo-bench-") as tmp:
        work = Path(tmp)
        before = work / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=REPO, check=True,
                       capture_output=True)
        try:
            key_pair = paillier_keys.generate(work / "keys")
            trees = {"before": before, "after": REPO}
            out: dict[str, Any] = {"before": args.before, "after": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
                "repeats": args.repeats, "jobs": {}}
            for name, overrides in jobs(key_pair).items():
                runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
                for r in range(args.repeats):
                    for which, tree in trees.items():  # alternate, so drift in the machine hits both alike
                        safe = "".join(c if c.isalnum() else "_" for c in name)
                        runs[which].append(run(tree, overrides, work / f"{safe}-{which}-{r}"))
                b = statistics.median(x["round_seconds"] for x in runs["before"])
                a = statistics.median(x["round_seconds"] for x in runs["after"])
                same = runs["before"][0]["final"] == runs["after"][0]["final"]
                out["jobs"][name] = {"overrides": overrides, "round_seconds_before": b, "round_seconds_after": a,
                                     "ratio": a / b, "same_final_numbers": same,
                                     "final_before": runs["before"][0]["final"],
                                     "final_after": runs["after"][0]["final"],
                                     "runs": runs}
                print(f"{name:32s} before {b:7.3f} s/round  after {a:7.3f} s/round  ratio {a / b:5.2f}x  "
                      f"same final numbers: {same}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=REPO, capture_output=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "site_policy.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [f"# Issue #33's cost: before ({out['before']}) and after ({out['after']}), same seed, "
             f"median of {args.repeats}", "",
             "| job | s/round before | s/round after | after / before | same final numbers |", "|---|---|---|---|---|"]
    for name, j in out["jobs"].items():
        lines.append(f"| {name} | {j['round_seconds_before']:.3f} | {j['round_seconds_after']:.3f} | "
                     f"{j['ratio']:.2f}x | {'yes' if j['same_final_numbers'] else 'no'} |")
    (RESULTS / "site_policy.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
