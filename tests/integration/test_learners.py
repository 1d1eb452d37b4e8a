"""A sum-based learner registered from outside app/: what a new learner touches, end to end.

The toy learner below (the federated mean and variance of one column of the sites' own tables) is
the whole of a new learner: a :class:`~core.programs.Program` (its coordinator half asks for one
sum; its site half is a pure function of the site's rows and the step's parameters), a
:class:`~tasks.learners.SumLearner` naming it, and two registrations. Nothing in ``app/`` is
changed or told about it; the real ServerApp and ClientApp run it under plain aggregation and
secure aggregation, with the same total bit for bit.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from aggregation.base import SUM_REQUEST
from app import client_app, config
from app.runtime.local_grid import run_inprocess
from core import programs
from core.config import ConfigError
from core.programs import Ask, Gather, PolicyRefusal, Program, SiteCall, Total
from tasks import learners
from tasks.base import Task
from tasks.federated import RawSite
from tasks.learners import LearnerConfig, SumLearner
from tests.conftest import DATA_DIR

HEART = ["task=tabular", "task.schema=schemas/heart.yaml", "task.data=uci_heart_disease/sites", "partition=natural",
         "report=false"]


class ColumnMomentsProgram(Program):
    """Count, sum and sum of squares of one numeric column over every site's non-test rows."""

    name: ClassVar[str] = "test.column_moments"

    def __init__(self, column: str) -> None:
        super().__init__()
        self.column = column

    def run(self) -> Generator[Ask | Gather, Any, dict[str, Any]]:
        total: Total = yield Ask("moments", 3, {"column": self.column}, reveal=True)
        if total.values is None:
            return {"revealed": False, "sites": total.sites}
        n, s, ss = (float(v) for v in total.values)
        mean = s / n
        return {"revealed": True, "sites": total.sites, "rows": n, "mean": mean,
                "variance": (ss - n * mean * mean) / (n - 1), "totals": [n, s, ss]}

    @classmethod
    def site(cls, step: str, call: SiteCall) -> np.ndarray:
        raw: RawSite = call.data
        if step != "moments" or not isinstance(raw, RawSite):
            raise programs.ProgramError(f"{cls.name} has no step {step!r} for this site's data")
        column = str(call.params["column"])
        if column not in raw.train.numeric:
            raise programs.ProgramError(f"no numeric column {column!r} in this site's schema")
        x = np.concatenate([t.numeric[column] for t in raw.fit_rows])
        x = x[~np.isnan(x)]
        if x.size < call.policy.statistics.min_rows:
            raise PolicyRefusal("fewer rows than the policy's statistics.min_rows")
        return np.array([x.size, x.sum(), np.dot(x, x)], dtype=np.float64)


class ColumnMoments(SumLearner):
    """``learner.name=column_moments +learner.options.column=NAME``."""

    name: ClassVar[str] = "column_moments"

    def validate(self, cfg: LearnerConfig, task: type[Task]) -> None:
        if not isinstance(cfg.options.get("column"), str):
            raise ConfigError("learner.options.column", cfg.options.get("column"), "a numeric column of the schema")

    def program(self, task: Task, options: Mapping[str, Any]) -> Program:
        return ColumnMomentsProgram(str(options["column"]))


@pytest.fixture(scope="module", autouse=True)
def registered() -> Generator[None, None, None]:
    programs.register(ColumnMomentsProgram)
    learners.register(ColumnMoments())
    yield
    programs.REGISTRY.pop(ColumnMomentsProgram.name, None)
    learners.REGISTRY.pop(ColumnMoments.name, None)


def _sites() -> list[RawSite]:
    """The four hospitals' rows read directly from their files (only a test may pool them)."""
    from tasks.tabular.task import TabularTask

    cfg = config.compose([*HEART, f"data_dir={DATA_DIR}"])
    return TabularTask(cfg.task, DATA_DIR).raw_sites(cfg.partition, config.num_sites(cfg), cfg.seed)


def _pooled(column: str) -> np.ndarray:
    """One column of every site's non-test rows, pooled."""
    x = np.concatenate([t.numeric[column] for s in _sites() for t in s.fit_rows])
    return x[~np.isnan(x)]


def test_a_learner_registered_outside_app_runs_under_plain_and_secure_aggregation(tmp_path: Path) -> None:
    x = _pooled("age")
    plain = run_inprocess([*HEART, "learner.name=column_moments", "+learner.options.column=age"], tmp_path / "plain")
    secagg = run_inprocess([*HEART, "learner.name=column_moments", "+learner.options.column=age", "aggregation=secagg",
                            "report=true"], tmp_path / "secagg")
    got = plain["learner"]
    assert got["name"] == "column_moments" and got["revealed"] and got["sites"] == 4 and plain["status"] == "completed"
    assert got["rows"] == x.size
    assert got["mean"] == pytest.approx(x.mean(), rel=1e-12)
    assert got["variance"] == pytest.approx(x.var(ddof=1), rel=1e-9)
    assert secagg["learner"]["totals"] == got["totals"]  # the same total, bit for bit, under either option
    assert "every site's vector" in got["coordinator_learns"] and "only" in secagg["learner"]["coordinator_learns"]
    assert plain["kind"] == "learner" and "history" not in plain  # no rounds were run
    report = (tmp_path / "secagg" / "report.md").read_text()  # the run's report says what the coordinator learned
    assert "Learner `column_moments`" in report and secagg["learner"]["coordinator_learns"] in report


