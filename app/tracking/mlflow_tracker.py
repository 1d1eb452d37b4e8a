"""``logger=mlflow``: the run in an MLflow tracking store, as banks' and hospitals' ML teams keep theirs.

What goes in, for one fedsilo run (one MLflow run):

* **params**: the resolved config, flattened (``task.name``, ``privacy.target_epsilon``, ...);
* **tags**: fedsilo's run directory, Flower's run id, the task, strategy, aggregation and privacy
  option, and ``resumed_from`` for a resumed run;
* **metrics per round** (``step`` = round): the coordinator's test metrics (``test.auc``, ...), the
  sites' aggregated training and evaluation metrics (``train.*``, ``federated_evaluate.*``), replies
  and rejections, each site's cumulative DP-SGD epsilon (``epsilon.<site>``), seconds and bytes;
* **at the end**: the final metrics (``final.*``) and, as artefacts, ``results.json``, the final
  model (``model.pt``; ``model.encrypted.pt`` under Paillier; ``model.fedsilo.npz`` with the
  preprocessing for a site's own tables) and the report (``report.md``, ``report.html`` and its
  figures).

Where: ``mlflow.tracking_uri`` (any URI MLflow takes: ``http://mlflow.bank.internal:5000``,
``databricks``, ``sqlite:///path/mlflow.db``); if null, ``$MLFLOW_TRACKING_URI``; if unset,
MLflow's own local default, ``sqlite:///mlflow.db`` in the directory the coordinator runs in (for
the ``fedsilo`` command, where you ran it: ``mlflow ui`` there shows the runs), with artefacts in
``mlartifacts/`` beside it. The coordinator logs only what it already holds; nothing comes from
the sites besides what the protocol gave it.

A tracking store that fails mid-run (a server down) costs the tracking, not the run: the first
failure is logged as a warning with the reason and later calls are skipped; ``results.json`` and
the report are written as always.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.common import log
from typing_extensions import override

from app.tracking.trackers import Tracker

#: MLflow caps a param value at 6000 characters.
MAX_PARAM = 6000
ARTEFACTS = ("results.json", "model.pt", "model.encrypted.pt", "model.fedsilo.npz", "report.md", "report.html",
             "metrics.png")


@dataclass
class MlflowConfig:
    """Schema of the ``mlflow`` group (used with ``logger=mlflow``)."""

    tracking_uri: str | None = None   # null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db where the coordinator runs
    experiment: str = "fedsilo"
    run_name: str | None = None       # null: the run directory's name


def default_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else MLflow's local default: ``mlflow.db`` in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; lists as their repr; values cut to MLflow's limit."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:MAX_PARAM]
    return out


def _finite(values: dict[str, Any], prefix: str) -> dict[str, float]:
    return {f"{prefix}.{k}": float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


class MlflowTracker(Tracker):
    """One MLflow run for one fedsilo run (see module docstring)."""

    def __init__(self, client: Any, run_id: str, uri: str) -> None:
        self.client, self.run_id, self.uri = client, run_id, uri
        self.failed = self.finished = False

    @classmethod
    def start(cls, out_dir: Path, cfg: Any, config_dict: dict[str, Any], run_id: int) -> MlflowTracker | None:
        """Create (or find) the experiment and start the run; None, with a warning, if the store fails."""
        from mlflow.tracking import MlflowClient

        m: MlflowConfig = cfg.mlflow
        uri = m.tracking_uri or default_uri()
        try:
            with warnings.catch_warnings():  # SQLAlchemy deprecations inside MLflow's store: nothing a user can act on
                warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"mlflow\.")
                client = MlflowClient(tracking_uri=uri)
                exp = client.get_experiment_by_name(m.experiment)
            if exp is None:
                location = None
                if uri.startswith("sqlite:///"):  # a local store: artefacts beside the database, not in the cwd
                    location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
                exp_id = client.create_experiment(m.experiment, artifact_location=location)
            else:
                exp_id = exp.experiment_id
            tags = {"fedsilo.run_dir": str(out_dir), "fedsilo.flower_run_id": str(run_id),
                    "fedsilo.task": cfg.task.name, "fedsilo.strategy": cfg.strategy.name,
                    "fedsilo.aggregation": cfg.aggregation.name, "fedsilo.privacy": cfg.privacy.name}
            if cfg.resume:
                tags["fedsilo.resumed_from"] = str(cfg.resume)
            run = client.create_run(exp_id, run_name=m.run_name or out_dir.name, tags=tags)
            tracker = cls(client, run.info.run_id, uri)
            params = flatten({k: v for k, v in config_dict.items() if k != "mlflow"})
            items = sorted(params.items())
            from mlflow.entities import Param

            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(tracker.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
        except Exception as err:  # noqa: BLE001 - tracking is not worth the run
            log(WARNING, "fedsilo: logger=mlflow: cannot start a run in %s (%s: %s); the run goes on without MLflow",
                uri, type(err).__name__, str(err)[:300])
            return None
        log(INFO, "fedsilo: logger=mlflow: run %s in experiment %r at %s", tracker.run_id, m.experiment, uri)
        return tracker

    def _safe(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if self.failed:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            self.failed = True
            log(WARNING, "fedsilo: logger=mlflow: %s failed (%s: %s); no more MLflow calls in this run",
                what, type(err).__name__, str(err)[:300])

    def _metrics(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in sorted(values.items())]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    @override
    def log_round(self, server_round: int, server: dict[str, Any], train: dict[str, Any], evaluate: dict[str, Any],
                  participation: dict[str, Any], traffic: dict[str, Any], seconds: float | None,
                  names: dict[str, str]) -> None:
        values = {**_finite(server, "test"), **_finite(train, "train"), **_finite(evaluate, "federated_evaluate"),
                  **_finite(traffic, "traffic")}
        t = participation.get("train", {})
        values["sites.replied"] = float(t.get("replied", 0))
        values["sites.rejected"] = float(len(t.get("rejected", [])))
        for label, rec in participation.get("privacy", {}).items():
            values[f"epsilon.{names.get(label, label)}"] = float(rec["epsilon"])
        if seconds is not None:
            values["time.round_seconds"] = float(seconds)
        self._safe(f"logging round {server_round}", self._metrics, values, server_round)

    @override
    def finish(self, out_dir: Path) -> None:
        import json

        results = json.loads((out_dir / "results.json").read_text())
        final = {**_finite(results.get("final") or {}, "final")}
        privacy = results.get("privacy") or {}
        if "max_epsilon" in privacy:
            final["final.max_epsilon"] = float(privacy["max_epsilon"])
        self._safe("logging the final metrics", self._metrics, final, int(results.get("config", {}).get("num_rounds", 0)))
        files = [out_dir / f for f in ARTEFACTS if (out_dir / f).is_file()]
        files += sorted(out_dir.glob("report_*.png"))
        for path in files:
            folder = "model" if path.name.startswith("model") else "report" if path.name.startswith(("report", "metrics")) \
                else None
            self._safe(f"uploading {path.name}", self.client.log_artifact, self.run_id, str(path), folder)
        self._safe("ending the run", self.client.set_terminated, self.run_id, "FINISHED")
        self.finished = True
        if not self.failed:
            log(INFO, "fedsilo: logger=mlflow: run %s finished (%d artefacts) at %s", self.run_id, len(files), self.uri)

    def close(self) -> None:
        """A run that did not finish (crash, failure) is marked FAILED in MLflow."""
        if not self.finished:
            self._safe("marking the run failed", self.client.set_terminated, self.run_id, "FAILED")
