"""Issue #2's accuracy figures: the documented commands, run through ``fedsilo``, per seed.

For each job it runs ``fedsilo <overrides> seed=S`` in Flower's simulation engine and
reads ``results.json``; beside them it trains centralized baselines (all pooled training
rows, same model, same optimiser settings, same epochs as the federated run's rounds) on
the identical split, in this process. Prints a table and writes
``benchmarks/results/foundation.json`` and ``foundation.md``.

    python benchmarks/foundation.py                 # seeds 0 1 2
    python benchmarks/foundation.py --seeds 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import tasks  # noqa: E402
from app import config  # noqa: E402
from app.support.paths import resolve_data_dir  # noqa: E402

JOBS = {
    "finance": ["task=finance", "num_rounds=10", "num_sites=5"],
    "medical": ["task=medical", "num_rounds=20"],
    "medical_imaging": ["task=medical_imaging"],
}
KEYS = ("auc", "accuracy", "accuracy_site_mean", "f1", "ks", "sensitivity", "specificity")
TARGETS = {
    "finance": {"auc": 0.75},
    "medical": {"auc": 0.85, "accuracy": 0.78, "accuracy_site_mean": 0.78},
    "medical_imaging": {"auc": 0.80},
}


def run_fedsilo(overrides: list[str], seed: int, out: Path) -> dict:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "app.cli.main", *overrides, f"seed={seed}",
                           f"hydra.run.dir={out}"], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    res = json.loads((out / "results.json").read_text())
    res["wall_seconds"] = time.monotonic() - t0
    return res


def centralized(overrides: list[str], seed: int, model: str | None = None) -> dict:
    """Train on all pooled training rows for as many epochs as the federated run has rounds
    (x local epochs), same model and optimiser; score on the same test set."""
    cfg = config.compose([*overrides, f"seed={seed}"])
    tcfg = cfg.task if model is None else dataclasses.replace(cfg.task, model=model)
    tcfg = dataclasses.replace(tcfg, local_epochs=cfg.task.local_epochs * cfg.num_rounds)
    task = tasks.get(tcfg.name)(tcfg, resolve_data_dir(cfg.data_dir))
    torch.manual_seed(seed)
    net = task.build_model()
    task.train(net, task.data().pool, seed=seed)
    return task.evaluate(net, task.data().test)


def summarize(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", nargs="+", default=list(JOBS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    report: dict = {"seeds": args.seeds, "jobs": {}}
    lines = ["| job | command | metric | federated (fedsilo) | centralized, same model | target |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.jobs:
            overrides = JOBS[name]
            runs = [run_fedsilo(overrides, s, Path(tmp) / f"{name}-{s}") for s in args.seeds]
            cent = [centralized(overrides, s) for s in args.seeds]
            extra = {}
            if name == "finance":
                extra["centralized_logreg"] = [centralized(overrides, s, model="logreg") for s in args.seeds]
            report["jobs"][name] = {
                "command": "fedsilo " + " ".join(overrides),
                "federated": [r["final"] for r in runs],
                "wall_seconds": [r["wall_seconds"] for r in runs],
                "centralized": cent,
                **extra,
            }
            for key in KEYS:
                fed = [r["final"].get(key) for r in runs]
                if any(v is None for v in fed):
                    continue
                c = [m[key] for m in cent]
                target = TARGETS[name].get(key)
                lines.append(f"| {name} | `fedsilo {' '.join(overrides)}` | {key} | {summarize(fed)} | "
                             f"{summarize(c)} | {f'>= {target:.2f}' if target else ''} |")
            if name == "finance":
                lr = [m["auc"] for m in extra["centralized_logreg"]]
                lines.append(f"| finance | centralized logistic regression | auc | | {summarize(lr)} | |")
            print("\n".join(lines[-len(KEYS) - 1:]), flush=True)
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "foundation.json").write_text(json.dumps(report, indent=2) + "\n")
    header = (f"Seeds {args.seeds}; mean ± sample std over seeds. Produced by "
              f"`python benchmarks/foundation.py --seeds {' '.join(map(str, args.seeds))}`.\n\n")
    (out / "foundation.md").write_text(header + "\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
