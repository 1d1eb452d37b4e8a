"""Simulation at scale: seconds per round and peak memory at 10, 100 and 1000 sites, beside plain Flower.

    python benchmarks/scale.py [--sites 10 100 1000] [--rounds 3] [--secagg 100 1000] [--reps 5]

For each number of sites, run interleaved in this one process through the same private
SuperLink helper (:func:`app.runtime.superlink.run_simulation`, runtime dependency installation
off):

* fedsilo: ``task=finance partition=dirichlet partition.alpha=2 partition.min_partition_size=2``
  (alpha 2 so that 1000 sites can each get rows), FedAvg, federated and server-side evaluation;
* the plain Flower 1.42 FedAvg app in ``benchmarks/flower_baseline`` with the same MLP, the
  same training and validation rows in total, the same sites, rounds and evaluation.

Seconds per round are measured the same way for both: the time between consecutive
server-side evaluations (round 1 includes each worker's start-up: imports, data). Peak
memory is the largest sum of resident memory of every process of the run (SuperLink,
simulation, Ray, workers), sampled every 0.25 s. Ratios are per interleaved pair (fedsilo's
repetition k over Flower's repetition k); the table gives their median and range. ``--secagg N
...`` also runs ``aggregation=secagg`` at those site counts (``--secagg-reps`` times) right after
that count's plain repetitions, each beside a plain run and a plain run without federated
evaluation (one message exchange fewer: the price of the exchange secure aggregation adds),
and reports it against plain fedsilo and against that message bound.
Writes ``benchmarks/results/scale.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app import config  # noqa: E402
from app.runtime.superlink import run_simulation  # noqa: E402

BASELINE = REPO / "benchmarks" / "flower_baseline"
OUT = REPO / "benchmarks" / "results"
FEDSILO = ["task=finance", "partition=dirichlet", "partition.alpha=2", "partition.min_partition_size=2",
           "report=false", "checkpoint=true"]
POOL_ROWS, VAL_FRACTION, TEST_ROWS, FEATURES = 24_000, 0.1, 6_000, 28


class MemorySampler:
    """Peak total RSS of the processes whose environment names ``FLWR_HOME=/tmp/fedsilo-flwr-``."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            time.sleep(self.interval)

    @staticmethod
    def sample() -> int:
        total = 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if b"FLWR_HOME=/tmp/fedsilo-flwr-" not in Path(f"/proc/{pid}/environ").read_bytes():
                    continue
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                continue
        return total


