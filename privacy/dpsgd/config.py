"""The ``privacy=dpsgd`` schema (:class:`DPSGDConfig`), its checks, and one round's parameters (:class:`DPSGDParams`)."""

from __future__ import annotations

from dataclasses import dataclass

from core.config import check
from core.replies import ReplyError
from privacy.accountant import ACCOUNTANTS
from privacy.base import PrivacyConfig
from privacy.clipping import ENGINES

#: Error code of a site's reply when the round would exceed its privacy budget.
BUDGET_EXHAUSTED_CODE = int(ReplyError.BUDGET_EXHAUSTED)


BUDGET_EXHAUSTED = "privacy budget exhausted"


@dataclass
class DPSGDConfig(PrivacyConfig):
    """Schema of ``privacy=dpsgd``: example-level DP at every site.

    Each site's epsilon is cumulative over every round it trains in; a site whose next
    round would exceed ``target_epsilon`` does not train.
    """

    name: str = "dpsgd"
    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None  # null = derived from target_epsilon over num_rounds x local epochs
    batch_size: int = 0                    # expected Poisson batch size; 0 = the task's batch_size
    accountant: str = "rdp"                # rdp | prv (Opacus accountants)
    engine: str = "auto"                   # per-sample clipping: auto | fast | opacus | functorch


def validate(d: DPSGDConfig) -> None:
    """Range checks of the ``privacy=dpsgd`` keys."""
    check(d.target_epsilon > 0, "privacy.target_epsilon", d.target_epsilon, "a number > 0")
    check(0 < d.delta < 1, "privacy.delta", d.delta, "0 < delta < 1 (well below 1/rows per site)")
    check(d.max_grad_norm > 0, "privacy.max_grad_norm", d.max_grad_norm, "a number > 0")
    check(d.noise_multiplier is None or d.noise_multiplier > 0, "privacy.noise_multiplier",
          d.noise_multiplier, "null (derived from target_epsilon) or a number > 0")
    check(d.batch_size >= 0, "privacy.batch_size", d.batch_size, "0 (the task's batch_size) or an integer >= 1")
    check(d.accountant in ACCOUNTANTS, "privacy.accountant", d.accountant, f"one of {list(ACCOUNTANTS)}")
    check(d.engine in ENGINES, "privacy.engine", d.engine, f"one of {list(ENGINES)}")


@dataclass(frozen=True)
class DPSGDParams:
    """What the site's DP-SGD needs, resolved from ``privacy.*`` and its data size."""

    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    target_epsilon: float
    accountant: str
    engine: str = "auto"
