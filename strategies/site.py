"""A strategy's site half: how one round of local work starts and what the reply holds.

The ClientApp (``app/client_app.py``) asks :func:`strategies.site` for the half of the
configured strategy and calls it around the privacy option's trainer:

``start(glob, model, rnd)``   load the round's starting weights from the received record
                              (which may carry side values after the model's arrays) and
                              return the extra term of the local objective, if any;
``finish(model, glob, stats, rnd)``  the state the reply carries: the model's arrays, plus
                              the side values the coordinator half expects, in the same record
                              (so they travel inside the same protected sum under secagg);
``personal_model(glob, model, rnd)`` the site's own model for the final per-site evaluation
                              (:mod:`strategies.personal`); the global model by default.

Halves stack: a personalization layer (:mod:`strategies.personal`) wraps the strategy's own
half. Site state that outlives the message lives in :class:`core.state.SiteStore`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord
from torch import nn

from core.state import SiteStore
from strategies.fedprox import client_penalty
from tasks.training import Penalty

#: Train ``model`` in place on the site's training rows: (model, penalty, epochs, lr) -> stats.
TrainFn = Callable[[nn.Module, Penalty | None, int, float], dict[str, float]]


@dataclass
class SiteRound:
    """What a strategy's site half may use in one round."""

    config: ConfigRecord            # the instruction's config (server-round, proximal-mu, job id, ...)
    server_round: int
    store: SiteStore | None         # the site's own state (None: the strategy keeps none)
    lr: float                       # the task's local learning rate and momentum
    momentum: float
    train: TrainFn | None = None    # extra local training (Ditto's personal model, fine-tuning)


def model_part(glob: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own arrays of a received record (side values dropped)."""
    keys = model.state_dict().keys()
    return {k: glob[k] for k in keys}


def add_penalties(a: Penalty | None, b: Penalty | None) -> Penalty | None:
    """Both terms of the local objective (either may be absent)."""
    if a is None or b is None:
        return a or b
    return lambda model: a(model) + b(model)


def step_normalizer(steps: float, momentum: float) -> float:
    """FedNova's ``a_i``: how many plain-SGD steps ``steps`` momentum-SGD steps amount to.

    With momentum ``rho`` the update is ``-lr * sum_t a_t g_t`` where the coefficients sum to
    ``(steps - rho (1 - rho^steps) / (1 - rho)) / (1 - rho)`` (Wang et al. 2020, appendix);
    ``steps`` without momentum."""
    if momentum <= 0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1.0 - rho**steps) / (1.0 - rho)) / (1.0 - rho)


class StrategySite:
    """FedAvg's site half (and FedProx's, through the proximal term the instruction asks for)."""

    def start(self, glob: dict[str, torch.Tensor], model: nn.Module, rnd: SiteRound) -> Penalty | None:
        """Load the global model into ``model``; the round's extra loss term (FedProx's), if any."""
        model.load_state_dict(model_part(glob, model))
        return client_penalty(rnd.config, model)

    def finish(self, model: nn.Module, glob: dict[str, torch.Tensor], stats: dict[str, float],
               rnd: SiteRound) -> dict[str, torch.Tensor]:
        """The reply's arrays after local training: the trained model (no side values)."""
        return dict(model.state_dict())

    def personal_model(self, glob: dict[str, torch.Tensor], model: nn.Module, rnd: SiteRound) -> bool:
        """Load the site's personal model into ``model``; False: it has none (the global model)."""
        model.load_state_dict(model_part(glob, model))
        return False
