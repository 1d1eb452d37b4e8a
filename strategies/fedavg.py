"""FedAvg on Flower's Message API, hardened for cross-silo use.

Server half only: plain FedAvg needs nothing from the client beyond local training.
Differences from ``flwr.serverapp.strategy.FedAvg``:

* every reply is validated on its own (:mod:`strategies.validation`); a malformed or
  failed reply is dropped with a logged reason and the round goes on;
* replies are aggregated in a fixed site order, so the same seed gives the same model;
* federated evaluation pools the sites' confusion counts into exact pooled metrics;
* per round it keeps who was sampled, who replied and who was rejected (``participation``).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from strategies.validation import (
    SITE_KEY,
    WEIGHT_KEY,
    check_evaluate_reply,
    check_train_reply,
    site_label,
    site_order,
)
from tasks.metrics import pool_site_summaries

EVAL_KEYS = ("tp", "fp", "tn", "fn", "loss", "auc", "auc_weight")


def pooled_evaluate_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Aggregate federated-evaluation replies: summed confusion counts, weighted loss/AUC."""
    summaries = [next(iter(r.metric_records.values())) for r in records]
    weights = [float(s[weighted_by_key]) for s in summaries]
    pooled = pool_site_summaries(summaries, weights)  # type: ignore[arg-type]
    return MetricRecord({k: float(v) for k, v in pooled.items() if np.isfinite(v)})


class FedAvg(FlowerFedAvg):
    """Weighted federated averaging over ``num_sites`` sites.

    Parameters
    ----------
    num_sites : int
        Sites in the federation; sampling waits until all of them are connected.
    fraction_train, fraction_evaluate : float
        Share of sites sampled per round for training / federated evaluation.
    """

    def __init__(self, num_sites: int, fraction_train: float = 1.0, fraction_evaluate: float = 1.0) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=num_sites,
            weighted_by_key=WEIGHT_KEY,
            evaluate_metrics_aggr_fn=pooled_evaluate_metrics,
        )
        self.num_sites = num_sites
        self.reference: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self.participation: dict[int, dict[str, Any]] = {}

    # ---- training ----------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample sites and send them the global model; remember its array layout."""
        self.reference = {k: (tuple(v.shape), np.dtype(v.numpy().dtype)) for k, v in arrays.items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._entry(server_round)["train"] = {"sampled": len(messages)}
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop bad replies (logged), then average the rest in site order."""
        good = self._screen(
            server_round, "train", replies, lambda m: check_train_reply(m, self.reference, server_round)
        )
        if not good:
            log(WARNING, "round %s: no usable training reply; the global model is unchanged", server_round)
            return None, None
        return super().aggregate_train(server_round, good)

    # ---- federated evaluation -------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._entry(server_round)["evaluate"] = {"sampled": len(messages)}
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        good = self._screen(server_round, "evaluate", replies, lambda m: check_evaluate_reply(m, EVAL_KEYS))
        return super().aggregate_evaluate(server_round, good) if good else None

    # ---- helpers ---------------------------------------------------------------------
    def _entry(self, server_round: int) -> dict[str, Any]:
        return self.participation.setdefault(server_round, {})

    def _screen(self, server_round: int, phase: str, replies: Iterable[Message], check: Any) -> list[Message]:
        good: list[Message] = []
        rejected: list[dict[str, str]] = []
        for msg in replies:
            reason = check(msg)
            if reason is None:
                good.append(msg)
            else:
                rejected.append({"site": site_label(msg), "reason": reason})
                log(WARNING, "round %s %s: rejected reply from %s: %s", server_round, phase, site_label(msg), reason)
        good.sort(key=site_order)
        entry = self._entry(server_round).setdefault(phase, {})
        entry["replied"] = len(good)
        entry["rejected"] = rejected
        entry["sites"] = [site_label(m) for m in good]
        entry["stragglers"] = [site_label(m) for m in good
                               if bool(m.content.config_records.get(SITE_KEY, {}).get("straggler", False))]
        log(INFO, "round %s %s: %s usable replies, %s rejected", server_round, phase, len(good), len(rejected))
        return good
