"""A fixed grid of seeded runs whose numbers must not change when the code is reorganised.

Each case runs the real ServerApp and ClientApp in process (:class:`LocalGrid`) and is
summarised by what a user would notice if it changed: every round's server-side test
metrics, aggregated training metrics and pooled federated-evaluation metrics, the
participation record (timings and timestamps removed), and a SHA-256 of the global model
after round 1 (under Paillier, decrypted by a key holder) and of the final model, with each
model's float64 summary (:func:`tests.numerics.model_summary`) beside its hash.

``python -m tests.regression_grid --record`` writes ``tests/data/regression_grid.json`` and the
recording machine's numerics fingerprint (:mod:`tests.numerics`) to
``tests/data/regression_grid.numerics.json``; ``tests/integration/test_regression_grid.py`` compares
a fresh run with them: bit for bit where this machine's fingerprint is the recorded one, within
:data:`tests.numerics.RTOL` elsewhere. ``python -m tests.regression_grid`` (no ``--record``) prints
the same verdict per case and the largest drift. Record only when a change of a number is intended,
in a commit of its own that says why.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests import numerics  # before torch: it pins the kernel paths as the test suite does

numerics.pin()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, Context, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "tasks" / "data"
RECORD = Path(__file__).resolve().parent / "data" / "regression_grid.json"
NUMERICS = RECORD.with_suffix(".numerics.json")

#: name -> overrides (each case is run once on finance and once on medical where it applies).
CASES: dict[str, list[str]] = {
    "plain": [],
    "secagg": ["aggregation=secagg"],
    "secagg_dropouts": ["aggregation=secagg", "faults.drop_rate=0.2"],  # one of 5 (or 4) sites
    "paillier": ["aggregation=paillier"],
    "dpsgd": ["privacy=dpsgd", "privacy.target_epsilon=4"],
    "central_dp": ["privacy=central", "privacy.noise_multiplier=0.5"],
    "fedprox_stragglers": ["strategy=fedprox", "strategy.stragglers=0.3", "strategy.mu=0.1"],
    "multikrum_attack": ["strategy.robust=multikrum", "faults.byzantine_fraction=0.25", "faults.attack=sign_flip"],
    "median_attack": ["strategy.robust=median", "faults.byzantine_fraction=0.25", "faults.attack=scale"],
    "norm_bound_secagg": ["aggregation=secagg", "strategy.norm_bound=0.5", "faults.byzantine_fraction=0.25",
                          "faults.attack=scale"],
}
TASKS: dict[str, list[str]] = {
    "finance": ["task=finance", "num_sites=5", "task.train_rows=400", "num_rounds=2"],
    "medical": ["task=medical", "num_rounds=2"],
}
#: Keys whose values are wall-clock times or timestamps: not part of a run's numbers.
VOLATILE = {"seconds", "unmask_seconds", "noticed"}


def case_ids() -> list[str]:
    return [f"{task}/{case}" for task in TASKS for case in CASES]


def overrides_of(case_id: str, public_key: Path | None = None) -> list[str]:
    task, case = case_id.split("/")
    extra = list(CASES[case])
    if case == "paillier" and public_key is not None:
        extra.append(f"aggregation.public_key={public_key}")
    return [*TASKS[task], *extra]


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name, value in arrays.items():
        value = np.ascontiguousarray(value)
        h.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _decrypt(arrays: ArrayRecord, overrides: list[str], key_pair: Path) -> dict[str, np.ndarray]:
    """What a key holder reads from an encrypted aggregate (``ct``, ``rows``, ``sites``)."""
    import tasks
    from aggregation.paillier import keys
    from aggregation.paillier.client import ModelCodecFactory, global_state
    from aggregation.paillier.config import packer_for
    from app import config

    cfg = config.compose(overrides)
    model = tasks.get(cfg.task.name)(cfg.task, DATA_DIR).build_model()
    private = keys.load_private(key_pair)
    codec = ModelCodecFactory(packer_for(cfg.aggregation, private.public_key.n.bit_length()),
                              cfg.aggregation.weight_unit)
    state = global_state(arrays, model.state_dict(), codec, private)
    return {k: v.numpy() for k, v in state.items()}


def run_case(case_id: str, out_dir: Path, key_files: tuple[Path, Path] | None = None,
             extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run one grid case in process (``extra``: overrides added to the case's, for tests that show a
    changed run is caught); return its summary (see the module docstring)."""
    from app import client_app, config, server_app
    from app.runtime.local_grid import LocalGrid

    key_pair, public_key = key_files if key_files is not None else (None, None)
    overrides = [*overrides_of(case_id, public_key), *extra]
    cfg = config.compose(overrides)
    captured: dict[str, ArrayRecord] = {}

    class CapturingGrid(LocalGrid):
        """Keeps the global model the sites receive for round 2's training (= round 1's aggregate)."""

        def _deliver(self, msg: Message) -> Message:
            content = msg.content
            if (msg.metadata.message_type.startswith("train") and "round1" not in captured
                    and "config" in content and int(content["config"].get("server-round", 0)) == 2):
                captured["round1"] = content["arrays"]
            return super()._deliver(msg)

    run_config = {"overrides": shlex.join([*overrides, f"data_dir={DATA_DIR}"]), "output-dir": str(out_dir)}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    node_config = {"paillier-keypair": str(key_pair)} if key_pair is not None else None
    grid = CapturingGrid(client_app.app, config.num_sites(cfg), run_config, node_config=node_config)
    server_app.app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    results = json.loads((out_dir / "results.json").read_text())
    round1 = captured.get("round1")
    round1_arrays: dict[str, np.ndarray] | None = None
    if round1 is not None and "ct" in round1:
        assert key_pair is not None
        round1_arrays = _decrypt(round1, overrides, key_pair)
    elif round1 is not None:
        round1_arrays = {k: v.numpy() for k, v in round1.items()}
    final_arrays = None
    if (out_dir / "model.pt").is_file():
        final_arrays = {k: v.numpy() for k, v in torch.load(out_dir / "model.pt").items()}
    return {
        "overrides": overrides_of(case_id),
        "round1_sha256": None if round1_arrays is None else arrays_sha256(round1_arrays),
        "round1_summary": None if round1_arrays is None else numerics.model_summary(round1_arrays),
        "final_model_sha256": None if final_arrays is None else arrays_sha256(final_arrays),
        "final_model_summary": None if final_arrays is None else numerics.model_summary(final_arrays),
        "initial": results["initial"],
        "final": results["final"],
        "final_federated_evaluate": results["final_federated_evaluate"],
        "rounds": [{"server": h["server"], "train": h["train"], "federated_evaluate": h["federated_evaluate"],
                    "participation": _strip(h["participation"])} for h in results["history"]],
        "privacy": _strip(results.get("privacy")),
        "status": results["status"],
    }


