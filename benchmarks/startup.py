"""Wall time of a short job, start-up included: fedsilo vs a plain Flower FedAvg app.

Runs, interleaved, ``fedsilo task=finance num_rounds=3 num_sites=5`` (the whole command,
Python start-up and Hydra included) and the plain Flower app in
``benchmarks/flower_baseline`` (same MLP, rows per site, rounds and sites; started the
same way: a private SuperLink, ``flwr run``, follow to completion, stop). Reports each
repetition, the medians and their ratio; writes ``benchmarks/results/startup.json``.

    python benchmarks/startup.py --reps 3
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.runtime.superlink import run_simulation  # noqa: E402

BASELINE = REPO / "benchmarks" / "flower_baseline"
COMMAND = ["task=finance", "num_rounds=3", "num_sites=5"]


def time_fedsilo(out: Path) -> float:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "app.cli.main", *COMMAND, f"hydra.run.dir={out}"],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return time.monotonic() - t0


def time_baseline(out: Path) -> float:
    t0 = time.monotonic()
    outcome = run_simulation(BASELINE, {}, 5, out / "superlink.log", stream=False)
    if not outcome.ok:
        raise RuntimeError(f"baseline run failed: {outcome}")
    return time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            b = time_baseline(Path(tmp) / f"baseline-{rep}")
            f = time_fedsilo(Path(tmp) / f"fedsilo-{rep}")
            rows.append({"rep": rep, "flower_baseline_s": b, "fedsilo_s": f})
            print(f"rep {rep}: plain Flower {b:.1f}s  fedsilo {f:.1f}s  ratio {f / b:.2f}", flush=True)
    med_b = statistics.median(r["flower_baseline_s"] for r in rows)
    med_f = statistics.median(r["fedsilo_s"] for r in rows)
    summary = {"command": "fedsilo " + " ".join(COMMAND), "reps": rows,
               "median_flower_baseline_s": med_b, "median_fedsilo_s": med_f, "ratio": med_f / med_b}
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "startup.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"median: plain Flower {med_b:.1f}s, fedsilo {med_f:.1f}s, ratio {med_f / med_b:.2f}")


if __name__ == "__main__":
    main()
