"""Server-side strategies. ``build(cfg, num_sites)`` -> a Message-API Strategy."""

from __future__ import annotations

from typing import TYPE_CHECKING

from strategies.fedavg import FedAvg
from strategies.fedprox import FedProx, client_penalty
from strategies.robust import Robustness
from aggregation.secagg.server import SecureAggregator

if TYPE_CHECKING:
    from app.config import FedsiloConfig, PaillierConfig
    from aggregation.paillier.packing import Packer
    from aggregation.paillier.server import EncryptedAggregator


def secure_aggregator(cfg: FedsiloConfig) -> SecureAggregator | None:
    """The secure-aggregation driver ``cfg.aggregation`` asks for, or None (plain)."""
    from app.config import SecAggConfig

    a = cfg.aggregation
    if isinstance(a, SecAggConfig):
        return SecureAggregator(a.clip, a.value_bits, a.threshold, a.stage_timeout, a.neighbours)
    return None


def encrypted_aggregator(cfg: FedsiloConfig) -> EncryptedAggregator | None:
    """The Paillier aggregator ``cfg.aggregation`` asks for (public key only), or None."""
    from app.config import PaillierConfig

    a = cfg.aggregation
    if not isinstance(a, PaillierConfig):
        return None
    from aggregation.paillier.keys import PaillierKeyError, load_public
    from aggregation.paillier.server import EncryptedAggregator

    if not a.public_key:
        raise PaillierKeyError("aggregation=paillier needs aggregation.public_key=PATH (the server gets the public "
                               "key only; make the files with: fedsilo keys paillier --out DIR)")
    public = load_public(a.public_key)
    return EncryptedAggregator(public, paillier_packer(a, public.n.bit_length()))


def paillier_packer(a: PaillierConfig, key_bits: int) -> Packer:
    """The packing both halves use: plaintexts below the modulus."""
    from aggregation.paillier.packing import Packer

    return Packer(a.clip, a.value_bits, a.max_sites, key_bits - 1)


def build(cfg: FedsiloConfig, num_sites: int) -> FedAvg:
    """The strategy named by ``cfg.strategy.name`` for ``num_sites`` sites; wrapped in
    :class:`privacy.central.CentralDP` under ``privacy=central`` (it forwards every
    attribute of the strategy it wraps)."""
    from app.config import CentralDPConfig

    strategy = _build(cfg, num_sites)
    p = cfg.privacy
    if isinstance(p, CentralDPConfig):
        from privacy.central import CentralDP

        return CentralDP(strategy, p.noise_multiplier, p.clipping_norm, num_sites, p.delta,  # type: ignore[return-value]
                         p.target_epsilon)
    return strategy


def _build(cfg: FedsiloConfig, num_sites: int) -> FedAvg:
    s = cfg.strategy
    fraction_evaluate = s.fraction_evaluate if cfg.task.val_fraction > 0 else 0.0
    secure, encrypted = secure_aggregator(cfg), encrypted_aggregator(cfg)
    robust = Robustness(s.robust, s.assumed_byzantine, s.norm_bound)
    if s.name == "fedavg":
        return FedAvg(num_sites, fraction_train=s.fraction_train, fraction_evaluate=fraction_evaluate, secure=secure,
                      encrypted=encrypted, robust=robust)
    if s.name == "fedprox":
        from app.config import FedProxConfig

        assert isinstance(s, FedProxConfig)
        return FedProx(num_sites, mu=s.mu, fraction_train=s.fraction_train,
                       fraction_evaluate=fraction_evaluate, adaptive_mu=s.adaptive_mu,
                       mu_step=s.mu_step, mu_patience=s.mu_patience, secure=secure, encrypted=encrypted,
                       robust=robust)
    raise ValueError(f"strategy.name={s.name!r} is not implemented")


__all__ = ["FedAvg", "FedProx", "build", "client_penalty"]
