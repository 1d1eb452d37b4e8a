"""``learner=glm`` equals scikit-learn on the pooled rows; ``learner=auto`` picks by the pooled validation loss.

Real runs (the ServerApp and ClientApps in process) on the heart hospitals' tables; the references are
scikit-learn's ``LogisticRegression`` (its default C=1 on standardised inputs) and ``LinearRegression``
fitted on the pooled training rows, standardised with the pooled moments and mean-imputed as the sites do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.linear_model import LinearRegression, LogisticRegression

from app import config, site_policy
from app.runtime.local_grid import run_inprocess
from learners import pooled
from learners.auto import AutoProgram
from learners.gbdt.options import GbdtOptions
from learners.glm import GlmOptions, GlmProgram, LinearModel
from learners.rows import table_rows
from tasks.tabular.task import TabularTask
from tests.conftest import DATA_DIR

HEART = ["task=tabular", "task.schema=schemas/heart.yaml", "task.data=uci_heart_disease/sites", "partition=natural",
         "report=false"]
DIABETES = ["task=tabular", "task.schema=schemas/diabetes.yaml", "task.data=diabetes/diabetes.csv", "num_sites=3"]


def _pooled_rows(overrides: list[str]) -> tuple[Any, ...]:
    cfg = config.compose([*overrides, f"data_dir={DATA_DIR}"])
    task = TabularTask(cfg.task, DATA_DIR)
    sites = task.raw_sites(cfg.partition, config.num_sites(cfg), cfg.seed)
    train = [table_rows(task.schema, s.train, {}) for s in sites]
    test = [table_rows(task.schema, s.test, {}) for s in sites]
    return (task, sites, np.vstack([r.x for r in train]), np.concatenate([r.y for r in train]),
            np.vstack([r.x for r in test]))


def _standardised(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    means, sds = np.nanmean(ref, axis=0), np.nanstd(ref, axis=0)
    return (np.where(np.isnan(x), means, x) - means) / np.where(sds > 0, sds, 1.0)


def test_federated_logistic_regression_equals_scikit_learn_on_the_pooled_rows(tmp_path: Path) -> None:
    _, _, x, y, xt = _pooled_rows(HEART)
    sk = LogisticRegression(C=1.0, tol=1e-12, max_iter=10_000).fit(_standardised(x, x), y)
    want = sk.predict_proba(_standardised(xt, x))[:, 1]
    runs = {agg: run_inprocess([*HEART, "learner.name=glm", f"aggregation={agg}"], tmp_path / agg)
            for agg in ("plain", "secagg")}
    got = {agg: LinearModel.from_dict(json.loads((tmp_path / agg / "model.json").read_text())) for agg in runs}
    assert runs["plain"]["learner"]["converged"] and runs["plain"]["learner"]["iterations"] < 15
    assert np.max(np.abs(got["plain"].predict(xt) - want)) < 1e-6
    assert np.max(np.abs(np.asarray(got["secagg"].coef) - np.asarray(got["plain"].coef))) < 1e-9
    assert runs["secagg"]["learner"]["test"]["auc"] == pytest.approx(runs["plain"]["learner"]["test"]["auc"], abs=1e-9)
    coef = runs["plain"]["learner"]["coefficients_per_unit"]["coefficients"]
    assert set(coef) >= {"intercept", "age", "cp=4"}  # per unit of each input, for the report
    from app.reporting import compare  # `fedsilo compare` reads a learner's test metrics and steps

    head, rows = compare.table(compare.find_runs([tmp_path]))
    auc, steps = head.index("auc"), head.index("rounds")
    assert [row[auc] for row in rows] == [f"{runs[a]['learner']['test']['auc']:.4f}" for a in ("plain", "secagg")]
    assert rows[0][steps] == str(runs["plain"]["learner"]["iterations"])


def test_linear_regression_equals_scikit_learn_and_the_penalty_matters() -> None:
    task, sites, x, y, xt = _pooled_rows(DIABETES)
    out = pooled.fit(GlmProgram(task, GlmOptions()), sites, site_policy.SitePolicy())
    sk = LinearRegression().fit(_standardised(x, x), y)
    assert np.max(np.abs(out.model.predict(xt) - sk.predict(_standardised(xt, x)))) < 1e-6
    heart_task, heart_sites, hx, hy, hxt = _pooled_rows(HEART)
    loose = pooled.fit(GlmProgram(heart_task, GlmOptions(C=1e6)), heart_sites, site_policy.SitePolicy())
    sk = LogisticRegression(C=1.0, tol=1e-12, max_iter=10_000).fit(_standardised(hx, hx), hy)
    assert np.max(np.abs(loose.model.predict(hxt) - sk.predict_proba(_standardised(hxt, hx))[:, 1])) > 1e-3


def test_auto_chooses_the_lower_pooled_validation_loss_and_predict_scores_it(tmp_path: Path) -> None:
    fast = ["+learner.options.gbdt.trees=30", "+learner.options.gbdt.early_stopping=5"]
    got = run_inprocess([*DIABETES, "learner.name=auto", *fast], tmp_path / "auto")["learner"]
    losses = got["val_loss"]
    assert got["chosen"] == min(losses, key=losses.get)
    assert got["test"] == got["parts"][got["chosen"]]["test"]
    from app.cli import predict

    raw = DATA_DIR / "diabetes" / "diabetes.csv"
    assert predict.main([str(tmp_path / "auto"), str(raw), "--out", str(tmp_path / "s.csv")]) == 0
    import pandas as pd

    scores = pd.read_csv(tmp_path / "s.csv")
    assert list(scores.columns) == ["patient", "prediction"] and len(scores) == 442
    task, sites, *_ = _pooled_rows(DIABETES)
    other = pooled.fit(AutoProgram(task, GlmOptions(), GbdtOptions(trees=30, early_stopping=5)), sites,
                       site_policy.SitePolicy())
    assert other.chosen == got["chosen"] and other.val_loss == pytest.approx(losses, rel=1e-9)


def test_a_tables_default_learner_is_auto_and_a_torch_option_says_how_to_get_torch() -> None:
    from core.config import ConfigError

    assert config.compose([*HEART, f"data_dir={DATA_DIR}"]).learner.name == "auto"
    assert config.compose(["task=finance"]).learner.name == "torch"
    assert config.compose([*HEART, "learner.name=torch", f"data_dir={DATA_DIR}"]).learner.name == "torch"
    with pytest.raises(ConfigError, match="privacy.name.*add learner.name=torch"):
        config.compose([*HEART, "privacy=dpsgd", f"data_dir={DATA_DIR}"])
