"""A site's ledger checked before a round: the policy's cap, and the run's target epsilon."""

from __future__ import annotations

from privacy.accountant import PrivacyLedger
from privacy.dpsgd.config import BUDGET_EXHAUSTED, DPSGDParams
from privacy.site_ledger import SiteLedger


class BudgetExhausted(RuntimeError):
    """The round would take the site past its target epsilon."""


def check_cap(ledger: SiteLedger, params: DPSGDParams, steps: int) -> None:
    """The site's own cap (policy ``privacy.max_epsilon``) over everything it released from these rows, in
    every job; :class:`BudgetExhausted` if this release would pass it."""
    if ledger.cap is None:
        return
    after = ledger.ledger().with_steps(params.noise_multiplier, params.sample_rate, steps).epsilon(params.delta)
    if after > ledger.cap:
        raise BudgetExhausted(f"{BUDGET_EXHAUSTED}: this site's data set would reach epsilon {after:.3f} over its "
                              f"{len(ledger.jobs())} job(s) > its policy's max_epsilon {ledger.cap:g}")


def check_budget(ledger: PrivacyLedger, params: DPSGDParams, steps: int) -> float:
    """Epsilon after ``steps`` more steps; :class:`BudgetExhausted` if it exceeds the target."""
    after = ledger.with_steps(params.noise_multiplier, params.sample_rate, steps).epsilon(params.delta)
    if after > params.target_epsilon:
        raise BudgetExhausted(
            f"{BUDGET_EXHAUSTED}: this round's {steps} DP-SGD steps would take epsilon from "
            f"{ledger.epsilon(params.delta):.3f} to {after:.3f} > target {params.target_epsilon} (delta={params.delta})"
        )
    return after
