"""Vertical learning with a coordinator that deviates (issue #33, attacks 2 and 3).

The parties are the real party code (:func:`vertical.party.handle`, the steps of
:mod:`vertical.hetero_lr`), deployed-style: each with its own identity and the others' pinned
(:func:`vertical.channel.provision`). The coordinator is the real coordinator code driving them
through an in-process relay that records every message; the attacks then send what a deviating
coordinator would, and each is refused with nothing learned.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import DATA_DIR
from tests.integration.test_vertical import small_files
from vertical import channel, hetero_lr, party, psi
from vertical.config import VerticalConfig
from vertical.coordinator import Session, VerticalError, hello, intersect

SCHEMAS = {"bank": DATA_DIR / "schemas/credit_vertical_bank.yaml",
           "platform": DATA_DIR / "schemas/credit_vertical_platform.yaml"}
ROLES = {"bank": "active", "platform": "passive"}
DOMAIN = "fedsilo-psi-v1|run-7"


class Relay:
    """Delivers each step to the real party code; records what the coordinator sent and received."""

    def __init__(self, envs: dict[str, party.PartyEnv]) -> None:
        self.envs, self.states = envs, {n: {} for n in envs}
        self.sent: list[tuple[str, str, dict[str, Any]]] = []
        self.replies: list[tuple[str, str, dict[str, Any]]] = []

    def call(self, name: str, step: str, payload: dict[str, Any]) -> dict[str, Any]:
        self.sent.append((step, name, payload))
        reply = party.handle(step, dict(payload), self.states[name], self.envs[name])
        self.replies.append((step, name, reply))
        return reply

    def hello(self, payload: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {n: self.call(n, "hello", payload) for n in self.envs}

    def send(self, step: str, payloads: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        try:
            return {n: self.call(n, step, p) for n, p in payloads.items()}
        except (party.StepError, channel.ChannelError, ValueError) as err:
            raise VerticalError(f"{step}: {err}") from err


def _envs(tmp_path: Path, small: dict[str, Path], pinned: bool = True) -> dict[str, party.PartyEnv]:
    keys = channel.provision(tmp_path / "keys", list(ROLES)) if pinned else {}
    cfg = VerticalConfig(key_bits=1024, epochs=1, batch_size=0)
    out = {}
    for name, role in ROLES.items():
        identity = channel.load_identity(keys[name][0]) if pinned else None
        peers = channel.load_pinned(keys[name][1]) if pinned else None
        out[name] = party.PartyEnv(name, role, str(small[name]), str(SCHEMAS[name]), None, None,
                                   str(tmp_path / "models"), "run-7", 0, cfg, deployed=True, identity=identity,
                                   pinned=peers)
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return small_files(tmp_path_factory.mktemp("vertical-deviating"))


def _session(relay: Relay) -> Session:
    s = Session(relay, relay.envs["bank"].cfg, 0)
    hello(s, {}, ROLES, DOMAIN)
    return s


def test_the_honest_protocol_still_runs_with_pinned_identities(tmp_path: Path, small: dict[str, Path]) -> None:
    relay = Relay(_envs(tmp_path, small))
    s = _session(relay)
    assert intersect(s, "train", DOMAIN, 10) == 400
    trainer = hetero_lr.trainer()
    trainer.setup(s)
    pending = trainer.step(s, 1, 0, None)
    trainer.finish_epoch(s, pending)
    for name in ROLES:  # both parties took their gradient step
        assert np.abs(party.get_array(relay.states[name], "lr:w")).sum() > 0, name


# ---- attack 3: PSI as an oracle for guessed ids ------------------------------------------------------
def test_psi_reblinds_only_the_other_partys_announced_list_once(tmp_path: Path, small: dict[str, Path]) -> None:
    relay = Relay(_envs(tmp_path, small))
    s = _session(relay)
    assert intersect(s, "train", DOMAIN, 10) == 400
    plat_state, plat_env = relay.states["platform"], relay.envs["platform"]
    # the attack of the review: H(guess) for guessed customer ids, sent to be re-blinded
    guesses = psi.blind_ids(["10001", "10002", "10003"], 1, DOMAIN.encode())
    with pytest.raises(party.StepError, match="does not open"):
        party.handle("psi.cross", {"which": "train", "active": "bank", "sealed": guesses}, plat_state, plat_env)
    # the same guesses sealed with a key of the coordinator's own: it cannot seal as the bank
    rogue = channel.Channel.between(channel.new_secret(), channel.public_of(bytes(plat_state["chan"])), "bank",
                                    "platform", "run-7")
    with pytest.raises(party.StepError, match="does not open"):
        party.handle("psi.cross", {"which": "train", "active": "bank", "sealed": rogue.seal(guesses, "psi-announce-train")},
                     plat_state, plat_env)
    # the bank's own announced list, replayed: re-blinded once per run, never twice
    announced = next(p["sealed"] for step, n, p in relay.sent if step == "psi.cross" and n == "platform")
    with pytest.raises(party.StepError, match="does not do it twice"):
        party.handle("psi.cross", {"which": "train", "active": "bank", "sealed": announced}, plat_state, plat_env)
    # and only at the role the protocol gives it: the active party never re-blinds on request
    with pytest.raises(party.StepError, match="only a passive party re-blinds"):
        party.handle("psi.cross", {"which": "train", "active": "bank", "sealed": announced}, relay.states["bank"],
                     relay.envs["bank"])
    # a second alignment (with the platform's list again) is refused too
    align = next(p for step, n, p in relay.sent if step == "psi.align")
    with pytest.raises(party.StepError, match="does not do it twice"):
        party.handle("psi.align", dict(align), relay.states["bank"], relay.envs["bank"])
    # nothing the coordinator received is a blinded id it could compare with its own guesses
    assert all("blob" not in r for _, _, r in relay.replies)


def test_a_substituted_run_key_is_refused_and_a_deployed_party_needs_pinned_peers(
        tmp_path: Path, small: dict[str, Path]) -> None:
    relay = Relay(_envs(tmp_path, small))
    s = _session(relay)
    mine = channel.new_secret()  # the coordinator's own key, offered as the platform's
    s.info["platform"] = {**s.info["platform"], "pub": channel.public_of(mine)}
    with pytest.raises(VerticalError, match="not signed by its pinned identity"):
        intersect(s, "train", DOMAIN, 10)
    forged = {**s.info["platform"], "sig": channel.sign_run_key(channel.new_identity(), "run-7", "platform",
                                                                  channel.public_of(mine))}
    s.info["platform"] = forged
    relay2 = Relay(_envs(tmp_path / "b", small))
    s2 = _session(relay2)
    s2.info["platform"] = forged
    with pytest.raises(VerticalError, match="not signed by its pinned identity"):
        intersect(s2, "train", DOMAIN, 10)
    unpinned = Relay(_envs(tmp_path / "c", small, pinned=False))
    with pytest.raises(VerticalError, match="without pinned peer identities"):
        intersect(_session(unpinned), "train", DOMAIN, 10)


# ---- attack 2: hetero LR's decryption as an oracle for the bank's labels --------------------------------
def _one_step(tmp_path: Path, small: dict[str, Path]) -> tuple[Relay, Session]:
    relay = Relay(_envs(tmp_path, small))
    s = _session(relay)
    intersect(s, "train", DOMAIN, 10)
    trainer = hetero_lr.trainer()
    trainer.setup(s)
    trainer.step(s, 1, 0, None)
    return relay, s


def test_the_bank_decrypts_only_its_peers_masked_gradients_of_the_step_once(tmp_path: Path,
                                                                               small: dict[str, Path]) -> None:
    relay, _ = _one_step(tmp_path, small)
    bank_state, bank_env = relay.states["bank"], relay.envs["bank"]
    # the review's attack: the bank's own encrypted residual (0.5 - y at weights zero) relayed back to it
    residual = next(r["sealed"] for step, n, r in relay.replies if step == "lr.encrypt" and n == "bank")
    with pytest.raises(party.StepError, match="does not open"):
        party.handle("lr.decrypt", {"masked:platform": residual}, bank_state, bank_env)
    # the same residual without its seal (the ciphertexts themselves): not a peer's object, not decrypted
    bank_ch = party.peer_channel(bank_state, bank_env, "platform")
    raw = channel.Channel(bank_ch.key, "platform", "bank").open(residual, "lr-d|1|0")
    with pytest.raises(party.StepError, match="does not open"):
        party.handle("lr.decrypt", {"masked:platform": raw}, bank_state, bank_env)
    # the platform's genuine masked gradient of this step, sent again: decrypted once per step only
    masked = next(p["masked:platform"] for step, n, p in relay.sent if step == "lr.decrypt" and n == "bank")
    with pytest.raises(party.StepError, match="does not do it twice"):
        party.handle("lr.decrypt", {"masked:platform": masked}, bank_state, bank_env)
    # the decrypted values the coordinator relays are sealed: it never saw a plaintext gradient
    plain = next(r["plain:platform"] for step, n, r in relay.replies if step == "lr.decrypt" and n == "bank")
    # (random ciphertext holds b"0x" by chance once in ~65,536 byte pairs: look for a hex number, as the plaintext
    # writes them, which random bytes hold with probability ~1e-13 per byte)
    assert isinstance(plain, bytes) and re.search(rb"0x[0-9a-f]{8}", plain) is None


def test_a_step_is_never_run_twice_and_a_masked_gradient_is_bound_to_its_step(tmp_path: Path,
                                                                             small: dict[str, Path]) -> None:
    relay, s = _one_step(tmp_path, small)
    plat_state, plat_env = relay.states["platform"], relay.envs["platform"]
    with pytest.raises(party.StepError, match="does not follow step"):
        party.handle("lr.encrypt", {"epoch": 1, "batch": 0, "encrypt": True, "to": "bank"}, plat_state, plat_env)
    # step (1, 0)'s masked gradient, offered in a later step: bound to its step, it does not open there
    masked = next(p["masked:platform"] for step, n, p in relay.sent if step == "lr.decrypt" and n == "bank")
    relay.states["bank"]["lr:step"] = "1|1"
    with pytest.raises(party.StepError, match="does not open"):
        party.handle("lr.decrypt", {"masked:platform": masked}, relay.states["bank"], relay.envs["bank"])
    del s


def test_the_moduli_travel_sealed_and_cannot_be_substituted(tmp_path: Path, small: dict[str, Path]) -> None:
    relay, _ = _one_step(tmp_path, small)
    sent = json.dumps([(step, n, {k: (v.hex() if isinstance(v, bytes) else v) for k, v in p.items()})
                       for step, n, p in relay.sent])
    for name in ROLES:
        p, q = party.get_ints(relay.states[name], "lr:pq")
        assert format(p * q, "x") not in sent