def run_baseline(n: int, rounds: int, tmp: Path) -> dict:
    timing = tmp / f"baseline-{n}.json"
    cfg = {"num-sites": n, "num-server-rounds": rounds, "rows-per-site": int(POOL_ROWS * (1 - VAL_FRACTION)) // n,
           "val-rows": max(1, int(POOL_ROWS * VAL_FRACTION) // n), "test-rows": TEST_ROWS, "features": FEATURES,
           "timing-file": str(timing)}
    t0 = time.monotonic()
    with MemorySampler() as mem:
        outcome = run_simulation(BASELINE, cfg, n, tmp / f"baseline-{n}.log", stream=False, timeout=7200)
    if not outcome.ok:
        raise RuntimeError(f"baseline at {n} sites: {outcome}")
    return {"wall_s": time.monotonic() - t0, "round_s": json.loads(timing.read_text()), "peak_rss_mb": mem.peak / 2**20}


def run_fedsilo(n: int, rounds: int, tmp: Path, extra: list[str] = ()) -> dict:
    overrides = [*FEDSILO, f"num_sites={n}", f"num_rounds={rounds}", *extra]
    out = tmp / f"fedsilo-{n}-{'-'.join(extra) or 'plain'}"
    data_dir = REPO / "tasks" / "data"
    run_config = {"overrides": config.run_overrides(overrides, data_dir), "output-dir": str(out)}
    t0 = time.monotonic()
    with MemorySampler() as mem:
        outcome = run_simulation(REPO, run_config, n, out / "superlink.log", stream=False, timeout=7200)
    if not outcome.ok:
        raise RuntimeError(f"fedsilo at {n} sites ({extra}): {outcome}")
    res = json.loads((out / "results.json").read_text())
    return {"wall_s": time.monotonic() - t0, "round_s": res["timing"]["round_seconds"], "peak_rss_mb": mem.peak / 2**20,
            "final_auc": res["final"].get("auc")}


def summary(r: dict) -> dict:
    rs = r["round_s"]
    return {**r, "mean_round_s": statistics.mean(rs), "mean_round_s_after_first": statistics.mean(rs[1:]) if len(rs) > 1
            else rs[0]}


def median_run(runs: list[dict]) -> dict:
    """Per figure, the median over repetitions."""
    keys = ("wall_s", "peak_rss_mb", "mean_round_s", "mean_round_s_after_first")
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["round_s"] = [statistics.median(r["round_s"][i] for r in runs) for i in range(len(runs[0]["round_s"]))]
    if "final_auc" in runs[0]:
        out["final_auc"] = runs[0]["final_auc"]
    return out


def row_of(n: int, bases: list[dict], ours_: list[dict]) -> dict:
    """One table row: medians over the repetitions of each app, and the pairwise ratios' median and range."""
    base, ours = median_run(bases), median_run(ours_)
    pairs = {key: [o[key] / b[key] for b, o in zip(bases, ours_, strict=True)]
             for key in ("mean_round_s", "mean_round_s_after_first", "wall_s")}
    return {"sites": n, "flower": base, "fedsilo": ours, "reps": {"flower": bases, "fedsilo": ours_},
            "ratio_mean_round": statistics.median(pairs["mean_round_s"]),
            "ratio_after_first": statistics.median(pairs["mean_round_s_after_first"]),
            "ratio_wall": statistics.median(pairs["wall_s"]),
            "spread": {k: [min(v), max(v)] for k, v in pairs.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, nargs="*", default=[10, 100, 1000])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--secagg", type=int, nargs="*", default=[100], help="also run aggregation=secagg at these site counts")
    ap.add_argument("--secagg-reps", type=int, default=2, help="repetitions of each secagg run")
    ap.add_argument("--reps", type=int, default=5, help="repetitions, interleaved; medians and ranges are reported")
    ap.add_argument("--merge", action="store_true", help="replace only these sizes' rows in the existing results")
    args = ap.parse_args()
    rows, secaggs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sites:
            bases, ours_ = [], []
            for _ in range(args.reps):  # interleaved: drift of the machine hits both alike
                bases.append(summary(run_baseline(n, args.rounds, Path(tmp))))
                ours_.append(summary(run_fedsilo(n, args.rounds, Path(tmp))))
            row = row_of(n, bases, ours_)
            base, ours = row["flower"], row["fedsilo"]
            rows.append(row)
            sp = row["spread"]["mean_round_s_after_first"]
            print(f"{n} sites: Flower {base['mean_round_s']:.2f} s/round ({base['peak_rss_mb']:.0f} MB), fedsilo "
                  f"{ours['mean_round_s']:.2f} s/round ({ours['peak_rss_mb']:.0f} MB): ratio "
                  f"{row['ratio_mean_round']:.2f} (after round 1: {row['ratio_after_first']:.2f}, range "
                  f"{sp[0]:.2f}-{sp[1]:.2f})", flush=True)
        for n in args.secagg or []:
            # Each repetition: plain fedsilo, plain without federated evaluation (one message exchange
            # fewer) and secagg, interleaved. Secure aggregation's rounds after the first have one exchange
            # more than plain (the unmasking); its message bound is plain + that exchange, measured as
            # plain - (plain without evaluation).
            plains, lights, runs = [], [], []
            for _ in range(args.secagg_reps):
                plains.append(summary(run_fedsilo(n, args.rounds, Path(tmp))))
                lights.append(summary(run_fedsilo(n, args.rounds, Path(tmp), ["strategy.fraction_evaluate=0"])))
                runs.append(summary(run_fedsilo(n, args.rounds, Path(tmp), ["aggregation=secagg"])))
            key = "mean_round_s_after_first"
            ratios = [r[key] / p[key] for p, r in zip(plains, runs, strict=True)]
            bounds = [2 * p[key] - lt[key] for p, lt in zip(plains, lights, strict=True)]
            sec = {"sites": n, **median_run(runs), "reps": runs, "plain_reps": plains, "no_evaluate_reps": lights,
                   "ratio_after_first_vs_plain": statistics.median(ratios),
                   "ratio_after_first_vs_plain_range": [min(ratios), max(ratios)],
                   "exchange_s": statistics.median(p[key] - lt[key] for p, lt in zip(plains, lights, strict=True)),
                   "bound_after_first_vs_plain": statistics.median(b / p[key] for b, p in zip(bounds, plains, strict=True)),
                   "ratio_after_first_vs_bound": statistics.median(r[key] / b for r, b in zip(runs, bounds, strict=True)),
                   "ratio_vs_plain": median_run(runs)["mean_round_s"] / median_run(plains)["mean_round_s"]}
            secaggs.append(sec)
            print(f"secagg at {n} sites: {sec['mean_round_s']:.2f} s/round (after round 1 "
                  f"{sec['mean_round_s_after_first']:.2f}, {sec['ratio_after_first_vs_plain']:.2f}x plain fedsilo; "
                  f"one exchange {sec['exchange_s']:.2f} s, bound {sec['bound_after_first_vs_plain']:.2f}x plain, "
                  f"secagg {sec['ratio_after_first_vs_bound']:.2f}x bound), peak {sec['peak_rss_mb']:.0f} MB, "
                  f"AUC {sec['final_auc']:.4f}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.merge and (OUT / "scale.json").is_file():  # add these repetitions to the recorded ones
        old = {r["sites"]: r for r in json.loads((OUT / "scale.json").read_text())["rows"]}
        for r in rows:
            if r["sites"] in old:
                r.update(row_of(r["sites"], old[r["sites"]]["reps"]["flower"] + r["reps"]["flower"],
                                old[r["sites"]]["reps"]["fedsilo"] + r["reps"]["fedsilo"]))
        rows = sorted([r for n, r in old.items() if n not in args.sites] + rows, key=lambda r: r["sites"])
        fresh = {sec["sites"] for sec in secaggs}
        secaggs = sorted([sec for sec in json.loads((OUT / "scale.json").read_text()).get("secagg") or []
                          if sec["sites"] not in fresh] + secaggs, key=lambda sec: sec["sites"])
    payload = {"rounds": args.rounds, "fedsilo_overrides": FEDSILO, "rows": rows, "secagg": secaggs}
    (OUT / "scale.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [f"# Simulation at scale ({args.rounds} rounds, finance, Dirichlet alpha 2, medians of interleaved "
             "repetitions)", "",
             "`python benchmarks/scale.py`: fedsilo and a plain Flower 1.42 FedAvg app (same MLP, rows, sites, "
             "rounds, evaluation) through the same private SuperLink, interleaved in one process. Seconds per round "
             "= time between server-side evaluations; peak memory = largest total RSS of the run's processes.", "",
             "Ratios: median over the interleaved pairs, range in brackets.", "",
             "| sites | repetitions | Flower s/round | fedsilo s/round | ratio [range] | ratio after round 1 [range] "
             "| Flower wall s | fedsilo wall s | Flower peak MB | fedsilo peak MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, f = r["flower"], r["fedsilo"]
        sp = r.get("spread", {})

        def rng(key: str, sp: dict = sp) -> str:
            return f" [{sp[key][0]:.2f}-{sp[key][1]:.2f}]" if key in sp else ""

        lines.append(f"| {r['sites']} | {len(r['reps']['flower'])} | {b['mean_round_s']:.2f} | {f['mean_round_s']:.2f} "
                     f"| {r['ratio_mean_round']:.2f}{rng('mean_round_s')} "
                     f"| **{r['ratio_after_first']:.2f}**{rng('mean_round_s_after_first')} | {b['wall_s']:.1f} "
                     f"| {f['wall_s']:.1f} | {b['peak_rss_mb']:.0f} | {f['peak_rss_mb']:.0f} |")
    for sec in secaggs:
        bound = ""
        if "bound_after_first_vs_plain" in sec:
            rr = sec["ratio_after_first_vs_plain_range"]
            bound = (f" [{rr[0]:.2f}-{rr[1]:.2f}], each beside a plain run of the same repetition. Its rounds after the "
                     f"first have one message exchange more than plain's (the unmasking); one exchange of these "
                     f"sites (plain minus plain without federated evaluation) takes {sec['exchange_s']:.2f} s, so the "
                     f"message bound is {sec['bound_after_first_vs_plain']:.2f}x plain and secagg runs at "
                     f"**{sec['ratio_after_first_vs_bound']:.2f}x** that bound")
        lines += ["", f"`aggregation=secagg` at {sec['sites']} sites ({len(sec['reps'])} runs, medians): "
                  f"{sec['mean_round_s']:.2f} s per round (rounds: {', '.join(f'{s:.1f}' for s in sec['round_s'])}); "
                  f"rounds after the first {sec['mean_round_s_after_first']:.2f} s = "
                  f"**{sec['ratio_after_first_vs_plain']:.2f}x** plain fedsilo's at the same sites{bound}; peak "
                  f"{sec['peak_rss_mb']:.0f} MB, final AUC {sec['final_auc']:.4f}."]
    (OUT / "scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
