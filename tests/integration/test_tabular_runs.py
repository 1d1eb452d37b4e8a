"""task=tabular end to end, in process (the real ServerApp and ClientApps): federated preprocessing
under every protection, pooled test metrics, a bad site left out with its reason, the usable model."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from aggregation.paillier import keys
from app.cli import predict
from app.runtime.local_grid import run_inprocess
from tasks.base import PartitionConfig, TaskConfig
from tasks.tabular import artefact
from tests.conftest import DATA_DIR

HEART = ["task=tabular", "learner.name=torch",
         "task.schema=schemas/heart.yaml", "task.data=uci_heart_disease/sites", "partition=natural",
         "task.model=logreg"]


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return keys.generate(tmp_path_factory.mktemp("paillier"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, key_files: tuple[Path, Path]) -> dict[str, tuple[Path, Any]]:
    """The same heart config (4 hospitals, 2 rounds) under plain, secagg and paillier."""
    private, public = key_files
    out = {}
    for name, extra in (("plain", []), ("secagg", ["aggregation=secagg"]),
                        ("paillier", ["aggregation=paillier", f"aggregation.public_key={public}",
                                      f"aggregation.keypair={private}", "task.auc_bins=512"]),
                        ("paillier_split", ["aggregation=paillier", f"aggregation.public_key={public}",
                                            f"aggregation.keypair={private}", "task.auc_bins=512",
                                            "aggregation.decryption=split"])):
        d = tmp_path_factory.mktemp(name)
        out[name] = (d, run_inprocess([*HEART, "num_rounds=2", *extra], d))
    return out


def _heart_task(schema: str = "schemas/heart.yaml") -> Any:
    from tasks.tabular.task import TabularTask

    return TabularTask(TaskConfig(name="tabular", schema=schema, data="uci_heart_disease/sites", model="logreg"),
                       DATA_DIR)


def test_statistics_are_identical_under_every_protection_and_the_coordinator_learns_what_the_docs_say(
        runs: dict[str, tuple[Path, Any]], key_files: tuple[Path, Path]) -> None:
    (plain_dir, plain), (secagg_dir, secagg), (pai_dir, pai) = runs["plain"], runs["secagg"], runs["paillier"]
    assert [r["preprocessing"]["coordinator_knows_totals"] for r in (plain, secagg, pai)] == [True, True, False]
    assert pai["preprocessing"]["rows"] is None and plain["preprocessing"]["rows"] == secagg["preprocessing"]["rows"]
    p_plain = predict.predictor(plain_dir).prep
    p_secagg = predict.predictor(secagg_dir).prep
    with pytest.raises(artefact.ArtefactError, match="encrypted"):
        predict.predictor(pai_dir)  # the coordinator's file alone is of no use without the sites' key
    p_pai = predict.predictor(pai_dir, key_files[0]).prep
    assert p_plain.moments == p_secagg.moments == p_pai.moments  # bit for bit
    assert p_plain.spread == p_secagg.spread == p_pai.spread
    _, meta = artefact.load(pai_dir)
    assert meta["preprocessor"] is None and meta["encrypted"]
    for r in (plain, secagg, pai):
        assert r["test_source"].startswith("sites' held-out test rows") and r["final"]["test_sites"] == 4
        assert r["final"]["auc"] > 0.75 and r["status"] == "completed"
    assert plain["final"]["num_examples"] == secagg["final"]["num_examples"] == pai["final"]["num_examples"]
    # decryption=split: the sites decrypt slices (also for the test-metric sums) and get the same model
    split = runs["paillier_split"][1]
    assert split["final"] == pai["final"]
    assert all(not h["participation"]["paillier_decryption"]["fallback"] for h in split["history"])


def test_pooled_test_auc_equals_sklearn_on_the_pooled_test_scores(runs: dict[str, tuple[Path, Any]]) -> None:
    run_dir, results = runs["plain"]
    pred = predict.predictor(run_dir)
    task = _heart_task()
    ys, scores = [], []
    for k in range(4):
        site = task.raw_site(PartitionConfig(name="natural"), 4, 0, k)
        ys.append(site.test.label)
        scores.append(pred.score_table(site.test)["score"])
    exact = roc_auc_score(np.concatenate(ys), np.concatenate(scores))
    final = results["final"]
    assert abs(final["auc"] - exact) <= max(final["auc_bound"], 1e-12) and final["auc_bound"] < 1e-3
    assert final["num_examples"] == sum(len(y) for y in ys)


def test_predict_scores_raw_rows_like_the_run(runs: dict[str, tuple[Path, Any]], tmp_path: Path) -> None:
    import pandas as pd

    run_dir, _ = runs["plain"]
    rows = pd.read_csv(DATA_DIR / "uci_heart_disease" / "sites" / "cleveland.csv", dtype=str, keep_default_na=False)
    unlabelled = tmp_path / "new_patients.csv"
    rows.drop(columns=["num", "split"]).head(25).to_csv(unlabelled, index=False)
    assert predict.main([str(run_dir), str(unlabelled), "--out", str(tmp_path / "s.csv")]) == 0
    scored = pd.read_csv(tmp_path / "s.csv")
    assert list(scored.columns) == ["patient", "score"] and len(scored) == 25
    expected = predict.predictor(run_dir).score_file(DATA_DIR / "uci_heart_disease" / "sites" / "cleveland.csv")[1]
    assert np.allclose(scored["score"].to_numpy(), expected["score"][:25])
    bad = tmp_path / "bad.csv"
    rows.drop(columns=["num", "split", "chol"]).head(3).to_csv(bad, index=False)
    assert predict.main([str(run_dir), str(bad)]) == 2  # a missing column: refused with its name


def test_a_bad_site_is_left_out_with_its_reason_and_the_run_goes_on(tmp_path: Path) -> None:
    sites = tmp_path / "sites"
    shutil.copytree(DATA_DIR / "uci_heart_disease" / "sites", sites)
    va = sites / "va.csv"
    lines = va.read_text().splitlines()
    assert lines[0].split(",")[6] == "chol"
    fields = lines[5].split(",")
    fields[6] = "lots"  # line 6 of the file: a text in a numeric column
    lines[5] = ",".join(fields)
    va.write_text("\n".join(lines) + "\n")
    overrides = [o for o in HEART if not o.startswith("task.data=")] + [f"task.data={sites}", "num_rounds=1"]
    results = run_inprocess(overrides, tmp_path / "run")
    rejected = results["preprocessing"]["rejected"]
    assert results["status"] == "completed" and results["preprocessing"]["sites"] == 3
    assert any("va.csv" in r["reason"] and "'chol'" in r["reason"] and "row 6" in r["reason"] for r in rejected)
    assert results["final"]["test_sites"] == 3
    reasons = [r["reason"] for r in results["history"][0]["participation"]["train"]["rejected"]]
    assert any("va.csv" in r for r in reasons)  # training refuses it too, with the same reason, never data


def test_a_site_with_another_schema_is_refused() -> None:
    from flwr.app import ConfigRecord

    from tasks.federated import SchemaMismatch

    mine, theirs = _heart_task(), _heart_task("schemas/heart_multiclass.yaml")
    with pytest.raises(SchemaMismatch, match="differs from the coordinator's"):
        theirs.check_fingerprint(ConfigRecord({"prep-fingerprint": mine.schema.fingerprint()}))


@pytest.mark.slow
def test_multiclass_and_regression_labels_run_end_to_end(tmp_path: Path) -> None:
    multi = run_inprocess(["task=tabular", "learner.name=torch", "task.schema=schemas/heart_multiclass.yaml",
                           "task.data=uci_heart_disease/sites", "partition=natural", "num_rounds=3",
                           "task.model=logreg", "aggregation=secagg"], tmp_path / "multi")
    m = multi["final"]
    assert {"accuracy", "macro_f1", "macro_auc", "loss"} <= set(m) and 0.5 < m["macro_auc"] < 1
    assert multi["history"][-1]["federated_evaluate"]["accuracy"] > 0  # the sites' validation, pooled
    reg = run_inprocess(["task=tabular", "learner.name=torch",
                         "task.schema=schemas/diabetes.yaml", "task.data=diabetes/diabetes.csv",
                         "num_sites=3", "num_rounds=10", "task.model=logreg", "task.lr=0.01", "privacy=dpsgd",
                         "privacy.target_epsilon=50", "site_policy.privacy.max_epsilon=50"], tmp_path / "reg")
    r = reg["final"]
    assert {"mse", "mae", "r2"} <= set(r) and np.isfinite(r["r2"]) and reg["privacy"]["max_epsilon"] <= 50
    model_state, meta = artefact.load(tmp_path / "reg")
    assert meta["kind"] == "regression" and meta["model"]["outputs"] == 1 and model_state
    from app.reporting import compare

    head, rows = compare.table([compare.Run(tmp_path / "multi", multi, "multi"), compare.Run(tmp_path / "reg", reg, "reg")])
    assert "r2" in head and rows[1][head.index("r2")] == f"{r['r2']:.4f}" and rows[0][head.index("r2")] == "n/a"


@pytest.mark.slow
def test_the_credit_table_through_the_tabular_path_trains_the_finance_model(tmp_path: Path) -> None:
    """A CSV plus a schema, preprocessed federally, gives task=finance's 28 inputs and its numbers."""
    tab = run_inprocess(["task=tabular", "learner.name=torch", "num_rounds=2"], tmp_path / "tabular")
    fin = run_inprocess(["task=finance", "num_rounds=2"], tmp_path / "finance")
    for k in ("auc", "accuracy", "loss", "ks"):
        assert abs(tab["final"][k] - fin["final"][k]) < 1e-4, k
    assert tab["final"]["num_examples"] == fin["final"]["num_examples"] == 6000


def test_the_report_says_where_the_test_metrics_come_from(runs: dict[str, tuple[Path, Any]]) -> None:
    from app.reporting import report

    run_dir, _ = runs["secagg"]
    md, _ = report.write(run_dir, n_boot=10)
    text = md.read_text()
    assert "Pooled from the sites' held-out test rows, pooled by aggregation=secagg" in text
    assert "auc_bound" in text and "Not available to the coordinator" in text  # no rows per site at the coordinator
