"""Secure aggregation against a coordinator that deviates (issue #34): the review's attacks, each sent
to a real site (the ClientApp, in process) by altering the coordinator's messages on their way.

Every attack must end in an error reply naming the reason and nothing revealed by the attacked site;
the other sites' rounds go on. The attacks on identities run with a roster (each site its own key
file, every site the consortium's roster), as deployed sites do.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from aggregation.secagg import wire
from aggregation.secagg.client import WIRE_KEY
from aggregation.secagg.protocol import key_statement
from app import client_app, config, server_app
from core import identity
from tests.conftest import DATA_DIR
from tests.integration.test_secagg_rounds import RecordingGrid

TARGET = 1001
MEDICAL = ["task=medical", "num_rounds=1", "aggregation=secagg", "strategy.fraction_evaluate=0"]


def _run(tmp_path: Path, alter: Callable[[Message, RecordingGrid], None], roster: bool = False,
         overrides: list[str] = MEDICAL) -> tuple[RecordingGrid, dict[str, Any]]:
    run_config = {"overrides": shlex.join([*overrides, f"data_dir={DATA_DIR}"]), "output-dir": str(tmp_path)}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    holder: dict[str, RecordingGrid] = {}
    grid = RecordingGrid(client_app.app, config.num_sites(config.compose(overrides)), run_config,
                         alter=lambda m: alter(m, holder["grid"]))
    holder["grid"] = grid
    if roster:  # each site its own identity; the roster lists them all
        names = [f"hospital-{n}" for n in grid.contexts]
        paths = identity.provision(tmp_path / "keys", names)
        for node, name in zip(grid.contexts, names, strict=True):
            grid.contexts[node].node_config.update({"site-name": name, "site-key": paths[name][0],
                                                    "roster": paths[name][1]})
    server_app.app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    return grid, json.loads((tmp_path / "results.json").read_text())


def _wire(msg: Message) -> Any:
    return msg.content.config_records.get(WIRE_KEY)


def _get(w: Any, key: str) -> list[str]:
    return wire.split_names(w[key])


def _set(w: Any, key: str, names: list[str]) -> None:
    w[key] = "\n".join(names)  # no checks: a deviating coordinator sends what it likes


def _name_of(grid: RecordingGrid, node: int) -> str:
    return next(str(_wire(r)["name"]) for r in grid.replies
                if r.metadata.src_node_id == node and not r.has_error() and "name" in _wire(r))


def _answer(grid: RecordingGrid, message_type: str, node: int = TARGET) -> Message:
    """The attacked site's reply to the (altered) message of that type."""
    assert len(grid.sent) == len(grid.replies)  # one reply per message, in order
    return next(r for m, r in zip(grid.sent, grid.replies, strict=True)
                if m.metadata.message_type == message_type and m.metadata.dst_node_id == node)


def _refused(reply: Message, reason: str) -> None:
    assert reply.has_error(), "the site answered an attack"
    assert reason in reply.error.reason, reply.error.reason


# ---- parameters the coordinator sets: threshold, neighbourhood, survivors -------------------------------
def test_the_reviews_attack_threshold_one_and_a_singleton_unmasking_reveals_nothing(tmp_path: Path) -> None:
    """Main at 8f84a3c took ``threshold=1`` from the message; with a survivor list holding only the site, its
    unmask reply was its self-mask seed. Now each site computes its own threshold from its neighbourhood
    (3 of 4, whatever the message says) and reveals nothing for fewer survivors."""
    def alter(msg: Message, grid: RecordingGrid) -> None:
        w = _wire(msg)
        if msg.metadata.message_type == "train.secagg":
            w["threshold"] = 0.01
        if msg.metadata.message_type == "query.secagg_unmask" and msg.metadata.dst_node_id == TARGET:
            me = _name_of(grid, TARGET)
            _set(w, "dropped", sorted(set(_get(w, "survivors")) - {me}) + _get(w, "dropped"))
            _set(w, "survivors", [me])
            _set(w, "from", [])
            w["shares"] = b""

    grid, results = _run(tmp_path, alter)
    masked = [r for r in grid.replies if r.metadata.message_type == "train.secagg" and not r.has_error()]
    assert len(masked) == 4 and all(_wire(r)["threshold"] == 3 for r in masked)  # not 1: the site's own
    _refused(_answer(grid, "query.secagg_unmask"), "fewer than its threshold of 3")
    # the other three sites' shares still open every self-mask: the round completes with all four inputs
    sec = results["history"][0]["participation"]["secagg"]
    assert results["status"] == "completed" and sec["survivors"] == 4


