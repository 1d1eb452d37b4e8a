"""Fault injection for tests and demos (``faults.*``): sites that drop out of a round.

Each round ``round(faults.drop_rate * num_sites)`` sites, drawn from the seed (so every
site computes the same set on its own and runs are reproducible), drop out at
``faults.drop_stage``: under ``aggregation=secagg`` at that protocol stage (``keys``,
``masked_input`` or ``unmask``), under plain aggregation by sending no update.
A dropped site replies with an error (:data:`DROPPED_CODE`); the server treats it exactly
like a site that timed out: logged, counted, and the round goes on without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.replies import ReplyError
from core.seeding import chosen_sites

if TYPE_CHECKING:
    from app.config import FedsiloConfig

DROPPED_CODE = int(ReplyError.DROPPED)


def drops(cfg: FedsiloConfig, server_round: int, site_id: int, stage: str | None, num_sites: int) -> bool:
    """Whether site ``site_id`` of the ``num_sites`` drops out at ``stage`` of ``server_round`` (None: any stage)."""
    f = cfg.faults
    if f.drop_rate <= 0 or (stage is not None and stage != f.drop_stage):
        return False
    return site_id in chosen_sites(cfg.seed, server_round, num_sites, f.drop_rate, 0xD209)


def reason(stage: str | None) -> str:
    """The refusal's reason of a site that drops out (at a secure-aggregation stage, if any)."""
    return f"fault injection: site dropped out{f' at secagg stage {stage!r}' if stage else ''}"
