"""What a run leaves behind: ``results.json``, the final model and a metrics plot.

``results.json`` layout (the interface later tools and users rely on)::

    config      the resolved config
    sites       number of sites
    initial     server-side test metrics of the initial model (round 0)
    history     one entry per round: round, seconds, server (test metrics of the new
                global model), train (aggregated site training metrics),
                federated_evaluate (pooled site validation metrics), participation, traffic
                (payload bytes and messages each way, app/support/traffic.py)
    final       the last round's server-side test metrics (auc, accuracy, loss, ...)
    final_federated_evaluate   the last round's pooled validation metrics
    timing      total and per-round seconds
    artifacts   file names of the model and plot

Undefined numbers (e.g. an AUC on one class) are written as ``null``, never invented.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import MetricRecord
from flwr.serverapp.strategy import Result

from app import config

RESULTS_FILE = "results.json"
ENCRYPTED_MODEL_FILE = "model.encrypted.pt"  # Paillier: the final aggregate's ciphertexts, for the key holders
MODEL_FILE = "model.pt"
PLOT_FILE = "metrics.png"


def clean(value: Any) -> Any:
    """JSON-safe copy: NaN/Inf -> None, records and numpy scalars -> plain Python."""
    if isinstance(value, MetricRecord):
        value = dict(value)
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write then rename, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(clean(payload), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


class Recorder:
    """Collects per-round metrics on the server and writes the run's artifacts."""

    def __init__(self, cfg: config.FedsiloConfig, num_sites: int, out_dir: Path) -> None:
        self.cfg, self.num_sites, self.out_dir = cfg, num_sites, out_dir
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.server: dict[int, dict[str, float]] = {}
        self.seconds: dict[int, float] = {}
        self.traffic: dict[int, dict[str, int]] = {}
        self.test_source = "server test set"  # where the per-round test metrics come from (the report says so)
        self._t0 = self._last = time.monotonic()

    def record_server(self, server_round: int, metrics: dict[str, float]) -> None:
        """Called by the server-side evaluation after each round (and for round 0)."""
        now = time.monotonic()
        self.server[server_round] = metrics
        if server_round > 0:
            self.seconds[server_round] = now - self._last
        self._last = now

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the recorder (JSON-serialisable)."""
        return {"server": {str(r): clean(m) for r, m in self.server.items()},
                "seconds": {str(r): s for r, s in self.seconds.items()},
                "traffic": {str(r): t for r, t in self.traffic.items()},
                "elapsed": time.monotonic() - self._t0}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's :meth:`state`: earlier rounds' metrics and time count too."""
        self.server = {int(r): {k: (float("nan") if v is None else v) for k, v in m.items()}
                       for r, m in state["server"].items()}
        self.seconds = {int(r): float(v) for r, v in state["seconds"].items()}
        self.traffic = {int(r): t for r, t in state.get("traffic", {}).items()}
        self._last = time.monotonic()
        self._t0 = self._last - float(state["elapsed"])

    def history(self, result: Result, participation: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
        """results.json's ``history``: every round's metrics, participation, timing and traffic."""
        rounds = sorted(r for r in self.server if r > 0)
        return [
            {
                "round": r,
                "seconds": self.seconds.get(r),
                "server": self.server[r],
                "train": dict(result.train_metrics_clientapp.get(r, {})),
                "federated_evaluate": dict(result.evaluate_metrics_clientapp.get(r, {})),
                "participation": participation.get(r, {}),
                "traffic": self.traffic.get(r, {}),
            }
            for r in rounds
        ]

    def write(self, result: Result, participation: dict[int, dict[str, Any]],
              model_state: dict[str, torch.Tensor], extra: dict[str, Any] | None = None,
              model_file: str | None = None) -> Path:
        """Write results.json, the final model and the plot; return the results path.

        When the server has no plaintext model (Paillier) ``model_file`` names the file of
        the encrypted aggregate, and ``final`` holds the sites' federated-evaluation metrics.
        """
        history = self.history(result, participation)
        model_file = model_file or MODEL_FILE
        torch.save(model_state, self.out_dir / model_file)
        artifacts = {"model": model_file}
        if plot_history(history, self.out_dir / PLOT_FILE, title=f"fedsilo: {self.cfg.task.name}",
                        initial=self.server.get(0)):
            artifacts["plot"] = PLOT_FILE
        payload = {
            "config": config.to_dict(self.cfg),
            "sites": self.num_sites,
            "initial": self.server.get(0, {}),
            "history": history,
            "final": (history[-1]["server"] or history[-1]["federated_evaluate"]) if history else {},
            "final_source": (self.test_source if history[-1]["server"] else "federated evaluation (sites' validation rows)")
            if history else None,
            "final_federated_evaluate": history[-1]["federated_evaluate"] if history else {},
            "test_source": self.test_source,
            "timing": {"total_seconds": time.monotonic() - self._t0,
                       "round_seconds": [h["seconds"] for h in history]},
            "artifacts": artifacts,
            **(extra or {}),
        }
        path = self.out_dir / RESULTS_FILE
        write_json_atomic(path, payload)
        return path


def plot_history(history: list[dict[str, Any]], path: Path, title: str = "",
                 initial: dict[str, float] | None = None) -> bool:
    """Plot test AUC/accuracy/loss (from round 0, the initial model, when given) and the
    sites' training and validation losses per round, as a PNG."""
    if not history:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [h["round"] for h in history]
    server = [h["server"] for h in history]
    server_rounds = rounds
    if initial:
        server, server_rounds = [initial, *server], [0, *rounds]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("auc", "-o"), ("accuracy", "-s"), ("f1", "-^")):
        axes[0].plot(server_rounds, [m.get(key) for m in server], style, label=f"test {key}")
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("score")
    axes[0].set_title("server-side test metrics")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    axes[1].plot(server_rounds, [m.get("loss") for m in server], "-o", label="test loss (server)")
    fed = [h["federated_evaluate"].get("loss") for h in history]
    if any(v is not None for v in fed):
        axes[1].plot(rounds, fed, "-s", label="validation loss (sites)")
    train = [h["train"].get("train_loss") for h in history]
    if any(v is not None for v in train):
        axes[1].plot(rounds, train, "-^", label="training loss (sites)")
    axes[1].set_xlabel("round")
    axes[1].set_ylabel("BCE loss")
    axes[1].set_title("loss")
    axes[1].legend()
    axes[1].grid(alpha=0.3)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
