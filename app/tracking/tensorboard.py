"""``logger=tensorboard``: each round's figures as TensorBoard scalars, in ``<run dir>/tensorboard``.

For users who follow runs in TensorBoard (``tensorboard --logdir outputs``): test metrics
(``test/auc``, ...), aggregated site metrics (``train/…``, ``federated_evaluate/…``), each
site's cumulative epsilon under DP-SGD (``epsilon/<site>``), replies and rejections,
seconds and payload bytes per round. Needs the ``tensorboard`` extra.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from typing_extensions import override

from app.tracking.trackers import Tracker


class TensorBoardLogger(Tracker):
    """Writes one step per round; ``close()`` flushes the event file."""

    def __init__(self, out_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = out_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.dir))

    @override
    @classmethod
    def start(cls, out_dir: Path, cfg: Any, config_dict: dict[str, Any], run_id: int) -> TensorBoardLogger:
        return cls(out_dir)

    def _scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                self.writer.add_scalar(f"{prefix}/{k}", float(v), step)

    def log_round(self, server_round: int, server: dict[str, Any], train: dict[str, Any], evaluate: dict[str, Any],
                  participation: dict[str, Any], traffic: dict[str, Any], seconds: float | None,
                  names: dict[str, str] | None = None) -> None:
        """One step of scalars; ``names`` maps reply labels to site names (per-site epsilon curves)."""
        names = names or {}
        self._scalars("test", server, server_round)
        self._scalars("train", train, server_round)
        self._scalars("federated_evaluate", evaluate, server_round)
        t = participation.get("train", {})
        self._scalars("sites", {"replied": t.get("replied", 0), "rejected": len(t.get("rejected", []))}, server_round)
        for label, rec in participation.get("privacy", {}).items():
            self.writer.add_scalar(f"epsilon/{names.get(label, label)}", float(rec["epsilon"]), server_round)
        self._scalars("traffic", traffic, server_round)
        if seconds is not None:
            self.writer.add_scalar("time/round_seconds", seconds, server_round)
        self.writer.flush()

    @override
    def close(self) -> None:
        self.writer.close()