@pytest.mark.parametrize("attack,reason", [
    ("no neighbours", "policy masks with at least 2"),
    ("one neighbour", "policy masks with at least 2"),
    ("an invented neighbour", "a neighbourhood the coordinator made up"),
    ("itself as a neighbour", "names this site itself"),
])
def test_a_neighbourhood_the_site_cannot_accept_is_refused_before_masking(attack: str, reason: str,
                                                                          tmp_path: Path) -> None:
    def alter(msg: Message, grid: RecordingGrid) -> None:
        if msg.metadata.message_type == "train.secagg" and msg.metadata.dst_node_id == TARGET:
            w = _wire(msg)
            hood = _get(w, "neighbours")
            _set(w, "neighbours", {"no neighbours": [], "one neighbour": hood[:1], "an invented neighbour": [*hood, "ghost"],
                                   "itself as a neighbour": [*hood, _name_of(grid, TARGET)]}[attack])

    grid, results = _run(tmp_path, alter)
    _refused(_answer(grid, "train.secagg"), reason)
    assert results["history"][0]["participation"]["secagg"]["survivors"] == 3  # the others' round went on


@pytest.mark.parametrize("attack,reason", [
    ("survivors below the threshold", "fewer than its threshold of 3"),
    ("a peer both survived and dropped", "repeat a name or share one"),
    ("a neighbour left out", "are not this site's neighbourhood"),
    ("the site itself dropped", "leaves out this site"),
    ("a stranger in the lists", "are not this site's neighbourhood"),
    ("a share from a dropped site", "not a surviving neighbour"),
])
def test_an_unmasking_the_site_cannot_accept_reveals_nothing(attack: str, reason: str, tmp_path: Path) -> None:
    def alter(msg: Message, grid: RecordingGrid) -> None:
        if msg.metadata.message_type != "query.secagg_unmask" or msg.metadata.dst_node_id != TARGET:
            return
        w = _wire(msg)
        me = _name_of(grid, TARGET)
        others = sorted(set(_get(w, "survivors")) - {me})
        if attack == "survivors below the threshold":  # two survive, two "dropped": too few to reveal
            _set(w, "survivors", [me, others[0]])
            _set(w, "dropped", others[1:])
        elif attack == "a peer both survived and dropped":  # asks for b's share and the pair's seed at once
            _set(w, "dropped", [others[0]])
        elif attack == "a neighbour left out":
            _set(w, "survivors", [me, *others[1:]])
        elif attack == "the site itself dropped":
            _set(w, "survivors", others)
            _set(w, "dropped", [me])
        elif attack == "a stranger in the lists":
            _set(w, "dropped", ["ghost"])
        else:  # the shares still include one from the site the lists now call dropped
            _set(w, "survivors", [me, *others[1:]])
            _set(w, "dropped", [others[0]])
            assert others[0] in _get(w, "from")

    grid, _ = _run(tmp_path, alter)
    _refused(_answer(grid, "query.secagg_unmask"), reason)


def test_a_second_unmasking_with_other_lists_is_refused(tmp_path: Path) -> None:
    """Asking again, now calling a survivor dropped (to get the pair's seed after its self-mask's share)."""
    grid, results = _run(tmp_path, lambda msg, grid: None)
    assert results["status"] == "completed"
    original = next(m for m in grid.sent if m.metadata.message_type == "query.secagg_unmask"
                    and m.metadata.dst_node_id == TARGET)
    me = _name_of(grid, TARGET)
    w = dict(_wire(original))
    other = next(s for s in _get(w, "survivors") if s != me)
    _set(w, "survivors", [s for s in _get(w, "survivors") if s != other])
    _set(w, "dropped", [other])
    content = RecordDict({WIRE_KEY: type(_wire(original))(w)})
    again = grid._deliver(Message(content, dst_node_id=TARGET, message_type="query.secagg_unmask"))
    _refused(again, "no masked round 1 open")


# ---- keys: signed by the roster's identities -----------------------------------------------------------
def _substitute(w: Any, peer: str, public: bytes, signature: bytes | None = None) -> None:
    holders = _get(w, "epoch-of")
    k = holders.index(peer)
    pks = wire.split_keys(w["epoch-pks"], len(holders))
    sigs = wire.split_fixed(w["epoch-sigs"], len(holders), 64)
    pks[k] = public
    if signature is not None:
        sigs[k] = signature
    w["epoch-pks"], w["epoch-sigs"] = wire.join_keys(pks), b"".join(sigs)


def _coordinator_key() -> bytes:
    return X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@pytest.mark.parametrize("roster", [False, True], ids=["simulated identities", "roster"])
