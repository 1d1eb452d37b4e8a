"""Byzantine sites for evaluating robust aggregation (``faults.byzantine_fraction``, ``faults.attack``).

A fixed set of ``round(byzantine_fraction * num_sites)`` sites, drawn once from the seed,
misbehaves in every round it is sampled. Each attacker trains like an honest site (so its
reply is well formed and passes validation) and then corrupts what it sends; with
``w`` the global model and ``d = w_local - w`` its honest update, ``s`` = ``faults.attack_scale``
(0 = the attack's default below):

``sign_flip``   sends ``w - s * d``                      (default ``s = 4``)
``scale``       sends ``w + s * d``                      (default ``s = 50``)
``gaussian``    sends ``w + N(0, s^2)`` per value        (default ``s = 5``)
``label_flip``  trains on flipped labels (``y -> 1 - y``); ``s`` is unused

The corruption happens before masking or encryption, so the same attackers can be used
to see what ``aggregation=secagg`` with ``strategy.norm_bound`` does about them. Attackers
are chosen from the seed alone: every site knows whether it is one, and runs are
reproducible.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

from app.faults.config import ATTACKS
from core.seeding import chosen_sites, seed_for
from tasks.base import Split

if TYPE_CHECKING:
    from app.config import FedsiloConfig

assert set(ATTACKS) == {"sign_flip", "scale", "gaussian", "label_flip"}
DEFAULT_SCALE = {"sign_flip": 4.0, "scale": 50.0, "gaussian": 5.0, "label_flip": 0.0}
_SALT = 0xB42


def attackers(seed: int, num_sites: int, fraction: float) -> set[int]:
    """The site ids of the Byzantine sites: the same set in every round."""
    return chosen_sites(seed, 0, num_sites, fraction, _SALT)


def is_attacker(cfg: FedsiloConfig, site_id: int, num_sites: int) -> bool:
    """Whether site ``site_id`` of the ``num_sites`` is one of the Byzantine ones (``faults.byzantine_fraction``)."""
    return cfg.faults.byzantine_fraction > 0 and site_id in attackers(cfg.seed, num_sites, cfg.faults.byzantine_fraction)


def scale(cfg: FedsiloConfig) -> float:
    """The attack's strength: ``faults.attack_scale`` or the attack's default."""
    return cfg.faults.attack_scale or DEFAULT_SCALE[cfg.faults.attack]


def poison_data(cfg: FedsiloConfig, train: Split) -> Split:
    """The rows an attacker trains on: flipped labels under ``label_flip``, else unchanged."""
    if cfg.faults.attack != "label_flip":
        return train
    return Split(train.x, 1.0 - train.y, train.group)


def poison_model(cfg: FedsiloConfig, local: dict[str, torch.Tensor], glob: dict[str, torch.Tensor],
                 server_round: int, site_id: int) -> dict[str, torch.Tensor]:
    """The model an attacker sends instead of ``local`` (trained from the global ``glob``)."""
    attack, s = cfg.faults.attack, scale(cfg)
    if attack == "label_flip":
        return local
    gen = torch.Generator().manual_seed(seed_for(cfg.seed, server_round, site_id, _SALT))
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, w in glob.items():
        if not torch.is_floating_point(w):  # counters (e.g. BatchNorm's) are sent as they are
            out[name] = local[name]
            continue
        d = local[name] - w
        if attack == "sign_flip":
            out[name] = w - s * d
        elif attack == "scale":
            out[name] = w + s * d
        elif attack == "gaussian":
            out[name] = w + s * torch.randn(w.shape, generator=gen, dtype=w.dtype)
        else:  # pragma: no cover - config validation allows only ATTACKS
            raise ValueError(f"faults.attack={attack!r}")
    return out
