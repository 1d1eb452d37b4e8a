"""``learner=table1`` (``fedsilo stats``): a Table 1 across sites against numpy and pandas on the pooled rows, and the
disclosure control each site enforces (learners/table1.py).

GBSG2 over its four sites (tasks/data/gbsg2) and NCCTG lung over its six institutions: every count a site releases is
0 or at least its policy's ``statistics.min_count``; the pooled rows' own quartiles lie in the intervals the table
states; means and deviations are numpy's; the category counts plus the suppressed rows are pandas'.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from app import config, site_policy
from app.runtime.local_grid import run_inprocess
from core.programs import ProgramError, SiteCall
from learners import pooled
from learners.table1 import (
    QUANTILES,
    Table1Options,
    Table1Program,
    cell_index,
    dyadic_release,
    quantile,
    round_up,
    suppress_cells,
)
from tasks.tabular.task import TabularTask
from tests.conftest import DATA_DIR, pooled_site_files

GBSG2 = ["task=tabular", "task.schema=schemas/gbsg2.yaml", "task.data=gbsg2/sites", "partition=natural",
         "report=false", "learner.name=table1"]
NUMERIC = ["time", "age", "tsize", "pnodes", "progrec", "estrec"]
INTEGER = ["age", "tsize", "pnodes", "progrec", "estrec"]   # integer-valued columns


def pooled_gbsg2() -> pd.DataFrame:
    return pooled_site_files("gbsg2/sites")


# ---- the site's disclosure control, alone --------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 5, 11])
def test_a_dyadic_release_shows_no_small_count_keeps_every_row_and_nests_across_grids(k: int) -> None:
    rng = np.random.default_rng(k)
    for _ in range(40):
        counts = np.bincount(rng.integers(0, 1024, size=rng.integers(k, 300)) // rng.integers(1, 64), minlength=1024)
        released, unsure = dyadic_release(counts, k)
        assert released.sum() == counts.sum()
        assert np.all((released == 0) | (released >= k))
        # the rows up to each cell are within `unsure` of the released ones (what the quantiles' intervals rest on)
        assert np.all(np.abs(np.cumsum(counts) - np.cumsum(released)) <= unsure)
        if k == 1:  # no control: the histogram itself
            np.testing.assert_array_equal(released, counts)
            assert not unsure.any()
        # a coarser grid (cells in pairs) releases the pairs of this release: no two grids difference a small cell
        coarse, _ = dyadic_release(counts.reshape(-1, 2).sum(axis=1), k)
        np.testing.assert_array_equal(coarse, released.reshape(-1, 2).sum(axis=1))


def test_small_category_counts_are_suppressed_with_their_complement() -> None:
    out, rows, cells = suppress_cells(np.array([2, 40, 58]), 5)  # 2 alone would follow from 100 - 40 - 58
    assert out.tolist() == [0, 0, 58] and rows == 42 and cells == 2
    out, rows, cells = suppress_cells(np.array([0, 3, 3, 50]), 5)  # 3 + 3 >= 5: no third cell needed
    assert out.tolist() == [0, 0, 0, 50] and rows == 6 and cells == 2
    out, rows, cells = suppress_cells(np.array([7, 8, 9]), 5)
    assert out.tolist() == [7, 8, 9] and rows == 0 and cells == 0


@pytest.mark.parametrize("k", [1, 5, 10])
def test_the_stated_interval_holds_numpys_quantile_of_the_rows_behind_a_release(k: int) -> None:
    """The bound's proof, tried: sites' releases of skewed, tied and spread data, pooled; numpy's quantile of the
    pooled rows lies in the interval every time (and is the estimate when nothing moved)."""
    rng = np.random.default_rng(7 + k)
    end, cells = 256.0, 1024
    for trial in range(60):
        sites = [np.round(rng.lognormal(3, 0.8, size=rng.integers(20, 150)), int(rng.integers(0, 3)))
                 for _ in range(int(rng.integers(2, 6)))]
        sites = [np.minimum(x, end - 1) for x in sites]
        hist, unsure = np.zeros(cells), np.zeros(cells)
        for x in sites:
            r, u = dyadic_release(np.bincount(cell_index(x, end, cells), minlength=cells), k)
            hist += r
            unsure += round_up(u, k)
        pooled_rows = np.concatenate(sites)
        for p in QUANTILES:
            q = quantile(hist, unsure, p, end)
            truth = float(np.quantile(pooled_rows, p))
            assert q["lower"] - 1e-9 <= truth <= q["upper"] + 1e-9, (trial, p, q, truth)
            if not unsure.any():  # the interval is the cells of the two order statistics numpy interpolates
                xs, h, width = np.sort(pooled_rows), (len(pooled_rows) - 1) * p, end / cells
                assert q["lower"] <= xs[int(np.floor(h))] < q["lower"] + width
                assert q["upper"] - width <= xs[int(np.ceil(h))] < q["upper"]


# ---- through the real ServerApp and ClientApps ------------------------------------------------------------------
@pytest.fixture(scope="module")
def by_therapy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_inprocess([*GBSG2, "+learner.options.group=horTh"], tmp_path_factory.mktemp("t1"))["learner"]


def test_table1_means_counts_and_quartiles_against_the_pooled_rows(by_therapy: dict[str, Any]) -> None:
    d = pooled_gbsg2()
    assert by_therapy["site_count"] == 4 and set(by_therapy["sites"]) == {f"site_{k}" for k in range(1, 5)}
    for level, rows in (("no", d[d["horTh"] == "no"]), ("yes", d[d["horTh"] == "yes"]), ("all", d)):
        col = by_therapy["pooled"][level]
        assert col["rows"] == len(rows)
        for v in NUMERIC:
            s = col["variables"][v]
            assert s["n"] == len(rows) and s["missing"] == 0
            assert s["mean"] == pytest.approx(rows[v].mean(), abs=1e-9)
            assert s["sd"] == pytest.approx(rows[v].std(ddof=1), abs=1e-9)
            for p in QUANTILES:
                q, truth = s["quantiles"][str(p)], float(np.quantile(rows[v], p))
                assert q["lower"] <= truth <= q["upper"], (level, v, p)
        for v in ("tgrade", "menostat"):
            s = col["variables"][v]
            truth = rows[v].value_counts()
            shown = {c: n for c, n in s["counts"].items() if n}
            assert sum(shown.values()) + s["suppressed_rows"] == len(rows)
            for c, n in shown.items():
                assert n <= truth[c]


def test_every_count_a_site_releases_is_zero_or_at_least_its_min_count(by_therapy: dict[str, Any]) -> None:
    """The per-site columns are what each site released alone: no count from 1 to 4 (min_count 5); the pooled
    counts are their sums."""
    seen = 0
    for site, columns in by_therapy["sites"].items():
        for level, col in columns.items():
            assert col["rows"] == 0 or col["rows"] >= 5
            for v, s in col["variables"].items():
                for n in s.get("counts", {}).values():
                    assert n == 0 or n >= 5, (site, level, v)
                    seen += n > 0
                assert s.get("suppressed_rows", 0) == 0 or s["suppressed_rows"] >= 5
    assert seen > 50
    pooled_no = by_therapy["pooled"]["no"]["variables"]["tgrade"]["counts"]["I"]
    assert pooled_no == sum(c["no"]["variables"]["tgrade"]["counts"]["I"] for c in by_therapy["sites"].values())


def test_without_disclosure_control_the_table_is_the_pooled_rows_own(tmp_path: Path) -> None:
    """min_count 1 (a consortium that allows it) and 2^12 cells (a cell of at most 1 for these columns): quartiles
    equal numpy's, the counts pandas'. Under secure aggregation the pooled columns are the same, bit for bit."""
    d = pooled_gbsg2()
    exact = [*GBSG2, "site_policy.statistics.min_count=1", "+learner.options.bits=12"]
    plain = run_inprocess(exact, tmp_path / "plain")["learner"]
    col = plain["pooled"]["all"]["variables"]
    for v in INTEGER:
        for p in QUANTILES:
            assert col[v]["quantiles"][str(p)]["estimate"] == np.quantile(d[v], p), (v, p)
        assert not col[v]["coarsened"]
    assert col["tgrade"]["counts"] == {k: int(n) for k, n in d["tgrade"].value_counts().items()} | {"(missing)": 0}
    sec = run_inprocess([*exact, "aggregation=secagg"], tmp_path / "sec")
    assert sec["learner"]["pooled"] == plain["pooled"]


@pytest.mark.slow  # a Paillier run (15 s): the full suite only
def test_under_paillier_the_table_is_the_same(tmp_path: Path) -> None:
    """The pooled columns under Paillier (a key holder decides each total) equal plain aggregation's, bit for bit."""
    res = run_inprocess([*GBSG2, "aggregation=paillier"], tmp_path / "paillier", paillier_keys=True)["learner"]
    plain = run_inprocess(GBSG2, tmp_path / "plain")["learner"]
    assert res["pooled"] == plain["pooled"] and res["sites"] == plain["sites"] and res["pooled"]["all"]["rows"] == 686


