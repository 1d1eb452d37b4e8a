"""Issue #16's figures: sites' own tables, federated preprocessing, a coordinator without data.

Everything runs in this one process (the real ServerApp and ClientApps through the in-process
runner, which matches the simulation engine bit for bit), baselines beside:

1. credit default through ``task=tabular`` (CSV + schema, 5 IID sites, 10 rounds) beside
   ``task=finance``; heart disease through ``task=tabular`` (4 hospitals' CSV files, 20
   rounds, ``task=medical``'s batch size 32) beside ``task=medical``; seeds 0-2;
2. the federated statistics against the pooled ones (relative error of every mean and
   variance) under plain, secagg and paillier;
3. the pooled federated test AUC against scikit-learn's AUC on the pooled test scores;
4. heart disease as 5 classes and diabetes progression (regression) beside pooled
   scikit-learn models on the same rows and the same preprocessing;
5. the statistics phase's time against one training round's;
6. (``--deploy``) ``fedsilo deploy local --sites 3`` of the heart tables, its coordinator
   given an empty data folder, beside the simulation of the same config.

    python benchmarks/own_data.py             # about 10 minutes on 2 cores
    python benchmarks/own_data.py --deploy    # plus the deployment (about 4 minutes)

Writes ``benchmarks/results/own_data.json`` and ``own_data.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.cli import predict  # noqa: E402
from app.runtime.local_grid import run_inprocess  # noqa: E402
from tasks.tabular.prep import transformed  # noqa: E402
from tasks.tabular.task import TabularTask  # noqa: E402

DATA = REPO / "tasks" / "data"
CREDIT = ["task=tabular", "learner.name=torch", "num_rounds=10", "num_sites=5"]
HEART = ["task=tabular", "learner.name=torch",
         "task.schema=schemas/heart.yaml", "task.data=uci_heart_disease/sites", "partition=natural",
         "task.model=logreg", "task.batch_size=32", "num_rounds=20"]  # task=medical's training settings
HEART5 = ["task=tabular", "learner.name=torch", "task.schema=schemas/heart_multiclass.yaml", "task.data=uci_heart_disease/sites",
          "partition=natural", "task.model=logreg", "num_rounds=20"]
DIABETES = ["task=tabular", "learner.name=torch",
            "task.schema=schemas/diabetes.yaml", "task.data=diabetes/diabetes.csv", "num_sites=3",
            "task.model=logreg", "task.lr=0.01", "num_rounds=30"]


def run(overrides: list[str], tmp: Path, name: str) -> tuple[Path, dict[str, Any]]:
    out = tmp / name
    return out, run_inprocess(overrides, out)


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"


def sites_of(overrides: list[str], seed: int = 0) -> list[Any]:
    from app import config

    cfg = config.compose(overrides)
    task = TabularTask(cfg.task, DATA)
    n = config.num_sites(cfg)
    return [task.raw_site(cfg.partition, n, seed, k) for k in range(n)]


def accuracy_figures(tmp: Path, seeds: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, tab, base in (("credit", CREDIT, ["task=finance", "num_rounds=10", "num_sites=5"]),
                            ("heart", HEART, ["task=medical", "num_rounds=20"])):
        rows = []
        for s in seeds:
            _, t = run([*tab, f"seed={s}"], tmp, f"{name}-tab-{s}")
            _, b = run([*base, f"seed={s}"], tmp, f"{name}-base-{s}")
            rows.append({"seed": s, "tabular_auc": t["final"]["auc"], "bundled_auc": b["final"]["auc"],
                         "tabular_accuracy": t["final"]["accuracy"], "bundled_accuracy": b["final"]["accuracy"],
                         "auc_bound": t["final"]["auc_bound"]})
        out[name] = {"runs": rows,
                     "tabular_auc": mean_std([r["tabular_auc"] for r in rows]),
                     "bundled_auc": mean_std([r["bundled_auc"] for r in rows]),
                     "mean_difference": statistics.mean(r["tabular_auc"] - r["bundled_auc"] for r in rows)}
        print(f"{name}: tabular AUC {out[name]['tabular_auc']} | bundled task {out[name]['bundled_auc']} | "
              f"difference {out[name]['mean_difference']:+.4f}", flush=True)
    return out


def statistics_figures(tmp: Path, keypair: Path, public: Path) -> dict[str, Any]:
    """Relative errors of the federated means and variances against the pooled rows, per protection."""
    base = ["task=tabular", "learner.name=torch", "num_rounds=1", "num_sites=5"]
    sites = sites_of(base)
    out: dict[str, Any] = {}
    for name, extra in (("plain", []), ("secagg", ["aggregation=secagg"]),
                        ("paillier", ["aggregation=paillier", f"aggregation.public_key={public}",
                                      f"aggregation.keypair={keypair}", "task.auc_bins=1024"])):
        run_dir, res = run([*base, *extra], tmp, f"stats-{name}")
        prep = predict.predictor(run_dir, keypair if name == "paillier" else None).prep
        num, _ = prep._stats()
        mean_err, var_err = 0.0, 0.0
        for f in prep.layout.numeric:
            pooled = np.concatenate([transformed(t, f) for s in sites for t in s.fit_rows])
            mean, std = num[f.name]
            mean_err = max(mean_err, abs(mean - pooled.mean()) / max(abs(pooled.mean()), 1e-300))
            var_err = max(var_err, abs(std ** 2 - pooled.var()) / pooled.var())
        rounds = res["timing"]["round_seconds"]
        out[name] = {"max_rel_error_mean": mean_err, "max_rel_error_variance": var_err,
                     "stats_seconds": res["preprocessing"]["seconds"], "round_seconds": rounds[0],
                     "stats_over_round": res["preprocessing"]["seconds"] / rounds[0],
                     "coordinator_knows_totals": res["preprocessing"]["coordinator_knows_totals"],
                     "moments_digest": prep.digest()}
        print(f"statistics under {name}: max relative error mean {mean_err:.2e}, variance {var_err:.2e}; "
              f"phase {out[name]['stats_seconds']:.2f} s vs a training round {rounds[0]:.2f} s", flush=True)
    return out


def auc_figures(tmp: Path) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    out = {}
    for name, overrides in (("credit", CREDIT), ("heart", HEART)):
        run_dir, res = run(overrides, tmp, f"auc-{name}")
        pred = predict.predictor(run_dir)
        ys, scores = [], []
        for site in sites_of(overrides):
            ys.append(site.test.label)
            scores.append(pred.score_table(site.test)["score"])
        exact = float(roc_auc_score(np.concatenate(ys), np.concatenate(scores)))
        out[name] = {"federated_auc": res["final"]["auc"], "sklearn_pooled_auc": exact,
                     "difference": abs(res["final"]["auc"] - exact), "auc_bound": res["final"]["auc_bound"]}
        print(f"{name}: federated test AUC {res['final']['auc']:.6f}, scikit-learn on the pooled scores {exact:.6f}, "
              f"|difference| {out[name]['difference']:.2e} (bound {res['final']['auc_bound']:.2e})", flush=True)
    return out


def pooled_design(overrides: list[str], run_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The same rows and the same (federally fitted) preprocessing, pooled: for the centralized baselines."""
    prep = predict.predictor(run_dir).prep
    sites = sites_of(overrides)
    x_tr = np.concatenate([prep.transform(t) for s in sites for t in s.fit_rows])
    y_tr = np.concatenate([t.label for s in sites for t in s.fit_rows])
    x_te = np.concatenate([prep.transform(s.test) for s in sites])
    y_te = np.concatenate([s.test.label for s in sites])
    return x_tr, y_tr, x_te, y_te


