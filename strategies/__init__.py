"""Server-side strategies. ``build(cfg, num_sites)`` -> a Message-API Strategy."""

from __future__ import annotations

from typing import TYPE_CHECKING

from strategies.fedavg import FedAvg
from strategies.fedprox import FedProx, client_penalty

if TYPE_CHECKING:
    from app.config import FedsiloConfig


def build(cfg: FedsiloConfig, num_sites: int) -> FedAvg:
    """The strategy named by ``cfg.strategy.name`` for ``num_sites`` sites."""
    s = cfg.strategy
    fraction_evaluate = s.fraction_evaluate if cfg.task.val_fraction > 0 else 0.0
    if s.name == "fedavg":
        return FedAvg(num_sites, fraction_train=s.fraction_train, fraction_evaluate=fraction_evaluate)
    if s.name == "fedprox":
        from app.config import FedProxConfig

        assert isinstance(s, FedProxConfig)
        return FedProx(num_sites, mu=s.mu, fraction_train=s.fraction_train,
                       fraction_evaluate=fraction_evaluate, adaptive_mu=s.adaptive_mu,
                       mu_step=s.mu_step, mu_patience=s.mu_patience)
    raise ValueError(f"strategy.name={s.name!r} is not implemented")


__all__ = ["FedAvg", "FedProx", "build", "client_penalty"]
