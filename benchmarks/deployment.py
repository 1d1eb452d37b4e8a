"""Deployment figures of issue #7, on this machine: real SuperLink and SuperNode processes.

    python benchmarks/deployment.py     # writes benchmarks/results/deployment.{json,md}

1. ``fedsilo deploy local --sites 3 task=medical aggregation=secagg num_rounds=3`` (TLS,
   SuperNode authentication, each site its own data file): end-to-end seconds, seconds per
   round, final AUC, beside the in-process simulation of the same overrides.
2. One of 4 SuperNodes (medical, 4 hospitals, 3 rounds, no federated evaluation) leaves
   after round 1: stopped gracefully (SIGTERM) and killed (SIGKILL). Whether the run
   completes, replies per round, the round in flight's seconds, and what the log says.

Do not run it beside the test suite: the end-to-end tests count any fedsilo Flower
process as a leak.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "benchmarks" / "results"
FIGURE = ["task=medical", "aggregation=secagg", "num_rounds=3"]


def figure_run(tmp: Path) -> dict[str, Any]:
    from app.runtime import deploy
    from app.runtime.local_grid import run_inprocess

    outcome, results = deploy.run(FIGURE, 3, tmp / "deploy", stream=False)
    assert results is not None, outcome
    simulated = run_inprocess([*FIGURE, "num_sites=3", "partition.natural_sites=3"], tmp / "sim")
    return {"command": "fedsilo deploy local --sites 3 " + " ".join(FIGURE), "status": outcome.status,
            "seconds": results["deployment"]["seconds"], "round_seconds": results["timing"]["round_seconds"],
            "tls": results["deployment"]["tls"], "supernode_auth": results["deployment"]["supernode_auth"],
            "auc": results["final"]["auc"], "simulated_auc": simulated["final"]["auc"],
            "auc_difference": abs(results["final"]["auc"] - simulated["final"]["auc"])}


def leave_run(tmp: Path, sig: signal.Signals) -> dict[str, Any]:
    from app import config
    from app.runtime import deploy
    from app.runtime.paths import resolve_data_dir

    overrides, _ = deploy.site_overrides(["task=medical", "num_rounds=3", "strategy.fraction_evaluate=0"], 4)
    dep = deploy.prepare(tmp, overrides, 4)
    run_config = {"overrides": config.run_overrides(overrides, resolve_data_dir(None)), "output-dir": str(tmp)}
    link = deploy.start(dep, tmp)
    try:
        t0 = time.monotonic()
        run_id = link.submit(REPO, run_config, {})
        if not link.wait_for_log(run_id, "fedsilo round 1/3", 300):
            raise RuntimeError("round 1 never finished")
        t_leave = time.monotonic()
        link.supernodes[3].send_signal(sig)
        outcome = link.follow(run_id, timeout=900, stream=False, poll=2.0)
        log = link.logs(run_id)
    finally:
        link.stop()
    res = json.loads((tmp / "results.json").read_text())
    said = [line.split(":", 1)[-1].strip() for line in log.splitlines()
            if ("left the federation" in line or "rejected reply" in line) and "\x1b" in line]
    return {"signal": sig.name, "status": outcome.status, "seconds": time.monotonic() - t0,
            "seconds_after_leaving": time.monotonic() - t_leave,
            "round_seconds": res["timing"]["round_seconds"],
            "replied_per_round": [h["participation"]["train"].get("replied") for h in res["history"]],
            "left": [e for h in res["history"] for e in h["participation"].get("left", [])],
            "rejected": [r for h in res["history"] for r in h["participation"]["train"].get("rejected", [])],
            "log": said}


def markdown(r: dict[str, Any]) -> str:
    f = r["figure"]
    lines = ["# Deployment benchmark", "", "Command: `python benchmarks/deployment.py`", "",
             f"## `{f['command']}`", "",
             f"- status {f['status']}, TLS {f['tls']}, SuperNode authentication {f['supernode_auth']}",
             f"- end to end {f['seconds']:.1f} s; rounds " + " / ".join(f"{s:.1f}" for s in f["round_seconds"]) + " s",
             f"- final AUC {f['auc']:.6f}; in-process simulation of the same overrides {f['simulated_auc']:.6f} "
             f"(difference {f['auc_difference']:.2e})", "",
             "## One of 4 SuperNodes leaves after round 1 (medical, 3 rounds)", "",
             "| signal | status | replies per round | round seconds | after leaving | log |", "|---|---|---|---|---|---|"]
    for k in r["leaving"]:
        lines.append(f"| {k['signal']} | {k['status']} | {k['replied_per_round']} | "
                     + " / ".join(f"{s:.1f}" for s in k["round_seconds"])
                     + f" | {k['seconds_after_leaving']:.1f} s | {'; '.join(k['log'])[:300]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import logging

    logging.getLogger("flwr").setLevel(logging.ERROR)
    result: dict[str, Any] = {"command": "python benchmarks/deployment.py"}
    with tempfile.TemporaryDirectory() as tmp:
        result["figure"] = figure_run(Path(tmp) / "figure")
        print(json.dumps(result["figure"], indent=1), flush=True)
        result["leaving"] = []
        for sig in (signal.SIGTERM, signal.SIGKILL):
            result["leaving"].append(leave_run(Path(tmp) / sig.name, sig))
            print(json.dumps(result["leaving"][-1], indent=1), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "deployment.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / "deployment.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
