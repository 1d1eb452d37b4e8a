"""A learner package as an installed plugin would ship it: importing the module registers its learner and its
program (tests/integration/test_learners.py loads it through an entry point, as a site or a coordinator would)."""

from __future__ import annotations

from collections.abc import Generator, Mapping
from typing import Any, ClassVar

import numpy as np

from core.programs import Ask, Gather, Program, SiteCall, register
from tasks import learners
from tasks.base import Task
from tasks.learners import SumLearner


@register
class RowCountProgram(Program):
    """The federation's number of non-test rows: one sum of one value."""

    name: ClassVar[str] = "plugin.row_count"

    def run(self) -> Generator[Ask | Gather, Any, dict[str, Any]]:
        total = yield Ask("rows", 1, reveal=True)
        return {"rows": None if total.values is None else float(total.values[0]), "sites": total.sites}

    @classmethod
    def site(cls, step: str, call: SiteCall) -> np.ndarray:
        return np.array([float(sum(len(t) for t in call.data.fit_rows))])


class RowCount(SumLearner):
    """``learner.name=row_count``."""

    name: ClassVar[str] = "row_count"

    def program(self, task: Task, options: Mapping[str, Any]) -> Program:
        return RowCountProgram()


learners.register(RowCount())