def label_figures(tmp: Path) -> dict[str, Any]:
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.metrics import accuracy_score, r2_score, roc_auc_score

    run_dir, multi = run(HEART5, tmp, "heart5")
    x_tr, y_tr, x_te, y_te = pooled_design(HEART5, run_dir)
    lr = LogisticRegression(max_iter=5000).fit(x_tr, y_tr)
    proba = np.zeros((len(y_te), 5))
    proba[:, lr.classes_] = lr.predict_proba(x_te)
    present = [c for c in range(5) if 0 < (y_te == c).sum() < len(y_te)]
    pooled_auc = float(np.mean([roc_auc_score(y_te == c, proba[:, c]) for c in present]))
    heart5 = {"federated_macro_auc": multi["final"]["macro_auc"], "federated_accuracy": multi["final"]["accuracy"],
              "federated_macro_f1": multi["final"]["macro_f1"], "pooled_lr_macro_auc": pooled_auc,
              "pooled_lr_accuracy": float(accuracy_score(y_te, lr.predict(x_te)))}
    print(f"heart, 5 classes: federated macro OvR AUC {heart5['federated_macro_auc']:.4f}, accuracy "
          f"{heart5['federated_accuracy']:.4f} | pooled multinomial LR {pooled_auc:.4f}, "
          f"{heart5['pooled_lr_accuracy']:.4f}", flush=True)
    run_dir, reg = run(DIABETES, tmp, "diabetes")
    x_tr, y_tr, x_te, y_te = pooled_design(DIABETES, run_dir)
    lin = LinearRegression().fit(x_tr, y_tr)
    diabetes = {"federated_r2": reg["final"]["r2"], "federated_mae": reg["final"]["mae"],
                "pooled_linear_r2": float(r2_score(y_te, lin.predict(x_te))), "test_rows": int(len(y_te))}
    print(f"diabetes: federated R^2 {diabetes['federated_r2']:.4f} | pooled linear regression "
          f"{diabetes['pooled_linear_r2']:.4f} ({len(y_te)} test rows)", flush=True)
    return {"heart_5_classes": heart5, "diabetes": diabetes}


