"""``learner=gbdt``: federated trees equal the pooled fit, under every aggregation option, and XGBoost scores them.

The runs are real (the ServerApp and four ClientApps in process, the heart table's four hospitals).
The pooled reference is the same program with one site holding every hospital's rows
(:func:`learners.pooled.fit`): gradient and loss sums are exact (multiples of 2^-24), so the trees
must be identical, node for node, whichever option carried the sums. Under Paillier the coordinator
never holds a histogram: a key-holding site verifies each total and returns only the split; the
deviating requests at the end are refused.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from aggregation.paillier import keys
from aggregation.paillier.sums import REQUEST_PREFIX, REVEAL_KEY, REVEAL_MESSAGE
from app import client_app, config, server_app, site_policy
from app.runtime.local_grid import run_inprocess
from core.config import ConfigError
from learners import pooled
from learners.gbdt.model import Ensemble
from learners.gbdt.options import GbdtOptions
from learners.gbdt.program import DECISION, GbdtProgram
from tasks.federated import RawSite
from tasks.tabular.table import Table
from tasks.tabular.task import TabularTask
from tests.conftest import DATA_DIR
from tests.integration.recording import Recording
from tests.integration.recording import ask_reveal as _ask
from tests.integration.recording import assert_refused as _refused

HEART = ["task=tabular", "task.schema=schemas/heart.yaml", "task.data=uci_heart_disease/sites", "partition=natural",
         "report=false", "learner.name=gbdt"]
ANY_NODE = ["site_policy.statistics.min_rows=1"]  # the equality tests: every node's rows count, at every site
ONE_ROW = site_policy.SitePolicy()
ONE_ROW.statistics.min_rows = 1
FAST = ["+learner.options.trees=6", "+learner.options.max_depth=3", "+learner.options.early_stopping=0",
        "+learner.options.max_bin=16", "+learner.options.grid_cells=256"]
OPTIONS = GbdtOptions(trees=6, max_depth=3, early_stopping=0, max_bin=16, grid_cells=256)


def _task_and_sites(extra: list[str] = ()) -> tuple[TabularTask, list[RawSite]]:  # type: ignore[assignment]
    cfg = config.compose([*HEART, *extra, f"data_dir={DATA_DIR}"])
    task = TabularTask(cfg.task, DATA_DIR)
    return task, task.raw_sites(cfg.partition, config.num_sites(cfg), cfg.seed)


def _concat(tables: list[Table]) -> Table:
    cat = np.concatenate
    return Table("pooled", {k: cat([t.numeric[k] for t in tables]) for k in tables[0].numeric},
                 {k: cat([t.categorical[k] for t in tables]) for k in tables[0].categorical},
                 cat([t.label for t in tables]), None, cat([t.line for t in tables]))


def _pooled_site(sites: list[RawSite]) -> RawSite:
    """One site holding every hospital's rows (only a test may pool them)."""
    return RawSite(0, "pooled", _concat([s.train for s in sites]), _concat([s.val for s in sites]),
                   _concat([s.test for s in sites]))


@pytest.fixture(scope="module")
def pooled_fit() -> Any:
    task, sites = _task_and_sites()
    return pooled.fit(GbdtProgram(task, OPTIONS), [_pooled_site(sites)], ONE_ROW)


def _trees(folder: Path) -> list[dict[str, Any]]:
    return json.loads((folder / "model.json").read_text())["trees"]


def test_federated_trees_equal_the_pooled_fit_under_plain_and_secure_aggregation(pooled_fit: Any,
                                                                                 tmp_path: Path) -> None:
    want = [t.to_dict() for t in pooled_fit.trees]
    assert len(want) == 6 and sum(len(t["left"]) for t in want) > 6 * 3  # real trees, with splits
    for agg in ("plain", "secagg"):
        got = run_inprocess([*HEART, *FAST, *ANY_NODE, f"aggregation={agg}"], tmp_path / agg)
        assert got["status"] == "completed" and got["learner"]["sites"] == 4
        assert _trees(tmp_path / agg) == want, agg  # node for node, bit for bit
        assert [h["val_loss"] for h in got["learner"]["history"]] == [h["val_loss"] for h in pooled_fit.history]
        assert got["learner"]["test"]["auc"] == pytest.approx(pooled_fit.test["auc"], abs=1e-12)
    assert "only" in got["learner"]["coordinator_learns"]
    # `fedsilo predict` on a hospital's raw file equals xgboost scoring the exported model
    import xgboost as xgb

    from app.cli import predict

    raw = DATA_DIR / "uci_heart_disease" / "sites" / "hungarian.csv"
    assert predict.main([str(tmp_path / "secagg"), str(raw), "--out", str(tmp_path / "scores.csv")]) == 0
    import pandas as pd

    ours = pd.read_csv(tmp_path / "scores.csv")
    table, _ = predict.predictor(tmp_path / "secagg").score_file(raw)
    from learners.rows import table_rows

    task, _ = _task_and_sites()
    x = table_rows(task.schema, table, {}).x
    booster = xgb.Booster(model_file=str(tmp_path / "secagg" / "model.xgb.json"))
    theirs = booster.predict(xgb.DMatrix(x, missing=np.nan, feature_names=booster.feature_names))
    assert list(ours.columns) == ["patient", "score"] and len(ours) == len(table) > 200
    assert np.max(np.abs(ours["score"].to_numpy() - theirs)) < 1e-6


