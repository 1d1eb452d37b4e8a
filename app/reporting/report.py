"""A run's report: ``report.md`` and a self-contained ``report.html`` (``fedsilo report RUN_DIR``).

Written for two readers: the data scientist who wants the curves and the final figures
with their uncertainty, and the compliance officer who wants to know, in plain words, what
left each site and what guarantee holds. Sections:

1. Summary            task, strategy, protection, status, final AUC with its 95 % interval
2. Configuration      the overrides and every resolved key
3. Data per site      rows and label balance (never records), from the run's own partition
4. Metrics per round  test AUC, losses, and epsilon per site when DP-SGD ran (plots)
5. Final metrics      on the held-out test set, with 95 % bootstrap intervals (1,000 resamples)
6. Privacy            what the server could see, the mechanisms, epsilon/delta per site, the audit
7. Participation      sampled, replied and rejected sites per round, with reasons
8. Timing and traffic seconds, messages and payload bytes per round

The HTML embeds its plots as data URIs and has no scripts or external links: it opens
offline, and can be archived or mailed as one file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import shlex
from pathlib import Path
from typing import Any, cast

import numpy as np

import aggregation
import privacy as privacy_options
from app.reporting.results import MODEL_FILE, RESULTS_FILE
from app.reporting.sections import Section, _fmt

REPORT_MD, REPORT_HTML = "report.md", "report.html"
BOOTSTRAP_METRICS = ("auc", "accuracy", "f1", "ks", "sensitivity", "specificity", "precision")
SECTIONS = ("Summary", "Configuration", "Data per site", "Metrics per round", "Final metrics", "Privacy",
            "Participation", "Timing and traffic")


# ---- figures -------------------------------------------------------------------------------
def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _round_plots(results: dict[str, Any]) -> list[tuple[str, bytes]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = results["history"]
    rounds = [h["round"] for h in hist]
    initial = results.get("initial") or {}
    figs = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    auc = [h["server"].get("auc") or h["federated_evaluate"].get("auc") for h in hist]
    xs, ys = ([0, *rounds], [initial.get("auc"), *auc]) if initial.get("auc") is not None else (rounds, auc)
    axes[0].plot(xs, [np.nan if v is None else v for v in ys], "-o", label="AUC")
    axes[0].set(xlabel="round", ylabel="AUC", title="test AUC of the global model")
    for key, label in (("server", "test loss"), ("federated_evaluate", "validation loss (sites)"),
                       ("train", "training loss (sites)")):
        name = "train_loss" if key == "train" else "loss"
        vals = [h[key].get(name) for h in hist]
        if any(v is not None for v in vals):
            axes[1].plot(rounds, [np.nan if v is None else v for v in vals], "-o", label=label, markersize=3)
    axes[1].set(xlabel="round", ylabel="loss", title="losses")
    axes[1].legend(fontsize=8)
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    figs.append(("report_metrics", _png(fig)))
    eps: dict[str, list[tuple[int, float]]] = {}
    for h in hist:
        for label, rec in h["participation"].get("privacy", {}).items():
            eps.setdefault(label.rsplit(" (node ", 1)[0], []).append((h["round"], rec["epsilon"]))
    if eps:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for site, pts in sorted(eps.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", markersize=3, label=site)
        target = results.get("privacy", {}).get("target_epsilon")
        if target:
            ax.axhline(target, color="k", ls="--", lw=1, label="target")
        ax.set(xlabel="round", ylabel="epsilon", title="cumulative epsilon per site (DP-SGD)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        figs.append(("report_epsilon", _png(fig)))
    return figs


# ---- data and bootstrap ------------------------------------------------------------------------
def _config(results: dict[str, Any]) -> Any:
    from app import config

    return config.compose(shlex.split(results.get("overrides", "")))


def site_rows(results: dict[str, Any]) -> list[list[str]]:
    """Rows and label balance per site, from the run's own partition of its data."""
    import tasks
    from app import config
    from app.support.paths import resolve_data_dir
    from tasks.base import PooledTask

    cfg = _config(results)
    task_cls = tasks.get(cfg.task.name)
    if task_cls.federated_data:  # the report says so: no process here can count them
        raise LookupError(f"task={cfg.task.name} keeps its rows at the sites; each site counts its own")
    task = cast(PooledTask, task_cls(cfg.task, resolve_data_dir(cfg.data_dir)))
    out = []
    for s in task.sites(cfg.partition, config.num_sites(cfg), cfg.seed):
        pos = float(s.train.y.mean()) if len(s.train) else float("nan")
        out.append([s.name, str(len(s.train)), str(len(s.val)), f"{pos:.1%}"])
    return out