def image_figures(tmp: Path) -> dict[str, Any]:
    """BreastMNIST written out as PNG folders (3 sites) through task=images, beside task=medical_imaging."""
    from tasks.images import write_breastmnist_folders

    folders = tmp / "breast"
    write_breastmnist_folders(DATA, folders, sites=3)
    _, img = run(["task=images", f"task.data={folders}", "partition=natural", "task.classes=[benign,malignant]",
                  "num_rounds=10"], tmp, "images")
    _, base = run(["task=medical_imaging", "num_sites=3", "num_rounds=10"], tmp, "medical_imaging")
    out = {"images_auc": img["final"]["auc"], "images_accuracy": img["final"]["accuracy"],
           "images_test_images": img["final"]["num_examples"], "medical_imaging_auc": base["final"]["auc"],
           "medical_imaging_accuracy": base["final"]["accuracy"], "stats_seconds": img["preprocessing"]["seconds"],
           "round_seconds": statistics.mean(img["timing"]["round_seconds"])}
    print(f"images (PNG folders, 3 sites, 10 rounds): AUC {out['images_auc']:.4f} on the sites' own "
          f"{out['images_test_images']:.0f} test images | task=medical_imaging {out['medical_imaging_auc']:.4f} on "
          f"MedMNIST's test split; statistics {out['stats_seconds']:.2f} s vs a round {out['round_seconds']:.2f} s",
          flush=True)
    return out


