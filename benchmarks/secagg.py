"""Issues #4 and #34: what secure aggregation costs, against plain aggregation and Flower's SecAgg+.

For 5, 20, 50 and 100 finance sites (IID, 1 local epoch, the finance MLP: 4,225 values) it
runs, in this one process and interleaved per site count:

* ``plain``     fedsilo, ``aggregation=plain``
* ``secagg``    fedsilo, ``aggregation=secagg`` (default graph: complete up to 20 sites,
                then 2*ceil(2*log2 n) neighbours per site; threshold 60 % of a neighbourhood, or the
                site's own bound if higher; keys agreed once, in round 1)
* ``flower``    Flower 1.41's legacy SecAgg+ workflow (``benchmarks/flower_baseline/
                secaggplus_app.py``) with the same sites, model, local training, graph size
                (``num_shares``) and threshold

and reports seconds per round (median over rounds 2..R, so set-up is excluded) and bytes
each site sends and receives per round (serialised Flower messages, protobuf size). All
three drive the real ServerApp/ClientApp objects in this process (no Ray, no gRPC; every
message and reply goes through Flower's protobuf serialisation, as on a real wire), so the
figures isolate protocol cost; each run is a fresh Python process. ``--engine`` adds plain vs secagg
at 10 sites through Flower's simulation engine (``fedsilo`` command).

    python benchmarks/secagg.py --rounds 5    # about 15 minutes on 2 cores (3 pairs per site count)
    python benchmarks/secagg.py --engine      # + the simulation engine at 10 sites

Writes ``benchmarks/results/secagg.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks" / "flower_baseline"))

from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.common.serde import message_from_proto, message_to_proto  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from app import config  # noqa: E402
from app.runtime.local_grid import LocalGrid  # noqa: E402
from app.runtime.preflight import preflight  # noqa: E402

BASE = ["task=finance", "partition=iid", "task.local_epochs=1", "strategy.fraction_evaluate=0"]


class MeteredGrid(LocalGrid):
    """LocalGrid that sends every message and reply through Flower's protobuf serialisation
    (as a real transport does: each node gets its own copy) and adds up its size."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.down: dict[int, int] = defaultdict(int)
        self.up: dict[int, int] = defaultdict(int)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            proto = message_to_proto(msg)
            self.down[node] += proto.ByteSize()
            reply = self._deliver(message_from_proto(proto))
            proto = message_to_proto(reply)
            if not reply.has_error():
                self.up[node] += proto.ByteSize()
            out.append(message_from_proto(proto))
        return out


