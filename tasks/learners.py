"""Learners: how a model is fitted from a task's data (the ``learner`` group of the config).

A task (:mod:`tasks.base`) says what the data are and how a site reads them; a learner says how
a model is fitted from them:

* ``torch`` (the default): a torch model (:meth:`~tasks.base.Task.build_model`) trained by rounds
  of local training, combined by the strategy under the privacy and aggregation options;
* a :class:`SumLearner`: a protected-sum program (:mod:`core.programs`) over the sites' data,
  the same totals under every aggregation option (plain, secagg, Paillier). Histogram trees
  and survival statistics are this kind.

A new sum-based learner touches its own package (a :class:`SumLearner` and its
:class:`~core.programs.Program`), its registration (:func:`register` and
:func:`core.programs.register`, at import of its package) and its docs; ``app/`` needs no
change (``tests/integration/test_learners.py`` registers one from a test module).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from core.config import ConfigError, check
from core.programs import Program, lookup
from tasks.base import Task


@dataclass
class LearnerConfig:
    """Hydra schema of the ``learner`` group: the learner's name and its own options."""

    name: str = ""  # "" = the task's default (Task.default_learner: torch; task=tabular: auto)
    options: dict[str, Any] = field(default_factory=dict)  # the learner's own keys (its docs list them)


class Learner(ABC):
    """One value of ``learner.name``."""

    name: ClassVar[str]
    #: trains by rounds of local training (the strategy, privacy and aggregation stack), or by sums
    rounds: ClassVar[bool]

    def validate(self, cfg: LearnerConfig, task: type[Task]) -> None:
        """Checks of the learner's options against the task (none by default)."""


class TorchLearner(Learner):
    """Today's path: local training of the task's torch model, rounds combined by the strategy."""

    name: ClassVar[str] = "torch"
    rounds: ClassVar[bool] = True

    def validate(self, cfg: LearnerConfig, task: type[Task]) -> None:
        """The torch learner takes no options (its keys are the task's and the strategy's)."""
        check(not cfg.options, "learner.options", dict(cfg.options), "empty for learner=torch (the task and "
              "strategy groups hold its settings)")


class SumLearner(Learner):
    """A learner that is one protected-sum program over the sites' data."""

    rounds: ClassVar[bool] = False

    @abstractmethod
    def program(self, task: Task, options: Mapping[str, Any]) -> Program:
        """The program fitting this learner's model on ``task``'s sites (``options``: ``learner.options``)."""

    def results(self, outcome: Any) -> dict[str, Any]:
        """The ``learner`` section of results.json from the program's outcome (JSON values)."""
        return dict(outcome) if isinstance(outcome, Mapping) else {"outcome": outcome}

    def save(self, outcome: Any, folder: Path) -> dict[str, str]:
        """Write the fitted model's files into the run's ``folder``; their paths by kind (none by default)."""
        return {}


REGISTRY: dict[str, Learner] = {}


def register(learner: Learner) -> Learner:
    """Make ``learner`` selectable as ``learner.name=<its name>`` (one instance per name)."""
    if learner.name in REGISTRY and type(REGISTRY[learner.name]) is not type(learner):
        raise ValueError(f"learner {learner.name!r} is registered already, by {type(REGISTRY[learner.name])!r}")
    REGISTRY[learner.name] = learner
    return learner


#: Installed packages name their learners here (``[project.entry-points."fedsilo.learners"]``, name = module).
ENTRY_POINTS = "fedsilo.learners"


def get(name: str) -> Learner:
    """The learner registered under ``name`` (loading an installed package's entry point of that name if need
    be); ValueError naming the choices otherwise."""
    found = lookup(REGISTRY, ENTRY_POINTS, name)
    if found is None:
        raise ValueError(f"learner.name={name!r} is not one of {sorted(REGISTRY)}")
    return found


def validate(cfg: LearnerConfig, task: type[Task]) -> None:
    """The ``learner`` group's checks: a known learner, and its own (an unset name becomes the task's default)."""
    if not cfg.name:
        cfg.name = task.default_learner
    try:
        learner = get(cfg.name)
    except ValueError:
        raise ConfigError("learner.name", cfg.name, f"one of {sorted(REGISTRY)} (or an installed package's "
                          f"{ENTRY_POINTS!r} entry point)") from None
    learner.validate(cfg, task)


register(TorchLearner())
