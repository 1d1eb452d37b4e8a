"""The privacy axis: a site-side training mechanism and a coordinator half, per option.

``privacy=none|dpsgd|central``, each a :class:`PrivacyOption`:

* :meth:`PrivacyOption.trainer` is the site's :class:`LocalTrainer`: how a round of local
  training runs (plain SGD, or DP-SGD with the site's ledger in ``context.state``);
* :meth:`PrivacyOption.coordinator` is its :class:`Coordinator`: reply observers (DP-SGD's
  budget ledger), a wrapper around the strategy (central DP), the ``privacy`` section of
  ``results.json``, what a resumed run hands back to the sites;
* :attr:`PrivacyOption.needs` names the aggregation capabilities it requires (central DP
  must see every update), checked by the composition root.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp.strategy import Strategy
from torch import nn
from typing_extensions import override

from core.records import RoundRecord, RunRecord
from core.seeding import seed_cpu
from core.state import SiteStore
from tasks.base import Split, Task
from tasks.training import Penalty


@dataclass
class PrivacyConfig:
    """Schema of the ``privacy`` group (each option extends it)."""

    name: str = "none"


@dataclass(frozen=True)
class SiteLimits:
    """What the site's own policy allows a privacy mechanism, whatever the run config says
    (``app/site_policy.py``: ``privacy.*``). ``max_epsilon`` caps the site's ledger for its data set
    across every job; ``one_release_per_round`` refuses a second, different release in one round."""

    max_epsilon: float = float("inf")
    min_noise_multiplier: float = 0.0
    one_release_per_round: bool = False
    max_delta: float = 1.0


class LocalTrainer(ABC):
    """One round of a site's local training under a privacy option."""

    @abstractmethod
    def train(self, task: Task, model: nn.Module, split: Split, seed: int, context: Context,
              train_config: ConfigRecord, site_name: str, epochs: int, max_steps: int | None,
              penalty: Penalty | None, store: SiteStore | None = None,
              limits: SiteLimits | None = None) -> tuple[dict[str, float], dict[str, ConfigRecord]]:
        """Train ``model`` in place for ``epochs`` (at most ``max_steps`` steps: a straggler's
        partial work); return the training stats and the records the reply carries. ``store`` is
        the site's own state folder for the job (:class:`core.state.SiteStore`), where a
        mechanism keeps what must outlive the process; ``limits``: the site's own policy's bounds.

        Raise :class:`core.replies.SiteRefusal` to reply with an error instead (e.g. a spent budget)."""


class PlainTrainer(LocalTrainer):
    """The task's own local training loop; deterministic given ``seed``."""

    @override
    def train(self, task: Task, model: nn.Module, split: Split, seed: int, context: Context,
              train_config: ConfigRecord, site_name: str, epochs: int, max_steps: int | None,
              penalty: Penalty | None, store: SiteStore | None = None,
              limits: SiteLimits | None = None) -> tuple[dict[str, float], dict[str, ConfigRecord]]:
        return task.train(model, split, seed, epochs=epochs, max_steps=max_steps, penalty=penalty), {}


def task_generator(task: Task, seed: int) -> tuple[torch.Generator, Any]:
    """Seed the CPU (dropout draws from it) and return the round's generator and augmentation."""
    seed_cpu(seed)
    return torch.Generator().manual_seed(seed), task.augmentation() if task.cfg.augment else None


class Coordinator:
    """A privacy option's coordinator half; this base does nothing (``privacy=none``)."""

    def observers(self) -> list[Any]:
        """Reply observers the strategy is built with (:class:`strategies.fedavg.ReplyObserver`)."""
        return []

    def wrap(self, strategy: Strategy) -> Strategy:
        """The strategy with this option's coordinator-side mechanism around it."""
        return strategy

    def summary(self) -> dict[str, Any] | None:
        """``results.json``'s ``privacy`` section, or None."""
        return None

    def resume(self, train_config: ConfigRecord) -> None:
        """What a resumed run hands the sites in its first training instructions."""

    @property
    def keeps_site_state(self) -> bool:
        """Whether the sites keep state of this option on their disk (the job id goes with every
        instruction, :mod:`core.state`)."""
        return False

    def note(self, rnd: RoundRecord) -> str:
        """A round's privacy figure for the progress line (`` | ...``), or ''."""
        return ""


class PrivacyOption(ABC):
    """One value of ``privacy``: schema, needs, site trainer, coordinator half."""

    name: ClassVar[str]
    schema: ClassVar[type[PrivacyConfig]]
    #: aggregation capabilities this option requires (:class:`aggregation.base.Capabilities`), with the reason
    needs: ClassVar[dict[str, str]] = {}

    def validate(self, cfg: Any) -> None:
        """Range checks of this option's keys."""

    def check_strategy(self, s: Any) -> None:
        """Refuse strategy settings this option cannot be combined with (raise ConfigError)."""

    def headline(self, summary: dict[str, Any]) -> str:
        """One line for the command's output from ``results.json``'s ``privacy`` section."""
        return f"epsilon {summary['epsilon']:.3f} at delta={summary['delta']:g}"

    def tables(self, summary: dict[str, Any]) -> tuple[list[str], list[tuple[list[str], list[list[str]]]]]:
        """(paragraphs, tables) for the report's privacy section from ``results.json``'s ``privacy``."""
        return [], []

    def policy_problems(self, cfg: Any, limits: SiteLimits) -> list[str]:
        """What in this option's run config a site's policy refuses (one reason each; names and bounds)."""
        return []

    def trainer(self, cfg: Any, num_rounds: int, batch_size: int) -> LocalTrainer:
        """The site's local trainer under this option."""
        return PlainTrainer()

    def coordinator(self, cfg: Any, num_sites: int, record: RunRecord) -> Coordinator:
        """The coordinator's half of this option."""
        return Coordinator()


class NoPrivacy(PrivacyOption):
    """``privacy=none``: plain local training, nothing added at the coordinator."""

    name = "none"
    schema = PrivacyConfig

