"""fedsilo's ServerApp: composes the config, runs the strategy stack, writes the results.

The stack (strategy, privacy layer, aggregation option's coordinator half) comes from the
composition root (:mod:`app.composition`); this module only drives rounds and reports.

For the bundled research tasks the server holds the task's held-out test set and scores
the global model on it after every round (and once before training). For ``task=tabular``
it holds no data at all: the sites' statistics are combined before round 1 and the test
metrics pooled from the sites' held-out rows (:mod:`app.federated`). The sites' own
validation rows are scored by federated evaluation either way. Results go to the run config's ``output-dir`` (the ``fedsilo``
command sets it to Hydra's run directory).
"""

from __future__ import annotations

import random
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

import aggregation
import strategies
import tasks
from app import composition, config
from app.federated import FederatedData
from app.reporting import trackers
from app.reporting.results import ENCRYPTED_MODEL_FILE, Recorder
from app.runtime import checkpoint
from app.runtime.flower_tuning import fast_object_pulls
from app.runtime.paths import default_output_dir, resolve_data_dir
from app.runtime.traffic import MeteredGrid, deployed
from core.records import PhaseRecord, RoundRecord
from core.state import JOB_KEY
from strategies import personal
from strategies.loop import run_rounds
from tasks.tabular import artefact
from tasks.tabular.task import TabularTask

app = ServerApp()

PULL_INTERVAL = 0.005  # seconds between the server's polls for replies (simulation engine), small federations
SMALL_FEDERATION = 20
SUMMARY_KEYS = ("auc", "accuracy", "f1", "ks", "loss", "accuracy_site_mean")


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={metrics[k]:.4f}" for k in SUMMARY_KEYS if k in metrics)


def progress_line(server_round: int, num_rounds: int, rec: RoundRecord, recorder: Recorder,
                  federated: dict[str, Any], privacy_note: str = "") -> str:
    """One line a person can follow: round k/n, sites sampled/replied/failed, the round's
    metrics, its privacy figure, its time and traffic, and the time left at the mean pace so far."""
    part = rec.train or PhaseRecord()
    failed = len(part.rejected or [])
    sampled = "-" if part.sampled is None else part.sampled
    replied = "-" if part.replied is None else part.replied
    metrics = recorder.server.get(server_round, {})
    shown = f"test {_fmt(metrics)}" if metrics else f"sites' validation {_fmt(federated) or '-'} (encrypted model)"
    secs = recorder.seconds.get(server_round, 0.0)
    done = [s for r, s in recorder.seconds.items() if r > 0]
    left = (num_rounds - server_round) * (sum(done) / len(done)) if done else 0.0
    traffic = recorder.traffic.get(server_round, {})
    kb = (traffic.get("bytes_to_sites", 0) + traffic.get("bytes_from_sites", 0)) / 1024
    return (f"fedsilo round {server_round}/{num_rounds} | sites {sampled} sampled, {replied} replied, "
            f"{failed} failed | {shown}{privacy_note} | {secs:.1f} s, {kb:,.0f} KiB"
            + (f", about {left:.0f} s left" if server_round < num_rounds else ""))


def write_artefact(out_dir: Path, cfg: config.FedsiloConfig, fed: FederatedData, arrays: ArrayRecord) -> Path:
    """``model.fedsilo.npz``: the final model, the fitted preprocessing (or, under Paillier, the encrypted
    totals only a site can open) and the schema (:mod:`tasks.tabular.artefact`)."""
    task = fed.task
    sealed = None
    if fed.preprocessor is None:  # the coordinator holds only ciphertexts
        sealed = {k: ([bytes(b).hex() for b in v] if isinstance(v, list) and v and isinstance(v[0], bytes) else v)
                  for k, v in fed.config.items()}
    meta = {"model": {"name": cfg.task.model, "hidden": list(cfg.task.hidden), "dropout": cfg.task.dropout,
                      "width": task.width, "outputs": task.outputs},
            **task.artefact_meta(),
            "preprocessor": None if fed.preprocessor is None else fed.preprocessor.to_dict(),
            "sealed": sealed, "aggregation": config.to_dict(cfg)["aggregation"], "encrypted": sealed is not None}
    return artefact.write(out_dir / artefact.FILE, {k: v.numpy() for k, v in arrays.items()}, meta)