def one(kind: str, sites: int, rounds: int) -> dict[str, Any]:
    """One run; seconds per round (from the server's per-round stamps) and bytes per site."""
    overrides = [*BASE, f"num_sites={sites}", f"num_rounds={rounds}",
                 *(["aggregation=secagg"] if kind == "secagg" else [])]
    cfg = config.compose(overrides)
    data_dir = preflight(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        run_config = {"overrides": shlex.join([*overrides, f"data_dir={data_dir}"]), "output-dir": tmp}
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
        if kind == "flower":
            import secaggplus_app as fl

            grid = MeteredGrid(fl.client, sites, run_config)
            fl.server(grid, ctx)
            secs = [b - a for a, b in zip(fl.STAMPS, fl.STAMPS[1:])]
            auc = None
        else:
            from app import client_app, server_app

            grid = MeteredGrid(client_app.app, sites, run_config)
            server_app.app(grid, ctx)
            res = json.loads((Path(tmp) / "results.json").read_text())
            secs, auc = [h["seconds"] for h in res["history"]], res["final"]["auc"]
    per = lambda d: statistics.mean(d.values()) / rounds if d else 0.0  # noqa: E731
    return {"kind": kind, "sites": sites, "rounds": rounds, "round_seconds": secs,
            "seconds_per_round": statistics.median(secs[1:] if len(secs) > 1 else secs),
            "bytes_up_per_site": per(grid.up), "bytes_down_per_site": per(grid.down), "final_auc": auc}


def crypto_floor(sites: int, length: int = 4228, reps: int = 25) -> dict[str, float]:
    """Seconds per round of the work a secure round cannot skip at ``sites`` sites (rounds after the one
    that agrees the job's keys), timed alone: per site, the ratchet of each neighbour's chain (mask seed,
    share key, next chain key: HKDF-Expand), one AES-256-CTR mask expansion per neighbour and its own,
    one Shamir sharing of its self-mask seed among its neighbourhood, one share sealed and one opened per
    neighbour (AES-256-GCM); at the coordinator, one self-mask expansion and one reconstruction per site.
    Minimum of ``reps``."""
    import os
    import time

    import numpy as np

    from aggregation.secagg import keys, prg, ratchet
    from aggregation.secagg.graph import auto_neighbours
    from aggregation.secagg.protocol import open_sealed, seal
    from aggregation.secagg.server import threshold_for
    from aggregation.secagg.shamir import combine_shares, create_shares

    k = auto_neighbours(sites)
    t = threshold_for(0.6, k + 1)
    chains = [os.urandom(32) for _ in range(k)]
    aad = b"fedsilo-secagg-v2|share|1|train|5|site-a->site-b"

    def site() -> None:
        derived = [ratchet.round_keys(c, 5) for c in chains]
        y = np.zeros(length, dtype=np.uint64)
        for seed, _, _ in derived:
            np.add(y, prg.words(seed, length), out=y)
        np.add(y, prg.words(keys.expand(os.urandom(16), b"self-mask"), length), out=y)
        shares = create_shares(os.urandom(16), t, k + 1)
        for (_, share_key, _), share in zip(derived, shares, strict=False):
            open_sealed(share_key, seal(share_key, share, aad), aad)

    shares = create_shares(os.urandom(16), t, k + 1)

    def server_per_site() -> None:
        prg.words(keys.expand(os.urandom(16), b"self-mask"), length)
        combine_shares(shares[:t])

    best = {}
    for name, fn in (("site", site), ("server_per_site", server_per_site)):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        best[name] = min(times)
    return {"neighbours": k, "threshold": t, **best, "per_round": sites * (best["site"] + best["server_per_site"])}


def engine(sites: int, rounds: int) -> dict[str, float]:
    """Median round seconds of plain and secagg through the simulation engine (fedsilo command)."""
    out = {}
    for kind in ("plain", "secagg"):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "app.cli.main", *BASE, f"num_sites={sites}", f"num_rounds={rounds}",
                   f"aggregation={kind}", f"hydra.run.dir={tmp}"]
            subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, timeout=1800)
            res = json.loads((Path(tmp) / "results.json").read_text())
            out[kind] = statistics.median(h["seconds"] for h in res["history"][1:])
    return out