def resampled_metrics(y: np.ndarray, scores: np.ndarray, counts: np.ndarray, threshold: float = 0.5
                      ) -> dict[str, np.ndarray]:
    """:data:`BOOTSTRAP_METRICS` of many resamples at once. Row ``b`` of ``counts`` says how often
    each example is drawn in resample ``b``; the result equals computing each metric on the
    resampled arrays (ties in the scores count half, as in the ROC AUC)."""
    order = np.argsort(scores, kind="stable")
    s, yy, w = scores[order], y[order].astype(bool), counts[:, order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of equal scores
    pos = np.add.reduceat(w * yy, starts, axis=1)
    neg = np.add.reduceat(w * ~yy, starts, axis=1)
    p_tot, n_tot = pos.sum(1), neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        below = np.cumsum(neg, axis=1) - neg
        auc = (pos * (below + 0.5 * neg)).sum(1) / (p_tot * n_tot)
        ks = np.max(np.cumsum(neg, axis=1) / n_tot[:, None] - np.cumsum(pos, axis=1) / p_tot[:, None], axis=1)
        pred = s >= threshold
        tp, fp = (w * (yy & pred)).sum(1), (w * (~yy & pred)).sum(1)
        fn, tn = p_tot - tp, n_tot - fp
        sens, spec, prec = tp / p_tot, tn / n_tot, tp / (tp + fp)
        return {"auc": auc, "accuracy": (tp + tn) / (p_tot + n_tot), "f1": 2 * tp / (2 * tp + fp + fn),
                "ks": ks, "sensitivity": sens, "specificity": spec, "precision": prec}


def bootstrap(y: np.ndarray, scores: np.ndarray, n_boot: int = 1000, seed: int = 0
              ) -> dict[str, tuple[float, float, float]]:
    """Each metric's value on the full set and its 95 % percentile bootstrap interval."""
    from tasks.metrics import binary_metrics

    y, scores = np.asarray(y), np.asarray(scores, dtype=np.float64)
    point = binary_metrics(y, scores, 0.0)
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, len(y), len(y)), minlength=len(y)) for _ in range(n_boot)])
    draws = resampled_metrics(y, scores, counts)
    out = {}
    for k in BOOTSTRAP_METRICS:
        d = draws[k][np.isfinite(draws[k])]
        if np.isfinite(point[k]) and d.size:
            lo, hi = np.percentile(d, [2.5, 97.5])
            out[k] = (float(point[k]), float(lo), float(hi))
    return out


def final_intervals(run_dir: Path, results: dict[str, Any], n_boot: int = 1000) -> dict[str, tuple[float, float, float]]:
    """Bootstrap intervals of the final model's test metrics ({} without a plaintext model)."""
    import torch

    import tasks
    from app.support.paths import resolve_data_dir
    from tasks.training import predict

    if results.get("artifacts", {}).get("model") != MODEL_FILE or not (run_dir / MODEL_FILE).is_file():
        return {}
    cfg = _config(results)
    from tasks.base import PooledTask

    task_cls = tasks.get(cfg.task.name)
    if task_cls.federated_data:
        return {}  # the test rows stay at the sites: the metrics are pooled sums, no rows to resample
    task = cast(PooledTask, task_cls(cfg.task, resolve_data_dir(cfg.data_dir)))
    model = task.build_model()
    model.load_state_dict(torch.load(run_dir / MODEL_FILE, weights_only=True))
    test = task.data().test
    scores, _ = predict(model, test.x, test.y)
    return bootstrap(test.labels(), np.asarray(scores), n_boot, cfg.seed)


