"""Issue #17's figures: vertical learning for a bank and a payment platform.

Everything runs in this one process, the vertical runs through the real ServerApp and ClientApps
(the in-process runner: the same messages as the simulation engine), the centralized baselines
beside them on the same common customers and the same 6,000 held-out customers:

1. AUC of the bank alone (its own 11 columns, centralized logistic regression, all its rows),
   of a centralized logistic regression on the joined columns, of hetero LR (Paillier);
2. AUC of a centralized MLP of the split network's shape (same initial weights, batches and
   optimizer) and of the split NN, unprotected and with noise on what crosses;
3. seconds per PSI and per hetero-LR epoch with the breakdown (encryption, homomorphic
   operations, decryption, messages), and bytes per epoch between each pair.

    python benchmarks/vertical.py            # about 8 minutes on 2 cores

Writes ``benchmarks/results/vertical.json`` and ``vertical.md``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app import config  # noqa: E402
from app.runtime.local_grid import run_inprocess  # noqa: E402
from vertical import split_nn  # noqa: E402
from vertical.data import load_party  # noqa: E402
from vertical.hetero_lr import batch_rows  # noqa: E402
from vertical.party import PartyEnv  # noqa: E402

DATA = REPO / "tasks" / "data"
OUT = REPO / "benchmarks" / "results"
LR_EPOCHS, NN_EPOCHS = 10, 5


def tables():
    s = DATA / "schemas"
    bank = load_party("bank", "active", DATA / "credit_vertical/bank.csv", s / "credit_vertical_bank.yaml")
    plat = load_party("platform", "passive", DATA / "credit_vertical/platform.csv", s / "credit_vertical_platform.yaml")
    bt = load_party("bank", "active", DATA / "credit_vertical/bank_test.csv", s / "credit_vertical_bank.yaml", bank.prep)
    pt = load_party("platform", "passive", DATA / "credit_vertical/platform_test.csv", s / "credit_vertical_platform.yaml",
                    plat.prep)
    return bank, plat, bt, pt


def aligned(bank, plat, bt, pt, seed: int = 0):
    """The protocol's aligned order (hash of seed and id) of the common customers, and the test rows."""
    common = sorted(set(bank.ids) & set(plat.ids), key=lambda i: hashlib.sha256(f"{seed}|{i}".encode()).digest())
    bi, pi = {k: i for i, k in enumerate(bank.ids)}, {k: i for i, k in enumerate(plat.ids)}
    ti = {k: i for i, k in enumerate(pt.ids)}
    return (bank.x[[bi[c] for c in common]], plat.x[[pi[c] for c in common]], bank.y[[bi[c] for c in common]],
            bt.x, pt.x[[ti[k] for k in bt.ids]], bt.y)


