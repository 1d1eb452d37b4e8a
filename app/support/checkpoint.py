"""Checkpoints of a run, written after every round, and resuming from one (``resume=PATH``).

A checkpoint is one file, ``checkpoint.npz`` in the run directory, replaced atomically
(written to a temporary file, flushed, then renamed): a crash leaves the previous one
intact. It holds, with no pickles:

* the global model after the round (under ``aggregation=paillier`` its ciphertexts: the
  server never had the plaintext);
* the round number, the config it was made with, the metrics history (server test
  metrics, aggregated site metrics, per-round participation and timing);
* the strategy's own state (:meth:`strategies.fedavg.FedAvg.state_dict`: FedProx's mu,
  central DP's releases, ...), which also lets each site's DP-SGD privacy ledger be
  restored (:mod:`privacy.dpsgd`);
* the server's RNG states (Python's ``random``, which Flower samples sites with, NumPy's
  and PyTorch's).

Resuming with the same config and seed continues at the next round and ends with exactly
the metrics of a run that was never interrupted (tested).
"""

from __future__ import annotations

import json
import os
import random
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Result

FILE = "checkpoint.npz"
FORMAT = 1
#: Config keys that may differ between the interrupted and the resumed run (none changes what is trained;
#: ``site_policy`` is the sites' to change, and a site refuses what its new policy does not allow).
MAY_DIFFER = ("resume", "data_dir", "faults.crash_after_round", "checkpoint", "report", "logger", "mlflow", "audit",
              "audit_references", "simulation", "site_policy")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not belong to this config."""


class CoordinatorCrash(RuntimeError):
    """``faults.crash_after_round``: the ServerApp dies on purpose (after its checkpoint)."""


#: a sum-based learner's checkpoint: its program's latest resumable point, beside results.json
LEARNER_FILE = "learner-checkpoint.json"


def save_learner(out_dir: Path, config: dict[str, Any], progress: dict[str, Any]) -> Path:
    """Write a sum-based learner's progress (atomically: a crash leaves the previous one)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"format": FORMAT, "config": config, "progress": progress}).encode()
    return _replace(out_dir / LEARNER_FILE, lambda fh: fh.write(text))


def resumable_learner(path: str | Path, config: dict[str, Any]) -> dict[str, Any]:
    """The progress a sum-based learner's run with ``config`` resumes from (``resume=RUN_DIR`` or the file), else
    :class:`CheckpointError` saying why."""
    p = Path(path)
    p = p / LEARNER_FILE if p.is_dir() else p
    try:
        saved = json.loads(p.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"resume={path}: no readable {LEARNER_FILE} ({type(err).__name__})") from None
    diffs = config_differences({**ADDED_KEYS, **saved.get("config", {})}, config)
    if diffs:
        raise CheckpointError(f"resume={path}: the checkpoint was made with another config; resume with the same "
                              f"overrides (only {', '.join(MAY_DIFFER)} may differ). Differences: {'; '.join(diffs)}")
    return dict(saved["progress"])


@dataclass
class Checkpoint:
    """Everything a run needs to go on after ``round``."""

    round: int
    arrays: ArrayRecord
    trained: bool                      # whether any round so far produced a model
    config: dict[str, Any]
    result: dict[str, dict[int, dict[str, Any]]]   # train / evaluate_clientapp / evaluate_serverapp
    recorder: dict[str, Any]           # server metrics and seconds per round
    strategy: dict[str, Any]           # strategy.state_dict()
    rng: dict[str, Any] = field(default_factory=dict)

    def to_result(self) -> Result:
        """The Flower ``Result`` of the rounds so far."""
        def recs(d: dict[int, dict[str, Any]]) -> dict[int, MetricRecord]:
            return {r: MetricRecord(m) for r, m in d.items()}
        return Result(arrays=self.arrays if self.trained else ArrayRecord(),
                      train_metrics_clientapp=recs(self.result["train"]),
                      evaluate_metrics_clientapp=recs(self.result["evaluate_clientapp"]),
                      evaluate_metrics_serverapp=recs(self.result["evaluate_serverapp"]))


def rng_state() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The server's RNG states: JSON part and array part."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    meta = {"python": [version, list(mt), gauss], "numpy": [name, int(pos), int(has_gauss), float(cached)]}
    return meta, {"rng/numpy_keys": np.asarray(keys), "rng/torch": torch.get_rng_state().numpy()}


