"""``learner=survival`` through the real ServerApp and ClientApps (in process), against lifelines on the pooled rows.

NCCTG lung cancer over its six institution sites (tasks/data/ncctg_lung): Kaplan-Meier, Greenwood and the median
as lifelines' ``KaplanMeierFitter``, the log-rank test as ``logrank_test``, the Cox model as ``CoxPHFitter``
(Efron's ties; Breslow's against the same likelihood maximised here on the pooled rows), stratified by site as
``CoxPHFitter(strata=...)``, and Harrell's C as ``concordance_index``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from app.runtime.local_grid import run_inprocess
from tests.conftest import DATA_DIR, pooled_site_files

LUNG = ["task=tabular", "task.schema=schemas/lung.yaml", "task.data=ncctg_lung/sites", "partition=natural",
        "report=false", "site_policy.statistics.min_rows=1"]
COVARIATES = ["age", "sex", "ph.ecog", "ph.karno", "pat.karno", "meal.cal", "wt.loss"]
#: lifelines' Newton stops when the step's norm is below 1e-7 (its default), which leaves its coefficients about
#: 6e-6 from the maximum on lung; asked to go on to 1e-12 it agrees with fedsilo to about 1e-11
TIGHT = {"precision": 1e-12, "max_steps": 500}


def pooled_lung() -> pd.DataFrame:
    """The sites' rows, pooled, as the schema reads them (rows complete in the used columns; sex as 2 = 1)."""
    d = pooled_site_files("ncctg_lung/sites").dropna(subset=["time", "status", *COVARIATES])
    d["sex"] = (d["sex"] == 2).astype(float)
    return d.reset_index(drop=True)


