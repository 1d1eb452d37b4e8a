"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

Both halves live here:

* client half, :class:`ProximalTerm`: each site adds ``mu/2 * ||w - w_global||^2`` to
  its local objective, ``w_global`` being a frozen copy of the weights it received;
* server half, :class:`FedProx`: FedAvg's aggregation, plus ``proximal-mu`` in every
  training instruction (Flower's key), and optionally the paper's adaptive ``mu``.

Stragglers' partial updates are aggregated (``straggler_policy=partial``, the default
here) with the same weight as any site's: its number of training rows, ``p_k = n_k / n``
as in the paper. With ``mu=0`` no term is added at all, so FedProx is then FedAvg,
bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from torch import nn
from typing_extensions import override

from strategies.combine import Combine
from strategies.fedavg import FedAvg

if TYPE_CHECKING:
    from core.records import RunRecord
    from strategies.fedavg import ReplyObserver

MU_KEY = "proximal-mu"


class ProximalTerm:
    """``mu/2 * sum_i ||w_i - w_global_i||^2`` over the model's trainable parameters.

    Construct it right after loading the global weights; it keeps a detached copy of them.
    Its gradient with respect to ``w`` is ``mu * (w - w_global)``.
    """

    def __init__(self, model: nn.Module, mu: float) -> None:
        self.mu = float(mu)
        self.anchor = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    def __call__(self, model: nn.Module) -> torch.Tensor:
        """The proximal term ``mu/2 * ||w - w_global||^2`` of ``model``'s trainable parameters."""
        params = [p for p in model.parameters() if p.requires_grad]
        squared = sum(((p - a) ** 2).sum() for p, a in zip(params, self.anchor, strict=True))
        return 0.5 * self.mu * squared  # type: ignore[return-value]


def client_penalty(train_config: ConfigRecord, model: nn.Module) -> ProximalTerm | None:
    """The client half: the proximal term the server asked for, or None (FedAvg, ``mu=0``)."""
    mu = float(train_config.get(MU_KEY, 0.0))  # type: ignore[arg-type]
    return ProximalTerm(model, mu) if mu > 0 else None


class FedProx(FedAvg):
    """FedAvg that sends ``proximal-mu`` to the sites and can adapt it between rounds.

    Parameters
    ----------
    num_sites, fraction_train, fraction_evaluate, combine, record, observers, layers : as for
        :class:`FedAvg` (``layers``: ``server_opt``, ``job``).
    mu : float
        Proximal coefficient for the first round.
    adaptive_mu : bool
        Adapt ``mu`` from the global loss: ``+mu_step`` when it rises, ``-mu_step`` (not
        below 0) after ``mu_patience`` consecutive decreases. The global loss is the
        pooled federated-validation loss when sites evaluate, else the training loss.
    """

    def __init__(self, num_sites: int, mu: float, fraction_train: float = 1.0,
                 fraction_evaluate: float = 1.0, adaptive_mu: bool = False,
                 mu_step: float = 0.1, mu_patience: int = 5, combine: Combine | None = None,
                 record: RunRecord | None = None, observers: list[ReplyObserver] | None = None,
                 **layers: Any) -> None:
        super().__init__(num_sites, fraction_train, fraction_evaluate, combine, record, observers, **layers)
        self.mu = float(mu)
        self.adaptive_mu, self.mu_step, self.mu_patience = adaptive_mu, mu_step, mu_patience
        self._last_loss: float | None = None
        self._decreases = 0

    @override
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[MU_KEY] = self.mu
        self.record.round(server_round).mu = self.mu
        return super().configure_train(server_round, arrays, config, grid)

    def finish_train(self, server_round: int, arrays: ArrayRecord | None,
                     metrics: MetricRecord | None) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Adapt ``mu`` from the round's training loss when the sites do not evaluate; then the
        server optimizer, if any."""
        if self.fraction_evaluate == 0.0 and metrics is not None and "train_loss" in metrics:
            self._adapt(server_round, float(metrics["train_loss"]))  # type: ignore[arg-type]
        return super().finish_train(server_round, arrays, metrics)

    @override
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None and "loss" in metrics:
            self._adapt(server_round, float(metrics["loss"]))  # type: ignore[arg-type]
        return metrics

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mu": self.mu, "last_loss": self._last_loss, "decreases": self._decreases}

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.mu, self._last_loss, self._decreases = float(state["mu"]), state["last_loss"], int(state["decreases"])

    def _adapt(self, server_round: int, loss: float) -> None:
        """The paper's heuristic; a no-op unless ``adaptive_mu``."""
        if not self.adaptive_mu:
            return
        if self._last_loss is not None:
            if loss > self._last_loss:
                self.mu += self.mu_step
                self._decreases = 0
            else:
                self._decreases += 1
                if self._decreases >= self.mu_patience:
                    self.mu = max(0.0, self.mu - self.mu_step)
                    self._decreases = 0
            log(INFO, "round %s: global loss %.4f -> mu %.3f for the next round", server_round, loss, self.mu)
        self._last_loss = loss