def test_the_pooled_reference_differs_when_a_site_is_left_out(pooled_fit: Any) -> None:
    """The equality above can fail: three hospitals' rows grow other trees."""
    task, sites = _task_and_sites()
    fewer = pooled.fit(GbdtProgram(task, OPTIONS), [_pooled_site(sites[:3])], ONE_ROW)
    assert [t.to_dict() for t in fewer.trees] != [t.to_dict() for t in pooled_fit.trees]


class _ScalingSite(GbdtProgram):
    """The program with one deviating site: it doubles its gradient histogram of feature 0 (values not of its rows)."""

    @classmethod
    def site(cls, step: str, call: Any) -> Any:
        v = GbdtProgram.site(step, call)
        if step == "level" and getattr(call.data, "name", "") == "cleveland":
            from learners.gbdt.program import slots

            cuts = [np.asarray(c) for c in json.loads(str(call.params["gbdt-cuts"]))]
            starts, width = slots(cuts)
            v = np.asarray(v, dtype=np.float64).reshape(-1, 2 * width).copy()
            v[:, starts[0]:starts[0] + len(cuts[0]) + 2] *= 2
            v = v.ravel()
        return v


def test_a_histogram_that_is_not_of_rows_leaves_its_nodes_leaves(pooled_fit: Any) -> None:
    """Byzantine bounds that hold for trees: every row lies in one slot of every feature, so each feature's slots
    sum to the same node total; a site that scales one feature's histogram breaks that in the total (under any
    aggregation option, the sites' vectors unseen), and those nodes are not split on its values."""
    task, sites = _task_and_sites()
    honest = pooled.fit(GbdtProgram(task, OPTIONS), sites, ONE_ROW)
    assert honest.inconsistent == [] and [t.to_dict() for t in honest.trees] == [t.to_dict() for t in pooled_fit.trees]
    attacked = pooled.fit(_ScalingSite(task, OPTIONS), sites, ONE_ROW)
    assert attacked.inconsistent and {e["depth"] for e in attacked.inconsistent} >= {0}
    assert all(len(t.left) == 1 for t in attacked.trees[:1])  # the root of the first tree was not split


def test_a_site_sends_nothing_of_a_node_with_fewer_than_its_min_rows() -> None:
    """A coordinator sends a tree whose left child holds a handful of the site's rows: the site's histogram of
    that node is zeros, of the other node not (statistics.min_rows=10, the default policy)."""
    from core.programs import Ask, SiteCall
    from learners.gbdt.trees import Tree, bin_matrix
    from learners.rows import table_rows

    task, sites = _task_and_sites()
    site, policy = sites[0], site_policy.SitePolicy()
    program = GbdtProgram(task, GbdtOptions(max_bin=256, grid_cells=2048))
    answer, steps = pooled.answerer(program, [site], policy), program.run()
    step = next(steps)
    while not (isinstance(step, Ask) and step.step == "level"):
        step = steps.send(answer(step))
    params = {"what": "level", **program.state, **step.params}
    cuts = [np.asarray(c) for c in json.loads(params["gbdt-cuts"])]
    bins = bin_matrix(table_rows(task.schema, site.train, {}).x, cuts)
    f, j = next((f, j) for f in range(len(cuts)) for j in range(1, len(cuts[f]) + 1)  # a few rows go left
                if 0 < np.sum((bins[:, f] >= 1) & (bins[:, f] <= j)) < 10)
    tree = Tree()
    tree.add_children(0, f, j, float(cuts[f][j - 1]), False, 1.0, (0.0, 0.0), (0.0, 0.0))
    from learners.gbdt.program import encode_trees

    params.update({"gbdt-grow": encode_trees([tree]), "open": json.dumps([[1, 2]])})
    call = SiteCall(site, task, params, lambda k: np.zeros(0), lambda t: t, policy)
    hist = GbdtProgram.site("level", call).reshape(2, -1)
    assert not hist[0].any() and hist[1].any()
    call.policy = ONE_ROW  # the same request to a site that allows single rows: the node's sums leave
    assert GbdtProgram.site("level", call).reshape(2, -1)[0].any()


