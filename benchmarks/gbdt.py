"""Issue #36's figures: federated histogram boosting (``learner=gbdt``) beside its baselines, same run.

Everything runs in this process: fedsilo through the real ServerApp and ClientApps (the in-process
runner), the baselines on the pooled rows of the same split:

1. ``task=finance``, 5 IID sites: test AUC beside centralized ``xgboost`` (``tree_method="hist"``, the
   same eta, depth, lambda, min_child_weight, max_bin and number of trees, the sites' pooled training
   rows) and scikit-learn's ``HistGradientBoostingClassifier`` (defaults, pooled); seconds and bytes
   per tree under plain aggregation and secure aggregation;
2. ``task=finance``, Dirichlet alpha=0.1 over 10 sites: the same, and Flower's ``FedXgbBagging``
   (Flower's strategy, its quickstart's client protocol written here: each site boosts one tree on the
   global model per round, the server appends them) with as many trees;
3. heart disease, 4 hospitals: beside FedAvg's logistic model (``learner=torch task.model=logreg``,
   20 rounds) and pooled xgboost; seconds and bytes per tree under plain, secagg and Paillier;
4. own tables with every default (``task=tabular``, no learner named: ``auto``, nothing tuned): heart,
   heart (5 classes), diabetes, wine (178 rows) and breast cancer (569 rows) over 3 sites, beside the
   better of a pooled logistic (linear) model and pooled xgboost with the same trees;
5. the exported model scored by ``xgboost`` against fedsilo's own scores (max abs difference).

    python benchmarks/gbdt.py                                  # about 10 minutes on 2 cores
    python benchmarks/gbdt.py --only deployment --merge        # 6. seconds per tree deployed (3 sites, TLS)

Writes ``benchmarks/results/gbdt.json`` and ``gbdt.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app import config  # noqa: E402
from app.runtime.local_grid import LocalGrid, run_inprocess  # noqa: E402
from learners.gbdt.model import Ensemble  # noqa: E402
from learners.gbdt.options import GbdtOptions  # noqa: E402
from learners.rows import table_rows  # noqa: E402
from tasks.tabular.task import TabularTask  # noqa: E402

DATA = REPO / "tasks" / "data"
OUT = REPO / "benchmarks" / "results"
HEART = ["task=tabular", "task.schema=schemas/heart.yaml", "task.data=uci_heart_disease/sites", "partition=natural"]
OWN = {"heart": HEART,
       "heart (5 classes)": ["task=tabular", "task.schema=schemas/heart_multiclass.yaml",
                             "task.data=uci_heart_disease/sites", "partition=natural"],
       "diabetes": ["task=tabular", "task.schema=schemas/diabetes.yaml", "task.data=diabetes/diabetes.csv", "num_sites=3"],
       "wine": ["task=tabular", "task.schema=schemas/wine.yaml", "task.data=wine/wine.csv", "num_sites=3"],
       "breast cancer": ["task=tabular", "task.schema=schemas/breast_cancer.yaml", "task.data=breast_cancer/wdbc.csv",
                         "num_sites=3"]}
DEFAULTS = GbdtOptions()


def xgb_params(objective: str, classes: int = 1, o: GbdtOptions = DEFAULTS) -> dict[str, Any]:
    """XGBoost's parameters for fedsilo's options (the same hyperparameters)."""
    obj = {"binary": "binary:logistic", "multiclass": "multi:softprob", "regression": "reg:squarederror"}[objective]
    p: dict[str, Any] = {"objective": obj, "tree_method": "hist", "eta": o.eta, "max_depth": o.max_depth,
                         "lambda": o.reg_lambda, "gamma": o.gamma, "min_child_weight": o.min_child_weight,
                         "max_bin": o.max_bin, "nthread": 2, "seed": 0}
    if objective == "multiclass":
        p["num_class"] = classes
    return p


def fed(overrides: list[str], tmp: Path, name: str) -> dict[str, Any]:
    t0 = time.monotonic()
    out = run_inprocess([*overrides, "learner.name=gbdt", "report=false"], tmp / name)
    learner = out["learner"]
    trees = max(learner["rounds"], 1)
    traffic = out["traffic"]
    return {"test": learner["test"], "best_round": learner["best_round"], "rounds": learner["rounds"],
            "seconds": time.monotonic() - t0, "seconds_per_tree": learner["seconds_per_round"],
            "bytes_per_tree": (traffic["bytes_to_sites"] + traffic["bytes_from_sites"]) / trees,
            "bytes_from_sites_per_tree": traffic["bytes_from_sites"] / trees, "folder": str(tmp / name)}


def finance_pool(overrides: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[Any]]:
    from tasks.finance import FinanceTask

    cfg = config.compose(overrides)
    task = FinanceTask(cfg.task, DATA)
    sites = task.sites(cfg.partition, config.num_sites(cfg), cfg.seed)
    x = np.vstack([s.train.x.numpy() for s in sites]).astype(np.float64)
    y = np.concatenate([s.train.y.numpy() for s in sites]).astype(np.float64)
    test = task.data().test
    return x, y, test.x.numpy().astype(np.float64), test.y.numpy().astype(np.float64), sites


def pooled_xgb(x: np.ndarray, y: np.ndarray, xt: np.ndarray, trees: int, objective: str = "binary",
               classes: int = 1) -> np.ndarray:
    import xgboost as xgb

    booster = xgb.train(xgb_params(objective, classes), xgb.DMatrix(x, label=y, missing=np.nan), num_boost_round=trees)
    return booster.predict(xgb.DMatrix(xt, missing=np.nan))


def auc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def finance_iid(tmp: Path) -> dict[str, Any]:
    from sklearn.ensemble import HistGradientBoostingClassifier

    base = ["task=finance", "num_sites=5", "partition=iid"]
    plain = fed(base, tmp, "fin-plain")
    secagg = fed([*base, "aggregation=secagg"], tmp, "fin-secagg")
    x, y, xt, yt, _ = finance_pool(base)
    hgb = HistGradientBoostingClassifier(random_state=0).fit(x, y)
    return {"fedsilo_plain": plain, "fedsilo_secagg": secagg,
            "xgboost_pooled_auc": auc(yt, pooled_xgb(x, y, xt, plain["best_round"])),
            "histgb_pooled_auc": auc(yt, hgb.predict_proba(xt)[:, 1]), "trees": plain["best_round"]}


def fedxgb_bagging(sites: list[Any], xt: np.ndarray, yt: np.ndarray, rounds: int) -> float:
    """Flower's FedXgbBagging on the same sites: each round every site boosts one tree on the global model
    (Flower's xgboost quickstart protocol), the strategy appends the sites' trees."""
    import xgboost as xgb
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp.strategy import FedXgbBagging

    params = xgb_params("binary")
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        site = sites[int(context.node_config["partition-id"])]
        dtrain = xgb.DMatrix(site.train.x.numpy(), label=site.train.y.numpy())
        if int(msg.content["config"]["server-round"]) == 1:
            bst = xgb.train(params, dtrain, num_boost_round=1)
        else:
            bst = xgb.Booster(params=params)
            bst.load_model(bytearray(msg.content["arrays"]["0"].numpy().tobytes()))
            bst.update(dtrain, bst.num_boosted_rounds())
            bst = bst[bst.num_boosted_rounds() - 1: bst.num_boosted_rounds()]
        model = np.frombuffer(bst.save_raw("json"), dtype=np.uint8)
        return Message(RecordDict({"arrays": ArrayRecord([model]),
                                   "metrics": MetricRecord({"num-examples": len(site.train)})}), reply_to=msg)

    grid = LocalGrid(client, len(sites), {})
    strategy = FedXgbBagging(fraction_evaluate=0.0, min_train_nodes=len(sites), min_available_nodes=len(sites))
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord([np.frombuffer(b"", dtype=np.uint8)]),
                            num_rounds=rounds, train_config=ConfigRecord())
    bst = xgb.Booster(params=params)
    bst.load_model(bytearray(result.arrays["0"].numpy().tobytes()))
    return auc(yt, bst.predict(xgb.DMatrix(xt)))


def finance_dirichlet(tmp: Path) -> dict[str, Any]:
    base = ["task=finance", "num_sites=10", "partition=dirichlet", "partition.alpha=0.1"]
    plain = fed(base, tmp, "fin-dirichlet")
    x, y, xt, yt, sites = finance_pool(base)
    trees = plain["best_round"]
    rounds = max(1, math.ceil(trees / len(sites)))
    return {"fedsilo_plain": plain, "xgboost_pooled_auc": auc(yt, pooled_xgb(x, y, xt, trees)), "trees": trees,
            "flower_fedxgbbagging_auc": fedxgb_bagging(sites, xt, yt, rounds), "flower_rounds": rounds,
            "flower_trees": rounds * len(sites), "site_rows": [len(s.train) for s in sites],
            "site_positive_share": [float(s.train.y.numpy().mean()) for s in sites]}


def tabular_pool(overrides: list[str], vocab: dict[str, list[str]]) -> tuple[Any, ...]:
    cfg = config.compose([*overrides, f"data_dir={DATA}"])
    task = TabularTask(cfg.task, DATA)
    sites = task.raw_sites(cfg.partition, config.num_sites(cfg), cfg.seed)
    tr = [table_rows(task.schema, t, vocab) for s in sites for t in s.fit_rows]
    te = [table_rows(task.schema, s.test, vocab) for s in sites]
    return (np.vstack([r.x for r in tr]), np.concatenate([r.y for r in tr]), np.vstack([r.x for r in te]),
            np.concatenate([r.y for r in te]), task)


def linear_baseline(kind: str, x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray) -> float:
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.metrics import accuracy_score, r2_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    means = np.nanmean(x, axis=0)
    xi, xti = np.where(np.isnan(x), means, x), np.where(np.isnan(xt), means, xt)
    if kind == "regression":
        return float(r2_score(yt, LinearRegression().fit(xi, y).predict(xti)))
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(xi, y)
    if kind == "binary":
        return auc(yt, model.predict_proba(xti)[:, 1])
    return float(accuracy_score(yt, model.predict(xti)))


def score(kind: str, yt: np.ndarray, pred: np.ndarray) -> float:
    from sklearn.metrics import accuracy_score, r2_score

    if kind == "binary":
        return auc(yt, pred)
    if kind == "multiclass":
        return float(accuracy_score(yt, pred.argmax(axis=1)))
    return float(r2_score(yt, pred))


METRIC = {"binary": "auc", "multiclass": "accuracy", "regression": "r2"}


def own_tables(tmp: Path) -> dict[str, Any]:
    """Every table with the defaults only: ``fedsilo task=tabular task.schema=... task.data=...`` (no learner
    named: task=tabular's default, ``auto``)."""
    out = {}
    for name, overrides in OWN.items():
        slug = name.replace(" ", "-").replace("(", "").replace(")", "")
        t0 = time.monotonic()
        got = run_inprocess([*overrides, "report=false"], tmp / f"own-{slug}")["learner"]
        seconds = time.monotonic() - t0
        kind = got["objective"]
        classes = got["parts"]["gbdt"]["classes"]
        x, y, xt, yt, _ = tabular_pool(overrides, got.get("vocab") or {})
        lin = linear_baseline(kind, x, y, xt, yt)
        xg = score(kind, yt, pooled_xgb(x, y, xt, max(got["best_round"], 1), kind, classes))
        metric = METRIC[kind]
        mine = float(got["test"][metric])
        out[name] = {"metric": metric, "fedsilo": mine, "chosen": got["chosen"], "val_loss": got["val_loss"],
                     "fedsilo_glm": got["parts"]["glm"]["test"][metric], "fedsilo_gbdt": got["parts"]["gbdt"]["test"][metric],
                     "pooled_linear": lin, "pooled_xgboost": xg, "gap_to_better": max(lin, xg) - mine,
                     "best_round": got["best_round"], "rows": len(y) + len(yt), "seconds": seconds}
    return out


def heart_options(tmp: Path) -> dict[str, Any]:
    from aggregation.paillier import keys

    private, public = keys.generate(tmp / "keys")
    short = ["+learner.options.trees=10", "+learner.options.early_stopping=0"]
    runs = {"plain": fed([*HEART, *short], tmp, "heart-plain"),
            "secagg": fed([*HEART, *short, "aggregation=secagg"], tmp, "heart-secagg")}
    runs["paillier"] = fed_paillier([*HEART, *short, "aggregation=paillier", f"aggregation.public_key={public}"],
                                    tmp / "heart-paillier", private)
    full = fed(HEART, tmp, "heart-default")
    logreg = run_inprocess([*HEART, "learner.name=torch", "task.model=logreg", "task.batch_size=32", "num_rounds=20",
                            "report=false"],
                           tmp / "heart-fedavg")
    x, y, xt, yt, _ = tabular_pool(HEART, {})
    return {"options": {k: {"seconds_per_tree": v["seconds_per_tree"], "bytes_per_tree": v["bytes_per_tree"],
                            "test_auc": v["test"]["auc"]} for k, v in runs.items()},
            "same_trees_all_options": len({(Path(v["folder"]) / "model.json").read_text() for v in runs.values()}) == 1,
            "fedsilo_auc": full["test"]["auc"], "best_round": full["best_round"],
            "fedavg_logreg_auc": logreg["final"]["auc"],
            "xgboost_pooled_auc": auc(yt, pooled_xgb(x, y, xt, full["best_round"])),
            "export": export_check(Path(full["folder"]), xt)}


def fed_paillier(overrides: list[str], out: Path, private: Path) -> dict[str, Any]:
    """A Paillier run (the sites hold the key pair; the in-process grid gives it to them)."""
    import shlex

    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from app import client_app, server_app

    overrides = [*overrides, "learner.name=gbdt", "report=false"]
    run_config = {"overrides": shlex.join([*overrides, f"data_dir={DATA}"]), "output-dir": str(out)}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    grid = LocalGrid(client_app.app, 4, run_config, node_config={"paillier-keypair": str(private)})
    t0 = time.monotonic()
    server_app.app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    res = json.loads((out / "results.json").read_text())
    learner, traffic = res["learner"], res["traffic"]
    trees = max(learner["rounds"], 1)
    return {"test": learner["test"], "best_round": learner["best_round"], "rounds": learner["rounds"],
            "seconds": time.monotonic() - t0, "seconds_per_tree": learner["seconds_per_round"],
            "bytes_per_tree": (traffic["bytes_to_sites"] + traffic["bytes_from_sites"]) / trees, "folder": str(out)}


def export_check(folder: Path, xt: np.ndarray) -> dict[str, Any]:
    import xgboost as xgb

    ens = Ensemble.from_dict(json.loads((folder / "model.json").read_text()))
    booster = xgb.Booster(model_file=str(folder / "model.xgb.json"))
    dm = xgb.DMatrix(xt, missing=np.nan, feature_names=ens.names)
    theirs = booster.predict(dm)
    ours = ens.predict(xt)
    contribs = booster.predict(dm, pred_contribs=True)
    return {"rows": int(xt.shape[0]), "max_abs_difference": float(np.max(np.abs(theirs - ours))),
            "treeshap_sums_to_margin": float(np.max(np.abs(contribs.sum(axis=1) - booster.predict(dm, output_margin=True))))}


def deployment(tmp: Path) -> dict[str, Any]:
    """``fedsilo deploy local --sites 3`` (SuperLink, SuperNodes, TLS, authenticated nodes) of the heart tables,
    ``learner=gbdt`` with 20 trees, plain and secagg: seconds per tree beside the same config in process."""
    from app.runtime import deploy

    args = [*HEART, "learner.name=gbdt", "+learner.options.trees=20", "+learner.options.early_stopping=0"]
    out: dict[str, Any] = {}
    for agg in ("plain", "secagg"):
        run_args = [*args, f"aggregation={agg}"]
        t0 = time.monotonic()
        outcome, results = deploy.run(run_args, 3, tmp / f"deploy-{agg}", stream=False)
        if not outcome.ok or results is None:
            raise RuntimeError(f"the {agg} deployment failed: {outcome}")
        sim = fed([*run_args, "num_sites=3", "partition.natural_sites=3"], tmp, f"deploy-sim-{agg}")
        out[agg] = {"deployed_seconds_per_tree": results["learner"]["seconds_per_round"],
                    "in_process_seconds_per_tree": sim["seconds_per_tree"], "deployment_seconds": time.monotonic() - t0,
                    "same_test_auc": results["learner"]["test"]["auc"] == sim["test"]["auc"]}
    return out


def _joined(bank: Any, plat: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The common customers' columns (the bank's, then the platform's), the bank's alone, and the labels."""
    at = {i: k for k, i in enumerate(plat.ids)}
    rows = [(k, at[i]) for k, i in enumerate(bank.ids) if i in at]
    xa, xb = bank.x[[r[0] for r in rows]], plat.x[[r[1] for r in rows]]
    return np.column_stack([xa, xb]), xa, bank.y[[r[0] for r in rows]]


def vertical(tmp: Path) -> dict[str, Any]:
    """7. ``vertical=secureboost`` on the bank/platform split beside xgboost on the joined columns and on the bank's."""
    import xgboost as xgb
    from sklearn.metrics import roc_auc_score

    from vertical.config import BoostConfig
    from vertical.data import load_party

    b, trees = BoostConfig(), 20
    schemas = DATA / "schemas"
    bank = load_party("bank", "active", DATA / "credit_vertical/bank.csv", schemas / "credit_vertical_bank.yaml")
    plat = load_party("platform", "passive", DATA / "credit_vertical/platform.csv", schemas / "credit_vertical_platform.yaml")
    bank_t = load_party("bank", "active", DATA / "credit_vertical/bank_test.csv", schemas / "credit_vertical_bank.yaml",
                        bank.prep)
    plat_t = load_party("platform", "passive", DATA / "credit_vertical/platform_test.csv",
                        schemas / "credit_vertical_platform.yaml", plat.prep)
    x, xa, y = _joined(bank, plat)
    xt, xat, yt = _joined(bank_t, plat_t)
    params = {"objective": "binary:logistic", "tree_method": "hist", "eta": b.eta, "max_depth": b.max_depth,
              "lambda": b.reg_lambda, "gamma": b.gamma, "min_child_weight": b.min_child_weight, "max_bin": b.max_bin,
              "nthread": 2, "seed": 0}

    def xgb_auc(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray) -> float:
        booster = xgb.train(params, xgb.DMatrix(xtr, label=ytr), num_boost_round=trees)
        return float(roc_auc_score(yt, booster.predict(xgb.DMatrix(xte))))

    out: dict[str, Any] = {"trees": trees, "common_customers": int(len(y)), "test_customers": int(len(yt)),
                           "xgboost_joined_auc": xgb_auc(x, y, xt), "xgboost_bank_only_auc": xgb_auc(xa, y, xat),
                           "xgboost_bank_all_rows_auc": None, "runs": {}}
    ya = bank.y
    booster = xgb.train(params, xgb.DMatrix(bank.x, label=ya), num_boost_round=trees)  # the bank alone, every row it has
    out["xgboost_bank_all_rows_auc"] = float(roc_auc_score(bank_t.y, booster.predict(xgb.DMatrix(bank_t.x))))
    runs = {"defaults (min_bin_rows=20)": ["vertical.boost.obfuscators=djn"],
            "min_bin_rows=0": ["vertical.boost.min_bin_rows=0", "vertical.boost.obfuscators=djn"],
            "active_trees=5": ["vertical.boost.active_trees=5", "vertical.boost.obfuscators=djn"],
            "defaults, obfuscators=full (3 trees, for time)": ["vertical.epochs=3"]}
    for name, extra in runs.items():
        t0 = time.monotonic()
        res = run_inprocess(["vertical=secureboost", f"vertical.epochs={trees}", "report=false", *extra],
                            tmp / f"vertical-{len(out['runs'])}")
        v = res["vertical"]
        n = len(v["epochs"])
        total = sum(sum(e["bytes"].values()) for e in v["epochs"])
        out["runs"][name] = {"auc": v["final"]["auc"], "trees": n, "seconds": time.monotonic() - t0,
                             "seconds_per_tree": sum(e["seconds"] for e in v["epochs"]) / n,
                             "bytes_per_tree": total / n, "phase_seconds": v["seconds"], "psi_seconds": v["psi_seconds"]}
    return out


def vertical_fate(tmp: Path, rows: int = 100_000, guest: int = 30, host: int = 300) -> dict[str, Any]:
    """8. SecureBoost seconds per tree at FATE 2.0's benchmark shape: 100k rows, 30 bank + 300 partner columns
    (synthetic values: time does not depend on them), one tree of depth 3, both obfuscator kinds."""
    import os

    rng = np.random.default_rng(0)
    folder = tmp / "fate-shape"
    folder.mkdir()
    ids = np.arange(rows)
    xa = rng.normal(size=(rows, guest))
    xb = rng.normal(size=(rows, host))
    y = (xa[:, 0] + xb[:, 0] + rng.normal(size=rows) > 0).astype(int)

    def write(name: str, cols: list[str], data: np.ndarray, label: np.ndarray | None) -> None:
        import pandas as pd

        frame = pd.DataFrame(data, columns=cols)
        frame.insert(0, "id", ids)
        if label is not None:
            frame.insert(1, "y", label)
        frame.to_parquet(folder / f"{name}.parquet", index=False)
        feats = "".join(f"  - {{name: {c}, type: numeric}}\n" for c in cols)
        (folder / f"{name}.yaml").write_text("format: fedsilo-schema-v1\nlabel: {column: y, kind: binary, positive: [1], "
                                             "negative: [0]}\nid: id\nmissing: error\nstandardize: all\n"
                                             f"features:\n{feats}")

    write("guest", [f"g{k}" for k in range(guest)], xa, y)
    write("host", [f"h{k}" for k in range(host)], xb, None)
    out: dict[str, Any] = {"rows": rows, "guest_features": guest, "host_features": host, "cores": os.cpu_count(),
                           "fate_seconds_per_tree": 131.0, "fate_cores": 32}
    for obf in ("djn", "full"):
        res = run_inprocess(["vertical=secureboost", "vertical.epochs=1", "report=false", f"vertical.boost.obfuscators={obf}",
                             "vertical.parties.0.name=guest", f"vertical.parties.0.data={folder / 'guest.parquet'}",
                             "vertical.parties.0.test=null", f"vertical.parties.0.schema={folder / 'guest.yaml'}",
                             "vertical.parties.1.name=host", f"vertical.parties.1.data={folder / 'host.parquet'}",
                             "vertical.parties.1.test=null", f"vertical.parties.1.schema={folder / 'host.yaml'}"],
                            tmp / f"fate-{obf}")
        v = res["vertical"]
        secs = v["epochs"][0]["seconds"]
        out[obf] = {"seconds_per_tree": secs, "core_seconds_per_tree": secs * (os.cpu_count() or 1),
                    "fate_core_seconds_over_ours": 131.0 * 32 / (secs * (os.cpu_count() or 1)),
                    "phase_seconds": v["seconds"], "bytes_per_tree": sum(v["epochs"][0]["bytes"].values()),
                    "psi_seconds": v["psi_seconds"]}
    return out


def markdown(r: dict[str, Any]) -> str:
    lines = ["# learner=gbdt (issue #36)", "", f"`python benchmarks/gbdt.py` on {r['machine']}; every baseline from the "
             "same run, on the pooled rows of the same split.", ""]
    if "finance_iid" in r:
        f = r["finance_iid"]
        p, s = f["fedsilo_plain"], f["fedsilo_secagg"]
        lines += ["## Finance, 5 IID sites", "", "| model | test AUC | vs centralized xgboost |", "|---|---|---|",
                  f"| fedsilo gbdt, plain ({p['best_round']} trees) | {p['test']['auc']:.4f} | "
                  f"{p['test']['auc'] - f['xgboost_pooled_auc']:+.4f} |",
                  f"| fedsilo gbdt, secagg | {s['test']['auc']:.4f} | {s['test']['auc'] - f['xgboost_pooled_auc']:+.4f} |",
                  f"| xgboost hist, pooled, same hyperparameters and trees | {f['xgboost_pooled_auc']:.4f} | 0 |",
                  f"| HistGradientBoostingClassifier, pooled, defaults | {f['histgb_pooled_auc']:.4f} | "
                  f"{f['histgb_pooled_auc'] - f['xgboost_pooled_auc']:+.4f} |", "",
                  "| option | seconds per tree | MB per tree (both ways) | ratio to plain |", "|---|---|---|---|",
                  f"| plain | {p['seconds_per_tree']:.3f} | {p['bytes_per_tree'] / 1e6:.2f} | 1.00 |",
                  f"| secagg | {s['seconds_per_tree']:.3f} | {s['bytes_per_tree'] / 1e6:.2f} | "
                  f"{s['seconds_per_tree'] / p['seconds_per_tree']:.2f} (time), "
                  f"{s['bytes_per_tree'] / p['bytes_per_tree']:.2f} (bytes) |", ""]
    if "finance_dirichlet" in r:
        f = r["finance_dirichlet"]
        p = f["fedsilo_plain"]
        lines += ["## Finance, Dirichlet alpha=0.1 over 10 sites", "",
                  "| model | trees | test AUC | vs centralized xgboost |", "|---|---|---|---|",
                  f"| fedsilo gbdt, plain | {p['best_round']} | {p['test']['auc']:.4f} | "
                  f"{p['test']['auc'] - f['xgboost_pooled_auc']:+.4f} |",
                  f"| Flower FedXgbBagging ({f['flower_rounds']} rounds x 10 sites) | {f['flower_trees']} | "
                  f"{f['flower_fedxgbbagging_auc']:.4f} | {f['flower_fedxgbbagging_auc'] - f['xgboost_pooled_auc']:+.4f} |",
                  f"| xgboost hist, pooled | {f['trees']} | {f['xgboost_pooled_auc']:.4f} | 0 |", ""]
    if "heart" in r:
        h = r["heart"]
        lines += ["## Heart disease, 4 hospitals", "", "| model | test AUC (pooled over the hospitals' test rows) |",
                  "|---|---|", f"| fedsilo gbdt, defaults ({h['best_round']} trees) | {h['fedsilo_auc']:.4f} |",
                  f"| FedAvg logistic model (learner=torch, task.model=logreg, 20 rounds) | {h['fedavg_logreg_auc']:.4f} |",
                  f"| xgboost hist, pooled, same trees | {h['xgboost_pooled_auc']:.4f} |", "",
                  f"10 trees, depth 4, under each option (identical trees under all three: {h['same_trees_all_options']}):", "",
                  "| option | seconds per tree | kB per tree (both ways) | ratio to plain (time) |", "|---|---|---|---|"]
        base = h["options"]["plain"]["seconds_per_tree"]
        for k, v in h["options"].items():
            lines.append(f"| {k} | {v['seconds_per_tree']:.3f} | {v['bytes_per_tree'] / 1e3:.0f} | "
                         f"{v['seconds_per_tree'] / base:.2f} |")
        e = h["export"]
        lines += ["", f"Exported model (`model.xgb.json`) scored by `xgboost.Booster` on {e['rows']} test rows: max abs "
                  f"difference from fedsilo's probabilities **{e['max_abs_difference']:.2e}**; TreeSHAP contributions sum "
                  f"to the margin within {e['treeshap_sums_to_margin']:.1e}.", ""]
    if "deployment" in r:
        lines += ["## Seconds per tree in a deployment (`fedsilo deploy local --sites 3`, TLS, heart tables, depth 4)", "",
                  "| option | deployed | in process | ratio | deployed AUC = in process |", "|---|---|---|---|---|"]
        for agg, d in r["deployment"].items():
            lines.append(f"| {agg} | {d['deployed_seconds_per_tree']:.3f} | {d['in_process_seconds_per_tree']:.3f} | "
                         f"{d['deployed_seconds_per_tree'] / d['in_process_seconds_per_tree']:.2f} | "
                         f"{d['same_test_auc']} |")
        lines.append("")
    if "vertical" in r:
        v = r["vertical"]
        j = v["xgboost_joined_auc"]
        lines += ["## Vertical SecureBoost: the bank and the payment platform (`vertical=secureboost`)", "",
                  f"{v['common_customers']} common customers, {v['test_customers']} held-out; {v['trees']} trees, depth 3, "
                  "eta 0.3, max_bin 32 for every model.", "",
                  "| model | test AUC | vs xgboost on the joined columns | seconds per tree | MB per tree |",
                  "|---|---|---|---|---|"]
        for name, run in v["runs"].items():
            lines.append(f"| fedsilo secureboost, {name} | {run['auc']:.4f} | {run['auc'] - j:+.4f} | "
                         f"{run['seconds_per_tree']:.1f} | {run['bytes_per_tree'] / 1e6:.1f} |")
        lines += [f"| xgboost hist, joined columns (centralized) | {j:.4f} | 0 | | |",
                  f"| xgboost hist, the bank's columns, common customers | {v['xgboost_bank_only_auc']:.4f} | "
                  f"{v['xgboost_bank_only_auc'] - j:+.4f} | | |",
                  f"| xgboost hist, the bank's columns, all its customers | {v['xgboost_bank_all_rows_auc']:.4f} | "
                  f"{v['xgboost_bank_all_rows_auc'] - j:+.4f} | | |", ""]
    if "vertical_fate" in r:
        f = r["vertical_fate"]
        lines += [f"## SecureBoost at FATE 2.0's benchmark shape ({f['rows']} rows, {f['guest_features']} + "
                  f"{f['host_features']} columns, synthetic values, one tree of depth 3)", "",
                  "| obfuscators | seconds per tree | cores | core-seconds per tree | FATE's core-seconds (131 s x 32) "
                  "over ours |", "|---|---|---|---|---|"]
        for obf in ("full", "djn"):
            if obf in f:
                o = f[obf]
                lines.append(f"| {obf} | {o['seconds_per_tree']:.1f} | {f['cores']} | {o['core_seconds_per_tree']:.0f} | "
                             f"{o['fate_core_seconds_over_ours']:.1f}x |")
        lines += ["", "FATE: 2 min 11 s per tree on two 16-core hosts with 1,024-bit keys (fedsilo: 2,048-bit).", ""]
    if "own" in r:
        lines += ["## Own tables, defaults only (`fedsilo task=tabular task.schema=S task.data=D`, 3 sites or the 4 "
                  "hospitals)", "", "task=tabular's default learner `auto` fits `glm` and `gbdt` and keeps the one with the "
                  "lower pooled validation loss; the baselines are fitted on the pooled training rows of the same split.",
                  "", "| table | rows | metric | fedsilo (default) | chosen | its glm | its gbdt | pooled linear | "
                  "pooled xgboost | gap to the better |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, o in r["own"].items():
            lines.append(f"| {name} | {o['rows']} | {o['metric']} | **{o['fedsilo']:.4f}** | {o['chosen']} | "
                         f"{o['fedsilo_glm']:.4f} | {o['fedsilo_gbdt']:.4f} | {o['pooled_linear']:.4f} | "
                         f"{o['pooled_xgboost']:.4f} | {o['gap_to_better']:+.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=["finance_iid", "finance_dirichlet", "heart", "own", "vertical",
                                                 "vertical_fate"])
    ap.add_argument("--merge", action="store_true", help="keep the other sections of an earlier results file")
    args = ap.parse_args()
    import os
    import platform

    path = OUT / "gbdt.json"
    results: dict[str, Any] = json.loads(path.read_text()) if args.merge and path.exists() else {}
    results["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    sections = {"finance_iid": finance_iid, "finance_dirichlet": finance_dirichlet, "heart": heart_options,
                "own": own_tables, "deployment": deployment, "vertical": vertical, "vertical_fate": vertical_fate}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            t0 = time.monotonic()
            results[name] = sections[name](Path(tmp))
            print(f"{name}: {time.monotonic() - t0:.0f} s", flush=True)
            OUT.mkdir(exist_ok=True)
            path.write_text(json.dumps(results, indent=1, default=str))
            (OUT / "gbdt.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
