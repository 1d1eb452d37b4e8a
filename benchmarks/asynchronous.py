"""Issue #20: one site of five 5x slower; wall time to a fixed AUC, synchronous beside buffered rounds.

Finance (MLP), 5 sites, ``faults.slow_fraction=0.2 faults.slow_factor=5`` (one site, drawn from
the seed, takes five times as long per local step). The sites answer concurrently
(``run_inprocess(workers=5)``: fedsilo's ServerApp and ClientApp in one process, each site in its
own thread; the slow site's extra time is a wait that holds no CPU). Four ways to run, same
seed, same data, one after another in this process:

* ``sync-wait``: synchronous FedAvg, every round waits for the slow site;
* ``sync-drop``: FedAvg that drops the slow site (``strategy.wait_for_slow=false``, policy drop);
* ``fedprox-partial``: FedProx, the slow site does the 1/5 of its steps that fits (policy partial);
* ``buffered``: FedBuff (``strategy.buffer=3``): the model moves every 3 replies, stale ones weighted down.

Each reports the seconds from the first round's start until the server's test AUC first reaches
the target (default: 0.995 of synchronous FedAvg's final AUC), its final AUC (and the mean of its
last three rounds': the test AUC moves by about 0.002 from round to round), and the speed-up
against ``sync-wait``. Synchronous modes run ``--rounds`` rounds; buffered rounds run
``2 * --rounds * 5 / buffer`` model versions (twice the site updates of synchronous FedAvg, still
well under half its wall time).

    python benchmarks/asynchronous.py                 # about 4 minutes on 2 cores
    python benchmarks/asynchronous.py --seeds 0 1 2

Results: ``benchmarks/results/asynchronous.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.runtime.local_grid import run_inprocess  # noqa: E402

SLOW = ["faults.slow_fraction=0.2", "faults.slow_factor=5"]
BUFFER = 3


def modes(rounds: int) -> dict[str, list[str]]:
    return {
        "sync-wait": [f"num_rounds={rounds}"],
        "sync-drop": [f"num_rounds={rounds}", "strategy.wait_for_slow=false", "strategy.straggler_policy=drop"],
        "fedprox-partial": [f"num_rounds={rounds}", "strategy=fedprox", "strategy.wait_for_slow=false",
                            "strategy.straggler_policy=partial"],
        "buffered": [f"num_rounds={rounds * 5 * 2 // BUFFER}", f"strategy.buffer={BUFFER}"],
    }


def timeline(res: dict) -> list[tuple[float, float]]:
    """(seconds since round 1 started, test AUC) after every round."""
    t, out = 0.0, []
    for h in res["history"]:
        t += float(h["seconds"])
        out.append((t, float(h["server"]["auc"])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--target", type=float, default=0.995, help="share of sync-wait's final AUC to reach")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "asynchronous"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for seed in args.seeds:
            runs = {}
            for name, extra in modes(args.rounds).items():
                t0 = time.perf_counter()
                res = run_inprocess(["task=finance", f"seed={seed}", "strategy.fraction_evaluate=0", *SLOW, *extra],
                                    Path(d) / f"{name}-{seed}", workers=5)
                runs[name] = (timeline(res), time.perf_counter() - t0, res)
            target = args.target * runs["sync-wait"][0][-1][1]
            base = None
            for name, (tl, wall, _) in runs.items():
                reach = next((t for t, auc in tl if auc >= target), None)
                base = base if base is not None else reach
                row = {"seed": seed, "mode": name, "target_auc": target, "seconds_to_target": reach,
                       "final_auc": tl[-1][1], "last3_auc": sum(a for _, a in tl[-3:]) / 3,
                       "wall_seconds": wall, "rounds": len(tl),
                       "speedup": (base / reach) if (base and reach) else None}
                rows.append(row)
                when = "never" if reach is None else f"{reach:6.1f} s"
                speed = "" if row["speedup"] is None else f" ({row['speedup']:.2f}x sync-wait)"
                print(f"seed {seed} {name:16s} reaches AUC {target:.4f} after {when}{speed}; "
                      f"final AUC {tl[-1][1]:.4f} (last 3 rounds {row['last3_auc']:.4f}) after {len(tl)} rounds, "
                      f"{wall:.1f} s", flush=True)
    lines = ["| mode | seeds | seconds to target AUC (median) | speed-up vs sync-wait | final AUC (mean) | "
             "mean AUC of the last 3 rounds (mean) | rounds | seconds of the whole run (mean) |",
             "|---|---|---|---|---|---|---|---|"]
    for name in modes(args.rounds):
        sel = [r for r in rows if r["mode"] == name]
        reached = [r["seconds_to_target"] for r in sel if r["seconds_to_target"] is not None]
        sp = [r["speedup"] for r in sel if r["speedup"] is not None]
        lines.append(f"| {name} | {len(sel)} | {statistics.median(reached) if reached else float('nan'):.1f} "
                     f"({len(reached)}/{len(sel)} reached) | {statistics.median(sp) if sp else float('nan'):.2f}x | "
                     f"{statistics.mean(r['final_auc'] for r in sel):.4f} | "
                     f"{statistics.mean(r['last3_auc'] for r in sel):.4f} | {sel[0]['rounds']} | "
                     f"{statistics.mean(r['wall_seconds'] for r in sel):.1f} |")
    md = "\n".join(lines)
    print(md)
    Path(args.out + ".md").write_text("# One site of five 5x slower (benchmarks/asynchronous.py)\n\n"
                                      f"Target: {args.target} x sync-wait's final AUC.\n\n" + md + "\n")
    Path(args.out + ".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
