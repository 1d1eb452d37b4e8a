"""DP-SGD: speed of the per-sample clipping engines, and utility and leakage against epsilon.

    python benchmarks/dp.py            # full run, writes benchmarks/results/dp.{json,md,png}
    python benchmarks/dp.py --quick    # fewer repetitions and one seed (a smoke run)

Part 1, speed (one process, interleaved repetitions, minimum per configuration, one thread):
* per optimiser step on the same pre-built batch: non-private SGD, Opacus 1.6 with
  ``grad_sample_mode`` hooks / functorch / ghost (``PrivacyEngine.make_private``, its
  ``DPOptimizer``), and fedsilo's engine (:class:`privacy.clipping.LinearClipper` or, for the
  imaging CNN, :class:`privacy.clipping.LayerClipper`, plus noise), for the finance task's MLP,
  the 5.8k-parameter MLP of the issue (batches 64/256/1024) and the imaging CNN (64/256);
* per local epoch on a real finance site (5 sites, IID): fedsilo's non-private loop
  (:func:`tasks.training.train_local`) against its DP-SGD loop (:func:`privacy.dpsgd.train_private`,
  Poisson sampling included), at the task's batch size and at 256.
Every engine's clipped gradient is checked against the per-example definition first.

Part 2, utility vs epsilon (real fedsilo runs, in-process runner = the engine bit for bit):
finance (5 sites, 10 rounds) and medical (4 hospitals, 20 rounds) at epsilon 1, 3, 8 and no
DP, seeds 0-2, each final model audited by membership inference (loss threshold and offline
LiRA with 4 reference models); plus the audit's deliberately overfit setting (5 sites x 50
rows, 400 local epochs) at the same epsilons.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "benchmarks" / "results"

EPSILONS: list[float | None] = [1.0, 3.0, 8.0, None]
UTILITY = {
    "finance": ["task=finance", "num_rounds=10"],
    "medical": ["task=medical", "num_rounds=20"],
    "finance-overfit": ["task=finance", "task.train_rows=50", "task.local_epochs=20", "num_rounds=20",
                        "task.hidden=[256,256]", "strategy.fraction_evaluate=0"],
}


# ---- part 1: speed ---------------------------------------------------------------------
def _opacus_step(model: nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = DataLoader(TensorDataset(x, y), batch_size=x.shape[0])
    engine = PrivacyEngine()
    if mode == "ghost":
        m, o, crit, _ = engine.make_private(module=model, optimizer=opt, data_loader=loader, criterion=nn.BCEWithLogitsLoss(),
                                            noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost",
                                            poisson_sampling=False)
    else:
        m, o, _ = engine.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                                      max_grad_norm=1.0, grad_sample_mode=mode, poisson_sampling=False)
        crit = nn.BCEWithLogitsLoss()

    def step() -> None:
        o.zero_grad()
        loss = crit(m(x), y)
        loss.backward()
        o.step()
    return step


def _fedsilo_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """fedsilo's production step (:class:`privacy.dpsgd.PrivateStep`): clip, noise, scale."""
    from privacy.dpsgd import DPSGDParams, PrivateStep

    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    private = PrivateStep(model, DPSGDParams(1.0, 1.0, 1.0, 1e-5, 1e9, "rdp"), x.shape[0],
                          torch.Generator().manual_seed(0))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        private.set_grads(x, y)
        opt.step()
    return step


def _plain_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.BCEWithLogitsLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    return step


def _min_time(fns: dict[str, Callable[[], None]], reps: int, inner: int) -> dict[str, float]:
    for f in fns.values():
        for _ in range(10):
            f()
    best = {k: float("inf") for k in fns}
    for _ in range(reps):
        for name, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            best[name] = min(best[name], (time.perf_counter() - t0) / inner)
    return best