def normalise(summary: dict[str, Any]) -> Any:
    """The summary as JSON would store it (NaN as null, tuples as lists): what is compared."""
    from app.reporting.results import clean

    return json.loads(json.dumps(clean(summary)))


def make_keys(folder: Path) -> tuple[Path, Path]:
    from aggregation.paillier import keys

    return keys.generate(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true", help=f"write {RECORD.relative_to(REPO)}")
    parser.add_argument("--only", nargs="*", default=None, help="case ids (task/case) to run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        keys_ = make_keys(Path(tmp) / "keys")
        ids = args.only or case_ids()
        out = {cid: normalise(run_case(cid, Path(tmp) / cid.replace("/", "-"), keys_)) for cid in ids}
    here = numerics.fingerprint()
    if args.record:
        if args.only and NUMERICS.is_file() and not numerics.same_numerics(here, json.loads(NUMERICS.read_text())):
            print("refused: the other cases were recorded on other numerics; record them all (no --only)")
            return 1
        RECORD.parent.mkdir(parents=True, exist_ok=True)
        recorded = json.loads(RECORD.read_text()) if RECORD.is_file() and args.only else {}
        recorded.update(out)
        RECORD.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        NUMERICS.write_text(json.dumps(here, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(out)} cases in {RECORD} and this machine's numerics in {NUMERICS}")
        return 0
    recorded = json.loads(RECORD.read_text())
    exact = numerics.same_numerics(here, json.loads(NUMERICS.read_text()))
    print(f"numerics {'match' if exact else 'differ from'} the recording machine's: comparing "
          + ("bit for bit" if exact else f"within rtol {numerics.RTOL:g}, atol {numerics.ATOL:g}"))
    bad = 0
    for cid in out:
        diffs = numerics.compare(out[cid], recorded.get(cid), exact)
        drift = numerics.largest_drift(out[cid], recorded.get(cid))
        print(f"{cid}: {'differs' if diffs else 'same'}; largest relative drift {drift:.2e}"
              + "".join(f"\n    {d}" for d in diffs[:5]))
        bad += bool(diffs)
    print(f"{len(out) - bad} of {len(out)} cases the same")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