@pytest.fixture(scope="module")
def lung(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("lung")
    return run_inprocess([*LUNG, "learner.name=survival", "+learner.options.group=sex"], out)["learner"]


def test_kaplan_meier_greenwood_median_and_logrank_equal_lifelines(lung: dict[str, Any]) -> None:
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import logrank_test

    d = pooled_lung()
    assert lung["exact"] and lung["rows"] == len(d) == 167 and lung["events"] == int(d["status"].sum())
    for level, rows in (("all", d), ("1", d[d["sex"] == 0]), ("2", d[d["sex"] == 1])):
        kmf = KaplanMeierFitter().fit(rows["time"], rows["status"])
        curve = lung["curves"][level]
        at = np.asarray(curve["time"])
        sf = kmf.survival_function_.loc[at].to_numpy()[:, 0]
        np.testing.assert_allclose(curve["survival"], sf, rtol=0, atol=1e-12, err_msg=level)
        sq = kmf._cumulative_sq_.loc[at].to_numpy()
        np.testing.assert_allclose(curve["greenwood"], sq, rtol=0, atol=1e-12, err_msg=level)
        ci = kmf.confidence_interval_.loc[at].to_numpy()
        np.testing.assert_allclose(curve["lower"], ci[:, 0], rtol=0, atol=1e-12, err_msg=level)
        np.testing.assert_allclose(curve["upper"], ci[:, 1], rtol=0, atol=1e-12, err_msg=level)
        assert curve["median"] == kmf.median_survival_time_
    lr = logrank_test(d.loc[d["sex"] == 0, "time"], d.loc[d["sex"] == 1, "time"],
                      d.loc[d["sex"] == 0, "status"], d.loc[d["sex"] == 1, "status"])
    assert lung["logrank"]["statistic"] == pytest.approx(lr.test_statistic, abs=1e-9)
    assert lung["logrank"]["p"] == pytest.approx(lr.p_value, abs=1e-12)
    assert lung["logrank"]["stratified_by_site"]["df"] == 1


def test_cox_efron_equals_lifelines_and_concordance_is_within_its_bound(lung: dict[str, Any]) -> None:
    from lifelines import CoxPHFitter
    from lifelines.utils import concordance_index

    d = pooled_lung()
    cph = CoxPHFitter().fit(d[["time", "status", *COVARIATES]], "time", "status", fit_options=TIGHT)
    cox = lung["cox"]
    assert cox["converged"] and cox["ties"] == "efron"
    names = {"sex": "sex=2"}
    for c in COVARIATES:
        got = cox["coefficients"][names.get(c, c)]
        assert got["coef"] == pytest.approx(cph.params_[c], abs=1e-6), c
        assert got["se"] == pytest.approx(cph.standard_errors_[c], abs=1e-6), c
    assert cox["log_likelihood"] == pytest.approx(cph.log_likelihood_, abs=1e-6)
    lp = d[COVARIATES].to_numpy() @ np.array([cox["coefficients"][names.get(c, c)]["coef"] for c in COVARIATES])
    c_index = concordance_index(d["time"], -lp, d["status"])
    conc = cox["concordance"]
    assert abs(conc["c_index"] - c_index) <= max(conc["bound"], 1e-3)


def test_the_proportional_hazards_test_equals_lifelines(lung: dict[str, Any]) -> None:
    """Grambsch-Therneau from the pooled risk-set sums (1 - KM as the time transform) = lifelines'
    ``proportional_hazard_test``, per input; the global statistic = the same quadratic form of lifelines' scaled
    Schoenfeld residuals."""
    from lifelines import CoxPHFitter
    from lifelines.statistics import proportional_hazard_test

    d = pooled_lung()[["time", "status", *COVARIATES]]
    cph = CoxPHFitter().fit(d, "time", "status", fit_options=TIGHT)
    ref = proportional_hazard_test(cph, d, time_transform="km").summary
    ph = lung["cox"]["proportional_hazards"]
    for c in COVARIATES:
        got = ph[{"sex": "sex=2"}.get(c, c)]
        assert got["statistic"] == pytest.approx(ref.loc[c, "test_statistic"], rel=1e-7), c
        assert got["p"] == pytest.approx(ref.loc[c, "p"], rel=1e-6), c
    resid = cph.compute_residuals(d, kind="scaled_schoenfeld")
    events = cph.event_observed.to_numpy().astype(bool)
    from lifelines import KaplanMeierFitter

    km = KaplanMeierFitter().fit(cph.durations, cph.event_observed)
    g = 1 - km.survival_function_.loc[cph.durations[events], "KM_estimate"].to_numpy()
    u = ((g - g.mean())[:, None] * resid.loc[:, COVARIATES].to_numpy()).sum(axis=0)
    deaths = events.sum()
    v = cph.variance_matrix_.loc[COVARIATES, COVARIATES].to_numpy()
    glob = float(u @ np.linalg.solve(v, u)) / (deaths * ((g - g.mean()) ** 2).sum())
    assert ph["global"]["statistic"] == pytest.approx(glob, rel=1e-7) and ph["global"]["df"] == len(COVARIATES)


def breslow_fit(d: pd.DataFrame, covariates: list[str] = COVARIATES) -> np.ndarray:
    """Breslow's partial likelihood maximised on the pooled rows (scipy), the reference for ties=breslow."""
    from scipy.optimize import minimize

    x = d[covariates].to_numpy()
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    t, e = d["time"].to_numpy(), d["status"].to_numpy()

    def nll(b: np.ndarray) -> tuple[float, np.ndarray]:
        lp = x @ b
        w = np.exp(lp)
        total, grad = 0.0, np.zeros(x.shape[1])
        for tj in np.unique(t[e == 1]):
            dead, risk = (t == tj) & (e == 1), t >= tj
            s0, s1 = w[risk].sum(), (w[risk, None] * x[risk]).sum(axis=0)
            total += lp[dead].sum() - dead.sum() * np.log(s0)
            grad += x[dead].sum(axis=0) - dead.sum() * s1 / s0
        return -total, -grad

    res = minimize(nll, np.zeros(x.shape[1]), jac=True, method="BFGS", options={"gtol": 1e-11, "maxiter": 10000})
    return np.asarray(res.x) / d[covariates].to_numpy().std(axis=0)


@pytest.mark.slow
def test_cox_breslow_and_stratified_by_site(tmp_path: Path) -> None:
    from lifelines import CoxPHFitter

    d = pooled_lung()
    res = run_inprocess([*LUNG, "learner.name=survival", "+learner.options.ties=breslow",
                         "+learner.options.score_bins=0"], tmp_path / "breslow")["learner"]
    want = breslow_fit(d)
    got = np.array([res["cox"]["coefficients"]["sex=2" if c == "sex" else c]["coef"] for c in COVARIATES])
    assert np.max(np.abs(got - want)) < 1e-6
    assert "concordance" not in res["cox"]
    strat = run_inprocess([*LUNG, "learner.name=survival", "+learner.options.strata=site",
                           "+learner.options.score_bins=0"], tmp_path / "strata")["learner"]
    cph = CoxPHFitter().fit(d[["time", "status", "site", *COVARIATES]], "time", "status", strata=["site"],
                            fit_options=TIGHT)
    for c in COVARIATES:
        got_c = strat["cox"]["coefficients"]["sex=2" if c == "sex" else c]
        assert got_c["coef"] == pytest.approx(cph.params_[c], abs=1e-6), c
        assert got_c["se"] == pytest.approx(cph.standard_errors_[c], abs=1e-6), c


@pytest.mark.slow
def test_the_totals_are_the_same_under_secure_aggregation(lung: dict[str, Any], tmp_path: Path) -> None:
    res = run_inprocess([*LUNG, "learner.name=survival", "+learner.options.group=sex", "aggregation=secagg"],
                        tmp_path)["learner"]
    assert res["curves"] == lung["curves"] and res["logrank"] == lung["logrank"]
    assert res["cox"]["coefficients"] == lung["cox"]["coefficients"]


@pytest.mark.slow
@pytest.mark.slow  # a Paillier run: the full suite only
def test_under_paillier_the_curves_and_the_cox_fit_are_plain_aggregations(tmp_path: Path, lung: dict[str, Any]) -> None:
    """Under Paillier (a key holder decides every step: the coordinator gets the grid's end, the counts, the next
    coefficients) the curves, the log-rank test and a Newton step of the Cox fit equal plain aggregation's, bit for
    bit (the whole fit: benchmarks/survival.py)."""
    two = ["learner.name=survival", "+learner.options.group=sex", "+learner.options.score_bins=0",
           "+learner.options.max_iter=1"]
    res = run_inprocess([*LUNG, *two, "aggregation=paillier"], tmp_path / "paillier", paillier_keys=True)["learner"]
    plain = run_inprocess([*LUNG, *two], tmp_path / "plain")["learner"]
    assert res["curves"] == lung["curves"] == plain["curves"] and res["logrank"] == lung["logrank"]
    assert res["cox"]["iterations"] == 1
    for key in ("coefficients", "log_likelihood", "covariance", "proportional_hazards"):
        assert res["cox"][key] == plain["cox"][key], key


def test_the_default_learner_of_a_survival_table_is_the_survival_analysis(tmp_path: Path) -> None:
    res = run_inprocess(LUNG, tmp_path)["learner"]
    assert res["analysis"] == "survival" and res["cox"]["converged"]


def test_a_survival_file_with_a_bad_time_or_event_is_named(tmp_path: Path) -> None:
    from tasks.tabular.schema import Schema
    from tasks.tabular.table import SiteInputError, read

    schema = Schema.load(DATA_DIR / "schemas" / "lung.yaml")
    src = pd.read_csv(DATA_DIR / "ncctg_lung" / "sites" / "inst_1.csv")
    bad = src.copy()
    bad.loc[3, "time"] = -5
    bad.to_csv(tmp_path / "neg.csv", index=False)
    with pytest.raises(SiteInputError) as err:
        read(tmp_path / "neg.csv", schema)
    # the coordinator's copy names file, column and row, never the value (the site's own log has it)
    assert "time column 'time' holds a value at row 5; times are >= 0" in err.value.public and "-5" not in err.value.public
    bad = src.copy()
    k = int(np.flatnonzero(src[COVARIATES].notna().all(axis=1).to_numpy())[0])  # a row drop_row keeps
    bad.loc[k, "status"] = 2
    bad.to_csv(tmp_path / "ev.csv", index=False)
    with pytest.raises(SiteInputError) as err:
        read(tmp_path / "ev.csv", schema)
    assert f"event column 'status' holds a value at row {k + 2}" in err.value.public
    table = read(DATA_DIR / "ncctg_lung" / "sites" / "inst_1.csv", schema)
    assert table.label.shape[1] == 2 and set(np.unique(table.label[:, 1])) <= {0.0, 1.0}