# ---- sections --------------------------------------------------------------------------------
def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def strategy_label(s: dict[str, Any]) -> str:
    """``fedprox + yogi, personal=ditto, robust=median``: the strategy and its layers."""
    parts = [s["name"] + (f" + {s['server_opt']}" if s.get("server_opt", "none") != "none" else "")]
    parts += [f"{k}={s[k]}" for k in ("personal", "robust") if s.get(k, "none") != "none"]
    return ", ".join(parts)


def personal_section(results: dict[str, Any]) -> Section | None:
    """Per site, the final global model beside the site's personal model (``personalization``)."""
    p = results.get("personalization")
    if not p:
        return None
    sec = Section("Personalization")
    sec.paragraphs.append(f"strategy.personal={p['method']}: each site scored the final global model and its own "
                          f"personal model on {p['rows']}; only these summaries reached the coordinator, never a "
                          "personal model. A site keeps its personal model only where its own validation rows "
                          "prefer it (strategy.personal_select); otherwise both columns show the global model.")
    keys = [k for k in ("accuracy", "auc", "loss") if any(k in s["global"] for s in p["sites"].values())]
    rows = [[name, str(s["rows"]), "personal" if s.get("personalized") else "global",
             *[f"{_fmt(s['global'].get(k))} / {_fmt(s['personal'].get(k))}" for k in keys]]
            for name, s in p["sites"].items()]
    mean = p.get("mean") or {}
    if mean:
        rows.append(["mean over sites", "", "", *[f"{_fmt(mean['global'].get(k))} / {_fmt(mean['personal'].get(k))}"
                                              for k in keys]])
    sec.tables.append((["site", "test rows", "model kept", *[f"{k} (global / personal)" for k in keys]], rows))
    return sec


