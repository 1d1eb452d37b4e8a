"""Byzantine robustness on finance: final AUC with 0-30 % attackers, FedAvg vs each robust rule.

    python benchmarks/robustness.py [--seeds 3] [--rounds 10] [--workers 2]

Every run is fedsilo's real ServerApp and ClientApp in one process (:mod:`app.runtime.local_grid`,
the same results as the simulation engine): finance, 10 sites (iid split), 10 rounds.
For each attack (``faults.attack``) and attacker share (``faults.byzantine_fraction`` 0.1,
0.2, 0.3; the 0 % run is shared) it runs plain FedAvg and every ``strategy.robust`` rule
with ``strategy.assumed_byzantine=0.3``, over 3 seeds. A run whose model diverged (scores
not finite) has no AUC; it is counted as 0.5 (chance) in the means and flagged.

Writes ``benchmarks/results/robustness.{json,md,png}``. ``--part secagg`` measures what is left
under ``aggregation=secagg``, where no robust rule can run: each attack at 20 % with and without
``strategy.norm_bound`` (``robustness_secagg.{json,md}``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RULES = ("none", "krum", "multikrum", "trimmed_mean", "median")
ATTACKS = ("sign_flip", "scale", "gaussian", "label_flip")
FRACTIONS = (0.0, 0.1, 0.2, 0.3)
BASE = ["task=finance", "num_sites=10", "strategy.assumed_byzantine=0.3"]
OUT = ROOT / "benchmarks" / "results"


NORM_BOUND = 0.5  # honest finance updates are shorter: a clean secagg run with it loses < 0.001 AUC


def _run(job: tuple[str, float, str, int, int]) -> dict:
    attack, fraction, rule, seed, rounds = job
    logging.getLogger("flwr").setLevel(logging.WARNING)
    from app.runtime.local_grid import run_inprocess

    robust = [f"strategy.robust={rule}"] if not rule.startswith("secagg") else \
        ["aggregation=secagg", f"strategy.norm_bound={NORM_BOUND if rule == 'secagg+norm_bound' else 0}"]
    overrides = [*BASE, f"num_rounds={rounds}", f"seed={seed}", *robust,
                 f"faults.byzantine_fraction={fraction}", f"faults.attack={attack}"]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res = run_inprocess(overrides, Path(tmp))
    auc = res["final"].get("auc")
    return {"attack": attack, "fraction": fraction, "rule": rule, "seed": seed, "auc": auc,
            "diverged": auc is None, "seconds": round(time.perf_counter() - t0, 2)}


def _mean(rows: list[dict]) -> tuple[float, float]:
    aucs = [0.5 if r["auc"] is None else r["auc"] for r in rows]
    return statistics.mean(aucs), (statistics.stdev(aucs) if len(aucs) > 1 else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--part", choices=("main", "secagg"), default="main")
    args = ap.parse_args()
    if args.part == "secagg":
        _secagg(args)
        return
    jobs = [("sign_flip", 0.0, rule, seed, args.rounds) for rule in RULES for seed in range(args.seeds)]
    jobs += [(a, f, rule, seed, args.rounds) for a in ATTACKS for f in FRACTIONS[1:] for rule in RULES
             for seed in range(args.seeds)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        rows = []
        for i, row in enumerate(pool.map(_run, jobs), 1):
            rows.append(row)
            print(f"[{i}/{len(jobs)}] {row}", flush=True)
    clean = {rule: _mean([r for r in rows if r["fraction"] == 0.0 and r["rule"] == rule]) for rule in RULES}
    table: dict[str, dict[str, dict[str, list[float]]]] = {}
    for a in ATTACKS:
        table[a] = {}
        for rule in RULES:
            cells = [clean[rule]]
            for f in FRACTIONS[1:]:
                cells.append(_mean([r for r in rows if r["attack"] == a and r["fraction"] == f and r["rule"] == rule]))
            table[a][rule] = [list(c) for c in cells]
    diverged = sorted({(r["attack"], r["fraction"], r["rule"]) for r in rows if r["diverged"]})
    OUT.mkdir(parents=True, exist_ok=True)
    payload = {"setup": {"base_overrides": BASE, "rounds": args.rounds, "seeds": args.seeds, "fractions": FRACTIONS,
                         "attack_defaults": {"sign_flip": 4, "scale": 50, "gaussian": 5}},
               "clean_fedavg_auc": clean["none"][0], "table": table, "runs": rows,
               "diverged": [list(d) for d in diverged], "wall_seconds": round(time.perf_counter() - t0, 1)}
    (OUT / "robustness.json").write_text(json.dumps(payload, indent=2) + "\n")
    md = _markdown(payload)
    (OUT / "robustness.md").write_text(md)
    _plot(table)
    print(md)


def _secagg(args: argparse.Namespace) -> None:
    variants = ("secagg", "secagg+norm_bound")
    jobs = [(a, f, v, seed, args.rounds) for a in ATTACKS for f in (0.0, 0.2) for v in variants
            for seed in range(args.seeds)]
    with ProcessPoolExecutor(args.workers) as pool:
        rows = list(pool.map(_run, jobs))
    table = {a: {v: {str(f): list(_mean([r for r in rows if (r["attack"], r["fraction"], r["rule"]) == (a, f, v)]))
                     for f in (0.0, 0.2)} for v in variants} for a in ATTACKS}
    (OUT / "robustness_secagg.json").write_text(json.dumps({"norm_bound": NORM_BOUND, "table": table, "runs": rows},
                                                           indent=2) + "\n")
    lines = [f"# Under secure aggregation: norm bounding (finance, 10 sites, {args.rounds} rounds, {args.seeds} seeds)",
             "", "`python benchmarks/robustness.py --part secagg`. No robust rule can run on masked updates; "
             f"`strategy.norm_bound={NORM_BOUND}` makes honest sites clip their update and the server clip the "
             "unmasked mean update. Final test AUC, mean ± sd.", "",
             "| attack | secagg, clean | secagg, 20 % attackers | + norm_bound, clean | + norm_bound, 20 % attackers |",
             "|---|---|---|---|---|"]
    for a, t in table.items():
        cells = [t[v][f] for v in variants for f in ("0.0", "0.2")]
        lines.append(f"| {a} | " + " | ".join(f"{m:.4f} ± {sd:.4f}" for m, sd in cells) + " |")
    md = "\n".join(lines) + "\n"
    (OUT / "robustness_secagg.md").write_text(md)
    print(md)


def _markdown(p: dict) -> str:
    clean = p["clean_fedavg_auc"]
    lines = ["# Byzantine robustness (finance, 10 sites, iid, "
             f"{p['setup']['rounds']} rounds, {p['setup']['seeds']} seeds)", "",
             "`python benchmarks/robustness.py`. Final test AUC, mean ± sd over seeds; in brackets the difference "
             f"to clean FedAvg ({clean:.4f}). Attack strengths: sign_flip sends w - 4d, scale w + 50d, gaussian "
             "w + N(0, 5^2); label_flip trains on flipped labels. Robust rules assume f = floor(0.3 n). "
             "A diverged model (non-finite scores) counts as AUC 0.5 and is marked *.", ""]
    div = {tuple(d) for d in p["diverged"]}
    for attack, rules in p["table"].items():
        lines += [f"## {attack}", "", "| rule | " + " | ".join(f"{int(f * 100)} %" for f in FRACTIONS) + " |",
                  "|---|" + "---|" * len(FRACTIONS)]
        for rule, cells in rules.items():
            out = []
            for f, (m, sd) in zip(FRACTIONS, cells):
                star = "*" if (attack, f, rule) in div else ""
                out.append(f"{m:.4f} ± {sd:.4f} ({m - clean:+.4f}){star}")
            lines.append(f"| {rule if rule != 'none' else 'fedavg'} | " + " | ".join(out) + " |")
        lines.append("")
    lines.append(f"Wall time {p['wall_seconds']} s for {len(p['runs'])} runs.")
    return "\n".join(lines) + "\n"


def _plot(table: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(4.2 * len(table), 3.6), sharey=True)
    for ax, (attack, rules) in zip(axes, table.items()):
        for rule, cells in rules.items():
            ax.errorbar([f * 100 for f in FRACTIONS], [c[0] for c in cells], yerr=[c[1] for c in cells],
                        marker="o", capsize=3, label="fedavg" if rule == "none" else rule)
        ax.set_title(attack)
        ax.set_xlabel("attackers (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final test AUC")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "robustness.png", dpi=120)


if __name__ == "__main__":
    main()
