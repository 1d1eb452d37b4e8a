"""Schema and checks of ``faults.*``: fault injection for tests and demos (off by default)."""

from __future__ import annotations

from dataclasses import dataclass

from aggregation.secagg.client import STAGES as DROP_STAGES
from core.config import check

ATTACKS = ("sign_flip", "scale", "gaussian", "label_flip")  # app/faults/attacks.py


@dataclass
class FaultsConfig:
    """Fault injection for tests and demos (``faults.*``); off by default."""

    drop_rate: float = 0.0     # share of the sites that drop out of each round (chosen from the seed)
    drop_stage: str = "masked_input"  # secagg stage at which they drop (plain: they send no update)
    byzantine_fraction: float = 0.0   # share of the sites that attack (a fixed set, drawn from the seed)
    attack: str = "sign_flip"         # sign_flip | scale | gaussian | label_flip (app/faults/attacks.py)
    attack_scale: float = 0.0         # the attack's strength; 0 = its default
    crash_after_round: int = 0        # the coordinator dies after writing this round's checkpoint (0 = never)
    slow_fraction: float = 0.0        # share of the sites that compute slowly (a fixed set, drawn from the seed)
    slow_factor: float = 5.0          # ... taking this many times as long per local step (app/faults/slow.py)


def validate(f: FaultsConfig) -> None:
    """Range checks of the ``faults`` keys."""
    check(0 <= f.drop_rate < 1, "faults.drop_rate", f.drop_rate, "0 <= fraction < 1")
    check(f.drop_stage in DROP_STAGES, "faults.drop_stage", f.drop_stage, f"one of {list(DROP_STAGES)}")
    check(0 <= f.byzantine_fraction < 1, "faults.byzantine_fraction", f.byzantine_fraction, "0 <= fraction < 1")
    check(f.attack in ATTACKS, "faults.attack", f.attack, f"one of {list(ATTACKS)}")
    check(f.crash_after_round >= 0, "faults.crash_after_round", f.crash_after_round,
          "0 (never) or a round number >= 1")
    check(f.attack_scale >= 0, "faults.attack_scale", f.attack_scale, "0 (the attack's default) or a number > 0")
    check(0 <= f.slow_fraction < 1, "faults.slow_fraction", f.slow_fraction, "0 <= fraction < 1")
    check(f.slow_factor >= 1, "faults.slow_factor", f.slow_factor, "a factor >= 1 (1 = no slowdown)")
