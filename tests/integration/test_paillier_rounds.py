"""aggregation=paillier end to end with the real ServerApp and ClientApp (in process): the server
is given the public key only, the sites their key pair through their node config."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import tasks
from aggregation.paillier import keys
from aggregation.paillier.client import ModelCodecFactory, global_state
from aggregation.paillier.config import packer_for as paillier_packer
from aggregation.paillier.server import ENCRYPTED_KEY
from app import client_app, config, server_app
from app.runtime.local_grid import LocalGrid, run_inprocess
from app.support.paths import resolve_data_dir
from tests.conftest import DATA_DIR

COMMON = ["task=finance", "num_sites=3", "num_rounds=3"]


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return keys.generate(tmp_path_factory.mktemp("paillier"))


def run(tmp_path: Path, key_files: tuple[Path, Path], extra: list[str] = (), grid_cls: type = LocalGrid,
        site_key: Path | None = None) -> dict[str, Any]:
    """The ServerApp gets only the public key path; each site gets the key pair in its node config."""
    overrides = [*COMMON, "aggregation=paillier", f"aggregation.public_key={key_files[1]}", *extra]
    run_config = {"overrides": shlex.join([*overrides, f"data_dir={DATA_DIR}"]), "output-dir": str(tmp_path)}
    assert str(key_files[0]) not in run_config["overrides"]
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    grid = grid_cls(client_app.app, 3, run_config, node_config={"paillier-keypair": str(site_key or key_files[0])})
    server_app.app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    return json.loads((tmp_path / "results.json").read_text())


def decrypt_final(tmp_path: Path, key_path: Path) -> torch.nn.Module:
    """What a key holder does with the run's encrypted final model."""
    cfg = config.compose([*COMMON, "aggregation=paillier"])
    task = tasks.get("finance")(cfg.task, resolve_data_dir(str(DATA_DIR)))
    model = task.build_model()
    private = keys.load_private(key_path)
    saved = torch.load(tmp_path / "model.encrypted.pt")
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in saved.items()})
    codec = ModelCodecFactory(paillier_packer(cfg.aggregation, private.public_key.n.bit_length()), 1000.0)
    model.load_state_dict(global_state(arrays, model.state_dict(), codec, private))
    return model


@pytest.mark.slow
def test_paillier_run_matches_plain_fedavg_and_the_server_holds_no_model(tmp_path: Path,
                                                                          key_files: tuple[Path, Path]) -> None:
    results = run(tmp_path / "paillier", key_files)
    plain = run_inprocess(COMMON, tmp_path / "plain")
    assert results["status"] == "completed"
    assert results["final_source"].startswith("federated evaluation")
    assert all(h["server"] == {} for h in results["history"])  # no plaintext model on the server
    assert not (tmp_path / "paillier" / "model.pt").exists()
    # the key holder's view: the decrypted final model scores like plain FedAvg's on the test set
    cfg = config.compose(COMMON)
    task = tasks.get("finance")(cfg.task, resolve_data_dir(str(DATA_DIR)))
    auc = task.evaluate(decrypt_final(tmp_path / "paillier", key_files[0]), task.data().test)["auc"]
    assert abs(auc - plain["final"]["auc"]) < 0.002
    fed, fed_plain = results["final"], plain["final_federated_evaluate"]
    assert abs(fed["auc_site_weighted"] - fed_plain["auc_site_weighted"]) < 0.002


class TamperingGrid(LocalGrid):
    """Node 1001's training reply is altered in flight."""

    mode = "truncate"

    def _deliver(self, msg: Message) -> Message:
        reply = super()._deliver(msg)
        if msg.metadata.message_type == "train" and msg.metadata.dst_node_id == 1001 and not reply.has_error():
            rec = reply.content[ENCRYPTED_KEY]
            ct = rec["ct"].numpy()
            if self.mode == "truncate":
                rec["ct"] = Array(ct[:-1].copy())
            else:  # the integer 0: not a ciphertext at all
                bad = ct.copy()
                bad[0, :] = 0
                rec["ct"] = Array(bad)
        return reply


@pytest.mark.parametrize("mode, reason", [("truncate", "expected"), ("zero", "integer in (0, n^2)")])
def test_malformed_ciphertexts_are_rejected_and_the_round_goes_on(mode: str, reason: str, tmp_path: Path,
                                                                  key_files: tuple[Path, Path]) -> None:
    TamperingGrid.mode = mode
    results = run(tmp_path, key_files, ["num_rounds=1", "strategy.fraction_evaluate=0"], grid_cls=TamperingGrid)
    train = results["history"][0]["participation"]["train"]
    assert results["status"] == "completed" and train["replied"] == 2
    assert len(train["rejected"]) == 1 and reason in train["rejected"][0]["reason"]


