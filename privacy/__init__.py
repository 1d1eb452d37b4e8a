"""Differential privacy: DP-SGD at the sites, user-level DP at the server, and an audit.

``privacy=none|dpsgd|central``, each a :class:`~privacy.base.PrivacyOption` (site trainer,
coordinator half, the aggregation capabilities it needs), chosen from :data:`REGISTRY`.

* :mod:`privacy.base` — the option interface, the non-private trainer;
* :mod:`privacy.dpsgd` — DP-SGD: the site's private training round and its ledger, the
  coordinator's record of every site's spending (:class:`~privacy.dpsgd.BudgetLedger`);
* :mod:`privacy.accountant` — a site's cumulative privacy ledger (Opacus RDP / PRV
  accountants), kept in the node's ``context.state`` across rounds;
* :mod:`privacy.clipping` — per-sample gradient clipping backends (fedsilo's fast path
  for linear models, Opacus' ``GradSampleModule`` for everything else);
* :mod:`privacy.central` — user-level DP at the server (a wrapper around any strategy);
* :mod:`privacy.audit` — membership inference against a trained model.
"""

from __future__ import annotations

from privacy.base import NoPrivacy, PrivacyConfig, PrivacyOption
from privacy.central import Central
from privacy.dpsgd import DPSGD

REGISTRY: dict[str, PrivacyOption] = {o.name: o for o in (NoPrivacy(), DPSGD(), Central())}


def get(name: str) -> PrivacyOption:
    """The option registered under ``name``; ValueError naming the choices otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"privacy.name={name!r} is not one of {sorted(REGISTRY)}") from None


__all__ = ["REGISTRY", "PrivacyConfig", "PrivacyOption", "get"]
