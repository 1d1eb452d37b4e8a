"""Deployment figures on this machine: real SuperLink and SuperNode processes, TLS, authentication.

    python benchmarks/deployment.py                 # all parts; writes benchmarks/results/deployment.{json,md}
    python benchmarks/deployment.py --part rounds   # issue #19's round times only (deployment_rounds.{json,md})
    python benchmarks/deployment.py --part figure   # parts 2 and 3 only (deployment.{json,md}, without part 1)

1. **rounds** (issue #19): seconds per deployed round (rounds 2 and later) of ``task=medical``
   on 3 sites with TLS and SuperNode authentication, for ``aggregation=secagg``, plain and
   ``privacy=dpsgd``, three ways in one run of this script:
   - fedsilo with its site worker (:mod:`app.runtime.supernode` ``--worker``, the default);
   - fedsilo on Flower's stock ``flower-supernode`` (a new ClientApp process per message);
   - a plain Flower app of the same size on the stock SuperNode: Flower's quickstart-style FedAvg
     (``benchmarks/flower_baseline/baseline_app.py``, 13 features, 3 sites) and Flower's own
     SecAgg+ (``secaggplus_app.py``, on fedsilo's medical sites).
   Ratios are the Flower figure (and the stock-SuperNode figure) over fedsilo's.
2. **figure**: ``fedsilo deploy local --sites 3 task=medical aggregation=secagg num_rounds=3``,
   end to end, beside the in-process simulation of the same overrides (same AUC).
3. **leaving**: one of 4 SuperNodes leaves after round 1, gracefully (SIGTERM) and killed.

Do not run it beside the test suite: the end-to-end tests count any fedsilo Flower
process as a leak, and the timings need the machine to themselves.
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


ROUND_CASES = {
    "secagg": ["task=medical", "aggregation=secagg"],
    "plain": ["task=medical"],
    "dpsgd": ["task=medical", "privacy=dpsgd"],
}
ROUNDS = 4


def fedsilo_rounds(tmp: Path, overrides: list[str], worker: bool) -> dict[str, Any]:
    from app.runtime import deploy

    outcome, results = deploy.run([*overrides, f"num_rounds={ROUNDS}"], 3, tmp, stream=False, worker=worker)
    assert results is not None and outcome.ok, outcome
    later = results["timing"]["round_seconds"][1:]
    return {"round_seconds": results["timing"]["round_seconds"], "later_mean": sum(later) / len(later),
            "auc": results["final"]["auc"], "seconds": results["deployment"]["seconds"]}


def flower_app_dir(tmp: Path, kind: str) -> Path:
    """A FAB folder for one of the plain Flower apps (``benchmarks/flower_baseline``)."""
    import shutil

    app = tmp / f"flower-{kind}"
    app.mkdir(parents=True)
    base = REPO / "benchmarks" / "flower_baseline"
    shutil.copy(base / "baseline_app.py", app)
    toml = (base / "pyproject.toml").read_text()
    if kind == "secagg":
        shutil.copy(base / "secaggplus_app.py", app)
        (app / "timed_secagg.py").write_text(
            "import json\nfrom pathlib import Path\nimport secaggplus_app as s\n"
            "client = s.client\nserver = s.server\n_main = s.main\n\n"
            "@server.main()\ndef main(grid, context):\n    _main(grid, context)\n"
            "    stamps = s.STAMPS\n    Path(str(context.run_config['timing-file'])).write_text("
            "json.dumps([b - a for a, b in zip(stamps, stamps[1:])]))\n")
        toml = toml.replace('serverapp = "baseline_app:server"', 'serverapp = "timed_secagg:server"')
        toml = toml.replace('clientapp = "baseline_app:client"', 'clientapp = "timed_secagg:client"')
        toml = toml.replace("[tool.flwr.app.config]", '[tool.flwr.app.config]\noverrides = ""')
    toml = toml.replace('name = "flower-baseline"', f'name = "flower-{kind}"')
    (app / "pyproject.toml").write_text(toml)
    return app


def flower_rounds(tmp: Path, kind: str) -> dict[str, Any]:
    """A plain Flower app on 3 stock SuperNodes (TLS, authentication): seconds per round."""
    from app.runtime import pki
    from app.runtime.superlink import LocalSuperLink
    from app.support.paths import resolve_data_dir

    app = flower_app_dir(tmp, kind)
    certs = pki.make_certificates(tmp / "pki", hosts=["localhost"], ips=["127.0.0.1"])
    keys = pki.make_supernode_keys(tmp / "pki" / "supernodes", 3)
    timing = tmp / f"{kind}-timing.json"
    run_config: dict[str, Any]
    if kind == "secagg":
        run_config = {"overrides": f"task=medical num_sites=3 partition.natural_sites=3 num_rounds={ROUNDS} "
                                   f"data_dir={resolve_data_dir(None)}", "timing-file": str(timing)}
    else:  # the heart task's size: 13 features, about 200 rows a site, 3 sites
        run_config = {"num-server-rounds": ROUNDS, "num-sites": 3, "rows-per-site": 200, "val-rows": 50,
                      "test-rows": 180, "features": 13, "timing-file": str(timing)}
    link = LocalSuperLink(tmp / "superlink.log", simulation=False, certs=certs, supernode_auth=True)
    link.start()
    try:
        for _, public in keys:
            link.register(public)
        link.add_supernodes([f"partition-id={i} num-partitions=3" for i in range(3)], [k for k, _ in keys],
                            worker=False)
        t0 = time.monotonic()
        outcome = link.follow(link.submit(app, run_config, {}), timeout=1800, stream=False, poll=1.0)
    finally:
        link.stop()
    assert outcome.ok, outcome
    rounds = json.loads(timing.read_text())
    later = rounds[1:]
    return {"round_seconds": rounds, "later_mean": sum(later) / len(later), "seconds": time.monotonic() - t0}


def rounds_part(tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"rounds": ROUNDS, "sites": 3, "cases": {}}
    flower = {"secagg": flower_rounds(tmp / "flower-secagg", "secagg"),
              "plain": flower_rounds(tmp / "flower-plain", "plain")}
    out["flower"] = flower
    for name, overrides in ROUND_CASES.items():
        fast = fedsilo_rounds(tmp / f"{name}-worker", overrides, worker=True)
        stock = fedsilo_rounds(tmp / f"{name}-stock", overrides, worker=False)
        base = flower["secagg" if name == "secagg" else "plain"]
        out["cases"][name] = {
            "overrides": overrides, "worker": fast, "stock_supernode": stock,
            "flower_app": "Flower SecAgg+ (secaggplus_app.py)" if name == "secagg" else "Flower FedAvg (baseline_app.py)",
            "flower_later_mean": base["later_mean"],
            "x_vs_stock_supernode": stock["later_mean"] / fast["later_mean"],
            "x_vs_flower": base["later_mean"] / fast["later_mean"],
        }
        print(json.dumps({name: out["cases"][name]}, indent=1), flush=True)
    return out


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


LEAVE_ROUNDS = 5


def leave_run(tmp: Path, sig: signal.Signals) -> dict[str, Any]:
    from app import config
    from app.runtime import deploy
    from app.support import checkpoint
    from app.support.paths import resolve_data_dir

    overrides, _ = deploy.site_overrides(["task=medical", f"num_rounds={LEAVE_ROUNDS}", "strategy.fraction_evaluate=0"], 4)
    dep = deploy.prepare(tmp, overrides, 4)
    run_config = {"overrides": config.run_overrides(overrides, resolve_data_dir(None)), "output-dir": str(tmp)}
    link = deploy.start(dep, tmp)
    try:
        t0 = time.monotonic()
        run_id = link.submit(REPO, run_config, {})
        deadline = time.monotonic() + 300  # round 1's checkpoint, watched closely: rounds take a few seconds now
        while not ((tmp / checkpoint.FILE).is_file() and checkpoint.load(tmp).round >= 1):
            if time.monotonic() > deadline:
                raise RuntimeError("round 1 never finished")
            time.sleep(0.05)
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


def rounds_markdown(r: dict[str, Any]) -> list[str]:
    lines = [f"## Seconds per deployed round (issue #19): task=medical, {r['sites']} sites, TLS + SuperNode "
             f"authentication, mean of rounds 2-{r['rounds']}", "",
             "| case | fedsilo + site worker | fedsilo, stock SuperNode | plain Flower app | vs stock | vs Flower |",
             "|---|---|---|---|---|---|"]
    for name, c in r["cases"].items():
        lines.append(f"| {name} (`{' '.join(c['overrides'])}`) | {c['worker']['later_mean']:.2f} s | "
                     f"{c['stock_supernode']['later_mean']:.2f} s | {c['flower_later_mean']:.2f} s ({c['flower_app']}) | "
                     f"{c['x_vs_stock_supernode']:.1f}x | {c['x_vs_flower']:.1f}x |")
    lines += ["", "Every ratio is between columns of this run: the same fedsilo job on a stock SuperNode (a ClientApp "
              "process per message) and on the site worker, and a plain Flower app of the same task."]
    return [*lines, ""]


def markdown(r: dict[str, Any]) -> str:
    lines = ["# Deployment benchmark", "", f"Command: `{r['command']}`", ""]
    if "rounds" in r:
        lines += rounds_markdown(r["rounds"])
    if "figure" not in r:
        return "\n".join(lines) + "\n"
    f = r["figure"]
    lines += [
             f"## `{f['command']}`", "",
             f"- status {f['status']}, TLS {f['tls']}, SuperNode authentication {f['supernode_auth']}",
             f"- end to end {f['seconds']:.1f} s; rounds " + " / ".join(f"{s:.1f}" for s in f["round_seconds"]) + " s",
             f"- final AUC {f['auc']:.6f}; in-process simulation of the same overrides {f['simulated_auc']:.6f} "
             f"(difference {f['auc_difference']:.2e})", "",
             f"## One of 4 SuperNodes leaves after round 1 (medical, {LEAVE_ROUNDS} rounds)", "",
             "| signal | status | replies per round | round seconds | after leaving | log |", "|---|---|---|---|---|---|"]
    for k in r["leaving"]:
        lines.append(f"| {k['signal']} | {k['status']} | {k['replied_per_round']} | "
                     + " / ".join(f"{s:.1f}" for s in k["round_seconds"])
                     + f" | {k['seconds_after_leaving']:.1f} s | {'; '.join(k['log'])[:300]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import logging

    logging.getLogger("flwr").setLevel(logging.ERROR)
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["rounds", "figure", "all"], default="all")
    part = parser.parse_args().part
    result: dict[str, Any] = {"command": "python benchmarks/deployment.py" + (f" --part {part}" if part != "all" else "")}
    with tempfile.TemporaryDirectory() as tmp:
        if part != "figure":
            result["rounds"] = rounds_part(Path(tmp) / "rounds")
        if part == "rounds":
            OUT.mkdir(parents=True, exist_ok=True)
            (OUT / "deployment_rounds.json").write_text(json.dumps(result, indent=2) + "\n")
            (OUT / "deployment_rounds.md").write_text(markdown(result))
            print(markdown(result))
            return
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
