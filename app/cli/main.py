"""The ``fedsilo`` command: compose and validate a Hydra config, run it, report.

``fedsilo task=medical num_rounds=20`` composes ``conf/`` with the overrides, validates
them, runs the job in Flower's simulation engine on a private SuperLink (see
:mod:`app.runtime.superlink`), follows it to its final status and leaves in Hydra's run
directory: ``results.json``, ``model.pt``, ``metrics.png``, ``superlink.log`` and Hydra's
``.hydra/``. ``--multirun`` sweeps work as in any Hydra app. Exit codes: 0 completed,
1 the run failed, 2 the config is invalid. ``fedsilo keys ...`` provisions keys
(:mod:`app.cli.keys`); ``fedsilo site ...`` checks and starts a site (:mod:`app.cli.site`);
``fedsilo audit RUN_DIR`` audits a run's model (:mod:`app.cli.audit`); ``fedsilo stats ...`` a Table 1
(:mod:`app.cli.stats`);
``audit=true`` runs that audit right after the job; ``fedsilo report RUN_DIR`` (also written
after every job, ``report=false`` to skip) and ``fedsilo compare DIR...`` (:mod:`app.reporting.report`,
:mod:`app.reporting.compare`).
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from app import config
from app.reporting.results import RESULTS_FILE
from app.runtime import appdir
from app.runtime.preflight import PreflightError, preflight
from app.runtime.superlink import SimulationError, run_simulation

HEADLINE = ("auc", "accuracy", "f1", "ks", "sensitivity", "specificity", "loss", "accuracy_site_mean")


def fail(message: str, code: int) -> None:
    """Print ``message`` to stderr and exit with ``code``."""
    print(f"fedsilo: {message}", file=sys.stderr)
    sys.exit(code)


@hydra.main(config_path=str(config.CONF_DIR), config_name="config", version_base="1.3")
def run(cfg: DictConfig) -> None:
    """Hydra task function: one fedsilo job."""
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir).resolve()
    overrides = list(hc.overrides.task)
    try:
        typed = config.validate(cfg)
        # what a simulated run can make for itself (aggregation=paillier without key files: a key pair)
        import aggregation  # here, not at the top: a config error must not wait for torch to import

        extra, note = aggregation.get(typed.aggregation.name).simulation_setup(typed.aggregation, out_dir)
        if extra:
            overrides += extra
            typed = config.compose(overrides)
            print(f"fedsilo: {note}", flush=True)
        data_dir = preflight(typed)
        n_sites = config.num_sites(typed)
    except (config.ConfigError, PreflightError, FileNotFoundError, ValueError) as err:
        fail(f"config error: {err}", 2)
        return
    try:
        app_dir = appdir.app_dir()
    except appdir.AppDirError as err:
        fail(str(err), 2)
        return
    run_config = {
        "overrides": config.run_overrides(overrides, data_dir),
        "output-dir": str(out_dir),
    }
    if typed.vertical.name != "none":
        print(f"fedsilo: vertical={typed.vertical.name} mode={typed.vertical.mode} parties="
              + ",".join(f"{p.name}({p.role})" for p in typed.vertical.parties)
              + f" epochs={typed.vertical.epochs} seed={typed.seed}", flush=True)
    else:
        from app.reporting.report import strategy_label

        print(f"fedsilo: task={typed.task.name} strategy={strategy_label(config.to_dict(typed)['strategy'])} "
              f"aggregation={typed.aggregation.name} privacy={typed.privacy.name} "
              f"partition={typed.partition.name} sites={n_sites} rounds={typed.num_rounds} seed={typed.seed}",
              flush=True)
    print(f"fedsilo: output directory {out_dir}", flush=True)
    timeout = typed.num_rounds * typed.strategy.round_timeout * 2 + 600
    if typed.vertical.name != "none":
        timeout = typed.vertical.epochs * 1200 + 1200
    # A `kill` must clean up like Ctrl-C does: SystemExit unwinds through LocalSuperLink.stop().
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        outcome = run_simulation(app_dir, run_config, n_sites, out_dir / "superlink.log",
                                 extra_federation=dict(typed.simulation), timeout=timeout)
    except SimulationError as err:
        fail(str(err), 1)
        return
    results = out_dir / RESULTS_FILE
    if not outcome.ok or not results.is_file():
        detail = outcome.details or "no results.json was written"
        fail(f"run {outcome.run_id} ended with status {outcome.status}: {detail} "
             f"(logs: {out_dir / 'superlink.log'})", 1)
    recorded = json.loads(results.read_text())
    print(f"fedsilo: run {outcome.run_id} completed in {outcome.seconds:.1f}s", flush=True)
    if recorded.get("kind") == "learner" and recorded["learner"].get("analysis") == "table1":
        print((out_dir / "table1.md").read_text() + f"fedsilo: Table 1 in {out_dir / 'table1.md'} (.html, .csv, .json)",
              flush=True)
    elif recorded.get("kind") == "learner":  # a sum-based learner: its outcome, no rounds
        shown = {k: v for k, v in recorded["learner"].items() if isinstance(v, (int, float, str)) and k != "name"}
        print(f"fedsilo: learner {recorded['learner']['name']}: " + "  ".join(
            f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()), flush=True)
    else:
        final = recorded["final"]
        summary = "  ".join(f"{k}={final[k]:.4f}" for k in HEADLINE if final.get(k) is not None)
        print(f"fedsilo: final test {summary}", flush=True)
    mean = (recorded.get("personalization") or {}).get("mean")
    if mean:
        print(f"fedsilo: each site on its own test rows, mean accuracy: global model "
              f"{mean['global'].get('accuracy', float('nan')):.4f}, personal models "
              f"{mean['personal'].get('accuracy', float('nan')):.4f}", flush=True)
    p = recorded.get("privacy")
    if p:
        import privacy

        print(f"fedsilo: privacy ({p['mechanism']}): {privacy.get(p['mechanism']).headline(p)}", flush=True)
    if typed.audit:
        from app.cli.audit import audit_run

        section = audit_run(out_dir, typed.audit_references, typed.seed)
        print(f"fedsilo: membership-inference audit: attack AUC {section['max_auc']:.4f} (0.5 = no leak)", flush=True)
    if typed.report:
        from app.reporting import report

        page, why = report.ensure(out_dir, rewrite=typed.audit)  # the ServerApp wrote it; again for the audit
        if page is not None:
            print(f"fedsilo: report in {page}", flush=True)
        else:
            print(f"fedsilo: warning: {why}", file=sys.stderr, flush=True)
    print(f"fedsilo: results in {results}", flush=True)


#: ``fedsilo <command> ...``: the module and function that take the rest of the arguments.
COMMANDS = {
    "keys": ("app.cli.keys", "main"),
    "certs": ("app.cli.keys", "certs_main"),
    "audit": ("app.cli.audit", "main"),
    "data": ("app.cli.data", "main"),
    "predict": ("app.cli.predict", "main"),
    "report": ("app.reporting.report", "main"),
    "compare": ("app.reporting.compare", "main"),
    "site": ("app.cli.site", "main"),
    "ledger": ("app.cli.ledger", "main"),
    "stats": ("app.cli.stats", "main"),
}


def main() -> None:
    """Console-script entry point: ``fedsilo <command> ...`` (:data:`COMMANDS`, ``deploy local``) or a
    job (Hydra overrides)."""
    import importlib

    if sys.argv[1:2] in (["--version"], ["-V"]):
        from app import version

        print(f"fedsilo {version()}")
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        module, function = COMMANDS[sys.argv[1]]
        sys.exit(getattr(importlib.import_module(module), function)(sys.argv[2:]))
    if len(sys.argv) > 2 and sys.argv[1:3] == ["deploy", "local"]:
        from app.runtime import deploy

        sys.exit(deploy.main(sys.argv[3:]))
    run()


if __name__ == "__main__":
    main()
