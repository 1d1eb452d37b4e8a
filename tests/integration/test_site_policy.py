"""A coordinator that deviates: the site's own policy and reading the run config as data (issue #33).

Every test sends the message a deviating coordinator would, through the real ClientApp
(``client_app.app``, its mods included), and asserts the refusal and that nothing leaked.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from aggregation.base import SUM_REQUEST
from aggregation.programs import GATHER_KEY, GATHER_MESSAGE
from app import client_app, config, site_guard, site_policy
from core.replies import ReplyError
from tests.conftest import DATA_DIR

HEART = ["task=tabular", "learner.name=torch",
         "task.schema=schemas/heart.yaml", "task.data=uci_heart_disease/sites", "partition=natural",
         "task.model=logreg"]
SCHEMA = DATA_DIR / "schemas" / "heart.yaml"


def _context(overrides: list[str], node: dict[str, Any]) -> Context:
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(),
                   run_config={"overrides": shlex.join(overrides)})


def _msg(message_type: str, records: dict[str, ConfigRecord] | None = None) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    return Message(RecordDict(records or {}), dst_node_id=7, message_type=message_type)


def _fingerprint() -> str:
    from tasks.tabular.task import TabularTask

    cfg = config.compose([*HEART, f"data_dir={DATA_DIR}"])
    return TabularTask(cfg.task, DATA_DIR).fingerprint()


def _vocab_request() -> Message:
    return _msg(GATHER_MESSAGE, {SUM_REQUEST: ConfigRecord({"program": "fedsilo.preprocessing", "what": "vocab",
                                                            "prep-fingerprint": _fingerprint()})})


def _deployed(tmp_path: Path, name: str = "va", **extra: Any) -> dict[str, Any]:
    site = tmp_path / f"{name}.csv"
    if not site.exists():
        shutil.copyfile(DATA_DIR / "uci_heart_disease" / "sites" / f"{name}.csv", site)
    return {"data-path": str(site), "schema-path": str(SCHEMA), "site-name": name, "partition-id": 3, **extra}


def _refused(reply: Message, code: ReplyError = ReplyError.POLICY) -> str:
    assert reply.has_error(), "the site answered a message its policy should refuse"
    assert reply.error.code == int(code), reply.error.reason
    return str(reply.error.reason)


# ---- 6. run-config overrides read the site's environment ------------------------------------------------
def test_an_interpolation_in_the_run_config_is_refused_and_the_environment_is_not_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSILO_TEST_SECRET", "s3cr3t-value")
    for overrides in ([*HEART, "task.name=${oc.env:FEDSILO_TEST_SECRET}"],
                      [*HEART, "task.lr=${oc.env:FEDSILO_TEST_SECRET,0.1}"]):
        reply = client_app.app(_vocab_request(), _context(overrides, _deployed(tmp_path)))
        reason = _refused(reply)
        assert "s3cr3t" not in reason and "interpolation" in reason
    # Hydra's own keys would point the site at config files of the coordinator's choosing
    reason = _refused(client_app.app(_vocab_request(), _context([*HEART, "hydra.searchpath=[file:///etc]"],
                                                                 _deployed(tmp_path))))
    assert "'hydra'" in reason


def test_a_deployed_site_reads_no_path_the_coordinator_sends(tmp_path: Path) -> None:
    # a coordinator-chosen schema file whose YAML error would quote one of its lines
    probe = tmp_path / "private.yaml"
    probe.write_text("password: hunter2\n  : : bad yaml [\n")
    node = _deployed(tmp_path)
    del node["schema-path"]
    reason = _refused(client_app.app(_vocab_request(), _context([*HEART, f"task.schema={probe}"], node)),
                      ReplyError.BAD_DATA)
    assert "hunter2" not in reason and "no schema of its own" in reason
    # with its own schema the site ignores the coordinator's path and answers from its own file
    reply = client_app.app(_vocab_request(), _context([*HEART, f"task.schema={probe}"], _deployed(tmp_path)))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    # data_dir: the site's own (node config data-dir, else its installation's); a probe for a folder changes nothing
    cfg = config.site_config({"overrides": shlex.join([*HEART, "data_dir=/nonexistent/probe"])}, _deployed(tmp_path))
    assert cfg.data_dir is None
    sim = config.site_config({"overrides": shlex.join([*HEART, f"data_dir={DATA_DIR}"])}, {"partition-id": 0})
    assert sim.data_dir == str(DATA_DIR)  # a simulated node is the operator's own process: its data_dir holds


# ---- 7. refusal reasons carry data -------------------------------------------------------------------
def test_a_refusal_names_file_column_and_row_never_a_value_or_an_id(tmp_path: Path) -> None:
    node = _deployed(tmp_path)
    path = Path(node["data-path"])
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    row = lines[5].split(",")
    row[header.index("chol")] = "SECRET-CELL-42"
    lines[5] = ",".join(row)
    path.write_text("\n".join(lines) + "\n")
    reason = _refused(client_app.app(_vocab_request(), _context([*HEART, f"data_dir={DATA_DIR}"], node)),
                      ReplyError.BAD_DATA)
    assert "SECRET-CELL-42" not in reason
    assert "va.csv" in reason and "'chol'" in reason and "row 6" in reason and "a value" in reason
    # a repeated patient id: the rows, never the id
    lines = (DATA_DIR / "uci_heart_disease" / "sites" / "va.csv").read_text().splitlines()
    lines[7] = ",".join([lines[3].split(",")[0], *lines[7].split(",")[1:]])
    path.write_text("\n".join(lines) + "\n")
    reason = _refused(client_app.app(_vocab_request(), _context([*HEART, "num_rounds=2"], node)), ReplyError.BAD_DATA)
    repeated = lines[3].split(",")[0]
    assert repeated not in reason and "rows 4 and 8" in reason, reason
    # the site's operator still sees the value, locally
    from tasks.tabular.table import SiteInputError, read
    from tasks.tabular.task import load_schema

    with pytest.raises(SiteInputError, match=repeated):
        read(path, load_schema(str(SCHEMA)))


# ---- 5. the coordinator sets the site's guarantee ------------------------------------------------------
def _policy(tmp_path: Path, text: str) -> str:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return str(path)


def test_the_site_policy_not_the_run_config_decides(tmp_path: Path) -> None:
    policy = _policy(tmp_path, "privacy: {required: dpsgd, max_epsilon: 4.0, max_delta: 1.0e-5, "
                               "min_noise_multiplier: 0.5}\naggregation: {allowed: [secagg], min_sites: 3}\n"
                               "max_rounds: 20\n")
    node = _deployed(tmp_path, **{site_policy.NODE_CONFIG_KEY: policy})
    base = [*HEART, "aggregation=secagg", "privacy=dpsgd", "privacy.target_epsilon=4.0", "num_rounds=5"]
    assert not client_app.app(_vocab_request(), _context(base, node)).has_error()
    cases = {
        "privacy.target_epsilon=1000000.0": "max_epsilon=4",
        "privacy.delta=0.01": "max_delta",
        "privacy.noise_multiplier=0.1": "min_noise_multiplier",
        "privacy=none": "requires privacy=dpsgd",
        "privacy=central": "requires privacy=dpsgd",
        "aggregation=plain": "aggregation=plain is not allowed",
        "num_rounds=500": "max_rounds=20",
        "task.auc_bins=16384": "evaluation.max_bins",
        "task.test_fraction=0.9": "evaluation.test_fraction",
    }
    for override, expected in cases.items():
        if override == "privacy=central":
            overrides = [*HEART, "privacy=central", "num_rounds=5"]
        elif override == "privacy=none":
            overrides = [*HEART, "aggregation=secagg", "privacy=none", "num_rounds=5"]
        else:
            overrides = [o for o in base if o.split("=")[0] != override.split("=")[0]] + [override]
        reason = _refused(client_app.app(_vocab_request(), _context(overrides, node)))
        assert expected in reason, (override, reason)
    # the run's own site_policy section is data for simulations only: a deployed site ignores it
    loose = [*base, "privacy.target_epsilon=1000000.0", "site_policy.privacy.max_epsilon=1.0e9"]
    assert "max_epsilon=4" in _refused(client_app.app(_vocab_request(), _context(loose, node)))
    # without a file a deployed site runs under the default policy, which bounds DP too
    plain_node = _deployed(tmp_path)
    reason = _refused(client_app.app(_vocab_request(), _context([*HEART, "privacy=dpsgd",
                                                                 "privacy.target_epsilon=1000000.0"], plain_node)))
    assert f"max_epsilon={site_policy.DEFAULT.privacy.max_epsilon:g}" in reason


def test_a_simulation_takes_the_runs_policy_for_every_site() -> None:
    cfg = config.compose(["task=medical", "privacy=dpsgd", "site_policy.privacy.max_epsilon=2.0"])
    policy = site_guard.policy_for(_context([], {"partition-id": 0, "num-partitions": 4}), cfg)
    assert policy.privacy.max_epsilon == 2.0
    assert any("max_epsilon=2" in p for p in site_guard.check_run(cfg, policy))


def test_a_policy_file_that_does_not_fit_is_a_clear_error(tmp_path: Path) -> None:
    for text, expected in (("privacy: {max_epsilon: -1}\n", "privacy.max_epsilon"),
                           ("privcy: {}\n", "privcy"),
                           ("apps: [other]\n", "apps"),
                           ("max_rounds: ${oc.env:HOME}\n", "interpolation"),
                           ("- a list\n", "mapping")):
        with pytest.raises(site_policy.PolicyError, match=expected):
            site_policy.load(_policy(tmp_path, text))
    node = _deployed(tmp_path, **{site_policy.NODE_CONFIG_KEY: str(tmp_path / "missing.yaml")})
    assert "cannot be read" in _refused(client_app.app(_vocab_request(), _context(HEART, node)))


def test_the_schema_the_policy_agreed_to(tmp_path: Path) -> None:
    node = _deployed(tmp_path, **{site_policy.NODE_CONFIG_KEY: _policy(tmp_path, f"schema_sha256: {_fingerprint()}\n")})
    assert not client_app.app(_vocab_request(), _context(HEART, node)).has_error()
    node = _deployed(tmp_path, **{site_policy.NODE_CONFIG_KEY: _policy(tmp_path, "schema_sha256: abc123\n")})
    assert "abc123" in _refused(client_app.app(_vocab_request(), _context(HEART, node)), ReplyError.BAD_DATA)


# ---- 7. the coordinator chooses bins and receives each site's own categories ---------------------------
def test_pooled_evaluation_and_vocabularies_stay_within_the_policy(tmp_path: Path) -> None:
    import json

    policy = _policy(tmp_path, "evaluation: {max_bins: 64, min_test_rows: 10}\nstatistics: {min_rows: 30}\n")
    node = _deployed(tmp_path, **{site_policy.NODE_CONFIG_KEY: policy})
    ctx = _context([*HEART, "task.auc_bins=64"], node)
    request = ConfigRecord({"prep-fingerprint": _fingerprint(), "program": "fedsilo.metrics", "what": "evaluate",
                            "bins": 1 << 20})
    reason = _refused(client_app.program_query(_msg("query.fedsilo_sum", {SUM_REQUEST: request}), ctx))
    assert "max_bins" in reason
    # discovered categories: only names the site holds in at least statistics.min_rows rows
    from tasks.tabular.table import MISSING_LEVEL, read
    from tasks.tabular.task import TabularTask, load_schema

    schema_file = tmp_path / "discovered.yaml"
    schema_file.write_text(SCHEMA.read_text().replace(
        "{name: restecg, type: categorical, categories: [0, 1, 2], drop_first: true}", "{name: restecg, type: categorical}"))
    node = {**node, "schema-path": str(schema_file)}
    task = TabularTask(config.compose([*HEART, f"data_dir={DATA_DIR}", f"task.schema={schema_file}"]).task, DATA_DIR)
    request = ConfigRecord({"prep-fingerprint": task.fingerprint(), "program": "fedsilo.preprocessing", "what": "vocab"})
    reply = client_app.app(_msg(GATHER_MESSAGE, {SUM_REQUEST: request}), _context([*HEART, "task.auc_bins=64"], node))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    sent = json.loads(str(reply.content[GATHER_KEY]["value"]))["restecg"]
    table = read(Path(node["data-path"]), load_schema(str(schema_file)))
    col = table.categorical["restecg"][~table.is_test]
    counts = {str(v): int((col == v).sum()) for v in set(col) if v != MISSING_LEVEL}
    assert sent == sorted(v for v, c in counts.items() if c >= 30)
    assert any(0 < c < 30 for c in counts.values()), counts  # the site does hold a rarer category: withheld