def test_the_sites_refuse_a_program_they_do_not_have_and_a_bad_column() -> None:
    node = {"partition-id": 0, "num-partitions": 4}
    overrides = " ".join([*HEART, f"data_dir={DATA_DIR}", "site_policy.statistics.max_sums=2"])
    ctx = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={"overrides": overrides})
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    def ask(program: str, column: str) -> Message:
        rec = ConfigRecord({"id": 1, "what": "moments", "length": 3, "program": program, "column": column})
        return client_app.app(Message(RecordDict({SUM_REQUEST: rec}), dst_node_id=7, message_type="query.fedsilo_sum"),
                              ctx)

    assert not ask("test.column_moments", "age").has_error()
    reply = ask("os.system", "age")  # a name the site has no program for: data, never code
    assert reply.has_error() and "no protected-sum program 'os.system'" in reply.error.reason
    reply = ask("test.column_moments", "patient")
    assert reply.has_error() and "no numeric column 'patient'" in reply.error.reason
    reply = ask("test.column_moments", "age")  # how often: the policy's statistics.max_sums steps per run, no more
    assert reply.has_error() and reply.error.code == 403 and "statistics.max_sums=2" in reply.error.reason
    from tasks.tabular.task import TabularTask

    fingerprint = TabularTask(config.compose([*HEART, f"data_dir={DATA_DIR}"]).task, DATA_DIR).fingerprint()
    out_of_order = ConfigRecord({"id": 1, "what": "spread", "length": 3, "program": "fedsilo.preprocessing",
                                 "prep-fingerprint": fingerprint})  # a later step before its totals exist
    fresh = Context(run_id=2, node_id=7, node_config=node, state=RecordDict(), run_config={"overrides": overrides})
    reply = client_app.app(Message(RecordDict({SUM_REQUEST: out_of_order}), dst_node_id=7,
                                   message_type="query.fedsilo_sum"), fresh)
    assert reply.has_error() and reply.error.code == 422 and "prep-moments" in reply.error.reason, reply.error.reason


def test_the_learner_group_is_checked_before_anything_runs() -> None:
    with pytest.raises(ConfigError, match="learner.name"):
        config.compose([*HEART, "learner.name=nonesuch"])
    with pytest.raises(ConfigError, match="learner.options"):
        config.compose([*HEART, "learner.name=torch", "+learner.options.column=age"])  # the torch learner takes none
    with pytest.raises(ConfigError, match="learner.options.column"):
        config.compose([*HEART, "learner.name=column_moments"])
    with pytest.raises(ConfigError, match="privacy.name"):
        config.compose([*HEART, "learner.name=column_moments", "+learner.options.column=age", "privacy=dpsgd"])
    with pytest.raises(ConfigError, match="audit"):
        config.compose([*HEART, "learner.name=column_moments", "+learner.options.column=age", "audit=true"])


def test_an_installed_package_is_found_by_its_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A coordinator and its sites load a learner and its program by name from what is installed (an entry point
    naming the package's module); a name no installed package declares stays refused."""
    import importlib.metadata
    import sys

    module = "tests.integration.learner_plugin"
    declared = {"fedsilo.learners": {"row_count": module}, "fedsilo.programs": {"plugin.row_count": module}}

    def entry_points(group: str, name: str) -> list[importlib.metadata.EntryPoint]:
        value = declared.get(group, {}).get(name)
        return [importlib.metadata.EntryPoint(name, value, group)] if value else []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    sys.modules.pop(module, None)
    learners.REGISTRY.pop("row_count", None)
    programs.REGISTRY.pop("plugin.row_count", None)
    try:
        got = run_inprocess([*HEART, "learner.name=row_count"], tmp_path)["learner"]
        assert got["rows"] == sum(len(t) for s in _sites() for t in s.fit_rows)  # every non-test row of the four
        assert got["sites"] == 4 and "row_count" in learners.REGISTRY and "plugin.row_count" in programs.REGISTRY
        with pytest.raises(programs.ProgramError, match="no protected-sum program 'plugin.nonesuch'"):
            programs.get("plugin.nonesuch")
    finally:
        learners.REGISTRY.pop("row_count", None)
        programs.REGISTRY.pop("plugin.row_count", None)
