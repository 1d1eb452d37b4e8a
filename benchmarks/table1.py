"""Issue #37's Table 1 figures (``fedsilo stats``, ``learner.name=table1``) beside numpy and pandas on the pooled rows.

GBSG2 (four sites, grouped by hormonal therapy) and NCCTG lung (six institutions, grouped by sex), each with the
sites' disclosure control at ``statistics.min_count`` 5 (the default; grouped and not: the control works per site
and group level, so small levels cost more) and at 1 (none), and 2^10 cells per numeric variable (2^12 for the run
without control). In the same run, on the pooled rows of the same files: numpy's
quartiles (``linear``), mean and standard deviation; pandas' category counts. Printed per data set and setting:

* the largest |estimate - numpy| of the pooled quartiles (each also in the interval the table states: checked),
  relative to the variable's interquartile range, and the median interval's width relative to it;
* the largest |mean - numpy| and |sd - numpy|;
* the cells suppressed and the rows in them, the numeric variables whose histograms a site coarsened, and the
  counts from 1 to 4 in the sites' own columns (none under control; some without);
* seconds per table under plain aggregation, secure aggregation and Paillier (GBSG2, control on).

    python benchmarks/table1.py        # about a minute on 2 cores, Paillier included

Writes ``benchmarks/results/table1.json`` and ``table1.md``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.runtime.local_grid import run_inprocess  # noqa: E402

DATA = REPO / "tasks" / "data"
OUT = REPO / "benchmarks" / "results"
SETS = {
    "gbsg2": {"schema": "schemas/gbsg2.yaml", "data": "gbsg2/sites", "group": "horTh",
              "numeric": ["time", "age", "tsize", "pnodes", "progrec", "estrec"], "drop": []},
    "lung": {"schema": "schemas/lung.yaml", "data": "ncctg_lung/sites", "group": "sex",
             "numeric": ["time", "age", "ph.ecog", "ph.karno", "pat.karno", "meal.cal", "wt.loss"],
             "drop": ["time", "status", "age", "sex", "ph.ecog", "ph.karno", "pat.karno", "meal.cal", "wt.loss"]},
}
QS = (0.25, 0.5, 0.75)


def pooled(name: str) -> pd.DataFrame:
    spec = SETS[name]
    d = pd.concat([pd.read_csv(f) for f in sorted((DATA / str(spec["data"])).glob("*.csv"))])
    if spec["drop"]:  # the schema's missing: drop_row
        d = d.dropna(subset=spec["drop"])
    return d.reset_index(drop=True)


def table(name: str, extra: list[str]) -> tuple[dict[str, Any], float]:
    spec = SETS[name]
    args = ["task=tabular", f"task.schema={spec['schema']}", f"task.data={spec['data']}", "partition=natural",
            "report=false", "learner.name=table1",
            *([] if "+learner.options.group=" in extra else [f"+learner.options.group={spec['group']}"]),
            *[e for e in extra if e != "+learner.options.group="]]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = run_inprocess(args, Path(tmp), paillier_keys=True)
        return res["learner"], time.perf_counter() - t0


def compare(name: str, res: dict[str, Any]) -> dict[str, Any]:
    d, spec = pooled(name), SETS[name]
    col = res["pooled"]["all"]["variables"]
    worst_q = worst_mean = worst_sd = 0.0
    widths, outside, moved = [], 0, 0
    for v in spec["numeric"]:
        s, x = col[v], d[v].to_numpy(float)
        iqr = max(float(np.quantile(x, 0.75) - np.quantile(x, 0.25)), 1e-12)
        for p in QS:
            q, truth = s["quantiles"][str(p)], float(np.quantile(x, p))
            worst_q = max(worst_q, abs(q["estimate"] - truth) / iqr)
            outside += not q["lower"] <= truth <= q["upper"]
        widths.append((s["quantiles"]["0.5"]["upper"] - s["quantiles"]["0.5"]["lower"]) / iqr)
        worst_mean = max(worst_mean, abs(s["mean"] - x.mean()))
        worst_sd = max(worst_sd, abs(s["sd"] - x.std(ddof=1)))
        moved += s["coarsened"]
    cats = [v["name"] for v in res["variables"] if not v["numeric"]]
    suppressed = sum(col[c]["suppressed_cells"] for c in cats)
    suppressed_rows = sum(col[c]["suppressed_rows"] for c in cats)
    site_cells = [n for site in res["sites"].values() for c in site.values() for s in c["variables"].values()
                  for n in s.get("counts", {}).values()]
    return {"quartile_error_over_iqr": worst_q, "quartiles_outside_interval": outside,
            "median_interval_over_iqr_median": float(np.median(widths)),
            "median_interval_over_iqr_max": float(np.max(widths)), "mean_error": worst_mean, "sd_error": worst_sd,
            "suppressed_cells": suppressed, "suppressed_rows": suppressed_rows, "variables_coarsened": moved,
            "site_counts_below_min_count": int(sum(1 for n in site_cells if 0 < n < 5))}


def main() -> None:
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    out: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    for name in SETS:
        for label, extra in (("min_count=5", []),
                             ("min_count=5, no group", ["+learner.options.group="]),
                             ("min_count=1, 2^12 cells", ["site_policy.statistics.min_count=1",
                                                         "+learner.options.bits=12"])):
            res, secs = table(name, extra)
            out[f"{name} {label}"] = {**compare(name, res), "seconds_plain": secs}
            print(name, label, json.dumps(out[f"{name} {label}"]), flush=True)
    times = {}
    for agg in ("plain", "secagg", "paillier"):
        _, times[agg] = table("gbsg2", [f"aggregation={agg}"])
    out["gbsg2 seconds"] = times
    print("gbsg2 seconds", times, flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "table1.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = ["# Table 1 across sites (`python benchmarks/table1.py`)", "", f"Machine: {out['machine']}.", "",
             "Pooled 'all' column against numpy on the pooled rows of the same files (same run). Quartile error and "
             "the median's stated interval are relative to the variable's interquartile range (IQR).", "",
             "| data, setting | max quartile error / IQR | quartiles outside the interval | median interval / IQR "
             "(median, max) | max mean error | max sd error | suppressed cells (rows) | numeric variables coarsened | "
             "site counts 1-4 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, r in out.items():
        if isinstance(r, dict) and "quartile_error_over_iqr" in r:
            lines.append(f"| {key} | {r['quartile_error_over_iqr']:.4f} | {r['quartiles_outside_interval']} | "
                         f"{r['median_interval_over_iqr_median']:.3f}, {r['median_interval_over_iqr_max']:.3f} | "
                         f"{r['mean_error']:.1e} | {r['sd_error']:.1e} | {r['suppressed_cells']} "
                         f"({r['suppressed_rows']}) | {r['variables_coarsened']} | {r['site_counts_below_min_count']} |")
    lines += ["", "Seconds per table (GBSG2, 686 rows, 4 sites, grouped, min_count=5, in process): "
              + ", ".join(f"{k} {v:.2f}" for k, v in times.items())
              + f" (secagg/plain {times['secagg'] / times['plain']:.2f}x, Paillier/plain "
              f"{times['paillier'] / times['plain']:.1f}x).", ""]
    (OUT / "table1.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