def sections(run_dir: Path, results: dict[str, Any], n_boot: int = 1000) -> list[Section]:
    """The report's sections for a run directory and its results."""
    cfg = results["config"]
    agg, priv = cfg["aggregation"]["name"], cfg["privacy"]["name"]
    final = results.get("final") or {}
    ci = final_intervals(run_dir, results, n_boot)
    hist = results.get("history", [])

    summary = Section("Summary")
    auc = ci.get("auc")
    auc_text = (f"{auc[0]:.4f} (95 % CI {auc[1]:.4f}-{auc[2]:.4f})" if auc else _fmt(final.get("auc")))
    summary.tables.append((["", ""], [  # a key-value table: no header
        ["status", results.get("status", "?")], ["task", cfg["task"]["name"]],
        ["strategy", strategy_label(cfg["strategy"])],
        ["aggregation", agg], ["privacy", priv], ["sites", str(results.get("sites"))],
        ["rounds completed", f"{len(hist)} of {cfg['num_rounds']}"], ["seed", str(cfg["seed"])],
        ["final test AUC", auc_text], ["run time", f"{results.get('timing', {}).get('total_seconds', 0):.1f} s"],
    ]))

    conf = Section("Configuration")
    conf.paragraphs.append(f"Overrides: `{results.get('overrides') or '(defaults)'}`")
    conf.tables.append((["key", "value"], [[k, json.dumps(v)] for k, v in _flatten(cfg) if k != "data_dir"]))

    data = Section("Data per site")
    try:
        rows = site_rows(results)
        data.paragraphs.append("Rows per site after the run's partition (training and validation), and the share "
                               "of positive labels among the training rows. Counts only: no record leaves a site.")
        data.tables.append((["site", "training rows", "validation rows", "positive share"], rows))
    except Exception as err:  # noqa: BLE001 - the sites' data need not be visible to whoever writes the report
        data.paragraphs.append(f"Not available to the coordinator ({type(err).__name__}: {err}).")

    curves = Section("Metrics per round")
    curves.figures = _round_plots(results) if hist else []
    curves.tables.append((["round", "test AUC", "test loss", "train loss (sites)", "validation loss (sites)"], [
        [str(h["round"]), _fmt(h["server"].get("auc")), _fmt(h["server"].get("loss")),
         _fmt(h["train"].get("train_loss")), _fmt(h["federated_evaluate"].get("loss"))] for h in hist]))

    fin = Section("Final metrics")
    if ci:
        fin.paragraphs.append(f"The final global model on the held-out test set; 95 % percentile bootstrap intervals "
                              f"over {n_boot} resamples of the test rows.")
        fin.tables.append((["metric", "value", "95 % CI"],
                           [[k, f"{v[0]:.4f}", f"{v[1]:.4f} - {v[2]:.4f}"] for k, v in ci.items()]
                           + [["loss", _fmt(final.get("loss")), ""]]))
    elif str(results.get("test_source", "")).startswith("sites'"):
        fin.paragraphs.append(f"Pooled from the {results.get('test_source')}. The coordinator holds no test rows, so "
                              "there are no bootstrap intervals; the AUC comes from logit histograms and is within "
                              f"auc_bound = {_fmt(final.get('auc_bound'), 6)} of the exact pooled AUC.")
        fin.tables.append((["metric", "value"], [[k, _fmt(v)] for k, v in final.items()]))
    else:
        fin.paragraphs.append("No plaintext model at the coordinator (Paillier keeps it encrypted) or the run did not "
                              f"train: figures from {results.get('final_source') or 'the last round'}, no intervals.")
        fin.tables.append((["metric", "value"], [[k, _fmt(v)] for k, v in final.items()]))

    privacy = Section("Privacy")
    sees = aggregation.REGISTRY[agg].sees if agg in aggregation.REGISTRY else agg
    privacy.paragraphs.append(f"What the coordinator could see of the training: {sees}.")
    if cfg["strategy"].get("fraction_evaluate", 0) > 0 and cfg["task"].get("val_fraction", 0) > 0:
        privacy.paragraphs.append("Federated evaluation was on: each site's validation counts, loss and AUC reached "
                                  "the coordinator in the clear.")
    p = results.get("privacy")
    if not p:
        privacy.paragraphs.append("No differential privacy: the trained model itself carries no formal guarantee "
                                  "about any one record.")
    else:
        privacy.paragraphs.append(f"Differential privacy ({p['mechanism']}): {p['guarantee']}.")
        paragraphs, tables = privacy_options.get(p["mechanism"]).tables(p)
        privacy.paragraphs.extend(paragraphs)
        privacy.tables.extend(tables)
    a = results.get("audit")
    if a:
        privacy.paragraphs.append(f"Membership-inference audit of the final model: best attack AUC {a['max_auc']:.4f} "
                                  "(0.5 = the attacker cannot tell members from non-members).")

    personal = personal_section(results)

    part = Section("Participation")
    prow = []
    for h in hist:
        t = h["participation"].get("train", {})
        reasons = "; ".join(f"{r['site']}: {r['reason']}" for r in t.get("rejected", []))
        prow.append([str(h["round"]), str(t.get("sampled", "-")), str(t.get("replied", "-")),
                     str(len(t.get("rejected", []))), reasons or "-"])
    part.tables.append((["round", "sampled", "replied", "rejected", "reasons"], prow))
    if any("buffered" in h["participation"] for h in hist):  # strategy.buffer: each version's replies
        part.paragraphs.append("Buffered asynchronous rounds (FedBuff): each round is a model version made of the "
                               "buffered replies; a reply started tau versions earlier counts with the weight shown.")
        part.tables.append((["round", "staleness of the buffered replies", "weights"], [
            [str(h["round"]), ", ".join(str(t) for t in b["staleness"]), ", ".join(f"{w:.3f}" for w in b["weights"])]
            for h in hist if (b := h["participation"].get("buffered"))]))

    timing = Section("Timing and traffic")
    timing.paragraphs.append("Payload bytes of the records exchanged (model arrays, metrics, protocol messages); "
                             "transport framing not included.")
    timing.tables.append((["round", "seconds", "messages to sites", "bytes to sites", "bytes from sites"], [
        [str(h["round"]), _fmt(h.get("seconds"), 2), str(h.get("traffic", {}).get("messages_to_sites", "-")),
         f"{h.get('traffic', {}).get('bytes_to_sites', 0):,}", f"{h.get('traffic', {}).get('bytes_from_sites', 0):,}"]
        for h in hist]))
    return [summary, conf, data, curves, fin, *([personal] if personal else []), privacy, part, timing]


