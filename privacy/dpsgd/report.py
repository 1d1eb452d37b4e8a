"""The run's privacy summary (results.json's ``privacy`` section) from the sites' ledgers."""

from __future__ import annotations

from typing import Any

from privacy.dpsgd.config import DPSGDConfig


def summarize(dp: DPSGDConfig, participation: dict[int, dict[str, Any]], exhausted: dict[int, str],
              names: dict[str, str]) -> dict[str, Any]:
    """``results.json``'s ``privacy`` section: each site's cumulative epsilon after its last
    round, per round, and the sites that stopped because their budget was spent. Sites are
    keyed by name (a resumed run reaches them under new node ids)."""
    per_site: dict[str, dict[str, Any]] = {}
    for server_round in sorted(participation):
        for label, rec in participation[server_round].get("privacy", {}).items():
            per_site[names.get(label, label)] = {**rec, "last_round": server_round, "label": label}
    return {
        "mechanism": "dpsgd",
        "guarantee": ("example-level (epsilon, delta)-DP for every training row of each site, with respect to "
                      "everything that leaves the site (each round's update, hence the final model); "
                      "rows of different sites are disjoint, so a row's guarantee is its own site's epsilon"),
        "delta": dp.delta,
        "target_epsilon": dp.target_epsilon,
        "accountant": dp.accountant,
        "max_grad_norm": dp.max_grad_norm,
        "epsilon_per_site": {site: rec["epsilon"] for site, rec in per_site.items()},
        "max_epsilon": max((rec["epsilon"] for rec in per_site.values()), default=0.0),
        "sites": per_site,
        "budget_exhausted": {str(node): reason for node, reason in exhausted.items()},
    }
