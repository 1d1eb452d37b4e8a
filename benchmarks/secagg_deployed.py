"""Issue #34's deployed figure: a secure round on 3 TLS-authenticated sites, before and after the key schedule.

``fedsilo deploy local --sites 3 task=medical aggregation=secagg num_rounds=5`` (TLS, SuperNode
authentication, the site worker; after #34 also each site's identity key and the roster), from a
checkout of the commit before the issue (``--before``, a git worktree: its ServerApp, SuperNodes and
site workers all import that tree) and from this one, alternately. Seconds per round are
``results.json``'s ``timing.round_seconds``, rounds 2 onward (round 1 includes the key stage and
the workers' start-up); the final AUC of both must agree (the sums are exact either way).
Writes ``benchmarks/results/secagg_deployed.{json,md}``. Run it with the machine to itself.

    python benchmarks/secagg_deployed.py                 # 3 repetitions, before = c3de65b
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BEFORE = "c3de65b"  # main before issue #34
ARGS = ["--sites", "3", "task=medical", "aggregation=secagg", "num_rounds=5", "strategy.fraction_evaluate=0"]


def run(tree: Path, out: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_DISABLE_UPDATE_CHECK": "1"}
    proc = subprocess.run([sys.executable, "-m", "app.cli.main", "deploy", "local", "--out", str(out), *ARGS],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    found = list(out.rglob("results.json"))
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"{tree}: exit {proc.returncode}: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    res = json.loads(found[0].read_text())
    rounds = res["timing"]["round_seconds"]
    return {"round_seconds": rounds, "later_mean": statistics.mean(rounds[1:]), "auc": res["final"]["auc"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    after = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="fedsilo-bench-") as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=REPO, check=True,
                       capture_output=True)
        try:
            runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
            for r in range(args.repeats):
                for which, tree in (("before", before), ("after", REPO)):  # alternate: drift hits both alike
                    runs[which].append(run(tree, Path(tmp) / f"{which}-{r}"))
                    print(f"{which} {r + 1}: {runs[which][-1]['later_mean']:.2f} s/round "
                          f"(rounds {[round(s, 2) for s in runs[which][-1]['round_seconds']]}), "
                          f"AUC {runs[which][-1]['auc']:.4f}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=REPO, capture_output=True)
    b = statistics.median(x["later_mean"] for x in runs["before"])
    a = statistics.median(x["later_mean"] for x in runs["after"])
    ratios = [y["later_mean"] / x["later_mean"] for x, y in zip(runs["before"], runs["after"], strict=True)]
    aucs = {x["auc"] for x in runs["before"] + runs["after"]}
    payload = {"command": " ".join(["python benchmarks/secagg_deployed.py", *(argv or sys.argv[1:])]),
               "before": args.before, "after": after, "args": ARGS, "runs": runs, "before_s": b, "after_s": a,
               "ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
               "auc_spread": max(aucs) - min(aucs)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "secagg_deployed.json").write_text(json.dumps(payload, indent=1) + "\n")
    text = (f"Produced by `{payload['command']}`: `fedsilo deploy local {' '.join(ARGS)}` (TLS, authenticated "
            f"SuperNodes, site worker), {args.repeats} alternating repetitions per commit; seconds per round = mean "
            "of rounds 2-5 of each run, median over the repetitions.\n\n"
            "| commit | s/round (rounds 2-5) | after / before [range] |\n|---|---|---|\n"
            f"| {args.before} (per-round key agreement, before #34) | {b:.2f} | |\n"
            f"| {after} (signed per-job keys, ratchet) | {a:.2f} | **{payload['ratio']:.2f}** "
            f"[{min(ratios):.2f}-{max(ratios):.2f}] |\n\n"
            f"Final AUC of all {2 * args.repeats} runs within {payload['auc_spread']:.1e} of each other.\n")
    (RESULTS / "secagg_deployed.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