def test_a_site_with_another_key_pair_is_rejected_by_fingerprint(tmp_path: Path, key_files: tuple[Path, Path]) -> None:
    other, _ = keys.generate(tmp_path / "other")
    with pytest.raises(RuntimeError, match="never trained"):
        run(tmp_path, key_files, ["num_rounds=1", "strategy.fraction_evaluate=0"], site_key=other)
    train = json.loads((tmp_path / "results.json").read_text())["history"][0]["participation"]["train"]
    assert len(train["rejected"]) == 3 and all("not one key pair" in r["reason"] for r in train["rejected"])


def test_missing_keys_fail_at_start_with_a_clear_message(tmp_path: Path, key_files: tuple[Path, Path]) -> None:
    from app.runtime.preflight import PreflightError

    with pytest.raises(PreflightError, match="aggregation.public_key"):
        run_inprocess([*COMMON, "aggregation=paillier"], tmp_path / "nokey")
    other, _ = keys.generate(tmp_path / "other")
    with pytest.raises(PreflightError, match="does not belong"):
        run_inprocess([*COMMON, "aggregation=paillier", f"aggregation.public_key={key_files[1]}",
                       f"aggregation.keypair={other}"], tmp_path / "mismatch")
    with pytest.raises(PreflightError, match="does not exist"):
        run_inprocess([*COMMON, "aggregation=paillier", f"aggregation.public_key={tmp_path}/missing.json"],
                      tmp_path / "missing")


def test_paillier_composes_with_fedprox(tmp_path: Path, key_files: tuple[Path, Path]) -> None:
    class Recording(LocalGrid):
        sent: list[Message] = []

        def _deliver(self, msg: Message) -> Message:
            Recording.sent.append(msg)
            return super()._deliver(msg)

    results = run(tmp_path, key_files, ["num_rounds=2", "strategy=fedprox", "strategy.mu=0.1",
                                        "strategy.fraction_evaluate=0"], grid_cls=Recording)
    assert results["status"] == "completed"
    trains = [m for m in Recording.sent if m.metadata.message_type == "train"]
    assert trains and all(float(m.content["config"]["proximal-mu"]) == 0.1 for m in trains)
    assert all("ct" in m.content["arrays"] for m in trains[3:])  # round 2 ships the encrypted aggregate


def test_obfuscators_made_during_evaluation_are_used_once(tmp_path: Path, key_files: tuple[Path, Path]) -> None:
    """Sites precompute the next round's obfuscators while evaluating; training consumes them, and
    the ciphertexts still decrypt to the right model (the run matches the one without)."""
    from aggregation.paillier.client import OBFUSCATORS_KEY

    class Watching(LocalGrid):
        seen: list[tuple[str, bool]] = []

        def _deliver(self, msg: Message) -> Message:
            reply = super()._deliver(msg)
            state = self.contexts[msg.metadata.dst_node_id].state.config_records
            Watching.seen.append((msg.metadata.message_type, OBFUSCATORS_KEY in state))
            return reply

    results = run(tmp_path, key_files, ["num_rounds=2"], grid_cls=Watching)
    assert results["status"] == "completed"
    assert ("evaluate", True) in Watching.seen  # made while evaluating
    trains = [have for kind, have in Watching.seen if kind == "train"]
    assert trains and not any(trains)  # consumed by training, never left for reuse
    model = decrypt_final(tmp_path, key_files[0])
    cfg = config.compose(COMMON)
    task = tasks.get("finance")(cfg.task, resolve_data_dir(str(DATA_DIR)))
    assert task.evaluate(model, task.data().test)["auc"] > 0.7


@pytest.mark.slow
def test_sites_can_spread_encryption_and_decryption_over_processes(tmp_path: Path,
                                                                   key_files: tuple[Path, Path]) -> None:
    one = run(tmp_path / "one", key_files, ["num_rounds=2"])
    two = run(tmp_path / "two", key_files, ["num_rounds=2", "aggregation.workers=2"])
    assert two["status"] == "completed"
    assert two["final"]["auc_site_weighted"] == one["final"]["auc_site_weighted"]  # same plaintexts, same model