# ---- rendering -------------------------------------------------------------------------------
def to_markdown(title: str, secs: list[Section]) -> str:
    """The report as Markdown."""
    lines = [f"# {title}", ""]
    for s in secs:
        lines += [f"## {s.title}", ""]
        for para in s.paragraphs:
            lines += [para, ""]
        for stem, _ in s.figures:
            lines += [f"![{stem}]({stem}.png)", ""]
        for head, rows in s.tables:
            lines.append("| " + " | ".join(head or [" "] * len(rows[0])) + " |")
            lines.append("|" + "---|" * len(head))
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
            lines.append("")
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1d2330}h1{border-bottom:2px solid #2b6cb0}h2{color:#2b6cb0;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}td,th{border:1px solid #cbd5e0;padding:.25em .6em;
text-align:left;vertical-align:top}th{background:#edf2f7}img{max-width:100%}code{background:#edf2f7;padding:0 .3em}"""


def to_html(title: str, secs: list[Section]) -> str:
    """The report as one self-contained HTML page (figures inline)."""
    def text(s: str) -> str:
        parts = html.escape(s).split("`")
        return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))

    body = [f"<h1>{html.escape(title)}</h1>"]
    for s in secs:
        body.append(f'<h2 id="{s.title.lower().replace(" ", "-")}">{html.escape(s.title)}</h2>')
        body += [f"<p>{text(p)}</p>" for p in s.paragraphs]
        body += [f'<img alt="{stem}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                 for stem, png in s.figures]
        for head, rows in s.tables:
            long = len(rows) > 25  # folded (a <details> element: no script needed), the count in its summary
            if long:
                body.append(f"<details><summary>{len(rows)} rows</summary>")
            header = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" if any(head) else ""
            body.append("<table>" + header)
            body += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows]
            body.append("</table>" + ("</details>" if long else ""))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")


def write(run_dir: Path, n_boot: int = 1000) -> tuple[Path, Path]:
    """Write ``report.md`` (with its PNGs) and ``report.html`` into ``run_dir``."""
    results_path = run_dir / RESULTS_FILE
    if not results_path.is_file():
        raise FileNotFoundError(f"{results_path} does not exist: is {run_dir} a fedsilo run directory?")
    results = json.loads(results_path.read_text())
    cfg = results["config"]
    if results.get("kind") == "vertical":
        from app.reporting import vertical_report

        title = f"fedsilo vertical run: {results['model']} ({results['mode']})"
        secs = vertical_report.sections(results)
    elif results.get("kind") == "learner":
        from app.reporting import learner_report

        title = f"fedsilo run: learner {results['learner']['name']} on {cfg['task']['name']}"
        secs = learner_report.sections(results)
    else:
        title = f"fedsilo run: {cfg['task']['name']}, {cfg['strategy']['name']}, {cfg['aggregation']['name']} aggregation"
        secs = sections(run_dir, results, n_boot)
    for s in secs:
        for stem, png in s.figures:
            (run_dir / f"{stem}.png").write_bytes(png)
    md, page = run_dir / REPORT_MD, run_dir / REPORT_HTML
    md.write_text(to_markdown(title, secs))
    page.write_text(to_html(title, secs))
    return md, page


def ensure(run_dir: Path, rewrite: bool = False) -> tuple[Path | None, str]:
    """The run's ``report.html``, written if it is missing (or if ``rewrite``); never raises.

    Returns ``(page, "")``, or ``(None, why)`` with a message naming the retry command: a run
    that succeeded must not look failed because its report could not be made. Every place that
    finishes a run (the ServerApp, the ``fedsilo`` command, ``fedsilo deploy``) goes through here."""
    page = run_dir / REPORT_HTML
    try:
        if rewrite or not page.is_file():
            _, page = write(run_dir)
        return page, ""
    except Exception as err:  # noqa: BLE001 - see docstring
        return None, f"the report could not be written ({type(err).__name__}: {err}); retry with: fedsilo report {run_dir}"


def main(argv: list[str]) -> int:
    """``fedsilo report RUN_DIR``: write the run's report; the exit code."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="fedsilo report", description="Write a run's report.md and report.html.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    args = parser.parse_args(argv)
    try:
        md, page = write(args.run_dir, args.bootstrap)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"fedsilo report: {err}", file=sys.stderr)
        return 2
    print(f"fedsilo report: {page} and {md}")
    return 0
