"""Issue #20: bytes from the sites and final AUC under update compression, beside float32.

Every run is fedsilo's real ServerApp and ClientApp in this process (``run_inprocess``); the
bytes are the traffic records of ``results.json`` (what the replies' records carry: raw array
bytes, numbers at 8 bytes, keys and strings at their length), so every figure counts the
whole reply, not only the update. Federated evaluation is off in the plain and secagg parts
(``strategy.fraction_evaluate=0``: the server scores the model on the task's test set), so the
bytes from the sites are the training replies (and secure aggregation's key stages). Three
parts, each beside its baseline in the same run:

* ``plain``: finance (MLP, 3,969 values) and medical imaging (CNN, 105,377 values), each
  compression setting beside uncompressed float32, 3 seeds;
* ``secagg``: secure aggregation with its default 53-bit field beside a 24-bit field
  (``value_bits=8``, ``weight_bits=16``, ``clip=0.5``) and ``randk`` under it;
* ``paillier``: fewer bits per value (``aggregation.value_bits``) beside the default 20 bits:
  ciphertexts (= encryptions) per site per round, seconds per round, bytes, AUC.

    python benchmarks/compression.py                      # all parts, about 30 minutes on 2 cores
    python benchmarks/compression.py --part plain --seeds 0

Results: ``benchmarks/results/compression.{md,json}``.
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

import aggregation  # noqa: E402
from app import config  # noqa: E402
from app.runtime.local_grid import run_inprocess  # noqa: E402

TASKS = {"finance": 10, "medical_imaging": 12}  # task -> rounds
SETTINGS = {
    "float32": [],
    "fp16": ["aggregation.compress=fp16"],
    "int8": ["aggregation.compress=int8"],
    "int4": ["aggregation.compress=int4"],
    "randk 10%": ["aggregation.compress=randk", "aggregation.keep=0.1"],
    "topk 10%": ["aggregation.compress=topk", "aggregation.keep=0.1"],
    "topk 2%": ["aggregation.compress=topk", "aggregation.keep=0.02"],
    "topk 1%": ["aggregation.compress=topk", "aggregation.keep=0.01"],
}


def run(overrides: list[str], tmp: Path) -> dict:
    t0 = time.perf_counter()
    res = run_inprocess(overrides, tmp / f"run-{time.monotonic_ns()}")
    hist = res["history"]
    up = [h["traffic"]["bytes_from_sites"] for h in hist if h.get("traffic")]
    down = [h["traffic"]["bytes_to_sites"] for h in hist if h.get("traffic")]
    clipped = sum(int(h.get("train", {}).get("clipped_values", 0)) for h in hist)
    # Paillier: the coordinator holds no model; the sites' pooled evaluation scores it (site-weighted AUC)
    auc = res["final"]["auc"] if "auc" in res["final"] else res["final_federated_evaluate"]["auc_site_weighted"]
    return {"auc": float(auc), "bytes_up": statistics.mean(up), "bytes_down": statistics.mean(down),
            "clipped": clipped,
            "seconds": time.perf_counter() - t0, "seconds_per_round": statistics.mean(h["seconds"] for h in hist)}


def plain(seeds: list[int], tmp: Path) -> list[dict]:
    rows = []
    for task, rounds in TASKS.items():
        for seed in seeds:
            base = None
            for name, extra in SETTINGS.items():
                r = run([f"task={task}", f"num_rounds={rounds}", f"seed={seed}", "strategy.fraction_evaluate=0",
                         *extra], tmp)
                base = base or r
                row = {"part": "plain", "task": task, "seed": seed, "setting": name, **r,
                       "fewer_bytes": base["bytes_up"] / r["bytes_up"], "auc_loss": base["auc"] - r["auc"]}
                rows.append(row)
                print(f"{task:16s} seed {seed} {name:10s} up {r['bytes_up']:>10,.0f} B/round "
                      f"({row['fewer_bytes']:6.1f}x fewer)  AUC {r['auc']:.4f} (loss {row['auc_loss']:+.4f})", flush=True)
    return rows


def secagg(seeds: list[int], tmp: Path) -> list[dict]:
    rows = []
    for seed in seeds:
        base = None
        short = ["aggregation.value_bits=8", "aggregation.weight_bits=16", "aggregation.clip=0.5"]
        for name, extra in {"secagg": [],
                            "secagg 8+16-bit field": short,
                            "secagg + randk 10%": ["aggregation.compress=randk", "aggregation.keep=0.1"],
                            "secagg 8+16-bit + randk 10%": [*short, "aggregation.compress=randk", "aggregation.keep=0.1"],
                            "secagg + randk 1%": ["aggregation.compress=randk", "aggregation.keep=0.01"]}.items():
            r = run(["task=finance", "num_rounds=10", f"seed={seed}", "aggregation=secagg",
                     "strategy.fraction_evaluate=0", *extra], tmp)
            base = base or r
            row = {"part": "secagg", "task": "finance", "seed": seed, "setting": name, **r,
                   "fewer_bytes": base["bytes_up"] / r["bytes_up"], "auc_loss": base["auc"] - r["auc"]}
            rows.append(row)
            print(f"finance seed {seed} {name:28s} up {r['bytes_up']:>10,.0f} B/round ({row['fewer_bytes']:5.1f}x fewer) "
                  f"AUC {r['auc']:.4f}, {r['clipped']} values clipped", flush=True)
    return rows


def paillier(tmp: Path) -> list[dict]:
    from aggregation.paillier.config import packer_for

    rows = []
    cfg = config.compose(["task=finance", "aggregation=paillier"])
    keys, _ = aggregation.get("paillier").simulation_setup(cfg.aggregation, tmp)
    base = None
    for bits in (20, 12, 8):
        over = ["task=finance", "num_rounds=5", "seed=0", "aggregation=paillier", f"aggregation.value_bits={bits}",
                "strategy.fraction_evaluate=1", *keys]  # the sites' evaluation scores the encrypted model
        r = run(over, tmp)
        c = config.compose(over)
        size = 3969
        packer = packer_for(c.aggregation, 2048)
        cts = packer.count(size) + 1  # the model's ciphertexts and the row count
        base = base or {**r, "cts": cts}
        row = {"part": "paillier", "task": "finance", "seed": 0, "setting": f"value_bits={bits}", **r,
               "ciphertexts_per_site": cts, "fewer_encryptions": base["cts"] / cts,
               "round_speedup": base["seconds_per_round"] / r["seconds_per_round"],
               "fewer_bytes": base["bytes_up"] / r["bytes_up"], "auc_loss": base["auc"] - r["auc"]}
        rows.append(row)
        print(f"paillier value_bits={bits:2d}: {cts} encryptions/site/round ({row['fewer_encryptions']:.2f}x fewer), "
              f"{r['seconds_per_round']:.2f} s/round ({row['round_speedup']:.2f}x), up {r['bytes_up']:,.0f} B, "
              f"AUC {r['auc']:.4f}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| part | task | setting | seeds | bytes up / round | fewer than baseline | AUC | AUC loss (mean, worst) |",
           "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["part"], r["task"], r["setting"]) for r in rows}, key=lambda k: [
        (r["part"], r["task"]) for r in rows].index(k[:2]) * 100 + [r["setting"] for r in rows].index(k[2]))
    for part, task, setting in keys:
        sel = [r for r in rows if (r["part"], r["task"], r["setting"]) == (part, task, setting)]
        out.append(f"| {part} | {task} | {setting} | {len(sel)} | {statistics.mean(r['bytes_up'] for r in sel):,.0f} | "
                   f"{statistics.mean(r['fewer_bytes'] for r in sel):.1f}x | "
                   f"{statistics.mean(r['auc'] for r in sel):.4f} | "
                   f"{statistics.mean(r['auc_loss'] for r in sel):+.4f}, {max(r['auc_loss'] for r in sel):+.4f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["all", "plain", "secagg", "paillier"], default="all")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "compression"))
    args = ap.parse_args()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.part in ("all", "plain"):
            rows += plain(args.seeds, tmp)
        if args.part in ("all", "secagg"):
            rows += secagg(args.seeds, tmp)
        if args.part in ("all", "paillier"):
            rows += paillier(tmp)
    md = table(rows)
    print(md)
    Path(args.out + ".md").write_text("# Update compression (benchmarks/compression.py)\n\n" + md + "\n")
    Path(args.out + ".json").write_text(json.dumps(rows, indent=1))
    print(json.dumps({"rows": len(rows)}))


if __name__ == "__main__":
    main()
