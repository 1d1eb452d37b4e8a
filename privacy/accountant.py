"""A site's privacy ledger: every DP-SGD step it ever took, accounted with Opacus.

Flower's Opacus example builds a new ``PrivacyEngine`` each round, so the epsilon it
reports covers that round only. Here the accountant's *history* (a list of
``(noise_multiplier, sample_rate, steps)``, Opacus' own format) is the state: it is
stored in the node's ``context.state`` after every round and replayed into a fresh
Opacus accountant to get the cumulative epsilon, so the figure covers every round the
site took part in, whatever process ran it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import lru_cache

from flwr.app import ConfigRecord

ACCOUNTANTS = ("rdp", "prv")
#: Key of the ledger in ``context.state`` (a ConfigRecord).
STATE_KEY = "fedsilo.dp.ledger"


@dataclass
class PrivacyLedger:
    """The DP-SGD steps a site has taken, and the accountant that composes them.

    ``history`` entries are ``(noise_multiplier, sample_rate, steps)``; consecutive
    entries with the same mechanism are merged, as Opacus does.
    """

    accountant: str = "rdp"
    history: list[tuple[float, float, int]] = field(default_factory=list)

    @property
    def steps(self) -> int:
        """Steps taken so far."""
        return sum(s for _, _, s in self.history)

    def with_steps(self, noise_multiplier: float, sample_rate: float, steps: int) -> PrivacyLedger:
        """A new ledger with ``steps`` more steps of this mechanism."""
        history = list(self.history)
        if steps <= 0:
            return PrivacyLedger(self.accountant, history)
        if history and history[-1][:2] == (noise_multiplier, sample_rate):
            history[-1] = (noise_multiplier, sample_rate, history[-1][2] + steps)
        else:
            history.append((noise_multiplier, sample_rate, steps))
        return PrivacyLedger(self.accountant, history)

    def epsilon(self, delta: float) -> float:
        """Cumulative epsilon at ``delta`` over the whole history (0 before any step)."""
        return epsilon_of(self.accountant, tuple(self.history), delta)

    # ---- persistence in context.state ------------------------------------------------
    def to_record(self) -> ConfigRecord:
        """The ledger as a reply's record carries it."""
        return ConfigRecord({
            "accountant": self.accountant,
            "noise": [float(h[0]) for h in self.history],
            "rate": [float(h[1]) for h in self.history],
            "steps": [int(h[2]) for h in self.history],
        })

    @classmethod
    def from_record(cls, record: ConfigRecord | None, accountant: str) -> PrivacyLedger:
        """The stored ledger, or an empty one. A ledger kept under another accountant is
        re-accounted with ``accountant`` (the history itself does not depend on it)."""
        if record is None:
            return cls(accountant)
        noise, rate, steps = (list(record.get(k, [])) for k in ("noise", "rate", "steps"))  # type: ignore[arg-type]
        if not len(noise) == len(rate) == len(steps):
            raise ValueError("corrupt privacy ledger in context.state: history columns differ in length")
        return cls(accountant, [(float(n), float(r), int(s)) for n, r, s in zip(noise, rate, steps, strict=True)])


@lru_cache(maxsize=256)
def epsilon_of(accountant: str, history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """Epsilon of a history under an Opacus accountant (``rdp`` or ``prv``)."""
    if not history:
        return 0.0
    from opacus.accountants import create_accountant  # lazy: opacus costs every ClientApp process 1 s

    acc = create_accountant(accountant)
    acc.history = list(history)
    with warnings.catch_warnings():  # at small epsilon the best RDP order is Opacus' largest: the bound is conservative
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(acc.get_epsilon(delta=delta))


@lru_cache(maxsize=256)
def noise_for_budget(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The smallest noise multiplier (Opacus' binary search, tolerance 0.01) whose
    ``steps`` steps at ``sample_rate`` stay within ``(target_epsilon, delta)``."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():  # the search visits tiny multipliers whose best RDP order is the largest
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant=accountant))
