"""The coordinator's phases of a run, each a function of the run plan (:mod:`app.plan`).

:func:`app.server_app.main` calls them in order: :func:`metered` (the grid, tuned and metered),
then :func:`prepare` (what must be known before round 1: for rows that stay at the sites, the
federated preprocessing program; for a bundled task, nothing), then either :func:`fit_by_sums`
(a sum-based learner: one protected-sum program) or the rounds of the torch learner, scored
after each round by :func:`evaluation` (the task's held-out test set in process, or the pooled
test-metrics program over the sites' own held-out rows).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid

import aggregation
from aggregation.programs import ProgramRunner
from app import config
from app.composition import CoordinatorStack
from app.plan import RunPlan
from app.reporting.results import RESULTS_FILE, Recorder, write_json_atomic
from app.support import checkpoint
from app.support.flower_tuning import fast_object_pulls
from app.support.traffic import MeteredGrid, deployed
from tasks.base import PooledTask, Split
from tasks.learners import SumLearner
from tasks.programs import PooledMetrics, PrepPhase, Preprocessing

PULL_INTERVAL = 0.005  # seconds between the server's polls for replies (simulation engine), small federations
SMALL_FEDERATION = 20
WAIT_SECONDS = 600.0
SUMMARY_KEYS = ("auc", "accuracy", "f1", "ks", "loss", "accuracy_site_mean")


def fmt(metrics: dict[str, float]) -> str:
    """The summary metrics of a line of the log."""
    return " ".join(f"{k}={metrics[k]:.4f}" for k in SUMMARY_KEYS if k in metrics)


def metered(grid: Grid, num_sites: int) -> MeteredGrid:
    """The grid, its polling tuned to the federation and every message metered (bytes and messages per round).

    Flower's in-memory grid (the simulation engine's) polls for replies every 0.1 s, a floor on every
    message round trip (secure aggregation makes four per round): small federations poll every 5 ms.
    Larger ones keep Flower's interval: a poll costs in proportion to the replies outstanding and
    competes with the engine's workers (at 1000 sites 5 ms cost 1.5x per round). A deployment's
    replies are polled fast by :class:`MeteredGrid` and object pulls retried after 20 ms, not 1 s."""
    if isinstance(getattr(grid, "pull_interval", None), float) and num_sites <= SMALL_FEDERATION:
        grid.pull_interval = min(grid.pull_interval, PULL_INTERVAL)  # type: ignore[attr-defined]
    if deployed(grid):
        fast_object_pulls()
    return MeteredGrid(grid)


def wait_for_nodes(grid: Grid, count: int, timeout: float = WAIT_SECONDS, minimum: int = 2) -> list[int]:
    """The connected nodes, once ``count`` are there, or after ``timeout`` seconds if at least ``minimum``
    are (a site that never comes does not stall the federation); else RuntimeError naming how many came.
    No random draw: the run's RNG stays untouched."""
    t0 = time.monotonic()
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() - t0 > timeout:
            if len(nodes) >= minimum:
                log(WARNING, "fedsilo: %s of %s sites connected within %g s; going on with them", len(nodes), count,
                    timeout)
                return nodes
            raise RuntimeError(f"only {len(nodes)} of {count} sites connected within {timeout:g} s (at least "
                               f"{minimum} are needed)")
        time.sleep(0.5)
    return nodes


def runner(grid: Grid, plan: RunPlan) -> ProgramRunner:
    """A runner of protected-sum programs under the run's aggregation option, once the sites are there."""
    cfg = plan.cfg
    summer = aggregation.get(cfg.aggregation.name).summer(cfg.aggregation, cfg.strategy.round_timeout)
    return ProgramRunner(summer, grid, wait_for_nodes(grid, plan.num_sites, cfg.strategy.round_timeout))


@dataclass
class Prepared:
    """What the run knows before round 1."""

    config: ConfigRecord = field(default_factory=ConfigRecord)  # keys every later message carries (prep-*)
    runner: ProgramRunner | None = None  # the sites' programs (rows that stay at the sites)
    phase: PrepPhase | None = None       # what the preprocessing program learned and spent
    traffic: dict[str, Any] | None = None
    test: Split | None = None            # a bundled task's held-out test set (the coordinator scores on it)

    def to_dict(self) -> dict[str, Any] | None:
        """The ``preprocessing`` section of results.json (None for a bundled task)."""
        return None if self.phase is None else {**self.phase.to_dict(), "traffic": self.traffic}