@pytest.mark.parametrize("attack", ["substituted key", "flipped signature", "signed by the coordinator"])
def test_a_key_not_signed_by_its_sites_identity_is_refused(attack: str, roster: bool, tmp_path: Path) -> None:
    """The coordinator puts its own key in place of a neighbour's (a man in the middle): unsigned, with a
    signature altered, or signed by an identity it made. The site refuses before agreeing anything."""
    def alter(msg: Message, grid: RecordingGrid) -> None:
        if msg.metadata.message_type != "train.secagg" or msg.metadata.dst_node_id != TARGET:
            return
        w = _wire(msg)
        peer = next(p for p in _get(w, "epoch-of") if p != _name_of(grid, TARGET))
        own = _coordinator_key()
        if attack == "substituted key":
            _substitute(w, peer, own)
        elif attack == "flipped signature":
            holders = _get(w, "epoch-of")
            sigs = bytearray(w["epoch-sigs"])
            sigs[64 * holders.index(peer)] ^= 1
            w["epoch-sigs"] = bytes(sigs)
        else:
            forged = identity.SiteIdentity(peer, identity.new_identity())
            _substitute(w, peer, own, forged.sign(key_statement(1, "train", int(w["epoch"]), peer, own)))

    grid, results = _run(tmp_path, alter, roster=roster)
    _refused(_answer(grid, "train.secagg"), "is not signed by")
    assert results["history"][0]["participation"]["secagg"]["survivors"] == 3


def test_a_site_on_no_roster_cannot_join_a_sites_neighbourhood(tmp_path: Path) -> None:
    """With a roster, the coordinator cannot invent a site: a name the roster does not list, with a key
    signed by an identity the coordinator holds, is refused."""
    ghost = identity.SiteIdentity("ghost", identity.new_identity())

    def alter(msg: Message, grid: RecordingGrid) -> None:
        if msg.metadata.message_type == "train.secagg" and msg.metadata.dst_node_id == TARGET:
            w = _wire(msg)
            public = _coordinator_key()
            _set(w, "epoch-names", sorted([*_get(w, "epoch-names"), "ghost"]))
            _set(w, "epoch-of", [*_get(w, "epoch-of"), "ghost"])
            w["epoch-pks"] = bytes(w["epoch-pks"]) + public
            w["epoch-sigs"] = bytes(w["epoch-sigs"]) + ghost.sign(key_statement(1, "train", int(w["epoch"]), "ghost",
                                                                                 public))

    grid, results = _run(tmp_path, alter, roster=True)
    _refused(_answer(grid, "train.secagg"), "not on this site's roster")
    # with the roster, the three other sites verified each other's keys and finished the round
    sec = results["history"][0]["participation"]["secagg"]
    assert results["status"] == "completed" and sec["survivors"] == 3


def test_sites_with_a_roster_run_the_protocol_and_refuse_a_wrong_key_file(tmp_path: Path) -> None:
    """The roster path end to end: four sites with their own keys agree, mask and unmask (3 rounds,
    one key agreement); a site whose key file is not the one the roster lists refuses with the reason."""
    grid, results = _run(tmp_path, lambda msg, grid: None, roster=True,
                         overrides=["task=medical", "num_rounds=3", "aggregation=secagg", "strategy.fraction_evaluate=0"])
    assert results["status"] == "completed"
    assert [h["participation"]["secagg"]["survivors"] for h in results["history"]] == [4, 4, 4]
    assert [h["participation"]["secagg"]["key_exchange"] for h in results["history"]] == [True, False, False]
    ctx = grid.contexts[TARGET]
    other = identity.write_identity(tmp_path / "wrong.key")
    assert other != identity.identity_public(identity.load_identity(ctx.node_config["site-key"]))
    with pytest.raises(identity.IdentityError, match="lists key .* for 'hospital-1001'"):
        identity.SiteIdentity.load("hospital-1001", tmp_path / "wrong.key", ctx.node_config["roster"])


def test_the_sites_policy_sets_the_threshold_the_run_cannot_lower(tmp_path: Path) -> None:
    """``site_policy.secure_aggregation.colluders=1`` (every simulated site's policy): with 4 sites each site
    uses a threshold of 4 (a site of its neighbourhood may work with the coordinator), whatever the run's
    ``aggregation.threshold`` says; one dropout then aborts the round instead of revealing anything."""
    grid, results = _run(tmp_path, lambda msg, grid: None,
                         overrides=[*MEDICAL, "aggregation.threshold=0.51", "site_policy.secure_aggregation.colluders=1"])
    masked = [r for r in grid.replies if r.metadata.message_type == "train.secagg" and not r.has_error()]
    assert results["status"] == "completed" and len(masked) == 4
    assert all(_wire(r)["threshold"] == 4 for r in masked)
    with pytest.raises(RuntimeError, match="no site returned a usable update"):  # the only round aborted
        _run(tmp_path / "drop", lambda msg, grid: None,
             overrides=[*MEDICAL, "site_policy.secure_aggregation.colluders=1", "faults.drop_rate=0.25"])
    dropped = json.loads((tmp_path / "drop" / "results.json").read_text())
    assert "its threshold is 4" in dropped["history"][0]["participation"]["secagg"]["aborted"]
