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


@pytest.mark.parametrize("stage", ["keys", "share", "masked_input", "unmask"])
def test_dropouts_at_each_stage_leave_the_survivors_aggregate(stage: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    grid, results, updates = run(tmp_path, [*FINANCE10, "num_rounds=2", "aggregation=secagg",
                                            "faults.drop_rate=0.3", f"faults.drop_stage={stage}"], monkeypatch)
    assert results["status"] == "completed"
    for h in results["history"]:
        sec = h["participation"]["secagg"]
        assert sec["sites"] == 10 and "aborted" not in sec
        dropped = [r for r in sec["rejected"] if "fault injection" in r["reason"]]
        assert len(dropped) == 3 and all(r["stage"] == stage for r in dropped)
        # sites dropped before masking are not in the sum; at unmasking all 10 inputs are
        assert sec["survivors"] == (10 if stage == "unmask" else 7)
        assert len(updates[h["round"]]) == sec["survivors"]
    assert_rounds_equal_survivors_mean(grid, tmp_path, updates)


def test_too_few_survivors_abort_cleanly_and_keep_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grid, results, _ = run(tmp_path, [*FINANCE10, "num_rounds=2", "aggregation=secagg",
                                      "faults.drop_rate=0.5"], monkeypatch, fails=True)  # 5 left, threshold 6
    assert results["status"] == "failed"
    for h in results["history"]:
        assert "threshold is 6" in h["participation"]["secagg"]["aborted"]
        assert h["participation"]["train"]["replied"] == 0
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
    def flip_a_byte(msg: Message) -> None:
        if msg.metadata.message_type == "train.secagg" and msg.metadata.dst_node_id == 1002:
            rec = msg.content[WIRE_KEY]
            shares = wire.split(rec["shares"])
            shares[0] = shares[0][:-5] + bytes([shares[0][-5] ^ 1]) + shares[0][-4:]
            rec["shares"] = wire.join(shares)

    _, results, updates = run(tmp_path, ["task=medical", "num_rounds=1", "aggregation=secagg",
                                         "strategy.fraction_evaluate=0"], monkeypatch, alter=flip_a_byte)
    sec = results["history"][0]["participation"]["secagg"]
    assert results["status"] == "completed" and sec["survivors"] == 3
    assert any("failed authentication" in r["reason"] and r["node"] == 1002 for r in sec["rejected"])


def _context(aggregation: str = "secagg") -> Context:
    overrides = shlex.join(["task=medical", f"aggregation={aggregation}", f"data_dir={DATA_DIR}"])
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 4},
                   state=RecordDict(), run_config={"overrides": overrides})


def _msg(message_type: str, **record: Any) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    return Message(RecordDict({WIRE_KEY: ConfigRecord(record)}), dst_node_id=7, message_type=message_type)


def test_replayed_and_out_of_order_stage_messages_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = _context()
    keys = dict(round=3, id=1, threshold=2, clip=4.0, **{"value-bits": 24})
    reply = client_app.app(_msg("query.secagg_unmask", round=3, id=1, survivors=[1, 2], dropped=[]), ctx)
    assert reply.has_error() and "before any key advertisement" in reply.error.reason
    assert not client_app.app(_msg("query.secagg_keys", **keys), ctx).has_error()
    skip = client_app.app(_msg("query.secagg_unmask", round=3, id=1, survivors=[1, 2], dropped=[]), ctx)
    assert skip.has_error() and "must follow 'masked_input'" in skip.error.reason
    stale = client_app.app(_msg("query.secagg_share", round=2, id=1, ids=[1], **{"c-pks": b"", "s-pks": b""}), ctx)
    assert stale.has_error() and "stale" in stale.error.reason
    # a site configured for plain aggregation refuses the protocol's messages with the reason
    other = client_app.app(_msg("query.secagg_keys", **keys), _context("plain"))
    assert other.has_error() and "answers no 'query.secagg_keys' message" in other.error.reason
    # after a real round, replaying its messages to a site is refused: no second set of keys
    # for a round it has masked its input for, no second unmasking
    grid, results, _ = run(tmp_path, ["task=medical", "num_rounds=1", "aggregation=secagg",
                                      "strategy.fraction_evaluate=0"], monkeypatch)
    assert results["status"] == "completed"
    for message_type in ("query.secagg_keys", "query.secagg_unmask"):
        original = next(m for m in grid.sent if m.metadata.message_type == message_type and m.metadata.dst_node_id == 1000)
        again = grid._deliver(Message(original.content, dst_node_id=1000, message_type=message_type))
        assert again.has_error() and "replayed" in again.error.reason, again.error.reason