def prepare(grid: MeteredGrid, plan: RunPlan) -> Prepared:
    """Rows that stay at the sites: the federated preprocessing program; a bundled task: its test set."""
    task = plan.task
    if not plan.learner.rounds:
        return Prepared()
    if not task.federated_data:  # a bundled task: its test set, loaded before the run's RNGs are seeded
        return Prepared(test=cast(PooledTask, task).data().test)
    run = runner(grid, plan)
    t0 = time.monotonic()
    program = Preprocessing(cast(Any, task))
    phase: PrepPhase = run.run(program)
    phase.seconds = time.monotonic() - t0
    log(INFO, "fedsilo preprocessing: statistics of %s sites combined (%s) in %.1f s", phase.sites, run.summer.learns,
        phase.seconds)
    return Prepared(ConfigRecord(dict(program.state)), run, phase, grid.take().as_dict())


Evaluate = Callable[[int, ArrayRecord], MetricRecord | None]


def evaluation(plan: RunPlan, prepared: Prepared, stack: CoordinatorStack, grid: Grid, recorder: Recorder,
               model: Any) -> Evaluate:
    """How the global model is scored after each round (and once before): the sites' own held-out rows
    pooled under the run's protection (rows at the sites), else the task's test set here (a bundled
    task; under Paillier the coordinator holds ciphertexts only and the sites' evaluation counts)."""
    cfg, task = plan.cfg, plan.task

    def record(server_round: int, metrics: dict[str, float]) -> MetricRecord:
        recorder.record_server(server_round, metrics)
        if server_round == 0:
            log(INFO, "fedsilo round 0/%s (initial model) | test %s", cfg.num_rounds, fmt(metrics))
        return MetricRecord({k: float(v) for k, v in metrics.items() if np.isfinite(v)})

    if prepared.runner is not None:
        run = prepared.runner
        recorder.test_source = (f"sites' held-out test rows, pooled by aggregation={cfg.aggregation.name} "
                                f"(the coordinator learns {run.summer.learns})")
        outgoing = getattr(stack.strategy, "outgoing", None)  # the form the sites receive (e.g. Paillier's split)

        def pooled(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            sent = outgoing(server_round, arrays, run.nodes, grid) if callable(outgoing) else arrays
            return record(server_round, run.run(PooledMetrics(cast(Any, task), sent, dict(prepared.config.items()))))

        return pooled
    pooled_task, test = cast(PooledTask, task), prepared.test  # a bundled task: its test set is here
    assert test is not None

    def held_out(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if not stack.holds_plaintext_model and server_round > 0:
            recorder.record_server(server_round, {})
            return None
        model.load_state_dict(arrays.to_torch_state_dict())
        return record(server_round, pooled_task.evaluate(model, test))

    return held_out


def fit_by_sums(grid: MeteredGrid, plan: RunPlan) -> dict[str, Any]:
    """A sum-based learner: its program under the run's aggregation option; results.json written."""
    cfg = plan.cfg
    learner = cast(SumLearner, plan.learner)
    t0 = time.monotonic()
    run = runner(grid, plan)
    program = learner.program(plan.task, dict(cfg.learner.options))
    if cfg.resume:
        program.restore(checkpoint.resumable_learner(str(cfg.resume), config.to_dict(cfg)))
        log(INFO, "fedsilo: learner=%s resumes from %s", learner.name, cfg.resume)

    def progress(point: dict[str, Any]) -> None:  # after each resumable point (e.g. a round of trees)
        if cfg.checkpoint:
            checkpoint.save_learner(plan.out_dir, config.to_dict(cfg), point)
        if point.get("round") == cfg.faults.crash_after_round:
            raise checkpoint.CoordinatorCrash(f"fault injection: the coordinator dies after round {point['round']} "
                                              f"(faults.crash_after_round); resume with: fedsilo resume={plan.out_dir}")

    outcome = run.run(program, progress)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    files = learner.save(outcome, plan.out_dir)
    payload = {"kind": "learner", "config": config.to_dict(cfg), "sites": plan.num_sites, "run_id": plan.run_id,
               "status": "completed", "overrides": plan.overrides,
               "learner": {"name": learner.name, "coordinator_learns": run.summer.learns, **learner.results(outcome),
                           "files": files},
               "timing": {"total_seconds": time.monotonic() - t0}, "traffic": grid.take().as_dict()}
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(plan.out_dir / RESULTS_FILE, payload)
    log(INFO, "fedsilo: learner=%s done (%s sums); results written to %s", learner.name, run.sum_id,
        plan.out_dir / RESULTS_FILE)
    return payload