def deploy_figures(tmp: Path) -> dict[str, Any]:
    from app.runtime import deploy

    args = ["task=tabular", "learner.name=torch",
            "learner.name=torch", "task.schema=schemas/heart.yaml", "task.data=uci_heart_disease/sites",
            "partition=natural", "task.model=logreg", "num_rounds=3"]
    t0 = time.monotonic()
    outcome, res = deploy.run(args, 3, tmp / "deploy", stream=False)
    if not outcome.ok or res is None:
        raise RuntimeError(f"deployment failed: {outcome}")
    wall = time.monotonic() - t0
    _, sim = run([*args, "num_sites=3", "partition.natural_sites=3"], tmp, "deploy-sim")
    coordinator = tmp / "deploy" / "coordinator"
    out = {"deployed_auc": res["final"]["auc"], "simulated_auc": sim["final"]["auc"],
           "difference": abs(res["final"]["auc"] - sim["final"]["auc"]), "auc_bound": res["final"]["auc_bound"],
           "coordinator_data_files": len(list(coordinator.iterdir())), "wall_seconds": wall,
           "stats_seconds": res["preprocessing"]["seconds"], "round_seconds": res["timing"]["round_seconds"]}
    print(f"deployment (3 SuperNodes, TLS, coordinator with {out['coordinator_data_files']} data files): AUC "
          f"{out['deployed_auc']:.6f} vs simulation {out['simulated_auc']:.6f}; statistics {out['stats_seconds']:.1f} s, "
          f"rounds {[round(s, 1) for s in out['round_seconds']]} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--deploy", action="store_true")
    args = parser.parse_args(argv)
    from aggregation.paillier import keys

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        keypair, public = keys.generate(tmp / "keys")
        results["accuracy"] = accuracy_figures(tmp, args.seeds)
        results["statistics"] = statistics_figures(tmp, keypair, public)
        results["test_auc"] = auc_figures(tmp)
        results["labels"] = label_figures(tmp)
        results["images"] = image_figures(tmp)
        if args.deploy:
            results["deployment"] = deploy_figures(tmp)
    (REPO / "benchmarks" / "results" / "own_data.json").write_text(json.dumps(results, indent=2) + "\n")
    (REPO / "benchmarks" / "results" / "own_data.md").write_text(markdown(results))
    print("written to benchmarks/results/own_data.json and own_data.md")
    return 0


def markdown(r: dict[str, Any]) -> str:
    lines = ["# Own data (issue #16): `python benchmarks/own_data.py --deploy`", "",
             "| figure | fedsilo (task=tabular) | baseline | |", "|---|---|---|---|"]
    for name in ("credit", "heart"):
        a = r["accuracy"][name]
        lines.append(f"| {name}: final test AUC, seeds 0-2 | {a['tabular_auc']} | bundled task {a['bundled_auc']} | "
                     f"difference {a['mean_difference']:+.4f} |")
    for name, s in r["statistics"].items():
        lines.append(f"| statistics under {name}: max relative error of means / variances | "
                     f"{s['max_rel_error_mean']:.1e} / {s['max_rel_error_variance']:.1e} | pooled rows | "
                     f"phase {s['stats_seconds']:.2f} s = {s['stats_over_round']:.2f} x a round |")
    for name, s in r["test_auc"].items():
        lines.append(f"| {name}: pooled federated test AUC | {s['federated_auc']:.6f} | scikit-learn "
                     f"{s['sklearn_pooled_auc']:.6f} | diff {s['difference']:.1e} (bound {s['auc_bound']:.1e}) |")
    h, dbt = r["labels"]["heart_5_classes"], r["labels"]["diabetes"]
    lines.append(f"| heart, 5 classes: macro OvR AUC / accuracy | {h['federated_macro_auc']:.4f} / "
                 f"{h['federated_accuracy']:.4f} | pooled multinomial LR {h['pooled_lr_macro_auc']:.4f} / "
                 f"{h['pooled_lr_accuracy']:.4f} | |")
    lines.append(f"| diabetes progression: R^2 | {dbt['federated_r2']:.4f} | pooled linear regression "
                 f"{dbt['pooled_linear_r2']:.4f} | {dbt['test_rows']} test rows |")
    i = r["images"]
    lines.append(f"| BreastMNIST as PNG folders (task=images, 3 sites, 10 rounds): AUC | {i['images_auc']:.4f} (sites' own "
                 f"{i['images_test_images']:.0f} test images) | task=medical_imaging {i['medical_imaging_auc']:.4f} "
                 f"(MedMNIST test split) | statistics {i['stats_seconds']:.2f} s vs a round {i['round_seconds']:.2f} s |")
    if "deployment" in r:
        d = r["deployment"]
        lines.append(f"| deploy local --sites 3 (heart, 3 rounds): AUC | {d['deployed_auc']:.6f} | simulation "
                     f"{d['simulated_auc']:.6f} | coordinator data files: {d['coordinator_data_files']}; statistics "
                     f"{d['stats_seconds']:.1f} s, rounds {[round(s, 1) for s in d['round_seconds']]} s |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
