"""Issue #37's figures: survival analyses across sites (``learner.name=survival``) beside lifelines on the pooled rows.

Both data sets with a federation: NCCTG lung (six institution sites) and GBSG2 (four sites). In the same run,
lifelines on the pooled rows of the same files (the schema's rows: complete in the used columns):

1. Kaplan-Meier survival, Greenwood's sum and the bands against ``KaplanMeierFitter`` (max abs difference at the
   event times), medians, the log-rank test against ``logrank_test``; on a coarser grid (30 days) against
   lifelines on the times floored to it, and the largest shift from the exact curve;
2. Cox (Efron) against ``CoxPHFitter`` under plain aggregation, secure aggregation and Paillier (max abs
   difference of coefficients and standard errors; lifelines asked to stop at 1e-12 rather than its default
   1e-7, which leaves its own coefficients about 6e-6 from the maximum), Newton iterations and seconds per fit;
   Breslow against the
   same likelihood maximised on the pooled rows (scipy); Harrell's C against ``concordance_index``;
   the proportional-hazards test (scaled Schoenfeld residuals, 1 - KM as the time transform) against lifelines'
   ``proportional_hazard_test``;
3. Cox stratified by site against ``CoxPHFitter(strata=...)``, beside an inverse-variance meta-analysis of per-site
   fits (what a consortium gets without pooling).

    python benchmarks/survival.py          # a few minutes on 2 cores

Writes ``benchmarks/results/survival.json`` and ``survival.md``.
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
    "lung": {"schema": "schemas/lung.yaml", "data": "ncctg_lung/sites", "time": "time", "event": "status",
             "group": "sex", "covariates": ["age", "sex", "ph.ecog", "ph.karno", "pat.karno", "meal.cal", "wt.loss"],
             "coded": {"sex": ("sex=2", lambda s: (s == 2).astype(float))}},
    "gbsg2": {"schema": "schemas/gbsg2.yaml", "data": "gbsg2/sites", "time": "time", "event": "cens", "group": "horTh",
              "covariates": ["horTh", "age", "menostat", "tsize", "tgrade_II", "tgrade_III", "pnodes", "progrec",
                             "estrec"],
              "coded": {"horTh": ("horTh=yes", lambda s: (s == "yes").astype(float)),
                        "menostat": ("menostat=Post", lambda s: (s == "Post").astype(float))}},
}


def pooled(name: str) -> pd.DataFrame:
    spec = SETS[name]
    frames = []
    for f in sorted((DATA / str(spec["data"])).glob("*.csv")):
        d = pd.read_csv(f)
        d["site"] = f.stem
        frames.append(d)
    d = pd.concat(frames)
    if name == "gbsg2":
        d["tgrade_II"] = (d["tgrade"] == "II").astype(float)
        d["tgrade_III"] = (d["tgrade"] == "III").astype(float)
    raw_group = d[spec["group"]].astype(str).copy()
    for col, (_, fn) in spec["coded"].items():
        d[col] = fn(d[col])
    d["group"] = raw_group
    return d.dropna(subset=[spec["time"], spec["event"], *spec["covariates"]]).reset_index(drop=True)


def fed_name(name: str, col: str) -> str:
    coded = SETS[name]["coded"]
    if col in coded:
        return coded[col][0]
    return col.replace("tgrade_", "tgrade=")


def run(name: str, tmp: Path, *extra: str) -> tuple[dict[str, Any], float]:
    spec = SETS[name]
    args = ["task=tabular", f"task.schema={spec['schema']}", f"task.data={spec['data']}", "partition=natural",
            "report=false", "learner.name=survival", "site_policy.statistics.min_rows=1", *extra]
    out = tmp / f"{name}-{abs(hash(extra)) % 10**8}"
    t0 = time.monotonic()
    return run_inprocess(args, out, paillier_keys=True)["learner"], time.monotonic() - t0  # Paillier: keys in out/keys


def km_figures(name: str, res: dict[str, Any], d: pd.DataFrame, grid: float = 1.0) -> dict[str, Any]:
    from lifelines import KaplanMeierFitter

    spec = SETS[name]
    out: dict[str, Any] = {}
    for level, curve in res["curves"].items():
        rows = d if level == "all" else d[d["group"] == level]
        t = np.floor(rows[spec["time"]].to_numpy() / grid) * grid
        kmf = KaplanMeierFitter().fit(t, rows[spec["event"]])
        at = np.asarray(curve["time"])
        sf = kmf.survival_function_.loc[at].to_numpy()[:, 0]
        sq = kmf._cumulative_sq_.loc[at].to_numpy()
        ci = kmf.confidence_interval_.loc[at].to_numpy()
        out[level] = {"max_abs_survival": float(np.max(np.abs(np.asarray(curve["survival"]) - sf))),
                      "max_abs_greenwood": float(np.nanmax(np.abs(np.asarray(curve["greenwood"]) - sq))),
                      "max_abs_band": float(max(np.max(np.abs(np.asarray(curve["lower"]) - ci[:, 0])),
                                                np.max(np.abs(np.asarray(curve["upper"]) - ci[:, 1])))),
                      "median": curve["median"], "lifelines_median": float(kmf.median_survival_time_),
                      "rows": curve["rows"]}
    return out


def section(name: str, tmp: Path) -> dict[str, Any]:
    from lifelines import CoxPHFitter
    from lifelines.statistics import logrank_test
    from lifelines.utils import concordance_index

    sys.path.insert(0, str(REPO))
    from tests.integration.test_survival import breslow_fit

    spec = SETS[name]
    d = pooled(name)
    covs = spec["covariates"]
    te = [spec["time"], spec["event"]]
    out: dict[str, Any] = {"rows": len(d), "events": int(d[spec["event"]].sum()), "sites": int(d["site"].nunique())}
    plain, secs = run(name, tmp, f"+learner.options.group={spec['group']}")
    out["km"] = km_figures(name, plain, d)
    levels = [lvl for lvl in plain["curves"] if lvl != "all"]
    a, b = d[d["group"] == levels[0]], d[d["group"] == levels[1]]
    lr = logrank_test(a[spec["time"]], b[spec["time"]], a[spec["event"]], b[spec["event"]])
    out["logrank"] = {"statistic": plain["logrank"]["statistic"], "lifelines": float(lr.test_statistic),
                      "abs_difference": abs(plain["logrank"]["statistic"] - float(lr.test_statistic)),
                      "p": plain["logrank"]["p"], "lifelines_p": float(lr.p_value),
                      "stratified_by_site": plain["logrank"].get("stratified_by_site")}
    grid, _ = run(name, tmp, f"+learner.options.group={spec['group']}", "+learner.options.grid=30",
                  "+learner.options.cox=false")
    out["km_grid_30"] = {"exact": grid["exact"], "vs_lifelines_on_floored_times": km_figures(name, grid, d, 30.0)["all"],
                         "largest_shift_from_exact": float(np.max(np.abs(
                             np.interp(np.asarray(grid["curves"]["all"]["time"]), np.asarray(plain["curves"]["all"]["time"]),
                                       np.asarray(plain["curves"]["all"]["survival"])) -
                             np.asarray(grid["curves"]["all"]["survival"]))))}
    tight = {"precision": 1e-12, "max_steps": 500}  # lifelines' default stop (1e-7) leaves ~6e-6 on lung
    cph = CoxPHFitter().fit(d[[*te, *covs]], *te, fit_options=tight)
    lp = d[covs].to_numpy() @ np.array([plain["cox"]["coefficients"][fed_name(name, c)]["coef"] for c in covs])
    cox: dict[str, Any] = {}
    for agg in ("plain", "secagg", "paillier"):
        res, secs = (plain, secs) if agg == "plain" else run(name, tmp, f"aggregation={agg}",
                                                              f"+learner.options.group={spec['group']}")
        coef = np.array([res["cox"]["coefficients"][fed_name(name, c)]["coef"] for c in covs])
        se = np.array([res["cox"]["coefficients"][fed_name(name, c)]["se"] for c in covs])
        cox[agg] = {"max_abs_coef": float(np.max(np.abs(coef - cph.params_[covs].to_numpy()))),
                    "max_abs_se": float(np.max(np.abs(se - cph.standard_errors_[covs].to_numpy()))),
                    "iterations": res["cox"]["iterations"], "seconds_per_run": secs,
                    "same_as_plain": res["cox"]["coefficients"] == plain["cox"]["coefficients"]}
    out["cox_efron"] = cox
    from lifelines.statistics import proportional_hazard_test

    ref = proportional_hazard_test(cph, d[[*te, *covs]], time_transform="km").summary
    ph = plain["cox"]["proportional_hazards"]
    out["proportional_hazards"] = {
        "max_abs_statistic": float(max(abs(ph[fed_name(name, c)]["statistic"] - ref.loc[c, "test_statistic"])
                                       for c in covs)),
        "max_abs_p": float(max(abs(ph[fed_name(name, c)]["p"] - ref.loc[c, "p"]) for c in covs)),
        "smallest_p": min((ph[fed_name(name, c)]["p"], c) for c in covs), "global": ph["global"]}
    out["concordance"] = {"fedsilo": plain["cox"]["concordance"]["c_index"], "bound": plain["cox"]["concordance"]["bound"],
                          "lifelines": float(concordance_index(d[spec["time"]], -lp, d[spec["event"]]))}
    bres, _ = run(name, tmp, "+learner.options.ties=breslow", "+learner.options.score_bins=0")
    bcoef = np.array([bres["cox"]["coefficients"][fed_name(name, c)]["coef"] for c in covs])
    out["cox_breslow"] = {"max_abs_coef_vs_pooled_scipy": float(np.max(np.abs(bcoef - breslow_fit(d.rename(
        columns={spec["time"]: "time", spec["event"]: "status"}), covariates=covs))))}
    strat, _ = run(name, tmp, "+learner.options.strata=site", "+learner.options.score_bins=0")
    scph = CoxPHFitter().fit(d[[*te, "site", *covs]], *te, strata=["site"], fit_options=tight)
    scoef = np.array([strat["cox"]["coefficients"][fed_name(name, c)]["coef"] for c in covs])
    sse = np.array([strat["cox"]["coefficients"][fed_name(name, c)]["se"] for c in covs])
    # meta-analysis of per-site fits (fixed effect, inverse variance): what sites get without pooling their risk sets
    fits, fails = [], []
    for site, rows in d.groupby("site"):
        try:
            f = CoxPHFitter(penalizer=0.0).fit(rows[[*te, *covs]], *te)
            fits.append((f.params_[covs].to_numpy(), f.standard_errors_[covs].to_numpy()))
        except Exception as err:  # a site too small for its own fit (separation, singular Hessian)
            fails.append(f"{site}: {type(err).__name__}")
    w = np.array([1 / s**2 for _, s in fits])
    meta = (np.array([c for c, _ in fits]) * w).sum(axis=0) / w.sum(axis=0)
    meta_se = 1 / np.sqrt(w.sum(axis=0))
    out["stratified"] = {"max_abs_coef": float(np.max(np.abs(scoef - scph.params_[covs].to_numpy()))),
                         "max_abs_se": float(np.max(np.abs(sse - scph.standard_errors_[covs].to_numpy()))),
                         "coef": dict(zip(covs, scoef.tolist())), "se": dict(zip(covs, sse.tolist())),
                         "meta_coef": dict(zip(covs, meta.tolist())), "meta_se": dict(zip(covs, meta_se.tolist())),
                         "meta_sites": len(fits), "meta_failed": fails,
                         "median_se_ratio_meta_over_pooled": float(np.median(meta_se / sse))}
    return out


def markdown(r: dict[str, Any]) -> str:
    lines = ["# Survival analyses across sites (issue #37)", "", f"`python benchmarks/survival.py` on {r['machine']}; "
             "lifelines 0.30.3 on the pooled rows of the same files, same run.", ""]
    for name in SETS:
        if name not in r:
            continue
        s = r[name]
        lines += [f"## {name}: {s['rows']} patients, {s['events']} events, {s['sites']} sites", "",
                  "| estimate | fedsilo vs lifelines (max abs difference) |", "|---|---|"]
        for level, k in s["km"].items():
            lines.append(f"| Kaplan-Meier, {level} ({k['rows']} rows): survival / Greenwood / bands | "
                         f"{k['max_abs_survival']:.1e} / {k['max_abs_greenwood']:.1e} / {k['max_abs_band']:.1e}; median "
                         f"{k['median']:g} (lifelines {k['lifelines_median']:g}) |")
        lr = s["logrank"]
        lines.append(f"| log-rank statistic (p) | {lr['statistic']:.6f} vs {lr['lifelines']:.6f} ({lr['p']:.3g} vs "
                     f"{lr['lifelines_p']:.3g}); stratified by site: {lr['stratified_by_site']['statistic']:.4f} |")
        g = s["km_grid_30"]
        lines.append(f"| Kaplan-Meier on a 30-day grid vs lifelines on the floored times | "
                     f"{g['vs_lifelines_on_floored_times']['max_abs_survival']:.1e}; largest change from the exact "
                     f"curve {g['largest_shift_from_exact']:.3f} |")
        for agg, c in s["cox_efron"].items():
            lines.append(f"| Cox (Efron), {agg}: coefficients / standard errors | {c['max_abs_coef']:.1e} / "
                         f"{c['max_abs_se']:.1e} ({c['iterations']} Newton steps, {c['seconds_per_run']:.1f} s per run "
                         f"with the curves; same as plain: {c['same_as_plain']}) |")
        lines.append(f"| Cox (Breslow) vs the pooled likelihood maximised by scipy | "
                     f"{s['cox_breslow']['max_abs_coef_vs_pooled_scipy']:.1e} |")
        ph = s.get("proportional_hazards")
        if ph:
            lines.append(f"| proportional-hazards test (Schoenfeld, 1 - KM) vs `proportional_hazard_test`: statistics / "
                         f"p | {ph['max_abs_statistic']:.1e} / {ph['max_abs_p']:.1e} (smallest p {ph['smallest_p'][0]:.3g}, "
                         f"{ph['smallest_p'][1]}; global {ph['global']['statistic']:.3f}, df {ph['global']['df']}, "
                         f"p {ph['global']['p']:.3g}) |")
        c = s["concordance"]
        lines.append(f"| Harrell's C | {c['fedsilo']:.5f} vs {c['lifelines']:.5f} (bound {c['bound']:.1e}) |")
        st = s["stratified"]
        lines += [f"| Cox stratified by site: coefficients / standard errors | {st['max_abs_coef']:.1e} / "
                  f"{st['max_abs_se']:.1e} |", "",
                  f"Stratified by site (pooled risk sets within each site) beside a fixed-effect meta-analysis of "
                  f"per-site fits ({st['meta_sites']} sites fitted; failed: {st['meta_failed'] or 'none'}): the median "
                  f"ratio of standard errors, meta-analysis over pooled, is {st['median_se_ratio_meta_over_pooled']:.2f}.",
                  "", "| covariate | stratified coef (se) | meta-analysis coef (se) |", "|---|---|---|"]
        for cov in st["coef"]:
            lines.append(f"| {cov} | {st['coef'][cov]:.4f} ({st['se'][cov]:.4f}) | {st['meta_coef'][cov]:.4f} "
                         f"({st['meta_se'][cov]:.4f}) |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    results: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    with tempfile.TemporaryDirectory() as tmp:
        for name in SETS:
            t0 = time.monotonic()
            results[name] = section(name, Path(tmp))
            print(f"{name}: {time.monotonic() - t0:.0f} s", flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "survival.json").write_text(json.dumps(results, indent=1, default=str))
    (OUT / "survival.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
