"""Server optimizers, SCAFFOLD, FedNova and personalization in real federated runs (the
ServerApp and ClientApp in process): they compose with secure aggregation and with
checkpoint/resume, site state stays at the sites, and personal models are reported per site."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tasks
from app import config
from app.reporting import compare, report
from app.runtime.local_grid import run_inprocess
from app.server_app import CoordinatorCrash
from app.support import checkpoint
from core.state import SiteStore, default_root
from strategies import personal, scaffold
from tests.conftest import DATA_DIR

MEDICAL = ["task=medical", "num_rounds=4", "report=false"]


def _metric_gap(a: dict, b: dict) -> float:
    keys = [k for k in a if isinstance(a[k], float) and isinstance(b.get(k), float) and np.isfinite(a[k])]
    assert len(keys) > 10
    return max(abs(a[k] - b[k]) for k in keys)


SLOW = pytest.mark.slow


@pytest.mark.parametrize("strategy", [
    pytest.param(["strategy=fedyogi"], id="fedyogi"),
    pytest.param(["strategy=scaffold"], id="scaffold"),
    pytest.param(["strategy=fednova", "strategy.local_epochs=[1,3]"], id="fednova-uneven-work", marks=SLOW),
    pytest.param(["strategy=ditto"], id="ditto", marks=SLOW),
    pytest.param(["strategy=fedprox", "strategy.server_opt=adam", "strategy.server_lr=0.05"], id="fedprox+fedadam",
                 marks=SLOW),
])
def test_new_strategies_under_secagg_match_plain_aggregation(tmp_path: Path, strategy: list[str]) -> None:
    """The same seed under secure aggregation ends within 1e-4 of plain aggregation (SecAgg's
    quantisation is the only difference): the optimizer steps on the unmasked mean, and the side
    values (control variates, normalizers) travel inside the same masked vector."""
    plain = run_inprocess([*MEDICAL, *strategy], tmp_path / "plain")
    secure = run_inprocess([*MEDICAL, *strategy, "aggregation=secagg"], tmp_path / "secagg")
    assert plain["status"] == secure["status"] == "completed"
    assert _metric_gap(plain["final"], secure["final"]) < 1e-4
    if "strategy=ditto" in strategy:  # Ditto's global model is FedAvg's; its personal models differ
        assert plain["personalization"]["mean"]["personal"] != plain["personalization"]["mean"]["global"]
    else:
        fedavg = run_inprocess(MEDICAL, tmp_path / "fedavg")
        assert _metric_gap(plain["final"], fedavg["final"]) > 1e-3  # and the strategy did change the model
    if "personalization" in plain:
        for site, s in plain["personalization"]["sites"].items():
            for which in ("global", "personal"):
                other = secure["personalization"]["sites"][site][which]
                assert max(abs(v - other[k]) for k, v in s[which].items()) < 1e-4


@pytest.mark.parametrize("strategy", [
    pytest.param(["strategy=fedyogi"], id="fedyogi", marks=SLOW),
    pytest.param(["strategy=scaffold"], id="scaffold", marks=SLOW),
    pytest.param(["strategy=fednova", "strategy.stragglers=0.5"], id="fednova-stragglers", marks=SLOW),
    pytest.param(["strategy=ditto"], id="ditto"),
    pytest.param(["strategy=scaffold", "aggregation=secagg", "strategy.personal=finetune"],
                 id="scaffold-secagg-finetune", marks=SLOW),
])
def test_resumed_run_equals_the_uninterrupted_one(tmp_path: Path, strategy: list[str]) -> None:
    """The optimizer's moments and SCAFFOLD's c come back from the checkpoint; the sites' c_i and
    personal models from their own state folders, found again under the checkpoint's job id."""
    full = run_inprocess([*MEDICAL, *strategy], tmp_path / "full")
    with pytest.raises(CoordinatorCrash):
        run_inprocess([*MEDICAL, *strategy, "faults.crash_after_round=2"], tmp_path / "crash")
    resumed = run_inprocess([*MEDICAL, *strategy, f"resume={tmp_path / 'crash'}"], tmp_path / "resumed")
    assert resumed["final"] == full["final"]
    assert [h["server"] for h in resumed["history"]] == [h["server"] for h in full["history"]]
    assert resumed.get("personalization") == full.get("personalization")
    job = checkpoint.load(tmp_path / "crash").strategy.get("job")
    if "scaffold" in str(strategy) or "ditto" in str(strategy):
        assert job and (default_root() / job).is_dir()  # the sites' state of the crashed run, used again


