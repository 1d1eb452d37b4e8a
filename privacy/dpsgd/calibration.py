"""The sampling rate, steps per epoch and the noise multiplier that keeps a site within its target epsilon."""

from __future__ import annotations

from privacy.accountant import noise_for_budget
from privacy.dpsgd.config import DPSGDConfig, DPSGDParams


def sample_rate(batch_size: int, rows: int) -> float:
    """Poisson sampling rate giving ``batch_size`` rows per step on average."""
    if rows <= 0:
        raise ValueError("a site with no training rows cannot run DP-SGD")
    return min(1.0, batch_size / rows)


def steps_per_epoch(rate: float) -> int:
    """Steps in one epoch at Poisson rate ``rate`` (Opacus: ``int(1/rate)``)."""
    return max(1, int(1 / rate))


def noise_multiplier(target_epsilon: float, delta: float, rate: float, planned_steps: int, accountant: str,
                     given: float | None) -> float:
    """``given``, or the smallest multiplier keeping ``planned_steps`` within the budget."""
    if given is not None:
        return float(given)
    return noise_for_budget(float(target_epsilon), float(delta), float(rate), int(planned_steps), accountant)


def site_params(dp: DPSGDConfig, rows: int, task_batch_size: int, num_rounds: int, epochs: int) -> DPSGDParams:
    """The site's DP-SGD parameters: its sampling rate and the noise that spreads its
    budget over ``num_rounds`` rounds of ``epochs`` epochs (or the given multiplier)."""
    rate = sample_rate(dp.batch_size or task_batch_size, rows)
    planned = num_rounds * epochs * steps_per_epoch(rate)
    sigma = noise_multiplier(dp.target_epsilon, dp.delta, rate, planned, dp.accountant, dp.noise_multiplier)
    return DPSGDParams(rate, sigma, dp.max_grad_norm, dp.delta, dp.target_epsilon, dp.accountant, dp.engine)
