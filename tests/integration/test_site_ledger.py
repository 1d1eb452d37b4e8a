"""privacy=dpsgd: the ledger each site keeps on its own disk (privacy/site_ledger.py).

Real ServerApp and ClientApp in one process (LocalGrid), each site with its own state folder.
The checks are the issue's: a reply lost after the site trained, a coordinator killed after
the sites trained a round but before its checkpoint (the round is replayed), and a replay
that comes out different; in each the sites' own ledgers never show a spend above target
and equal what Opacus' accountant computes, step by step, from the steps they record.
"""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import RDPAccountant

from app import client_app, server_app
from app.runtime.local_grid import LocalGrid
from app.server_app import CoordinatorCrash
from core.state import SiteStore
from privacy.accountant import PrivacyLedger
from privacy.dpsgd import BudgetExhausted, DPSGDParams, private_round
from privacy.site_ledger import Release, SiteLedger
from privacy.site_secret import SECRET_FILE, noise_seed
from tasks.training import LocalTrainConfig
from tests.conftest import DATA_DIR

TARGET = 4.0
DP = ["task=medical", "num_rounds=4", "strategy.fraction_evaluate=0", "privacy=dpsgd", f"privacy.target_epsilon={TARGET}"]


class LosingGrid(LocalGrid):
    """A grid that loses one site's training reply of one round after the site computed it."""

    def __init__(self, *args: Any, lose: tuple[int, int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lose, self.lost = lose, 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        out = []
        for msg in messages:
            reply = self._deliver(msg)
            rnd = msg.content.config_records.get("config", {}).get("server-round")  # type: ignore[union-attr]
            if msg.metadata.message_type == "train" and (rnd, msg.metadata.dst_node_id) == self.lose:
                self.lost += 1  # the site trained and replied; the reply never arrives
                continue
            out.append(reply)
        return out


def _run(overrides: list[str], out: Path, state: Path, node: dict[str, Any] | None = None,
         lose: tuple[int, int] | None = None) -> dict[str, Any]:
    run_config = {"overrides": shlex.join([*overrides, f"data_dir={DATA_DIR}"]), "output-dir": str(out)}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    node_config = {"state-dir": str(state), "dp-noise-seed": "the sites' own secret", **(node or {})}
    grid = (LosingGrid(client_app.app, 4, run_config, node_config=node_config, lose=lose) if lose
            else LocalGrid(client_app.app, 4, run_config, node_config=node_config))
    server_app.app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    if lose:
        assert grid.lost == 1  # type: ignore[attr-defined]
    return json.loads((out / "results.json").read_text())


def _ledgers(state: Path) -> dict[str, dict[str, Any]]:
    """Each site's own ledger file: one per data set, under ``<state-dir>/privacy/<site>-<rows digest>``."""
    from privacy.site_ledger import DATA_LEDGERS

    files = sorted(state.glob("*/*/dp-ledger.json"))
    assert {f.parent.parent.name for f in files} == {DATA_LEDGERS}, files
    return {f.parent.name.rsplit("-", 1)[0]: json.loads(f.read_text()) for f in files}


def _opacus_epsilon(releases: list[dict[str, Any]], delta: float = 1e-5) -> float:
    """Opacus' RDP accountant stepped once per recorded DP-SGD step."""
    acc = RDPAccountant()
    for r in releases:
        for _ in range(r["steps"]):
            acc.step(noise_multiplier=r["noise_multiplier"], sample_rate=r["sample_rate"])
    return float(acc.get_epsilon(delta=delta))


def _check_own_ledgers(state: Path, reported: dict[str, float]) -> dict[str, dict[str, Any]]:
    ledgers = _ledgers(state)
    assert set(ledgers) == {"cleveland", "hungarian", "switzerland", "va"}
    for site, doc in ledgers.items():
        eps = _opacus_epsilon(doc["releases"])
        assert eps <= TARGET, (site, eps)
        assert reported[site] == pytest.approx(eps, rel=1e-9), site  # the coordinator's figure is the site's
    return ledgers


@pytest.mark.slow
def test_a_lost_reply_is_in_the_sites_own_ledger(tmp_path: Path) -> None:
    """Round 2's reply of one hospital is lost after it trained: the coordinator never saw that
    spend, the site's own ledger has it, and every later figure the site reports includes it."""
    full = _run(DP, tmp_path / "full", tmp_path / "state-full")
    lossy = _run(DP, tmp_path / "lossy", tmp_path / "state-lossy", lose=(2, 1001))
    r2 = lossy["history"][1]["participation"]["privacy"]
    assert "hungarian" not in {label.split(" (")[0] for label in r2}  # the coordinator's copy misses it
    ledgers = _check_own_ledgers(tmp_path / "state-lossy", lossy["privacy"]["epsilon_per_site"])
    assert [r["round"] for r in ledgers["hungarian"]["releases"]] == [1, 2, 3, 4]
    # the coordinator's copy rebuilt from the replies it got would show 3 rounds; the site reports 4
    seen = PrivacyLedger("rdp")
    for h in lossy["history"]:
        for label, rec in h["participation"]["privacy"].items():
            if label.startswith("hungarian"):
                seen = seen.with_steps(rec["noise_multiplier"], rec["sample_rate"], rec["steps"])
    assert seen.epsilon(1e-5) < lossy["privacy"]["epsilon_per_site"]["hungarian"]
    assert lossy["privacy"]["epsilon_per_site"] == full["privacy"]["epsilon_per_site"]


def _crash_after_training(tmp_path: Path, resume_node: dict[str, Any],
                          resume_overrides: tuple[str, ...] = ()) -> tuple[dict, dict, Path]:
    """The coordinator dies after round 2's checkpoint, is resumed, trains round 3 and dies again;
    its round-3 checkpoint is lost, so it resumes from round 2's: the sites are asked for round 3 again."""
    state = tmp_path / "state"
    full = _run(DP, tmp_path / "full", tmp_path / "state-full")
    with pytest.raises(CoordinatorCrash, match="after round 2"):
        _run([*DP, "faults.crash_after_round=2"], tmp_path / "crash", state)
    shutil.copytree(tmp_path / "crash", tmp_path / "round2")
    with pytest.raises(CoordinatorCrash, match="after round 3"):
        _run([*DP, "faults.crash_after_round=3", f"resume={tmp_path / 'crash'}"], tmp_path / "crash3", state)
    assert all([r["round"] for r in doc["releases"]] == [1, 2, 3] for doc in _ledgers(state).values())
    resumed = _run([*DP, *resume_overrides, f"resume={tmp_path / 'round2'}"], tmp_path / "resumed", state,
                   node=resume_node)
    return full, resumed, state


@pytest.mark.slow
def test_a_replayed_round_after_a_coordinator_restart_costs_nothing_new(tmp_path: Path) -> None:
    """The replayed round has the same inputs, so each site's update is byte-identical: nothing
    new leaves the site, nothing is charged, and the run ends exactly as the uninterrupted one."""
    full, resumed, state = _crash_after_training(tmp_path, {})
    assert resumed["final"] == full["final"] and resumed["status"] == "completed"
    ledgers = _check_own_ledgers(state, resumed["privacy"]["epsilon_per_site"])
    for site, doc in ledgers.items():
        assert [r["round"] for r in doc["releases"]] == [1, 2, 3, 4], site
    assert resumed["privacy"]["epsilon_per_site"] == full["privacy"]["epsilon_per_site"]
    assert max(resumed["privacy"]["epsilon_per_site"].values()) > TARGET - 0.1  # the budget was planned for 4 rounds


@pytest.mark.slow
def test_a_replay_that_differs_is_charged_and_the_budget_holds(tmp_path: Path) -> None:
    """The sites come back with another noise secret, so the replayed round's update differs: it
    is a new release and is charged. With the budget planned for 4 rounds, the fifth release
    would pass the target: every site refuses it, by its own ledger. (The sites' policy allows a
    second release per round here; by default it refuses one: the next test.)"""
    _, resumed, state = _crash_after_training(tmp_path, {"dp-noise-seed": "a secret the sites changed"},
                                              ("site_policy.privacy.one_release_per_round=false",))
    ledgers = _check_own_ledgers(state, resumed["privacy"]["epsilon_per_site"])
    for site, doc in ledgers.items():
        assert [r["round"] for r in doc["releases"]] == [1, 2, 3, 3], site
        assert _opacus_epsilon(doc["releases"]) <= TARGET
    assert len(resumed["privacy"]["budget_exhausted"]) == 4
    assert all("privacy budget exhausted" in why for why in resumed["privacy"]["budget_exhausted"].values())


@pytest.mark.slow
def test_a_second_different_release_of_a_round_is_refused_by_the_default_policy(tmp_path: Path) -> None:
    """The same replay as above under the default site policy (one release per round): round 3
    comes out different, so every site refuses it, nothing is charged; round 4 goes on."""
    _, resumed, state = _crash_after_training(tmp_path, {"dp-noise-seed": "a secret the sites changed"})
    ledgers = _check_own_ledgers(state, resumed["privacy"]["epsilon_per_site"])
    for site, doc in ledgers.items():
        assert [r["round"] for r in doc["releases"]] == [1, 2, 3, 4], site
    rejected = next(h for h in resumed["history"] if h["round"] == 3)["participation"]["train"]["rejected"]
    assert len(rejected) == 4
    assert all("one release per round" in r["reason"] for r in rejected)


# ---- the ledger file and the noise secret, unit by unit ----------------------------------------------
def _round(ledger: SiteLedger, server_round: int, params: DPSGDParams, seed: int = 0) -> tuple[dict, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(64, 3), (torch.rand(64, 1) < 0.5).float()
    cfg = LocalTrainConfig(epochs=1, batch_size=16, lr=0.1)
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    stats, record = private_round(ctx, params, model, x, y, cfg, torch.Generator().manual_seed(seed),
                                  ledger=ledger, server_round=server_round)
    return dict(record), model


def test_the_ledger_file_is_written_before_release_and_replays_are_recognised(tmp_path: Path) -> None:
    params = DPSGDParams(sample_rate=0.25, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, target_epsilon=20.0,
                         accountant="rdp")
    store = SiteStore(tmp_path, "job1", "site-a")
    first, _ = _round(SiteLedger(store, "rdp"), 1, params)
    doc = json.loads((store.folder / "dp-ledger.json").read_text())
    assert [(r["round"], r["steps"]) for r in doc["releases"]] == [(1, 4)]
    again, _ = _round(SiteLedger(store, "rdp"), 1, params)  # the same round, the same inputs: a replay
    assert again["total_steps"] == first["total_steps"] == 4 and again["epsilon"] == first["epsilon"]
    other, _ = _round(SiteLedger(store, "rdp"), 1, params, seed=1)  # other randomness: a new release
    assert other["total_steps"] == 8 and other["epsilon"] > first["epsilon"]
    assert not list(store.folder.glob("*.tmp"))


def test_a_release_past_the_target_is_refused_by_the_sites_own_file(tmp_path: Path) -> None:
    store = SiteStore(tmp_path, "job1", "site-a")
    ledger = SiteLedger(store, "rdp")
    ledger.record(Release(1, 1.0, 0.25, 4000, "x", "y"))  # a large spend already on the site's disk
    params = DPSGDParams(sample_rate=0.25, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, target_epsilon=5.0,
                         accountant="rdp")
    with pytest.raises(BudgetExhausted, match="would take epsilon"):
        _round(SiteLedger(store, "rdp"), 2, params)
    assert len(SiteLedger(store, "rdp").releases) == 1


def test_a_replay_that_comes_out_different_is_refused_past_the_target(tmp_path: Path) -> None:
    """A recorded round asked again with the same inputs skips the check before training (a
    byte-identical replay costs nothing); if its update then differs from the recorded one it is a new
    release, and the check after training must refuse it when it would pass the target."""
    one = PrivacyLedger("rdp").with_steps(1.0, 0.25, 4).epsilon(1e-5)
    two = PrivacyLedger("rdp").with_steps(1.0, 0.25, 8).epsilon(1e-5)
    params = DPSGDParams(sample_rate=0.25, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5,
                         target_epsilon=(one + two) / 2, accountant="rdp")  # one round fits, a second does not
    first = SiteStore(tmp_path, "job1", "site-a")
    _round(SiteLedger(first, "rdp"), 1, params)
    recorded = json.loads((first.folder / "dp-ledger.json").read_text())["releases"][0]
    store = SiteStore(tmp_path, "job1", "site-b")  # the same round and inputs on record, another update
    SiteLedger(store, "rdp").record(Release(1, 1.0, 0.25, recorded["steps"], recorded["inputs"], "another update"))
    with pytest.raises(BudgetExhausted, match="would take epsilon"):
        _round(SiteLedger(store, "rdp"), 1, params)
    assert len(SiteLedger(store, "rdp").releases) == 1  # nothing recorded, nothing released


def test_a_damaged_ledger_file_is_refused_with_its_path(tmp_path: Path) -> None:
    store = SiteStore(tmp_path, "job1", "site-a")
    store.folder.mkdir(parents=True)
    (store.folder / "dp-ledger.json").write_text('{"version": 1, "releases": [{"round": 1}]')
    with pytest.raises(ValueError, match="dp-ledger.json: not valid JSON"):
        SiteLedger(store, "rdp")
    (store.folder / "dp-ledger.json").write_text('{"version": 1, "releases": [{"round": 1, "steps": 3}]}')
    with pytest.raises(ValueError, match="dp-ledger.json: release 0 is malformed"):
        SiteLedger(store, "rdp")


def test_the_coordinators_copy_can_only_raise_a_sites_ledger(tmp_path: Path) -> None:
    ledger = SiteLedger(SiteStore(tmp_path, "job1", "site-a"), "rdp")
    ledger.record(Release(1, 1.0, 0.25, 8, "x", "y"))
    assert not ledger.adopt(PrivacyLedger("rdp", [(1.0, 0.25, 4)]))  # fewer steps: ignored
    assert ledger.ledger().steps == 8
    assert ledger.adopt(PrivacyLedger("rdp", [(1.0, 0.25, 12)]))  # the site lost its own: take the larger copy
    assert SiteLedger(SiteStore(tmp_path, "job1", "site-a"), "rdp").ledger().steps == 12


def test_a_deployed_sites_noise_is_beyond_the_coordinators_prediction(tmp_path: Path) -> None:
    assert noise_seed({}, 42) == 42  # simulation: the public seed (reproducible runs)
    state = tmp_path / "site"
    s1 = noise_seed({"state-dir": str(state)}, 42)
    secret = (state / SECRET_FILE).read_bytes()
    assert len(secret) == 32 and (state / SECRET_FILE).stat().st_mode & 0o777 == 0o600
    assert s1 != 42 and noise_seed({"state-dir": str(state)}, 42) == s1  # kept: the site reproduces itself
    assert noise_seed({"state-dir": str(tmp_path / "other")}, 42) != s1   # another site, another secret
    assert noise_seed({"dp-noise-seed": "x"}, 42) == noise_seed({"dp-noise-seed": "x", "state-dir": str(state)}, 42)


def test_fedsilo_ledger_shows_a_sites_spend_from_its_own_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import ledger as ledger_cli

    params = DPSGDParams(sample_rate=0.25, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, target_epsilon=20.0,
                         accountant="rdp")
    store = SiteStore(tmp_path, "job1", "site-a")
    for rnd in (1, 2):
        record, _ = _round(SiteLedger(store, "rdp", params.delta, params.target_epsilon), rnd, params, seed=rnd)
    assert ledger_cli.main([str(tmp_path), "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert (entry["job"], entry["site"], entry["rounds"], entry["steps"]) == ("job1", "site-a", [1, 2], 8)
    assert entry["epsilon"] == pytest.approx(record["epsilon"], rel=1e-12) and entry["target_epsilon"] == 20.0
    assert entry["epsilon"] == pytest.approx(_opacus_epsilon(json.loads(Path(entry["file"]).read_text())["releases"]))
    assert ledger_cli.main([str(tmp_path)]) == 0 and "site-a" in capsys.readouterr().out
    (store.folder / "dp-ledger.json").write_text("{")
    assert ledger_cli.main([str(tmp_path)]) == 1
    assert str(store.folder / "dp-ledger.json") in capsys.readouterr().err
    assert ledger_cli.main([str(tmp_path / "nowhere")]) == 2


# ---- a coordinator that deviates (issue #33) -----------------------------------------------------------
def _trainer_round(state: Path, job: str, server_round: int, model: torch.nn.Module, limits: Any = None,
                   node: dict[str, Any] | None = None, target: float = 8.0) -> tuple[Any, dict[str, Any]]:
    """One DP-SGD round through the site's own trainer, as a deployed site runs it."""
    import tasks
    from app import config
    from core.replies import SiteRefusal
    from privacy.dpsgd import DPSGDTrainer

    cfg = config.compose(["task=medical", "privacy=dpsgd", f"privacy.target_epsilon={target}", f"data_dir={DATA_DIR}"])
    task = tasks.get("medical")(cfg.task, DATA_DIR)
    site = task.sites(cfg.partition, config.num_sites(cfg), cfg.seed)[0]
    node = {"state-dir": str(state), "dp-noise-seed": "the site's secret", "data-path": "own.npz"} if node is None else node
    ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    train_config = ConfigRecord({"server-round": server_round, "fedsilo-job": job})
    trainer = DPSGDTrainer(cfg.privacy, cfg.num_rounds, cfg.task.batch_size)
    try:
        _, records = trainer.train(task, model, site.train, 7, ctx, train_config, site.name, 1, None, None,
                                   SiteStore(state, job, site.name), limits)
    except SiteRefusal as refusal:
        return refusal, {}
    from privacy.dpsgd import REPLY_KEY

    return model, dict(records[REPLY_KEY])


def _model(shift: float = 0.0) -> torch.nn.Module:
    import tasks
    from app import config

    cfg = config.compose(["task=medical", f"data_dir={DATA_DIR}"])
    torch.manual_seed(0)
    model = tasks.get("medical")(cfg.task, DATA_DIR).build_model()
    with torch.no_grad():
        next(model.parameters()).add_(shift)
    return model


def test_a_round_resent_with_another_model_gets_fresh_noise_and_is_charged(tmp_path: Path) -> None:
    """Attack 4: the coordinator re-sends round 1 with a slightly different model. Before #33 the
    noise was the same (seeded from the secret, the run seed and the round), so the difference of
    the two updates was the noise-free difference. Now the noise is seeded from the inputs' digest."""
    from privacy.base import SiteLimits
    from privacy.site_ledger import digest_release

    loose = SiteLimits(one_release_per_round=False)
    a, rec_a = _trainer_round(tmp_path / "s", "job-1", 1, _model(), loose)
    b, rec_b = _trainer_round(tmp_path / "s", "job-1", 1, _model(1e-3), loose)
    # what the noise would be without it: the same round trained from both models with one generator
    same_a, _ = _trainer_round(tmp_path / "t", "job-1", 1, _model(), loose, node={"partition-id": 0})
    same_b, _ = _trainer_round(tmp_path / "t2", "job-1", 1, _model(1e-3), loose, node={"partition-id": 0})
    gap = [(pa - pb).detach() for pa, pb in zip(a.parameters(), b.parameters(), strict=True)]
    clean_gap = [(pa - pb).detach() for pa, pb in zip(same_a.parameters(), same_b.parameters(), strict=True)]
    # with shared noise the two gaps would be close (the noise cancels); with fresh noise they are far apart
    far = sum(float((g - c).norm()) for g, c in zip(gap, clean_gap, strict=True))
    near = sum(float(c.norm()) for c in clean_gap)
    assert far > 10 * near, (far, near)
    seeds = {noise_seed({"dp-noise-seed": "x"}, 7, digest_release(1, m, ("mech",))) for m in (_model(), _model(1e-3))}
    assert len(seeds) == 2
    assert rec_b["total_steps"] == 2 * rec_a["total_steps"]  # both releases charged
    # a byte-identical replay (same model, same round) is the same bytes: free, in any job
    c, rec_c = _trainer_round(tmp_path / "s", "job-2", 1, _model(), loose)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values(), strict=True))
    assert rec_c["data_epsilon"] == pytest.approx(rec_b["epsilon"])


def test_the_default_policy_refuses_a_second_release_of_a_round(tmp_path: Path) -> None:
    from core.replies import ReplyError, SiteRefusal
    from privacy.base import SiteLimits

    _trainer_round(tmp_path, "job-1", 1, _model(), SiteLimits(one_release_per_round=True))
    refusal, _ = _trainer_round(tmp_path, "job-1", 1, _model(1e-3), SiteLimits(one_release_per_round=True))
    assert isinstance(refusal, SiteRefusal) and refusal.code == ReplyError.POLICY
    assert "one release per round" in refusal.reason


def test_a_fresh_job_id_every_round_does_not_reset_the_sites_ledger(tmp_path: Path) -> None:
    """Attack 5: the ledger was filed under the coordinator's job id, so a new id was an empty ledger.
    Now a deployed site keeps one ledger per data set, across jobs, capped by its own policy."""
    from core.replies import SiteRefusal
    from privacy.base import SiteLimits
    from privacy.site_ledger import DATA_LEDGERS

    cap = SiteLimits(max_epsilon=5.0)
    spent = []
    for k in range(1, 30):
        out, rec = _trainer_round(tmp_path, f"job-{k}", 1, _model(k * 1e-3), cap)
        if isinstance(out, SiteRefusal):
            break
        spent.append(rec.get("data_epsilon", rec["epsilon"]))
    assert isinstance(out, SiteRefusal) and "max_epsilon 5" in out.reason, (spent, out)
    assert 1 < len(spent) < 29 and spent == sorted(spent) and spent[-1] <= 5.0
    files = list((tmp_path / DATA_LEDGERS).glob("*/dp-ledger.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    assert len({r["job"] for r in doc["releases"]}) == len(spent)  # every job listed inside one ledger
    from app.cli import ledger as ledger_cli

    (entry,) = ledger_cli.read(tmp_path)
    assert entry["scope"] == "data set" and len(entry["jobs"]) == len(spent)
    assert entry["epsilon"] == pytest.approx(spent[-1])


def test_dp_at_a_deployed_site_without_a_secret_of_its_own_is_refused(tmp_path: Path) -> None:
    from core.replies import ReplyError, SiteRefusal

    refusal, _ = _trainer_round(tmp_path, "job-1", 1, _model(), node={"data-path": "own.npz"})
    assert isinstance(refusal, SiteRefusal) and refusal.code == ReplyError.POLICY and "secret" in refusal.reason
    done, _ = _trainer_round(tmp_path, "job-1", 1, _model(), node={"data-path": "own.npz", "state-dir": str(tmp_path)})
    assert not isinstance(done, SiteRefusal)
    assert (tmp_path / SECRET_FILE).stat().st_mode & 0o777 == 0o600
