"""Secure sums outside the training rounds: the task's statistics and test metrics, masked.

The coordinator half (:class:`SecAggSum`) runs the full protocol (keys, shares, masked
input, unmask; :meth:`~aggregation.secagg.server.SecureAggregator.secure_sum`) for one
vector per site: the site's values in fixed point (:mod:`core.fixedpoint`), as 20-bit
limbs in the 53-bit field, so that the limb sums of up to 2^33 sites never wrap. The
coordinator learns the totals only, never one site's vector; a site that drops out of a
stage is left out (its mask is removed with the survivors' shares), as in training. The
protocol instances of sums keep their own state at the sites (``channel: sum``) and number
their own rounds, so they never collide with the training rounds' replay guard.
"""

from __future__ import annotations

from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from typing_extensions import override

from aggregation.base import SumCoordinator, SumResult, request_encoding
from aggregation.secagg.client import SUM_CHANNEL
from aggregation.secagg.protocol import SecAggAbort
from aggregation.secagg.server import SecureAggregator
from core import fixedpoint

LIMB_VALUE_BITS = fixedpoint.LIMB_BITS  # the field codec's value bits: room for 2^(53 - 20) sites


class SecAggSum(SumCoordinator):
    """Masked sums: the coordinator learns only the totals."""

    learns = "only the totals (secure aggregation: each site's vector is masked)"

    def __init__(self, message_type: str, cfg: Any, timeout: float) -> None:
        super().__init__(message_type, timeout)
        self.protocol = SecureAggregator(1.0, LIMB_VALUE_BITS, cfg.threshold, cfg.stage_timeout, cfg.neighbours,
                                         channel=SUM_CHANNEL)

    @override
    def collect(self, grid: Grid, nodes: list[int], content: RecordDict, length: int, sum_id: int) -> SumResult:
        enc = request_encoding(content)
        try:
            total, survivors = self.protocol.secure_sum(grid, nodes, content, self.message_type,
                                                        length * enc.limbs_per_value, sum_id)
        except SecAggAbort as err:
            log(WARNING, "fedsilo secure sum %s aborted: %s", sum_id, err)
            rejected = [(int(r["node"]), f"{r['stage']}: {r['reason']}")
                        for r in self.protocol.log.get(sum_id, {}).get("rejected", [])]
            return SumResult(0, None, None, rejected + [(0, f"secure sum aborted: {err}")])
        rejected = [(int(r["node"]), f"{r['stage']}: {r['reason']}")
                    for r in self.protocol.log.get(sum_id, {}).get("rejected", [])]
        values = enc.decode(enc.join(np.asarray(total, dtype=np.uint64)))
        return SumResult(len(survivors), values, None, rejected, length)
