"""logger=mlflow, checked against MLflow's own store (its SQLite tracking backend), not a mock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from app import config
from app.runtime.local_grid import run_inprocess
from core.config import ConfigError


@pytest.mark.slow
def test_a_run_lands_in_mlflow_with_params_rounds_model_and_report(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    out = tmp_path / "run"
    res = run_inprocess(["task=medical", "num_rounds=3", "privacy=dpsgd", "logger=mlflow",
                         f"mlflow.tracking_uri={uri}", "mlflow.experiment=hospitals"], out)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("hospitals")
    assert exp is not None and exp.artifact_location.startswith((tmp_path / "store" / "mlartifacts").as_uri())
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    params = run.data.params
    assert params["task.name"] == "medical" and params["num_rounds"] == "3" and params["privacy.name"] == "dpsgd"
    assert params["privacy.target_epsilon"] == str(res["config"]["privacy"]["target_epsilon"])
    assert run.data.tags["fedsilo.run_dir"] == str(out) and run.data.tags["fedsilo.privacy"] == "dpsgd"
    auc = client.get_metric_history(run.info.run_id, "test.auc")
    assert [(m.step, m.value) for m in sorted(auc, key=lambda m: m.step)] == \
        [(h["round"], h["server"]["auc"]) for h in res["history"]]
    assert run.data.metrics["final.auc"] == res["final"]["auc"]
    for site, eps in res["privacy"]["epsilon_per_site"].items():
        assert run.data.metrics[f"epsilon.{site}"] == eps  # the last round's figure
    stored = {a.path for folder in ("", "model", "report") for a in client.list_artifacts(run.info.run_id, folder or None)}
    assert {"results.json", "model/model.pt", "report/report.md", "report/report.html"} <= stored, stored
    local = Path(client.download_artifacts(run.info.run_id, "results.json", str(tmp_path / "dl")))
    assert json.loads(local.read_text())["final"] == res["final"]


def test_an_unreachable_tracking_server_costs_the_tracking_not_the_run(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    res = run_inprocess(["task=medical", "num_rounds=1", "logger=mlflow", "mlflow.tracking_uri=http://127.0.0.1:9"],
                        tmp_path)
    assert res["status"] == "completed" and (tmp_path / "report.md").is_file()


def test_an_empty_experiment_name_is_refused_with_its_key() -> None:
    with pytest.raises(ConfigError, match="mlflow.experiment"):
        config.compose(["logger=mlflow", "mlflow.experiment= "])
