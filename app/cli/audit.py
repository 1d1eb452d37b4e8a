"""``fedsilo audit RUN_DIR``: membership-inference audit of a finished run's final model.

Run by a party that holds the data (in a simulation, the bundled data; in a deployment, a
site auditing the released model against its own rows). It recomposes the run's config
from ``results.json``, rebuilds the sites' training rows (members) and the held-out test
rows (non-members), runs :mod:`privacy.audit` and writes the figures into
``results.json`` under ``audit`` (and ``audit.json``). Exit codes: 0 done, 2 unusable run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any, cast

import torch

from app.reporting.results import MODEL_FILE, RESULTS_FILE, write_json_atomic

AUDIT_FILE = "audit.json"


def audit_run(run_dir: Path, references: int = 8, seed: int = 0) -> dict[str, Any]:
    """Audit the model in ``run_dir``; returns and records the ``audit`` section."""
    import tasks
    from app import config
    from app.support.paths import resolve_data_dir
    from privacy.audit import audit
    from tasks.base import PooledTask, Split

    results_path = run_dir / RESULTS_FILE
    if not results_path.is_file():
        raise FileNotFoundError(f"{results_path} does not exist: is {run_dir} a fedsilo run directory?")
    results = json.loads(results_path.read_text())
    if results.get("artifacts", {}).get("model") != MODEL_FILE:
        raise ValueError("this run has no plaintext model (aggregation=paillier keeps it encrypted): decrypt it "
                         "at a site and audit there")
    if "overrides" not in results:
        raise ValueError(f"{results_path} does not record the run's overrides (written by fedsilo < 0.3)")
    cfg = config.compose(shlex.split(results["overrides"]))
    task_cls = tasks.get(cfg.task.name)
    if task_cls.federated_data:
        raise ValueError(f"task={cfg.task.name} keeps its rows at the sites: no process here holds the members and "
                         "the test rows an audit needs (audit the model at a site, on its own rows)")
    task = cast(PooledTask, task_cls(cfg.task, resolve_data_dir(cfg.data_dir)))
    sites = task.sites(cfg.partition, config.num_sites(cfg), cfg.seed)
    members = Split(torch.cat([s.train.x for s in sites]), torch.cat([s.train.y for s in sites]))
    model = task.build_model()
    model.load_state_dict(torch.load(run_dir / MODEL_FILE, weights_only=True))
    epochs = cfg.num_rounds * cfg.task.local_epochs

    def train_reference(split: Split, ref_seed: int) -> torch.nn.Module:
        torch.manual_seed(ref_seed)
        ref = task.build_model()
        task.train(ref, split, ref_seed, epochs=epochs)
        return ref

    per_site = max(len(s.train) for s in sites)
    section = audit(model, members, task.data().test, train_reference, references, seed, train_size=per_site)
    section.update({"seed": seed, "reference_epochs": epochs})
    results["audit"] = section
    write_json_atomic(results_path, results)
    write_json_atomic(run_dir / AUDIT_FILE, section)
    return section


def main(argv: list[str]) -> int:
    """``fedsilo audit RUN_DIR``: audit a run's model; the exit code (0 done, 2 bad input)."""
    parser = argparse.ArgumentParser(prog="fedsilo audit", description="Membership-inference audit of a run's model.")
    parser.add_argument("run_dir", type=Path, help="a fedsilo run directory (holds results.json and model.pt)")
    parser.add_argument("--references", type=int, default=8, help="reference models for offline LiRA (0 = loss "
                        "threshold only)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.references < 0:
        print("fedsilo audit: --references must be >= 0", file=sys.stderr)
        return 2
    try:
        section = audit_run(args.run_dir, args.references, args.seed)
    except (FileNotFoundError, ValueError) as err:
        print(f"fedsilo audit: {err}", file=sys.stderr)
        return 2
    for name in ("loss_threshold", "offline_lira"):
        if name in section:
            a = section[name]
            print(f"{name}: attack AUC {a['auc']:.4f}, TPR at 1% FPR {a['tpr_at_1pct_fpr']:.4f}")
    print(f"members {section['members']}, non-members {section['non_members']} -> {args.run_dir / RESULTS_FILE}")
    return 0