def test_a_site_erases_its_keys_once_masked_and_its_shares_once_unmasked(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """What a site's state holds between stages: after its masked input only the shares it holds for others
    (for the unmasking), after the unmasking nothing of the round's secrets."""
    from aggregation.secagg import client as secagg_client

    unmask, at_unmask = secagg_client.unmask, []

    def inspecting_unmask(msg: Message, context: Context, share_next: bool = True) -> Message:
        at_unmask.append(wire.split(context.state[secagg_client.STATE_KEY]["secrets"]))  # type: ignore[index,arg-type]
        return unmask(msg, context, share_next)

    monkeypatch.setattr(secagg_client, "unmask", inspecting_unmask)
    grid, results, _ = run(tmp_path, ["task=medical", "num_rounds=1", "aggregation=secagg",
                                      "strategy.fraction_evaluate=0"], monkeypatch)
    assert results["status"] == "completed" and len(at_unmask) == 4
    for secrets in at_unmask:  # c_sk, s_sk, s_seed, b_seed, peer ids, c keys, s keys | held ids, b, sk | agreed
        assert [len(x) for x in secrets[:7]] == [0] * 7 and len(secrets[11]) == 0
        assert all(len(x) > 0 for x in secrets[7:10])  # the shares it holds for the others
    for node in grid.contexts:  # round 1's state is gone: either emptied, or replaced by the next round's shares
        state = grid.contexts[node].state[secagg_client.STATE_KEY]
        if state["stage"] == "unmask":  # type: ignore[index]
            assert all(len(x) == 0 for x in wire.split(state["secrets"]))  # type: ignore[index,arg-type]
        else:  # the pipelined stage 1 of round 2 (fresh keys), done in the same message as round 1's unmasking
            assert (state["round"], state["stage"]) == (2, "share")  # type: ignore[index]


def test_misaddressed_reply_is_rejected_by_the_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = LocalGrid._deliver

    def deliver(self, msg):  # type: ignore[no-untyped-def]
        reply = original(self, msg)
        if msg.metadata.message_type == "query.secagg_keys" and msg.metadata.dst_node_id == 1001:
            reply.content[WIRE_KEY]["round"] = 0  # a reply from another round
        return reply

    monkeypatch.setattr(LocalGrid, "_deliver", deliver)
    _, results, _ = run(tmp_path, ["task=medical", "num_rounds=1", "aggregation=secagg",
                                   "strategy.fraction_evaluate=0"], monkeypatch)
    assert results["status"] == "completed"
    sec = results["history"][0]["participation"]["secagg"]
    assert sec["survivors"] == 3
    assert any(r["node"] == 1001 and r["stage"] == "keys" and "replayed or misaddressed" in r["reason"]
               for r in sec["rejected"])


def test_pipelined_rounds_need_two_exchanges_and_stay_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    common = ["task=medical", "num_rounds=3", "strategy.fraction_evaluate=0"]
    grid, secure, updates = run(tmp_path / "secagg", [*common, "aggregation=secagg"], monkeypatch)
    assert secure["status"] == "completed" and len(secure["history"]) == 3
    types = [(m.metadata.message_type, int(m.content[WIRE_KEY]["round"])) for m in grid.sent]
    for r in (1, 2, 3):
        sent = sorted({t for t, rr in types if rr == r})
        expected = ["query.secagg_keys", "query.secagg_share"] if r == 1 else []
        assert sent == sorted([*expected, "query.secagg_unmask", "train.secagg"]), (r, sent)
        assert secure["history"][r - 1]["participation"]["secagg"]["pipelined"] is (r > 1)
    assert_rounds_equal_survivors_mean(grid, tmp_path / "secagg", updates)
    monkeypatch.undo()
    from app.runtime.local_grid import run_inprocess

    plain = run_inprocess(common, tmp_path / "plain")
    assert abs(secure["final"]["auc"] - plain["final"]["auc"]) < 1e-4


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
                                            "aggregation.neighbours=4", "faults.drop_rate=0.2"], monkeypatch)
    assert results["status"] == "completed"
    for h in results["history"]:
        sec = h["participation"]["secagg"]
        assert (sec["neighbours"], sec["threshold"], sec["survivors"]) == (4, 3, 8)
    # each site received keys and shares from its 4 neighbours only
    shares = [m for m in grid.sent if m.metadata.message_type == "query.secagg_share"]
    trains = [m for m in grid.sent if m.metadata.message_type == "train.secagg"]
    assert len(shares) >= 10 and len(trains) == 2 * 10  # round 1's share stage; every sampled site, both rounds
    assert all(len(m.content[WIRE_KEY]["ids"]) == 5 for m in shares)
    assert all(len(m.content[WIRE_KEY]["from"]) <= 4 for m in trains)
    assert_rounds_equal_survivors_mean(grid, tmp_path, updates)


def test_a_site_that_never_answers_a_stage_is_dropped_after_the_timeout(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A lost reply (what a timeout leaves) at the share stage: the site is logged as silent and the
    round completes without it; the sum is the others' aggregate."""
    original = LocalGrid.send_and_receive

    def lossy(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        replies = list(original(self, messages, timeout=timeout))
        return [r for r in replies if not (r.metadata.message_type == "query.secagg_share"
                                           and r.metadata.src_node_id == 1002)]

    monkeypatch.setattr(LocalGrid, "send_and_receive", lossy)
    overrides = [*FINANCE10, "num_rounds=1", "aggregation=secagg", "aggregation.stage_timeout=7"]
    cfg = config.compose(overrides)
    run_config = {"overrides": shlex.join([*overrides, f"data_dir={DATA_DIR}"]), "output-dir": str(tmp_path)}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    grid = LocalGrid(client_app.app, config.num_sites(cfg), run_config)
    server_app.app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    sec = json.loads((tmp_path / "results.json").read_text())["history"][0]["participation"]["secagg"]
    assert (sec["survivors"], sec["stages"]["share"]["ok"]) == (9, 9)
    assert any(r["node"] == 1002 and r["stage"] == "share" and "no reply within 7 s" in r["reason"]
               for r in sec["rejected"])