def test_a_tree_ends_at_the_level_a_site_dropped_out_of() -> None:
    """Round 2's depth-2 sum holds three of the four sites: that tree stops there (no node below depth 2),
    the other trees grow to full depth, and the run records it."""
    from core import programs
    from core.programs import Ask, Total
    from learners.gbdt.trees import Tree

    task, sites = _task_and_sites()
    program = GbdtProgram(task, OPTIONS)
    answer = pooled.answerer(program, sites, ONE_ROW)
    rounds = {"n": 0}

    def dropping(step: Any) -> Any:
        got = answer(step)
        if isinstance(step, Ask) and step.step == "evaluate":
            rounds["n"] += 1
        opened = json.loads(str(step.params.get("open", "[[]]")))[0] if isinstance(step, Ask) else []
        if isinstance(step, Ask) and step.step == "level" and rounds["n"] == 1 and opened and min(opened) >= 3:
            return Total(got.sites - 1, got.values, got.rejected)  # depth 2: one site's contribution missing
        return got

    out = programs.drive(program, dropping)
    depth = [max(Tree.from_dict(t.to_dict()).depth) for t in out.trees]
    assert depth[1] == 2 and max(depth) == 3, depth
    assert out.ended_early == [{"round": 2, "depth": 2, "sites": 3, "round_sites": 4}]


def test_a_crashed_coordinator_resumes_between_trees_and_ends_as_if_never_interrupted(tmp_path: Path) -> None:
    from app.support.checkpoint import CoordinatorCrash

    whole = run_inprocess([*HEART, *FAST, "+learner.options.colsample_bytree=0.5"], tmp_path / "whole")
    crashing = [*HEART, *FAST, "+learner.options.colsample_bytree=0.5"]
    with pytest.raises(CoordinatorCrash, match="after round 3"):
        run_inprocess([*crashing, "faults.crash_after_round=3"], tmp_path / "crash")
    saved = json.loads((tmp_path / "crash" / "learner-checkpoint.json").read_text())["progress"]
    assert saved["round"] == 3 and len(saved["trees"]) == 3
    resumed = run_inprocess([*crashing, f"resume={tmp_path / 'crash'}"], tmp_path / "resumed")
    assert _trees(tmp_path / "resumed") == _trees(tmp_path / "whole")  # the feature draws continue too
    assert resumed["learner"]["history"] == whole["learner"]["history"]
    assert resumed["learner"]["test"] == whole["learner"]["test"]
    from app.runtime.preflight import PreflightError

    with pytest.raises(PreflightError, match="another config"):  # a checkpoint of other options is refused
        run_inprocess([*HEART, *FAST, f"resume={tmp_path / 'crash'}"], tmp_path / "other")


def test_xgboost_loads_the_exported_model_and_scores_as_fedsilo(pooled_fit: Any, tmp_path: Path) -> None:
    import xgboost as xgb
    task, sites = _task_and_sites()
    from learners.rows import table_rows

    rows = table_rows(task.schema, _pooled_site(sites).test, {})
    ens: Ensemble = pooled_fit.ensemble()
    files = ens.save(tmp_path)
    booster = xgb.Booster(model_file=files["xgboost"])
    matrix = xgb.DMatrix(rows.x, missing=np.nan, feature_names=ens.names)
    theirs = booster.predict(matrix, output_margin=True)
    ours = ens.margins(rows.x)[:, 0]
    assert np.max(np.abs(theirs - ours)) < 1e-5
    contribs = booster.predict(matrix, pred_contribs=True)  # TreeSHAP
    assert np.allclose(contribs.sum(axis=1), theirs, atol=1e-4)
    assert Ensemble.from_dict(json.loads(Path(files["model"]).read_text())).to_dict() == ens.to_dict()


def test_a_missing_value_takes_the_learned_default_direction(pooled_fit: Any) -> None:
    ens: Ensemble = pooled_fit.ensemble()
    tree = next(t for t in ens.trees if t.left[0] >= 0)
    x = np.zeros((1, len(ens.names)))
    x[0, tree.feature[0]] = np.nan
    assert tree.leaf_of_values(x)[0] in ((tree.left if tree.default_left[0] else tree.right)[0],
                                         *_below(tree, (tree.left if tree.default_left[0] else tree.right)[0]))


def _below(tree: Any, node: int) -> list[int]:
    out, todo = [], [node]
    while todo:
        n = todo.pop()
        out.append(n)
        if tree.left[n] >= 0:
            todo += [tree.left[n], tree.right[n]]
    return out