def test_each_aggregate_is_decrypted_once_per_site(tmp_path: Path, key_files: tuple[Path, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The aggregate evaluated after round 1 is the one trained on in round 2: decrypted once."""
    from aggregation.paillier import client as pai

    calls = []
    original = pai.decrypt_all
    monkeypatch.setattr(pai, "decrypt_all", lambda *a, **k: calls.append(1) or original(*a, **k))
    results = run(tmp_path, key_files, ["num_rounds=2"])
    assert results["status"] == "completed"
    assert len(calls) == 3 * 2  # 3 sites x 2 aggregates (not 3: evaluate r1, train r2, evaluate r2)


class SliceGrid(LocalGrid):
    """Counts the ciphertexts each site decrypts; optionally breaks node 1001's slice replies."""

    decrypted: dict[int, int] = {}
    sent: list[Message] = []
    break_node: int | None = None
    break_all = False

    def _deliver(self, msg: Message) -> Message:
        SliceGrid.sent.append(msg)
        reply = super()._deliver(msg)
        if msg.metadata.message_type == "query.paillier_decrypt" and not reply.has_error():
            node = msg.metadata.dst_node_id
            if SliceGrid.break_all or node == SliceGrid.break_node:
                rec = reply.content["fedsilo-decrypt"]
                rec["sealed"] = bytes(rec["sealed"])[:-1]  # a truncated sealed slice
        return reply


def _split_run(tmp_path: Path, key_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, extra: list[str] = ()
               ) -> tuple[dict[str, Any], dict[int, int]]:
    from aggregation.paillier import crypto

    counted: dict[int, int] = {}
    original = crypto.Encryptor.decrypt

    def decrypt(self: crypto.Encryptor, c: int) -> int:
        from flwr.supercore.task_identity import TaskIdentity as T

        counted[T.node_id] = counted.get(T.node_id, 0) + 1
        return original(self, c)

    monkeypatch.setattr(crypto.Encryptor, "decrypt", decrypt)
    SliceGrid.sent = []
    return run(tmp_path, key_files, ["num_rounds=2", *extra], grid_cls=SliceGrid), counted


def test_split_decryption_gives_the_same_model_for_a_third_of_the_work(tmp_path: Path, key_files: tuple[Path, Path],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """decryption=split: every site decrypts one slice of each aggregate, the others' arrive sealed; the
    model is the same plaintext sum, so the federated metrics are identical to decryption=each."""
    SliceGrid.break_node, SliceGrid.break_all = None, False
    each, each_counts = _split_run(tmp_path / "each", key_files, monkeypatch)
    split, split_counts = _split_run(tmp_path / "split", key_files, monkeypatch, ["aggregation.decryption=split"])
    assert split["status"] == "completed"
    assert split["final"] == each["final"]
    assert sum(each_counts.values()) > 0
    # 2 aggregates: each site decrypted about a third of what it decrypts under 'each'
    assert sum(split_counts.values()) * 3 <= sum(each_counts.values()) + 3 * 2 * 3
    trains = [m for m in SliceGrid.sent if m.metadata.message_type == "train"][3:]
    assert trains and all("sealed" in m.content["arrays"] and "ct" not in m.content["arrays"] for m in trains)
    log_ = split["history"][0]["participation"]["paillier_decryption"]
    assert log_["slices"] == 3 and not log_["fallback"] and not log_["rejected"]


def test_a_bad_slice_is_reassigned_and_a_failed_exchange_falls_back(tmp_path: Path, key_files: tuple[Path, Path],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    SliceGrid.break_node, SliceGrid.break_all = 1001, False
    try:
        one, _ = _split_run(tmp_path / "one", key_files, monkeypatch, ["aggregation.decryption=split"])
        SliceGrid.break_node, SliceGrid.break_all = None, True
        every, _ = _split_run(tmp_path / "all", key_files, monkeypatch, ["aggregation.decryption=split"])
    finally:
        SliceGrid.break_node, SliceGrid.break_all = None, False
    reference, _ = _split_run(tmp_path / "ref", key_files, monkeypatch)
    log_ = one["history"][0]["participation"]["paillier_decryption"]
    assert one["status"] == "completed" and log_["reassigned"] and not log_["fallback"]
    assert any("sealed slice" in r["reason"] for r in log_["rejected"])
    log_ = every["history"][0]["participation"]["paillier_decryption"]
    assert every["status"] == "completed" and log_["fallback"]
    assert one["final"] == every["final"] == reference["final"]