def personal_rows(cfg: config.FedsiloConfig, own_data: bool) -> str:
    """Which rows each site scores the global and its personal model on (``personalization.rows``)."""
    if own_data:
        return "each site's own held-out test rows"
    if cfg.partition.name == "natural":
        return "each site's local test rows (its share of the task's test split)"
    return "each site's validation rows"


class CoordinatorCrash(RuntimeError):
    """``faults.crash_after_round``: the ServerApp dies on purpose (after its checkpoint)."""


def _resume(cfg: config.FedsiloConfig, stack: composition.CoordinatorStack, recorder: Recorder,
            train_config: ConfigRecord) -> tuple[int, Result, ArrayRecord]:
    """Load ``cfg.resume``'s checkpoint into the strategy stack, recorder and RNGs; return
    (next round, the rounds' Result so far, the global model to continue from)."""
    ckpt = checkpoint.resumable(str(cfg.resume), config.to_dict(cfg), cfg.num_rounds)
    stack.strategy.load_state_dict(ckpt.strategy)  # type: ignore[attr-defined]
    recorder.restore(ckpt.recorder)
    checkpoint.set_rng_state(ckpt.rng["meta"], ckpt.rng["arrays"])
    stack.privacy.resume(train_config)  # e.g. each site's DP-SGD ledger, as its replies reported it
    log(INFO, "fedsilo: resuming from %s after round %s of %s", checkpoint.locate(str(cfg.resume)), ckpt.round,
        cfg.num_rounds)
    return ckpt.round + 1, ckpt.to_result(), ckpt.arrays


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num_rounds`` of the configured strategy and write results.json."""
    torch.set_num_threads(1)
    cfg = config.from_run_config(context.run_config)
    n_sites = config.num_sites(cfg)
    if isinstance(getattr(grid, "pull_interval", None), float) and n_sites <= SMALL_FEDERATION:
        # Flower's in-memory grid (the simulation engine's) polls for replies every 0.1 s, a floor on
        # every message round trip (secure aggregation makes four per round): small federations poll
        # every 5 ms. Larger ones keep Flower's interval: a poll costs in proportion to the replies
        # outstanding and competes with the engine's workers (at 1000 sites 5 ms cost 1.5x per round).
        grid.pull_interval = min(grid.pull_interval, PULL_INTERVAL)  # type: ignore[attr-defined]
    if deployed(grid):  # replies polled fast (MeteredGrid), object pulls retried after 20 ms, not 1 s
        fast_object_pulls()
    grid = MeteredGrid(grid)  # bytes and messages per round, into results.json
    out = str(context.run_config.get("output-dir", "") or "")
    out_dir = Path(out) if out else default_output_dir(context.run_id)
    if cfg.vertical.name != "none":  # parties with different columns: their own protocols (vertical/)
        from app import vertical

        vertical.serve(grid, context, cfg, out_dir)
        write_report(cfg, out_dir)
        return
    task = tasks.get(cfg.task.name)(cfg.task, resolve_data_dir(cfg.data_dir))
    fed: FederatedData | None = None
    prep_config = ConfigRecord()
    if getattr(task, "federated_data", False):  # the rows stay at the sites: no test set here
        assert isinstance(task, TabularTask)
        fed = FederatedData(task, aggregation.get(cfg.aggregation.name), cfg.aggregation, cfg.strategy.round_timeout,
                            task.schema.standardize)
        prep_config = fed.prepare(grid, n_sites)
        prep_traffic = grid.take().as_dict()
    else:
        test = task.data().test
    random.seed(cfg.seed)  # Flower samples sites with Python's random: seeded, and checkpointed, for reproducibility
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = task.build_model()
    initial = ArrayRecord(model.state_dict())
    stack = composition.coordinator(cfg, n_sites, initial)
    stack.inner.join_timeout = cfg.strategy.round_timeout
    if fed is not None:  # the federation was formed in the preprocessing phase: round 1 goes on with who is left
        stack.inner.min_available_nodes = stack.inner.min_train_nodes
    strategy = stack.strategy
    recorder = Recorder(cfg, n_sites, out_dir)
    if fed is not None:
        recorder.test_source = (f"sites' held-out test rows, pooled by aggregation={cfg.aggregation.name} "
                                f"(the coordinator learns {fed.summer.learns})")
    log(INFO, "fedsilo: task=%s strategy=%s aggregation=%s privacy=%s partition=%s sites=%s rounds=%s",
        cfg.task.name, cfg.strategy.name, cfg.aggregation.name, cfg.privacy.name,
        cfg.partition.name, n_sites, cfg.num_rounds)
    if stack.evaluation_in_clear_warning:
        log(WARNING, "fedsilo: aggregation=%s protects the training updates only; federated evaluation "
            "replies (each site's validation counts, loss and AUC) still reach the server in the clear. "
            "Set strategy.fraction_evaluate=0 to keep them at the sites (the server's test-set "
            "evaluation is unaffected).", cfg.aggregation.name)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if fed is not None:  # pooled from the sites' own test rows, under the run's protection
            outgoing = getattr(strategy, "outgoing", None)  # the form the sites receive (e.g. Paillier's split)
            metrics = fed.evaluate(grid, outgoing(server_round, arrays, fed.nodes, grid) if callable(outgoing) else arrays)
            recorder.record_server(server_round, metrics)
            if server_round == 0:
                log(INFO, "fedsilo round 0/%s (initial model) | test %s", cfg.num_rounds, _fmt(metrics))
            return MetricRecord({k: float(v) for k, v in metrics.items() if np.isfinite(v)})
        if not stack.holds_plaintext_model and server_round > 0:
            # Paillier: the server holds only ciphertexts; the sites' federated evaluation scores the model
            recorder.record_server(server_round, {})
            return None
        model.load_state_dict(arrays.to_torch_state_dict())
        metrics = task.evaluate(model, test)
        recorder.record_server(server_round, metrics)
        if server_round == 0:
            log(INFO, "fedsilo round 0/%s (initial model) | test %s", cfg.num_rounds, _fmt(metrics))
        return MetricRecord({k: float(v) for k, v in metrics.items() if np.isfinite(v)})

    first_round, result, train_config = 1, None, ConfigRecord(dict(prep_config.items()))
    if cfg.resume:
        first_round, result, initial = _resume(cfg, stack, recorder, train_config)
    fault_round = cfg.faults.crash_after_round

    board = trackers.open_tracker(cfg.logger, out_dir, cfg, config.to_dict(cfg), context.run_id)

    def after_round(server_round: int, arrays: ArrayRecord, res: Result) -> None:
        recorder.traffic[server_round] = grid.take().as_dict()
        rec = stack.record.round(server_round)
        federated = dict(res.evaluate_metrics_clientapp.get(server_round, {}))
        log(INFO, "%s", progress_line(server_round, cfg.num_rounds, rec, recorder, federated, stack.privacy.note(rec)))
        if board is not None:
            board.log_round(server_round, recorder.server.get(server_round, {}),
                            dict(res.train_metrics_clientapp.get(server_round, {})), federated, rec.to_dict(),
                            recorder.traffic[server_round], recorder.seconds.get(server_round),
                            stack.record.sites.names_by_label())
        if cfg.checkpoint:
            checkpoint.save(out_dir, server_round, arrays, res, config.to_dict(cfg), recorder.state(),
                            strategy.state_dict())  # type: ignore[attr-defined]
        if server_round == fault_round:
            raise CoordinatorCrash(f"fault injection: the coordinator dies after round {server_round} "
                                   f"(faults.crash_after_round); resume with: fedsilo resume={out_dir}")

    driver = strategies.buffered(cfg.strategy, strategy, stack.inner)  # strategy.buffer > 0: FedBuff
    try:
        if driver is not None:
            result = driver.run(grid, initial, cfg.num_rounds, cfg.strategy.round_timeout, first_round=first_round,
                                result=result, train_config=train_config, evaluate_fn=evaluate_fn,
                                after_round=after_round)
        else:
            result = run_rounds(strategy, grid, initial, cfg.num_rounds, cfg.strategy.round_timeout,
                                first_round=first_round, result=result, train_config=train_config,
                                evaluate_config=ConfigRecord(dict(prep_config.items())),
                                evaluate_fn=evaluate_fn, after_round=after_round)
        trained = len(result.arrays) > 0
        final_arrays = result.arrays if trained else initial
        personalization = None
        if trained and stack.inner.personalizes:  # each site: the final global model beside its own
            config_rec = ConfigRecord({**dict(prep_config.items()), "server-round": cfg.num_rounds + 1})
            if stack.inner.job is not None:
                config_rec[JOB_KEY] = stack.inner.job
            personalization = {"method": cfg.strategy.personal, "rows": personal_rows(cfg, fed is not None),
                               **personal.evaluate_sites(grid, final_arrays, config_rec, cfg.strategy.round_timeout)}
        extra: dict[str, Any] = {"run_id": context.run_id, "status": "completed" if trained else "failed",
                                 "overrides": str(context.run_config.get("overrides", ""))}
        summary = stack.privacy.summary()
        if summary is not None:
            extra["privacy"] = summary
            spent = summary.get("epsilon_per_site", summary.get("epsilon"))
            log(INFO, "fedsilo: privacy (%s): epsilon %s at delta=%g", summary["mechanism"],
                {k: round(v, 3) for k, v in spent.items()} if isinstance(spent, dict) else f"{spent:.3f}",
                summary["delta"])
        if personalization is not None:
            extra["personalization"] = personalization
        if fed is not None:
            extra["preprocessing"] = {**fed.phase.to_dict(), "traffic": prep_traffic}
        participation = stack.record.to_dict()
        path = recorder.write(result, participation, final_arrays.to_torch_state_dict(), extra=extra,
                              model_file=None if stack.holds_plaintext_model else ENCRYPTED_MODEL_FILE)
        if fed is not None:
            model_path = write_artefact(out_dir, cfg, fed, final_arrays)
            log(INFO, "fedsilo: model with its preprocessing and schema in %s (fedsilo predict %s FILE)", model_path, out_dir)
        log(INFO, "fedsilo: results written to %s", path)
        if not trained:
            reasons = sorted({r.reason for rec in stack.record.rounds.values()
                              for r in ((rec.train.rejected or []) if rec.train else [])})
            raise RuntimeError(f"no site returned a usable update in any of {cfg.num_rounds} rounds; "
                               f"the model was never trained. Reasons: {reasons[:3]}")
        log(INFO, "fedsilo: final test %s", _fmt(recorder.server.get(cfg.num_rounds, {})))
        write_report(cfg, out_dir)
        if board is not None:
            board.finish(out_dir)
    finally:  # the tracker learns how the run ended (MLflow: FAILED unless finished)
        if board is not None:
            board.close()


def write_report(cfg: config.FedsiloConfig, out_dir: Path) -> None:
    """``report.md``/``report.html`` beside ``results.json`` (``report=false`` to skip), however the
    run was started: the ``fedsilo`` command, ``fedsilo deploy local`` or a Flower-native ``flwr run``.
    A report that cannot be written is a warning: the run itself succeeded."""
    if not cfg.report:
        return
    from app.reporting import report

    page, why = report.ensure(out_dir, rewrite=True)
    if page is not None:
        log(INFO, "fedsilo: report in %s", page)
    else:
        log(WARNING, "fedsilo: %s", why)