def check_engines() -> dict[str, float]:
    """Largest deviation of each engine's clipped sum from the per-example definition, on the
    MLP (fedsilo = LinearClipper) and on the imaging CNN (fedsilo = LayerClipper)."""
    from privacy.clipping import make_clipper
    from tasks.models import MLP, SmallCNN

    out = {}
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    for label, build, shape in (("", lambda: MLP(23, [64, 32]), (23,)), (" (CNN)", lambda: SmallCNN(), (1, 28, 28))):
        torch.manual_seed(0)
        model = build()
        x, y = torch.randn(64, *shape) * 2, (torch.rand(64) < 0.3).float()
        params = list(model.parameters())
        ref = [torch.zeros_like(p) for p in params]
        for i in range(64):
            loss = nn.functional.binary_cross_entropy_with_logits(model(x[i:i + 1]), y[i:i + 1], reduction="sum")
            g = torch.autograd.grad(loss, params)
            c = min(1.0, 1.0 / (float(torch.sqrt(sum(t.pow(2).sum() for t in g))) + 1e-6))
            for r, t in zip(ref, g, strict=True):
                r += c * t
        for name, engine in (("fedsilo", "auto"), ("opacus-hooks", "opacus"), ("opacus-functorch", "functorch")):
            clipper = make_clipper(model, loss_fn, engine)
            grads, _, _ = clipper.clipped_sum(x, y, 1.0)
            clipper.close()
            out[name + label] = max(float((a - b).abs().max()) for a, b in zip(grads, ref, strict=True))
    return out