def test_a_site_that_keeps_its_column_adds_to_the_pooled_ones_only(tmp_path: Path) -> None:
    res = run_inprocess([*GBSG2, "site_policy.statistics.site_columns=false"], tmp_path)["learner"]
    assert res["sites"] == {} and res["pooled"]["all"]["rows"] == 686
    assert any("site_columns" in r["reason"] for r in res["rejected"])
    assert (tmp_path / "table1.md").read_text().count("|") > 50 and (tmp_path / "table1.csv").is_file()


def test_fedsilo_stats_runs_table1_only(capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import stats

    assert stats.main(["learner.name=gbdt"]) == 2
    assert "learner.name is table1" in capsys.readouterr().err


def test_a_site_refuses_a_grid_that_does_not_cover_its_values_and_foreign_levels() -> None:
    """A deviating coordinator's grid that leaves a site's largest values out (so a block would hold only them), or
    group levels not the schema's, gets no vector."""
    cfg = config.compose([*GBSG2, f"data_dir={DATA_DIR}"])
    task = TabularTask(cfg.task, DATA_DIR)
    sites = task.raw_sites(cfg.partition, config.num_sites(cfg), cfg.seed)
    program = Table1Program(task, Table1Options())
    policy = site_policy.SitePolicy()
    answer, steps = pooled.answerer(program, sites, policy), program.run()
    step = next(steps)
    while step.step != "table":
        step = steps.send(answer(step))
    params = {"what": "table", **program.state, **step.params}
    call = SiteCall(sites[0], task, params, lambda k: np.zeros(0), lambda t: t, policy)
    assert Table1Program.site("table", call).shape == (step.length,)
    ends = json.loads(params["t1-ends"])
    for bad in ([e / 2 for e in ends], [-e for e in ends][:1] + ends[1:] if ends[0] < 0 else [3.0] + ends[1:]):
        call.params = {**params, "t1-ends": json.dumps(bad)}
        with pytest.raises(ProgramError, match="power-of-two range"):
            Table1Program.site("table", call)
    call.params = {**params, "t1-levels": json.dumps(["no", "yes", "(missing)", "a name of the coordinator's"])}
    with pytest.raises(ProgramError, match="group levels"):
        Table1Program.site("table", call)
