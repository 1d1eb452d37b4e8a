"""Vertical runs through the real ServerApp and ClientApp (in process): PSI, hetero LR with
Paillier, split NN, scoring, reproducibility and the errors a consortium meets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Message, RecordDict

from app import config
from app.runtime.local_grid import LocalGrid, run_inprocess
from tests.conftest import DATA_DIR
from vertical.coordinator import VerticalError

SRC = DATA_DIR / "credit_vertical"
NN = ("vertical.epochs=3", "vertical.batch_size=64", "vertical.lr=0.01")


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        r = list(csv.reader(f))
    return r[0], r[1:]


def _write(path: Path, head: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(head)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return small_files(tmp_path_factory.mktemp("vertical"))


def small_files(d: Path) -> dict[str, Path]:
    """600 bank customers, 500 platform customers (400 common), 300 held-out customers at both."""
    d.mkdir(parents=True, exist_ok=True)
    bh, bank = _rows(SRC / "bank.csv")
    ph, plat = _rows(SRC / "platform.csv")
    bank_ids, plat_ids = {r[0] for r in bank}, {r[0] for r in plat}
    common = sorted(bank_ids & plat_ids)[:400]
    bank_only = [r for r in bank if r[0] not in plat_ids][:200]
    plat_only = [r for r in plat if r[0] not in bank_ids][:100]
    bi, pi = {r[0]: r for r in bank}, {r[0]: r for r in plat}
    out = {"bank": _write(d / "bank.csv", bh, [bi[c] for c in common] + bank_only),
           "platform": _write(d / "platform.csv", ph, [pi[c] for c in common][::-1] + plat_only)}
    tbh, tb = _rows(SRC / "bank_test.csv")
    tph, tp = _rows(SRC / "platform_test.csv")
    out["bank_test"] = _write(d / "bank_test.csv", tbh, tb[:300])
    out["platform_test"] = _write(d / "platform_test.csv", tph, tp[:300])
    out["dir"] = d
    return out


def overrides(small: dict[str, Path], model: str, *extra: str) -> list[str]:
    return [f"vertical={model}", f"vertical.parties.0.data={small['bank']}",
            f"vertical.parties.0.test={small['bank_test']}", f"vertical.parties.1.data={small['platform']}",
            f"vertical.parties.1.test={small['platform_test']}", *extra]


@pytest.mark.slow
def test_hetero_lr_trains_and_matches_plain_taylor_gradient_descent(small, tmp_path):
    res = run_inprocess(overrides(small, "hetero_lr", "vertical.epochs=3"), tmp_path)
    v = res["vertical"]
    assert res["status"] == "completed" and v["intersection"] == {"train": 400, "test": 300}
    aucs = [e["auc"] for e in v["epochs"]]
    assert aucs[-1] > 0.68 and len(aucs) == 3
    # the same model trained in the clear (the protocol's fixed point, rows in the protocol's order)
    from vertical.data import load_party

    bank = load_party("bank", "active", small["bank"], DATA_DIR / "schemas/credit_vertical_bank.yaml")
    plat = load_party("platform", "passive", small["platform"], DATA_DIR / "schemas/credit_vertical_platform.yaml")
    with np.load(tmp_path / "parties" / "bank.vertical.npz") as z:
        w_bank = z["w"]
    with np.load(tmp_path / "parties" / "platform.vertical.npz") as z:
        w_plat = z["w"]
    import hashlib

    common = sorted(set(bank.ids) & set(plat.ids), key=lambda i: hashlib.sha256(f"0|{i}".encode()).digest())
    bi, pi = {k: i for i, k in enumerate(bank.ids)}, {k: i for i, k in enumerate(plat.ids)}
    clip = 8.0  # the protocol's fixed point clips features at +-8 standard deviations (RowCodec.x_clip)
    xa = np.column_stack([np.clip(bank.x[[bi[c] for c in common]], -clip, clip), np.ones(len(common))])
    xb, y = np.clip(plat.x[[pi[c] for c in common]], -clip, clip), bank.y[[bi[c] for c in common]]
    wa, wb = np.zeros(xa.shape[1]), np.zeros(xb.shape[1])
    for epoch in range(1, 4):
        idx = np.random.default_rng([0, epoch]).permutation(len(common))
        r = np.clip(0.5 + xa[idx] @ wa / 4 - y[idx], -2, 2) + np.clip(xb[idx] @ wb / 4, -2, 2)
        wa, wb = wa - 0.5 * xa[idx].T @ r / len(idx), wb - 0.5 * xb[idx].T @ r / len(idx)
    assert np.abs(w_bank - wa).max() < 1e-3 and np.abs(w_plat - wb).max() < 1e-3  # fixed point only
    # nothing the coordinator relays holds an id: results name sizes and bytes only
    text = (tmp_path / "results.json").read_text()
    assert v["bytes"]["platform->bank"] > 0 and v["bytes"]["bank->platform"] > 0
    assert all(f'"{c}"' not in text for c in common[:50])


@pytest.mark.slow
def test_split_nn_is_reproducible_and_scores_with_saved_parts(small, tmp_path):
    one = run_inprocess(overrides(small, "split_nn", *NN), tmp_path / "a")
    two = run_inprocess(overrides(small, "split_nn", *NN), tmp_path / "b")
    assert [e["auc"] for e in one["vertical"]["epochs"]] == [e["auc"] for e in two["vertical"]["epochs"]]
    assert one["final"]["auc"] > 0.6
    scored = run_inprocess(overrides(small, "split_nn", "vertical.mode=score", f"vertical.model_dir={tmp_path / 'a'}",
                                     f"vertical.score=[{small['bank_test']},{small['platform_test']}]"),
                           tmp_path / "score")
    assert scored["status"] == "completed"
    assert scored["final"]["auc"] == pytest.approx(one["final"]["auc"], abs=1e-9)
    lines = (tmp_path / "a" / "parties" / "bank.scores.csv").read_text().splitlines()
    assert lines[0] == "id,score" and len(lines) == 301


@pytest.mark.slow
def test_split_nn_protection_costs_accuracy_and_reports_epsilon(small, tmp_path):
    res = run_inprocess(overrides(small, "split_nn", "vertical.epochs=2", "vertical.batch_size=64",
                                  "vertical.protection=both", "vertical.noise_multiplier=2.0"), tmp_path)
    p = res["privacy"]
    assert p["epsilon_features_per_row"] == pytest.approx(p["epsilon_label_per_row"])
    assert 0 < p["epsilon_features_per_row"] < 10
    assert "noised embeddings" in res["visibility"]["active"]


def test_too_small_an_intersection_is_refused(small, tmp_path):
    with pytest.raises(VerticalError, match="400 train customers in common, fewer than vertical.min_intersection=1000"):
        run_inprocess(overrides(small, "split_nn", "vertical.min_intersection=1000"), tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "failed"


def test_coordinator_refuses_a_party_with_another_schema_or_role():
    from vertical.config import VerticalConfig
    from vertical.coordinator import Session, hello

    class Replies:  # what the parties' hello replies say (the relay itself is exercised by the runs above)
        def __init__(self, replies):
            self.replies = replies

        def hello(self, payload):
            return self.replies

    ok = {"bank": {"role": "active", "fingerprint": "f1"}, "platform": {"role": "passive", "fingerprint": "f2"}}
    roles = {"bank": "active", "platform": "passive"}
    s = Session(Replies(ok), VerticalConfig(name="split_nn"), 0)
    hello(s, {"bank": "f1", "platform": "f2"}, roles, "d")
    assert (s.active, s.passive) == ("bank", ["platform"])
    with pytest.raises(VerticalError, match="party platform reads its file with schema f2; the federation expects "
                                            "schema f3"):
        hello(Session(Replies(ok), VerticalConfig(), 0), {"platform": "f3"}, roles, "d")
    with pytest.raises(VerticalError, match="party bank says its role is 'passive'"):
        hello(Session(Replies({**ok, "bank": {"role": "passive"}}), VerticalConfig(), 0), {}, roles, "d")
    with pytest.raises(VerticalError, match=r"\['insurer'\] are not parties of this federation"):
        hello(Session(Replies({**ok, "insurer": {"role": "passive"}}), VerticalConfig(), 0), {}, roles, "d")
    with pytest.raises(VerticalError, match=r"\['platform'\] did not answer"):
        hello(Session(Replies({"bank": ok["bank"]}), VerticalConfig(), 0), {}, roles, "d")


def test_bad_files_are_named(small, tmp_path):
    with pytest.raises(VerticalError, match="party bank refused step hello: .*bank.csv: missing column"):
        run_inprocess(overrides(small, "split_nn", "vertical.parties.0.schema=schemas/credit_vertical_platform.yaml",
                                "vertical.parties.1.schema=schemas/credit_vertical_bank.yaml"), tmp_path / "a")
    h, rows = _rows(small["platform"])
    rows[5][0] = rows[3][0]
    dup = _write(tmp_path / "dup.csv", h, rows)
    with pytest.raises(VerticalError,
                       match=r"party platform refused step hello: .*dup.csv: id column 'ID' repeats a value \(rows 5 and 7\)"
                       ) as refused:
        run_inprocess(overrides(small, "split_nn", f"vertical.parties.1.data={dup}"), tmp_path / "b")
    assert str(rows[3][0]) not in str(refused.value)  # the customer id stays at the party (its own log has it)


def test_roles_are_checked_in_the_config():
    with pytest.raises(config.ConfigError, match="exactly one party with role active"):
        config.compose(["vertical=split_nn", "vertical.parties.1.role=active"])
    with pytest.raises(config.ConfigError, match="vertical.protection"):
        config.compose(["vertical=hetero_lr", "vertical.protection=embeddings", "vertical.noise_multiplier=1"])


@pytest.mark.slow
def test_hetero_lr_with_two_passive_parties_matches_plain_taylor_gradient_descent(small, tmp_path):
    """Three parties: the platform's columns split between two passive parties (repayment statuses,
    payment amounts). The residual's ciphertexts pass through both in turn; the weights equal plain
    gradient descent on the same fixed point."""
    import yaml

    from vertical.data import load_party

    head, rows = _rows(small["platform"])
    th, trows = _rows(small["platform_test"])
    schema = yaml.safe_load((DATA_DIR / "schemas/credit_vertical_platform.yaml").read_text())
    parties = [f"{{name: bank, role: active, data: {small['bank']}, test: {small['bank_test']}, "
               f"schema: {DATA_DIR / 'schemas/credit_vertical_bank.yaml'}}}"]
    for name, prefix in (("status", "PAY_"), ("amounts", "PAY_AMT")):
        cols = [0] + [k for k, c in enumerate(head) if c.startswith(prefix) and (prefix != "PAY_" or "AMT" not in c)]
        data = _write(tmp_path / f"{name}.csv", [head[k] for k in cols], [[r[k] for k in cols] for r in rows])
        test = _write(tmp_path / f"{name}_test.csv", [th[k] for k in cols], [[r[k] for k in cols] for r in trows])
        part = dict(schema, features=[f for f in schema["features"] if f["name"] in {head[k] for k in cols}])
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(part))
        parties.append(f"{{name: {name}, role: passive, data: {data}, test: {test}, schema: {tmp_path / (name + '.yaml')}}}")
    res = run_inprocess(["vertical=hetero_lr", "vertical.epochs=2", f"vertical.parties=[{','.join(parties)}]"],
                        tmp_path / "run")
    v = res["vertical"]
    assert v["passive"] == ["amounts", "status"] and v["intersection"]["train"] == 400
    assert v["bytes"]["amounts->status"] > 0 or v["bytes"]["status->amounts"] > 0  # the chain between them
    tabs = {p: load_party(p, r, tmp_path / f"{p}.csv" if p != "bank" else small["bank"],
                          tmp_path / f"{p}.yaml" if p != "bank" else DATA_DIR / "schemas/credit_vertical_bank.yaml")
            for p, r in (("bank", "active"), ("status", "passive"), ("amounts", "passive"))}
    import hashlib

    common = sorted(set(tabs["bank"].ids) & set(tabs["status"].ids),
                    key=lambda i: hashlib.sha256(f"0|{i}".encode()).digest())
    xs = {}
    for p, t in tabs.items():
        pos = {k: i for i, k in enumerate(t.ids)}
        xs[p] = np.clip(t.x[[pos[c] for c in common]], -8, 8)
    xs["bank"] = np.column_stack([xs["bank"], np.ones(len(common))])
    y = tabs["bank"].y[[{k: i for i, k in enumerate(tabs["bank"].ids)}[c] for c in common]]
    w = {p: np.zeros(x.shape[1]) for p, x in xs.items()}
    share = 4.0 / 3
    for epoch in range(1, 3):
        idx = np.random.default_rng([0, epoch]).permutation(len(common))
        r = np.clip(0.5 + xs["bank"][idx] @ w["bank"] / 4 - y[idx], -share, share)
        r = r + sum(np.clip(xs[p][idx] @ w[p] / 4, -share, share) for p in ("status", "amounts"))
        w = {p: w[p] - 0.5 * xs[p][idx].T @ r / len(idx) for p in w}
    for p in w:
        with np.load(tmp_path / "run" / "parties" / f"{p}.vertical.npz") as z:
            assert np.abs(z["w"] - w[p]).max() < 1e-3, p


class _Recording(LocalGrid):
    """Keeps every reply the coordinator receives and every message it sends."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[Message] = []

    def _deliver(self, msg):
        reply = super()._deliver(msg)
        self.seen += [msg, reply]
        return reply