def speed(quick: bool) -> dict[str, Any]:
    from tasks.models import MLP, SmallCNN

    torch.set_num_threads(1)
    reps, inner = (3, 20) if quick else (7, 50)
    rows = []
    models: list[tuple[str, Callable[[], nn.Module], tuple[int, ...], tuple[int, ...]]] = [
        ("finance task MLP 28-64-32-1 (4.0k)", lambda: MLP(28, [64, 32]), (28,), (64, 256, 1024)),
        ("issue's MLP 23-64-64-1 (5.8k)", lambda: MLP(23, [64, 64]), (23,), (64, 256, 1024)),
        ("imaging CNN, 1x28x28 (SmallCNN, 105k)", lambda: SmallCNN(), (1, 28, 28), (64, 256)),
    ]
    for label, build, shape, batches in models:
        for batch in batches:
            torch.manual_seed(0)
            x, y = torch.randn(batch, *shape), (torch.rand(batch) < 0.22).float()
            fns: dict[str, Callable[[], None]] = {}
            for name in ("non-private", "opacus-hooks", "opacus-functorch", "opacus-ghost", "fedsilo"):
                torch.manual_seed(1)
                model = build()
                try:
                    if name == "non-private":
                        fns[name] = _plain_step(model, x, y)
                    elif name == "fedsilo":
                        fns[name] = _fedsilo_step(model, x, y)
                    else:
                        fns[name] = _opacus_step(model, name.split("-")[1], x, y)
                        fns[name]()
                except Exception as err:  # an Opacus mode that does not support a layer of the model
                    print(f"{label} batch {batch}: {name} unavailable ({type(err).__name__}: {err})", flush=True)
                    fns.pop(name, None)
            best = _min_time(fns, reps, inner if len(shape) == 1 else max(2, inner // 10))
            base = best["non-private"]
            rows.append({"model": label, "batch": batch, "ms": {k: v * 1e3 for k, v in best.items()},
                         "ratio": {k: v / base for k, v in best.items()}})
            print(f"{label} batch {batch}: " + ", ".join(f"{k} {v * 1e3:.2f} ms ({v / base:.2f}x)" for k, v in best.items()),
                  flush=True)
    return {"per_step": rows, "epoch": epoch_speed(quick), "correctness_max_abs_error": check_engines()}


def _bound_per_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rows: int, reps: int) -> dict[str, float]:
    """Seconds of the work DP-SGD adds to a step that no implementation can skip: one Gaussian
    draw per parameter and its addition, one uniform draw per row (Poisson sampling), and the
    per-example squared norms (||g_i||^2 (||a_i||^2 + 1) per linear layer, from the layer
    inputs and output gradients a backward pass produces anyway)."""
    params = [p for p in model.parameters()]
    size = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(0)
    noise, flat = torch.empty(size), torch.zeros(size)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    acts: list[np.ndarray] = []
    hooks = [m.register_forward_hook(lambda _m, i, o: acts.append(i[0].detach().numpy())) for m in layers]
    model(x)
    for h in hooks:
        h.remove()
    grads = [np.ones((len(a), m.out_features), dtype=np.float32) for a, m in zip(acts, layers, strict=True)]

    def noise_step() -> None:
        flat.add_(noise.normal_(generator=gen), alpha=0.01)

    def sample_step() -> None:
        torch.rand(rows, generator=gen)

    def norms_step() -> None:
        total = np.zeros(len(x), dtype=np.float32)
        for a, g in zip(acts, grads, strict=True):
            total += np.vecdot(g, g) * (np.vecdot(a, a) + 1)

    return _min_time({"noise": noise_step, "sampling": sample_step, "norms": norms_step}, reps, 200)


def epoch_speed(quick: bool) -> list[dict[str, Any]]:
    """One local epoch on finance site 0: fedsilo's non-private loop vs its DP-SGD loop, and
    the bound: the non-private epoch plus, per DP-SGD step, the work DP-SGD cannot skip."""
    import tasks
    from app import config
    from app.support.paths import resolve_data_dir
    from privacy.dpsgd import DPSGDParams, sample_rate, steps_per_epoch, train_private
    from tasks.training import LocalTrainConfig, train_local

    torch.set_num_threads(1)
    cfg = config.compose(["task=finance"])
    task = tasks.get("finance")(cfg.task, resolve_data_dir(None))
    site = task.sites(cfg.partition, 5, 0)[0]
    out = []
    reps = 5 if quick else 31
    for batch in (cfg.task.batch_size, 256):
        tc = LocalTrainConfig(epochs=1, batch_size=batch, lr=0.05, momentum=0.9)
        params = DPSGDParams(sample_rate(batch, len(site.train)), 1.0, 1.0, 1e-5, 1e9, "rdp")
        times: dict[str, list[float]] = {"non-private": [], "dpsgd": []}
        for rep in range(reps):
            for name in times:
                torch.manual_seed(0)
                model = task.build_model()
                gen = torch.Generator().manual_seed(rep)
                t0 = time.perf_counter()
                if name == "dpsgd":
                    train_private(model, site.train.x, site.train.y, tc, params, gen)
                else:
                    train_local(model, site.train.x, site.train.y, tc, gen)
                times[name].append(time.perf_counter() - t0)
        best = {k: min(v) for k, v in times.items()}
        median = {k: statistics.median(v) for k, v in times.items()}
        steps = steps_per_epoch(params.sample_rate)
        extra = _bound_per_step(task.build_model(), site.train.x[:batch], site.train.y[:batch], len(site.train),
                                3 if quick else 7)
        bound = best["non-private"] + steps * sum(extra.values())
        out.append({"rows": len(site.train), "batch": batch, "seconds": best, "median_seconds": median,
                    "ratio": best["dpsgd"] / best["non-private"],
                    "median_ratio": median["dpsgd"] / median["non-private"],
                    "bound_seconds": bound, "bound_parts_per_step": extra, "steps": steps,
                    "bound_ratio": bound / best["non-private"], "ratio_to_bound": best["dpsgd"] / bound})
        print(f"finance site 0 ({len(site.train)} rows), batch {batch}: non-private {best['non-private'] * 1e3:.1f} ms/epoch, "
              f"DP-SGD {best['dpsgd'] * 1e3:.1f} ms/epoch ({best['dpsgd'] / best['non-private']:.2f}x; median of {reps} "
              f"{median['dpsgd'] / median['non-private']:.2f}x); bound {bound * 1e3:.1f} ms "
              f"({bound / best['non-private']:.2f}x), DP-SGD / bound {best['dpsgd'] / bound:.2f}x", flush=True)
    return out


# ---- part 2: utility and leakage vs epsilon ----------------------------------------------
def utility(quick: bool) -> list[dict[str, Any]]:
    from app.cli.audit import audit_run
    from app.runtime.local_grid import run_inprocess

    logging.getLogger("flwr").setLevel(logging.ERROR)
    seeds = [0] if quick else [0, 1, 2]
    runs = []
    for setting, base in UTILITY.items():
        for eps in EPSILONS:
            for seed in seeds:
                overrides = [*base, f"seed={seed}"]
                if eps is not None:
                    overrides += ["privacy=dpsgd", f"privacy.target_epsilon={eps}"]
                t0 = time.monotonic()
                with tempfile.TemporaryDirectory() as tmp:
                    res = run_inprocess(overrides, Path(tmp))
                    audit = audit_run(Path(tmp), references=4, seed=seed)
                final = res["final"]
                runs.append({"setting": setting, "epsilon": eps, "seed": seed, "overrides": overrides,
                             "auc": final["auc"], "accuracy": final.get("accuracy"),
                             "spent_epsilon": res.get("privacy", {}).get("max_epsilon"),
                             "attack_auc_loss": audit["loss_threshold"]["auc"],
                             "attack_auc_lira": audit["offline_lira"]["auc"],
                             "tpr_at_1pct_fpr": max(audit["loss_threshold"]["tpr_at_1pct_fpr"],
                                                    audit["offline_lira"]["tpr_at_1pct_fpr"]),
                             "seconds": time.monotonic() - t0})
                r = runs[-1]
                print(f"{setting} eps={eps} seed={seed}: AUC {r['auc']:.4f}, attack AUC loss {r['attack_auc_loss']:.3f} "
                      f"LiRA {r['attack_auc_lira']:.3f} ({r['seconds']:.1f}s)", flush=True)
    return runs


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for setting in UTILITY:
        clean = [r["auc"] for r in runs if r["setting"] == setting and r["epsilon"] is None]
        for eps in EPSILONS:
            sel = [r for r in runs if r["setting"] == setting and r["epsilon"] == eps]
            aucs = [r["auc"] for r in sel]
            mean = statistics.fmean(aucs)
            rows.append({
                "setting": setting, "epsilon": eps, "auc": mean, "auc_std": statistics.pstdev(aucs),
                "delta_vs_no_dp": mean - statistics.fmean(clean),
                "spent_epsilon": max((r["spent_epsilon"] or 0.0) for r in sel) if eps is not None else None,
                "attack_auc_loss": statistics.fmean(r["attack_auc_loss"] for r in sel),
                "attack_auc_lira": statistics.fmean(r["attack_auc_lira"] for r in sel),
                "tpr_at_1pct_fpr": statistics.fmean(r["tpr_at_1pct_fpr"] for r in sel), "seeds": len(sel)})
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = ["# DP-SGD benchmark", "", f"Command: `{result['command']}` (utility runs: `{result['utility_command']}`)", "",
             "## Speed per optimiser step (min over interleaved repetitions, 1 thread; ratio to non-private)", "",
             "| model | batch | non-private | Opacus hooks | Opacus functorch | Opacus ghost | fedsilo |",
             "|---|---|---|---|---|---|---|"]
    for r in result["speed"]["per_step"]:
        ms, ra = r["ms"], r["ratio"]
        cells = [f"{ms[k]:.2f} ms ({ra[k]:.2f}x)" if k in ms else "unsupported" for k in
                 ("non-private", "opacus-hooks", "opacus-functorch", "opacus-ghost", "fedsilo")]
        lines.append(f"| {r['model']} | {r['batch']} | " + " | ".join(cells) + " |")
    lines += ["", "fedsilo's engine (`privacy.engine=auto`) on the MLPs is `privacy.clipping.LinearClipper`, on the CNN "
              "`privacy.clipping.LayerClipper` (ghost norms for the linear head, per-example weight gradients of the "
              "convolutions from one grouped weight-gradient convolution, GroupNorm's per-example sums), each with "
              "fedsilo's noise and sampling.", "",
              "## One local epoch at a real finance site (1 thread, interleaved repetitions)", "",
              "Bound = the non-private epoch plus, for each DP-SGD step, the work DP-SGD cannot skip: one Gaussian draw "
              "per parameter and its addition, one uniform draw per row (Poisson sampling), the per-example squared "
              "norms from the layer inputs and output gradients (each timed alone, same process).", "",
              "| rows | batch | non-private (min) | DP-SGD (min) | DP-SGD / non-private (min; median) | bound "
              "| bound / non-private | DP-SGD / bound |", "|---|---|---|---|---|---|---|---|"]
    for r in result["speed"]["epoch"]:
        s = r["seconds"]
        lines.append(f"| {r['rows']} | {r['batch']} | {s['non-private'] * 1e3:.1f} ms | {s['dpsgd'] * 1e3:.1f} ms "
                     f"| **{r['ratio']:.2f}x**; {r.get('median_ratio', r['ratio']):.2f}x "
                     f"| {r.get('bound_seconds', float('nan')) * 1e3:.1f} ms | {r.get('bound_ratio', float('nan')):.2f}x "
                     f"| {r.get('ratio_to_bound', float('nan')):.2f}x |")
    err = result["speed"]["correctness_max_abs_error"]
    lines += ["", "Largest deviation from the per-example definition of the clipped sum: "
              + ", ".join(f"{k} {v:.1e}" for k, v in err.items()), "",
              "## Utility and membership-inference leakage vs epsilon (delta = 1e-5)", "",
              "| setting | epsilon | final AUC (mean ± std) | Δ vs no DP | spent ε (max site) | attack AUC loss "
              "| attack AUC LiRA | TPR@1%FPR |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["summary"]:
        eps = "no DP" if r["epsilon"] is None else f"{r['epsilon']:g}"
        spent = "" if r["spent_epsilon"] is None else f"{r['spent_epsilon']:.3f}"
        lines.append(f"| {r['setting']} | {eps} | {r['auc']:.4f} ± {r['auc_std']:.4f} | {r['delta_vs_no_dp']:+.4f} | {spent} | "
                     f"{r['attack_auc_loss']:.3f} | {r['attack_auc_lira']:.3f} | {r['tpr_at_1pct_fpr']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    xs = {1.0: 1, 3.0: 3, 8.0: 8, None: 20}
    for setting in UTILITY:
        rows = [r for r in result["summary"] if r["setting"] == setting]
        x = [xs[r["epsilon"]] for r in rows]
        axes[0].errorbar(x, [r["auc"] for r in rows], yerr=[r["auc_std"] for r in rows], marker="o", capsize=3,
                         label=setting)
        axes[1].plot(x, [max(r["attack_auc_loss"], r["attack_auc_lira"]) for r in rows], marker="s", label=setting)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks([1, 3, 8, 20], ["ε=1", "ε=3", "ε=8", "no DP"])
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("final test AUC")
    axes[0].set_title("utility vs privacy budget")
    axes[1].axhline(0.5, color="grey", ls="--")
    axes[1].set_ylabel("best membership-inference AUC")
    axes[1].set_title("audit: attack AUC (0.5 = no leak)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--speed-only", action="store_true",
                        help="re-measure speed only; keep the utility runs of the existing results file")
    parser.add_argument("--utility-only", action="store_true",
                        help="re-run the utility and leakage runs only; keep the speed figures of the existing "
                             "results file (speed must be timed alone; utility runs need not be)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    result: dict[str, Any] = {"command": "python benchmarks/dp.py" + (" --quick" if args.quick else "")}
    suffix = "_quick" if args.quick else ""
    if args.utility_only:
        previous = json.loads((OUT / f"dp{suffix}.json").read_text())
        result["command"], result["speed"] = previous["command"], previous["speed"]
    else:
        result["speed"] = speed(args.quick)
    if args.utility_only:
        result["runs"] = utility(args.quick)
        result["utility_command"] = "python benchmarks/dp.py --utility-only" + (" --quick" if args.quick else "")
    elif args.speed_only:
        previous = json.loads((OUT / f"dp{suffix}.json").read_text())
        result["runs"], result["utility_command"] = previous["runs"], previous.get("utility_command", previous["command"])
    else:
        result["runs"], result["utility_command"] = utility(args.quick), result["command"]
    result["summary"] = summarize(result["runs"])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"dp{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / f"dp{suffix}.md").write_text(markdown(result))
    plot(result, OUT / f"dp{suffix}.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