def set_rng_state(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Restore Python's, NumPy's and torch's random states from a checkpoint."""
    version, mt, gauss = meta["python"]
    random.setstate((version, tuple(mt), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, arrays["rng/numpy_keys"], pos, has_gauss, cached))
    torch.set_rng_state(torch.from_numpy(arrays["rng/torch"].copy()))


def _metrics(d: dict[int, MetricRecord]) -> dict[str, dict[str, Any]]:
    return {str(r): dict(m) for r, m in d.items()}


def save(out_dir: Path, server_round: int, arrays: ArrayRecord, result: Result, config: dict[str, Any],
         recorder: dict[str, Any], strategy: dict[str, Any]) -> Path:
    """Write ``out_dir/checkpoint.npz`` atomically; return its path."""
    meta_rng, rng_arrays = rng_state()
    meta = {
        "format": FORMAT, "round": server_round, "trained": len(result.arrays) > 0, "config": config,
        "result": {"train": _metrics(result.train_metrics_clientapp),
                   "evaluate_clientapp": _metrics(result.evaluate_metrics_clientapp),
                   "evaluate_serverapp": _metrics(result.evaluate_metrics_serverapp)},
        "recorder": recorder, "strategy": strategy, "rng": meta_rng, "model_keys": list(arrays.keys()),
    }
    payload = {f"model/{i}": arrays[k].numpy() for i, k in enumerate(arrays.keys())}
    payload.update(rng_arrays)
    payload["meta"] = np.frombuffer(json.dumps(meta, default=_jsonable).encode(), dtype=np.uint8)
    return _replace(out_dir / FILE, lambda fh: np.savez(fh, **payload))  # type: ignore[arg-type]


def _replace(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` through a temporary file, flushed to disk, then renamed: a crash leaves the old file whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def locate(path: str | Path) -> Path:
    """The checkpoint file ``resume=PATH`` names: the file itself or a run directory holding one."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / FILE
    if not p.is_file():
        raise CheckpointError(f"resume={path}: no checkpoint there (expected a run directory with {FILE}, "
                              "or the file itself)")
    return p


def load(path: str | Path) -> Checkpoint:
    """Read a checkpoint; :class:`CheckpointError` naming the file if it is not one."""
    p = locate(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            arrays = {k: z[k] for k in z.files if k != "meta"}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as err:
        raise CheckpointError(f"{p}: not a readable fedsilo checkpoint ({type(err).__name__}: {err})") from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{p}: checkpoint format {meta.get('format')!r}, this fedsilo reads {FORMAT}")
    try:
        model = ArrayRecord({k: Array(arrays[f"model/{i}"]) for i, k in enumerate(meta["model_keys"])})
        set_rng = {k: v for k, v in arrays.items() if k.startswith("rng/")}

        def ints(d: dict[str, Any]) -> dict[int, Any]:
            return {int(r): v for r, v in d.items()}
        ckpt = Checkpoint(
            round=int(meta["round"]), arrays=model, trained=bool(meta["trained"]), config=meta["config"],
            result={k: ints(v) for k, v in meta["result"].items()}, recorder=meta["recorder"],
            strategy=meta["strategy"], rng={"meta": meta["rng"], "arrays": set_rng})
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{p}: incomplete checkpoint ({type(err).__name__}: {err})") from err
    return ckpt


#: Config keys added since checkpoints of this format were first written: a checkpoint without one was
#: made with its default (fedsilo 0.13's ``learner``, issue #35).
ADDED_KEYS: dict[str, Any] = {"learner": {"name": "torch", "options": {}}}


def resumable(path: str | Path, config: dict[str, Any], num_rounds: int) -> Checkpoint:
    """The checkpoint at ``path`` if a run with ``config`` can resume from it, else :class:`CheckpointError`
    saying why (another config, all rounds done, not a checkpoint)."""
    ckpt = load(path)
    diffs = config_differences({**ADDED_KEYS, **ckpt.config}, config)
    if diffs:
        raise CheckpointError(f"resume={path}: the checkpoint was made with another config; resume with the same "
                              f"overrides (only {', '.join(MAY_DIFFER)} may differ). Differences: {'; '.join(diffs)}")
    if ckpt.round >= num_rounds:
        raise CheckpointError(f"resume={path}: the run already completed all {num_rounds} rounds (checkpoint "
                              f"after round {ckpt.round}); nothing to resume")
    return ckpt


def config_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ between two config dicts (except :data:`MAY_DIFFER`)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        a, b = saved.get(key), current.get(key)
        if name in MAY_DIFFER:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{name}.")
        elif a != b:
            out.append(f"{name}: checkpoint {a!r}, now {b!r}")
    return out