def fresh(kind: str, sites: int, rounds: int) -> dict[str, Any]:
    """:func:`one` in a fresh Python process: no run inherits another's caches, heap or garbage (a long
    process that ran Flower's SecAgg+ at 100 sites collects garbage over a far larger heap)."""
    out = subprocess.run([sys.executable, __file__, "--one", kind, str(sites), str(rounds)], capture_output=True,
                         text=True, check=True, timeout=7200)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--one":
        logging.getLogger("flwr").setLevel(logging.ERROR)
        print(json.dumps(one(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[5, 20, 50, 100])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--engine", action="store_true", help="also plain vs secagg at 10 sites in the engine")
    parser.add_argument("--reps", type=int, default=3,
                        help="interleaved plain/secagg pairs per site count (each with its own bound); medians and "
                             "ranges are reported (Flower's SecAgg+ runs once)")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    rows = []
    pairs: dict[int, list[dict[str, float]]] = {}
    for n in args.sites:
        pairs[n] = []
        for rep in range(args.reps):
            kinds = ("plain", "secagg", "flower") if rep == 0 else ("plain", "secagg")
            got = {}
            for kind in kinds:
                timing = fresh(kind, n, args.rounds)
                got[kind] = timing
                if kind == "flower" or rep == 0:
                    rows.append(timing)
                print(f"{n:3d} sites {kind:7s} (repetition {rep + 1}): {timing['seconds_per_round']:.3f} s/round, "
                      f"up {timing['bytes_up_per_site'] / 1e3:.1f} kB, down {timing['bytes_down_per_site'] / 1e3:.1f} kB "
                      f"per site per round", flush=True)
            fl = crypto_floor(n)  # right after the runs it bounds (the machine's speed drifts over minutes)
            pairs[n].append({"plain": got["plain"]["seconds_per_round"], "secagg": got["secagg"]["seconds_per_round"],
                             "floor": fl["per_round"], "neighbours": fl["neighbours"]})
    lines = ["| sites | method | s/round | × plain | × Flower SecAgg+ | kB up/site/round | kB down/site/round |",
             "|---|---|---|---|---|---|---|"]
    bound_lines = ["| sites | neighbours | plain s/round | crypto floor s/round | secagg s/round | secagg / plain [range] "
                   "| bound / plain [range] | secagg / bound [range] |", "|---|---|---|---|---|---|---|---|"]

    def med(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"

    summary: dict[int, dict[str, float]] = {}
    for n in args.sites:
        ps = pairs[n]
        ratio = [q["secagg"] / q["plain"] for q in ps]
        bound = [(q["plain"] + q["floor"]) / q["plain"] for q in ps]
        to_bound = [q["secagg"] / (q["plain"] + q["floor"]) for q in ps]
        summary[n] = {"ratio": statistics.median(ratio), "bound": statistics.median(bound),
                      "to_bound": statistics.median(to_bound)}
        bound_lines.append(f"| {n} | {ps[0]['neighbours']} | {statistics.median(q['plain'] for q in ps):.3f} "
                           f"| {statistics.median(q['floor'] for q in ps):.3f} "
                           f"| {statistics.median(q['secagg'] for q in ps):.3f} | **{med(ratio)}** | {med(bound)} "
                           f"| {med(to_bound)} |")
        by = {r["kind"]: r for r in rows if r["sites"] == n}
        for kind, label in (("plain", "fedsilo plain"), ("secagg", "fedsilo secagg"), ("flower", "Flower SecAgg+ (legacy)")):
            r = by[kind]
            lines.append(f"| {n} | {label} | {r['seconds_per_round']:.3f} | "
                         f"{r['seconds_per_round'] / by['plain']['seconds_per_round']:.2f} | "
                         f"{r['seconds_per_round'] / by['flower']['seconds_per_round']:.2f} | "
                         f"{r['bytes_up_per_site'] / 1e3:.1f} | {r['bytes_down_per_site'] / 1e3:.1f} |")
    eng = engine(10, args.rounds) if args.engine else None
    command = " ".join(["python benchmarks/secagg.py", *sys.argv[1:]])
    text = (f"Produced by `{command}`: finance, IID, 1 local epoch, {args.rounds} rounds, in-process "
            f"(real ServerApp/ClientApp objects, every message through Flower's protobuf serialisation, no Ray or gRPC); "
            f"s/round is the median of rounds 2..{args.rounds}; the first table is the first repetition (and "
            f"Flower's one run).\n\n" + "\n".join(lines) + "\n\n"
            "Bound: plain fedsilo's round plus the per-round work the protocol cannot skip once the job's keys are "
            "agreed (per site: the ratchet of each neighbour's chain, one AES-CTR mask expansion per neighbour and "
            "its own, one Shamir sharing of its self-mask seed, one sealed and one opened share per neighbour; at "
            "the coordinator one self-mask and one reconstruction per site), timed alone in this process "
            "(`crypto_floor`) right after each plain/secagg pair. Medians over "
            f"{args.reps} interleaved pairs per site count, ranges in brackets.\n\n" + "\n".join(bound_lines) + "\n")
    if eng:
        text += (f"\nSimulation engine, 10 sites (`fedsilo`): plain {eng['plain']:.3f} s/round, secagg "
                 f"{eng['secagg']:.3f} s/round, ratio {eng['secagg'] / eng['plain']:.2f}.\n")
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "secagg.json").write_text(json.dumps({"command": command, "rows": rows, "engine_10_sites": eng,
                                                 "pairs": pairs, "summary": summary}, indent=1) + "\n")
    (out / "secagg.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
