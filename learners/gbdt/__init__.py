"""``learner=gbdt``: histogram gradient-boosted trees over the sites' tables, fitted by protected sums.

* :mod:`learners.gbdt.trees`: the arithmetic (gradients, bins, histograms, splits), shared by both halves;
* :mod:`learners.gbdt.program`: the protected-sum program (coordinator half, decisions, site half);
* :mod:`learners.gbdt.model`: the fitted ensemble, its scores and XGBoost's JSON model format;
* :mod:`learners.pooled`: the same program on rows in one process (the pooled reference);
* :mod:`learners.gbdt.options`, :mod:`learners.rows`: the options, a site's rows as matrices.

docs/gbdt.md says what the coordinator learns under each aggregation option.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from typing_extensions import override

from core.config import ConfigError
from core.programs import Program
from core.programs import register as register_program
from learners.gbdt.model import Ensemble
from learners.gbdt.options import GbdtOptions
from learners.gbdt.program import GbdtProgram, Outcome
from tasks.base import PooledTask, Task
from tasks.learners import LearnerConfig, SumLearner, register
from tasks.tabular.task import TabularTask


class GbdtLearner(SumLearner):
    """``learner.name=gbdt`` (options: :class:`~learners.gbdt.options.GbdtOptions`)."""

    name: ClassVar[str] = "gbdt"

    @override
    def validate(self, cfg: LearnerConfig, task: type[Task]) -> None:
        """The options' ranges, and a task with a table."""
        GbdtOptions.parse(dict(cfg.options))
        if not (issubclass(task, TabularTask) or issubclass(task, PooledTask)) or getattr(task, "name", "") == \
                "medical_imaging":
            raise ConfigError("learner.name", "gbdt", "a learner for tables: task=tabular or a bundled tabular task "
                              "(finance, medical)")

    @override
    def program(self, task: Task, options: Mapping[str, Any]) -> Program:
        """The boosting program over ``task``'s sites."""
        return GbdtProgram(task, GbdtOptions.parse(dict(options)))

    @override
    def results(self, outcome: Any) -> dict[str, Any]:
        """The ``learner`` section of results.json: the fit's course, test metrics and feature importance."""
        out: Outcome = outcome
        ens = out.ensemble()
        return {"objective": out.objective, "classes": out.classes, "rounds": len(out.history),
                "best_round": out.best_round, "trees": len(out.trees), "stopped": out.stopped, "sites": out.sites,
                "seconds_per_round": out.seconds_per_round, "history": out.history, "test": out.test,
                "importance": ens.importance(), "features": out.names, "vocab": out.vocab, "rejected": out.rejected,
                "trees_ended_by_a_dropout": out.ended_early,
                "nodes_left_leaves_as_no_histogram": out.inconsistent,
                "options": GbdtOptions.parse({}).__class__.from_json(out.options.to_json()).__dict__}

    @override
    def save(self, outcome: Any, folder: Path) -> dict[str, str]:
        """``model.json`` and ``model.xgb.json`` (XGBoost's format) in the run's folder."""
        return outcome.ensemble().save(folder)


register_program(GbdtProgram)
register(GbdtLearner())

__all__ = ["Ensemble", "GbdtLearner", "GbdtOptions", "GbdtProgram"]
