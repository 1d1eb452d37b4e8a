"""``learner=auto``: a linear model and boosted trees, fitted in turn; the lower pooled validation loss wins.

A table of a few hundred rows is often best served by a regularised linear model, a larger or non-linear one
by trees; which, the pooled validation rows decide, not a default. The two programs run as parts of one
(:class:`AutoProgram`): every request names its part, each part's sums and decisions are its own program's
(:mod:`learners.glm`, :mod:`learners.gbdt`), and the outcome holds both fits, the chosen model first.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from typing_extensions import override

from core.config import ConfigError
from core.programs import Ask, Gather, Program, ProgramError, SiteCall
from core.programs import register as register_program
from learners.gbdt import GbdtLearner
from learners.gbdt.options import GbdtOptions
from learners.gbdt.program import GbdtProgram, Outcome
from learners.glm import GlmLearner, GlmOptions, GlmOutcome, GlmProgram
from learners.survival import SurvivalLearner, SurvivalOptions, SurvivalOutcome
from tasks.base import Task
from tasks.learners import LearnerConfig, SumLearner, register

PARTS: dict[str, type[Program]] = {"glm": GlmProgram, "gbdt": GbdtProgram}
PART_KEY = "auto-part"


@dataclass
class AutoOutcome:
    """Both fits and the choice."""

    chosen: str
    glm: GlmOutcome
    gbdt: Outcome

    @property
    def val_loss(self) -> dict[str, float]:
        """Each part's pooled validation loss (the gbdt's at its best round)."""
        losses = [h["val_loss"] for h in self.gbdt.history if np.isfinite(h["val_loss"])]
        return {"glm": self.glm.val_loss, "gbdt": min(losses) if losses else float("nan")}


@register_program
@dataclass
class AutoProgram(Program):
    """``learner=auto``: the two parts in turn (module docstring)."""

    name: ClassVar[str] = "fedsilo.auto"
    decisions: ClassVar[frozenset[str]] = GlmProgram.decisions | GbdtProgram.decisions

    task: Task
    glm: GlmOptions
    gbdt: GbdtOptions

    def __post_init__(self) -> None:
        super().__init__()

    def _part(self, part: str, program: Program) -> Generator[Ask | Gather, Any, Any]:
        """``program``'s steps as this program's: its state sent under this program's name, with its part."""
        steps = program.run()
        try:
            step = next(steps)
            while True:
                self.state.clear()
                self.state.update(program.state)
                self.state[PART_KEY] = part
                got = yield step
                program.state.update({k: v for k, v in self.state.items() if k != PART_KEY})  # kept totals
                step = steps.send(got)
        except StopIteration as done:
            return done.value

    @override
    def run(self) -> Generator[Ask | Gather, Any, AutoOutcome]:
        """The linear model, then the trees; the lower pooled validation loss is chosen."""
        glm: GlmOutcome = yield from self._part("glm", GlmProgram(self.task, self.glm))
        gbdt: Outcome = yield from self._part("gbdt", GbdtProgram(self.task, self.gbdt))
        out = AutoOutcome("glm", glm, gbdt)
        losses = out.val_loss
        if np.isfinite(losses["gbdt"]) and not losses["gbdt"] >= losses["glm"]:
            out.chosen = "gbdt"
        return out

    @classmethod
    def _of(cls, params: Mapping[str, Any]) -> type[Program]:
        part = str(params.get(PART_KEY, ""))
        if part not in PARTS:
            raise ProgramError(f"a {cls.name} request without a known part (one of {sorted(PARTS)})")
        return PARTS[part]

    @classmethod
    @override
    def decision(cls, step: str, total: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        """The part's own decision."""
        part = cls._of(params)
        if step not in part.decisions:
            raise ProgramError(f"{part.name} decides no {step!r} total")
        return part.decision(step, total, params)

    @classmethod
    @override
    def site(cls, step: str, call: SiteCall) -> np.ndarray | str:
        """The part's own site half."""
        return cls._of(call.params).site(step, call)


class AutoLearner(SumLearner):
    """``learner.name=auto``: ``+learner.options.glm.KEY=V`` and ``+learner.options.gbdt.KEY=V`` reach the parts."""

    name: ClassVar[str] = "auto"

    def _options(self, options: Mapping[str, Any]) -> tuple[GlmOptions, GbdtOptions]:
        unknown = sorted(set(options) - {"glm", "gbdt"})
        if unknown:
            raise ConfigError(f"learner.options.{unknown[0]}", options[unknown[0]], "glm or gbdt (each a mapping of "
                              "that learner's options)")
        return GlmOptions.parse(dict(options.get("glm") or {})), GbdtOptions.parse(dict(options.get("gbdt") or {}))

    @override
    def validate(self, cfg: LearnerConfig, task: type[Task]) -> None:
        """Both parts' options, and a task with a table (or a survival table's options: ``learner=survival``'s)."""
        options = dict(cfg.options)
        if _survival_options(options):
            SurvivalLearner().validate(LearnerConfig("survival", options), task)
            return
        self._options(options)
        GbdtLearner().validate(LearnerConfig("gbdt", {}), task)

    @override
    def program(self, task: Task, options: Mapping[str, Any]) -> Program:
        """The two-part program over ``task``'s sites (a survival label: the survival analyses, with defaults)."""
        if getattr(task, "label_kind", "") == "survival":
            return SurvivalLearner().program(task, options if _survival_options(options) else {})
        if _survival_options(options):
            raise ConfigError("learner.options", dict(options), "options of glm or gbdt: these are survival options, "
                              "and the schema's label is not a survival label")
        glm, gbdt = self._options(options)
        return AutoProgram(task, glm, gbdt)

    @override
    def results(self, outcome: Any) -> dict[str, Any]:
        """The choice, both validation losses, the chosen model's test metrics; each part's own results."""
        if isinstance(outcome, SurvivalOutcome):
            return SurvivalLearner().results(outcome)
        out: AutoOutcome = outcome
        glm, gbdt = GlmLearner().results(out.glm), GbdtLearner().results(out.gbdt)
        chosen = glm if out.chosen == "glm" else gbdt
        return {"chosen": out.chosen, "val_loss": out.val_loss, "objective": chosen["objective"],
                "test": chosen["test"], "sites": chosen["sites"], "vocab": chosen["vocab"],
                "best_round": out.gbdt.best_round, "parts": {"glm": glm, "gbdt": gbdt}}

    @override
    def save(self, outcome: Any, folder: Path) -> dict[str, str]:
        """The chosen model's files (``model.json``; trees also ``model.xgb.json``)."""
        if isinstance(outcome, SurvivalOutcome):
            return SurvivalLearner().save(outcome, folder)
        out: AutoOutcome = outcome
        if out.chosen == "glm":
            return GlmLearner().save(out.glm, folder)
        return GbdtLearner().save(out.gbdt, folder)


def _survival_options(options: Mapping[str, Any]) -> bool:
    """Whether ``options`` are ``learner=survival``'s (a survival table's default learner is that analysis)."""
    return bool(options) and set(options) <= set(SurvivalOptions.__dataclass_fields__)


register(AutoLearner())
