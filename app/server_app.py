"""fedsilo's ServerApp: a run plan composed once, then a call per phase.

:func:`main` reads like the run: the plan (:mod:`app.plan`: the config, the sites, the output
folder, composed once), the grid metered, a vertical federation's own protocols
(:mod:`app.vertical`) or the phases of :mod:`app.phases`: what must be known before round 1
(federated preprocessing for rows that stay at the sites), then a sum-based learner's program
or the torch learner's rounds (:func:`train`: the strategy stack of :mod:`app.composition`,
scored after each round, checkpointed, tracked), then the results (:func:`finish`).
Results go to the run config's ``output-dir`` (the ``fedsilo`` command sets it to Hydra's run
directory).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

import strategies
from app import composition, config, phases
from app.phases import Prepared, fmt
from app.plan import RunPlan
from app.reporting.results import ENCRYPTED_MODEL_FILE, Recorder
from app.support import checkpoint
from app.support.checkpoint import CoordinatorCrash
from app.support.traffic import MeteredGrid
from app.tracking import trackers
from core.records import PhaseRecord, RoundRecord
from core.state import JOB_KEY
from strategies import personal
from strategies.loop import run_rounds
from tasks.tabular import artefact

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured job and write results.json (and the report)."""
    torch.set_num_threads(1)
    plan = RunPlan.of(context)
    metered = phases.metered(grid, plan.num_sites)
    if plan.cfg.vertical.name != "none":  # parties with different columns: their own protocols (vertical/)
        from app import vertical

        vertical.serve(metered, context, plan.cfg, plan.out_dir)
        write_report(plan.cfg, plan.out_dir)
    elif not plan.learner.rounds:  # a sum-based learner: one protected-sum program
        phases.fit_by_sums(metered, plan)
        write_report(plan.cfg, plan.out_dir)
    else:
        finish(metered, plan, train(metered, plan, phases.prepare(metered, plan)))


def progress_line(server_round: int, num_rounds: int, rec: RoundRecord, recorder: Recorder,
                  federated: dict[str, Any], privacy_note: str = "") -> str:
    """One line a person can follow: round k/n, sites sampled/replied/failed, the round's
    metrics, its privacy figure, its time and traffic, and the time left at the mean pace so far."""
    part = rec.train or PhaseRecord()
    failed = len(part.rejected or [])
    sampled = "-" if part.sampled is None else part.sampled
    replied = "-" if part.replied is None else part.replied
    metrics = recorder.server.get(server_round, {})
    shown = f"test {fmt(metrics)}" if metrics else f"sites' validation {fmt(federated) or '-'} (encrypted model)"
    secs = recorder.seconds.get(server_round, 0.0)
    done = [s for r, s in recorder.seconds.items() if r > 0]
    left = (num_rounds - server_round) * (sum(done) / len(done)) if done else 0.0
    traffic = recorder.traffic.get(server_round, {})
    kb = (traffic.get("bytes_to_sites", 0) + traffic.get("bytes_from_sites", 0)) / 1024
    return (f"fedsilo round {server_round}/{num_rounds} | sites {sampled} sampled, {replied} replied, "
            f"{failed} failed | {shown}{privacy_note} | {secs:.1f} s, {kb:,.0f} KiB"
            + (f", about {left:.0f} s left" if server_round < num_rounds else ""))


def write_artefact(out_dir: Path, cfg: config.FedsiloConfig, plan: RunPlan, prepared: Prepared,
                   arrays: ArrayRecord) -> Path:
    """``model.fedsilo.npz``: the final model, the fitted preprocessing (or, under Paillier, the encrypted
    totals only a site can open) and the schema (:mod:`tasks.tabular.artefact`)."""
    task: Any = plan.task  # rows that stay at the sites (plan.task.federated_data)
    fitted = prepared.phase.preprocessor if prepared.phase is not None else None
    sealed = None
    if fitted is None:  # the coordinator holds only ciphertexts
        sealed = {k: ([bytes(b).hex() for b in v] if isinstance(v, list) and v and isinstance(v[0], bytes) else v)
                  for k, v in prepared.config.items()}
    meta = {"model": {"name": cfg.task.model, "hidden": list(cfg.task.hidden), "dropout": cfg.task.dropout,
                      "width": task.width, "outputs": task.outputs},
            **task.artefact_meta(),
            "preprocessor": None if fitted is None else fitted.to_dict(),
            "sealed": sealed, "aggregation": config.to_dict(cfg)["aggregation"], "encrypted": sealed is not None}
    return artefact.write(out_dir / artefact.FILE, {k: v.numpy() for k, v in arrays.items()}, meta)


def personal_rows(cfg: config.FedsiloConfig, own_data: bool) -> str:
    """Which rows each site scores the global and its personal model on (``personalization.rows``)."""
    if own_data:
        return "each site's own held-out test rows"
    if cfg.partition.name == "natural":
        return "each site's local test rows (its share of the task's test split)"
    return "each site's validation rows"


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


@dataclass
class Trained:
    """What the rounds left: the strategy stack, the recorder, the result and the configs the sites got."""

    prepared: Prepared
    stack: composition.CoordinatorStack
    recorder: Recorder
    result: Result
    initial: ArrayRecord
    board: Any