def centralized_mlp(xa, xb, y, xat, xbt, yt, cfg) -> float:
    """The split network as one model: the parties' bottom models and the top model, trained centrally
    with the split run's initial weights, batches and optimizer."""
    envs = [PartyEnv("bank", "active", "", "", None, None, "", "", 0, cfg),
            PartyEnv("platform", "passive", "", "", None, None, "", "", 0, cfg)]
    a, b = split_nn.build(envs[0], xa.shape[1], 2), split_nn.build(envs[1], xb.shape[1], 2)
    opt_a, opt_b = split_nn.optimizer(envs[0], a), split_nn.optimizer(envs[1], b)
    ta, tb, ty = (torch.from_numpy(v.astype(np.float32)) for v in (xa, xb, y))
    for epoch in range(1, cfg.epochs + 1):
        for batch in range(-(-len(y) // cfg.batch_size)):
            idx = torch.from_numpy(batch_rows(envs[0], len(y), epoch, batch))
            opt_a.zero_grad(), opt_b.zero_grad()
            logits = a["top"](torch.cat([a["bottom"](ta[idx]), b["bottom"](tb[idx])], 1)).squeeze(1)
            torch.nn.functional.binary_cross_entropy_with_logits(logits, ty[idx]).backward()
            opt_a.step(), opt_b.step()
    with torch.no_grad():
        p = a["top"](torch.cat([a["bottom"](torch.from_numpy(xat.astype(np.float32))),
                                b["bottom"](torch.from_numpy(xbt.astype(np.float32)))], 1)).squeeze(1)
    return float(roc_auc_score(yt, p.numpy()))


def main() -> int:
    torch.set_num_threads(1)
    bank, plat, bt, pt = tables()
    xa, xb, y, xat, xbt, yt = aligned(bank, plat, bt, pt)
    out: dict = {"common_customers": len(y), "test_customers": len(yt), "bank_rows": len(bank), "platform_rows": len(plat)}
    lr = dict(max_iter=5000)
    out["auc_bank_alone_lr"] = float(roc_auc_score(yt, LogisticRegression(**lr).fit(bank.x, bank.y).predict_proba(bt.x)[:, 1]))
    joined = LogisticRegression(**lr).fit(np.hstack([xa, xb]), y)
    out["auc_centralized_lr_joined"] = float(roc_auc_score(yt, joined.predict_proba(np.hstack([xat, xbt]))[:, 1]))
    print(f"bank alone (LR): {out['auc_bank_alone_lr']:.4f}; centralized LR, joined columns: "
          f"{out['auc_centralized_lr_joined']:.4f}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="fedsilo-vertical-bench-"))
    t0 = time.perf_counter()
    res = run_inprocess(["vertical=hetero_lr", f"vertical.epochs={LR_EPOCHS}"], tmp / "lr")
    wall = time.perf_counter() - t0
    v = res["vertical"]
    sec, comp = v["seconds"], v["party_compute_seconds"]
    epochs = v["epochs"]
    per_epoch = float(np.mean([e["seconds"] for e in epochs]))
    # the in-process runner serves the parties one after the other: an epoch's wall time is the sum
    # of the parties' compute (each party's own time, from its replies) and the messages around it
    work = {k: comp.get(k, 0.0) / LR_EPOCHS for k in ("encrypt", "gradient", "decrypt", "update")}
    breakdown = {
        "encryption (packed rows, each party under its own key)": work["encrypt"],
        "homomorphic operations (inner products, masks)": work["gradient"],
        "decryption (masked gradients)": work["decrypt"],
        "weight updates": work["update"],
        "messages, serialisation and coordinator": per_epoch - sum(work.values()),
    }
    out["hetero_lr"] = {"auc": res["final"]["auc"], "auc_per_epoch": [e["auc"] for e in epochs],
                        "seconds_per_epoch": per_epoch, "breakdown_seconds_per_epoch": breakdown,
                        "workers_per_party": config.compose(["vertical=hetero_lr"]).vertical.workers or "all cores",
                        "psi_seconds": {"train (22,200 x 22,200 ids)": sec["psi_train"],
                                        "test (6,000 x 6,000 ids)": sec["psi_test"]},
                        "bytes_per_epoch": dict(epochs[-1]["bytes"].items()),
                        "run_seconds": wall}
    out["hetero_lr"]["gap_to_centralized_lr"] = out["auc_centralized_lr_joined"] - res["final"]["auc"]
    print(json.dumps(out["hetero_lr"], indent=1), flush=True)

    cfg = config.compose(["vertical=split_nn"]).vertical
    out["auc_centralized_mlp_same_shape"] = centralized_mlp(xa, xb, y, xat, xbt, yt, cfg)
    nn_runs = {}
    for label, extra in (("unprotected", []),
                         ("embeddings z=1", ["vertical.protection=embeddings", "vertical.noise_multiplier=1.0"]),
                         ("gradients z=1", ["vertical.protection=gradients", "vertical.noise_multiplier=1.0"]),
                         ("gradients z=4", ["vertical.protection=gradients", "vertical.noise_multiplier=4.0"]),
                         ("both z=2", ["vertical.protection=both", "vertical.noise_multiplier=2.0"])):
        r = run_inprocess(["vertical=split_nn", f"vertical.epochs={NN_EPOCHS}", *extra], tmp / label.replace(" ", "_"))
        nn_runs[label] = {"auc": r["final"]["auc"],
                          "seconds_per_epoch": float(np.mean([e["seconds"] for e in r["vertical"]["epochs"]])),
                          "privacy": r.get("privacy")}
        print(label, json.dumps(nn_runs[label]), flush=True)
    out["split_nn"] = nn_runs
    out["split_nn_gap_to_centralized_mlp"] = out["auc_centralized_mlp_same_shape"] - nn_runs["unprotected"]["auc"]
    out["gap_bank_alone_to_vertical"] = {"hetero_lr": out["hetero_lr"]["auc"] - out["auc_bank_alone_lr"],
                                         "split_nn": nn_runs["unprotected"]["auc"] - out["auc_bank_alone_lr"]}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vertical.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = ["# Vertical learning (benchmarks/vertical.py)", "",
             f"{out['common_customers']:,} common customers (of {out['bank_rows']:,} at the bank and "
             f"{out['platform_rows']:,} at the platform), {out['test_customers']:,} held-out customers.", "",
             "| model | test AUC |", "|---|---|",
             f"| bank alone, centralized LR | {out['auc_bank_alone_lr']:.4f} |",
             f"| centralized LR, joined columns | {out['auc_centralized_lr_joined']:.4f} |",
             f"| hetero LR (Paillier), {LR_EPOCHS} epochs | {out['hetero_lr']['auc']:.4f} |",
             f"| centralized MLP, split network's shape | {out['auc_centralized_mlp_same_shape']:.4f} |",
             *(f"| split NN, {k} | {r['auc']:.4f} |" for k, r in nn_runs.items()), "",
             f"hetero LR: {per_epoch:.1f} s per epoch; " + ", ".join(f"{k} {x:.1f} s" for k, x in breakdown.items()), "",
             "PSI: " + ", ".join(f"{k} {x:.1f} s" for k, x in out["hetero_lr"]["psi_seconds"].items()), "",
             "Bytes per hetero-LR epoch: " + ", ".join(f"{k} {n:,}" for k, n in out["hetero_lr"]["bytes_per_epoch"].items()),
             ""]
    (OUT / "vertical.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
