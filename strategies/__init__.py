"""Server-side strategies. ``build(cfg, num_sites)`` -> a Message-API Strategy."""

from __future__ import annotations

from typing import TYPE_CHECKING

from strategies.fedavg import FedAvg
from strategies.fedprox import FedProx, client_penalty
from strategies.secagg.server import SecureAggregator

if TYPE_CHECKING:
    from app.config import FedsiloConfig


def secure_aggregator(cfg: FedsiloConfig) -> SecureAggregator | None:
    """The secure-aggregation driver ``cfg.aggregation`` asks for, or None (plain)."""
    from app.config import SecAggConfig

    a = cfg.aggregation
    if isinstance(a, SecAggConfig):
        return SecureAggregator(a.clip, a.value_bits, a.threshold, a.stage_timeout, a.neighbours)
    return None


def build(cfg: FedsiloConfig, num_sites: int) -> FedAvg:
    """The strategy named by ``cfg.strategy.name`` for ``num_sites`` sites."""
    s = cfg.strategy
    fraction_evaluate = s.fraction_evaluate if cfg.task.val_fraction > 0 else 0.0
    secure = secure_aggregator(cfg)
    if s.name == "fedavg":
        return FedAvg(num_sites, fraction_train=s.fraction_train, fraction_evaluate=fraction_evaluate, secure=secure)
    if s.name == "fedprox":
        from app.config import FedProxConfig

        assert isinstance(s, FedProxConfig)
        return FedProx(num_sites, mu=s.mu, fraction_train=s.fraction_train,
                       fraction_evaluate=fraction_evaluate, adaptive_mu=s.adaptive_mu,
                       mu_step=s.mu_step, mu_patience=s.mu_patience, secure=secure)
    raise ValueError(f"strategy.name={s.name!r} is not implemented")


__all__ = ["FedAvg", "FedProx", "build", "client_penalty"]