def train(grid: MeteredGrid, plan: RunPlan, prepared: Prepared) -> Trained:
    """The torch learner's rounds: the strategy stack, scored after each round, checkpointed and tracked."""
    cfg, task, n_sites, out_dir = plan.cfg, plan.task, plan.num_sites, plan.out_dir
    random.seed(cfg.seed)  # Flower samples sites with Python's random: seeded, and checkpointed, for reproducibility
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = task.build_model()
    initial = ArrayRecord(model.state_dict())
    stack = composition.coordinator(cfg, n_sites, initial)
    stack.inner.join_timeout = cfg.strategy.round_timeout
    if prepared.runner is not None:  # the federation was formed in the preprocessing phase: round 1 goes on with who is left
        stack.inner.min_available_nodes = stack.inner.min_train_nodes
    strategy = stack.strategy
    recorder = Recorder(cfg, n_sites, out_dir)
    log(INFO, "fedsilo: task=%s strategy=%s aggregation=%s privacy=%s partition=%s sites=%s rounds=%s",
        cfg.task.name, cfg.strategy.name, cfg.aggregation.name, cfg.privacy.name,
        cfg.partition.name, n_sites, cfg.num_rounds)
    if stack.evaluation_in_clear_warning:
        log(WARNING, "fedsilo: aggregation=%s protects the training updates only; federated evaluation "
            "replies (each site's validation counts, loss and AUC) still reach the server in the clear. "
            "Set strategy.fraction_evaluate=0 to keep them at the sites (the server's test-set "
            "evaluation is unaffected).", cfg.aggregation.name)
    evaluate_fn = phases.evaluation(plan, prepared, stack, grid, recorder, model)
    first_round, result, train_config = 1, None, ConfigRecord(dict(prepared.config.items()))
    if cfg.resume:
        first_round, result, initial = _resume(cfg, stack, recorder, train_config)
    board = trackers.open_tracker(cfg.logger, out_dir, cfg, config.to_dict(cfg), plan.run_id)

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
        if server_round == cfg.faults.crash_after_round:
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
                                evaluate_config=ConfigRecord(dict(prepared.config.items())),
                                evaluate_fn=evaluate_fn, after_round=after_round)
    except BaseException:  # the tracker learns how the run ended (MLflow: FAILED unless finished)
        if board is not None:
            board.close()
        raise
    return Trained(prepared, stack, recorder, result, initial, board)


def finish(grid: MeteredGrid, plan: RunPlan, done: Trained) -> None:
    """Personal models (if the strategy keeps them), results.json, the model file, the tracker's end."""
    cfg, stack, result, recorder, prepared, board = plan.cfg, done.stack, done.result, done.recorder, done.prepared, done.board
    own_rows = prepared.runner is not None
    try:
        trained = len(result.arrays) > 0
        final_arrays = result.arrays if trained else done.initial
        extra: dict[str, Any] = {"run_id": plan.run_id, "status": "completed" if trained else "failed",
                                 "overrides": plan.overrides}
        if trained and stack.inner.personalizes:  # each site: the final global model beside its own
            config_rec = ConfigRecord({**dict(prepared.config.items()), "server-round": cfg.num_rounds + 1})
            if stack.inner.job is not None:
                config_rec[JOB_KEY] = stack.inner.job
            extra["personalization"] = {"method": cfg.strategy.personal, "rows": personal_rows(cfg, own_rows),
                                        **personal.evaluate_sites(grid, final_arrays, config_rec,
                                                                  cfg.strategy.round_timeout)}
        summary = stack.privacy.summary()
        if summary is not None:
            extra["privacy"] = summary
            spent = summary.get("epsilon_per_site", summary.get("epsilon"))
            log(INFO, "fedsilo: privacy (%s): epsilon %s at delta=%g", summary["mechanism"],
                {k: round(v, 3) for k, v in spent.items()} if isinstance(spent, dict) else f"{spent:.3f}",
                summary["delta"])
        if prepared.phase is not None:
            extra["preprocessing"] = prepared.to_dict()
        path = recorder.write(result, stack.record.to_dict(), final_arrays.to_torch_state_dict(), extra=extra,
                              model_file=None if stack.holds_plaintext_model else ENCRYPTED_MODEL_FILE)
        if own_rows:
            model_path = write_artefact(plan.out_dir, cfg, plan, prepared, final_arrays)
            log(INFO, "fedsilo: model with its preprocessing and schema in %s (fedsilo predict %s FILE)", model_path,
                plan.out_dir)
        log(INFO, "fedsilo: results written to %s", path)
        if not trained:
            reasons = sorted({r.reason for rec in stack.record.rounds.values()
                              for r in ((rec.train.rejected or []) if rec.train else [])})
            raise RuntimeError(f"no site returned a usable update in any of {cfg.num_rounds} rounds; "
                               f"the model was never trained. Reasons: {reasons[:3]}")
        log(INFO, "fedsilo: final test %s", fmt(recorder.server.get(cfg.num_rounds, {})))
        write_report(cfg, plan.out_dir)
        if board is not None:
            board.finish(plan.out_dir)
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
