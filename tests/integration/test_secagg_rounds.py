"""Secure aggregation end to end: the real ServerApp and ClientApp exchanging the protocol's
messages (in process through :class:`LocalGrid`; ``test_e2e.py`` runs it in Flower's
simulation engine). What the server receives is recorded at the grid and checked."""

from __future__ import annotations

import json
import shlex
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from aggregation.secagg import vector, wire
from aggregation.secagg.client import MASKED_KEY, WIRE_KEY
from app import client_app, config, server_app
from app.runtime.local_grid import LocalGrid
from core.layout import Layout
from tests.conftest import DATA_DIR


class RecordingGrid(LocalGrid):
    """LocalGrid that keeps every message and reply, and can alter messages in flight."""

    def __init__(self, *args: Any, alter: Callable[[Message], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self.alter = alter

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        out = []
        for msg in messages:
            if self.alter is not None:
                self.alter(msg)
            self.sent.append(msg)
            out.append(self._deliver(msg))
        self.replies.extend(out)
        return out


def run(tmp_path: Path, overrides: list[str], monkeypatch: pytest.MonkeyPatch,
        alter: Callable[[Message], None] | None = None, fails: bool = False) -> tuple[RecordingGrid, dict[str, Any], dict]:
    """One in-process run; returns the grid, results.json and the sites' plaintext updates. ``fails``:
    the run must end in the ServerApp's RuntimeError (every round aborted); otherwise it must not."""
    updates: dict[int, list[tuple[int, np.ndarray]]] = defaultdict(list)  # round -> [(weight, update)]
    encode = vector.WeightedUpdateCodec.encode
    current = {"round": 0}

    def recording_encode(self, update, weight, loss, rng):  # type: ignore[no-untyped-def]
        updates[current["round"]].append((weight, update.copy()))
        return encode(self, update, weight, loss, rng)

    def track_round(msg: Message) -> None:
        if msg.metadata.message_type == "train.secagg":
            current["round"] = int(msg.content[WIRE_KEY]["round"])
        if alter is not None:
            alter(msg)

    monkeypatch.setattr(vector.WeightedUpdateCodec, "encode", recording_encode)
    cfg = config.compose(overrides)
    run_config = {"overrides": shlex.join([*overrides, f"data_dir={DATA_DIR}"]), "output-dir": str(tmp_path)}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    grid = RecordingGrid(client_app.app, config.num_sites(cfg), run_config, alter=track_round)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    if fails:
        with pytest.raises(RuntimeError):
            server_app.app(grid, context)
    else:
        server_app.app(grid, context)
    return grid, json.loads((tmp_path / "results.json").read_text()), updates


def globals_per_round(grid: RecordingGrid, tmp_path: Path) -> dict[int, dict[str, np.ndarray]]:
    """The global model each round's training started from, plus the final model."""
    out: dict[int, dict[str, np.ndarray]] = {}
    for msg in grid.sent:
        if msg.metadata.message_type == "train.secagg":
            out.setdefault(int(msg.content[WIRE_KEY]["round"]), {k: v.numpy() for k, v in msg.content["arrays"].items()})
    final = torch.load(tmp_path / "model.pt")
    out[max(out) + 1] = {k: v.numpy() for k, v in final.items()}
    return out


def assert_rounds_equal_survivors_mean(grid: RecordingGrid, tmp_path: Path, updates: dict, clip: float = 4.0) -> None:
    delta = 2 * clip / ((1 << 24) - 1)
    models = globals_per_round(grid, tmp_path)
    # every trained round was captured (a loop over nothing would pass), with at least one site's update
    assert sorted(updates) == sorted(models)[:-1] and all(updates[r] for r in updates), (sorted(updates), sorted(models))
    for r in sorted(updates):
        layout = Layout.of(models[r])
        weights = np.array([w for w, _ in updates[r]], dtype=np.float64)
        expected = layout.flatten(models[r]) + (weights[:, None] * np.stack([u for _, u in updates[r]])).sum(0) / weights.sum()
        got = layout.flatten(models[r + 1])
        # the documented bound (one step) plus rounding the result to float32
        np.testing.assert_allclose(got, expected, rtol=0, atol=delta + 2.0**-23 * max(1.0, np.abs(expected).max()))


FINANCE10 = ["task=finance", "num_sites=10", "task.local_epochs=1", "strategy.fraction_evaluate=0"]
MEDICAL = ["task=medical", "num_rounds=1", "aggregation=secagg", "strategy.fraction_evaluate=0"]


@pytest.mark.parametrize("stage", ["keys", "masked_input", "unmask"])
def test_dropouts_at_each_stage_leave_the_survivors_aggregate(stage: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """3 of 10 sites drop at one stage in each of 3 rounds (drawn per round, so sites that dropped come back
    and ratchet their chains forward over the rounds they missed): every round is the survivors' exact mean."""
    grid, results, updates = run(tmp_path, [*FINANCE10, "num_rounds=3", "aggregation=secagg",
                                            "faults.drop_rate=0.3", f"faults.drop_stage={stage}"], monkeypatch)
    assert results["status"] == "completed"
    dropped_by_round = []
    for h in results["history"]:
        sec = h["participation"]["secagg"]
        assert sec["sites"] == 10 and "aborted" not in sec
        dropped = [r for r in sec["rejected"] if "fault injection" in r["reason"]]
        assert len(dropped) == 3 and all(r["stage"] == stage for r in dropped)
        dropped_by_round.append({r["node"] for r in dropped})
        # sites dropped before masking are not in the sum; at unmasking all 10 inputs are
        assert sec["survivors"] == (10 if stage == "unmask" else 7)
        assert len(updates[h["round"]]) == sec["survivors"]
    # a site that missed a round took part in a later one (its chains ratcheted over the gap)
    assert dropped_by_round[0] - dropped_by_round[1] and dropped_by_round[1] - dropped_by_round[2]
    if stage == "keys":  # a site without a key of the epoch makes the next round open a new epoch
        assert [h["participation"]["secagg"]["epoch"] for h in results["history"]] == [1, 2, 3]
    else:  # one key agreement for the whole job
        assert [h["participation"]["secagg"]["key_exchange"] for h in results["history"]] == [True, False, False]
    assert_rounds_equal_survivors_mean(grid, tmp_path, updates)


def test_too_few_survivors_abort_cleanly_and_keep_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grid, results, _ = run(tmp_path, [*FINANCE10, "num_rounds=2", "aggregation=secagg",
                                      "faults.drop_rate=0.5"], monkeypatch, fails=True)  # 5 left, threshold 6
    assert results["status"] == "failed"
    for h in results["history"]:
        assert "its threshold is 6" in h["participation"]["secagg"]["aborted"]
        assert h["participation"]["train"]["replied"] == 0
    # the coordinator did not even ask: every site would refuse to reveal for 5 survivors
    assert not [m for m in grid.sent if m.metadata.message_type == "query.secagg_unmask"]
    models = globals_per_round(grid, tmp_path)
    for k in models[1]:
        np.testing.assert_array_equal(models[1][k], models[3][k])  # never touched


def test_server_receives_only_masked_vectors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grid, results, updates = run(tmp_path, ["task=finance", "num_sites=3", "task.local_epochs=1", "num_rounds=1",
                                            "aggregation=secagg"], monkeypatch)
    masked = [m for m in grid.replies if not m.has_error() and MASKED_KEY in m.content.array_records]
    assert len(masked) == 3 and results["status"] == "completed"
    monkeypatch.undo()  # stop recording: encode the plaintext vectors for comparison
    codec = vector.WeightedUpdateCodec(4.0, 24, updates[1][0][1].size)
    for reply in masked:
        assert list(reply.content.array_records) == [MASKED_KEY]  # no model, no update
        assert not reply.content.metric_records  # no row count, no loss
        y = vector.unpack_field(reply.content[MASKED_KEY]["y"], vector.FIELD_BITS).astype(np.float64)
        for weight, update in updates[1]:
            plain = codec.encode(update, weight, 0.0, np.random.default_rng(0)).astype(np.float64)
            assert abs(np.corrcoef(y, plain)[0, 1]) < 0.1  # 4,000+ values: > 6 standard errors
            assert len(set(plain[: codec.size].tolist()) & set(y.tolist())) < 0.01 * y.size
    # what the server learns: the sites' total weight, not each one's
    assert results["history"][0]["train"]["num-examples"] == sum(w for w, _ in updates[1])


def test_secagg_composes_with_fedprox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grid, results, updates = run(tmp_path, [*FINANCE10, "num_rounds=2", "strategy=fedprox", "strategy.mu=0.1",
                                            "aggregation=secagg", "faults.drop_rate=0.2"], monkeypatch)
    assert results["status"] == "completed"
    sent = [m for m in grid.sent if m.metadata.message_type == "train.secagg"]
    assert sent and all(float(m.content["config"]["proximal-mu"]) == 0.1 for m in sent)
    assert_rounds_equal_survivors_mean(grid, tmp_path, updates)


def test_tampered_share_is_refused_and_the_round_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A share altered on its way (in the unmask message that delivers it): its recipient refuses to reveal
    anything; the others' shares still open every self-mask, and the round's sum is every site's."""
    def flip_a_byte(msg: Message) -> None:
        if msg.metadata.message_type == "query.secagg_unmask" and msg.metadata.dst_node_id == 1002:
            rec = msg.content[WIRE_KEY]
            shares = wire.split(rec["shares"])
            shares[0] = shares[0][:-5] + bytes([shares[0][-5] ^ 1]) + shares[0][-4:]
            rec["shares"] = wire.join(shares)

    grid, results, updates = run(tmp_path, MEDICAL, monkeypatch, alter=flip_a_byte)
    sec = results["history"][0]["participation"]["secagg"]
    assert results["status"] == "completed" and sec["survivors"] == 4 and sec["stages"]["unmask"]["ok"] == 3
    assert any("failed authentication" in r["reason"] and r["node"] == 1002 for r in sec["rejected"])
    assert_rounds_equal_survivors_mean(grid, tmp_path, updates)


def test_a_site_keeps_nothing_of_a_finished_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After round T a site's state holds nothing from which round T's (or an earlier round's) masks can be
    derived: no open round, and every chain key already at index T + 1, whose derivations differ from every
    seed and share key the site used in round T; a chain refuses to go back."""
    from aggregation.secagg import client as secagg_client
    from aggregation.secagg import ratchet
    from aggregation.secagg.protocol import SiteState

    used: dict[int, list[bytes]] = defaultdict(list)  # round -> the seeds and share keys sites used
    unmask = secagg_client.unmask

    def inspecting_unmask(msg: Message, context: Context, env: Any) -> Message:
        st = SiteState.from_bytes(context.state["secagg-train"]["state"])  # type: ignore[index,arg-type]
        assert st.pending is not None and st.secret == b""  # the epoch's X25519 key is gone once agreed
        used[st.pending.index] += [*st.pending.seeds.values(), *st.pending.share_keys.values()]
        return unmask(msg, context, env)

    monkeypatch.setattr(secagg_client, "unmask", inspecting_unmask)
    grid, results, _ = run(tmp_path, [*MEDICAL[:-3], "num_rounds=3", "aggregation=secagg",
                                      "strategy.fraction_evaluate=0"], monkeypatch)
    assert results["status"] == "completed" and sorted(used) == [1, 2, 3] and all(used.values())
    for node, ctx in grid.contexts.items():
        st = SiteState.from_bytes(ctx.state["secagg-train"]["state"])  # type: ignore[index,arg-type]
        assert st.pending is None and st.last == 3 and st.chains, node
        blob = st.to_bytes()
        for peer, (index, key) in st.chains.items():
            assert index == 4, (node, peer, index)
            for at in range(index, index + 3):  # what the state can still derive: rounds 4, 5, 6 only
                derived = ratchet.round_keys(ratchet.advance(key, index, at), at)
                assert not set(derived) & {k for r in used.values() for k in r}
            with pytest.raises(ValueError, match="never goes back"):
                ratchet.advance(key, index, 3)
        assert not any(k.hex().encode() in blob for r in used.values() for k in r)


def _context(aggregation: str = "secagg") -> Context:
    overrides = shlex.join(["task=medical", f"aggregation={aggregation}", f"data_dir={DATA_DIR}"])
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 4},
                   state=RecordDict(), run_config={"overrides": overrides})


def _msg(message_type: str, **record: Any) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    return Message(RecordDict({WIRE_KEY: ConfigRecord(record)}), dst_node_id=7, message_type=message_type)


def test_replayed_and_out_of_order_stage_messages_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = _context()
    early = client_app.app(_msg("query.secagg_unmask", round=3, id=1, epoch=1, survivors="", dropped="", **{"from": ""},
                                shares=b""), ctx)
    assert early.has_error() and "no masked round 3 open" in early.error.reason
    # a site configured for plain aggregation refuses the protocol's messages with the reason
    other = client_app.app(_msg("query.secagg_keys", round=1, id=1, epoch=1), _context("plain"))
    assert other.has_error() and "answers no 'query.secagg_keys' message" in other.error.reason
    # after a real round, replaying its messages to a site is refused: no second masked input for a
    # round its chains have moved past, no second unmasking, no keys for an epoch it already holds
    grid, results, _ = run(tmp_path, MEDICAL, monkeypatch)
    assert results["status"] == "completed"
    expected = {"query.secagg_keys": "already holds the keys of epoch 1", "train.secagg": "moved past it",
                "query.secagg_unmask": "no masked round 1 open"}
    for message_type, reason in expected.items():
        original = next(m for m in grid.sent if m.metadata.message_type == message_type and m.metadata.dst_node_id == 1000)
        again = grid._deliver(Message(original.content, dst_node_id=1000, message_type=message_type))
        assert again.has_error() and reason in again.error.reason, again.error.reason


def test_misaddressed_reply_is_rejected_by_the_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = LocalGrid._deliver

    def deliver(self, msg):  # type: ignore[no-untyped-def]
        reply = original(self, msg)
        if msg.metadata.message_type == "query.secagg_keys" and msg.metadata.dst_node_id == 1001:
            reply.content[WIRE_KEY]["round"] = 0  # a reply from another round
        return reply

    monkeypatch.setattr(LocalGrid, "_deliver", deliver)
    _, results, _ = run(tmp_path, MEDICAL, monkeypatch)
    assert results["status"] == "completed"
    sec = results["history"][0]["participation"]["secagg"]
    assert sec["survivors"] == 3
    assert any(r["node"] == 1001 and r["stage"] == "keys" and "replayed or misaddressed" in r["reason"]
               for r in sec["rejected"])


def test_rounds_after_the_first_need_two_exchanges_and_stay_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys are agreed once (round 1: keys, masked input, unmask); later rounds are the masked input and the
    unmasking only. The result equals plain aggregation's up to the quantisation."""
    common = ["task=medical", "num_rounds=3", "strategy.fraction_evaluate=0"]
    grid, secure, updates = run(tmp_path / "secagg", [*common, "aggregation=secagg"], monkeypatch)
    assert secure["status"] == "completed" and len(secure["history"]) == 3
    types = [(m.metadata.message_type, int(m.content[WIRE_KEY]["round"])) for m in grid.sent]
    for r in (1, 2, 3):
        sent = sorted({t for t, rr in types if rr == r})
        expected = ["query.secagg_keys"] if r == 1 else []
        assert sent == sorted([*expected, "query.secagg_unmask", "train.secagg"]), (r, sent)
        assert secure["history"][r - 1]["participation"]["secagg"]["key_exchange"] is (r == 1)
    # the epoch's keys travel once per site (its first masked-input message), not every round
    with_keys = [m for m in grid.sent if m.metadata.message_type == "train.secagg" and "epoch-pks" in m.content[WIRE_KEY]]
    assert len(with_keys) == 4 and {int(m.content[WIRE_KEY]["round"]) for m in with_keys} == {1}
    assert_rounds_equal_survivors_mean(grid, tmp_path / "secagg", updates)
    monkeypatch.undo()
    from app.runtime.local_grid import run_inprocess

    plain = run_inprocess(common, tmp_path / "plain")
    assert abs(secure["final"]["auc"] - plain["final"]["auc"]) < 1e-4


def test_rekey_every_agrees_fresh_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``aggregation.rekey_every=2``: a new signed key agreement every two rounds (healing after a compromise
    that has ended), and the sums stay exact across the change of keys."""
    grid, results, updates = run(tmp_path, [*MEDICAL[:-3], "num_rounds=4", "aggregation=secagg",
                                            "aggregation.rekey_every=2", "strategy.fraction_evaluate=0"], monkeypatch)
    assert [h["participation"]["secagg"]["epoch"] for h in results["history"]] == [1, 1, 2, 2]
    assert [h["participation"]["secagg"]["key_exchange"] for h in results["history"]] == [True, False, True, False]
    assert_rounds_equal_survivors_mean(grid, tmp_path, updates)


def test_malformed_masked_vector_is_rejected_and_its_masks_removed(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.app import ArrayRecord

    original = LocalGrid._deliver

    def deliver(self, msg):  # type: ignore[no-untyped-def]
        reply = original(self, msg)
        if msg.metadata.message_type == "train.secagg" and msg.metadata.dst_node_id == 1003:
            y = vector.unpack_field(reply.content[MASKED_KEY]["y"], vector.FIELD_BITS)
            reply.content[MASKED_KEY] = ArrayRecord({"y": vector.pack_field(y[:-1], vector.FIELD_BITS)})  # truncated
        return reply

    monkeypatch.setattr(LocalGrid, "_deliver", deliver)
    grid, results, updates = run(tmp_path, [*FINANCE10, "num_rounds=1", "aggregation=secagg"], monkeypatch)
    sec = results["history"][0]["participation"]["secagg"]
    assert results["status"] == "completed" and (sec["survivors"], sec["dropped"]) == (9, 1)
    assert any(r["node"] == 1003 and "shape" in r["reason"] for r in sec["rejected"])
    # the sum is the other nine sites' aggregate: drop site 3's update from the expectation
    updates[1] = [u for k, u in enumerate(updates[1]) if k != 3]
    assert_rounds_equal_survivors_mean(grid, tmp_path, updates)


def test_neighbour_graph_keeps_each_sites_work_local_and_the_sum_exact(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    grid, results, updates = run(tmp_path, [*FINANCE10, "num_rounds=2", "aggregation=secagg",
                                            "aggregation.neighbours=6", "faults.drop_rate=0.2"], monkeypatch)
    assert results["status"] == "completed"
    for h in results["history"]:
        sec = h["participation"]["secagg"]
        assert (sec["neighbours"], sec["threshold"], sec["survivors"]) == (6, 5, 8)
    trains = [m for m in grid.sent if m.metadata.message_type == "train.secagg"]
    assert len(trains) == 2 * 10  # every sampled site, both rounds
    assert all(len(wire.split_names(m.content[WIRE_KEY]["neighbours"])) == 6 for m in trains)  # its 6 graph neighbours
    # each site receives the keys of its neighbours only (and itself), until it has masked once: the two
    # that dropped in round 1 get them again in round 2
    firsts = [m for m in trains if "epoch-of" in m.content[WIRE_KEY]]
    assert len({m.metadata.dst_node_id for m in firsts}) == 10 and len(firsts) == 12
    assert all(len(wire.split_names(m.content[WIRE_KEY]["epoch-of"])) == 7 for m in firsts)
    assert_rounds_equal_survivors_mean(grid, tmp_path, updates)


def test_a_site_that_never_answers_a_stage_is_dropped_after_the_timeout(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A lost reply (what a timeout leaves) at the key stage: the site is logged as silent and the round
    completes without it; the sum is the others' aggregate."""
    original = LocalGrid.send_and_receive

    def lossy(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        replies = list(original(self, messages, timeout=timeout))
        return [r for r in replies if not (r.metadata.message_type == "query.secagg_keys"
                                           and r.metadata.src_node_id == 1002)]

    monkeypatch.setattr(LocalGrid, "send_and_receive", lossy)
    overrides = [*FINANCE10, "num_rounds=1", "aggregation=secagg", "aggregation.stage_timeout=7"]
    cfg = config.compose(overrides)
    run_config = {"overrides": shlex.join([*overrides, f"data_dir={DATA_DIR}"]), "output-dir": str(tmp_path)}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    grid = LocalGrid(client_app.app, config.num_sites(cfg), run_config)
    server_app.app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    sec = json.loads((tmp_path / "results.json").read_text())["history"][0]["participation"]["secagg"]
    assert (sec["survivors"], sec["stages"]["keys"]["ok"]) == (9, 9)
    assert any(r["node"] == 1002 and r["stage"] == "keys" and "no reply within 7 s" in r["reason"]
               for r in sec["rejected"])


@pytest.mark.parametrize("state_folder", [True, False], ids=["with its state folder", "state lost"])
def test_a_restarted_site_resumes_its_chains_from_its_state_folder(state_folder: bool, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A site whose process restarts between rounds loses ``context.state`` (what a SuperNode keeps in
    memory). With its state folder (node config ``state-dir``, as every deployed site has) it reads its
    chains back (0600 file, written atomically) and round 2 needs no new key agreement. Without it, it
    says it holds no keys (error 412) and the next round opens a new epoch that includes it again."""
    from aggregation.secagg.client import NO_KEYS

    def restart(msg: Message) -> None:
        if msg.metadata.message_type == "train.secagg" and int(msg.content[WIRE_KEY]["round"]) == 2:
            holder["grid"].contexts[1002].state = RecordDict()  # the site's process is gone and back

    holder: dict[str, RecordingGrid] = {}
    original = RecordingGrid.__init__

    def init(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[no-untyped-def]
        original(self, *args, **kwargs)
        holder["grid"] = self
        if state_folder:
            for node, ctx in self.contexts.items():
                ctx.node_config["state-dir"] = str(tmp_path / "state" / str(node))

    monkeypatch.setattr(RecordingGrid, "__init__", init)
    grid, results, updates = run(tmp_path, ["task=medical", "num_rounds=3", "aggregation=secagg",
                                            "strategy.fraction_evaluate=0"], monkeypatch, alter=restart)
    secs = [h["participation"]["secagg"] for h in results["history"]]
    assert results["status"] == "completed"
    if state_folder:
        assert [s["epoch"] for s in secs] == [1, 1, 1] and [s["survivors"] for s in secs] == [4, 4, 4]
        (saved,) = (tmp_path / "state" / "1002" / "secagg").glob("*/run-1-train.state")
        assert saved.stat().st_mode & 0o777 == 0o600
    else:
        lost = [r for m, r in zip(grid.sent, grid.replies, strict=True)
                if m.metadata.message_type == "train.secagg" and m.metadata.dst_node_id == 1002 and r.has_error()]
        assert len(lost) == 1 and lost[0].error.code == NO_KEYS
        assert [s["epoch"] for s in secs] == [1, 1, 2] and [s["survivors"] for s in secs] == [4, 3, 4]
    assert_rounds_equal_survivors_mean(grid, tmp_path, updates)