def test_scaffold_global_control_variate_is_the_mean_of_the_sites_own(tmp_path: Path) -> None:
    """Full participation: c = sum_i p_i c_i after every round. The coordinator's c (from the
    checkpoint) equals the row-weighted mean of the c_i each site keeps in its own folder."""
    res = run_inprocess([*MEDICAL, "num_rounds=3", "strategy=scaffold"], tmp_path / "run")
    state = checkpoint.load(tmp_path / "run").strategy
    c = {k: np.asarray(vals, dtype=dtype).reshape(shape) for k, (shape, dtype, vals) in state["scaffold_c"].items()}
    cfg = config.compose([*MEDICAL, "strategy=scaffold"])
    task = tasks.get("medical")(cfg.task, DATA_DIR)
    rows = {s.name: len(s.train) for s in task.sites(cfg.partition, config.num_sites(cfg), cfg.seed)}
    assert res["status"] == "completed" and len(rows) == 4
    total = sum(rows.values())
    mean = {k: sum(rows[name] / total * SiteStore(default_root(), state["job"], name).load(scaffold.STATE, 99)[k]
                   .double().numpy() for name in rows) for k in c}
    for k in c:
        assert np.abs(c[k]).max() > 1e-3  # not trivially zero
        np.testing.assert_allclose(c[k], mean[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("over", "keys", "shared"), [
    pytest.param(["task=finance", "num_sites=3", "num_rounds=2", "strategy.personal=fedper", "task.hidden=[8]"],
                 personal.head_keys, "net.0.weight", id="fedper-head"),
    pytest.param(["task=medical_imaging", "num_sites=2", "num_rounds=1", "task.local_epochs=1",
                  "strategy.personal=fedbn"], personal.norm_keys, "features.0.weight", id="fedbn-groupnorm", marks=SLOW),
])
def test_personal_layers_never_reach_the_coordinator(tmp_path: Path, over: list[str], keys: Any, shared: str) -> None:
    """Every site sends its received personal layers back: the global ones never move from the
    initial model, while each site's own (in its state folder) do; the shared layers are trained."""
    res = run_inprocess([*over, "report=false"], tmp_path / "run")
    ck = checkpoint.load(tmp_path / "run")
    final = {k: v.numpy() for k, v in ck.arrays.items()}
    cfg = config.compose(over)
    task = tasks.get(cfg.task.name)(cfg.task, DATA_DIR)
    torch.manual_seed(cfg.seed)  # as the ServerApp draws the public initial model
    initial = task.build_model().state_dict()
    mine = keys(task.build_model())
    for k in mine:  # equal up to the weighted mean's float32 rounding of identical values
        np.testing.assert_allclose(final[k], initial[k].numpy(), rtol=0, atol=1e-6)
    assert not np.allclose(final[shared], initial[shared].numpy(), atol=1e-4)
    own = SiteStore(default_root(), ck.strategy["job"], "site-0").load(personal.PERSONAL, 99)
    assert own is not None and set(own) == set(mine)
    assert max(float((own[k] - initial[k]).abs().max()) for k in mine) > 1e-3  # the site's own layers did learn
    assert len(res["personalization"]["sites"]) == config.num_sites(cfg)


def test_personalization_is_reported_per_site_beside_the_global_model(tmp_path: Path) -> None:
    res = run_inprocess([*MEDICAL, "num_rounds=5", "strategy=ditto", "strategy.ditto_lambda=0.01",
                         "strategy.personal_epochs=2", "strategy.personal_select=false"], tmp_path / "run")
    p = res["personalization"]
    assert p["method"] == "ditto" and "local test rows" in p["rows"]
    assert set(p["sites"]) == {"cleveland", "hungarian", "switzerland", "va"}
    final = res["history"][-1]["server"]
    for site, s in p["sites"].items():
        assert s["personalized"] is True
        assert s["global"]["accuracy"] == pytest.approx(final[f"accuracy_{site}"], abs=1e-12)  # the same rows
        assert s["personal"] != s["global"]
    assert p["mean"]["global"]["accuracy"] == pytest.approx(final["accuracy_site_mean"], abs=1e-12)
    assert sum(s["rows"] for s in p["sites"].values()) == int(final["num_examples"])
    md = "\n".join(report.to_markdown("r", report.sections(tmp_path / "run", res, n_boot=10)).splitlines())
    assert "## Personalization" in md and "cleveland" in md and "(global / personal)" in md
    head, rows = compare.table(compare.find_runs([tmp_path / "run"]))
    assert "site mean accuracy (global / personal)" in head and "/" in rows[0][head.index(
        "site mean accuracy (global / personal)")]


@SLOW
def test_a_site_keeps_its_personal_model_only_where_its_validation_rows_prefer_it(tmp_path: Path) -> None:
    """Fine-tuning for many epochs helps Switzerland (46 patients, mostly positive) and hurts
    others; with personal_select each site compares on its own validation rows and keeps the better."""
    over = [*MEDICAL, "strategy.personal=finetune", "strategy.personal_epochs=20", "task.lr=0.3"]
    free = run_inprocess([*over, "strategy.personal_select=false"], tmp_path / "free")["personalization"]
    chosen = run_inprocess(over, tmp_path / "chosen")["personalization"]
    kept = [name for name, s in chosen["sites"].items() if s["personalized"]]
    assert 0 < len(kept) < 4, chosen["sites"]  # a real choice on this data: some sites keep it, some do not
    for name, s in chosen["sites"].items():
        raw = free["sites"][name]
        g, p = s["validation"]["global"]["loss"], raw["validation"]["personal"]["loss"]
        if s["personalized"]:
            assert p <= g and s["personal"] == raw["personal"]
        else:
            assert p > g and s["personal"] == s["global"] and s["personal_not_kept"] == raw["personal"]


@SLOW
@pytest.mark.parametrize("layer", [["strategy.robust=median"], ["privacy=central", "privacy.noise_multiplier=0.3"]],
                         ids=["median", "central-dp"])
def test_server_optimizer_steps_on_a_robust_or_private_aggregate(tmp_path: Path, layer: list[str]) -> None:
    """FedYogi over the median and over central DP's noised mean: the runs complete, the optimizer changes
    the model the layer alone gives, and central DP still accounts every release."""
    alone = run_inprocess([*MEDICAL, *layer], tmp_path / "alone")
    yogi = run_inprocess([*MEDICAL, *layer, "strategy=fedyogi"], tmp_path / "yogi")
    assert yogi["status"] == "completed" and _metric_gap(alone["final"], yogi["final"]) > 1e-3
    if "privacy=central" in layer:
        assert yogi["privacy"]["releases"] == 4 and yogi["privacy"]["epsilon"] == alone["privacy"]["epsilon"]


@SLOW
def test_personal_models_under_paillier_match_plain_aggregation(tmp_path: Path) -> None:
    """FedPer under Paillier: the received head goes back encrypted, the final per-site evaluation
    opens the encrypted global model at each site, and every figure equals plain aggregation's
    within Paillier's fixed-point encoding."""
    import json
    import shlex

    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from aggregation.paillier import keys
    from app import client_app, server_app
    from app.runtime.local_grid import LocalGrid

    key_pair, public = keys.generate(tmp_path / "keys")
    over = ["task=finance", "num_sites=3", "num_rounds=2", "report=false", "strategy.personal=fedper",
            "task.hidden=[8]", "strategy.personal_select=false"]
    run_config = {"overrides": shlex.join([*over, "aggregation=paillier", f"aggregation.public_key={public}",
                                           f"data_dir={DATA_DIR}"]), "output-dir": str(tmp_path / "paillier")}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    grid = LocalGrid(client_app.app, 3, run_config, node_config={"paillier-keypair": str(key_pair)})
    server_app.app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    encrypted = json.loads((tmp_path / "paillier" / "results.json").read_text())["personalization"]
    plain = run_inprocess(over, tmp_path / "plain")["personalization"]
    assert set(encrypted["sites"]) == set(plain["sites"]) == {"site-0", "site-1", "site-2"}
    for site, s in plain["sites"].items():
        for which in ("global", "personal"):
            for k, v in s[which].items():
                assert abs(v - encrypted["sites"][site][which][k]) < 1e-4, (site, which, k)


@SLOW
def test_scaffold_and_ditto_train_under_dpsgd(tmp_path: Path) -> None:
    """SCAFFOLD's correction is a term of the objective, so DP-SGD's clipped, noised steps carry it;
    every site's ledger still accounts every step and the control variate moves."""
    res = run_inprocess([*MEDICAL, "num_rounds=2", "strategy=scaffold", "strategy.personal=ditto", "privacy=dpsgd"],
                        tmp_path / "run")
    assert res["status"] == "completed" and max(res["privacy"]["epsilon_per_site"].values()) > 0
    c = checkpoint.load(tmp_path / "run").strategy["scaffold_c"]
    assert max(abs(v) for _, _, vals in c.values() for v in vals) > 1e-4
    assert all(s["personalized"] or s["personal"] == s["global"] for s in res["personalization"]["sites"].values())