def test_multiclass_and_regression_tables_fit_and_export() -> None:
    import xgboost as xgb
    for schema, data, objective in (("schemas/heart_multiclass.yaml", "uci_heart_disease/sites", "multiclass"),
                                    ("schemas/diabetes.yaml", "diabetes/diabetes.csv", "regression")):
        cfg = config.compose(["task=tabular", f"task.schema={schema}", f"task.data={data}",
                              "partition=natural" if "sites" in data else "partition=iid",
                              *([] if "sites" in data else ["num_sites=3"]), f"data_dir={DATA_DIR}"])
        task = TabularTask(cfg.task, DATA_DIR)
        sites = task.raw_sites(cfg.partition, config.num_sites(cfg), cfg.seed)
        out = pooled.fit(GbdtProgram(task, OPTIONS), sites, site_policy.SitePolicy())
        assert out.objective == objective and out.test, objective
        ens = out.ensemble()
        from learners.rows import table_rows

        rows = table_rows(task.schema, sites[0].test, out.vocab)
        booster = xgb.Booster()
        booster.load_model(bytearray(json.dumps(ens.to_xgboost()).encode()))
        margin = booster.predict(xgb.DMatrix(rows.x, missing=np.nan, feature_names=ens.names), output_margin=True)
        ours = ens.margins(rows.x)
        assert np.max(np.abs(margin.reshape(ours.shape) - ours)) < 1e-4, objective


def test_bad_options_are_refused_before_the_run(tmp_path: Path) -> None:
    for bad, key in (("+learner.options.max_depth=0", "learner.options.max_depth"),
                     ("+learner.options.eta=2", "learner.options.eta"),
                     ("+learner.options.depth=3", "learner.options.depth"),
                     ("+learner.options.subsample=yes", "learner.options.subsample")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config.compose([*HEART, bad, f"data_dir={DATA_DIR}"])


# ---- Paillier: the coordinator gets decisions, never histograms ---------------------------------------
@pytest.fixture(scope="module")
def paillier_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Recording, Path]:
    tmp = tmp_path_factory.mktemp("gbdt-paillier")
    private, public = keys.generate(tmp / "keys")
    overrides = [*HEART, *FAST, *ANY_NODE, "aggregation=paillier", f"aggregation.public_key={public}"]
    run_config = {"overrides": shlex.join([*overrides, f"data_dir={DATA_DIR}"]), "output-dir": str(tmp)}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    grid = Recording(client_app.app, 4, run_config, node_config={"paillier-keypair": str(private)})
    server_app.app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    return grid, tmp


@pytest.mark.slow  # a Paillier run (10 s): the full suite only
def test_paillier_grows_the_same_trees_and_the_coordinator_holds_no_histogram(
        paillier_run: tuple[Recording, Path], pooled_fit: Any) -> None:
    grid, tmp = paillier_run
    assert _trees(tmp) == [t.to_dict() for t in pooled_fit.trees]
    decided = [(m, r) for m, r in grid.log if m.metadata.message_type == REVEAL_MESSAGE
               and REQUEST_PREFIX + "what" in m.content[REVEAL_KEY]]
    assert decided and all(not r.has_error() for _, r in decided)
    for msg, reply in decided:  # a level's histograms are 2 x (bins + missing) per feature and node; its decision
        length, got = int(msg.content[REVEAL_KEY]["length"]), len(reply.content[REVEAL_KEY]["values"])  # 10 per node
        if msg.content[REVEAL_KEY][REQUEST_PREFIX + "what"] == "level":
            nodes = sum(len(n) for n in json.loads(msg.content[REVEAL_KEY][REQUEST_PREFIX + "open"]))
            assert got == DECISION * nodes and got * 10 < length




@pytest.mark.slow
def test_a_key_holder_decides_only_the_verified_request_once(paillier_run: tuple[Recording, Path]) -> None:
    grid, _ = paillier_run
    msg, _ = next((m, r) for m, r in grid.log if m.metadata.message_type == REVEAL_MESSAGE
                  and m.content[REVEAL_KEY].get(REQUEST_PREFIX + "what") == "level")
    rec = dict(msg.content[REVEAL_KEY].items())
    node = msg.metadata.dst_node_id
    other = next(n for n in grid.contexts if n != node)
    _refused(_ask(grid, node, rec), "revealed by this site already")  # once per sum
    # another key holder, with the request's parameters changed (e.g. lambda=0 to read G and H back)
    changed = {**rec, REQUEST_PREFIX + "gbdt-options": rec[REQUEST_PREFIX + "gbdt-options"].replace(
        '"reg_lambda": 1.0', '"reg_lambda": 0.5')}
    _refused(_ask(grid, other, changed), "is not the one its contributions were made for")
    # the plain reveal of a histogram (no request sent with it): statistics are never decrypted
    plain = {k: v for k, v in rec.items() if not k.startswith(REQUEST_PREFIX)}
    _refused(_ask(grid, other, plain), "only pooled test metrics")
    # a decision of a step the program does not decide
    relabelled = {**rec, "what": "evaluate", REQUEST_PREFIX + "what": "evaluate"}
    _refused(_ask(grid, other, relabelled), "does not decide")