def _everything_in(messages, state) -> bytes:
    """Every value of every record of ``messages`` and of the coordinator's ``state``, as bytes."""
    out = []
    contents = [m.content for m in messages if not m.has_error()] + [state]
    for content in contents:
        for record in content.values():
            if isinstance(record, ArrayRecord):
                out += [a.numpy().tobytes() for a in record.values()]
            else:
                out += [v if isinstance(v, bytes) else repr(v).encode() for v in dict(record).values()]
    return b"\x00".join(out)


@pytest.mark.slow
def test_hetero_lr_coordinator_never_receives_a_partys_private_key(small, tmp_path):
    """Each party makes its own Paillier key pair; the coordinator relays the protocol. Every message it
    sends or receives, and its own state, hold each party's public modulus (the search works) and
    neither prime of any party's key, in hexadecimal, decimal or binary."""
    import shlex

    from app import client_app, server_app
    from app.runtime.preflight import preflight

    args = overrides(small, "hetero_lr", "vertical.epochs=1")
    cfg = config.compose(args)
    run_config = {"overrides": config.run_overrides(args, preflight(cfg)), "output-dir": str(tmp_path)}
    assert shlex.split(run_config["overrides"])
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    grid = _Recording(client_app.app, config.num_sites(cfg), run_config)
    coordinator = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    server_app.app(grid, coordinator)
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "completed"
    seen = _everything_in(grid.seen, coordinator.state)
    keys = []
    for ctx in grid.contexts.values():
        for record in ctx.state.values():
            if not isinstance(record, ArrayRecord) and "lr:pq" in dict(record):
                keys.append([int(v, 16) for v in json.loads(str(record["lr:pq"]))])
    assert len(keys) == 2  # both parties made a key pair
    assert b"fedsilo-psi-v1" in seen and b"bank" in seen  # the search finds what the coordinator does see
    for p, q in keys:
        # issue #33: even the moduli travel sealed between the parties (the coordinator cannot substitute one)
        assert format(p * q, "x").encode() not in seen
        for prime in (p, q):
            binary = prime.to_bytes((prime.bit_length() + 7) // 8, "big")
            for form in (format(prime, "x").encode(), str(prime).encode(), binary):
                assert form not in seen
